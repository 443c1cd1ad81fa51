"""Python emitters of the shape and data-movement ops (``transfuse/ir/opdefs/shape.py``).
"""

from __future__ import annotations

from transfuse.codegen.python.registry import LOWERINGS, arg
from transfuse.ir.opdefs.shape import INT64_MAX


@LOWERINGS.register("reshape")
def _reshape(ctx, node):
    return f"{arg(ctx, node)}.reshape({ctx.args(node.attrs['shape'])})"


@LOWERINGS.register("expand")
def _expand(ctx, node):
    return f"{arg(ctx, node)}.expand({ctx.args(node.attrs['shape'])})"


@LOWERINGS.register("permute")
def _permute(ctx, node):
    return f"{arg(ctx, node)}.permute({ctx.args(node.attrs['perm'])})"


@LOWERINGS.register("concat")
def _concat(ctx, node):
    xs = ", ".join(ctx.name(v) for v in node.inputs)
    return f"torch.cat([{xs}], dim={node.attrs['axis']})"


@LOWERINGS.register("split")
def _split(ctx, node):
    sizes = "[" + ", ".join(ctx.dim(d) for d in node.attrs["sizes"]) + "]"
    return f"torch.split({arg(ctx, node)}, {sizes}, dim={node.attrs['axis']})"


@LOWERINGS.register("slice")
def _slice(ctx, node):
    a = node.attrs
    rank = node.inputs[0].type.rank
    axis = a["axis"] % rank
    start = "" if a["start"] == 0 else ctx.dim(a["start"])
    end = "" if isinstance(a["end"], int) and a["end"] >= INT64_MAX // 2 else ctx.dim(a["end"])
    step = "" if a["step"] == 1 else f":{a['step']}"
    index = [":"] * axis + [f"{start}:{end}{step}"]
    return f"{arg(ctx, node)}[{', '.join(index)}]"


@LOWERINGS.register("index_select")
def _index_select(ctx, node):
    x, idx, axis = arg(ctx, node, 0), node.inputs[1], node.attrs["axis"]
    if idx.type.rank == 0:
        return f"{x}.select({axis}, int({ctx.name(idx)}))"
    return f"torch.index_select({x}, {axis}, {ctx.name(idx)})"


@LOWERINGS.register("gather")
def _gather(ctx, node):
    return f"torch.gather({arg(ctx, node, 0)}, {node.attrs['axis']}, {arg(ctx, node, 1)})"


@LOWERINGS.register("embedding")
def _embedding(ctx, node):
    return f"F.embedding({arg(ctx, node, 1)}, {arg(ctx, node, 0)})"


@LOWERINGS.register("arange")
def _arange(ctx, node):
    a = node.attrs
    dtype = f"dtype={ctx.lit(a['dtype'])}, device=_dev"
    if a["start"] == 0 and a["step"] == 1:
        return f"torch.arange({ctx.dim(a['end'])}, {dtype})"
    return f"torch.arange({ctx.dim(a['start'])}, {ctx.dim(a['end'])}, {a['step']}, {dtype})"


@LOWERINGS.register("full")
def _full(ctx, node):
    a = node.attrs
    return (f"torch.full({ctx.dims(a['shape'])}, {ctx.lit(a['value'])}, "
            f"dtype={ctx.lit(a['dtype'])}, device=_dev)")


@LOWERINGS.register("tril", "triu")
def _tri(ctx, node):
    return f"torch.{node.op}({arg(ctx, node)}, {node.attrs['diagonal']})"


@LOWERINGS.register("shape_of")
def _shape_of(ctx, node):
    # a host scalar, as the reference makes it: shape arithmetic never waits on a device
    return f"torch.tensor({arg(ctx, node)}.shape[{node.attrs['axis']}], dtype=torch.int64)"
