"""Python emitters of ``qlinear`` and ``qmatmul`` (``transfuse/ir/opdefs/quant.py``): the
fastest kernel per shape and per row count, by measurement.

Glossary: x [..., K] with M rows (all dims but the last), a quantized weight [N, K].

Which kernel is fastest depends on the machine and on M: torch's weight-only kernels
(tinygemm int4, ``_weight_int8pack_mm``) stream a quarter / half of the f32 weight's bytes
and win at decode rows, and lose at prefill rows, where the GEMM is compute bound and they
run on bf16 activations without f32 MKL's blocking (measured on the SmolLM2 and GPT-2 shapes,
1 thread: ``quant_kernels.py``). So for every (op, quant type, N) the plan
(:func:`plan`) times each kernel that can take the weight (``quant_timing.py``: at
:data:`ROWS` rows, remembered per machine) and keeps the fastest at 1 row (``small``), the
rows up to which it stays fastest (``rows_max``) and the fastest beyond (``large``). The
emitted call carries the three as literals::

    v7 = _qlinear(v6, w, w_scales, w_zeros, None, 'silu', 'tinygemm_int4', 16, 'dequant_f32')

and dispatches on the row count at run time (a generation step's rows are known only
then); a node whose rows are static gets the one kernel for them. The tensors a kernel needs
(tinygemm's repacked codes, int8 codes) are made once when the program is built
(:func:`prepare_program`), never per call. ``TRANSFUSE_QUANT_KERNEL`` forces a kernel
(``tinygemm_int4``) or a dispatch (``tinygemm_int4:4:dequant_f32``) where it applies (tests);
a kernel that cannot take a weight is skipped with its reason in the plan.

The built program says what it chose (``program.quant_plans``, and lines for the pass log
through ``program.lowering_notes()``): per plan the kernels, the measured times against f32,
the bf16 rounding of the weight-only kernels, and the bytes it holds.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import torch

from transfuse.codegen.python import quant_kernels, quant_timing
from transfuse.codegen.python.registry import LOWERINGS, arg
from transfuse.ir.graph import Graph, Node
from transfuse.ir.types import QuantType

#: row counts every candidate kernel is timed at: decode (1, 4), speculative/batched (16),
#: prefill (64)
ROWS = (1, 4, 16, 64)
#: forces a kernel (``name``) or a dispatch (``small:rows_max:large``) where it applies
FORCE_ENV = "TRANSFUSE_QUANT_KERNEL"

# the functions generated code calls (the one table of them: helpers.py)


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """The kernels of one (op, quant type, N, act_quant): ``small`` up to ``rows_max`` rows
    (None: for all rows), ``large`` beyond; how they were chosen, which kernels were refused
    and why, and the timings behind the choice: (rows, kernel, seconds, f32 seconds)."""

    op: str
    qtype: QuantType
    n: int
    small: str
    rows_max: int | None
    large: str
    how: str
    refused: tuple[tuple[str, str], ...] = ()
    timings: tuple[tuple[int, str, float, float], ...] = ()

    def dispatch(self, rows: int | None) -> tuple[str, int | None, str]:
        """(small, rows_max, large) for the call: resolved to one kernel when ``rows`` is
        known now."""
        if rows is None or self.rows_max is None:
            return self.small, self.rows_max, self.large
        k = self.small if rows <= self.rows_max else self.large
        return k, None, k

    def kernels(self) -> tuple[str, ...]:
        return (self.small,) if self.rows_max is None else (self.small, self.large)

    def describe(self) -> str:
        if self.rows_max is None:
            return self.small
        rows = f"{self.rows_max} row{'s' if self.rows_max > 1 else ''}"
        return f"{self.small} up to {rows}, else {self.large}"


#: (op, qtype, N, act_quant, forced, threads, use_cache) -> plan, for the process
_PLANS: dict[tuple, QuantPlan] = {}


def _forced() -> tuple[str, int | None, str] | None:
    text = os.environ.get(FORCE_ENV, "").strip()
    if not text:
        return None
    parts = text.split(":")
    if len(parts) == 1:
        return parts[0], None, parts[0]
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1]), parts[2]
    raise ValueError(f"{FORCE_ENV}={text!r}: expected KERNEL or SMALL:ROWS:LARGE "
                     f"with kernels from {sorted(quant_kernels.KERNELS)}")


def plan(op: str, qtype: QuantType, n: int, act_quant: str = "", *,
         use_cache: bool = True) -> QuantPlan:
    """The kernels for a weight of ``qtype`` with N channels (measured once per process,
    timings once per machine)."""
    forced = _forced()
    key = (op, qtype, n, act_quant, forced, torch.get_num_threads(), use_cache)
    if key not in _PLANS:
        _PLANS[key] = _make_plan(op, qtype, n, act_quant, forced, use_cache)
    return _PLANS[key]


def _make_plan(op, qt, n, act_quant, forced, use_cache) -> QuantPlan:
    names = quant_kernels.kernels_for(op)
    refused = tuple((k, why) for k in names
                    if (why := quant_kernels.refuses(k, qt, n)) is not None)
    ok = [k for k in names if k not in dict(refused)]  # the reference never refuses
    if forced is not None and forced[0] in names and forced[2] in names:
        small, rows_max, large = forced
        if small in ok and large in ok:
            return QuantPlan(op, qt, n, small, rows_max, large, f"forced by {FORCE_ENV}",
                             refused)
    if len(ok) == 1:
        return QuantPlan(op, qt, n, ok[0], None, ok[0], "the only kernel that takes it",
                         refused)
    timings, best = [], []
    for rows in ROWS:
        at, t_f32, _ = quant_timing.measure(ok, op, qt, n, rows, act_quant,
                                            use_cache=use_cache)
        timings += [(rows, k, t, t_f32) for k, t in at.items()]
        best.append(min(at, key=at.get))
    small, rows_max = best[0], None
    for rows, k in zip(ROWS, best):
        if k != small:
            large = k
            break
        rows_max = rows
    else:
        return QuantPlan(op, qt, n, small, None, small, "measured", refused, tuple(timings))
    return QuantPlan(op, qt, n, small, rows_max, large, "measured", refused, tuple(timings))


def forget() -> None:
    """Drop the in-process plans and timings (tests; the disk cache stays)."""
    _PLANS.clear()
    quant_timing.forget()


# -- emitters --------------------------------------------------------------------------------


def node_plan(node: Node) -> QuantPlan:
    """The plan of a ``qlinear`` / ``qmatmul`` node."""
    w = node.inputs[1]
    return plan(node.op, w.type.quant, w.type.shape[0], node.attrs.get("act_quant", ""))


def _static_rows(node: Node) -> int | None:
    dims = node.inputs[0].type.shape[:-1]
    return math.prod(dims) if all(isinstance(d, int) for d in dims) else None


def _supports(node: Node) -> str | None:
    w = node.inputs[1]
    if not w.is_const:
        return f"{node.op}: the quantized weight %{w.name} is not a constant"
    return None


def _call(ctx, node: Node, helper: str, args: list[str]) -> str:
    small, rows_max, large = node_plan(node).dispatch(_static_rows(node))
    lits = [ctx.lit(node.attrs.get("activation")), ctx.lit(small), ctx.lit(rows_max),
            ctx.lit(large)]
    return f"{ctx.helper(helper)}({', '.join(args + lits)})"


def _opt(ctx, node: Node, i: int) -> str:
    return ctx.name(node.inputs[i]) if len(node.inputs) > i else "None"


@LOWERINGS.register("qlinear", supports=_supports)
def _qlinear(ctx, node):
    args = [arg(ctx, node, 0), arg(ctx, node, 1), arg(ctx, node, 2), _opt(ctx, node, 3),
            _opt(ctx, node, 4)]
    return _call(ctx, node, "_qlinear", args)


@LOWERINGS.register("qmatmul", supports=_supports)
def _qmatmul(ctx, node):
    args = [arg(ctx, node, 0), arg(ctx, node, 1), arg(ctx, node, 2), _opt(ctx, node, 3),
            ctx.lit(node.attrs["act_quant"])]
    return _call(ctx, node, "_qmatmul", args)


# -- the built program: prepared tensors, plans, notes ---------------------------------------


def _quant_nodes(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op in ("qlinear", "qmatmul") and _supports(n) is None]


def _tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def prepare_program(program, graph: Graph) -> None:
    """Prepare every kernel's tensors for ``program`` (built from ``graph``) and record what
    it chose: ``program.quant_plans`` (one dict per plan: op, quant type, N, nodes, kernels,
    how, refused, timings), ``program.quant_bytes`` (canonical: the quantized constants it
    binds, shared with the graph; prepared: the kernels' own copies) and
    ``program.lowering_notes()`` (lines for the pass log). Nothing to do without quantized
    nodes."""
    nodes = _quant_nodes(graph)
    if not nodes:
        return
    consts = getattr(program, "constants", {})
    on_cpu = getattr(program, "device", None) is None or program.device.type == "cpu"
    plans: dict[QuantPlan, list[Node]] = {}
    canonical: dict[int, torch.Tensor] = {}
    prepared = 0
    for node in nodes:
        p = node_plan(node)
        plans.setdefault(p, []).append(node)
        qw_v, s_v = node.inputs[1], node.inputs[2]
        z_v = node.inputs[3] if node.op == "qlinear" and len(node.inputs) > 3 else None
        qw, s = consts.get(qw_v.name, qw_v.const), consts.get(s_v.name, s_v.const)
        z = None if z_v is None else consts.get(z_v.name, z_v.const)
        for t in (qw, s, z):
            if t is not None:
                canonical[id(t)] = t
        rows = _static_rows(node)
        small, _, large = p.dispatch(rows)
        for k in {small, large}:
            if on_cpu and quant_kernels.prepare(k, qw, s, z, qw_v.type.quant) is not None:
                prepared += quant_kernels.prepared_bytes(k, qw)
    program.quant_plans = [_plan_dict(p, ns) for p, ns in plans.items()]
    program.quant_bytes = {"canonical": _tensor_bytes(canonical.values()),
                           "prepared": prepared}
    notes = _notes(plans, program.quant_bytes, on_cpu)
    program.quant_notes = notes
    before = getattr(program, "lowering_notes", None)
    program.lowering_notes = _with_notes(before, notes)


def _with_notes(before: Callable[[], list[str]] | None, notes: list[str]):
    def lowering_notes() -> list[str]:
        return (list(before()) if before is not None else []) + list(notes)

    return lowering_notes


def _plan_dict(p: QuantPlan, nodes: list[Node]) -> dict:
    return {"op": p.op, "qtype": str(p.qtype), "n": p.n, "nodes": len(nodes),
            "sources": [n.source for n in nodes if n.source][:8],
            "small": p.small, "rows_max": p.rows_max, "large": p.large, "how": p.how,
            "refused": dict(p.refused),
            "timings": [{"rows": r, "kernel": k, "ms": t * 1e3, "f32_ms": f * 1e3}
                        for r, k, t, f in p.timings]}


def _speed(p: QuantPlan, kernel: str, rows: int) -> str:
    for r, k, t, f in p.timings:
        if r == rows and k == kernel:
            return (f"{kernel} at {rows} row{'s' if rows > 1 else ''} {t * 1e3:.3f} ms, "
                    f"{f / t:.2f}x the speed of f32 F.linear")
    return ""


def _notes(plans: dict[QuantPlan, list[Node]], nbytes: dict, on_cpu: bool) -> list[str]:
    lines = []
    bf16 = 0
    for p, ns in plans.items():
        speeds = ", ".join(s for s in (_speed(p, p.small, ROWS[0]),
                                       _speed(p, p.large, ROWS[-1])) if s)
        line = (f"{p.op} x{len(ns)} ({p.qtype}, N={p.n}): {p.describe()} [{p.how}"
                f"{'; ' + speeds if speeds else ''}]")
        if p.refused:
            line += "; not " + "; not ".join(f"{k}: {why}" for k, why in p.refused)
        lines.append(line)
        if any(quant_kernels.KERNELS[k].bf16 for k in p.kernels()):
            bf16 += len(ns)
    if bf16:
        lines.append(f"numerics: {bf16} quantized linear(s) run torch's weight-only kernels on "
                     "bf16 activations and bf16 scales (outputs differ from the f32 reference "
                     "by ~0.2-0.5% relative; TRANSFUSE_QUANT_KERNEL=dequant_f32 gives the "
                     "reference numerics)")
    lines.append(f"quantized weights: {nbytes['canonical'] / 2**20:.1f} MiB canonical (codes, "
                 f"scales, zeros; shared with the graph) + {nbytes['prepared'] / 2**20:.1f} MiB "
                 "prepared for the kernels"
                 + ("" if on_cpu else " (none: the program is not on the CPU, every quantized "
                    "linear runs the reference)"))
    return lines


__all__ = ["QuantPlan", "plan", "node_plan", "prepare_program", "forget", "ROWS", "FORCE_ENV"]
