"""recognize.fuse-activations: GELU, SiLU, SwiGLU and softmax written as math -> one op each.

Glossary: x the activation input, F the MLP hidden size (gate and up are [..., F]).

Rules:

- ``act/gelu-erf``: ``0.5·x·(1 + erf(x/√2))`` (``x·(1/√2)`` too; the 0.5 on either side)
  -> ``gelu(x)``;
- ``act/gelu-tanh``: ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` (``x³`` as ``pow(x, 3)``
  or ``x·x·x``) -> ``gelu(x) {approximate="tanh"}``. The two are distinct functions: the
  ``approximate`` attribute records which one the model computes and is never swapped,
  and every constant is checked (a formula with a different constant is a near miss);
- ``act/silu``: ``x·sigmoid(x)`` -> ``silu(x)``;
- ``act/swiglu``: ``silu(gate)·up`` -> ``swiglu(gate, up)`` (same types, no broadcasting);
- ``act/softmax-max-subtracted``: ``exp(x - max(x)) / sum(exp(...))`` -> ``softmax(x)``;
- ``act/softmax``: ``exp(x) / sum(exp(x))`` (or ``· reciprocal(sum)``) -> ``softmax(x)``.
  The reductions must run over one axis, the same one, keepdim.

Needs: cleanup (python scalars are 0-d constants). Guarantees: each rewrite computes
the same function (up to rounding of the formula's fp32 constants; softmax without the
max subtraction becomes the overflow-safe form).
"""

from __future__ import annotations

import math

from transfuse.passes.recognize._common import keeps_type, scalar_is
from transfuse.passes.registry import register_pass
from transfuse.passes.rewrite import Match, P, Pattern, RewritePass, Rule

_x = P.any("x")


def half_x_times(one_plus: Pattern) -> Pattern:
    """``0.5·x·one_plus`` in the orders people write it."""
    return P.alt(
        P.op("mul", P.op("mul", _x, P.scalar("half"), commutative=True), one_plus,
             commutative=True),
        P.op("mul", P.op("mul", _x, one_plus, commutative=True), P.scalar("half"),
             commutative=True),
        P.op("mul", _x, P.op("mul", one_plus, P.scalar("half"), commutative=True),
             commutative=True),
        tags=("half-x", "x-then-half", "half-of-sum"),
    )


def _check_gelu_common(m: Match) -> str | None:
    if not m["x"].dtype.is_float:
        return f"%{m['x'].name} is {m['x'].dtype}, not floating point"
    return (scalar_is(m, "half", 0.5, "GELU's 1/2", rtol=0)
            or scalar_is(m, "one", 1.0, "GELU's 1", rtol=0)
            or keeps_type(m))


# -- gelu (erf) --------------------------------------------------------------------------

_erf_arg = P.alt(P.op("div", _x, P.scalar("sqrt2")),
                 P.op("mul", _x, P.scalar("rsqrt2"), commutative=True),
                 tags=("div-sqrt2", "mul-rsqrt2"))
_one_plus_erf = P.op("add", P.op("erf", _erf_arg, name="erf"), P.scalar("one"),
                     commutative=True)

GELU_ERF = Rule(
    id="act/gelu-erf",
    pattern=half_x_times(_one_plus_erf),
    check=lambda m: (_check_gelu_common(m)
                     or scalar_is(m, "sqrt2", math.sqrt(2.0), "√2")
                     or scalar_is(m, "rsqrt2", 1 / math.sqrt(2.0), "1/√2")),
    replace=lambda m, b: b.op("gelu", m["x"], approximate="none"),
    near_miss_depth=4,  # 0.5·x·(1 + tanh ...) reaches depth 3 before it differs
)

# -- gelu (tanh) -------------------------------------------------------------------------

_cube = P.alt(P.op("pow", _x, P.scalar("three")),
              P.op("mul", P.op("mul", _x, _x), _x, commutative=True),
              tags=("pow3", "mul3"))
_inner = P.op("add", _x, P.op("mul", _cube, P.scalar("k"), commutative=True),
              commutative=True)
_one_plus_tanh = P.op(
    "add",
    P.op("tanh", P.op("mul", _inner, P.scalar("sqrt_2_pi"), commutative=True), name="tanh"),
    P.scalar("one"),
    commutative=True,
)

GELU_TANH = Rule(
    id="act/gelu-tanh",
    pattern=half_x_times(_one_plus_tanh),
    check=lambda m: (_check_gelu_common(m)
                     or scalar_is(m, "three", 3.0, "the cube's 3", rtol=0)
                     or scalar_is(m, "k", 0.044715, "GELU's 0.044715")
                     or scalar_is(m, "sqrt_2_pi", math.sqrt(2 / math.pi), "√(2/π)")),
    replace=lambda m, b: b.op("gelu", m["x"], approximate="tanh"),
    near_miss_depth=4,
)

# -- silu, swiglu ------------------------------------------------------------------------

SILU = Rule(
    id="act/silu",
    pattern=P.op("mul", _x, P.op("sigmoid", _x, name="sigmoid"), commutative=True),
    check=lambda m: keeps_type(m) if m["x"].dtype.is_float else "integer input",
    replace=lambda m, b: b.op("silu", m["x"]),
)


def _check_swiglu(m: Match) -> str | None:
    gate, up = m["gate"], m["up"]
    if gate.type != up.type:
        return f"gate {gate.type} and up {up.type} differ (swiglu takes two equal types)"
    return None


SWIGLU = Rule(
    id="act/swiglu",
    pattern=P.op("mul", P.op("silu", P.any("gate"), name="silu"), P.any("up"), commutative=True),
    check=_check_swiglu,
    replace=lambda m, b: b.op("swiglu", m["gate"], m["up"]),
)

# -- softmax -----------------------------------------------------------------------------


def _softmax_of(e: Pattern) -> Pattern:
    total = P.op("reduce_sum", e, name="sum", attrs={"keepdim": True})
    return P.alt(P.op("div", e, total),
                 P.op("mul", e, P.op("reciprocal", total), commutative=True),
                 tags=("div", "mul-reciprocal"))


def _softmax_axis(m: Match) -> tuple[int | None, str | None]:
    x = m["x"]
    if not x.dtype.is_float:
        return None, f"%{x.name} is {x.dtype}, not floating point"
    rank = max(x.type.rank, 1)
    axes = {tuple(sorted(a % rank for a in m.node(n).attrs["axes"]))
            for n in ("sum", "max") if n in m.named_nodes}
    if len(axes) != 1:
        return None, f"max and sum run over different axes {sorted(axes)}"
    (axes,) = axes
    if len(axes) != 1:
        return None, f"the sum runs over axes {list(axes)}, softmax over one"
    return axes[0], keeps_type(m)


def _softmax(m, b):
    return b.op("softmax", m["x"], axis=_softmax_axis(m)[0])


_x_minus_max = P.op("sub", _x, P.op("reduce_max", _x, name="max", attrs={"keepdim": True}))

SOFTMAX_MAX_SUBTRACTED = Rule(
    id="act/softmax-max-subtracted",
    pattern=_softmax_of(P.op("exp", _x_minus_max, name="exp")),
    check=lambda m: _softmax_axis(m)[1],
    replace=_softmax,
    near_miss_depth=3,  # a plain softmax reaches depth 2
)

SOFTMAX = Rule(
    id="act/softmax",
    pattern=_softmax_of(P.op("exp", _x, name="exp")),
    check=lambda m: _softmax_axis(m)[1],
    replace=_softmax,
)


@register_pass
class RecognizeActivations(RewritePass):
    """GELU (erf | tanh), SiLU, SwiGLU and softmax written as math -> gelu / silu / swiglu /
    softmax."""

    name = "recognize.fuse-activations"
    rule_list = [GELU_ERF, GELU_TANH, SILU, SWIGLU, SOFTMAX_MAX_SUBTRACTED, SOFTMAX]


__all__ = ["RecognizeActivations", "GELU_ERF", "GELU_TANH", "SILU", "SWIGLU",
           "SOFTMAX_MAX_SUBTRACTED", "SOFTMAX", "half_x_times"]
