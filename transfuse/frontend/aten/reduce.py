"""aten reductions (sum, mean, max, min, argmax, var, std), softmax and cumsum."""

from __future__ import annotations

from transfuse.frontend.aten.helpers import norm_axes, norm_axis, uses_outputs
from transfuse.frontend.aten.registry import FALLBACK, Converter, aten
from transfuse.frontend.build import cast, sym_value
from transfuse.ir.types import dim_product


def _reduce(ir_op: str) -> Converter:
    def convert(cx, a):
        want = cx.out_type().dtype
        x = cast(cx, cx.value(a["self"]), want)  # dtype= argument, or int sums -> i64
        return cx.op(
            ir_op, x, axes=norm_axes(a.get("dim"), x.type.rank), keepdim=bool(a.get("keepdim"))
        )

    return convert


aten("sum.dim_IntList", "sum.default")(_reduce("reduce_sum"))
aten("mean.dim", "mean.default")(_reduce("reduce_mean"))
aten("amax", "max.default")(_reduce("reduce_max"))
aten("amin", "min.default")(_reduce("reduce_min"))


def _max_min_dim(ir_op: str, index_op: str | None) -> Converter:
    """max.dim / min.dim -> (values, indices); indices only when used (no argmin op)."""

    def convert(cx, a):
        x = cx.value(a["self"])
        axis, keep = norm_axis(a["dim"], x.type.rank), a["keepdim"]
        indices = None
        if uses_outputs(cx.current, {1}):
            if index_op is None:
                return FALLBACK
            indices = cx.op(index_op, x, axis=axis, keepdim=keep)
        return [cx.op(ir_op, x, axes=(axis,), keepdim=keep), indices]

    return convert


aten("max.dim")(_max_min_dim("reduce_max", "argmax"))
aten("min.dim")(_max_min_dim("reduce_min", None))


@aten("argmax")
def _argmax(cx, a):
    if a["dim"] is None:
        return FALLBACK
    x = cx.value(a["self"])
    return cx.op("argmax", x, axis=norm_axis(a["dim"], x.type.rank), keepdim=a["keepdim"])


def _softmax(ir_op: str) -> Converter:
    def convert(cx, a):
        x = cast(cx, cx.value(a["self"]), cx.out_type().dtype)  # dtype= / half_to_float
        return cx.op(ir_op, x, axis=norm_axis(a["dim"], x.type.rank))

    return convert


# not _safe_softmax: it gives 0, not NaN, for rows that are all -inf
aten("softmax.int", "_softmax")(_softmax("softmax"))
aten("log_softmax.int", "_log_softmax")(_softmax("log_softmax"))


@aten("cumsum")
def _cumsum(cx, a):
    x = cx.value(a["self"])
    return cx.op("cumsum", x, axis=norm_axis(a["dim"], x.type.rank), dtype=a["dtype"])


@aten("var", "std")
def _var(cx, a):
    """var / std over ``dim`` (all when None or empty) with ``correction`` (or ``unbiased``):
    ``mean(d * d)`` with ``d = x - mean(x, keepdim)``, the spelling the norm recognizers read;
    with a correction c the sum of squares over ``max(N - c, 0)`` instead, as torch does.
    std is the ``sqrt`` of that."""
    x = cx.value(a["self"])
    want = cx.out_type().dtype
    if not x.dtype.is_float or want != x.dtype:
        return cx.fallback_because(f"variance of {x.dtype} into {want} has no IR spelling")
    correction = a.get("correction")
    if correction is None:
        correction = 1 if a.get("unbiased", True) else 0
    correction = cx.scalar(correction)
    if isinstance(correction, bool) or not isinstance(correction, (int, float)):
        return cx.fallback_because(f"correction {correction!r} is not a number known at capture")
    axes = norm_axes(a.get("dim"), x.type.rank)
    keep = bool(a.get("keepdim"))
    mean = cx.op("reduce_mean", x, axes=axes, keepdim=True)
    d = cx.op("sub", x, mean)
    sq = cx.op("mul", d, d)
    if correction == 0:
        out = cx.op("reduce_mean", sq, axes=axes, keepdim=keep)
    else:
        n = dim_product(x.shape[i] for i in (axes or range(x.type.rank)))
        total = cx.op("reduce_sum", sq, axes=axes, keepdim=keep)
        if isinstance(n, int):
            count = cx.const(float(max(n - correction, 0)), x.dtype)
        else:
            count = sym_value(cx, n, x.dtype)
            if correction:
                count = cx.op("sub", count, cx.const(float(correction), x.dtype))
            count = cx.op("maximum", count, cx.const(0.0, x.dtype))
        out = cx.op("div", total, count)
    return cx.op("sqrt", out) if cx.current.target._schema.name == "aten::std" else out
