"""aten casts and identities: ``to``/``_to_copy``, clone/contiguous/detach, ``copy``,
dropout (identity at inference)."""

from __future__ import annotations

from transfuse.frontend.aten.helpers import args_list, uses_outputs
from transfuse.frontend.aten.registry import FALLBACK, aten
from transfuse.frontend.build import cast
from transfuse.ir.types import dims_equal


@aten("_to_copy", "to", "type_as", "_to_dtype")
def _to(cx, a):
    x = cx.value(args_list(a)[0])
    return cast(cx, x, cx.out_type().dtype)


@aten(
    "clone",
    "contiguous",
    "alias",
    "detach",
    "detach_",
    "lift_fresh_copy",
    "lift_fresh",
    "resolve_conj",
    "resolve_neg",
    "_conj",
)
def _identity(cx, a):
    return cx.value(args_list(a)[0])


@aten("copy")
def _copy(cx, a):
    """copy(self, src): src broadcast to self's shape, in self's dtype (the functionalized
    ``copy_``)."""
    want = cx.out_type()
    src = cast(cx, cx.value(a["src"]), want.dtype)
    if src.type.rank == want.rank and all(dims_equal(p, q) for p, q in zip(src.shape, want.shape)):
        return src
    return cx.op("expand", src, shape=list(want.shape))


@aten("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
def _dropout(cx, a):
    return cx.op("dropout", cx.value(a["input"]), p=float(a["p"]), train=bool(a["train"]))


@aten("native_dropout")
def _native_dropout(cx, a):
    if a["train"] or uses_outputs(cx.current, {1}):
        return FALLBACK
    return [cx.op("dropout", cx.value(a["input"]), p=float(a["p"]), train=False), None]
