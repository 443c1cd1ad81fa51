"""Python emitters of the indexing ops (``transfuse/ir/opdefs/indexing.py``).

``index`` is a subscript: ``x[:, i, :, j]`` (dims after the last indexed one are left
out). A Python subscript treats a 0-d index tensor as an int, which moves the index shape
when the indexed dims are not consecutive (``x[i0, :, j]`` would keep it in place); so a
0-d index next to indices of higher rank is written ``i0[None]`` (shape [1], which
broadcasts away). ``scatter_nd`` with ``none``/``add`` is ``torch.index_put`` on the k
index components; ``mul``/``max``/``min`` run the op's reference implementation
(``scatter_reduce`` over flattened rows), which the backend does for a refused emitter.
"""

from __future__ import annotations

from transfuse.codegen.python.registry import LOWERINGS, arg


@LOWERINGS.register("index")
def _index(ctx, node):
    x, idx, axes = node.inputs[0], node.inputs[1:], node.attrs["axes"]
    mixed = any(v.type.rank == 0 for v in idx) and any(v.type.rank > 0 for v in idx)
    key = [":"] * (axes[-1] + 1)
    for a, v in zip(axes, idx):
        key[a] = f"{ctx.name(v)}[None]" if mixed and v.type.rank == 0 else ctx.name(v)
    return f"{ctx.name(x)}[{', '.join(key)}]"


def _scatter_supports(node) -> str | None:
    red = node.attrs["reduction"]
    if red in ("none", "add"):
        return None
    return f"scatter_nd with reduction {red!r} runs its reference (scatter_reduce over rows)"


@LOWERINGS.register("scatter_nd", supports=_scatter_supports)
def _scatter_nd(ctx, node):
    idx = arg(ctx, node, 1)
    k = node.inputs[1].type.shape[-1]
    comps = ", ".join(f"{idx}[..., {j}]" for j in range(k))
    accumulate = node.attrs["reduction"] == "add"
    return (f"torch.index_put({arg(ctx, node, 0)}, ({comps},), {arg(ctx, node, 2)}, "
            f"accumulate={accumulate})")
