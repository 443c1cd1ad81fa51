"""What the recognition rules share: checks (a formula's constants, epsilons, trailing axes,
per-feature parameters, kept types; each ``-> reason | None`` returns a "no" with its why)
and one pattern helper (``op_with_optional``)."""

from __future__ import annotations

import itertools
import math

from transfuse.ir.graph import Value
from transfuse.ir.types import dims_equal
from transfuse.passes.rewrite import Match, P, Pattern

#: relative tolerance for a formula's irrational constants (√2, √(2/π)) stored in fp32
CONST_RTOL = 1e-6


def scalar_is(m: Match, name: str, want: float, what: str, rtol: float = CONST_RTOL) -> str | None:
    """``m.scalar(name)`` equals ``want`` up to ``rtol`` (an fp32 rounding), else a reason."""
    if name not in m:
        return None
    got = m.scalar(name)
    if not math.isclose(got, want, rel_tol=rtol, abs_tol=0.0):
        return f"constant {got!r} is not {what} ({want!r})"
    return None


def positive_eps(m: Match, name: str = "eps") -> tuple[float, str | None]:
    """The captured epsilon, and a reason when it is not a finite number > 0."""
    eps = m.scalar(name)
    if not (math.isfinite(eps) and eps > 0):
        return eps, f"epsilon {eps!r} is not a finite number > 0"
    return eps, None


def trailing_axes(axes, rank: int) -> int | None:
    """``len(axes)`` when ``axes`` are exactly the last dims of a rank-``rank`` tensor."""
    norm = sorted(a % rank for a in axes) if rank else []
    if not norm or norm != list(range(rank - len(norm), rank)):
        return None
    return len(norm)


def same_shape(a, b) -> bool:
    """Equal ranks and dims (symbolic dims compared exactly)."""
    return len(a) == len(b) and all(dims_equal(p, q) for p, q in zip(a, b))


def is_param_of(v: Value, x: Value, nd: int) -> bool:
    """``v`` is a per-feature parameter for the last ``nd`` dims of ``x`` (rank nd, same dims)."""
    return v.type.rank == nd and same_shape(v.shape, x.shape[x.type.rank - nd:])


def keeps_type(m: Match, x: str = "x") -> str | None:
    """The matched root computes a value of the same type as ``m[x]`` (what the fused op gives)."""
    out, want = m.root.outputs[0].type, m[x].type
    if out != want:
        return f"the pattern turns {want} into {out}; the fused op keeps the input type"
    return None


def op_with_optional(op: str, required: list[Pattern], optional: list[str], *,
                     name: str | None = None, attrs: dict | None = None) -> Pattern:
    """``op(*required, *optional)`` where each optional input is either a value captured under
    its name or absent: one alternative per combination (present ones first)."""
    alts = [
        P.op(op, *required, *(P.any(n) if present else None for n, present in zip(optional, combo)),
             name=name, attrs=attrs)
        for combo in itertools.product((True, False), repeat=len(optional))
    ]
    return alts[0] if len(alts) == 1 else P.alt(*alts)
