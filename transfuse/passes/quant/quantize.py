"""quant.quantize-weights: linears with constant weights -> qlinear / qmatmul (opt-in).

Runs only with the option ``quantize`` (a scheme name or dict, :mod:`.config`); without it
the pass returns at once. Other options: ``calibration`` (a list of batches, each a list of
the graph's flat inputs; needed by int4-gptq, int4-awq and w8a8 with SmoothQuant),
``evaluation`` (batches for the end-to-end numbers; default: the calibration batches, else the
example inputs ``sample_inputs``; False: skip), ``min_sqnr`` (dB), ``progress`` (tqdm bars,
default on when stderr is a terminal), ``target`` (asked ``quant_unsupported`` and
``qmatmul_act_quant``).

Rewrites (rule ids ``quant/qlinear``, ``quant/qmatmul``)::

    %y: f32[B, S, 64] = linear(%x, %w, %b) {activation="silu"}            # @layers.0.mlp.up
  ->
    %y: f32[B, S, 64] = qlinear(%x, %w_q, %w_scales, %w_zeros, %b) {activation="silu"}

with ``%w_q: u8{int4 g64 asym k192}[64, 96]``, scales/zeros f32 [64, 192/64]; W8A8 gives
``qmatmul(%x, %w_q, %w_scales, %b) {act_quant="token"}`` with an ``int8 gK sym`` weight.
``matmul(%x, %w[K, N])`` (+ ``add`` of a constant [N] bias: GPT-2's Conv1D) becomes a
qlinear of the transposed weight. A weight shared by several linears is quantized once.
The LM head defaults to int8-weight when the body is int4; a head tied to the input
embedding gets its own quantized copy and the embedding keeps the float weight.

AWQ and SmoothQuant scale the input channels: the quantized weight is ``W * s`` and the input
``x / s``, folded into the norm before, or into the up rows of the projection before a
``swiglu`` (``smooth.py``), else a ``mul`` node (noted).

Order of work, so that nothing is half-quantized: parse the config, refuse an already
quantized graph, plan every layer (scheme, QuantType, kept-float reasons), check all explicit
groups against every layer's K, ask the target about every planned layer, require calibration
where needed — any problem is a :class:`PassError` before anything changes; then calibrate,
quantize every weight (min_sqnr may keep more layers float), and only then rewrite the graph.
The report (:mod:`.report`) goes to ``graph.meta["quant"]``, the pass record
(``record.data["quant"]``) and the notes; every layer kept float is a near miss
(``quant/keep-float``) with its reason.

Needs: ``linear`` weights [N, K] constant (near miss otherwise). Guarantees: the quantized
graph computes ``x @ dequant(Q)ᵀ`` (+ bias, activation) for each quantized layer; everything
else is unchanged; the error is measured and reported, not hidden.

Glossary: N output features, K input features, R calibration rows.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from transfuse.ir.graph import Graph, Value
from transfuse.ir.quant import (
    QuantizedWeight,
    fake_quantize,
    fake_quantize_activations,
    quantize_rtn,
    sqnr_db,
)
from transfuse.ir.types import QuantType
from transfuse.passes.base import Pass, PassContext
from transfuse.passes.fusion.merge_projections import constant_bytes
from transfuse.passes.quant.calibrate import InputStats, calibrate, check_batches, progress_bar
from transfuse.passes.quant.config import parse_quantize
from transfuse.passes.quant.evaluate import compare_logits
from transfuse.passes.quant.plan import (
    RULE_FLOAT,
    RULE_QLINEAR,
    RULE_QMATMUL,
    Plan,
    calibration_batches,
    check_target,
    plan_layers,
    refuse_quantized,
)
from transfuse.passes.quant.report import LayerReport, QuantReport
from transfuse.passes.quant.sites import find_sites
from transfuse.passes.quant.smooth import (
    fold_into_norm,
    fold_reason,
    insert_scale,
    producer_rows,
)


class QuantizeWeights(Pass):
    """Quantize linear weights (option ``quantize=``): qlinear / qmatmul; reports the error."""

    name = "quant.quantize-weights"
    rules = (RULE_QLINEAR, RULE_QMATMUL, RULE_FLOAT)
    #: the model's function changes on purpose; the error is measured and reported
    changes_function = True

    def run(self, graph: Graph, ctx: PassContext) -> None:
        spec = ctx.option("quantize")
        if spec is None or spec is False:
            return
        t0 = time.perf_counter()
        config = parse_quantize(spec)
        min_sqnr = config.min_sqnr if config.min_sqnr is not None else ctx.option("min_sqnr")
        progress = bool(ctx.option("progress", True))
        refuse_quantized(graph)
        sites, skipped = find_sites(graph)
        for node, reason in skipped:
            ctx.near_miss(RULE_FLOAT, node, reason)
        plans = plan_layers(sites, config, ctx)
        check_target(plans, ctx)
        batches = calibration_batches(graph, plans, ctx)

        # -- nothing has changed so far; from here on nothing raises by design ------------
        t1 = time.perf_counter()
        stats = self._calibrate(graph, plans, batches, progress)
        calibrate_s = time.perf_counter() - t1
        quantize_all(plans, stats, progress)
        if min_sqnr is not None:
            keep_low_sqnr(plans, float(min_sqnr))
        float_graph = graph.clone()
        bytes_before = constant_bytes(graph)
        rewrite(graph, ctx, plans)
        bytes_after = constant_bytes(graph)

        report = QuantReport(config.scheme, config.describe(), [layer_report(p) for p in plans],
                             bytes_before, bytes_after, calibrate_seconds=calibrate_s)
        if batches:
            report.calibration_batches = len(batches)
            st = next(iter(stats.values()), None)
            report.calibration_rows = st.rows if st is not None else 0
            fitted = sorted({p.spec.scheme for p in plans if p.quantized and
                             p.sqnr_on == "output" and p.spec.needs_calibration})
            if fitted:
                report.notes.append(f"output SQNR is measured on calibration rows, which "
                                    f"{', '.join(fitted)} fitted: optimistic for those layers; "
                                    f"the end-to-end numbers on held-out inputs are the honest "
                                    f"ones")
        t2 = time.perf_counter()
        logits = any(p.site.makes_logits for p in plans)
        self._evaluate(float_graph, graph, batches, ctx, report, progress, logits)
        report.evaluate_seconds = time.perf_counter() - t2
        report.seconds = time.perf_counter() - t0
        for p in plans:
            if not p.quantized:
                ctx.near_miss(RULE_FLOAT, p.site.node, f"{p.site.name} kept float: {p.kept}")
        data = report.to_json()
        graph.meta = {**graph.meta, "quant": data}  # a new dict: snapshots share the old one
        ctx.record.data["quant"] = data
        for line in report.summary().splitlines():
            ctx.note(line)

    # -- steps -----------------------------------------------------------------------------

    def _calibrate(self, graph: Graph, plans: list[Plan], batches: list | None,
                   progress: bool) -> dict[int, InputStats]:
        if not batches:
            return {}
        xs: dict[int, Value] = {}
        hess: dict[int, Value] = {}
        for p in plans:
            if p.quantized:
                xs[id(p.site.x)] = p.site.x
                if p.spec.uses_gptq:
                    hess[id(p.site.x)] = p.site.x
        return calibrate(graph, batches, list(xs.values()), hessian_for=list(hess.values()),
                         progress=progress)

    def _evaluate(self, before: Graph, after: Graph, batches: list | None, ctx: PassContext,
                  report: QuantReport, progress: bool, logits: bool) -> None:
        given = ctx.option("evaluation")
        if given is False:
            report.measured_on = "not measured (evaluation=False)"
            return
        if given is not None:
            ev, what = check_batches(before, given, "evaluation"), "the evaluation inputs"
        elif batches:
            ev, what = batches, "the calibration inputs"
        elif ctx.option("sample_inputs") is not None:
            ev, what = check_batches(before, [list(ctx.option("sample_inputs"))],
                                     "sample_inputs"), "the example inputs"
        else:
            report.measured_on = "not measured: no evaluation, calibration or example inputs"
            return
        result = compare_logits(before, after, ev, logits=logits, progress=progress)
        if isinstance(result, str):
            report.measured_on = f"not measured: {result}"
            return
        report.cosine, report.kl, report.top1 = result.cosine, result.kl, result.top1
        report.tokens = result.tokens
        report.ppl_float, report.ppl_quant = result.ppl_float, result.ppl_quant
        report.measured_on = f"{what} ({len(ev)} batch{'es' if len(ev) != 1 else ''})"


# -- quantizing (tensors only) -----------------------------------------------------------------


def quantize_all(plans: list[Plan], stats: dict[int, InputStats], progress: bool) -> None:
    """Compute each planned layer's scales and quantized weight, sharing where allowed."""
    live = [p for p in plans if p.quantized]
    by_weight: dict[int, list[Plan]] = {}
    for p in live:
        by_weight.setdefault(id(p.site.weight), []).append(p)
    # input scales: one set per (input, scheme, qtype) group of smoothing layers
    groups: dict[tuple, list[Plan]] = {}
    for p in live:
        if not p.spec.smooths:
            continue
        if len(by_weight[id(p.site.weight)]) > 1:
            p.notes.append("weight shared with another layer: not smoothed")
            continue
        st = stats.get(id(p.site.x))
        if st is None or st.rows == 0:
            p.notes.append("no calibration rows: not smoothed")
            continue
        groups.setdefault((id(p.site.x), p.spec.scheme, p.qtype), []).append(p)
    # later layers first: folding a down projection's 1/s into the up rows must happen before
    # the up projection's own search and quantization see its weight
    index = {id(p): i for i, p in enumerate(plans)}
    by_out = {id(p.site.out): p for p in plans}
    for members in sorted(groups.values(), key=lambda ms: -max(index[id(m)] for m in ms)):
        _search_scales(members, stats[id(members[0].site.x)])
        _fold_into_producer(members, by_out)
    done: dict[tuple, QuantizedWeight] = {}
    for p in progress_bar(live, "quantize: layers", progress, "layer"):
        key = (id(p.site.weight), p.spec, p.qtype)
        shared = p.scales is None and key in done
        if shared:
            p.qweight = done[key]
            p.notes.append("shares the quantized weight of an earlier layer")
        else:
            sharing = [q for q in by_weight[id(p.site.weight)] if q.spec == p.spec and
                       q.qtype == p.qtype and q.scales is None] if p.scales is None else [p]
            p.qweight = _quantize_one(p, [stats.get(id(q.site.x)) for q in sharing])
            if p.scales is None:
                done[key] = p.qweight
        _measure(p, stats.get(id(p.site.x)))


def _fold_into_producer(members: list[Plan], by_out: dict[int, Plan]) -> None:
    """Divide the rows of the linear making the members' input by their scales, if it can."""
    found = producer_rows(members[0].site.x, [m.site.node for m in members])
    if isinstance(found, str):
        return
    value, start, end = found
    prod = by_out.get(id(value))
    if prod is None or prod.site.activation is not None or prod.site.tied or \
            len(prod.site.weight.uses) != 1 or \
            (prod.site.bias is not None and not prod.site.bias.is_const):
        return
    inv = 1.0 / members[0].scales.double()
    w = prod.weight().double()
    w[start:end] *= inv[:, None]
    prod.weight_override = w.float()
    if prod.site.bias is not None:
        b = (prod.bias_override if prod.bias_override is not None
             else prod.site.bias.const.float()).double()
        b[start:end] *= inv
        prod.bias_override = b.float()
    prod.notes.append(f"rows {start}:{end} divided by the input scales of "
                      f"{', '.join(m.site.name for m in members)}")
    for m in members:
        m.folded = True
        m.notes.append(f"1/s folded into rows {start}:{end} of {prod.site.name}")


def _search_scales(members: list[Plan], st: InputStats) -> None:
    weights = [m.weight() for m in members]
    names = ", ".join(m.site.name for m in members)
    spec = members[0].spec
    if spec.scheme == "int4-awq":
        from transfuse.passes.quant.awq import awq_search_scales

        s, info = awq_search_scales(weights, st.sample, members[0].qtype, name=names)
        text = (f"AWQ scales alpha {info.get('alpha', float('nan')):.2f}" if "alpha" in info
                else "AWQ scales")
    else:
        from transfuse.passes.quant.smoothquant import search_alpha, smooth_scales

        if spec.smoothquant_search:
            s, info = search_alpha(st.abs_max, weights, st.sample, _fake_w8a8, name=names)
            text = f"SmoothQuant alpha {info['alpha']:g} (searched)"
        else:
            alpha = spec.smoothquant_alpha
            s = smooth_scales(st.abs_max, weights, alpha, name=names)
            text = f"SmoothQuant alpha {alpha:g}"
    s = s.to(torch.float32)
    for m in members:
        m.scales = s
        m.notes.append(text + (f", shared by {len(members)} layers" if len(members) > 1 else ""))


def _fake_w8a8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [R, K] @ w [N, K]ᵀ as W8A8 computes it: u8 per-token activations (the IR's dynamic
    rule), int8 symmetric per-channel weights."""
    k = w.shape[1]
    wq = fake_quantize(w, QuantType("int", 8, k, True, k))
    return fake_quantize_activations(x, per_row=True) @ wq.t()


def _quantize_one(p: Plan, stats: list[InputStats | None]) -> QuantizedWeight:
    w = p.weight()
    if p.scales is not None:
        w = w * p.scales[None, :]
    if p.spec.uses_gptq:
        from transfuse.passes.quant.gptq import gptq_quantize

        hs = [st for st in stats if st is not None and st.hessian is not None]
        h = sum(st.hessian for st in hs)
        rows = sum(st.rows for st in hs)
        if p.scales is not None:  # the layer sees x / s: H of the smoothed input
            inv = 1.0 / p.scales.to(h.dtype)
            h = h * inv[:, None] * inv[None, :]
        damp = {} if p.spec.damp is None else {"damp": float(p.spec.damp)}  # else GPTQ's
        qw, info = gptq_quantize(w, h, rows, p.qtype, **damp, act_order=bool(p.spec.act_order),
                                 integer_zeros=p.qtype.bits == 8, name=p.site.name)
        extra = []
        if info.get("dead_columns"):
            extra.append(f"{info['dead_columns']} dead columns")
        if info.get("damp_retries"):
            extra.append(f"damp raised to {info['damp']:g}")
        p.notes.append("GPTQ" + (" act_order" if p.spec.act_order else "")
                       + (f" ({', '.join(extra)})" if extra else ""))
        return qw
    if p.spec.clip_search and p.scales is not None:
        from transfuse.passes.quant.awq import awq_search_clip

        x = stats[0].sample / p.scales[None, :]
        clip = awq_search_clip(w, x, p.qtype, name=p.site.name)
        p.notes.append("AWQ clip search")
        return quantize_rtn(w, p.qtype, clip, integer_zeros=p.qtype.bits == 8)
    # int8: integer zero points (the kernels' packed u8 form; at 256 levels rounding the zero
    # costs nothing measurable); int4: each group's exact min/max grid (ir/quant.quant_params)
    return quantize_rtn(w, p.qtype, integer_zeros=p.qtype.bits == 8)


def _measure(p: Plan, st: InputStats | None) -> None:
    """The layer's SQNR: of its output on calibration rows, else of its weight."""
    w = p.weight()
    deq = p.qweight.dequantize()
    if p.scales is not None:
        deq = deq / p.scales[None, :]
    if st is not None and st.sample is not None and st.sample.shape[0]:
        x = st.sample  # f32 products: ~1e-7 relative, far below the noise measured
        ref = x @ w.T
        xq = x
        if p.spec.op == "qmatmul":
            xs = x / p.scales[None, :] if p.scales is not None else x
            xq = fake_quantize_activations(xs, per_row=p.act_quant == "token")
            if p.scales is not None:
                xq = xq * p.scales[None, :]
        p.sqnr, p.sqnr_on = sqnr_db(ref, xq @ deq.T), "output"
    else:
        p.sqnr, p.sqnr_on = sqnr_db(w, deq), "weight"


def keep_low_sqnr(plans: list[Plan], min_sqnr: float) -> None:
    for p in plans:
        if p.quantized and p.sqnr is not None and p.sqnr < min_sqnr:
            p.kept = f"{p.sqnr_on} SQNR {p.sqnr:.1f} dB < min_sqnr {min_sqnr:g} dB"


# -- the rewrite -------------------------------------------------------------------------------


def rewrite(graph: Graph, ctx: PassContext, plans: list[Plan]) -> None:
    """Apply the input scales, then replace each quantized site by qlinear / qmatmul."""
    live = [p for p in plans if p.quantized]
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    new_input: dict[int, Value] = {}
    groups: dict[int, list[Plan]] = {}
    for p in live:
        if p.scales is not None and not p.folded:
            groups.setdefault(id(p.scales), []).append(p)
    muls = 0
    for p in plans:
        if not p.quantized and p.folded:  # its input is x / s now (min_sqnr kept it float)
            node = p.site.node
            c = graph.add_constant(p.scales.to(p.site.x.dtype.torch), f"{p.site.x.name}_rescale")
            mul = graph.create("mul", [node.inputs[0], c], before=node,
                               meta={"source": node.source} if node.source else None)
            graph.set_input(node, 0, mul.output)
            p.notes.append("its input is x / s (folded for the other layers): a mul by s "
                           "restores it")
            muls += 1
        elif not p.quantized and p.weight_override is not None:
            _write_float(graph, p)
    for members in groups.values():
        x = members[0].site.x
        nodes = [m.site.node for m in members]
        reason = fold_reason(x, nodes)
        if reason is None:
            norm = fold_into_norm(graph, x, members[0].scales)
            for m in members:
                m.notes.append(f"1/s folded into {norm.op} @{norm.source or '?'}")
        else:
            first = min(nodes, key=lambda n: order.get(id(n), 0))
            mul = insert_scale(graph, x, members[0].scales, first)
            muls += 1
            for m in members:
                new_input[id(m)] = mul.output
                m.notes.append(f"1/s as a mul node ({reason})")
    if muls:
        ctx.note(f"quantize: {muls} mul node(s) by 1/s inserted where the scales could not be "
                 f"folded into a norm")
    made: dict[int, tuple[Value, Value, Value | None]] = {}
    for p in live:
        _replace(graph, ctx, p, new_input.get(id(p)), made)


def _replace(graph: Graph, ctx: PassContext, p: Plan, x: Value | None,
             made: dict[int, tuple[Value, Value, Value | None]]) -> None:
    s = p.site
    x = x if x is not None else s.node.inputs[0]  # current input (a folded norm is new)
    consts = made.get(id(p.qweight))
    if consts is None:
        base = s.weight.name
        qw = p.qweight
        consts = (graph.add_constant(qw.qweight, f"{base}_q", quant=qw.qtype),
                  graph.add_constant(qw.scales, f"{base}_scales"),
                  None if qw.zeros is None else graph.add_constant(qw.zeros, f"{base}_zeros"))
        made[id(p.qweight)] = consts
    qweight, scales, zeros = consts
    meta: dict[str, Any] = {"quant_layer": s.name}
    if s.source:
        meta["source"] = s.source
    bias = s.bias
    if p.bias_override is not None:
        bias = graph.add_constant(p.bias_override.to(s.bias.dtype.torch), f"{s.bias.name}_scaled")
    if p.spec.op == "qmatmul":
        inputs = [x, qweight, scales, bias]
        attrs = {"act_quant": p.act_quant, "activation": s.activation}
        rule = RULE_QMATMUL
    else:
        inputs = [x, qweight, scales, zeros, bias]
        attrs = {"activation": s.activation}
        rule = RULE_QLINEAR
    while inputs[-1] is None:
        inputs.pop()
    node = graph.create(p.spec.op, inputs, attrs, meta=meta, before=s.node)
    matched = [s.node] + ([s.bias_add] if s.bias_add is not None else [])
    ctx.rewrite(rule, matched, [node])
    graph.replace_all_uses(s.out, node.output)
    if s.bias_add is not None:
        graph.erase(s.bias_add)
    graph.erase(s.node)
    _drop_if_unused(graph, s.weight)
    if s.bias is not None:
        _drop_if_unused(graph, s.bias)


def _write_float(graph: Graph, p: Plan) -> None:
    """A float layer whose rows were rescaled for a fold: new weight (and bias) constants."""
    s = p.site
    w = p.weight_override.T if s.transposed else p.weight_override
    new_w = graph.add_constant(w.to(s.weight.dtype.torch).contiguous(), f"{s.weight.name}_scaled")
    graph.set_input(s.node, 1, new_w)
    _drop_if_unused(graph, s.weight)
    if p.bias_override is not None:
        new_b = graph.add_constant(p.bias_override.to(s.bias.dtype.torch), f"{s.bias.name}_scaled")
        holder = s.bias_add or s.node
        i = next(i for i, v in enumerate(holder.inputs) if v is s.bias)
        graph.set_input(holder, i, new_b)
        _drop_if_unused(graph, s.bias)


def _drop_if_unused(graph: Graph, c: Value) -> None:
    if c.is_const and not c.uses and not any(o is c for o in graph.outputs) and \
            graph.constants.get(c.name) is c:
        del graph.constants[c.name]


def layer_report(p: Plan) -> LayerReport:
    s = p.site
    lr = LayerReport(s.name, p.op if p.quantized else s.node.op,
                     p.spec.scheme if p.quantized else "float", [s.n, s.k],
                     float_bytes=s.weight.const.numel() * s.weight.const.element_size(),
                     sqnr_db=p.sqnr, sqnr_on=p.sqnr_on, notes=list(p.notes))
    if s.is_head:
        lr.notes.insert(0, "LM head")
    if p.act_quant:
        lr.notes.append(f"act_quant {p.act_quant}")
    if p.quantized:
        lr.bits, lr.group, lr.symmetric = p.qtype.bits, p.qtype.group, p.qtype.symmetric
        lr.quant_bytes = p.qweight.nbytes
    else:
        lr.kept_float = p.kept
        lr.quant_bytes = lr.float_bytes
    return lr


__all__ = ["QuantizeWeights", "quantize_all", "rewrite"]
