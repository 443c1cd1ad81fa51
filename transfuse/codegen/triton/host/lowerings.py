"""The triton target's host lowerings, one per op the host runs with a hand-written kernel or
cuBLAS: GEMMs (``linear``, ``matmul``), attention (``attention``, ``cached_attention``),
``rotary`` and the quantized GEMMs (``qlinear``, ``qmatmul``).

Each returns the call (``calls.py``, bound as ``_t_*``) that writes the node's output into
``ctx.out(value)``. Pointwise ops, reductions and norms are not here: the partition puts them
in fusion groups, which become generated kernels (``codegen/triton/gen``).
"""

from __future__ import annotations

from transfuse.codegen.triton.host.registry import LOWERINGS, HostContext, dtype_reason
from transfuse.ir.graph import Node
from transfuse.ir.types import DType


def _opt(ctx: HostContext, node: Node, i: int) -> str:
    v = node.inputs[i] if i < len(node.inputs) else None
    return ctx.name(v) if v is not None else "None"


def _kw(ctx: HostContext, node: Node, *names: str) -> str:
    return ", ".join(f"{n}={ctx.lit(node.attrs[n])}" for n in names)


# -- GEMMs ----------------------------------------------------------------------------------


def _gemm_supports(node: Node) -> str | None:
    return dtype_reason(node, 0, 1)


@LOWERINGS.register("linear", supports=_gemm_supports)
def _linear(ctx: HostContext, node: Node) -> str:
    """cuBLAS through ``torch.addmm(out=)`` into the planned buffer, then the activation."""
    ctx.kernel("torch:addmm", node)
    return (f"_t_linear({ctx.name(node.inputs[0])}, {ctx.name(node.inputs[1])}, "
            f"{_opt(ctx, node, 2)}, {ctx.out(node.outputs[0])}, "
            f"{ctx.lit(node.attrs.get('activation'))})")


@LOWERINGS.register("matmul", supports=_gemm_supports)
def _matmul(ctx: HostContext, node: Node) -> str:
    ctx.kernel("torch:matmul", node)
    return (f"_t_matmul({ctx.name(node.inputs[0])}, {ctx.name(node.inputs[1])}, "
            f"{ctx.out(node.outputs[0])})")


# -- attention ------------------------------------------------------------------------------

_ATTN_ATTRS = ("scale", "causal", "window", "alibi", "softcap", "layout")
_CACHED_ATTRS = ("layout", "paged", "cache_order", "scale", "window", "alibi", "softcap")


def _attention_supports(node: Node) -> str | None:
    why = dtype_reason(node, 0, 1, 2)
    if why:
        return why
    d = node.inputs[0].type.shape[-1]
    dv = node.inputs[2].type.shape[-1]
    if not (isinstance(d, int) and isinstance(dv, int)) or max(d, dv) > 256:
        return f"head dims {d}/{dv}: the attention kernels take static head dims up to 256"
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    if bias is not None and bias.type.dtype not in (DType.f16, DType.bf16, DType.f32):
        return f"bias %{bias.name} is {bias.type.dtype.name}"
    return None


@LOWERINGS.register("attention", supports=_attention_supports)
def _attention(ctx: HostContext, node: Node) -> str:
    """Flash attention; a causal attention with a 2-D additive bias (the form
    ``sparse_attention="block:..."`` produces) takes the block-sparse kernel, with the block
    mask computed from the bias once per call (every layer shares it)."""
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    extra = ""
    if bias is not None and bias.type.rank <= 2 and node.attrs["causal"]:
        blocks = ctx.hoist(f"_t_block_mask({ctx.name(bias)})", "blocks")
        extra = f", blocks={blocks}"
        ctx.kernel("transfuse.codegen.triton.kernels.block_sparse_attention:"
                   "block_sparse_attention_fwd", node)
    else:
        ctx.kernel("transfuse.codegen.triton.kernels.flash_attention:flash_attention_fwd", node)
    q, k, v = (ctx.name(x) for x in node.inputs[:3])
    return (f"_t_attention({q}, {k}, {v}, {_opt(ctx, node, 3)}, {_opt(ctx, node, 4)}, "
            f"{ctx.out(node.outputs[0])}{extra}, {_kw(ctx, node, *_ATTN_ATTRS)})")


def _cached_supports(node: Node) -> str | None:
    why = dtype_reason(node, 0, 1, 2)
    if why:
        return why
    d, dv = node.inputs[0].type.shape[-1], node.inputs[2].type.shape[-1]
    if not (isinstance(d, int) and isinstance(dv, int)):
        return f"head dims {d}/{dv} are not static"
    return None


@LOWERINGS.register("cached_attention", supports=_cached_supports)
def _cached_attention(ctx: HostContext, node: Node) -> str:
    """The cache write kernel, then the prefill kernel (a step with more tokens than
    sequences: tiles of one sequence's tokens) or the split-K decode kernel per token (paged
    through the block table); the per-token lengths, table rows and the prefill tile map are
    computed once per step."""
    ins = [ctx.name(x) for x in node.inputs]
    pos, sot, table = ins[5], ins[6], ins[8]
    tokens = ctx.hoist(f"_t_token_tables({pos}, {sot}, {table})", "tokens")
    ctx.kernel("transfuse.codegen.triton.kernels.decode_attention:_cache_write_kernel", node)
    ctx.kernel("transfuse.codegen.triton.kernels.decode_attention:_decode_split_kernel", node)
    ctx.kernel("transfuse.codegen.triton.kernels.prefill_attention:_prefill_kernel", node)
    return (f"_t_cached_attention({', '.join(ins[:5])}, {pos}, {sot}, {table}, {tokens}, "
            f"{ctx.out(node.outputs[0])}, {_kw(ctx, node, *_CACHED_ATTRS)})")


# -- rotary ---------------------------------------------------------------------------------


def _rotary_supports(node: Node) -> str | None:
    return dtype_reason(node, 0, 1, 2)


@LOWERINGS.register("rotary", supports=_rotary_supports)
def _rotary(ctx: HostContext, node: Node) -> str:
    ctx.kernel("transfuse.codegen.triton.kernels.rotary:rotary_kernel", node)
    x, cos, sin = (ctx.name(v) for v in node.inputs)
    return (f"_t_rotary({x}, {cos}, {sin}, {ctx.out(node.outputs[0])}, "
            f"interleaved={ctx.lit(node.attrs['interleaved'])})")


# -- quantized GEMMs ------------------------------------------------------------------------


def _quant_supports(node: Node) -> str | None:
    w = node.inputs[1]
    if not w.is_const:
        return f"the quantized weight %{w.name} is not a constant"
    return dtype_reason(node, 0)


@LOWERINGS.register("qlinear", supports=_quant_supports)
def _qlinear(ctx: HostContext, node: Node) -> str:
    ctx.kernel("transfuse.codegen.triton.kernels.quant_gemm:_qlinear_kernel", node)
    qtype = ctx.obj(node.inputs[1].type.quant)
    args = [ctx.name(node.inputs[0]), ctx.name(node.inputs[1]), ctx.name(node.inputs[2]),
            _opt(ctx, node, 3), _opt(ctx, node, 4), qtype, ctx.out(node.outputs[0]),
            ctx.lit(node.attrs["activation"])]
    return f"_t_qlinear({', '.join(args)})"


@LOWERINGS.register("qmatmul", supports=_quant_supports)
def _qmatmul(ctx: HostContext, node: Node) -> str:
    ctx.kernel("transfuse.codegen.triton.kernels.quant_gemm:_w8a8_kernel", node)
    args = [ctx.name(node.inputs[0]), ctx.name(node.inputs[1]), ctx.name(node.inputs[2]),
            _opt(ctx, node, 3), ctx.out(node.outputs[0])]
    return (f"_t_qmatmul({', '.join(args)}, act_quant={ctx.lit(node.attrs['act_quant'])}, "
            f"activation={ctx.lit(node.attrs['activation'])})")


__all__: list[str] = []
