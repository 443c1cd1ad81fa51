"""Wrapper-side helpers the kernel modules share: input checks and a benchmark clock.

Nothing here is a kernel (no ``@triton.jit``, no ``SHIPPED``): the name starts with ``_`` so
the compile check (``compile_check.shipped_specs``) skips this module when it walks the
kernels package. The ``@triton.jit`` helpers one kernel module shares with another stay in
the module that owns them (``flash_attention.attend_tile``, ``quant_gemm.round_as``, ...):
moving them would change the source the compile record is keyed by without changing code.

Input checks (the elementwise wrappers: activations, norms, rotary). A bad argument raises
:class:`transfuse.errors.LoweringError` naming the op, the argument, what it is (shape, dtype,
device, or its repr) and what was expected::

    triton norm: weight has shape (7,) dtype torch.float32 on cpu; expected shape (8,) ...

- :func:`fail` raises that error; modules bind their op name once
  (``_fail = functools.partial(fail, "norm")``).
- :func:`check_float` accepts a float16 / bfloat16 / float32 tensor (on a given device).
- :func:`row_view` gives a tensor as an [M, N] view with contiguous rows (a copy for an input
  with no such view; an output must have one, as the kernel writes through it).

Timing: :func:`time_ms` is ``triton.testing.do_bench`` on a CUDA device and a wall clock
otherwise (the interpreter: ``bench_*`` there only shows the code runs, on tiny shapes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NoReturn

import torch
import triton

from transfuse.codegen.triton import env
from transfuse.errors import LoweringError

#: the floating dtypes the elementwise kernels load and store
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fail(op: str, name: str, t: object, expected: str) -> NoReturn:
    """Raise the LoweringError for argument ``name`` (value ``t``) of triton op ``op``."""
    what = (f"shape {tuple(t.shape)} dtype {t.dtype} on {t.device}"
            if isinstance(t, torch.Tensor) else repr(t))
    raise LoweringError(f"triton {op}: {name} has {what}; expected {expected}")


def check_float(op: str, name: str, t: object, device, where: str = "x") -> None:
    """``t`` must be a float16/bfloat16/float32 tensor, on ``device`` unless that is None
    (``where`` names the argument whose device that is, for the message)."""
    if not isinstance(t, torch.Tensor):
        fail(op, name, t, "a torch.Tensor")
    if t.dtype not in FLOAT_DTYPES:
        fail(op, name, t, "dtype float16, bfloat16 or float32")
    if device is not None and t.device != device:
        fail(op, name, t, f"a tensor on {device} (where {where} is)")


def row_view(op: str, name: str, t: torch.Tensor, m: int, n: int,
             writable: bool) -> torch.Tensor:
    """``t`` as an [M, N] view with contiguous rows; for an input without one (``writable``
    false) a contiguous copy, for an output a LoweringError."""
    try:
        v = t.view(m, n)
    except RuntimeError:
        v = None
    if v is not None and (v.stride(1) == 1 or n == 1):
        return v
    if writable:
        fail(op, name, t, f"a tensor viewable as [{m}, {n}] with contiguous rows")
    return t.reshape(m, n).contiguous()


def time_ms(fn: Callable[[], object], device: str | torch.device, reps: int = 1,
            warmup: bool = True) -> float:
    """Milliseconds per call of ``fn``: ``triton.testing.do_bench`` on a CUDA device (not in
    the interpreter); otherwise the mean wall clock of ``reps`` calls, after one warm-up call
    when ``warmup`` (which doubles the cost of a bench under the interpreter)."""
    if torch.device(device).type == "cuda" and not env.interpreting():
        return float(triton.testing.do_bench(fn))
    if warmup:
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


__all__ = ["FLOAT_DTYPES", "fail", "check_float", "row_view", "time_ms"]
