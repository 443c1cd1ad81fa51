"""The aten -> IR registry: converters by overload or packet name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

FALLBACK = object()  # a converter returns this to keep the node as torch_fallback
Converter = Callable[[Any, dict], Any]
TABLE: dict[str, Converter] = {}


def aten(*names: str) -> Callable[[Converter], Converter]:
    """Register a converter for aten overloads (``"add.Tensor"``) or packets (``"add"``)."""

    def deco(fn: Converter) -> Converter:
        for name in names:
            if name in TABLE:
                raise ValueError(f"aten op {name} registered twice")
            TABLE[name] = fn
        return fn

    return deco


def lookup(target: torch._ops.OpOverload) -> Converter | None:
    schema = target._schema
    ns, _, name = schema.name.partition("::")
    if ns != "aten":
        return None
    return TABLE.get(f"{name}.{schema.overload_name or 'default'}") or TABLE.get(name)
