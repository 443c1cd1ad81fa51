"""From the mask operations between the scores and the softmax to the attention op's inputs.

The attention fusion (``fuse.py``) matches up to a few mask steps between the scaled
scores and the softmax, in any order: ``add`` of a term (ALiBi, a causal or padding
mask, T5's relative position bias), ``where(cond, fill, x)`` (masked_fill) and
``where(keep, x, fill)``. This module turns them into one plan: ``causal`` /
``window`` / ``alibi`` attrs where :mod:`.masks` and :mod:`.alibi` prove them, and
the rest as one additive ``bias`` input.

Combining steps. The scores become ``x + Σ terms`` with masked entries at a fill
<= -1e4 (or -inf); a where step equals adding ``where(cond, fill, 0)`` up to
underflow (the accepted approximation of :mod:`.masks`). So every step is a
summand: proven ones become attrs (the keep sets intersect: causal if any step is
causal, the narrowest window), unproven ones are added into the bias, each
unchanged (a bias shared by every layer, as T5 computes it once, stays one value).
At most one ALiBi term becomes the attr; a second one stays in the bias.

Steps on 3-D bmm scores [B·H, S, T] that are viewed as [B, H, S, T] before the
softmax (BLOOM) are analysed in their own frame; a term with a B·H axis is
reshaped to [B, H, .., T] for the bias (``lift``).

Glossary: B batch, H heads, S query length, T key length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from transfuse.ir.graph import Node, Value
from transfuse.ir.types import Dim, DType
from transfuse.passes.attention.alibi import match_alibi
from transfuse.passes.attention.masks import (
    NEG_LIMIT,
    MaskFacts,
    additive_summands,
    analyze_additive_mask,
    analyze_bool_mask,
)
from transfuse.passes.rewrite import Builder

#: report(node, reason): reason None = the mask was understood, else why it stays a bias
Report = Callable[[Node, "str | None"], None]


@dataclass(frozen=True)
class MaskStep:
    """One mask operation: ``add`` (``value`` is the term), ``fill`` (``where(value, fill,
    x)``: True = masked) or ``keep`` (``where(value, x, fill)``: True = attend).
    ``rank`` is the rank of the scores it applies to; ``alibi_heads`` the head count an
    ALiBi term may be matched with (None: no ALiBi there); a term on 3-D scores is matched
    after ``lift`` views it on the op's [B, H, S, T] scores."""

    kind: str
    value: Value
    fill: Value | None
    rank: int
    alibi_heads: int | None


@dataclass
class MaskPlan:
    causal: bool = False
    window: int | None = None
    alibi: tuple[float, ...] | None = None
    biases: list[Value] = field(default_factory=list)


def resolved_padding_keep(facts: MaskFacts) -> bool:
    """All but a bool keep-mask for padding is resolved (masks.py sets ``padding_keep`` only
    when it is the one thing left; ``reason`` then says so)."""
    return facts.padding_keep is not None


def plan_masks(steps: list[MaskStep], b: Builder, s: Dim, t: Dim, dtype: DType,
               lift: Callable[[Value], Value] | None, report: Report, where: Node) -> MaskPlan:
    """The plan for ``steps`` (in any order); builds only the bias nodes it needs. ``lift``
    maps a term of a step on 3-D scores (``rank`` 3) to the 4-D scores of the op."""
    plan = MaskPlan()
    for step in steps:
        lift_step = lift if step.rank == 3 and lift is not None else _same
        if step.kind == "add":
            _additive(step, plan, b, s, t, dtype, lift_step, report, where)
        else:
            keep = step.kind == "keep"
            facts = analyze_bool_mask(step.value, s, t, keep)
            cond, fill = step.value, step.fill

            def as_bias(cond=cond, fill=fill, keep=keep) -> Value:
                # where(cond, fill, x) == x + where(cond, fill, 0) up to underflow
                zero = b.const(torch.tensor(0.0, dtype=fill.dtype.torch), "zero")
                return b.op("where", cond, zero, fill) if keep else b.op("where", cond, fill, zero)
            _apply_facts(facts, plan, b, dtype, lambda f=as_bias, up=lift_step: up(f()), report,
                         where)
    return plan


def additive_plan(mask: Value, b: Builder, heads: int | None, s: Dim, t: Dim, rank: int,
                  dtype: DType, report: Report, where: Node) -> MaskPlan:
    """The plan for one additive mask on scores of rank ``rank``."""
    plan = MaskPlan()
    step = MaskStep("add", mask, None, rank, heads)
    _additive(step, plan, b, s, t, dtype, lambda v: v, report, where)
    return plan


def masked_bias_steps(bias: Value, heads: int, s: Dim, t: Dim) -> list[MaskStep] | None:
    """A bias ``where(keep, X, fill)`` or ``where(masked, fill, X)`` with a fill <= -1e4 (a
    position bias with the mask folded in, as T5's decoder hands SDPA) as two steps: the
    bool mask and the term X. None when the bias is not of that form or its bool mask is not
    proven causal / window / all-keep (then the caller keeps the bias whole)."""
    n = bias.producer
    if n is None or n.op != "where":
        return None
    cond, a, c = n.inputs
    for kind, x, fill in (("keep", a, c), ("fill", c, a)):
        if not (fill.is_const and fill.const.numel() == 1 and fill.dtype.is_float
                and x.dtype.is_float and float(fill.const.reshape(-1)[0]) <= NEG_LIMIT):
            continue
        if analyze_bool_mask(cond, s, t, kind == "keep").reason is not None:
            return None
        return [MaskStep(kind, cond, fill, 4, heads), MaskStep("add", x, None, 4, heads)]
    return None


def bias_of(plan: MaskPlan, b: Builder, dtype: DType) -> Value | None:
    """The sum of the plan's bias terms in ``dtype``, or None."""
    total = None
    for v in plan.biases:
        if v.dtype != dtype:
            v = b.op("cast", v, dtype=dtype)
        total = v if total is None else b.op("add", total, v)
    return total


def _additive(step: MaskStep, plan: MaskPlan, b: Builder, s: Dim, t: Dim, dtype: DType,
              lift, report: Report, where: Node) -> None:
    """An additive term: one ALiBi summand -> the alibi attr, the rest analysed by masks.py."""
    rest: Value | None = step.value
    if step.alibi_heads is not None and plan.alibi is None:
        parts, rank = additive_summands(step.value), step.rank
        if rank == 3 and lift is not None:  # match on the op's 4-D scores, as the bias would be
            parts, rank, lift = [lift(p) for p in parts], 4, _same
        found = [(p, match_alibi(p, step.alibi_heads, s, t, rank)) for p in parts]
        alibis = [a for _, a in found if a is not None]
        if len(alibis) == 1:
            plan.alibi = alibis[0].slopes
            rest = None
            for p, a in found:
                if a is None:
                    rest = p if rest is None else b.op("add", rest, p)
        elif lift is _same:  # keep the lifted summands: they are the bias
            rest = None
            for p in parts:
                rest = p if rest is None else b.op("add", rest, p)
    if rest is None or (rest.is_const and not bool(rest.const.any())):
        return  # nothing, or adding zeros (x + 0 is x)
    _apply_facts(analyze_additive_mask(rest, s, t), plan, b, dtype, lambda: lift(rest),
                 report, where)


def _same(v: Value) -> Value:
    return v


def _apply_facts(facts: MaskFacts, plan: MaskPlan, b: Builder, dtype: DType,
                 fallback: Callable[[], Value], report: Report, where: Node) -> None:
    """Add ``facts`` to ``plan``; an unresolved mask is added to the bias as ``fallback()``."""
    resolved = facts.reason is None or resolved_padding_keep(facts)
    report(where, None if resolved else facts.reason)
    if not resolved:
        plan.biases.append(fallback())
        return
    plan.causal = plan.causal or facts.causal
    if facts.window is not None:
        plan.window = facts.window if plan.window is None else min(plan.window, facts.window)
    if facts.reason is None:
        if facts.padding is not None:
            plan.biases.append(facts.padding)
    else:  # additive padding with the dtype's most negative number, as HF builds it
        low = b.const(torch.tensor(torch.finfo(dtype.torch).min, dtype=dtype.torch), "neg_min")
        zero = b.const(torch.tensor(0.0, dtype=dtype.torch), "zero")
        plan.biases.append(b.op("where", facts.padding_keep, zero, low))


__all__ = ["MaskPlan", "MaskStep", "additive_plan", "bias_of", "masked_bias_steps",
           "plan_masks", "resolved_padding_keep"]
