"""The IR op set: look ops up here.

Importing this module imports every op family once (the explicit list in
``transfuse/ir/opdefs/__init__.py``), so ``get_op`` sees all of them whichever
module was imported first. How an op is declared (:class:`OpDef`,
:class:`Attr`, ``register``) lives in :mod:`transfuse.ir.opdef`, which the
families import; it never imports them back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from transfuse.errors import UnsupportedOpError
from transfuse.ir import opdefs  # noqa: F401  (registers every op family)
from transfuse.ir.opdef import OpDef, registered

_OPS = registered()  # a live read-only view of the registry: lookups are one dict access


def get_op(name: str) -> OpDef:
    """The definition of op ``name``; :class:`UnsupportedOpError` if there is none."""
    try:
        return _OPS[name]
    except KeyError:
        raise UnsupportedOpError(f"unknown IR op {name!r}") from None


def has_op(name: str) -> bool:
    return name in _OPS


def all_ops() -> dict[str, OpDef]:
    """Every registered op, by name (a copy)."""
    return dict(_OPS)


def run_reference(node, inputs: list, env: Mapping[str, int]) -> list[torch.Tensor]:
    """Execute one node with its reference implementation; always returns a list."""
    out = get_op(node.op).impl(inputs, node.attrs, env)
    if isinstance(out, (tuple, list)):
        return list(out)
    return [out] if node.outputs else []


__all__ = ["get_op", "has_op", "all_ops", "run_reference"]
