"""A second CPU GEMM for the python backend: numpy's OpenBLAS, chosen per shape.

Glossary: x [M, K] times a weight [N, K] (torch's linear layout) gives [M, N].

torch's CPU wheels run ``F.linear`` through MKL's sgemm. On AMD cores MKL takes a
generic AVX2 path, and for wide outputs it is well below the machine's peak
(measured on one EPYC core, 1 thread, GFLOP/s MKL vs OpenBLAS 0.3.31 through
numpy: LM head 768x32000 at M=512 75 vs 92; 768x50304 at M=128 70 vs 75; MLP
768x4096 at M=512 86 vs 90; square 768x768 at M=512 95 vs 94). Neither wins
everywhere, so ``layout.select-gemm`` times both on each distinct shape of a
graph and records the winner as the linear's ``gemm`` attribute (``"torch"`` or
``"blas"``); the generated code then calls :func:`gemm_linear` for ``"blas"``.

Weights of ``"blas"`` linears are stored K-major: the python backend keeps a [K, N]
contiguous tensor and binds its transposed view (same [N, K] values, so the graph's
meaning is unchanged), and OpenBLAS runs a plain NN GEMM on it. With the weights
streamed from memory as in a model's forward pass (12 layers of distinct weights, one
EPYC core) this is the fastest layout we measured, GFLOP/s MKL [N, K] vs OpenBLAS
[K, N]: M=16 36 vs 45, M=128 61-67 vs 68-73, M=512 70-77 vs 79-82.

:func:`gemm_linear` is exact-semantics ``F.linear``: the same product in fp32 with
fp32 accumulation (a different summation order, so last-bit differences, as
between any two BLAS builds), bias added afterwards, output a fresh contiguous
tensor. It reads the weight where it is (K-major: an NN GEMM; [N, K]: OpenBLAS
takes it as a transposed operand; no copy either way) and falls back to
``F.linear`` for anything that is not a CPU float32 tensor without autograd
history, so moving a model to CUDA or asking for gradients keeps working.

Threads: OpenBLAS has its own thread pool. Each call first makes it use
``torch.get_num_threads()`` threads (checked per call, changed only when torch's
setting changed), so ``torch.set_num_threads(1)`` governs both libraries. This
sets numpy's BLAS threads process-wide while blas GEMMs are in use.
"""

from __future__ import annotations

import math
import mmap
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # numpy ships OpenBLAS; threadpoolctl lets us size its thread pool
    import numpy as np
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - both are dependencies; stay correct without them
    np = None
    ThreadpoolController = None


class _Threads:
    """numpy's OpenBLAS thread count, kept equal to torch's."""

    def __init__(self) -> None:
        self.controller = None
        self.synced = -1
        self.error: str | None = None
        self.loaded = False

    def load(self) -> None:
        self.loaded = True
        if np is None or ThreadpoolController is None:
            self.error = "numpy or threadpoolctl is not installed"
            return
        numpy_blas = np.__config__.CONFIG.get("Build Dependencies", {}).get("blas", {})
        libs = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
        openblas = [c for c in libs if c.internal_api == "openblas"]
        if not openblas:
            self.error = (f"numpy's BLAS is not OpenBLAS (numpy reports {numpy_blas.get('name')!r}; "
                          f"loaded BLAS libraries: {[c.internal_api for c in libs]})")
            return
        self.controller = openblas

    def sync(self) -> None:
        n = torch.get_num_threads()
        if n != self.synced:
            if not self.loaded:
                self.load()
            for c in self.controller or ():
                c.set_num_threads(n)
            self.synced = n


_THREADS = _Threads()


def blas_unavailable() -> str | None:
    """Why :func:`gemm_linear` cannot run its BLAS path here (None when it can)."""
    if not _THREADS.loaded:
        _THREADS.load()
    return _THREADS.error


#: outputs at least this large are mapped with transparent huge pages (see `empty_huge`)
HUGE_OUTPUT_BYTES = 32 << 20
_HUGE = 2 << 20  # the x86-64 huge page


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unavailable"
    return text[text.find("[") + 1:text.find("]")] if "[" in text else "unavailable"


#: whether large results can be mapped with transparent huge pages here (see `empty_huge`)
HUGE_PAGES = _thp_mode() in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")


def empty_huge(shape: tuple[int, ...]) -> torch.Tensor:
    """``torch.empty(shape)`` (float32, CPU) backed by transparent huge pages.

    glibc serves every allocation above 32 MB with a fresh ``mmap``, so a large
    result (an LM head's logits: 65 MB at 512 x 32000) is page-faulted in 4 KB
    pages on every call: measured 43 ms of faults for 65 MB on one EPYC core,
    against 7 ms when the mapping asks for 2 MB pages (``MADV_HUGEPAGE``). The
    tensor keeps the mapping alive (``torch.frombuffer`` holds the buffer); it is
    unmapped when the last view of it dies. Where THP is off or not Linux, this is
    ``torch.empty``.
    """
    numel = math.prod(shape)
    nbytes = numel * 4
    if not HUGE_PAGES or nbytes < HUGE_OUTPUT_BYTES:
        return torch.empty(shape, dtype=torch.float32)
    buf = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    start = (-raw.data_ptr()) % _HUGE  # 2 MB aligned, so every page can be huge
    return raw[start:start + nbytes].view(torch.float32).view(shape)


def gemm_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                blas: bool = False) -> torch.Tensor:
    """``F.linear(x, w, b)`` on the CPU, by OpenBLAS (``blas``) or torch, into a fresh result.

    Large results come from :func:`empty_huge`. Anything that is not a CPU float32
    tensor without autograd history goes to ``F.linear`` unchanged.
    """
    if (x.dtype is not torch.float32 or w.dtype is not torch.float32 or x.device.type != "cpu"
            or w.device.type != "cpu" or w.dim() != 2
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            or (b is not None and (b.dtype is not torch.float32 or b.device.type != "cpu"))):
        return F.linear(x, w, b)
    if blas:
        _THREADS.sync()
        blas = _THREADS.error is None
    n, k = w.shape
    if x.shape[-1] != k:  # the message F.linear would give, before a library sees it
        raise RuntimeError(f"linear: input {tuple(x.shape)} does not match weight "
                           f"{tuple(w.shape)} (last dim vs K)")
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out = empty_huge((x2.shape[0], n))
    if blas:
        np.matmul(x2.detach().numpy(), w.detach().numpy().T, out=out.numpy())
        if b is not None:
            out += b
    elif b is not None:
        torch.addmm(b, x2, w.t(), out=out)
    else:
        torch.mm(x2, w.t(), out=out)
    return out.view(*x.shape[:-1], n)


def is_kmajor(w: torch.Tensor) -> bool:
    """A 2-D [N, K] tensor whose memory is a contiguous [K, N] (a transposed view)."""
    return w.dim() == 2 and w.stride() == (1, w.shape[0]) and w.shape[0] > 1


def kmajor(w: torch.Tensor) -> torch.Tensor:
    """``w`` [N, K] with the same values, stored K-major (see :func:`is_kmajor`); a copy
    unless it already is."""
    return w if is_kmajor(w) else w.t().contiguous().t()


def kmajor_eligible(v) -> bool:
    """Every use of graph constant ``v`` is as the weight of a ``linear``: it may be stored
    K-major (a tied embedding, say, may not)."""
    return bool(v.uses) and all(u.op == "linear" and i == 1 for u, i in v.uses)


def stored_kmajor(v) -> bool:
    """Whether the python backend stores graph constant ``v`` K-major: it is
    :func:`kmajor_eligible` and every linear reading it has ``gemm="blas"``."""
    return kmajor_eligible(v) and all(u.attrs.get("gemm") == "blas" for u, _ in v.uses)


# -- timing, for layout.select-gemm -----------------------------------------------------------


@dataclass(frozen=True)
class GemmTiming:
    """Best-of-rounds seconds per call of each implementation on one shape."""

    m: int
    k: int
    n: int
    torch_s: float
    blas_s: float

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n

    def gflops(self, which: str) -> float:
        s = self.torch_s if which == "torch" else self.blas_s
        return self.flops / s / 1e9 if s > 0 else float("inf")


def _time_once(fn: Callable[[], object], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def time_gemm(m: int, weights: list[torch.Tensor], bias: torch.Tensor | None, *,
              rounds: int = 3, min_seconds: float = 2e-3, seed: int = 0,
              relayout: bool = True) -> GemmTiming:
    """Time torch on ``weights`` against OpenBLAS on them (K-major copies when ``relayout``),
    for x [m, K]; one call per weight per repetition, so with several distinct weights the
    GEMMs stream them from memory as a forward pass does.

    One untimed warm-up pass each, then ``rounds`` alternating rounds (so drift hits both);
    a round repeats until it takes ``min_seconds``; the best round counts, per GEMM.
    Runs under ``inference_mode``.
    """
    n, k = weights[0].shape
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        x = torch.randn(m, k, generator=gen, dtype=weights[0].dtype)
        blas_ws = [kmajor(w) for w in weights] if relayout else list(weights)

        def run_torch():
            for w in weights:
                gemm_linear(x, w, bias)

        def run_blas():
            for w in blas_ws:
                gemm_linear(x, w, bias, True)

        fns = {"torch": run_torch, "blas": run_blas}
        for fn in fns.values():
            fn()
        best = {name: float("inf") for name in fns}
        inner = dict.fromkeys(fns, 1)
        for _ in range(rounds):
            for name, fn in fns.items():
                t = _time_once(fn, inner[name]) / len(weights)
                best[name] = min(best[name], t)
                inner[name] = max(1, min(1000, int(min_seconds / max(t * len(weights), 1e-7))))
    return GemmTiming(m, k, n, best["torch"], best["blas"])


__all__ = ["gemm_linear", "empty_huge", "kmajor", "is_kmajor", "kmajor_eligible", "stored_kmajor",
           "blas_unavailable", "time_gemm", "GemmTiming", "HUGE_OUTPUT_BYTES", "HUGE_PAGES"]
