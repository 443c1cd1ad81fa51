"""Linears with few rows (decode steps, speculative checks) on the native small-M kernel.

Glossary: x [M, K] (M the product of x's leading dims) times a weight [N, K] gives [M, N].

A decode step multiplies each weight by a handful of rows: M = the batch, or k + 1 when a
speculative step verifies k draft tokens. That is a stream over the weight, and MKL's
sgemm streams it well only at M = 1: measured on one Sapphire Rapids core, 1 thread,
weights rotated so they come from memory, GPT-2's 768x3072 MLP weight takes 0.71 ms at
M = 1 and 1.34 / 1.81 / 2.01 ms at M = 4 / 8 / 16; the LM head 768x50257 11.1 ms at M = 1,
36 ms at M = 8. ``tf_linear_f32`` (``codegen/native/gemm.c``) reads every weight block
once and uses it for all the rows: 0.78 / 0.82 / 0.99 / 1.27 ms and 16 ms at M = 8 for
the LM head; ``tf_linear_kn_f32`` does the same for a weight stored [K, N] (HF GPT-2's
Conv1D, lowered as ``matmul``; :func:`small_matmul`): 768x3072 at M = 1 / 8 / 16
0.63 / 0.69 / 0.91 ms against torch.matmul's 0.63 / 1.75 / 2.55
(``benchmarks/small_linear.py`` prints the whole table).

:func:`small_linear` is what the python backend emits for a linear whose row count is not
known when the code is generated (the tokens of a generation step) or is at most
:data:`NATIVE_MAX_ROWS`: at run time it takes the native kernel when the rows are at most
:data:`NATIVE_MAX_ROWS` and the operands suit it (CPU float32, no autograd, rows of
contiguous elements, the weight [N, K] with contiguous rows), and otherwise the GEMM the
backend used before (``F.linear``, or :func:`~transfuse.codegen.python.blas.gemm_linear`
for wide linears), so a prefill of 512 rows stays on MKL. (A linear that
``layout.select-gemm`` put on OpenBLAS keeps ``_gemm_linear``: its weight is stored K-major,
which this kernel does not read.)

Batch invariance: on the native path row m of the result depends only on row m of x
(``gemm.c`` explains why); past :data:`NATIVE_MAX_ROWS` rows MKL computes it, in another
summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transfuse.codegen.native import ops as native_ops
from transfuse.codegen.python.blas import gemm_linear

#: rows up to which the native kernel runs; measured crossover with MKL (see the module doc and
#: tests/codegen/test_native_linear.py): the native kernel is faster at every M <= 32 on the
#: GPT-2 and SmolLM2 shapes except 768x768 at M = 32 (even)
NATIVE_MAX_ROWS = 32
#: rows from which it runs: at one row MKL's GEMV streams the weight as fast and the call is
#: ~7 us cheaper (SmolLM2 decode, 1 thread: 1.01x HF generate() with the kernel at one row,
#: 0.95x without), so a single-row step keeps torch's GEMV
NATIVE_MIN_ROWS = 2


def small_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                 gemm: str = "torch") -> torch.Tensor:
    """``F.linear(x, w, b)``: by the native kernel when x has at most :data:`NATIVE_MAX_ROWS`
    rows and it applies, else by ``gemm`` (``"torch"``: ``F.linear``; ``"blas"``: OpenBLAS;
    ``"wide"``: torch into a huge-page result, see ``blas.py``)."""
    k = x.shape[-1] if x.dim() else 0
    rows = x.numel() // k if k else 0
    if NATIVE_MIN_ROWS <= rows <= NATIVE_MAX_ROWS:
        out = native_ops.linear(x, w, b)
        if out is not None:
            return out
    if gemm == "torch":
        return F.linear(x, w, b)
    return gemm_linear(x, w, b, gemm == "blas")


def small_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(x, w)`` for a 2-D ``w`` [K, N] (a weight stored K-major, as GPT-2's
    Conv1D keeps it): the native kernel reads ``w``'s rows in place (``w.t()`` is a K-major
    [N, K]) when x has at most :data:`NATIVE_MAX_ROWS` rows and it applies."""
    k = x.shape[-1] if x.dim() else 0
    rows = x.numel() // k if k else 0
    if NATIVE_MIN_ROWS <= rows <= NATIVE_MAX_ROWS and w.dim() == 2:
        out = native_ops.linear(x, w.t())
        if out is not None:
            return out
    return torch.matmul(x, w)


__all__ = ["small_linear", "small_matmul", "NATIVE_MAX_ROWS", "NATIVE_MIN_ROWS"]
