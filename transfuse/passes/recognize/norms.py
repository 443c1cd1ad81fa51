"""recognize.fuse-norms: decomposed LayerNorm and RMSNorm become ``layer_norm`` / ``rms_norm``.

Glossary: E the normalised size (the last ``nd`` dims, usually one: the hidden size),
h the normalised input (``x``, or ``x - mean(x)`` for LayerNorm), eps the epsilon.

Rules (tried in this order at each node; later ones grow what earlier ones made):

- ``norm/layer-norm``: ``d * rsqrt(var + eps)`` with ``d = x - mean(x)`` and ``var =
  mean(d²)`` -> ``layer_norm(x)``. ``rsqrt(v)`` may be written ``/ sqrt(v)``,
  ``* reciprocal(sqrt(v))`` or ``* (1 / sqrt(v))``; ``d²`` as ``pow(d, 2)`` or ``d * d``
  (``torch.square``). ``x.var(unbiased=False)`` decomposed by the frontend computes its
  own ``x - mean(x)`` (the same node once CSE merged them, or a second one); ``var`` may
  be ``sum(d²) / N``. An unbiased variance (``sum(d²) / (N - 1)``, the frontend's
  ``x.var()``) is a near miss: layer_norm divides by N;
- ``norm/rms-norm``: ``x * rsqrt(mean(x²) + eps)`` (the same spellings) -> ``rms_norm(x)``;
- ``norm/rms-norm-upcast``: ``cast(rms_norm(cast(x, f32)), x.dtype)`` -> ``rms_norm(x)
  {upcast}`` (Llama's ``x.float()`` ... ``.to(x.dtype)``);
- ``norm/rms-norm-weight``: ``rms_norm(x) * w`` or ``* (w + offset)`` (Gemma's ``1 + w``)
  -> ``rms_norm(x, w) {offset}``;
- ``norm/layer-norm-weight``, ``norm/layer-norm-bias``: ``layer_norm(x) * w + b`` ->
  ``layer_norm(x, w, b)``.

Needs: the graph after cleanup (scalars as 0-d constants, no same-type casts).
Guarantees: a rewrite is equal by construction to the IR reference of the fused op
(layer_norm up to rounding: F.layer_norm computes the statistic its own way). The
reductions must cover exactly the trailing dims, keepdim; eps must be a finite
constant > 0 and is captured exactly; a weight/bias must be per-feature (shape E) and
must not change the dtype. A weight applied in fp32 before the cast back (Gemma in
bf16) is not rms_norm's order: the fp32 part becomes an rms_norm, the casts stay around
it. A LayerNorm computed in fp32 keeps its casts and its bf16 affine (the fused op would
apply the affine before rounding), with a near miss of ``norm/layer-norm-weight`` saying so.
"""

from __future__ import annotations

import math

from transfuse.ir.types import DType
from transfuse.passes.recognize._common import (
    is_param_of,
    keeps_type,
    positive_eps,
    scalar_is,
    trailing_axes,
)
from transfuse.passes.registry import register_pass
from transfuse.passes.rewrite import Match, P, Pattern, RewritePass, Rule

# -- pattern pieces ------------------------------------------------------------------------


def square(v: Pattern) -> Pattern:
    """``v²`` as ``pow(v, 2)`` or ``v * v``."""
    return P.alt(P.op("pow", v, P.scalar("two")), P.op("mul", v, v), tags=("pow", "mul-self"))


def mean(v: Pattern, name: str) -> Pattern:
    return P.op("reduce_mean", v, name=name, attrs={"keepdim": True})


def normalize(h: Pattern, mean_square: Pattern) -> Pattern:
    """``h * rsqrt(ms + eps)``, ``h / sqrt(ms + eps)``, ``h * reciprocal(sqrt(ms + eps))`` or
    ``h * (1 / sqrt(ms + eps))``."""
    plus_eps = P.op("add", mean_square, P.scalar("eps"), commutative=True)
    root = P.op("sqrt", plus_eps)
    return P.alt(P.op("mul", h, P.op("rsqrt", plus_eps), commutative=True),
                 P.op("div", h, root),
                 P.op("mul", h, P.op("reciprocal", root), commutative=True),
                 P.op("mul", h, P.op("div", P.scalar("one"), root), commutative=True),
                 tags=("rsqrt", "sqrt-div", "reciprocal-sqrt", "one-div-sqrt"))


def variance(x: Pattern) -> Pattern:
    """``mean(d²)`` with ``d = x - mean(x)`` (the numerator's own ``d`` or a second one: the
    frontend's ``x.var()`` before CSE merged it with the numerator), or ``sum(d²) / count``
    (the frontend's ``x.var()`` with a correction: count = N - correction; the check decides
    whether count is N)."""
    squares = square(P.op("sub", x, mean(x, "var_mean"), name="var_centred"))
    total = P.op("reduce_sum", squares, name="var_sum", attrs={"keepdim": True})
    return P.alt(mean(squares, "var"), P.op("div", total, P.any("count")),
                 tags=(None, "sum-count"))


def _biased_variance(m: Match) -> str | None:
    """None when ``sum(d²) / count`` (if that is the spelling) divides by N, else why not."""
    if "sum-count" not in m.tags:
        return None
    x, count = m["x"], m["count"]
    rank = max(x.type.rank, 1)
    dims = [x.shape[a % rank] for a in m.node("var_sum").attrs["axes"]]
    if count.const is None or count.const.numel() != 1:
        return (f"the sum of squares is divided by %{count.name}, computed at run time: not "
                f"provably N (an unbiased variance divides by N - 1; layer_norm by N)")
    if not all(isinstance(d, int) for d in dims):
        return f"the variance divides by a constant over the symbolic dims {dims}"
    n, c = math.prod(dims), float(count.const.reshape(-1)[0])
    if c != n:
        return (f"the variance divides the sum of squares by {c:g}, not by N = {n} (an "
                f"unbiased variance, correction {n - c:g}); layer_norm divides by N")
    return None


def _check_statistic(m: Match, means: tuple[str, ...]) -> tuple[int, float, str | None]:
    """(normalized_ndim, eps, reason) for the reductions named ``means`` and the epsilon."""
    x = m["x"]
    if not x.dtype.is_float:
        return 0, 0.0, f"%{x.name} is {x.dtype}, not floating point"
    if "two" in m and m.scalar("two") != 2.0:
        return 0, 0.0, f"pow exponent is {m.scalar('two')!r}, not 2"
    rank = max(x.type.rank, 1)
    means = tuple(n for n in means if n in m.named_nodes)
    axes = {tuple(sorted(a % rank for a in m.node(n).attrs["axes"])) for n in means}
    if len(axes) != 1:
        return 0, 0.0, f"the reductions run over different axes {sorted(axes)}"
    nd = trailing_axes(axes.pop(), x.type.rank)
    if nd is None:
        return 0, 0.0, (f"reduce_mean axes {list(m.node(means[0]).attrs['axes'])} are not the "
                        f"trailing dims of {x.type}")
    eps, reason = positive_eps(m)
    reason = reason or scalar_is(m, "one", 1.0, "the 1 of 1 / sqrt(...)", rtol=0.0)
    return nd, eps, reason or keeps_type(m)


# -- layer_norm ------------------------------------------------------------------------------

_x = P.any("x")
_centred = P.op("sub", _x, mean(_x, "mean"), name="centred")


_LN_MEANS = ("mean", "var", "var_mean", "var_sum")


def _check_layer_norm(m: Match) -> str | None:
    return _check_statistic(m, _LN_MEANS)[2] or _biased_variance(m)


def _layer_norm(m, b):
    nd, eps, _ = _check_statistic(m, _LN_MEANS)
    return b.op("layer_norm", m["x"], None, None, eps=eps, normalized_ndim=nd)


LAYER_NORM = Rule(
    id="norm/layer-norm",
    pattern=normalize(_centred, variance(_x)),
    check=_check_layer_norm,
    replace=_layer_norm,
    near_miss_depth=4,  # d * d also starts like d * rsqrt(...): report only deeper failures
)


def _norm_param_reason(m: Match, norm: str, param: str) -> str | None:
    x, nd = m[norm], m.node(norm).attrs["normalized_ndim"]
    p = m[param]
    if not is_param_of(p, x, nd):
        return (f"%{p.name} {p.type} is not a per-feature parameter of the normalised dims of "
                f"{x.type}")
    if m.root.outputs[0].type != x.type:
        return f"%{p.name} {p.type} would change the result type {x.type}"
    return None


_bare_layer_norm = P.op("layer_norm", P.any("x"), None, None, name="norm")


def _check_layer_norm_weight(m: Match) -> str | None:
    if "down" in m.tags:
        return (f"the affine runs in {m.root.outputs[0].dtype} after the cast back; layer_norm "
                "would apply it before rounding (kept as an fp32 layer_norm between casts)")
    return _norm_param_reason(m, "norm", "w")


LAYER_NORM_WEIGHT = Rule(
    id="norm/layer-norm-weight",
    pattern=P.op("mul", P.maybe("cast", _bare_layer_norm, tag="down"), P.any("w"),
                 commutative=True),
    check=_check_layer_norm_weight,
    replace=lambda m, b: b.op("layer_norm", m["x"], m["w"], None, **m.node("norm").attrs),
    near_miss_depth=3,  # a product of any norm's output is not a candidate by itself
)

LAYER_NORM_BIAS = Rule(
    id="norm/layer-norm-bias",
    pattern=P.op("add", P.alt(P.op("layer_norm", P.any("x"), P.any("w"), None, name="norm"),
                              P.op("layer_norm", P.any("x"), None, None, name="norm")),
                 P.any("b"), commutative=True),
    check=lambda m: _norm_param_reason(m, "norm", "b"),
    replace=lambda m, b: b.op("layer_norm", m["x"], m.get("w"), m["b"], **m.node("norm").attrs),
    near_miss_depth=3,  # the residual add after a norm with bias is not a candidate
)

# -- rms_norm --------------------------------------------------------------------------------


def _check_rms_norm(m: Match) -> str | None:
    return _check_statistic(m, ("ms",))[2]


def _rms_norm(m, b):
    nd, eps, _ = _check_statistic(m, ("ms",))
    return b.op("rms_norm", m["x"], None, eps=eps, normalized_ndim=nd, upcast=False)


RMS_NORM = Rule(
    id="norm/rms-norm",
    pattern=normalize(_x, mean(square(_x), "ms")),
    check=_check_rms_norm,
    replace=_rms_norm,
    near_miss_depth=3,
)

_upcast_x = P.op("cast", P.any("x"), name="up", attrs={"dtype": DType.f32})


def _check_upcast(m: Match) -> str | None:
    x, norm = m["x"], m.node("norm")
    if "w" in m:
        return ("the weight multiplies in fp32 before the cast back; rms_norm {upcast} "
                "multiplies after it (kept as an fp32 rms_norm between casts)")
    if m.node("down").attrs["dtype"] != x.dtype:
        return f"cast back to {m.node('down').attrs['dtype']}, not to the input's {x.dtype}"
    if norm.attrs["offset"] or norm.attrs["upcast"]:
        return "the inner rms_norm already has offset/upcast"
    return None


RMS_NORM_UPCAST = Rule(
    id="norm/rms-norm-upcast",
    pattern=P.op("cast", P.alt(P.op("rms_norm", _upcast_x, None, name="norm"),
                               P.op("rms_norm", _upcast_x, P.any("w"), name="norm")),
                 name="down"),
    check=_check_upcast,
    replace=lambda m, b: b.op("rms_norm", m["x"], None,
                              **{**m.node("norm").attrs, "upcast": True}),
)


def _check_rms_weight(m: Match) -> str | None:
    if "offset" in m and not math.isfinite(m.scalar("offset")):
        return f"the weight offset {m.scalar('offset')!r} is not finite"
    return _norm_param_reason(m, "norm", "w")


def _rms_weight(m, b):
    attrs = dict(m.node("norm").attrs)
    if "offset" in m:
        attrs["offset"] = m.scalar("offset")
    return b.op("rms_norm", m["x"], m["w"], **attrs)


RMS_NORM_WEIGHT = Rule(
    id="norm/rms-norm-weight",
    pattern=P.op("mul", P.op("rms_norm", P.any("x"), None, name="norm"),
                 P.alt(P.op("add", P.any("w"), P.scalar("offset"), commutative=True,
                            name="plus"),
                       P.any("w"), tags=("offset", None)),
                 commutative=True),
    check=_check_rms_weight,
    replace=_rms_weight,
    near_miss_depth=3,
)


@register_pass
class RecognizeNorms(RewritePass):
    """Decomposed LayerNorm / RMSNorm (with casts, weight, bias, 1+w) -> layer_norm / rms_norm."""

    name = "recognize.fuse-norms"
    rule_list = [LAYER_NORM, RMS_NORM, RMS_NORM_UPCAST, RMS_NORM_WEIGHT, LAYER_NORM_WEIGHT,
                 LAYER_NORM_BIAS]


__all__ = ["RecognizeNorms", "LAYER_NORM", "RMS_NORM", "RMS_NORM_UPCAST", "RMS_NORM_WEIGHT",
           "LAYER_NORM_WEIGHT", "LAYER_NORM_BIAS", "square", "mean", "normalize", "variance"]
