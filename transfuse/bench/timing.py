"""Interleaved timing: warm up every contestant, then run rounds A B C A B C ...

Ratios are only meaningful side by side in one process (machines are noisy),
so every contestant is timed in the same loop; we report the median and the
interquartile range of each (../shared/BENCHMARKING.md).

On a CUDA device each sample is timed with a pair of CUDA events around the
call and the stream is synchronised after it, so a sample is device time, not
launch time.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping

import torch


def quartiles(samples: list[float]) -> tuple[float, float, float]:
    """(Q1, median, Q3) of ``samples``; inclusive method (Q1 = Q3 = median below 4 samples)."""
    if not samples:
        raise ValueError("no samples")
    med = statistics.median(samples)
    if len(samples) < 4:
        return med, med, med
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, med, q3


@dataclasses.dataclass
class Timing:
    name: str
    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def q1_ms(self) -> float:
        return quartiles(self.samples_ms)[0]

    @property
    def q3_ms(self) -> float:
        return quartiles(self.samples_ms)[2]

    @property
    def iqr_ms(self) -> float:
        """Interquartile range Q3 - Q1 (0 below 4 samples)."""
        q1, _, q3 = quartiles(self.samples_ms)
        return q3 - q1


def _cpu_clock(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _cuda_clock(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def interleaved(fns: Mapping[str, Callable[[], object]], *, rounds: int = 10,
                warmup: int = 2, device: str | torch.device = "cpu",
                on_round: Callable[[int], None] | None = None) -> dict[str, Timing]:
    """Time each zero-argument callable ``rounds`` times, interleaved, after ``warmup`` calls.

    ``device="cuda"`` times with CUDA events; ``on_round(i)`` is called after round ``i``
    (a progress hook).
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    if warmup < 0:
        raise ValueError("warmup must be >= 0")
    cuda = torch.device(device).type == "cuda"
    clock = _cuda_clock if cuda else _cpu_clock
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        if cuda:
            torch.cuda.synchronize()
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(rounds):
            for name, fn in fns.items():
                samples[name].append(clock(fn))
            if on_round is not None:
                on_round(i)
    return {k: Timing(k, v) for k, v in samples.items()}
