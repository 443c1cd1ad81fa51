"""Timing the python target's two CPU GEMMs on a shape: what ``layout.select-gemm`` asks.

The pass asks the target (``PythonTarget.time_gemm``); this module answers: torch's GEMM
against OpenBLAS (:func:`transfuse.codegen.python.blas.time_gemm`) on the given weights,
remembered for the life of the process (keyed by shape, bias, layout and torch's thread
count) and on disk for the machine (:mod:`transfuse.codegen.python.gemm_cache`), so
compiling the same shapes again costs nothing.

Glossary: x [M, K] times a weight [N, K] gives [M, N].
"""

from __future__ import annotations

import torch

from transfuse.codegen.python import gemm_cache
from transfuse.codegen.python.blas import GemmTiming, time_gemm

#: (M, K, N, bias, K-major, threads) -> timing, for the life of the process
_TIMINGS: dict[tuple, GemmTiming] = {}


def measure(rows: int, weights: list[torch.Tensor], bias: torch.Tensor | None, *,
            relayout: bool, use_cache: bool = True) -> tuple[GemmTiming, str]:
    """(timing of x [rows, K] against ``weights``, where it came from).

    The second item is text for the pass log: ``""`` (timed now), ``" (timed earlier in
    this process)"`` or ``" (from the timing cache <path>)"``. ``relayout``: OpenBLAS reads
    K-major copies of the weights (else the [N, K] weights as transposed operands).
    ``use_cache``: read and write the on-disk cache (the in-process memo is always used).
    """
    n, k = weights[0].shape
    key = (rows, k, n, bias is not None, relayout, torch.get_num_threads())
    source = " (timed earlier in this process)"
    if key not in _TIMINGS:
        disk_key = f"{rows}x{k}x{n}|bias={int(bias is not None)}|kmajor={int(relayout)}"
        stored = gemm_cache.load(disk_key) if use_cache else None
        if stored is not None:
            _TIMINGS[key] = GemmTiming(rows, k, n, *stored)
            source = f" (from the timing cache {gemm_cache.cache_path()})"
        else:
            _TIMINGS[key] = time_gemm(rows, weights, bias, rounds=2, relayout=relayout)
            source = ""
            if use_cache:
                gemm_cache.store(disk_key, _TIMINGS[key].torch_s, _TIMINGS[key].blas_s)
    return _TIMINGS[key], source


def forget() -> None:
    """Drop the in-process timings (as a new process would start; the disk cache stays)."""
    _TIMINGS.clear()


__all__ = ["measure", "forget"]
