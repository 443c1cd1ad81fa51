"""ONNX lowerings of the indexing ops (``transfuse/ir/opdefs/indexing.py``).

``index`` with one index tensor is ``Gather`` (same result layout). With k > 1 the
components, broadcast to the index shape I, are stacked on a last axis ([*I, k], int64)
for ``GatherND`` on the leading dims; when the indexed dims are not the leading ones a
``Transpose`` brings them first, and when they are consecutive but not leading a second
``Transpose`` puts I back in their place (GatherND leaves it first, torch's rule for
non-consecutive dims). Negative indices need nothing: Gather and GatherND count them from
the end, as the IR op does.

``scatter_nd`` is ``ScatterND``; the ``max``/``min`` reductions exist from opset 18.

Glossary: r rank of x, k indexed dims, I broadcast index shape (rank m).
"""

from __future__ import annotations

from transfuse.codegen.onnx.registry import LOWERINGS
from transfuse.errors import LoweringError
from transfuse.ir.opdefs.indexing import index_axes_adjacent
from transfuse.ir.types import DType, broadcast_shapes, dims_equal


@LOWERINGS.register("index")
def _index(b, node):
    x, idx, axes = node.inputs[0], node.inputs[1:], list(node.attrs["axes"])
    r, k = x.type.rank, len(axes)
    if k == 1:
        return b.add("Gather", [b.name(x), b.input(node, 1)], axis=axes[0])
    shape = broadcast_shapes(*[v.shape for v in idx])  # I
    m = len(shape)
    parts = []
    for i, v in enumerate(idx, start=1):
        comp = b.input(node, i, DType.i64)
        if v.type.rank != m or not all(dims_equal(p, q) for p, q in zip(v.shape, shape)):
            comp = b.add("Expand", [comp, b.shape(shape)])
        parts.append(b.unsqueeze(comp, [m]))
    stacked = b.add("Concat", parts, axis=-1)  # [*I, k]
    rest = [a for a in range(r) if a not in axes]
    data = b.name(x)
    if axes != list(range(k)):
        data = b.add("Transpose", [data], perm=axes + rest)
    out = b.add("GatherND", [data, stacked])  # [*I, *rest]
    at = axes[0]
    if index_axes_adjacent(axes) and at > 0:  # I back between the dims before and after
        perm = [m + j for j in range(at)] + list(range(m)) + [m + j for j in range(at, r - k)]
        out = b.add("Transpose", [out], perm=perm)
    return out


@LOWERINGS.register("scatter_nd")
def _scatter_nd(b, node):
    red = node.attrs["reduction"]
    if red in ("max", "min") and b.opset < 18:
        raise LoweringError(f"ScatterND reduction {red!r} needs opset 18; this export is "
                            f"opset {b.opset}")
    attrs = {} if red == "none" else {"reduction": red}
    return b.add("ScatterND", [b.input(node, 0), b.input(node, 1, DType.i64),
                               b.input(node, 2)], **attrs)
