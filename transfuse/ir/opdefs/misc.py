"""Structural ops: identity, dropout, runtime assertions and the torch fallback.

``torch_fallback`` keeps an aten op that has no IR meaning so that capture
never fails on coverage alone. Its ``target`` is the op's qualified name
(``aten::index.Tensor``); ``args`` is a JSON template of the call where
``{"$in": i}`` stands for the node's i-th input. Its output types come from
capture; it is executed by looking the op up in ``torch.ops``.
"""

from __future__ import annotations

import json

import torch

from transfuse.errors import UnsupportedOpError
from transfuse.ir.opdef import Attr, default_bytes, register
from transfuse.ir.opdefs._util import in_type


@register("identity", ["x"], infer=lambda n: [in_type(n, 0)], cost=lambda n: (0, 0))
def identity(xs, attrs, env):
    return xs[0]


@register("dropout", ["x"], {"p": Attr("float", 0.0), "train": Attr("bool", False)},
          infer=lambda n: [in_type(n, 0)], pure=False)
def dropout(xs, attrs, env):
    """Dropout; with ``train=False`` (inference) it is the identity."""
    return torch.nn.functional.dropout(xs[0], attrs["p"], attrs["train"])


@register("assert", ["*xs"], {"message": Attr("str", "")}, infer=lambda n: [], pure=False)
def assert_(xs, attrs, env):
    """A runtime check from capture (all inputs must be true); produces nothing."""
    for x in xs:
        if not bool(torch.all(x)):
            raise AssertionError(attrs["message"] or "assertion in captured graph failed")
    return []


def resolve_aten(target: str):
    """``aten::name.overload`` -> the torch OpOverload."""
    try:
        ns, rest = target.split("::", 1)
        name, _, overload = rest.partition(".")
        packet = getattr(getattr(torch.ops, ns), name)
        return getattr(packet, overload or "default")
    except (AttributeError, ValueError):
        raise UnsupportedOpError(f"torch_fallback target {target!r} is not a torch op") from None


def _decode(obj, xs):
    if isinstance(obj, dict):
        if set(obj) == {"$in"}:
            return xs[obj["$in"]]
        if set(obj) == {"$dtype"}:
            return getattr(torch, obj["$dtype"])
        if set(obj) == {"$tuple"}:
            return tuple(_decode(o, xs) for o in obj["$tuple"])
        return {k: _decode(v, xs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(o, xs) for o in obj]
    return obj


def call_fallback(target: str, args_json: str, xs):
    op = resolve_aten(target)
    spec = json.loads(args_json)
    args = _decode(spec.get("args", []), xs)
    kwargs = _decode(spec.get("kwargs", {}), xs)
    return op(*args, **kwargs)


@register("torch_fallback", ["*xs"], {"target": Attr("str"), "args": Attr("str", "{}")},
          infer=None, cost=lambda n: (0, default_bytes(n)))
def torch_fallback(xs, attrs, env):
    out = call_fallback(attrs["target"], attrs["args"], xs)
    return tuple(out) if isinstance(out, (list, tuple)) else out
