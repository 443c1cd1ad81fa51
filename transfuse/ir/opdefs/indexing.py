"""Indexing ops: advanced indexing (``index``) and its write counterpart (``scatter_nd``).

``index(x, i_0, .., i_{k-1}) {axes}`` is torch's advanced indexing
``x[.., i_0, .., i_1, ..]`` (``aten::index.Tensor`` with a None-padded index list):
index tensor ``i_j`` picks along dim ``axes[j]`` of ``x``, the other dims are taken
whole. The k index tensors broadcast together to the index shape ``I``. The result
puts ``I`` where the indexed dims were when ``axes`` are consecutive
(``x[:, i, j]`` on [A, B, C, D] -> [A, *I, D]) and first otherwise
(``x[i, :, j]`` on [A, B, C] -> [*I, B]); numpy's rule, torch's rule. Negative indices
count from the end of their dim; an index outside ``[-size, size)`` is an error.
ONNX ``GatherND`` (any ``batch_dims``) and ``Gather`` are both this op: the ONNX frontend
splits GatherND's stacked index components into the k inputs, so the passes see the
same graph from either frontend (and the mask analysis can read each component).

``scatter_nd(x, indices, updates) {reduction}`` is ONNX ``ScatterND``: ``indices``
[*I, k] addresses slices of the first k dims of ``x``; ``updates`` has shape
``I + x.shape[k:]``; the result is a copy of ``x`` with each addressed slice replaced
(``reduction="none"``; indices should not repeat) or combined with its update
(``add``/``mul``/``max``/``min``; repeats combine in turn, the original value
included). Negative indices count from the end.

Glossary: r rank of ``x``, k number of indexed dims, I broadcast index shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from transfuse.errors import IRVerifyError
from transfuse.ir.opdef import Attr, default_bytes, register
from transfuse.ir.opdefs._util import in_type
from transfuse.ir.types import Dim, DType, TensorType, broadcast_shapes

INDEX_DTYPES = (DType.i64, DType.i32)
SCATTER_REDUCTIONS = ("none", "add", "mul", "max", "min")


# -- index -----------------------------------------------------------------------------------


def index_axes_adjacent(axes: Sequence[int]) -> bool:
    """True when the indexed dims are consecutive, so ``I`` stays in their place."""
    return all(b == a + 1 for a, b in zip(axes, axes[1:]))


def index_shape(x_shape: Sequence[Dim], index_shape_: Sequence[Dim],
                axes: Sequence[int]) -> tuple[Dim, ...]:
    """Result shape of ``index`` on ``x_shape`` with broadcast index shape ``index_shape_``."""
    rest = [d for a, d in enumerate(x_shape) if a not in axes]
    if index_axes_adjacent(axes):
        return tuple(x_shape[:axes[0]]) + tuple(index_shape_) + tuple(x_shape[axes[-1] + 1:])
    return tuple(index_shape_) + tuple(rest)


def _index_reason(node) -> str | None:
    x, idx, axes = in_type(node, 0), node.inputs[1:], node.attrs["axes"]
    if len(axes) != len(idx):
        return f"index: {len(idx)} index tensors for {len(axes)} axes {list(axes)}"
    if not axes:
        return "index: needs at least one index tensor"
    if any(a < 0 or a >= x.rank for a in axes) or list(axes) != sorted(set(axes)):
        return f"index: axes {list(axes)} must be increasing dims of {x} (in [0, {x.rank}))"
    for j, v in enumerate(idx):
        if v.dtype not in INDEX_DTYPES:
            return f"index: index {j} must be i64 or i32, got {v.type}"
    return None


def _raise_if(reason: str | None) -> None:
    """Type inference cannot go on past a verify reason: raise it."""
    if reason:
        raise IRVerifyError(reason)


def _infer_index(node) -> list[TensorType]:
    _raise_if(_index_reason(node))
    x = in_type(node, 0)
    try:
        shape = broadcast_shapes(*[v.shape for v in node.inputs[1:]])
    except IRVerifyError as e:
        raise IRVerifyError(f"index: index tensors {e}") from None
    return [x.with_shape(index_shape(x.shape, shape, node.attrs["axes"]))]


def _cost_index(node):
    out = node.outputs[0].type.nbytes()  # each picked element read once, written once
    idx = sum((v.type.nbytes() for v in node.inputs[1:]), 0)
    return 0, 2 * out + idx


@register("index", ["x", "*indices"], {"axes": Attr("ints")}, infer=_infer_index,
          verify=_index_reason, cost=_cost_index)
def index(xs, attrs, env):
    """``x[.., i_0, .., i_1, ..]``: advanced indexing of dims ``axes`` (torch's rule)."""
    x, idx = xs[0], list(xs[1:])
    padded: list[torch.Tensor | None] = [None] * (attrs["axes"][-1] + 1)
    for a, i in zip(attrs["axes"], idx):
        padded[a] = i
    return torch.ops.aten.index.Tensor(x, padded)


# -- scatter_nd --------------------------------------------------------------------------------


def _scatter_reason(node) -> str | None:
    x, idx, upd = (in_type(node, i) for i in range(3))
    if node.attrs["reduction"] not in SCATTER_REDUCTIONS:
        return (f"scatter_nd: reduction {node.attrs['reduction']!r} is not one of "
                f"{list(SCATTER_REDUCTIONS)}")
    if idx.dtype not in INDEX_DTYPES:
        return f"scatter_nd: indices must be i64 or i32, got {idx}"
    k = idx.shape[-1] if idx.rank else None
    if not isinstance(k, int) or not 1 <= k <= x.rank:
        return f"scatter_nd: indices {idx} need a static last dim in [1, {x.rank}] for {x}"
    if upd.dtype != x.dtype:
        return f"scatter_nd: updates {upd} differ in dtype from {x}"
    want = tuple(idx.shape[:-1]) + tuple(x.shape[k:])
    if upd.shape != want:
        return (f"scatter_nd: updates {upd} must have shape indices[:-1] + x[k:] = "
                f"{TensorType(x.dtype, want)}")
    if x.dtype == DType.bool and node.attrs["reduction"] != "none":
        return f"scatter_nd: reduction {node.attrs['reduction']} of bool"
    return None


def _infer_scatter(node) -> list[TensorType]:
    _raise_if(_scatter_reason(node))
    return [in_type(node, 0)]


def _cost_scatter(node):
    flops = 0 if node.attrs["reduction"] == "none" else in_type(node, 2).numel()
    return flops, default_bytes(node)


_TORCH_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


def linear_slice_index(indices: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """[*I, k] indices into dims of ``sizes`` -> [*I] row-major positions (negatives wrapped)."""
    sizes_t = torch.tensor(list(sizes), dtype=torch.int64)
    idx = indices.long()
    idx = torch.where(idx < 0, idx + sizes_t, idx)
    if bool(((idx < 0) | (idx >= sizes_t)).any()):
        raise IndexError(f"scatter_nd: an index is out of range for dims {list(sizes)}")
    strides = torch.ones(len(sizes), dtype=torch.int64)
    for j in range(len(sizes) - 2, -1, -1):
        strides[j] = strides[j + 1] * sizes[j + 1]
    return (idx * strides).sum(-1)


@register("scatter_nd", ["x", "indices", "updates"], {"reduction": Attr("str", "none")},
          infer=_infer_scatter, verify=_scatter_reason, cost=_cost_scatter)
def scatter_nd(xs, attrs, env):
    """A copy of ``x`` with the slices ``indices`` addresses replaced by (or reduced with)
    ``updates`` (ONNX ScatterND)."""
    x, indices, updates = xs
    k, red = indices.shape[-1], attrs["reduction"]
    if red in ("none", "add"):
        return torch.index_put(x, tuple(indices.long().unbind(-1)), updates,
                               accumulate=red == "add")
    rows = linear_slice_index(indices, x.shape[:k]).reshape(-1)
    rest = x.shape[k:]
    flat = x.reshape((-1, *rest))
    src = updates.reshape((-1, *rest))
    where = rows.reshape((-1,) + (1,) * len(rest)).expand(src.shape)
    out = flat.scatter_reduce(0, where, src, _TORCH_REDUCE[red], include_self=True)
    return out.reshape(x.shape)
