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
- ``attention/sdpa-mask``: an ``attention`` made by the frontend from
  ``scaled_dot_product_attention`` with a mask as ``bias``: the bias is analysed
  the same way and turned into causal/window/padding/alibi where proven.

Needs: cleanup (eval dropout removed, views folded). Guarantees: the same values up
to floating-point rounding (scale folded into one multiplication, fp32 softmax
inside the op), except rows whose every key is masked (the fused op gives zeros
or the padding row's average where the original gives NaN or a uniform row).
Repeated K/V heads (``repeat_kv``) stay on the op's inputs; ``attention.remove-repeat-kv``
(:mod:`.gqa`) removes them.

Glossary: B batch, H query heads, Hkv key/value heads, S query length, T key
length, D head dim, Dv value head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.types import DType, dim_product, dims_equal
from transfuse.passes.attention.alibi import match_alibi
from transfuse.passes.attention.masks import NEG_LIMIT, additive_summands, analyze_additive_mask
from transfuse.passes.attention.plan import (
    MaskStep,
    additive_plan,
    bias_of,
    masked_bias_steps,
    plan_masks,
    resolved_padding_keep,
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


# -- the pattern ------------------------------------------------------------------------------


def _scaled(inner, name: str):
    """``inner · c``, ``inner / c`` or ``inner``; the tag says which (``name:mul``/``name:div``)."""
    return P.alt(P.op("mul", inner, P.scalar(name), commutative=True),
                 P.op("div", inner, P.scalar(name)),
                 inner, tags=(f"{name}:mul", f"{name}:div", None))


_Q = _scaled(P.any("q"), "q_scale")
_KT = _scaled(P.alt(P.op("permute", _scaled(P.any("k"), "k_scale"), name="kt"),
                    P.any("kt_value"), tags=("permuted", None)), "kt_scale")
_QK = P.op("matmul", _Q, _KT, name="qk")  # (B, H, S, T)
_SCALED = _scaled(_QK, "scale")
_CAPPED = P.alt(P.op("mul", P.op("tanh", _scaled(_SCALED, "cap_in"), name="tanh"),
                     P.scalar("cap"), commutative=True, name="cap_mul"),
                _SCALED, tags=("softcap", None))
_SCORES = P.maybe("cast", _CAPPED, name="cast_scores", tag="cast-scores")
#: mask steps between the scores and the softmax (T5: bias + mask; MPT: ALiBi + masked_fill;
#: BLOOM: ALiBi on [B·H, S, T], a view to [B, H, S, T], the causal mask)
MASK_STEPS = 3


def _mask_chain(inner, depth: int):
    """Up to ``depth`` steps over ``inner``; step k (0 nearest the scores) is tagged
    ``add:k`` / ``fill:k`` / ``keep:k`` / ``view:k`` and its node is ``masked{k}``."""
    level = inner
    for k in range(depth):
        level = P.alt(P.op("add", level, P.any(f"mask{k}"), commutative=True, name=f"masked{k}"),
                      P.op("where", P.any(f"cond{k}"), P.scalar(f"fill{k}"), level,
                           name=f"masked{k}"),
                      P.op("where", P.any(f"cond{k}"), level, P.scalar(f"fill{k}"),
                           name=f"masked{k}"),
                      P.op("reshape", level, name=f"masked{k}"),
                      level, tags=(f"add:{k}", f"fill:{k}", f"keep:{k}", f"view:{k}", None))
    return level


_MASKED = _mask_chain(_SCORES, MASK_STEPS)
_SOFTMAX = P.op("softmax", P.maybe("cast", _MASKED, name="upcast", tag="upcast"),
                name="softmax")
_PROBS = P.maybe("dropout", P.maybe("cast", _SOFTMAX, name="downcast", tag="downcast"),
                 name="dropout", tag="dropout")
SDPA_PATTERN = P.op("matmul", _PROBS, P.any("v"), name="pv")  # (B, H, S, Dv)
#: BLOOM: [B, H, S, T] probabilities viewed as [B·H, S, T] for a bmm with V [B·H, T, Dv]
SDPA_VIEW_PATTERN = P.op("matmul", P.op("reshape", _PROBS, name="probs_view"), P.any("v"),
                         name="pv")


# -- checks -----------------------------------------------------------------------------------


def _swap_last(rank: int) -> list[int]:
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def _key(m: Match) -> tuple[Value, list[int] | None] | str:
    """K as (source, permute to apply or None), or why the second matmul operand is no Kᵀ."""
    rank = m.node("qk").outputs[0].type.rank
    if "permuted" not in m.tags:
        return m["kt_value"], _swap_last(rank)
    perm = list(m.node("kt").attrs["perm"])
    k = m["k"]
    composed = [perm[i] for i in _swap_last(rank)]  # K = permute(k, composed)
    if composed == list(range(rank)):
        return k, None
    if rank == 4 and composed == [0, 2, 1, 3]:  # k is [B, T, H, D]
        return k, composed
    return (f"key operand is permute(%{k.name}, perm={perm}): not Kᵀ of a [B, H, T, D] key "
            f"(perm [0, 1, 3, 2]) nor of a [B, T, H, D] key (perm [0, 2, 3, 1])")


def _permuted_shape(v: Value, perm: list[int] | None) -> tuple:
    return tuple(v.shape) if perm is None else tuple(v.shape[p] for p in perm)


def _factor(m: Match, name: str) -> float | str:
    if f"{name}:mul" in m.tags:
        return m.scalar(name)
    if f"{name}:div" in m.tags:
        c = m.scalar(name)
        return 1.0 / c if c != 0 else f"division of the scores by {c}"
    return 1.0


def _scale(m: Match) -> float | str:
    """The product of every scale factor in float64, or why SDPA's scale cannot express it."""
    total = 1.0
    for name in ("q_scale", "k_scale", "kt_scale", "scale"):
        f = _factor(m, name)
        if isinstance(f, str):
            return f
        total *= f
    f32 = float(torch.tensor(total, dtype=torch.float32))
    if not math.isfinite(total) or total == 0 or not math.isfinite(f32) or f32 == 0 or \
            abs(f32 - total) > abs(total) * 2.0 ** -24:
        return f"scale {total!r} is not a normal fp32 number"
    return total


def _softcap(m: Match) -> float | None | str:
    if "softcap" not in m.tags:
        return None
    cap = m.scalar("cap")
    if not (math.isfinite(cap) and cap > 0):
        return f"softcap tanh(x / c) · c with c = {cap}"
    if "cap_in:div" in m.tags:
        inner = m.scalar("cap_in")
        if inner != cap:
            return f"tanh(x / {inner}) · {cap}: the two softcap constants differ"
    elif "cap_in:mul" in m.tags:
        inner = m.scalar("cap_in")
        if abs(inner * cap - 1.0) > 2.0 ** -22:
            return f"tanh(x · {inner}) · {cap}: not a softcap (x · 1/c)"
    else:
        return "tanh of the scores without the division by the softcap"
    return cap


def _steps(m: Match) -> list[tuple[str, Node]]:
    """The matched mask steps, nearest the scores first: (kind, node)."""
    out = []
    for k in range(MASK_STEPS):
        for kind in ("add", "fill", "keep", "view"):
            if f"{kind}:{k}" in m.tags:
                out.append((kind, m.node(f"masked{k}")))
    return out


def _step_input(m: Match, k: int, kind: str, node: Node) -> Value:
    """The scores a step applies to (the pattern's inner level)."""
    if kind == "add":
        x, y = node.inputs
        return x if y is m[f"mask{k}"] else y
    return {"fill": node.inputs[2], "keep": node.inputs[1], "view": node.inputs[0]}[kind]


def _view_reason(m: Match, view: Node | None) -> str | None:
    """A view of 3-D bmm scores as [B, H, S, T] must be undone on the probabilities."""
    probs = m.named_nodes.get("probs_view")
    if view is None and probs is None:
        return None
    if view is None or probs is None:
        return ("scores and probabilities are not viewed as [B, H, S, T] and back as "
                "[B·H, S, T] around the softmax")
    src, dst = view.inputs[0].shape, view.outputs[0].shape
    if len(src) != 3 or len(dst) != 4 or not isinstance(dst[1], int) or not (
            dims_equal(src[0], dim_product(dst[:2]))
            and all(dims_equal(x, y) for x, y in zip(src[1:], dst[2:]))):
        return f"view of the scores {view.inputs[0].type} as {view.outputs[0].type}: not " \
               "[B·H, S, T] -> [B, H, S, T] with static H"
    back = probs.outputs[0].shape
    if not (len(back) == 3 and all(dims_equal(x, y) for x, y in zip(back, src))):
        return f"probabilities viewed as {probs.outputs[0].type}, not as the scores {src}"
    return None


def _check(m: Match) -> str | None:
    sm = m.node("softmax")
    srank = sm.outputs[0].type.rank
    rank = m.node("qk").outputs[0].type.rank
    if rank not in (3, 4) or srank not in (3, 4):
        return f"scores of rank {srank}; attention scores are [B, H, S, T] or [B·H, S, T]"
    axis = sm.attrs["axis"]
    if axis % srank != srank - 1:
        return f"softmax is over axis {axis}, not the key axis (the last of {srank})"
    if "dropout" in m.tags and m.node("dropout").attrs["train"]:
        return "dropout in training mode is random"
    steps = _steps(m)
    views = [n for kind, n in steps if kind == "view"]
    if len(views) > 1:
        return f"{len(views)} views of the scores between the product and the softmax"
    reason = _view_reason(m, views[0] if views else None)
    if reason:
        return reason
    key = _key(m)
    if isinstance(key, str):
        return key
    k, perm = key
    q, v, out = m["q"], m["v"], m.root.outputs[0]
    ks = _permuted_shape(k, perm)
    if not (q.type.rank == len(ks) == v.type.rank == rank):
        return f"q, k, v ranks differ: {q.type}, {k.type}, {v.type}"
    dtypes = {q.dtype, k.dtype, v.dtype, out.dtype}
    if len(dtypes) != 1 or not q.dtype.is_float:
        return f"q, k, v and the output have dtypes {sorted(d.value for d in dtypes)}"
    if not (dims_equal(q.shape[0], ks[0]) and dims_equal(q.shape[0], v.shape[0])):
        return f"batch dims of q {q.type}, k {k.type}, v {v.type} differ (broadcast)"
    if rank == 4:
        h, hk, hv = q.shape[1], ks[1], v.shape[1]
        if not all(isinstance(x, int) for x in (h, hk, hv)):
            return f"head counts {h}, {hk}, {hv} are not static"
        if hk != hv or (hk != h and hk != 1):
            return f"q has {h} heads, k {hk}, v {hv}: no GQA layout"
    for k_, (kind, node) in zip(_step_indices(m), steps):
        if kind == "view":
            continue
        inner, mt = _step_input(m, k_, kind, node).type, node.outputs[0].type
        if mt.rank != inner.rank or not all(dims_equal(x, y) for x, y in
                                            zip(mt.shape, inner.shape)):
            return f"the mask broadcasts the scores {inner} up to {mt}"
        if kind in ("fill", "keep"):
            fill = m.scalar(f"fill{k_}")
            if not (fill == -math.inf or fill <= NEG_LIMIT):
                return f"masked_fill value {fill} is not -inf or <= {NEG_LIMIT}"
    for name in ("cast_scores", "upcast", "downcast"):
        if name in m.named_nodes:
            c = m.node(name)
            if not (c.inputs[0].dtype.is_float and c.outputs[0].dtype.is_float):
                return f"cast {c.inputs[0].dtype.value} -> {c.outputs[0].dtype.value} in the chain"
    for what in (_scale(m), _softcap(m)):
        if isinstance(what, str):
            return what
    return None


def _step_indices(m: Match) -> list[int]:
    return [k for k in range(MASK_STEPS) for kind in ("add", "fill", "keep", "view")
            if f"{kind}:{k}" in m.tags]


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
    src, perm = _key(m)
    q, v = m["q"], m["v"]
    k = src if perm is None else b.op("permute", src, perm=perm)
    scores = m.node("qk").outputs[0].type
    s, t = scores.shape[-2], scores.shape[-1]
    steps = list(zip(_step_indices(m), _steps(m)))
    view = next((n for _, (kind, n) in steps if kind == "view"), None)
    heads3 = None  # heads of an ALiBi term on 3-D scores (only when axis 0 is the head axis)
    if view is not None:  # [B·H, S, D] -> [B, H, S, D]
        lead = list(view.outputs[0].shape[:2])
        heads3 = lead[1] if lead[0] == 1 else None
    elif rank == 3:  # [B·H, S, D] -> [B·H, 1, S, D]
        lead = None
    if rank == 3:
        def to4(x: Value) -> Value:
            head = lead if lead is not None else [x.shape[0], 1]
            return b.op("reshape", x, shape=[*head, *x.shape[1:]])

        def lift(x: Value) -> Value:  # a term on [B·H, S, T] as one on the 4-D scores
            return to4(x) if x.type.rank == 3 and (lead is None or x.shape[0] != 1) else x
        q, k, v = to4(q), to4(k), to4(v)
    else:
        lift = None  # every step is on the 4-D scores
    mask_steps, frame = [], rank
    for k_, (kind, _) in steps:
        if kind == "view":
            frame = 4
            continue
        heads = q.shape[1] if frame == 4 and (view is not None or rank == 4) else heads3
        value = m[f"mask{k_}"] if kind == "add" else m[f"cond{k_}"]
        mask_steps.append(MaskStep(kind, value, m.get(f"fill{k_}"), frame, heads))
    plan = plan_masks(mask_steps, b, s, t, node_dtype(m), lift, _report(b), m.root)
    bias = bias_of(plan, b, q.dtype)
    kv_heads = k.shape[1] if k.shape[1] != q.shape[1] else None
    out = _attention(b, q, k, v, bias, scale=_scale(m), causal=plan.causal, window=plan.window,
                     kv_heads=kv_heads, alibi=plan.alibi, softcap=_softcap(m))
    if rank == 3:
        out = b.op("reshape", out, shape=list(m.root.outputs[0].shape))
    return out


def node_dtype(m: Match) -> DType:
    """The dtype the masks are added in (the softmax input's)."""
    return m.node("softmax").inputs[0].dtype


SDPA = Rule(id="attention/sdpa", pattern=SDPA_PATTERN, check=_check, replace=_replace)
#: a separate rule so that every matmul of a reshape (a linear's input, say) is no near miss
#: of ``attention/sdpa``; its own near misses start past the softmax
SDPA_VIEW = Rule(id="attention/sdpa-view", pattern=SDPA_VIEW_PATTERN, check=_check,
                 replace=_replace, near_miss_depth=3)


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
    rule_list = [SDPA, SDPA_VIEW, SDPA_MASK]

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

__all__ = ["FuseAttention", "SDPA", "SDPA_MASK", "SDPA_PATTERN", "SDPA_VIEW", "MASK_RULE"]
