"""Tiny Triton kernels for the tests of :mod:`transfuse.codegen.triton.compile_check`.

Only the compile check's worker processes import this module (with ``TRITON_INTERPRET=0``);
each kernel is here for one verdict of the check:

- ``scaled_add``: a clean elementwise kernel (few registers, no shared memory);
- ``pipelined_matmul``: a K loop whose loads ``num_stages`` pipelines through shared
  memory. At BM=256, BN=64, BK=128, 8 warps, 4 stages it asks for 240 KiB on sm_80 and
  320 KiB on sm_90 (measured, triton 3.9): over both opt-in limits. At 64x64x32 it is fine;
- ``row_normalize``: holds a whole BR x BC fp32 tile in one warp's registers across a row
  reduction; at 32 x 256 with one warp (256 values a thread) ptxas spills;
- ``non_power_of_two``: ``tl.arange`` over BLOCK=48 is a compile error.

``SHIPPED`` (the clean config only) lets the CLI be tested like a kernel module.
"""

import triton
import triton.language as tl

from transfuse.codegen.triton.kernels.spec import KernelSpec  # (imports env first)


@triton.jit
def scaled_add(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x + alpha * y, mask=mask)


@triton.jit
def pipelined_matmul(a_ptr, b_ptr, c_ptr, M, N, K,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # -- C (M, N) fp32 = A (M, K) fp16 @ B (K, N) fp16, row-major, one BM x BN tile --
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_tile = a_ptr + rm[:, None] * K + rk[None, :]
    b_tile = b_ptr + rk[:, None] * N + rn[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        a = tl.load(a_tile, mask=rk[None, :] < K - k * BK, other=0.0)
        b = tl.load(b_tile, mask=rk[:, None] < K - k * BK, other=0.0)
        acc = tl.dot(a, b, acc)
        a_tile += BK
        b_tile += BK * N
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def row_normalize(x_ptr, out_ptr, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.arange(0, BR)
    cols = tl.arange(0, BC)
    x = tl.load(x_ptr + rows[:, None] * BC + cols[None, :])
    norm = tl.sum(x * x, axis=1)
    tl.store(out_ptr + rows[:, None] * BC + cols[None, :], x / norm[:, None])


@triton.jit
def non_power_of_two(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs))


_HERE = __name__

GOOD = KernelSpec(f"{_HERE}:scaled_add", "scaled_add[1024]",
                  {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32",
                   "alpha": "fp32", "BLOCK": "constexpr"}, {"BLOCK": 1024}, 4, 1)
OVER_SHARED = KernelSpec(f"{_HERE}:pipelined_matmul", "matmul[256x64x128 s4]",
                         {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "M": "i32",
                          "N": "i32", "K": "i32", "BM": "constexpr", "BN": "constexpr",
                          "BK": "constexpr"}, {"BM": 256, "BN": 64, "BK": 128}, 8, 4)
SPILLS = KernelSpec(f"{_HERE}:row_normalize", "row_normalize[32x256 w1]",
                    {"x_ptr": "*fp32", "out_ptr": "*fp32"}, {"BR": 32, "BC": 256}, 1, 1)
BAD = KernelSpec(f"{_HERE}:non_power_of_two", "non_power_of_two[48]",
                 {"x_ptr": "*fp32", "out_ptr": "*fp32"}, {"BLOCK": 48}, 4, 1)
MISSING = KernelSpec(f"{_HERE}:no_such_kernel", "no_such_kernel", {}, {}, 4, 1)

SHIPPED = [GOOD]
