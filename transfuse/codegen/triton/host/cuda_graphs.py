"""CUDA graphs for small generation steps of the triton target (a GPU only).

A decode step of a few sequences launches hundreds of small kernels; on a GPU the launch
overhead of the Python host code dominates. A step of at most
:data:`CUDA_GRAPH_TOKENS` tokens is captured once per input signature (shapes,
dtypes, and the addresses of the KV caches it writes in place) and replayed: the host copies
the step's inputs into the captured ones, replays, and returns copies of the outputs.

What makes this safe:

- the arena (memory plan) of the capturing thread is kept alive by the captured entry, so a
  later, larger arena does not free memory a graph writes;
- the caches are written in place by the graph: a replay with other cache tensors (another
  engine, a reallocated pool) is a different key and is captured anew;
- a capture that fails (host code that synchronises, an unsupported op) turns capturing off
  for the program, with the reason in :meth:`CudaGraphs.describe`; calls run eagerly.

``TRANSFUSE_CUDA_GRAPHS=0`` turns capturing off. Entries are kept per signature, at most
:data:`MAX_GRAPHS` (least recently used dropped).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from transfuse.ir.graph import Graph
from transfuse.ir.opdefs.generation import MUTATED

#: captured graphs kept per program
MAX_GRAPHS = 32
#: generation steps of at most this many tokens are captured (decode steps of small batches)
CUDA_GRAPH_TOKENS = 16


class CudaGraphs:
    """Capture and replay of one program's small generation steps."""

    def __init__(self, program: Any, tokens_input: int, mutated: set[int], limit: int):
        self.program = program
        self.tokens_input = tokens_input  # flat input whose numel is the step's token count
        self.mutated = mutated  # flat inputs written in place (the caches)
        self.limit = limit
        self.entries: OrderedDict[tuple, tuple] = OrderedDict()
        self.disabled: str | None = None
        if os.environ.get("TRANSFUSE_CUDA_GRAPHS", "1") in ("0", "false", "False"):
            self.disabled = "TRANSFUSE_CUDA_GRAPHS=0"
        self.captures = 0
        self.replays = 0

    @classmethod
    def for_graph(cls, graph: Graph, program: Any) -> CudaGraphs | None:
        """The capturer of a generation step graph (None for other graphs: a prefill of a
        long prompt gains nothing from a graph)."""
        index = {id(v): i for i, v in enumerate(graph.inputs)}
        mutated: set[int] = set()
        tokens = None
        for n in graph.find("cached_attention"):
            for j in MUTATED:
                if id(n.inputs[j]) in index:
                    mutated.add(index[id(n.inputs[j])])
            for j in (6, 5):  # seq_of_token, position_ids: [N], the step's tokens
                if tokens is None and id(n.inputs[j]) in index:
                    tokens = index[id(n.inputs[j])]
        if tokens is None:
            return None
        return cls(program, tokens, mutated, CUDA_GRAPH_TOKENS)

    def describe(self) -> str:
        state = f"off ({self.disabled})" if self.disabled else (
            f"on for steps of <= {self.limit} tokens")
        return (f"CUDA graphs {state}: {self.captures} captured, {self.replays} replays, "
                f"{len(self.entries)} kept")

    def _key(self, flat: Sequence[torch.Tensor]) -> tuple:
        return tuple((tuple(t.shape), t.dtype, t.data_ptr() if i in self.mutated else 0)
                     for i, t in enumerate(flat))

    def run(self, flat: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """The outputs of a replay (capturing first when new), or None: run eagerly."""
        if self.disabled or flat[self.tokens_input].numel() > self.limit:
            return None
        key = self._key(flat)
        entry = self.entries.get(key)
        if entry is None:
            entry = self._capture(flat)
            if entry is None:
                return None
            self.entries[key] = entry
            while len(self.entries) > MAX_GRAPHS:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        graph, static_in, static_out, _arena = entry
        for i, (dst, src) in enumerate(zip(static_in, flat)):
            if i not in self.mutated:
                dst.copy_(src)
        graph.replay()
        self.replays += 1
        return [o.clone() for o in static_out]

    def _capture(self, flat: Sequence[torch.Tensor]) -> tuple | None:
        static_in = [t if i in self.mutated else t.clone() for i, t in enumerate(flat)]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up: compile kernels, cut the arena's views
                for _ in range(2):
                    self.program.run_eager(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.program.run_eager(static_in)
        except Exception as e:  # noqa: BLE001 - capturing is an optimisation: say why, run eagerly
            self.disabled = f"capture failed: {type(e).__name__}: {str(e)[:200]}"
            return None
        self.captures += 1
        # the warm-up ran the step twice on the real caches: it wrote the same K/V rows the
        # replay writes (same positions), so the caches hold what one eager call leaves
        return graph, static_in, static_out, self.program.runtime.arena_tensor


__all__ = ["CudaGraphs", "MAX_GRAPHS", "CUDA_GRAPH_TOKENS"]
