"""aten shape ops: view/reshape family, expand, permute/transpose, repeat, cat/stack,
split/chunk, unbind. Shapes of view-like ops are read from torch's meta output."""

from __future__ import annotations

from transfuse.frontend.aten.helpers import args_list, is_tensor_arg, norm_axis, permute_value
from transfuse.frontend.aten.registry import FALLBACK, aten
from transfuse.frontend.build import cast, to_shape
from transfuse.ir.types import dim_product, dims_equal


@aten(
    "view",
    "reshape",
    "_unsafe_view",
    "view_as",
    "reshape_as",
    "unsqueeze",
    "squeeze",
    "flatten",
    "unflatten",
    "_reshape_alias",
    "view_copy",
    "squeeze_copy",
    "unsqueeze_copy",
)
def _reshape(cx, a):
    return to_shape(cx, cx.value(args_list(a)[0]), cx.out_type().shape)


@aten("expand", "expand_as", "expand_copy", "broadcast_to")
def _expand(cx, a):
    x, shape = cx.value(args_list(a)[0]), cx.out_type().shape
    if x.type.rank == len(shape) and all(dims_equal(p, q) for p, q in zip(x.shape, shape)):
        return x
    return cx.op("expand", x, shape=list(shape))


@aten("permute", "permute_copy")
def _permute(cx, a):
    x = cx.value(a["self"])
    return permute_value(cx, x, [norm_axis(d, x.type.rank) for d in a["dims"]])


@aten("transpose.int", "transpose_copy.int")
def _transpose(cx, a):
    x = cx.value(a["self"])
    r = x.type.rank
    if r < 2:
        return x
    perm = list(range(r))
    i, j = norm_axis(a["dim0"], r), norm_axis(a["dim1"], r)
    perm[i], perm[j] = perm[j], perm[i]
    return permute_value(cx, x, perm)


@aten("t", "numpy_T")
def _t(cx, a):
    x = cx.value(a["self"])
    r = x.type.rank
    return permute_value(cx, x, list(range(r))[::-1]) if r >= 2 else x


@aten("mT", "mH", "adjoint")
def _mt(cx, a):
    x = cx.value(a["self"])
    if cx.out_type().dtype != x.dtype or x.type.rank < 2:
        return FALLBACK
    perm = list(range(x.type.rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return permute_value(cx, x, perm)


@aten("movedim.int")
def _movedim(cx, a):
    x = cx.value(a["self"])
    r = x.type.rank
    src, dst = norm_axis(a["source"], r), norm_axis(a["destination"], r)
    perm = [d for d in range(r) if d != src]
    perm.insert(dst, src)
    return permute_value(cx, x, perm)


@aten("repeat")
def _repeat(cx, a):
    """x.repeat(r0, r1, ...) = reshape(expand(reshape(x, [1, d0, 1, d1, ...]), [r0, d0, ...]))."""
    x = cx.value(a["self"])
    reps = [cx.dim(r) for r in a["repeats"]]
    dims = [1] * (len(reps) - x.type.rank) + list(x.shape)
    if all(isinstance(r, int) and r == 1 for r in reps):
        return to_shape(cx, x, cx.out_type().shape)
    inter = [v for d in dims for v in (1, d)]
    big = [v for r, d in zip(reps, dims) for v in (r, d)]
    y = cx.op("expand", to_shape(cx, x, inter), shape=big)
    return to_shape(cx, y, cx.out_type().shape)


@aten("repeat_interleave.self_int", "repeat_interleave.self_Tensor")
def _repeat_interleave(cx, a):
    """x.repeat_interleave(r, dim) with one repeat count for every element (an int, or a
    one-element constant tensor): ``reshape(expand(unsqueeze(x, dim + 1), [.., d, r, ..]),
    [.., d * r, ..])``, the spelling of Hugging Face's ``repeat_kv`` (GQA) that the passes
    read; ``dim=None`` flattens first. Per-element counts stay a fallback."""
    x = cx.value(a["self"])
    reps = a["repeats"]
    if is_tensor_arg(cx, reps):
        r = cx.value(reps)
        if not r.is_const or r.const.numel() != 1 or r.dtype.is_float:
            return cx.fallback_because(
                "per-element or computed repeat counts (the output size depends on tensor values)"
            )
        reps = int(r.const.reshape(()).item())
    r = cx.dim(reps)
    want = cx.out_type().shape
    if a["dim"] is None:
        x = to_shape(cx, x, [dim_product(x.shape)])
        axis = 0
    else:
        axis = norm_axis(a["dim"], x.type.rank)
    if x.type.rank == 0:
        x = to_shape(cx, x, [1])
    if isinstance(r, int) and r == 1:
        return to_shape(cx, x, want)
    shape = list(x.shape)
    inter = shape[: axis + 1] + [1] + shape[axis + 1 :]
    big = shape[: axis + 1] + [r] + shape[axis + 1 :]
    y = cx.op("expand", to_shape(cx, x, inter), shape=big)
    return to_shape(cx, y, want)


@aten("cat")
def _cat(cx, a):
    want = cx.out_type()
    parts = [cx.value(t) for t in a["tensors"]]
    parts = [p for p in parts if not (p.type.rank == 1 and p.shape[0] == 0 and want.rank != 1)]
    parts = [cast(cx, p, want.dtype) for p in parts]
    if len(parts) == 1:
        return parts[0]
    return cx.emit("concat", parts, {"axis": norm_axis(a["dim"], want.rank)})


@aten("stack")
def _stack(cx, a):
    want = cx.out_type()
    axis = norm_axis(a["dim"], want.rank)
    parts = []
    for t in a["tensors"]:
        v = cast(cx, cx.value(t), want.dtype)
        shape = list(v.shape)
        shape.insert(axis, 1)
        parts.append(to_shape(cx, v, shape))
    return parts[0] if len(parts) == 1 else cx.emit("concat", parts, {"axis": axis})


@aten(
    "split",
    "split_with_sizes",
    "unsafe_split",
    "unsafe_split_with_sizes",
    "chunk",
    "tensor_split.sections",
    "split_copy",
    "split_with_sizes_copy",
)
def _split(cx, a):
    x = cx.value(a["self"])
    axis = norm_axis(a["dim"], x.type.rank)
    outs = cx.out_val()
    sizes = [cx.meta_type(cx.current, o).shape[axis] for o in outs]
    if len(sizes) == 1:
        return [x]
    return list(cx.emit("split", [x], {"axis": axis, "sizes": sizes}))


@aten("unbind.int", "unbind_copy.int")
def _unbind(cx, a):
    x = cx.value(a["self"])
    axis = norm_axis(a["dim"], x.type.rank)
    n = x.shape[axis]
    if not isinstance(n, int):
        return FALLBACK
    parts = [x] if n == 1 else list(cx.emit("split", [x], {"axis": axis, "sizes": [1] * n}))
    return [to_shape(cx, p, cx.meta_type(cx.current, o).shape) for p, o in zip(parts, cx.out_val())]
