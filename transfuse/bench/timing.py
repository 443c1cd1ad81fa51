"""Interleaved timing: warm up every contestant, then run rounds A B C A B C ...

Ratios are only meaningful side by side in one process (machines are noisy),
so every contestant is timed in the same loop; we report the median and the
interquartile range of each.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping

import torch


@dataclasses.dataclass
class Timing:
    name: str
    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def iqr_ms(self) -> float:
        if len(self.samples_ms) < 4:
            return 0.0
        q = statistics.quantiles(self.samples_ms, n=4)
        return q[2] - q[0]


def interleaved(fns: Mapping[str, Callable[[], object]], *, rounds: int = 10,
                warmup: int = 2) -> dict[str, Timing]:
    """Time each zero-argument callable ``rounds`` times, interleaved, after ``warmup`` calls."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {k: Timing(k, v) for k, v in samples.items()}
