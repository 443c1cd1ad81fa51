"""``layout.select-gemm``: pick the faster CPU GEMM library for each linear, by measuring.

Glossary: x [M, K] times a weight [N, K] gives [M, N]; M is the product of x's
leading dims at the sample inputs' sizes.

Two libraries can run a CPU float32 ``linear`` in the python backend: torch's own (MKL in
the CPU wheels, weight [N, K]) and numpy's OpenBLAS on the weight stored K-major
(``codegen/python/blas.py``). The pass asks the target (``ctx.target_info``, see
:class:`~transfuse.passes.base.TargetInfo`) which libraries exist, whether they and the
native kernels can run here, and what each costs on a shape; it imports no backend. Which
is faster depends on the shape and the machine, so this pass measures rather than guesses:
for every distinct (M, K, N, bias) among the graph's linears it times both on up to
:data:`MAX_TIMED_WEIGHTS` of the graph's own weights of that shape, one after the other
(so they stream from memory as in a forward pass; with one weight hot in cache the
comparison came out differently than in the model), at M capped to :data:`MAX_TIMED_ROWS`
rows to bound compile time. It sets the nodes' ``gemm`` attribute to ``"blas"`` when
OpenBLAS is faster by more than ``select_gemm_margin`` (default 3%, above timing noise);
otherwise they stay ``"torch"``. The pass log has one line per shape with both GFLOP/s and
the choice. The target keeps timings for the process (keyed by shape and torch's thread
count) and on disk for the machine (``codegen/python/gemm_cache.py``:
``~/.cache/transfuse``), so compiling the same shapes again costs nothing.

A weight read by anything other than ``linear`` weights (a tied embedding) cannot be
stored K-major without slowing its other reader; its linears are timed with OpenBLAS
reading the [N, K] weight as a transposed operand instead.

The attribute selects a library, never the math: both compute the same fp32
product (last-bit differences, as between two BLAS builds). It lives in the
graph, so a saved artifact loads with the same choice and the same outputs (the
backend re-derives the K-major storage from it).

Runs only where the measurement means something: a target with GEMM libraries to choose
from (``python``; other backends bring their own GEMMs, and without a target object in
the context there is nobody to ask), sample inputs and weights on the CPU in
float32, numpy's BLAS being OpenBLAS with a controllable thread pool. Elsewhere
it records why it did nothing.

Options: ``gemm``: ``"auto"`` (measure, default), ``"torch"`` (leave every linear
on torch), ``"blas"`` (every eligible linear on OpenBLAS, no timing);
``select_gemm_margin`` (0.03); ``select_gemm_min_columns`` (0: only linears with at
least this many output columns are timed);
``select_gemm_budget_s`` (total seconds of timing, 20: shapes left when it runs out
keep torch and are listed); ``select_gemm_cache`` (True: read and write the timing file).
"""

from __future__ import annotations

import time

import torch

from transfuse.errors import PassError
from transfuse.ir.graph import Graph, Node
from transfuse.ir.interpret import bind_symbols
from transfuse.ir.types import eval_dim
from transfuse.passes.base import Pass, PassContext, TargetInfo
from transfuse.passes.convert.error_report import sample_inputs
from transfuse.passes.registry import register_pass

RULE = "layout/select-gemm"

#: below this many flops per call the library call overhead dominates; stay on torch
MIN_FLOPS = 2e6

#: distinct weights of one shape timed together (streamed, as in a forward pass)
MAX_TIMED_WEIGHTS = 3
#: rows of x when timing (M above this is timed at this)
MAX_TIMED_ROWS = 64


@register_pass
class SelectGemm(Pass):
    """Time torch vs OpenBLAS on each linear's shape; record the faster as ``gemm``."""

    name = "layout.select-gemm"
    rules = (RULE,)

    def run(self, graph: Graph, ctx: PassContext) -> None:
        mode = ctx.option("gemm", "auto")
        if mode not in ("auto", "torch", "blas"):
            raise PassError(f"option gemm must be 'auto', 'torch' or 'blas', got {mode!r}")
        linears = [n for n in graph.nodes if n.op == "linear"]
        if not linears or mode == "torch":
            return
        target = ctx.target_info
        if target is None or "blas" not in target.gemm_libraries:
            how = ("it brings its own GEMMs" if target is not None else
                   "no target object in the pass context to ask")
            ctx.note(f"{RULE}: nothing to choose for target {ctx.target!r} ({how})")
            return
        why = target.gemm_unavailable()
        if why is not None:
            ctx.note(f"{RULE}: OpenBLAS path unavailable: {why}; every linear stays on torch")
            return
        samples = sample_inputs(graph, ctx)  # the caller's, else random ones of the graph's sizes
        if any(t.device.type != "cpu" for t in samples if isinstance(t, torch.Tensor)):
            ctx.note(f"{RULE}: sample inputs are not on the CPU; every linear stays on torch")
            return
        threads = torch.get_num_threads()
        no_native = target.native_kernels_unavailable() if mode == "auto" and threads > 1 else None
        if no_native is not None:
            # between two OpenBLAS GEMMs the torch ops' OpenMP threads spin, and the other way
            # round: measured on 2 cores, llama-small seq 256, 2 threads, the blas choice with
            # the torch elementwise/attention path 1251 ms vs eager 561 (with the native
            # kernels, which run on their own pool, 511)
            ctx.note(f"{RULE}: {threads} threads without the native kernels "
                     f"({no_native}): OpenBLAS's threads and torch's OpenMP threads "
                     "would spin against each other between ops; every linear stays on torch")
            return
        try:
            env = bind_symbols(graph, samples)
        except Exception as e:  # samples that do not fit: no sizes to time at
            ctx.note(f"{RULE}: cannot size the GEMMs from the sample inputs ({e}); "
                     "every linear stays on torch")
            return

        budget = float(ctx.option("select_gemm_budget_s", 20.0))
        margin = float(ctx.option("select_gemm_margin", 0.03))
        min_cols = int(ctx.option("select_gemm_min_columns", 0))
        use_cache = bool(ctx.option("select_gemm_cache", True))
        deadline = time.perf_counter() + budget
        groups: dict[tuple, list[tuple[Node, torch.Tensor]]] = {}
        for node in linears:
            ctx.attempt(RULE)
            shape = self._shape(node, env)
            if isinstance(shape, str):
                ctx.near_miss(RULE, node, shape)
                continue
            m, k, n, w, b = shape
            key = (m, k, n, b is not None, target.gemm_relayout_eligible(node.inputs[1]))
            groups.setdefault(key, []).append((node, w, b))
        for key, members in groups.items():
            m, k, n, _, relayout = key
            if mode == "blas":
                choice = "blas"
            elif n < min_cols:
                choice = "torch"
                ctx.note(f"{RULE}: M={m} K={k} N={n}: not timed (N < {min_cols}); torch")
            elif m * k * n * 2 < MIN_FLOPS:
                choice = "torch"
                ctx.note(f"{RULE}: M={m} K={k} N={n}: too small to time "
                         f"({2 * m * k * n:.0f} flops); torch")
            elif time.perf_counter() > deadline:
                choice = "torch"
                ctx.note(f"{RULE}: M={m} K={k} N={n}: timing budget ({budget:g} s) spent; torch")
            else:
                weights = []
                for _, w, _ in members:  # distinct tensors only (a shared weight counts once)
                    if all(w is not o for o in weights):
                        weights.append(w)
                choice = self._measure(ctx, target, m, weights[:MAX_TIMED_WEIGHTS],
                                       members[0][2], margin, relayout, use_cache)
            for node, _, _ in members:
                if choice != node.attrs.get("gemm", "torch"):
                    node.attrs["gemm"] = choice
                    ctx.count(RULE)
                    ctx.mark_changed()
        relaid = {id(n.inputs[1]): n.inputs[1] for n in linears
                  if target.gemm_weight_relaid(n.inputs[1])}
        if relaid:
            mb = sum(v.const.numel() * v.const.element_size() for v in relaid.values()) / 2**20
            ctx.note(f"{RULE}: the python backend stores {len(relaid)} weight(s) K-major "
                     f"({mb:.1f} MB): a copy of each one that the source model still holds "
                     "(options={'gemm': 'torch'} keeps sharing the model's weights)")

    @staticmethod
    def _shape(node: Node, env: dict[str, int]):
        """(M, K, N, weight, bias) at the sample sizes, or the reason the node is skipped."""
        w = node.inputs[1]
        b = node.inputs[2] if len(node.inputs) > 2 else None
        if not w.is_const or w.const.dim() != 2:
            return "weight is not a constant 2-D tensor"
        if w.const.dtype is not torch.float32 or w.const.device.type != "cpu":
            return f"weight is {w.const.dtype} on {w.const.device}, not float32 on the CPU"
        if node.inputs[0].type.dtype.name != "f32":
            return f"input is {node.inputs[0].type.dtype.name}, not f32"
        if b is not None and not b.is_const:
            return "bias is not a constant"
        m = 1
        for d in node.inputs[0].type.shape[:-1]:
            try:
                m *= int(eval_dim(d, env))
            except Exception:  # noqa: BLE001 - a dim we cannot evaluate: skip the node
                return f"dim {d} of the input has no value at the sample sizes"
        n, k = w.const.shape
        return m, k, n, w.const, (b.const if b is not None else None)

    @staticmethod
    def _measure(ctx: PassContext, target: TargetInfo, m: int, weights: list, b,
                 margin: float, relayout: bool, use_cache: bool) -> str:
        rows = min(m, MAX_TIMED_ROWS)
        n, k = weights[0].shape
        t, source = target.time_gemm(rows, weights, b, relayout=relayout, use_cache=use_cache)
        choice = "blas" if t.blas_s < t.torch_s * (1.0 - margin) else "torch"
        layout = "K-major" if relayout else "[N, K] transposed"
        ctx.note(f"{RULE}: M={m} K={k} N={n}{' +bias' if b is not None else ''}"
                 f" (timed at M={rows}, {len(weights)} weight(s)): torch "
                 f"{t.gflops('torch'):.1f} GFLOP/s, OpenBLAS {layout} {t.gflops('blas'):.1f} "
                 f"GFLOP/s -> {choice}{source}")
        return choice
