"""Measured single-thread memory-streaming bandwidth: the floor under decode speed.

Decoding one token reads every weight once, so ``weight bytes / bandwidth`` is the least time
a token can take on one thread (../shared/BENCHMARKING.md: "weight-streaming floor"). The
bandwidth is measured, in the same run as the decode figures, by streaming a buffer much
larger than the last-level cache with a few methods and keeping the best:

- ``torch-sum``: ``torch.sum`` of an fp32 buffer (reads it once);
- ``torch-dot``: ``torch.dot(buffer, buffer)`` (reads it once; BLAS keeps several
  accumulators, so it is not limited by one add chain as a plain sum can be);
- ``numpy-dot``: ``numpy.dot`` of the same memory with itself (numpy's BLAS; reads it once);
- ``torch-gemv``: ``torch.mv`` of the buffer viewed as a [rows, 4096] matrix, what a decode
  step does with each weight (reads the matrix once);
- ``torch-copy``: ``dst.copy_(src)`` with src and dst each half the buffer; counted as
  read + write bytes (2 x half), the STREAM "copy" convention.

Every method runs ``repeats`` times after one untimed pass; a method's figure is its fastest
pass (bytes / seconds, GB = 1e9 bytes), and the reported bandwidth is the best method's: the
highest rate measured gives the lowest, hardest floor. Threads are set to ``threads`` (torch and, through
threadpoolctl, numpy's BLAS) for the measurement and restored after.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

#: the buffer is at least this many times the last-level cache, and at least MIN_BYTES
LLC_MULTIPLE = 4
MIN_BYTES = 256 * 2**20
#: never take more than this fraction of the memory available now
MAX_AVAILABLE_FRACTION = 1 / 8
GEMV_COLUMNS = 4096
METHODS = ("torch-sum", "torch-dot", "numpy-dot", "torch-gemv", "torch-copy")


@dataclasses.dataclass
class MethodBandwidth:
    """One method's passes over the buffer: bytes counted per pass and seconds per pass."""

    method: str
    bytes_per_pass: int
    seconds: list[float]

    @property
    def best_gbps(self) -> float:
        return self.bytes_per_pass / min(self.seconds) / 1e9


@dataclasses.dataclass
class Bandwidth:
    """The best method's GB/s, and every method's passes (for results.json)."""

    buffer_bytes: int
    llc_bytes: int | None
    threads: int
    methods: list[MethodBandwidth]

    @property
    def best(self) -> MethodBandwidth:
        return max(self.methods, key=lambda m: m.best_gbps)

    @property
    def gbps(self) -> float:
        return self.best.best_gbps

    def as_dict(self) -> dict:
        return {"gbps": self.gbps, "best_method": self.best.method,
                "buffer_bytes": self.buffer_bytes, "llc_bytes": self.llc_bytes,
                "threads": self.threads,
                "methods": {m.method: {"best_gbps": m.best_gbps,
                                       "bytes_per_pass": m.bytes_per_pass,
                                       "seconds": m.seconds} for m in self.methods}}


def _parse_size(text: str) -> int:
    """sysfs cache sizes: "48K", "2048K", "491520K", "32M" -> bytes."""
    text = text.strip().upper()
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def llc_bytes(cpu_dir: str | os.PathLike = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Size of the highest-level data/unified cache of cpu0 (None where sysfs lacks it)."""
    best: tuple[int, int] | None = None
    for index in sorted(Path(cpu_dir).glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, size)
    return None if best is None else best[1]


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_buffer_bytes() -> int:
    """LLC_MULTIPLE x the LLC (at least MIN_BYTES), capped by a fraction of free memory."""
    llc = llc_bytes()
    size = max(MIN_BYTES, LLC_MULTIPLE * llc) if llc else MIN_BYTES
    available = _available_bytes()
    if available:
        size = min(size, int(available * MAX_AVAILABLE_FRACTION))
    return size


def _passes(buffer: torch.Tensor, method: str) -> tuple[int, Callable[[], object]]:
    """(bytes counted per pass, the pass) of ``method`` over the fp32 ``buffer``."""
    n = buffer.numel()
    if method == "torch-sum":
        return n * 4, lambda: torch.sum(buffer)
    if method == "torch-dot":
        return n * 4, lambda: torch.dot(buffer, buffer)
    if method == "numpy-dot":
        array = buffer.numpy()
        return n * 4, lambda: np.dot(array, array)
    if method == "torch-gemv":
        rows = n // GEMV_COLUMNS
        matrix = buffer[: rows * GEMV_COLUMNS].view(rows, GEMV_COLUMNS)
        vector = torch.ones(GEMV_COLUMNS)
        return rows * GEMV_COLUMNS * 4, lambda: torch.mv(matrix, vector)
    if method == "torch-copy":
        half = n // 2
        src, dst = buffer[:half], buffer[half : 2 * half]
        return 2 * half * 4, lambda: dst.copy_(src)
    raise ValueError(f"unknown bandwidth method {method!r}; choose from {list(METHODS)}")


def measure_bandwidth(nbytes: int | None = None, *, repeats: int = 5, threads: int = 1,
                      methods: Sequence[str] = METHODS) -> Bandwidth:
    """Stream an fp32 buffer of ``nbytes`` (default :func:`default_buffer_bytes`) with each
    method ``repeats`` times on ``threads`` threads; see the module docstring."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown bandwidth methods {unknown}; choose from {list(METHODS)}")
    if repeats < 1 or threads < 1:
        raise ValueError(f"need repeats >= 1 and threads >= 1, got {repeats=} {threads=}")
    nbytes = default_buffer_bytes() if nbytes is None else nbytes
    if nbytes < 2 * GEMV_COLUMNS * 4:
        raise ValueError(f"bandwidth buffer of {nbytes} bytes is too small "
                         f"(need >= {2 * GEMV_COLUMNS * 4})")
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            buffer = torch.ones(nbytes // 4, dtype=torch.float32)  # pages touched now
            results = []
            for method in methods:
                counted, run = _passes(buffer, method)
                run()  # untimed: first-use costs
                seconds = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    run()
                    seconds.append(time.perf_counter() - t0)
                results.append(MethodBandwidth(method, counted, seconds))
            del buffer
    finally:
        torch.set_num_threads(previous)
    return Bandwidth(buffer_bytes=nbytes, llc_bytes=llc_bytes(), threads=threads,
                     methods=results)


__all__ = ["Bandwidth", "METHODS", "MethodBandwidth", "default_buffer_bytes", "llc_bytes",
           "measure_bandwidth"]
