"""FP8 (e4m3) scaled GEMM: activations quantized per token to e4m3, an e4m3 weight with one
scale per output channel, ``tl.dot`` on fp8 operands with f32 accumulation, scales applied
in the epilogue. Needs sm_89+ (Ada, Hopper): e4m3 conversions and fp8 MMA do not exist on
sm_80, where :func:`fp8_linear` refuses with a LoweringError (weight-only fp8, the IR's
``qlinear`` on fp8 storage, runs everywhere through :func:`quant_gemm.qlinear`).

Glossary: x [M, K] (a wrapper flattens x [..., K]), weight ``wq`` e4m3 [N, K] with scales
``s`` f32 [N, 1] (``transfuse/ir/quant.py``'s fp8 storage: ``w = wq * s``), y [M, N].

Algorithm
---------
1. ``_fp8_act_quant_kernel`` (one program per row): ``amax = max |x[m, :]|``,
   ``sx[m] = max(amax / 448, MIN_SCALE)`` (448: the largest finite e4m3; the division IEEE,
   ``tl.math.div_rn``), ``xq = e4m3(clamp(x / sx, -448, 448))`` rounded to nearest even
   (by :func:`round_to_e4m3` in f32 arithmetic, then an exact conversion: the interpreter's
   own conversion rounds wrongly when the mantissa carries).
2. ``_fp8_gemm_kernel``: per [BLOCK_M, BLOCK_N] tile, ``acc += xq_tile @ wq_tile.T`` with
   ``tl.dot`` on e4m3 operands into f32 (products of two e4m3 values are exact in f32). On
   sm_90 Triton's default lets the fp8 wgmma accumulate at reduced precision across the whole
   K loop (``max_num_imprecise_acc`` 2**30, cuBLAS's "fast accumulation"); the kernel passes
   ``max_num_imprecise_acc=BLOCK_K`` so each BLOCK_K slice is added to the f32 accumulator
   (what DeepSeek-V3's kernels do every 128). Epilogue: ``acc * sx[m] * s[n] + bias``, rounded
   to x's dtype, activation (``LINEAR_ACTIVATIONS``), stored in x's dtype.

Numerics: the reference (:func:`reference_fp8_linear`) quantizes x with the same rule in
torch and runs the IR's ``qlinear`` reference (f32) on the dequantized activations; the kernel
differs from it by f32 rounding only. Against the IR's ``qlinear`` on the unquantized x the
difference is e4m3's activation rounding (3 mantissa bits: ~2-3% relative per output on
random data) — this kernel is an opt-in fast path, not the IR's numerics.

Tiles: decode M <= 16: 16 x 64 x 128 (4 warps, 4 stages); M <= 64: 64 x 64 x 128;
prefill: 128 x 128 x 128 (8 warps, 3 stages). BLOCK_K 128: fp8 MMAs take K in 32s.

Interpreter notes (triton 3.9): e4m3 tensors load, convert exactly representable values
and ``tl.dot`` in the interpreter (NumPy in f32), so the CPU tests run this very kernel; they
check its math, not the GPU's fp8 MMA or its accumulation, which only a GPU run shows. The
compile check shows the sm_90 build (wgmma on e4m3) and the sm_80 refusal.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from transfuse.codegen.triton import env
from transfuse.codegen.triton.kernels import quant_gemm
from transfuse.codegen.triton.kernels._common import time_ms
from transfuse.codegen.triton.kernels.quant_gemm import (
    load_k_slice,
    require,
    rne,
    store_scaled,
    tile_rows,
)
from transfuse.codegen.triton.kernels.spec import KernelSpec
from transfuse.errors import LoweringError
from transfuse.ir.opdefs.linalg import LINEAR_ACTIVATIONS
from transfuse.ir.quant import FP8_E4M3_MAX, MIN_SCALE

#: (major, minor) compute capability the fp8 kernels need (e4m3 cvt and MMA: Ada / Hopper)
MIN_CAPABILITY = (8, 9)
#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by row regime
TILES = {
    "decode": (16, 64, 128, 4, 4),   # M <= 16
    "small": (64, 64, 128, 4, 3),    # M <= 64
    "prefill": (128, 128, 128, 8, 3),
}
#: rows of tiles per swizzle group
GROUP_M = 8
#: the activation quantizer's K block
ACT_QUANT_BLOCK = 1024


@triton.jit
def round_to_e4m3(v):
    """f32 ``v`` (|v| <= 448) rounded to the nearest e4m3 value, ties to even, as f32.

    Normals (|v| >= 2**-6): the f32 bits rounded to 3 mantissa bits (add 2**19 - 1 plus the
    kept lowest bit, clear the 20 dropped bits: a carry moves into the exponent as it should);
    subnormals: multiples of 2**-9. The conversion of the result to e4m3 is then exact on any
    hardware and in the interpreter, whose own f32 -> e4m3 rounding loses the carry (124.3
    becomes 64, not 128: triton 3.9)."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    a = tl.abs(v)
    sub = rne(a * 512.0) * 0.001953125
    # the sign bit (-0.0 and tiny negatives give -0.0) by a product: triton 3.6 builds a float
    # ``-x`` as ``0 - x``, which is +0.0 for x = +0.0 (3.9 negates)
    sub = tl.where(bits < 0, sub * -1.0, sub)
    return tl.where(a < 0.015625, sub, normal)


@triton.jit
def _fp8_act_quant_kernel(x_ptr, q_ptr, sx_ptr, K, stride_xm, E4M3_MAX: tl.constexpr,
                          MIN_SCALE_: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row m of x -> e4m3 codes q[m, :] and its scale sx[m] (amax / 448)."""
    m = tl.program_id(0)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), E4M3_MAX), MIN_SCALE_)
    tl.store(sx_ptr + m, scale)
    q_row = q_ptr + m.to(tl.int64) * K
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        v = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.math.div_rn(v, tl.zeros_like(v) + scale)
        v = round_to_e4m3(tl.minimum(tl.maximum(v, -E4M3_MAX), E4M3_MAX))
        tl.store(q_row + k0 + offs, v.to(tl.float8e4nv), mask=mask)


@triton.jit
def _fp8_gemm_kernel(
    xq_ptr, w_ptr, sx_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, stride_ym,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = (xq @ wq.T) * sx[m] * s[n] + bias, then the activation, in y's dtype."""
    offs_m, offs_n, m_mask, n_mask, x_rows, w_rows = tile_rows(
        xq_ptr, w_ptr, M, N, K, K, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # -- e4m3 slices [BM, BK] and [BN, BK]; masked codes are 0.0 --
        x, w = load_k_slice(x_rows, w_rows, k0, K, m_mask, n_mask, 0.0, 0.0, BLOCK_K)
        acc = tl.dot(x, tl.trans(w), acc, max_num_imprecise_acc=BLOCK_K)
    # -- epilogue: scales, bias, rounding to y's dtype, activation --
    sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
    store_scaled(acc, sx, s_ptr, b_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym,
                 HAS_BIAS, ACTIVATION)


# -- wrapper ---------------------------------------------------------------------------------


def refuses(device: torch.device) -> str | None:
    """Why the fp8 kernels cannot run on ``device`` (None when they can)."""
    if device.type != "cuda":
        return None if env.interpreting() else f"{device} tensors need Triton's interpreter"
    cap = torch.cuda.get_device_capability(device)
    return capability_refuses(cap)


def capability_refuses(cap: tuple[int, int]) -> str | None:
    """Why a GPU of compute capability ``cap`` cannot run the fp8 kernels."""
    if tuple(cap) < MIN_CAPABILITY:
        return (f"fp8 e4m3 GEMM needs compute capability >= {MIN_CAPABILITY[0]}."
                f"{MIN_CAPABILITY[1]} (e4m3 conversions and fp8 tensor-core MMA: Ada, Hopper); "
                f"this GPU is sm_{cap[0]}{cap[1]}. Use quant_gemm.qlinear (weight-only fp8: the "
                "e4m3 codes dequantized in registers, runs on sm_80)")
    return None


def quantize_fp8_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (stride 1 along K) -> (e4m3 codes [M, K], scales f32 [M]), per row."""
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x2.device)
    sx = torch.empty((m,), dtype=torch.float32, device=x2.device)
    _fp8_act_quant_kernel[(m,)](x2, q, sx, k, x2.stride(0), E4M3_MAX=FP8_E4M3_MAX,
                                MIN_SCALE_=MIN_SCALE, BLOCK_K=ACT_QUANT_BLOCK)
    return q, sx


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               bias: torch.Tensor | None = None, activation: str | None = None,
               out: torch.Tensor | None = None, *, tile: str | None = None) -> torch.Tensor:
    """``activation(e4m3(x) @ wq.T * sx * s + bias)`` in x's dtype: x quantized per token to
    e4m3, the fp8 weight ``qweight`` e4m3 [N, K] with ``scales`` f32 [N, 1]."""
    op = "fp8_linear"
    quant_gemm.check_x(x, None, op)
    k, dev = x.shape[-1], x.device
    why = refuses(dev)
    if why:
        raise LoweringError(f"{op}: x: {why}")
    require(isinstance(qweight, torch.Tensor) and qweight.dtype == torch.float8_e4m3fn
            and qweight.dim() == 2 and qweight.shape[1] == k and qweight.is_contiguous()
            and qweight.device == dev, f"{op}: qweight", qweight,
            f"contiguous float8_e4m3fn [N, K={k}] on {dev}")
    n = qweight.shape[0]
    require(isinstance(scales, torch.Tensor) and scales.dtype == torch.float32
            and tuple(scales.shape) == (n, 1) and scales.is_contiguous()
            and scales.device == dev, f"{op}: scales", scales,
            f"contiguous f32 [{n}, 1] on {dev}")
    act = quant_gemm.check_activation(activation, op)
    quant_gemm.check_bias(bias, n, dev, op)
    if tile is not None and tile not in TILES:
        raise LoweringError(f"{op}: tile must be one of {sorted(TILES)}, got {tile!r}")
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = quant_gemm.check_out(out, (*x.shape[:-1], n), x.dtype, dev, op)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.copy_(reference_fp8_linear(x, qweight, scales, bias, activation))
    xq, sx = quantize_fp8_rows(x2)
    name = tile or ("decode" if m <= 16 else "small" if m <= 64 else "prefill")
    bm, bn, bk, warps, stages = TILES[name]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fp8_gemm_kernel[grid](xq, qweight, sx, scales, bias if bias is not None else scales,
                           y.view(m, n), m, n, k, n, HAS_BIAS=bias is not None,
                           ACTIVATION=act, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                           GROUP_M=GROUP_M, num_warps=warps, num_stages=stages)
    return y


# -- reference -------------------------------------------------------------------------------


def reference_quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 codes, f32 scales [..., 1]): the kernel's rule in torch."""
    xf = x.to(torch.float32)
    sx = (xf.abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX).clamp_min(MIN_SCALE)
    q = (xf / sx).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, sx


def reference_fp8_linear(x, qweight, scales, bias=None, activation=None) -> torch.Tensor:
    """The IR's ``qlinear`` reference (f32) on the e4m3-quantized activations, cast to x's
    dtype, then the activation."""
    from transfuse.ir.ops import get_op

    q, sx = reference_quantize_fp8_rows(x)
    xd = q.to(torch.float32) * sx
    b = None if bias is None else bias.to(torch.float32)
    y = get_op("qlinear").impl([xd, qweight, scales, None, b], {"activation": None}, {})
    y = y.to(x.dtype)
    return y if activation is None else LINEAR_ACTIVATIONS[activation](y)


# -- benchmark -------------------------------------------------------------------------------


def bench_fp8_linear(device: str, m: int = 16, n: int = 4096, k: int = 4096,
                     dtype: torch.dtype = torch.bfloat16, reps: int = 10) -> dict:
    """ms per call of :func:`fp8_linear` (incl. the activation quantizer) vs torch
    ``F.linear`` on the weight dequantized once (x's dtype) and the weight-only fp8
    :func:`quant_gemm.qlinear`."""
    from transfuse.ir.quant import quantize_rtn
    from transfuse.ir.types import QuantType

    gen = torch.Generator().manual_seed(0)
    qt = QuantType("fp8e4m3", 8, k, True, k)
    qw = quantize_rtn(torch.randn(n, k, generator=gen), qt)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    wq, s = qw.qweight.to(device), qw.scales.to(device)
    wd = qw.dequantize().to(device=device, dtype=dtype)
    timing = time_ms
    out = {
        "shape": [m, n, k], "dtype": str(dtype).removeprefix("torch."),
        "fp8_linear_ms": timing(lambda: fp8_linear(x, wq, s), device, reps),
        "qlinear_fp8_weight_only_ms": timing(lambda: quant_gemm.qlinear(x, wq, s, None, None, qt),
                                             device, reps),
        "torch_linear_dequantized_ms": timing(lambda: torch.nn.functional.linear(x, wd),
                                              device, reps),
    }
    out["speedup_vs_torch"] = out["torch_linear_dequantized_ms"] / out["fp8_linear_ms"]
    return out


# -- shipped configurations (sm_89+ only: see MIN_CAPABILITY) --------------------------------


@dataclasses.dataclass(frozen=True)
class ArchSpec(KernelSpec):
    """A :class:`KernelSpec` that compiles only for ``archs`` (compute capabilities; the
    compile check reads the attribute): fp8e4nv does not exist before sm_89."""

    archs: tuple[int, ...] = (89, 90)


_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _shipped() -> list[KernelSpec]:
    specs = []
    for dtype in quant_gemm.X_DTYPES:
        t = _PTR[dtype]
        dt = str(dtype).removeprefix("torch.")
        specs.append(ArchSpec(
            f"{__name__}:_fp8_act_quant_kernel", f"fp8_act_quant[{dt}]",
            {"x_ptr": t, "q_ptr": "*fp8e4nv", "sx_ptr": "*fp32", "K": "i32",
             "stride_xm": "i32", "E4M3_MAX": "constexpr", "MIN_SCALE_": "constexpr",
             "BLOCK_K": "constexpr"},
            {"E4M3_MAX": FP8_E4M3_MAX, "MIN_SCALE_": MIN_SCALE, "BLOCK_K": ACT_QUANT_BLOCK}))
        for regime, (bm, bn, bk, warps, stages) in TILES.items():
            specs.append(ArchSpec(
                f"{__name__}:_fp8_gemm_kernel", f"fp8_gemm[{regime} {dt}]",
                {"xq_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "sx_ptr": "*fp32",
                 "s_ptr": "*fp32", "b_ptr": t, "y_ptr": t, "M": "i32", "N": "i32", "K": "i32",
                 "stride_ym": "i32", "HAS_BIAS": "constexpr", "ACTIVATION": "constexpr",
                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                 "GROUP_M": "constexpr"},
                {"HAS_BIAS": True, "ACTIVATION": "gelu", "BLOCK_M": bm, "BLOCK_N": bn,
                 "BLOCK_K": bk, "GROUP_M": GROUP_M}, warps, stages))
    return specs


#: every configuration :func:`fp8_linear` launches; sm_89+ only (``archs``: on sm_80 Triton
#: rejects fp8e4nv, "type fp8e4nv not supported in this architecture")
SHIPPED: list[KernelSpec] = _shipped()

__all__ = ["fp8_linear", "quantize_fp8_rows", "reference_fp8_linear",
           "reference_quantize_fp8_rows", "bench_fp8_linear", "refuses", "capability_refuses",
           "SHIPPED", "TILES", "MIN_CAPABILITY", "ArchSpec"]
