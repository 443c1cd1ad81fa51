"""Timing the python target's quantized GEMM kernels on a shape, as ``quant.py`` asks.

Glossary: x [M, K] times a quantized weight [N, K] (``quant_kernels.py``).

:func:`measure` times one kernel at M rows on a synthetic weight of the given quant type
(random codes and scales: the time does not depend on the values) together with f32
``F.linear`` on a float weight of the same shape (what the float model would run), and
remembers both for the life of the process and on disk for the machine, in the python
target's timing cache (:mod:`transfuse.codegen.python.gemm_cache`: keyed by CPU model,
torch/numpy/BLAS versions and thread count; entries ``quant|...`` hold (kernel seconds,
f32 seconds)). Compiling the same shapes again costs nothing. The reference kernels
(``dequant_f32``, ``w8a8_reference``) are what they compute: the weight's dequantization
(timed once per shape: an LM head's takes ~0.2 s) plus the f32 ``F.linear`` timed beside.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from transfuse.codegen.python import gemm_cache
from transfuse.codegen.python.quant_kernels import KERNELS, run_qlinear, run_qmatmul
from transfuse.ir.quant import dequantize
from transfuse.ir.types import QuantType

#: (kernel, rows, N, qtype text, act_quant, threads) -> (kernel s, f32 s), for the process
_TIMINGS: dict[tuple, tuple[float, float]] = {}
#: (op, qtype text, N, threads) -> seconds of the reference's dequantization, for the process
_DEQUANT: dict[tuple, float] = {}
#: rounds of timing; each candidate runs once per round, interleaved, and keeps its best
ROUNDS = 3
#: a candidate's calls in one round last at least this long (fewer for slow calls)
MIN_ROUND_S = 0.003
#: with a call slower than this (an LM head dequantized to f32 per call), fewer rounds
SLOW_CALL_S = 0.02
SLOW_ROUNDS = 1


def seconds(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """The best time per call of each ``fns[name]()``, timed in interleaved rounds (the
    candidates see the same machine load) after one warm-up call each; a call slower than
    :data:`SLOW_CALL_S` is timed once per round, in fewer rounds."""
    reps, best = {}, {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        best[name] = time.perf_counter() - t0
        reps[name] = max(1, min(100, int(MIN_ROUND_S / max(best[name], 1e-7))))
    slow = any(t > SLOW_CALL_S for t in best.values())
    for _ in range(SLOW_ROUNDS if slow else ROUNDS):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / reps[name])
    return best


def _synthetic(qt: QuantType, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    qw = torch.randint(0, 256, (n, qt.packed_k), dtype=torch.uint8, generator=g)
    scales = torch.rand(n, qt.groups, generator=g) * 0.01 + 1e-3
    zeros = None if qt.symmetric else torch.randint(0, qt.levels, (n, qt.groups),
                                                    generator=g).float()
    return qw, scales, zeros


def measure(kernels: list[str], op: str, qt: QuantType, n: int, rows: int,
            act_quant: str = "", *, use_cache: bool = True
            ) -> tuple[dict[str, float], float, str]:
    """({kernel: seconds}, f32 ``F.linear`` seconds, where they came from) for x [rows, K].

    The text is ``""`` (timed now), ``"memo"`` (earlier in this process) or ``"cache"``
    (the on-disk timing cache). The kernels are timed together, interleaved.
    """
    keys = {k: (k, rows, n, str(qt), act_quant, torch.get_num_threads()) for k in kernels}
    if all(key in _TIMINGS for key in keys.values()):
        return ({k: _TIMINGS[key][0] for k, key in keys.items()},
                _TIMINGS[keys[kernels[0]]][1], "memo")
    disk = {k: f"quant|{k}|{rows}x{qt.k}x{n}|{qt}|{act_quant}" for k in kernels}
    stored = {k: gemm_cache.load(d) for k, d in disk.items()} if use_cache else {}
    if stored and all(v is not None for v in stored.values()):
        for k, key in keys.items():
            _TIMINGS[key] = stored[k]
        return {k: v[0] for k, v in stored.items()}, stored[kernels[0]][1], "cache"
    qw, scales, zeros = _synthetic(qt, n)
    x = torch.randn(rows, qt.k, generator=torch.Generator().manual_seed(1))
    w = torch.randn(n, qt.k, generator=torch.Generator().manual_seed(2))
    fns: dict[str, Callable[[], object]] = {"": lambda: F.linear(x, w)}
    for k in kernels:
        if KERNELS[k].prepare is None:  # a reference: estimated below
            continue
        if op == "qmatmul":
            fns[k] = functools.partial(run_qmatmul, k, x, qw, scales, None, act_quant)
        else:
            fns[k] = functools.partial(run_qlinear, k, x, qw, scales, zeros, None)
    with torch.inference_mode():
        best = seconds(fns)
        t_f32 = best.pop("")
        for k in kernels:
            if k not in best:
                best[k] = _dequant_seconds(op, qt, n, qw, scales, zeros) + t_f32
    for k, key in keys.items():
        _TIMINGS[key] = (best[k], t_f32)
        if use_cache:
            gemm_cache.store(disk[k], best[k], t_f32)
    return best, t_f32, ""


def _dequant_seconds(op: str, qt: QuantType, n: int, qw, scales, zeros) -> float:
    """Seconds of the reference's weight dequantization (the same at every row count)."""
    key = (op, str(qt), n, torch.get_num_threads())
    if key not in _DEQUANT:
        if op == "qmatmul":
            fn = functools.partial(dequantize, qw, scales, None, qt)
        else:
            fn = functools.partial(dequantize, qw, scales, zeros, qt)
        _DEQUANT[key] = seconds({"": fn})[""]
    return _DEQUANT[key]


def forget() -> None:
    """Drop the in-process timings (the disk cache stays)."""
    _TIMINGS.clear()
    _DEQUANT.clear()


__all__ = ["measure", "seconds", "forget"]
