"""The pattern and the checks of ``attention.fuse-sdpa`` (``fuse.py`` builds the op).

``SDPA_PATTERN`` is ``matmul(softmax(steps(softcap(scale·matmul(Q, Kᵀ)))), V)`` with its
optional casts and eval dropout; ``SDPA_VIEW_PATTERN`` the same with the probabilities
viewed as [B·H, S, T] for a bmm (BLOOM). ``steps`` are up to ``MASK_STEPS`` mask
operations (``add``, ``where`` either way) or one view of 3-D scores as [B, H, S, T],
tagged per level. ``check_sdpa`` never mutates and returns why a match cannot be one
``attention``; ``key_source``, ``scale_of`` and ``softcap_of`` read what the op needs.

Glossary: B batch, H query heads, S query length, T key length, D head dim, Dv value
head dim.
"""

from __future__ import annotations

import math

import torch

from transfuse.ir.graph import Node, Value
from transfuse.ir.types import dim_product, dims_equal
from transfuse.passes.attention.masks import NEG_LIMIT
from transfuse.passes.rewrite import Match, P

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
#: BLOOM: ALiBi on [B·H, S, T], a view to [B, H, S, T], the causal mask; XGLM/OPT-style:
#: a view, the mask, a clamp at finfo.min)
MASK_STEPS = 3
#: the kinds of mask step (``clamp``: ``maximum(x, floor)`` with floor <= the dtype's finfo.min)
STEP_KINDS = ("add", "fill", "keep", "view", "clamp")


def _mask_chain(inner, depth: int):
    """Up to ``depth`` steps over ``inner``; step k (0 nearest the scores) is tagged
    ``add:k`` / ``fill:k`` / ``keep:k`` / ``view:k`` / ``clamp:k`` and its node is
    ``masked{k}``."""
    level = inner
    for k in range(depth):
        level = P.alt(P.op("add", level, P.any(f"mask{k}"), commutative=True, name=f"masked{k}"),
                      P.op("where", P.any(f"cond{k}"), P.scalar(f"fill{k}"), level,
                           name=f"masked{k}"),
                      P.op("where", P.any(f"cond{k}"), level, P.scalar(f"fill{k}"),
                           name=f"masked{k}"),
                      P.op("reshape", level, name=f"masked{k}"),
                      P.op("maximum", level, P.scalar(f"floor{k}"), commutative=True,
                           name=f"masked{k}"),
                      level, tags=(f"add:{k}", f"fill:{k}", f"keep:{k}", f"view:{k}",
                                   f"clamp:{k}", None))
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
#: XGLM: the masked [B, H, S, T] scores viewed back as [B·H, S, T] before the softmax (the
#: softmax over the last axis commutes with that view), 3-D probabilities for the bmm
_SOFTMAX_BACK = P.op("softmax", P.maybe("cast", P.op("reshape", _MASKED, name="scores_back"),
                                        name="upcast", tag="upcast"), name="softmax")
SDPA_VIEW_BACK_PATTERN = P.op(
    "matmul", P.maybe("dropout", P.maybe("cast", _SOFTMAX_BACK, name="downcast", tag="downcast"),
                      name="dropout", tag="dropout"), P.any("v"), name="pv")


# -- checks -----------------------------------------------------------------------------------


def _swap_last(rank: int) -> list[int]:
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def key_source(m: Match) -> tuple[Value, list[int] | None] | str:
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


def scale_of(m: Match) -> float | str:
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


def softcap_of(m: Match) -> float | None | str:
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


def matched_steps(m: Match) -> list[tuple[int, str, Node]]:
    """The matched mask steps, nearest the scores first: (level k, kind, node); the step's
    operand is ``m[f"mask{k}"]`` (add) or ``m[f"cond{k}"]`` / ``m[f"fill{k}"]`` (where)."""
    out = []
    for k in range(MASK_STEPS):
        for kind in STEP_KINDS:
            if f"{kind}:{k}" in m.tags:
                out.append((k, kind, m.node(f"masked{k}")))
    return out


def _step_input(m: Match, k: int, kind: str, node: Node) -> Value:
    """The scores a step applies to (the pattern's inner level)."""
    if kind == "add":
        x, y = node.inputs
        return x if y is m[f"mask{k}"] else y
    if kind == "clamp":
        x, y = node.inputs
        return y if x.is_const and x.const.numel() == 1 else x
    return {"fill": node.inputs[2], "keep": node.inputs[1], "view": node.inputs[0]}[kind]


def _view_reason(m: Match, view: Node | None) -> str | None:
    """A view of 3-D bmm scores as [B, H, S, T] must be undone on the probabilities (or on
    the masked scores, before the softmax)."""
    probs = m.named_nodes.get("probs_view") or m.named_nodes.get("scores_back")
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


def check_sdpa(m: Match) -> str | None:
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
    steps = matched_steps(m)
    views = [n for _, kind, n in steps if kind == "view"]
    if len(views) > 1:
        return f"{len(views)} views of the scores between the product and the softmax"
    reason = _view_reason(m, views[0] if views else None)
    if reason:
        return reason
    key = key_source(m)
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
    for k_, kind, node in steps:
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
        if kind == "clamp":
            # maximum(x, floor) with floor <= finfo.min changes only x = -inf, to a value whose
            # softmax weight is 0 as well wherever the row has an unmasked key
            floor, dt = m.scalar(f"floor{k_}"), mt.dtype
            if not dt.is_float or not floor <= float(torch.finfo(dt.torch).min):
                return (f"maximum of the scores with {floor}: only a clamp at the dtype's "
                        f"lowest value (finfo.min) leaves the unmasked scores as they are")
    for name in ("cast_scores", "upcast", "downcast"):
        if name in m.named_nodes:
            c = m.node(name)
            if not (c.inputs[0].dtype.is_float and c.outputs[0].dtype.is_float):
                return f"cast {c.inputs[0].dtype.value} -> {c.outputs[0].dtype.value} in the chain"
    for what in (scale_of(m), softcap_of(m)):
        if isinstance(what, str):
            return what
    return None


__all__ = ["MASK_STEPS", "SDPA_PATTERN", "SDPA_VIEW_BACK_PATTERN", "SDPA_VIEW_PATTERN",
           "STEP_KINDS", "check_sdpa", "key_source",
           "matched_steps", "scale_of", "softcap_of"]
