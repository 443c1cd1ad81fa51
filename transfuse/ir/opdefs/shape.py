"""Shape and data-movement ops: reshape, permute, expand, concat, split, slice,
gathers, and tensor creation (arange, full, tril/triu masks).

Shapes in attrs may hold symbolic dims (``seq``, ``seq + 1``); reference
implementations evaluate them with ``env``. ``reshape`` and ``expand`` always
carry a fully resolved target shape (no ``-1``): frontends resolve it.
"""

from __future__ import annotations

import torch

from transfuse.errors import IRVerifyError
from transfuse.ir.opdef import Attr, default_bytes, eval_dims, register
from transfuse.ir.opdefs._util import in_type, norm_axis
from transfuse.ir.types import (
    DType,
    TensorType,
    dim_product,
    dim_str,
    dims_equal,
    eval_dim,
    normalize_dim,
)

INT64_MAX = 2**63 - 1


def _free(node):
    return 0, default_bytes(node)


# -- reshape / permute / expand ---------------------------------------------


def _verify_reshape(node):
    src, dst = in_type(node, 0), node.attrs["shape"]
    if any(isinstance(d, int) and d < 0 for d in dst):
        return f"reshape target {tuple(dim_str(d) for d in dst)} has a negative dim"
    if not dims_equal(dim_product(src.shape), dim_product(dst)):
        return f"reshape changes the element count: {src} -> [{', '.join(dim_str(d) for d in dst)}]"
    return None


@register("reshape", ["x"], {"shape": Attr("dims")},
          infer=lambda n: [in_type(n, 0).with_shape(n.attrs["shape"])], verify=_verify_reshape,
          cost=_free)
def reshape(xs, attrs, env):
    return xs[0].reshape(eval_dims(attrs["shape"], env))


def _infer_permute(node):
    t, perm = in_type(node, 0), node.attrs["perm"]
    if sorted(perm) != list(range(t.rank)):
        raise IRVerifyError(f"permute: {perm} is not a permutation of {t.rank} dims")
    return [t.with_shape([t.shape[p] for p in perm])]


@register("permute", ["x"], {"perm": Attr("ints")}, infer=_infer_permute, cost=_free)
def permute(xs, attrs, env):
    return xs[0].permute(attrs["perm"])


def _infer_expand(node):
    t, shape = in_type(node, 0), node.attrs["shape"]
    if len(shape) < t.rank:
        raise IRVerifyError(f"expand: target rank {len(shape)} < input rank {t.rank}")
    off = len(shape) - t.rank
    for i, d in enumerate(t.shape):
        if not (d == 1 or dims_equal(d, shape[off + i])):
            raise IRVerifyError(f"expand: cannot expand {t} to {[dim_str(x) for x in shape]}")
    return [t.with_shape(shape)]


@register("expand", ["x"], {"shape": Attr("dims")}, infer=_infer_expand, cost=_free)
def expand(xs, attrs, env):
    return xs[0].expand(eval_dims(attrs["shape"], env))


# -- concat / split / slice --------------------------------------------------


def _infer_concat(node):
    ts = [v.type for v in node.inputs]
    axis = norm_axis(node.attrs["axis"], ts[0].rank, "concat")
    total = 0
    for t in ts:
        if t.rank != ts[0].rank or t.dtype != ts[0].dtype:
            raise IRVerifyError(f"concat: inputs {ts} differ in rank or dtype")
        total = total + t.shape[axis]
    shape = list(ts[0].shape)
    shape[axis] = normalize_dim(total)
    return [ts[0].with_shape(shape)]


@register("concat", ["*xs"], {"axis": Attr("int")}, infer=_infer_concat, cost=_free)
def concat(xs, attrs, env):
    return torch.cat(xs, dim=attrs["axis"])


def _infer_split(node):
    t = in_type(node, 0)
    axis = norm_axis(node.attrs["axis"], t.rank, "split")
    sizes = node.attrs["sizes"]
    if not dims_equal(normalize_dim(sum(sizes)), t.shape[axis]):
        raise IRVerifyError(f"split: sizes {[dim_str(s) for s in sizes]} do not sum to dim "
                            f"{dim_str(t.shape[axis])} of {t}")
    out = []
    for s in sizes:
        shape = list(t.shape)
        shape[axis] = s
        out.append(t.with_shape(shape))
    return out


@register("split", ["x"], {"axis": Attr("int"), "sizes": Attr("dims")}, infer=_infer_split,
          cost=_free)
def split(xs, attrs, env):
    return tuple(torch.split(xs[0], eval_dims(attrs["sizes"], env), dim=attrs["axis"]))


def slice_length(dim, start, end, step):
    """Length of x[start:end:step] along a dim; exact for ints, assumes 0<=start<=end<=dim
    for symbolic bounds (frontends normalise them)."""
    if all(isinstance(v, int) for v in (dim, start, end)):
        return len(range(*slice(start, end, step).indices(dim)))
    if isinstance(end, int) and end >= INT64_MAX // 2:
        end = dim
    return normalize_dim((normalize_dim(end - start) + step - 1) // step) if step != 1 else \
        normalize_dim(end - start)


def _infer_slice(node):
    t = in_type(node, 0)
    a = node.attrs
    axis = norm_axis(a["axis"], t.rank, "slice")
    if a["step"] < 1:
        raise IRVerifyError(f"slice: step must be >= 1, got {a['step']}")
    shape = list(t.shape)
    shape[axis] = slice_length(t.shape[axis], a["start"], a["end"], a["step"])
    return [t.with_shape(shape)]


@register("slice", ["x"], {"axis": Attr("int"), "start": Attr("dim", 0), "end": Attr("dim", INT64_MAX),
                           "step": Attr("int", 1)}, infer=_infer_slice, cost=_free)
def slice_(xs, attrs, env):
    x = xs[0]
    axis = attrs["axis"] % x.dim()
    start, end = eval_dim(attrs["start"], env), eval_dim(attrs["end"], env)
    index = [slice(None)] * x.dim()
    index[axis] = slice(start, end, attrs["step"])
    return x[tuple(index)]


# -- gathers -----------------------------------------------------------------


def _infer_index_select(node):
    t, idx = in_type(node, 0), in_type(node, 1)
    axis = norm_axis(node.attrs["axis"], t.rank, "index_select")
    if idx.rank > 1:
        raise IRVerifyError(f"index_select: index must be 0-d or 1-D, got {idx}")
    shape = list(t.shape)
    shape[axis:axis + 1] = list(idx.shape)
    return [t.with_shape(shape)]


@register("index_select", ["x", "index"], {"axis": Attr("int")}, infer=_infer_index_select,
          cost=_free)
def index_select(xs, attrs, env):
    x, idx = xs
    if idx.dim() == 0:
        return torch.select(x, attrs["axis"], int(idx))
    return torch.index_select(x, attrs["axis"], idx)


def _infer_gather(node):
    t, idx = in_type(node, 0), in_type(node, 1)
    norm_axis(node.attrs["axis"], t.rank, "gather")
    if idx.rank != t.rank:
        raise IRVerifyError(f"gather: index rank {idx.rank} != input rank {t.rank}")
    return [t.with_shape(idx.shape)]


@register("gather", ["x", "index"], {"axis": Attr("int")}, infer=_infer_gather, cost=_free)
def gather(xs, attrs, env):
    return torch.gather(xs[0], attrs["axis"], xs[1])


def _infer_embedding(node):
    w, ids = in_type(node, 0), in_type(node, 1)
    if w.rank != 2:
        raise IRVerifyError(f"embedding: weight must be 2-D [V, E], got {w}")
    if ids.dtype not in (DType.i64, DType.i32):
        raise IRVerifyError(f"embedding: ids must be integer, got {ids}")
    return [w.with_shape(ids.shape + (w.shape[1],))]


@register("embedding", ["weight", "ids"], infer=_infer_embedding, cost=_free)
def embedding(xs, attrs, env):
    """Rows of ``weight`` [V, E] picked by ``ids``: output ids.shape + [E]."""
    return torch.nn.functional.embedding(xs[1], xs[0])


# -- creation ----------------------------------------------------------------


def _infer_arange(node):
    a = node.attrs
    start, end, step = a["start"], a["end"], a["step"]
    if isinstance(start, int) and isinstance(end, int):
        n = max(0, -(-(end - start) // step))
    else:
        n = normalize_dim((normalize_dim(end - start) + step - 1) // step) if step != 1 else \
            normalize_dim(end - start)
    return [TensorType(a["dtype"], [n])]


@register("arange", [], {"start": Attr("dim", 0), "end": Attr("dim"), "step": Attr("int", 1),
                         "dtype": Attr("dtype", DType.i64)}, infer=_infer_arange, cost=_free)
def arange(xs, attrs, env):
    start, end = eval_dim(attrs["start"], env), eval_dim(attrs["end"], env)
    return torch.arange(start, end, attrs["step"], dtype=attrs["dtype"].torch)


@register("full", [], {"shape": Attr("dims"), "value": Attr("float"), "dtype": Attr("dtype")},
          infer=lambda n: [TensorType(n.attrs["dtype"], n.attrs["shape"])], cost=_free)
def full(xs, attrs, env):
    return torch.full(eval_dims(attrs["shape"], env), attrs["value"], dtype=attrs["dtype"].torch)


def _infer_tri(node):
    t = in_type(node, 0)
    if t.rank < 2:
        raise IRVerifyError(f"{node.op}: input must have rank >= 2, got {t}")
    return [t]


@register("tril", ["x"], {"diagonal": Attr("int", 0)}, infer=_infer_tri, cost=_free)
def tril(xs, attrs, env):
    return torch.tril(xs[0], attrs["diagonal"])


@register("triu", ["x"], {"diagonal": Attr("int", 0)}, infer=_infer_tri, cost=_free)
def triu(xs, attrs, env):
    return torch.triu(xs[0], attrs["diagonal"])


def _infer_shape_of(node):
    norm_axis(node.attrs["axis"], in_type(node, 0).rank, "shape_of")
    return [TensorType(DType.i64, [])]


@register("shape_of", ["x"], {"axis": Attr("int")}, infer=_infer_shape_of, cost=_free)
def shape_of(xs, attrs, env):
    """The size of one dim of ``x`` as an i64 0-d tensor (shape arithmetic)."""
    return torch.tensor(xs[0].shape[attrs["axis"]], dtype=torch.int64)
