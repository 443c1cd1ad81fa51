"""Planning quantization: what each layer becomes, checked before anything changes.

:func:`plan_layers` gives every :class:`~.sites.Site` a :class:`Plan` (its
:class:`~.config.LayerSpec`, QuantType, or why it stays float) and raises one
:class:`PassError` listing every layer an explicit group does not fit;
:func:`check_target` picks W8A8's activation granularity and asks the target about every
planned layer; :func:`calibration_batches` requires calibration where a scheme needs it;
:func:`refuse_quantized` refuses a graph quantized already. Nothing here mutates the graph.
"""

from __future__ import annotations

import dataclasses

import torch

from transfuse.errors import PassError
from transfuse.ir.graph import Graph
from transfuse.ir.quant import QuantizedWeight
from transfuse.ir.types import QuantType
from transfuse.passes.base import PassContext
from transfuse.passes.quant.calibrate import check_batches
from transfuse.passes.quant.config import LayerSpec, QuantConfig
from transfuse.passes.quant.sites import Site

RULE_QLINEAR = "quant/qlinear"
RULE_QMATMUL = "quant/qmatmul"
RULE_FLOAT = "quant/keep-float"
#: act_quant when no target object says what it runs exactly
DEFAULT_ACT_QUANT = ("token",)


@dataclasses.dataclass
class Plan:
    """What happens to one site."""

    site: Site
    spec: LayerSpec | None
    why: str
    qtype: QuantType | None = None
    act_quant: str | None = None
    kept: str | None = None  # why the layer stays float
    scales: torch.Tensor | None = None  # AWQ / SmoothQuant input scales s [K]
    qweight: QuantizedWeight | None = None
    sqnr: float | None = None
    sqnr_on: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    #: the input scales are folded into the rows of the linear that makes the input
    folded: bool = False
    #: f32 [N, K] / [N]: this layer's weight and bias with rows divided by a later layer's
    #: input scales (AWQ / SmoothQuant folded into it); None: the graph's own
    weight_override: torch.Tensor | None = None
    bias_override: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.kept is None

    def weight(self) -> torch.Tensor:
        """The f32 [N, K] weight to quantize (with rows rescaled when a fold asked for it)."""
        return self.weight_override if self.weight_override is not None else \
            self.site.weight_nk()

    @property
    def op(self) -> str:
        return self.spec.op if self.spec is not None else "linear"


# -- planning (never mutates) ------------------------------------------------------------------


def refuse_quantized(graph: Graph) -> None:
    """PassError when the graph already holds quantized layers or weights."""
    nodes = [n for n in graph.nodes if n.op in ("qlinear", "qmatmul")]
    consts = [v for v in graph.constants.values() if v.type.quant is not None]
    if nodes or consts:
        where = ", ".join(sorted({n.source or n.op for n in nodes})[:5]) or \
            ", ".join(f"%{v.name}" for v in consts[:5])
        raise PassError(f"quantize: the graph is already quantized ({len(nodes)} qlinear/qmatmul "
                        f"nodes, {len(consts)} quantized weights: {where}); quantize the float "
                        f"model instead")


def plan_layers(sites: list[Site], config: QuantConfig, ctx: PassContext) -> list[Plan]:
    """A plan per site; PassError listing every explicit group that does not fit its layer."""
    plans: list[Plan] = []
    errors: list[str] = []
    calibrated = _calibration_given(ctx)
    for s in sites:
        spec, why = config.spec_for([s.name, s.source], s.is_head)
        if spec is not None:
            spec = spec.resolved(calibrated)
        ctx.attempt(RULE_QMATMUL if spec is not None and spec.op == "qmatmul" else RULE_QLINEAR)
        plan = Plan(s, spec, why)
        plans.append(plan)
        if spec is None:
            plan.kept = why
            continue
        group, problem = spec.group_for(s.k)
        if problem:
            if spec.group is not None:
                errors.append(f"{s.name} (K={s.k}): {problem}")
            else:
                plan.kept = problem
            continue
        plan.qtype = QuantType("fp8e4m3" if spec.scheme == "fp8" else "int", spec.bits, group,
                               spec.is_symmetric, s.k)
        if spec.group is None and spec.bits == 4 and group != 128:
            plan.notes.append(f"group {group} (K={s.k} is not a multiple of 128)")
    if errors:
        raise PassError("quantize: group does not fit these layers (nothing was changed):\n  "
                        + "\n  ".join(errors))
    for p in plans:
        if p.site.tied and p.quantized:
            users = ", ".join(sorted({f"{g.op} @{g.source or '?'}" for g in p.site.tied}))
            p.notes.append(f"tied: {users} keeps the float weight; this layer gets its own "
                           f"quantized copy")
    return plans


def check_target(plans: list[Plan], ctx: PassContext) -> None:
    """Pick W8A8's act_quant and ask the target about every planned layer (PassError)."""
    target = ctx.target_info
    prefs = tuple(getattr(target, "qmatmul_act_quant", None) or DEFAULT_ACT_QUANT)
    ask = getattr(target, "quant_unsupported", None)
    refused: dict[str, list[str]] = {}
    for p in plans:
        if not p.quantized:
            continue
        if p.spec.op == "qmatmul":
            want = p.spec.act_quant
            if want is not None and want not in prefs:
                raise PassError(f"quantize: target {ctx.target!r} runs qmatmul with act_quant "
                                f"{', '.join(prefs)} only, not {want!r} ({p.site.name})")
            p.act_quant = want or prefs[0]
            if p.act_quant == "tensor" and ctx.option("generation") is not None:
                raise PassError(
                    f"quantize: act_quant 'tensor' in a generation step ({p.site.name}) would "
                    "give all the requests of a step one activation scale, so each request's "
                    "output would depend on the others; use act_quant 'token'")
        if ask is not None:
            reason = ask(p.qtype, p.spec.op)
            if reason:
                refused.setdefault(f"{p.spec.op} {p.qtype.name}: {reason}", []).append(
                    p.site.name)
    if refused:
        lines = [f"{why} (layers {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
                 for why, names in refused.items()]
        raise PassError(f"quantize: target {ctx.target!r} cannot run the quantized layers "
                        f"(nothing was changed): " + "; ".join(lines))


def calibration_batches(graph: Graph, plans: list[Plan], ctx: PassContext) -> list | None:
    """The checked calibration batches; PassError when a planned scheme needs them."""
    if not _calibration_given(ctx):
        needing = sorted({p.spec.scheme for p in plans if p.quantized and
                          p.spec.needs_calibration})
        if needing:
            raise PassError(f"quantize: {', '.join(needing)} needs calibration data: pass "
                            "calibration= (a list of input batches, e.g. token ids [B, S]) to "
                            "optimize; int8-weight (without gptq=True), int4-weight and fp8 "
                            "need none"
                            + (" (w8a8 without SmoothQuant: smoothquant=0)"
                               if "w8a8" in needing else ""))
        return None
    return check_batches(graph, ctx.option("calibration"))


def _calibration_given(ctx: PassContext) -> bool:
    """Whether ``calibration=`` holds batches (None and an empty list do not)."""
    given = ctx.option("calibration")
    return given is not None and not (isinstance(given, (list, tuple)) and not given)


__all__ = ["Plan", "plan_layers", "check_target", "calibration_batches", "refuse_quantized",
           "RULE_QLINEAR", "RULE_QMATMUL", "RULE_FLOAT"]
