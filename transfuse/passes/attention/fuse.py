"""attention.fuse-sdpa: every spelling of ``softmax(scale·Q·Kᵀ + mask)·V`` becomes one ``attention``.

Rewrites (rule ids):

- ``attention/sdpa``: ``matmul(softmax(mask(softcap(scale·matmul(Q, Kᵀ)))), V)`` where
  - Kᵀ is ``permute`` swapping the last two dims of K, or a combined permute
    ``[0, 2, 3, 1]`` of a [B, T, H, D] key (then K = ``permute(k, [0, 2, 1, 3])``);
    a key permuted any other way is refused. A Kᵀ that is no permute at all (a
    pre-transposed input) gets an explicit transpose;
  - scale is a scalar constant: ``mul``/``div`` of the scores, of Q (pre-scaled
    query), of K or Kᵀ, or of both (√scale on each); the ``scale`` attr is their
    product computed in float64 (``div`` by c is ``1/c``);
  - softcap is ``tanh(x / c) · c`` (Gemma 2) before the mask;
  - up to ``MASK_STEPS`` mask steps, in any order: ``add`` (additive),
    ``where(mask, fill, x)`` (masked_fill) or ``where(keep, x, fill)`` with fill
    -inf or <= -1e4 (T5: position bias then mask; MPT: ALiBi then a causal
    masked_fill). They are planned by :mod:`.plan`: proven causal / sliding window
    (:mod:`.masks`) -> attrs, a padding term -> the small [B, 1, 1, T] ``bias``,
    one ALiBi summand (:mod:`.alibi`) -> the ``alibi`` attr. A term that is not
    understood is added to the explicit ``bias`` unchanged (T5's bias, computed
    once, stays one value shared by the layers) and the reason is recorded as an
    ``attention/mask`` near miss; the fusion still happens;
  - optional float casts around the softmax (fp32 softmax), eval-mode
    ``dropout``; the softmax must be over the last (key) axis;
  - 3-D bmm forms [B·H, S, D] are fused with a unit head axis ([B·H, 1, S, D]).
- ``attention/sdpa-view``: the same on 3-D bmm scores [B·H, S, T] viewed as
  [B, H, S, T] (one ``reshape`` mask step) for the softmax, and the probabilities
  viewed back for the bmm with V (BLOOM): q, k, v are viewed as [B, H, ., D]; mask
  steps before the view are terms on [B·H, S, T] (ALiBi there only when B is 1).
- ``attention/sdpa-view-back``: the same with the masked [B, H, S, T] scores viewed back
  as [B·H, S, T] before a 3-D softmax (XGLM; the softmax over the last axis commutes with
  the view). A mask step may also be a clamp ``maximum(x, finfo.min)`` (XGLM, old OPT/BART
  code): it changes only -inf entries, masked either way; a clamp at any higher value is
  refused (it would change unmasked scores).
- ``attention/sdpa-mask``: an ``attention`` made by the frontend from
  ``scaled_dot_product_attention`` with a mask as ``bias``: the bias is analysed
  the same way and turned into causal/window/padding/alibi where proven.

Needs: cleanup (eval dropout removed, views folded). Guarantees: the same values up
to floating-point rounding (scale folded into one multiplication, fp32 softmax
inside the op), except rows whose every key is masked (the fused op gives zeros
or the padding row's average where the original gives NaN or a uniform row).
Repeated K/V heads (``repeat_kv``) stay on the op's inputs; ``attention.remove-repeat-kv``
(:mod:`.gqa`) removes them. The pattern and its checks are in :mod:`.sdpa_match`, the mask
planning in :mod:`.plan`.

Glossary: B batch, H query heads, Hkv key/value heads, S query length, T key
length, D head dim, Dv value head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.types import DType, dims_equal
from transfuse.passes.attention.alibi import match_alibi
from transfuse.passes.attention.masks import additive_summands, analyze_additive_mask
from transfuse.passes.attention.plan import (
    MaskStep,
    additive_plan,
    bias_of,
    masked_bias_steps,
    plan_masks,
    resolved_padding_keep,
)
from transfuse.passes.attention.sdpa_match import (
    SDPA_PATTERN,
    SDPA_VIEW_BACK_PATTERN,
    SDPA_VIEW_PATTERN,
    check_sdpa,
    key_source,
    matched_steps,
    scale_of,
    softcap_of,
)
from transfuse.passes.base import PassContext, erase_if_dead
from transfuse.passes.rewrite import Builder, Match, P, RewritePass, Rule

MASK_RULE = "attention/mask"


@dataclass
class _RunState:
    """Per-run state the rules' replace functions report through (``m.state`` / ``b.state``,
    made fresh for each run by the engine from ``FuseAttention.state_factory``)."""

    ctx: PassContext
    seen: set = field(default_factory=set)
    #: matched eval-mode dropouts: not pure by their OpDef, so the engine leaves them
    dropouts: list = field(default_factory=list)


def _mask_outcome(state: _RunState | None, node: Node, reason: str | None) -> None:
    """Statistics of ``attention/mask``: an analysed mask is a match, or a near miss with the
    reason it stays an explicit bias."""
    if state is None or (id(node), reason) in state.seen:
        return
    state.seen.add((id(node), reason))
    state.ctx.attempt(MASK_RULE)
    if reason is None:
        state.ctx.count(MASK_RULE)
    else:
        state.ctx.near_miss(MASK_RULE, node, f"mask kept as an explicit bias: {reason}")


# -- replace ----------------------------------------------------------------------------------


def _report(b: Builder):
    return lambda node, reason: _mask_outcome(b.state, node, reason)


def _attention(b: Builder, q: Value, k: Value, v: Value, bias: Value | None, **attrs) -> Value:
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    return b.create("attention", inputs, attrs).output


def _replace(m: Match, b: Builder) -> Value:
    rank = m.node("qk").outputs[0].type.rank
    state = m.state
    if "dropout" in m.tags and state is not None:
        state.dropouts.append(m.node("dropout"))
    src, perm = key_source(m)
    q, v = m["q"], m["v"]
    k = src if perm is None else b.op("permute", src, perm=perm)
    scores = m.node("qk").outputs[0].type
    s, t = scores.shape[-2], scores.shape[-1]
    steps = matched_steps(m)
    view = next((n for _, kind, n in steps if kind == "view"), None)
    heads3 = None  # ALiBi on 3-D scores: matched on the term viewed as [B, H, .., T]
    if view is not None:  # [B·H, S, D] -> [B, H, S, D]
        lead = list(view.outputs[0].shape[:2])
        heads3 = lead[1]
    elif rank == 3:  # [B·H, S, D] -> [B·H, 1, S, D]
        lead = None
    if rank == 3:
        def to4(x: Value) -> Value:
            shape = [*(lead if lead is not None else [x.shape[0], 1]), *x.shape[1:]]
            src = x.producer.inputs[0] if x.producer is not None and \
                x.producer.op == "reshape" else None
            if src is not None and src.type.rank == 4 and all(
                    dims_equal(p, q) for p, q in zip(src.shape, shape)):
                return src  # x is the [B, H, S, D] tensor viewed as [B·H, S, D]: undo the view
            return b.op("reshape", x, shape=shape)

        def lift(x: Value) -> Value:  # a term on [B·H, S, T] as one on the 4-D scores
            return to4(x) if x.type.rank == 3 and (lead is None or x.shape[0] != 1) else x
        q, k, v = to4(q), to4(k), to4(v)
    else:
        lift = None  # every step is on the 4-D scores
    mask_steps, frame = [], rank
    for k_, kind, _ in steps:
        if kind == "view":
            frame = 4
            continue
        if kind == "clamp":  # at finfo.min (checked): a masked score stays masked
            continue
        heads = q.shape[1] if frame == 4 and (view is not None or rank == 4) else heads3
        value = m[f"mask{k_}"] if kind == "add" else m[f"cond{k_}"]
        mask_steps.append(MaskStep(kind, value, m.get(f"fill{k_}"), frame, heads))
    plan = plan_masks(mask_steps, b, s, t, node_dtype(m), lift, _report(b), m.root)
    bias = bias_of(plan, b, q.dtype)
    kv_heads = k.shape[1] if k.shape[1] != q.shape[1] else None
    out = _attention(b, q, k, v, bias, scale=scale_of(m), causal=plan.causal, window=plan.window,
                     kv_heads=kv_heads, alibi=plan.alibi, softcap=softcap_of(m))
    if rank == 3:
        out = b.op("reshape", out, shape=list(m.root.outputs[0].shape))
    return out


def node_dtype(m: Match) -> DType:
    """The dtype the masks are added in (the softmax input's)."""
    return m.node("softmax").inputs[0].dtype


SDPA = Rule(id="attention/sdpa", pattern=SDPA_PATTERN, check=check_sdpa, replace=_replace)
#: a separate rule so that every matmul of a reshape (a linear's input, say) is no near miss
#: of ``attention/sdpa``; its own near misses start past the softmax
SDPA_VIEW = Rule(id="attention/sdpa-view", pattern=SDPA_VIEW_PATTERN, check=check_sdpa,
                 replace=_replace, near_miss_depth=3)
#: the same with the masked scores viewed back before the softmax (XGLM)
SDPA_VIEW_BACK = Rule(id="attention/sdpa-view-back", pattern=SDPA_VIEW_BACK_PATTERN,
                      check=check_sdpa, replace=_replace, near_miss_depth=3)


# -- the frontend's attention: analyse its bias -------------------------------------------------


def _reanalyse(m: Match, b: Builder) -> Value | None:
    node = m.root
    a = node.attrs
    state = m.state
    if (a["causal"] or a["window"] is not None or a["alibi"] is not None or a["layout"] != "bhsd"
            or str(node.meta.get("origin", "")).startswith(FuseAttention.name)
            or state is None or ("analysed", id(node)) in state.seen):
        return None
    state.seen.add(("analysed", id(node)))
    q, k, v, bias = m["q"], m["k"], m["v"], m["bias"]
    s, t, heads = q.shape[2], k.shape[2], q.shape[1]
    steps = masked_bias_steps(bias, heads, s, t)
    if steps is not None:  # a proven mask folded into a bias by where: split them
        plan = plan_masks(steps, b, s, t, bias.dtype, None, _report(b), node)
        return _attention(b, q, k, v, bias_of(plan, b, q.dtype), **{
            **a, "causal": plan.causal, "window": plan.window, "alibi": plan.alibi})
    parts = additive_summands(bias)
    if not any(match_alibi(p, heads, s, t) for p in parts):
        facts = analyze_additive_mask(bias, s, t)
        if facts.reason is not None and not resolved_padding_keep(facts):
            _mask_outcome(state, node, facts.reason)
            return None
        if facts.padding is bias and not facts.causal and facts.window is None:
            return None  # already the padding term alone
    plan = additive_plan(bias, b, heads, s, t, 4, bias.dtype, _report(b), node)
    return _attention(b, q, k, v, bias_of(plan, b, q.dtype),
                      **{**a, "causal": plan.causal, "window": plan.window, "alibi": plan.alibi})


SDPA_MASK = Rule(
    id="attention/sdpa-mask",
    pattern=P.op("attention", P.any("q"), P.any("k"), P.any("v"), P.any("bias"), None),
    replace=_reanalyse,
)


class FuseAttention(RewritePass):
    """Fuse matmul-softmax-matmul attention chains into ``attention``; analyse masks into
    causal/window/padding/alibi attrs (unknown masks stay an explicit bias)."""

    name = "attention.fuse-sdpa"
    rule_list = [SDPA_VIEW_BACK, SDPA, SDPA_VIEW, SDPA_MASK]

    state_factory = _RunState

    def finish(self, graph: Graph, ctx: PassContext, state: _RunState) -> None:
        for node in state.dropouts:  # eval dropout is the identity: erase it and what it used
            if not node.is_erased and not any(v.num_uses for v in node.outputs):
                graph.erase(node)
                _erase_dead_inputs(graph, node)


def _erase_dead_inputs(graph: Graph, node: Node) -> None:
    stack = [v.producer for v in node.inputs if v is not None]
    while stack:
        n = stack.pop()
        if n is not None and not n.is_erased and erase_if_dead(graph, n):
            stack.extend(v.producer for v in n.inputs if v is not None)


FuseAttention.rules = (*FuseAttention.rules, MASK_RULE)


def register_lazily(cls: type) -> None:
    """Register ``cls`` by name, unless pipelines.py is importing this module right now
    (then it registers the pass itself)."""
    try:
        from transfuse.passes.registry import register_pass
    except ImportError:
        return
    register_pass(cls)


register_lazily(FuseAttention)

__all__ = ["FuseAttention", "SDPA", "SDPA_MASK", "SDPA_PATTERN", "SDPA_VIEW", "SDPA_VIEW_BACK",
           "MASK_RULE"]
