"""Dynamic-dimension specs: parse, validate and hand them to ``torch.export``.

A spec maps a symbol name to a range, optionally with the input dims it names::

    {"seq": (1, 1024)}                                    # conventional name
    {"batch": (1, 8), "seq": (1, 1024)}
    {"tokens": {"range": (1, 4096), "dims": {"input_ids": 1, "mask": [1, 2]}}}

Conventional names need no ``dims``: ``batch`` is dim 0 of every tensor input
(rank >= 1) and ``seq`` is dim 1 of every tensor input of rank >= 2. Any other
name must say which dims it stands for. Ranges are inclusive, ``max`` may be
``None`` (unbounded). A range whose min equals its max is a static dim.

Everything is checked before export runs, so a typo is one clear
:class:`CaptureError` instead of a page of torch guards.

Size-1 examples: ``torch.export`` specialises any dim whose example size is 0
or 1 (it cannot tell a broadcast from a real dim), even when the spec says it
is dynamic. A range starting at 1 is fine as long as the *example* is >= 2
(torch keeps the symbol and the graph is valid at 1 too). When the example
itself is 1, :meth:`DynamicSpec.export_examples` hands export a copy of the
inputs repeated along that dim to a size >= 2 that collides with no other dim
size (non-strict export traces with fake tensors, so only shapes matter); the
captured graph is symbolic in the dim and the user's real example is what
``Captured.example_inputs`` holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from transfuse.errors import CaptureError

#: conventional symbol names and the dim they stand for (with the minimal input rank)
CONVENTIONS: dict[str, tuple[int, int]] = {"batch": (0, 1), "seq": (1, 2)}
UNBOUNDED = 2**63 - 1


@dataclasses.dataclass
class Symbol:
    """One dynamic dim: its name, inclusive range and the (input, dim) pairs it names."""

    name: str
    min: int
    max: int  # UNBOUNDED when the user gave None
    dims: list[tuple[str, int]]
    example: int  # the example size (the same in every input)

    @property
    def static(self) -> bool:
        return self.min == self.max


@dataclasses.dataclass
class DynamicSpec:
    """A validated spec, resolved against the example tensor inputs."""

    symbols: dict[str, Symbol]
    #: symbols whose size-1 example was widened for export: name -> size traced with
    widened: dict[str, int] = dataclasses.field(default_factory=dict)

    def dim_names(self) -> dict[tuple[str, int], str]:
        """(input name, dim) -> symbol name, for the dynamic (non-static) symbols."""
        return {d: s.name for s in self.symbols.values() if not s.static for d in s.dims}

    def ranges(self) -> dict[str, tuple[int, int]]:
        return {s.name: (s.min, s.max) for s in self.symbols.values() if not s.static}

    def torch_dynamic_shapes(self, names: Sequence[str]) -> tuple[dict[int, Any] | None, ...]:
        """Per-input ``{dim: torch.export.Dim}`` for the flat tensor inputs ``names``."""
        from torch.export import Dim

        dims = {}
        for s in self.symbols.values():
            if s.static:
                continue
            kw = {"min": s.min}
            if s.max != UNBOUNDED:
                kw["max"] = s.max
            dims[s.name] = Dim(s.name, **kw)
        by_input: dict[str, dict[int, Any]] = {}
        for (inp, d), name in self.dim_names().items():
            by_input.setdefault(inp, {})[d] = dims[name]
        return tuple(by_input.get(n) for n in names)

    def export_examples(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs for ``torch.export``: the examples, with size-1 dynamic dims repeated to >= 2."""
        taken = {int(x) for t in tensors.values() for x in t.shape}
        out = dict(tensors)
        for s in self.symbols.values():
            if s.static or s.example >= 2:
                continue
            size = 2
            while size in taken and size < s.max:
                size += 1
            if size > s.max:
                continue  # range is {1}..{max<2}: nothing to widen to
            taken.add(size)
            self.widened[s.name] = size
            for inp, d in s.dims:
                t = out[inp]
                reps = [1] * t.dim()
                reps[d] = size
                out[inp] = t.repeat(*reps)
        return out


def resolve(
    dynamic: Mapping[str, Any] | None,
    tensors: Mapping[str, torch.Tensor],
    params: Sequence[str],
) -> DynamicSpec:
    """Validate ``dynamic`` against the tensor inputs (by name) and forward()'s parameter names.

    Raises :class:`CaptureError` for: a name that is not an identifier, an unknown
    name without ``dims``, a malformed or empty range, min > max, min < 1, a range
    that does not contain the example size, a dims entry naming an input that is
    not a parameter of forward() (or is not a tensor in this call), a dim out of
    range, one dim claimed by two names, and examples that disagree on a symbol.
    """
    if dynamic is None:
        return DynamicSpec({})
    if not isinstance(dynamic, Mapping):
        raise CaptureError(
            f"dynamic must be a dict like {{'seq': (1, 1024)}}, got {type(dynamic).__name__}"
        )
    symbols: dict[str, Symbol] = {}
    owner: dict[tuple[str, int], str] = {}
    for name, entry in dynamic.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise CaptureError(f"dynamic dim name {name!r} must be an identifier like 'seq'")
        lo, hi, explicit = parse_entry(name, entry)
        if explicit is None:
            if name not in CONVENTIONS:
                raise CaptureError(
                    f"dynamic dim {name!r} is not a conventional name ({', '.join(CONVENTIONS)}); "
                    f"say which input dims it is: {{{name!r}: {{'range': ({lo}, {_hi(hi)}), "
                    f"'dims': {{'input_ids': 1}}}}}}"
                )
            axis, min_rank = CONVENTIONS[name]
            dims = [(inp, axis) for inp, t in tensors.items() if t.dim() >= min_rank]
            if not dims:
                raise CaptureError(
                    f"dynamic dim {name!r} is dim {axis} of every tensor input of rank >= {min_rank}, "
                    f"but no input has that rank (inputs: "
                    f"{', '.join(f'{k} {list(t.shape)}' for k, t in tensors.items()) or 'none'})"
                )
        else:
            dims = _explicit_dims(name, explicit, tensors, params)
        for d in dims:
            if d in owner:
                raise CaptureError(
                    f"dim {d[1]} of input {d[0]!r} is claimed by both {owner[d]!r} and {name!r}"
                )
            owner[d] = name
        sizes = {(inp, d): int(tensors[inp].shape[d]) for inp, d in dims}
        distinct = set(sizes.values())
        if len(distinct) > 1:
            listing = ", ".join(f"{inp}[{d}]={n}" for (inp, d), n in sizes.items())
            raise CaptureError(
                f"dynamic dim {name!r} has different example sizes ({listing}); each symbol is one "
                f"size. Use the explicit form {{{name!r}: {{'range': ..., 'dims': {{...}}}}}} "
                "to name only the dims that share it"
            )
        example = distinct.pop()
        if not lo <= example <= hi:
            raise CaptureError(
                f"dynamic dim {name!r}: the example size {example} is outside its range "
                f"[{lo}, {_hi(hi)}]; widen the range or change the example"
            )
        symbols[name] = Symbol(name, lo, hi, dims, example)
    return DynamicSpec(symbols)


def _hi(hi: int) -> str:
    return "None" if hi == UNBOUNDED else str(hi)


def parse_entry(name: str, entry: Any) -> tuple[int, int, Any]:
    """One ``dynamic`` entry, ``(lo, hi)`` or ``{"range": (lo, hi), "dims": {...}}``, checked:
    returns ``(lo, hi, dims)`` with ``hi`` :data:`UNBOUNDED` for ``None`` and ``dims`` None
    when not given. Both frontends read their ``dynamic=`` argument through it; a malformed
    entry (not a pair, non-int bounds, min < 1, min > max, unknown keys) is a CaptureError."""
    explicit = None
    rng = entry
    if isinstance(entry, Mapping):
        unknown = set(entry) - {"range", "dims"}
        if unknown or "range" not in entry:
            raise CaptureError(
                f"dynamic dim {name!r}: the dict form takes 'range' and optional 'dims', got "
                f"{sorted(entry)}"
            )
        rng, explicit = entry["range"], entry.get("dims")
    if not (isinstance(rng, (tuple, list)) and len(rng) == 2):
        raise CaptureError(f"dynamic dim {name!r}: range must be (min, max), got {rng!r}")
    lo, hi = rng
    if hi is None:
        hi = UNBOUNDED
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, int):
            raise CaptureError(f"dynamic dim {name!r}: range bounds must be ints, got {rng!r}")
    if lo < 1:
        raise CaptureError(f"dynamic dim {name!r}: min must be >= 1, got {lo}")
    if lo > hi:
        raise CaptureError(f"dynamic dim {name!r}: min {lo} > max {hi}")
    return lo, hi, explicit


def _explicit_dims(
    name: str, explicit: Any, tensors: Mapping[str, torch.Tensor], params: Sequence[str]
) -> list[tuple[str, int]]:
    if not isinstance(explicit, Mapping) or not explicit:
        raise CaptureError(
            f"dynamic dim {name!r}: 'dims' must map input names to a dim or list of dims, "
            f"got {explicit!r}"
        )
    out = []
    for inp, ds in explicit.items():
        if inp not in params:
            raise CaptureError(
                f"dynamic dim {name!r}: {inp!r} is not an input of forward() "
                f"(inputs: {', '.join(params)})"
            )
        if inp not in tensors:
            raise CaptureError(
                f"dynamic dim {name!r}: input {inp!r} is not a tensor in this call "
                "(it is None, a constant or not passed)"
            )
        rank = tensors[inp].dim()
        for d in [ds] if isinstance(ds, int) else list(ds):
            if isinstance(d, bool) or not isinstance(d, int):
                raise CaptureError(f"dynamic dim {name!r}: dim {d!r} of {inp!r} is not an int")
            if not -rank <= d < rank:
                raise CaptureError(
                    f"dynamic dim {name!r}: dim {d} is out of range for input {inp!r} of shape "
                    f"{list(tensors[inp].shape)}"
                )
            out.append((inp, d % rank))
    return out
