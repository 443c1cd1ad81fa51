"""Python emitters of ``identity``, ``dropout``, ``assert`` and ``torch_fallback``
(``transfuse/ir/opdefs/misc.py``).
"""

from __future__ import annotations

from transfuse.codegen.python.registry import LOWERINGS, arg
from transfuse.errors import TransfuseError
from transfuse.ir.graph import Node
from transfuse.ir.opdefs.misc import resolve_aten


@LOWERINGS.register("identity")
def _identity(ctx, node):
    return arg(ctx, node)


@LOWERINGS.register("dropout")
def _dropout(ctx, node):
    if not node.attrs["train"]:
        return arg(ctx, node)  # inference: the identity
    return f"F.dropout({arg(ctx, node)}, {ctx.lit(node.attrs['p'])}, True)"


@LOWERINGS.register("assert")
def _assert(ctx, node):
    xs = ", ".join(ctx.name(v) for v in node.inputs)
    return f"{ctx.helper('_assert')}([{xs}], {ctx.lit(node.attrs['message'])})"




def _aten_returns(node: Node) -> int | None:
    """How many results the aten op of a ``torch_fallback`` returns (None: a single tensor)."""
    returns = resolve_aten(node.attrs["target"])._schema.returns
    if len(returns) == 1 and str(returns[0].type) == "Tensor":
        return None
    return len(returns)


def _torch_fallback_supports(node: Node) -> str | None:
    try:
        resolve_aten(node.attrs["target"])
    except TransfuseError as e:
        return str(e)
    return None


@LOWERINGS.register("torch_fallback", supports=_torch_fallback_supports)
def _torch_fallback(ctx, node):
    """The aten op through ``call_fallback`` (the reference's path), counted by the backend."""
    xs = ", ".join(ctx.name(v) for v in node.inputs)
    fn = ctx.helper("call_fallback")
    call = f"{fn}({ctx.lit(node.attrs['target'])}, {ctx.lit(node.attrs['args'])}, [{xs}])"
    if len(node.outputs) == 1 and _aten_returns(node) is not None:
        return f"{call}[0]"  # a one-element tuple/list result, as run_reference unpacks it
    return call
