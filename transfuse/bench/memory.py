"""Peak memory of one call and resident footprint of a build.

CPU: a sampler thread reads the process RSS from ``/proc/self/statm`` about every
millisecond while the call runs; the peak is the highest sample (and the RSS right
after the call) minus the RSS just before it. Before each measurement freed heap
pages are handed back to the OS (glibc ``malloc_trim``) so that a call's new pages
show up as growth rather than being served from memory the allocator kept.

What this cannot see: memory an allocator keeps between calls (ONNX Runtime's
arena, glibc's cached chunks) is already resident before the call, so a warm
call can show a small delta. That memory is counted where it is first touched:
in the build footprint (RSS after build and first call minus RSS before build).

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus the memory
allocated before the call (torch's caching allocator only; not ORT's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
from collections.abc import Callable

import torch

_MB = 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = "/proc/self/statm"


def rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing)."""
    try:
        with open(_STATM, "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def rss_available() -> bool:
    return os.path.exists(_STATM)


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def release_free_memory(collect: bool = True) -> None:
    """Collect garbage (a full collection can take ~0.3 s once torch.compile is loaded) and
    return freed heap pages to the OS (glibc only; else a no-op)."""
    if collect:
        gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class RssSampler:
    """Context manager: the peak RSS seen while it is open, sampled every ``interval_s``.

        with RssSampler() as s:
            fn()
        s.peak_delta_bytes   # peak RSS during the block minus RSS on entry
    """

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        rss = rss_bytes()
        self.samples += 1
        if rss > self.peak_bytes:
            self.peak_bytes = rss

    def __enter__(self) -> RssSampler:
        self.start_bytes = self.peak_bytes = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sample()  # the RSS right after the call counts too
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def peak_delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)


def peak_call_mb(fn: Callable[[], object], device: str | torch.device = "cpu") -> float | None:
    """Peak memory growth in MB during one call of ``fn`` (None if it cannot be measured)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - before) / _MB
    if not rss_available():
        return None
    release_free_memory(collect=False)  # a call makes no garbage cycles worth a full collection
    with RssSampler() as sampler, torch.inference_mode():
        fn()
    return sampler.peak_delta_bytes / _MB


class Footprint:
    """Resident memory a build leaves behind: ``with Footprint(device) as fp: build()``.

    ``fp.mb`` is RSS (CPU) or allocated CUDA memory after the block minus before it;
    None where it cannot be measured.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.mb: float | None = None
        self._before = 0

    def _now(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        release_free_memory()
        return rss_bytes()

    def __enter__(self) -> Footprint:
        self._before = self._now()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda or rss_available():
            self.mb = (self._now() - self._before) / _MB
