"""Calibration: run the float graph on the user's batches and collect what each quantized
layer needs to know about its input.

``calibrate(graph, batches, values)`` runs the reference interpreter
(:func:`transfuse.ir.interpret.interpret` with ``observe=``) on every batch (a list of flat
graph inputs) and, for each watched value X (the input of one or more linears; rows are all
dims but the last, K features), accumulates :class:`InputStats`:

- ``hessian``: ``sum over rows of x xᵀ`` [K, K] in float64 (GPTQ; only for values asked),
- ``abs_mean`` / ``abs_max``: mean and max of ``|x|`` per channel [K] (AWQ, SmoothQuant),
- ``sample``: a uniform random sample of at most ``sample_rows`` rows [R, K] f32 (AWQ's
  searches, output SQNR), drawn with a seeded generator (reservoir by random priorities).

Batches are checked against the graph's inputs first (count, dtype, rank, fixed dims):
:class:`InputError` naming the batch and input. A progress bar (tqdm) shows the batches,
unless ``progress=False`` or stderr is not a terminal.

Needs: nothing changes the graph while it runs. Guarantees: the graph is not touched; the
statistics are deterministic for a given seed.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import torch

from transfuse.errors import InputError
from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.interpret import bind_symbols, interpret
from transfuse.ir.types import DType

#: rows kept per calibrated input for searches and SQNR
SAMPLE_ROWS = 512


@dataclasses.dataclass
class InputStats:
    """Statistics of one layer input X over all calibration rows."""

    k: int
    rows: int = 0
    hessian: torch.Tensor | None = None  # f64 [K, K]: sum of x xᵀ
    abs_sum: torch.Tensor | None = None  # f64 [K]
    abs_max: torch.Tensor | None = None  # f32 [K]
    sample: torch.Tensor | None = None  # f32 [R, K]
    _priority: torch.Tensor | None = None

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean |x| per channel [K] (f32)."""
        return (self.abs_sum / max(self.rows, 1)).to(torch.float32)

    def add(self, x: torch.Tensor, *, hessian: bool, cap: int, gen: torch.Generator) -> None:
        """Accumulate the rows of ``x`` [..., K]."""
        rows = x.detach().reshape(-1, self.k).to(torch.float32)
        if rows.shape[0] == 0:
            return
        self.rows += rows.shape[0]
        a = rows.abs()
        s, m = a.sum(0, dtype=torch.float64), a.amax(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        if hessian:
            r64 = rows.double()
            h = r64.T @ r64
            self.hessian = h if self.hessian is None else self.hessian + h
        prio = torch.rand(rows.shape[0], generator=gen)
        if self.sample is not None:
            rows = torch.cat([self.sample, rows])
            prio = torch.cat([self._priority, prio])
        if rows.shape[0] > cap:
            keep = prio.topk(cap).indices.sort().values
            rows, prio = rows[keep], prio[keep]
        self.sample, self._priority = rows.contiguous(), prio


def check_batches(graph: Graph, batches: Sequence, what: str = "calibration") -> list[list]:
    """The batches as lists of tensors, checked against the graph inputs (InputError)."""
    if isinstance(batches, torch.Tensor) or not isinstance(batches, (list, tuple)):
        raise InputError(f"{what}: expected a list of batches (each a list of the graph's "
                         f"{len(graph.inputs)} inputs), got {type(batches).__name__}")
    out = []
    for i, batch in enumerate(batches):
        if isinstance(batch, torch.Tensor):
            batch = [batch]
        if not isinstance(batch, (list, tuple)):
            raise InputError(f"{what} batch {i}: expected a list of tensors, got "
                             f"{type(batch).__name__}")
        batch = list(batch)
        for v, t in zip(graph.inputs, batch):
            if isinstance(t, torch.Tensor) and DType.from_torch(t.dtype) != v.dtype:
                raise InputError(f"{what} batch {i}: input {v.name} must be {v.type}, got "
                                 f"{DType.from_torch(t.dtype).value}{list(t.shape)}")
        try:
            bind_symbols(graph, batch)
        except InputError as e:
            raise InputError(f"{what} batch {i}: {e}") from None
        out.append(batch)
    return out


def progress_bar(items: Sequence, desc: str, enabled: bool, unit: str):
    """``items`` wrapped in a tqdm bar when enabled, stderr is a terminal and tqdm exists."""
    if not enabled or not sys.stderr.isatty():
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return items
    return tqdm(items, desc=desc, unit=unit, leave=False)


def calibrate(graph: Graph, batches: Sequence, values: Sequence[Value], *,
              hessian_for: Sequence[Value] = (), sample_rows: int = SAMPLE_ROWS,
              progress: bool = True, seed: int = 0) -> dict[int, InputStats]:
    """Statistics of ``values`` over ``batches``, keyed by ``id(value)``."""
    batches = check_batches(graph, batches)
    stats = {id(v): InputStats(int(v.type.shape[-1])) for v in values}
    want_h = {id(v) for v in hessian_for}
    gen = torch.Generator().manual_seed(seed)
    inputs = {id(v): i for i, v in enumerate(graph.inputs)}

    def observe(node: Node, args: list, outs: list) -> None:
        for v, t in zip(node.outputs, outs):
            st = stats.get(id(v))
            if st is not None:
                st.add(t, hessian=id(v) in want_h, cap=sample_rows, gen=gen)

    for batch in progress_bar(batches, "quantize: calibrating", progress, "batch"):
        for v in values:
            if id(v) in inputs:
                stats[id(v)].add(batch[inputs[id(v)]], hessian=id(v) in want_h,
                                 cap=sample_rows, gen=gen)
        interpret(graph, batch, observe=observe)
    return stats


__all__ = ["InputStats", "calibrate", "check_batches", "progress_bar", "SAMPLE_ROWS"]
