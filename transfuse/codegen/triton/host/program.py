"""The runnable form of the triton target: generated host code, generated kernels, an arena.

:func:`build_program` partitions the graph (:func:`transfuse.codegen.triton.gen.partition`),
emits one Triton kernel per fusion group, plans the intermediates' memory
(:func:`transfuse.codegen.triton.memory_plan.plan_memory`), generates the host module
(:class:`.generator.HostGenerator`), compiles it and binds the constants. The result,
:class:`TritonProgram`, is called like the python target's program:
``program(flat_inputs) -> list`` of the graph outputs.

Memory. The plan's set of buffers does not depend on the symbols' values, only their sizes
do. At a call the runtime (:class:`HostRuntime`) rounds every symbol up to a power of two
(the bucket: kernels specialise per power-of-two bucket at most), plans at the bucket once
(sizes are nondecreasing in the symbols, so a bucket's plan holds every smaller call) and
cuts the arena's views at this call's shapes (cached per shape). One arena per thread, grown
when a bigger bucket needs it; graph outputs are fresh tensors (the caller keeps them).

Poisoning (tests): ``program.poison = True`` fills the arena and every fresh output with
NaN bytes (0xFF) before each call, so an element no kernel wrote shows up.

CUDA graphs: on a GPU, small generation steps (at most :data:`CUDA_GRAPH_TOKENS` tokens) are
captured once per input shape and replayed (:mod:`.cuda_graphs`); ``TRANSFUSE_CUDA_GRAPHS=0``
turns that off. Under the interpreter there is nothing to capture.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import linecache
import logging
import math
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from transfuse.codegen.python.attention import attn_position_mask
from transfuse.codegen.python.generator import comment_text
from transfuse.codegen.python.helpers import helper_namespace
from transfuse.codegen.python.program import annotate, make_ref
from transfuse.codegen.triton import env
from transfuse.codegen.triton.gen import Group, emit_group, partition
from transfuse.codegen.triton.gen.epilogue import (
    GemmEpilogue,
    emit_gemm_epilogue,
    epilogue_pairs,
)
from transfuse.codegen.triton.host.calls import HOST_CALLS
from transfuse.codegen.triton.host.cuda_graphs import CUDA_GRAPH_TOKENS, CudaGraphs
from transfuse.codegen.triton.host.generator import HostGenerator
from transfuse.codegen.triton.host.registry import LOWERINGS
from transfuse.codegen.triton.kernels.gemm import EPILOGUE_ROWS
from transfuse.codegen.triton.memory_plan import (
    Alias,
    MemoryPlan,
    arena_views,
    default_alias,
    plan_memory,
)
from transfuse.errors import LoweringError
from transfuse.ir.graph import Graph, Node

logger = logging.getLogger(__name__)

#: the value every symbol takes for the memory plan reported at build time
PLAN_HINT = 128


@dataclasses.dataclass(frozen=True)
class KernelInfo:
    """One kernel of a compiled model: ``name``, ``kind`` ("generated" for a fusion group's
    kernel, "hand-written" for ``codegen/triton/kernels``, "cublas" for torch's GEMMs),
    ``source`` (the generated kernel's text; the module path of a hand-written one) and the IR
    nodes it covers (``%out = op (from module)`` lines)."""

    name: str
    kind: str
    source: str
    nodes: tuple[str, ...]


# -- the alias rule of the host code --------------------------------------------------------


def host_alias(grouped: set[int]):
    """The memory plan's alias rule for this host: outputs of fusion groups and of triton
    host lowerings are written into planned buffers; a torch call (python emitter) returns
    its own tensor, which may alias its inputs (views: :func:`default_alias`)."""

    def rule(node: Node, index: int) -> Alias | None:
        if id(node) in grouped:
            return None
        low = LOWERINGS.get(node.op)
        if low is not None and low.refuses(node) is None:
            return None
        a = default_alias(node, index)
        if a is not None:
            return a
        return Alias.external(*(i for i, v in enumerate(node.inputs) if v is not None))

    return rule


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


class HostRuntime:
    """What the host code asks at run time: fresh outputs (``new``) and the arena's views
    (``arena``); see the module docstring."""

    def __init__(self, graph: Graph, steps: list[list[Node]], alias, names: list[str],
                 device: torch.device):
        self.graph = graph
        self.steps = steps
        self.alias = alias
        self.names = names
        self.device = device
        self.poison = False
        #: the most rows a GEMM + epilogue pair runs as its fused kernel (cuBLAS above)
        self.epilogue_rows = EPILOGUE_ROWS
        self.plans: dict[tuple, MemoryPlan] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def new(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if self.poison:
            return _nan(tuple(shape), dtype, self.device)
        return torch.empty(tuple(shape), dtype=dtype, device=self.device)

    def plan_for(self, env_: dict[str, int]) -> MemoryPlan:
        """The plan at ``env_``'s bucket (every symbol rounded up to a power of two)."""
        bucket = tuple(sorted((k, _pow2(v)) for k, v in env_.items()))
        plan = self.plans.get(bucket)
        if plan is None:
            with self._lock:
                plan = self.plans.get(bucket)
                if plan is None:
                    plan = plan_memory(self.graph, self.steps, dims=dict(bucket),
                                       alias=self.alias)
                    self.plans[bucket] = plan
        return plan

    def arena(self, env_: dict[str, int]) -> list[torch.Tensor]:
        loc = self._local
        key = tuple(sorted(env_.items()))
        cache = getattr(loc, "views", None)
        views = cache.get(key) if cache is not None else None
        if views is None:
            plan = self.plan_for(env_)
            arena = getattr(loc, "arena", None)
            if arena is None or arena.numel() < plan.arena_bytes:
                arena = loc.arena = torch.empty(max(plan.arena_bytes, 1), dtype=torch.uint8,
                                                device=self.device)
                loc.views = cache = {}
            cut = arena_views(plan, arena, dims=dict(env_))
            views = [cut[n] for n in self.names]
            if len(cache) >= 32:
                cache.clear()
            cache[key] = views
        if self.poison:
            loc.arena.fill_(255)
        return views

    @property
    def arena_tensor(self) -> torch.Tensor | None:
        """This thread's arena (None before the first call)."""
        return getattr(self._local, "arena", None)


def _nan(shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A tensor of 0xFF bytes: NaN for floats, -1 for ints, True for bool."""
    t = torch.full((math.prod(shape) * dtype.itemsize,), 255, dtype=torch.uint8, device=device)
    return t.view(dtype).view(shape) if dtype != torch.bool else t.view(torch.bool).view(shape)


# -- the program ----------------------------------------------------------------------------


class TritonProgram:
    """Host code + generated kernels for one graph: ``program(flat_inputs) -> list``.

    Attributes: ``source`` (the host module, then every generated kernel's source),
    ``host_source``, ``kernels`` (:class:`KernelInfo` list), ``partition``, ``memory_plan``
    (at :data:`PLAN_HINT` per symbol; ``runtime.plans`` holds the plans of the buckets run),
    ``device``, ``constants``, ``poison``, ``cuda_graphs`` (None off a GPU).
    """

    def __init__(self, graph: Graph, gen: HostGenerator, source: str, filename: str, code: Any,
                 constants: dict[str, torch.Tensor], device: torch.device,
                 runtime: HostRuntime, kernels: list[KernelInfo], plan: MemoryPlan,
                 part: Any):
        self.graph_name = graph.name
        self.host_source = source
        self.filename = filename
        self._code = code
        self._gen = gen
        self.constants = constants
        self.device = device
        self.runtime = runtime
        self.kernels = kernels
        self.memory_plan = plan
        self.partition = part
        self._generated = [gen.kernels[i] for i in gen.kernel_order]
        self._gemm_generated = [gen.gemm_kernels[i] for i in gen.gemm_order]
        self.gemm_why: dict[str, str] = {}
        self.reference_ops = dict(gen.reference_ops)
        self.refused = dict(gen.refused)
        self.inference_mode = True
        self._forward = self._bind()
        self.cuda_graphs = None
        if device.type == "cuda":
            self.cuda_graphs = CudaGraphs.for_graph(graph, self)

    @property
    def source(self) -> str:
        parts = [self.host_source]
        for k in self.kernels:
            if k.kind == "generated":
                parts.append(f"# ---- generated kernel {k.name}: "
                             f"{comment_text('; '.join(k.nodes))[:300]}\n{k.source}")
        return "\n\n".join(parts)

    @property
    def poison(self) -> bool:
        return self.runtime.poison

    @poison.setter
    def poison(self, value: bool) -> None:
        self.runtime.poison = bool(value)

    def _bind(self):
        namespace: dict[str, Any] = {"torch": torch, "F": F, **helper_namespace(), **HOST_CALLS,
                                     "__name__": "transfuse_triton_host"}
        exec(self._code, namespace)  # noqa: S102 - our own generated source (generator.py)
        attn_mask = functools.lru_cache(maxsize=8)(attn_position_mask)
        return namespace["_bind"](self.constants, self.device, make_ref(self._gen.refs),
                                  attn_mask, self._generated, self._gemm_generated,
                                  list(self._gen.objs), self.runtime)

    def run_eager(self, flat_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One call without CUDA graphs."""
        try:
            with torch.inference_mode():
                return self._forward(*flat_inputs)
        except Exception as e:
            self._annotate(e)
            raise

    def __call__(self, flat_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.cuda_graphs is not None and not self.poison:
            out = self.cuda_graphs.run(flat_inputs)
            if out is not None:
                return out
        return self.run_eager(flat_inputs)

    def _annotate(self, e: BaseException) -> None:
        annotate(e, self.filename, self.host_source, self._gen.line_info, "generated host code")

    def to(self, device: str | torch.device) -> TritonProgram:
        device = torch.device(device)
        if device.type != env.device():
            raise LoweringError(f"the triton target's kernels run on {env.device()} here "
                                f"({'Triton interpreter' if env.interpreting() else 'GPU'}); "
                                f"cannot move the program to {device}")
        self.constants = {k: t.to(device) for k, t in self.constants.items()}
        self.device = self.runtime.device = device
        self.runtime._local = threading.local()
        self._forward = self._bind()
        return self

    # -- what the pass log shows ------------------------------------------------------------

    def lowering_notes(self) -> list[str]:
        part = self.partition
        gen = self._gen
        fused = sum(len(g.nodes) for g in part.groups)
        saved = sum(g.bytes_saved_hint for g in part.groups)
        notes = [f"triton: {len(part.groups)} generated kernels cover {fused} nodes "
                 f"(bytes saved by fusion at {PLAN_HINT} per symbol: {saved:,} B)"]
        for g in part.groups[:40]:
            k = gen.kernels[g.id]
            notes.append(f"  kernel {k.name}: {len(g.nodes)} nodes, {g.kind}")
        if gen.gemm_order:
            notes.append(f"triton: {len(gen.gemm_order)} GEMMs fused with their pointwise "
                         f"epilogue group (the fused kernel up to {self.runtime.epilogue_rows} "
                         "rows; cuBLAS + the group's kernel above)")
        for what, why in list(self.gemm_why.items())[:20]:
            notes.append(f"  GEMM {what} not fused with an epilogue: {why}")
        host = ", ".join(f"{op} x{n}" for op, n in sorted(gen.host_ops.items()))
        notes.append(f"triton: hand-written kernels / cuBLAS: {host or 'none'}")
        if gen.torch_ops:
            notes.append("triton: torch calls in the host: " + ", ".join(
                f"{op} x{n}" for op, n in sorted(gen.torch_ops.items())))
        for op, why in sorted(self.refused.items()):
            notes.append(f"triton: {op} not on its kernel ({why}): torch runs it")
        for op, why in sorted(self.reference_ops.items()):
            notes.append(f"triton: {op} runs its reference implementation ({why})")
        why_not = []
        for n in self.partition.graph.nodes if hasattr(part, "graph") else ():
            if part.group_of(n) is None and part.reasons.get(n) and n.op not in (
                    "reshape", "permute", "expand", "slice", "split"):
                why_not.append(f"  %{n.outputs[0].name if n.outputs else '?'} ({n.op}): "
                               f"{part.why_not(n)}")
        if why_not:
            notes.append(f"triton: {len(why_not)} nodes not fused, why (first 20):")
            notes.extend(why_not[:20])
        notes.append("triton: " + self.memory_plan.summary())
        if self.cuda_graphs is not None:
            notes.append("triton: " + self.cuda_graphs.describe())
        else:
            where = ("Triton interpreter on the CPU" if env.interpreting()
                     else f"device {self.device}")
            notes.append(f"triton: CUDA graphs not used ({where})")
        return notes

    def __repr__(self) -> str:
        return (f"TritonProgram({self.filename}, {len(self._generated)} generated kernels, "
                f"device={self.device})")


def build_program(graph: Graph, device: str | torch.device | None = None) -> TritonProgram:
    """Partition, emit, plan, generate and bind (module docstring)."""
    why = env.triton_unavailable()
    if why:
        raise LoweringError(f"triton target: {why}")
    dev = torch.device(device) if device is not None else torch.device(env.device())
    if dev.type != env.device():
        mode = "Triton interpreter: no CUDA device" if env.interpreting() else "a CUDA GPU"
        raise LoweringError(f"triton target: kernels run on {env.device()} in this process "
                            f"({mode}), not on {dev}")
    part = partition(graph)
    kernels = {g.id: emit_group(g) for g in part.groups}
    pairs, gemm_why = epilogue_pairs(part)
    gemm_kernels = {}
    for p in list(pairs):
        try:
            gemm_kernels[p.group.id] = emit_gemm_epilogue(p, kernels[p.group.id])
        except LoweringError as e:
            pairs.remove(p)
            gemm_why[p.gemm] = str(e)
    units = _pair_units(part.schedule(), pairs)
    steps = [[u.gemm, *u.group.nodes] if isinstance(u, GemmEpilogue)
             else list(u.nodes) if isinstance(u, Group) else [u] for u in units]
    grouped = {id(n) for g in part.groups for n in g.nodes}
    grouped |= {id(p.gemm) for p in pairs}
    alias = host_alias(grouped)
    hint = {s: PLAN_HINT for s in sorted(graph.symbols())}
    plan = plan_memory(graph, steps, dims=hint, alias=alias)
    names = [b.name for b in plan.buffers]
    gen = HostGenerator(graph, part, kernels, names, units, gemm_kernels)
    source = gen.run()
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    filename = f"<transfuse-triton-{comment_text(graph.name)}-{digest}>"
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as e:
        raise LoweringError(f"triton backend produced invalid host source at line {e.lineno}: "
                            f"{e.msg}\n  {e.text}") from e
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    constants = {cname: graph.constants[cname].const.to(dev)
                 for cname in gen.const_names.values()}
    runtime = HostRuntime(graph, steps, alias, names, dev)
    runtime.plans[tuple(sorted((k, _pow2(v)) for k, v in hint.items()))] = plan
    infos = [KernelInfo(gen.gemm_kernels[i].name, "generated", gen.gemm_kernels[i].source,
                        tuple(gen.gemm_kernels[i].nodes)) for i in gen.gemm_order]
    infos += [KernelInfo(gen.kernels[i].name, "generated", gen.kernels[i].source,
                         tuple(gen.kernels[i].nodes)) for i in gen.kernel_order]
    for name, nodes in gen.kernel_nodes.items():
        kind = "cublas" if name.startswith("torch:") else "hand-written"
        infos.append(KernelInfo(name, kind, name, tuple(nodes)))
    if gen.reference_ops:
        logger.info("triton backend: %d node(s) of graph %s run through reference "
                    "implementations: %s", gen.reference_count, graph.name,
                    ", ".join(f"{op} ({why})" for op, why in sorted(gen.reference_ops.items())))
    program = TritonProgram(graph, gen, source, filename, code, constants, dev, runtime, infos,
                            plan, part)
    program.gemm_why = {f"%{n.outputs[0].name} ({n.op})": why for n, why in gemm_why.items()}
    return program


def _pair_units(units: list, pairs: list[GemmEpilogue]) -> list:
    """The schedule with each paired GEMM moved into its group's step (the GEMM's inputs
    exist earlier; its result is read by that group only, so running it there is legal)."""
    by_group = {id(p.group): p for p in pairs}
    gemms = {id(p.gemm) for p in pairs}
    out = []
    for u in units:
        if isinstance(u, Group) and id(u) in by_group:
            out.append(by_group[id(u)])
        elif not (isinstance(u, Node) and id(u) in gemms):
            out.append(u)
    return out


__all__ = ["TritonProgram", "HostRuntime", "KernelInfo", "build_program", "host_alias",
           "PLAN_HINT", "CUDA_GRAPH_TOKENS"]
