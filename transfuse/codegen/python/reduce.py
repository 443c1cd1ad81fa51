"""Python emitters of the reductions, softmax and cumsum (``transfuse/ir/opdefs/reduce.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from transfuse.codegen.python.registry import LOWERINGS, EmitContext, arg
from transfuse.ir.graph import Node


def _axes(node: Node) -> tuple[int, ...]:
    return tuple(node.attrs["axes"]) or tuple(range(node.inputs[0].type.rank))


def _reduce(fn: str) -> Callable[[EmitContext, Node], str]:
    def emit(ctx, node):
        keep = ", keepdim=True" if node.attrs["keepdim"] else ""
        return f"{fn}({arg(ctx, node)}, dim={ctx.lit(_axes(node))}{keep})"

    return emit


for _op, _fn in {"reduce_sum": "torch.sum", "reduce_mean": "torch.mean",
                 "reduce_max": "torch.amax", "reduce_min": "torch.amin"}.items():
    LOWERINGS.register(_op)(_reduce(_fn))


@LOWERINGS.register("argmax")
def _argmax(ctx, node):
    keep = ", keepdim=True" if node.attrs["keepdim"] else ""
    return f"torch.argmax({arg(ctx, node)}, dim={node.attrs['axis']}{keep})"


@LOWERINGS.register("softmax", "log_softmax")
def _softmax(ctx, node):
    return f"torch.{node.op}({arg(ctx, node)}, dim={node.attrs['axis']})"


@LOWERINGS.register("cumsum")
def _cumsum(ctx, node):
    dtype = node.attrs["dtype"]
    extra = f", dtype={ctx.lit(dtype)}" if dtype is not None else ""
    return f"torch.cumsum({arg(ctx, node)}, dim={node.attrs['axis']}{extra})"
