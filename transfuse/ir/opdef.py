"""How an IR op is declared: :class:`OpDef`, :class:`Attr` and the ``register`` decorator.

An :class:`OpDef` says everything the compiler knows about an op:

- ``inputs``: input names; ``"x?"`` is optional (may be ``None``), ``"*xs"`` is
  variadic (only last);
- ``attrs``: name -> :class:`Attr` (kind and default; ``REQUIRED`` if none);
- ``infer(node) -> [TensorType]``: output types from input types and attrs
  (``None`` for ops whose types come from capture, like ``torch_fallback``);
- ``verify(node) -> reason | None``: op-specific invariants beyond the schema;
- ``impl(inputs, attrs, env) -> Tensor | tuple``: the reference
  implementation in torch. ``env`` maps symbolic dim names to their values for
  this call, for attrs that hold symbolic dims. It is the numeric oracle and
  what ``ir/interpret.py`` runs;
- ``cost(node) -> (flops, bytes)``: work and memory traffic (may be symbolic);
- ``mutates``: indices of the inputs the op writes in place (a KV cache). Such an op
  is never pure: cleanup passes never drop, merge, fold or move it.

The op families in ``transfuse/ir/opdefs/`` register into the table kept here.
This module imports none of them: look ops up through :mod:`transfuse.ir.ops`,
which imports every family once, so lookups never depend on import order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import sympy
import torch

from transfuse.errors import IRVerifyError
from transfuse.ir.types import Dim, DType, TensorType, eval_dim, normalize_dim

REQUIRED = object()

#: attribute kinds: int, float, bool, str, dtype, dim, ints, floats, dims, any
_KINDS = {"int", "float", "bool", "str", "dtype", "dim", "ints", "floats", "dims", "any",
          "float?", "int?", "dim?", "str?", "dtype?", "floats?"}


@dataclasses.dataclass(frozen=True)
class Attr:
    kind: str
    default: Any = REQUIRED

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"unknown attr kind {self.kind}")


def _coerce(kind: str, value: Any, where: str) -> Any:
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    try:
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, (int, sympy.Integer)):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if kind == "dtype":
            if isinstance(value, torch.dtype):
                return DType.from_torch(value)
            if isinstance(value, str):
                return DType.parse(value)
            if not isinstance(value, DType):
                raise TypeError
            return value
        if kind == "dim":
            return normalize_dim(value)
        if kind == "ints":
            return tuple(_coerce("int", v, where) for v in value)
        if kind == "floats":
            return tuple(float(v) for v in value)
        if kind == "dims":
            return tuple(normalize_dim(v) for v in value)
        if kind == "any":
            return value
    except (TypeError, ValueError, IRVerifyError):
        pass
    raise IRVerifyError(f"{where}: expected {kind}, got {value!r}")


@dataclasses.dataclass
class OpDef:
    name: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, Attr]
    infer: Callable[[Any], list[TensorType]] | None
    impl: Callable[[list, dict, Mapping[str, int]], Any]
    verify: Callable[[Any], str | None] | None = None
    cost: Callable[[Any], tuple[Dim, Dim]] | None = None
    pure: bool = True
    doc: str = ""
    #: indices of inputs written in place; a mutating op is impure (``__post_init__``)
    mutates: tuple[int, ...] = ()

    def __post_init__(self):
        if self.mutates:
            self.pure = False

    @property
    def min_inputs(self) -> int:
        return sum(1 for n in self.inputs if not n.endswith("?") and not n.startswith("*"))

    @property
    def variadic(self) -> bool:
        return bool(self.inputs) and self.inputs[-1].startswith("*")

    def normalize_attrs(self, attrs: Mapping[str, Any], where: str) -> dict[str, Any]:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise IRVerifyError(
                f"{where}: unknown attribute(s) {sorted(unknown)} for op {self.name} "
                f"(known: {sorted(self.attrs)})"
            )
        out: dict[str, Any] = {}
        for name, spec in self.attrs.items():
            if name in attrs:
                out[name] = _coerce(spec.kind, attrs[name], f"{where}.{name}")
            elif spec.default is REQUIRED:
                raise IRVerifyError(f"{where}: op {self.name} requires attribute {name!r}")
            else:
                out[name] = spec.default
        return out

    def check_arity(self, node) -> str | None:
        n = len(node.inputs)
        if self.variadic:
            if n < self.min_inputs:
                return f"{self.name} takes at least {self.min_inputs} inputs, got {n}"
        else:
            if n < self.min_inputs or n > len(self.inputs):
                return f"{self.name} takes {self.min_inputs}..{len(self.inputs)} inputs, got {n}"
        for i, v in enumerate(node.inputs):
            name = self.inputs[min(i, len(self.inputs) - 1)]
            if v is None and not name.endswith("?"):
                return f"{self.name}: input {i} ({name}) is required but missing"
        return None

    def infer_types(self, node) -> list[TensorType]:
        reason = self.check_arity(node)
        if reason:
            raise IRVerifyError(f"{reason} (at {node!r})")
        if self.infer is None:
            raise IRVerifyError(f"op {self.name} cannot infer its output types; pass out_types")
        return list(self.infer(node))

    def node_cost(self, node) -> tuple[Dim, Dim]:
        if self.cost is not None:
            return self.cost(node)
        return 0, default_bytes(node)


_REGISTRY: dict[str, OpDef] = {}


def register(
    name: str,
    inputs: Sequence[str],
    attrs: Mapping[str, Attr] | None = None,
    *,
    infer: Callable | None = None,
    verify: Callable | None = None,
    cost: Callable | None = None,
    pure: bool = True,
    mutates: Sequence[int] = (),
) -> Callable:
    """Decorator on the reference implementation: ``@register("add", ["a", "b"], infer=...)``."""

    def deco(impl: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"op {name} registered twice")
        _REGISTRY[name] = OpDef(name, tuple(inputs), dict(attrs or {}), infer, impl, verify, cost,
                                pure, (impl.__doc__ or "").strip(), tuple(mutates))
        return impl

    return deco


def registered() -> Mapping[str, OpDef]:
    """A read-only view of every op registered so far (use :mod:`transfuse.ir.ops` to look up)."""
    return MappingProxyType(_REGISTRY)


# -- helpers shared by op definitions ----------------------------------------


def eval_dims(dims: Sequence[Dim], env: Mapping[str, int]) -> list[int]:
    return [eval_dim(d, env) for d in dims]


def default_bytes(node) -> Dim:
    total: Dim = 0
    for v in list(node.inputs) + list(node.outputs):
        if v is not None:
            total = total + v.type.nbytes()
    return normalize_dim(total) if not isinstance(total, int) else total


__all__ = ["REQUIRED", "Attr", "OpDef", "register", "registered", "eval_dims", "default_bytes"]
