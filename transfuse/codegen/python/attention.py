"""Python emitter of the ``attention`` op (``transfuse/ir/opdefs/nn.py``).

Scaled dot-product attention through ``F.scaled_dot_product_attention``, or
``_causal_attention`` (``cpu_attention.py``, the native kernel) for square causal attention
without other masks. Masks built from attributes (causal with S != T, window, ALiBi) come
from ``_attn_mask`` (:func:`attn_position_mask`, memoised per shape by the program).

Glossary: B batch, H query heads, Hkv key/value heads, S query length, T key length,
D head dim.
"""

from __future__ import annotations

import torch

from transfuse.codegen.python.registry import LOWERINGS
from transfuse.errors import LoweringError
from transfuse.ir.graph import Node
from transfuse.ir.opdefs.nn import alibi_bias, attention_mask
from transfuse.ir.types import DType, dims_equal


def _bhsd(t, layout: str):
    b, x1, x2, d = t.shape
    return (b, x2, x1, d) if layout == "bshd" else (b, x1, x2, d)


def _attention_supports(node: Node) -> str | None:
    if node.attrs["softcap"] is not None:
        return ("softcap applies tanh to the scores before masking; "
                "scaled_dot_product_attention has no hook for it")
    return None


def attn_position_mask(s: int, t: int, causal: bool, window: int | None,
                       alibi: tuple[float, ...] | None, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    """The mask a backend passes for causal / window / ALiBi attention, as the reference builds it.

    Without ALiBi: bool [S, T] (True = attend). With ALiBi: float [H, S, T], the ALiBi bias
    with -inf where the position mask forbids. Generated code memoises it per shape.
    """
    keep = attention_mask(s, t, causal, window, device)
    if alibi is None:
        return keep
    bias = alibi_bias(list(alibi), s, t, dtype, device)
    return bias if keep is None else bias.masked_fill(~keep, float("-inf"))


@LOWERINGS.register("attention", supports=_attention_supports)
def _attention(ctx, node):
    """``F.scaled_dot_product_attention``; masks other than a square causal one become attn_mask.

    SDPA's ``is_causal`` is top-left aligned; the IR's causal is bottom-right aligned (query i
    sits at i + T - S), so ``is_causal`` is used only when S == T is provable. A query row whose
    every key is masked gives zeros in the reference, as SDPA's CPU kernels do.
    """
    a = node.attrs
    layout = a["layout"]
    q, k, v = (ctx.name(x) for x in node.inputs[:3])
    if layout == "bshd":
        q, k, v = (f"{x}.transpose(1, 2)" for x in (q, k, v))
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    kpm = node.inputs[4] if len(node.inputs) > 4 else None
    qt = node.inputs[0].type
    _, h, s, _ = _bhsd(qt, layout)
    _, hkv, t, _ = _bhsd(node.inputs[1].type, layout)
    square = dims_equal(s, t)
    is_causal = (a["causal"] and square and a["alibi"] is None and bias is None and kpm is None)
    # square causal with a sliding window: _causal_attention takes the window (native kernel)
    window = a["window"] if is_causal else None
    q0 = ctx.name(node.inputs[0])
    bool_masks: list[str] = []
    float_masks: list[str] = []
    if (not is_causal and (a["causal"] or a["window"] is not None)) or a["alibi"] is not None:
        # no value names in here: the same text in every layer is hoisted and built once
        pos = (f"_attn_mask({ctx.dim(s)}, {ctx.dim(t)}, {ctx.lit(a['causal'])}, "
               f"{ctx.lit(a['window'])}, {ctx.lit(a['alibi'])}, {ctx.lit(qt.dtype)}, _dev)")
        (float_masks if a["alibi"] is not None else bool_masks).append(pos)
    if bias is not None:
        b = ctx.name(bias)
        if bias.type.dtype == DType.bool:
            raise LoweringError(f"attention bias %{bias.name} is bool; the IR adds bias to scores")
        if bias.type.dtype != qt.dtype:
            b = f"{b}.to({q0}.dtype)"
        float_masks.insert(0, b)
    if kpm is not None:
        bool_masks.append(f"{ctx.name(kpm)}.bool()[:, None, None, :]")
    mask = None
    if float_masks:
        mask = " + ".join(float_masks)
        for m in bool_masks:
            mask = f"({mask}).masked_fill(~{m}, float('-inf'))"
    elif bool_masks:
        mask = " & ".join(bool_masks)
    args = [q, k, v]
    if mask is not None:
        args.append(f"attn_mask={ctx.hoist(mask, 'attn_mask')}")
    if is_causal:
        # square causal, no other mask: query blocks skip the masked half (cpu_attention.py)
        fn = ctx.helper("_causal_attention")
    else:
        fn = "F.scaled_dot_product_attention"
    if a["scale"] is not None:
        args.append(f"scale={ctx.lit(a['scale'])}")
    if hkv != h:
        args.append("enable_gqa=True")
    if window is not None:
        args.append(f"window={ctx.lit(window)}")
    out = f"{fn}({', '.join(args)})"
    return f"{out}.transpose(1, 2)" if layout == "bshd" else out
