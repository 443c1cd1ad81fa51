"""Quantized GEMMs: weight-only dequant GEMM (``qlinear``: int4 / int8 / fp8 weights) and
W8A8 (``qmatmul``: u8 activations quantized on the fly, int8 weights, integer dot).

Glossary: x [M, K] activations (a wrapper flattens x [..., K] to M rows), a weight [N, K]
in the canonical storage of ``transfuse/ir/quant.py``: codes ``q`` (u8; int4 packed two per
byte along K, element 2j in the LOW nibble of byte j, so a row has PK = K/2 bytes; int8 one
per byte, PK = K; fp8 e4m3 values, PK = K), scales ``s`` f32 [N, G], zeros ``z`` f32 [N, G]
(asymmetric: fractional in general) or the fixed zero point of symmetric types (8 for int4,
128 for int8), G = K / GROUP groups per channel; y [M, N] = x @ W.T + bias, then the
activation (``LINEAR_ACTIVATIONS``: gelu, gelu_tanh, silu, relu).

qlinear (``_qlinear_kernel``)
-----------------------------
One program computes a [BLOCK_M, BLOCK_N] tile of y (tiles ordered in groups of GROUP_M rows
of tiles so consecutive programs share weight tiles in L2). Its K loop, per BLOCK_K slice:

- loads the x tile [BLOCK_M, BLOCK_K] (any float dtype) and the weight's byte tile
  [BLOCK_N, BLOCK_K * BITS / 8] (u8: never the dequantized weight);
- dequantizes in registers: ``w = (q - z) * s`` in f32 with the slice's group scales, then
  rounds ``w`` to x's dtype (what the IR reference does: it dequantizes to f32 and casts the
  weight to x's dtype). int4: the byte tile gives two code tiles, low nibbles (even k) and high
  nibbles (odd k); the x tile is split the same way (``tl.split`` of [BM, BK/2, 2]: one
  contiguous load, even / odd columns in registers) and the slice is two dots,
  ``x_even @ w_lo.T + x_odd @ w_hi.T``. fp8 (weight-only): the e4m3 byte becomes an f16 by
  bit arithmetic (``_e4m3_to_f32``: exact for every finite code, subnormals included; no
  fp8 instructions, so it also runs on sm_80) and the per-channel scale is applied the same way;
- accumulates in f32 with ``tl.dot``: f16 / bf16 operands on tensor cores. f32 x
  (``UPCAST``) uses ``input_precision="tf32x3"`` on a GPU (three tf32 MMAs per product:
  f32-level accuracy on tensor cores; plain tf32 would miss the reference's 1e-4 and an
  "ieee" FMA dot spills at these tiles); f32 is for checking, not speed. Under the
  interpreter every dtype takes the UPCAST path: operands in f32, the weight rounded to x's
  dtype first (bf16 dots and bf16 arithmetic are wrong there, triton#11584).

Epilogue: ``+ bias`` (rounded to x's dtype first, as the reference does), the result rounded
to x's dtype, the activation on that value (gelu with ``tl.erf``; gelu_tanh as
``y * sigmoid(2u)`` = ``0.5 y (1 + tanh u)``, tanh being libdevice), stored in x's dtype.
Every rounding to bf16 goes through :func:`round_as` (round to nearest even by the f32 bits)
because the interpreter's own f32 -> bf16 cast truncates; with it the interpreter's bf16
results equal the reference's bit for bit on the test shapes.

Groups and BLOCK_K (:func:`pick_config`): every slice must know its scales. When BLOCK_K
divides the group (or there is one group per channel: any BLOCK_K, the K tail masked) a
slice lies in one group and loads one scale / zero per channel (``ONE_GROUP``): BLOCK_K is
the regime's (64, or 32 for prefill), else 32 if 32 divides the group. Otherwise (groups of
16, 48, 80 ...) the gather path: BLOCK_K 32, each (channel, byte) loads the scale of group
``k // GROUP`` ([BLOCK_N, BLOCK_K * BITS / 8] f32 tiles, pipelined through shared memory like
the codes: at most 2 stages). Any group that divides K works. BLOCK_K >= 32 so each int4
half-dot has K >= 16 (the MMA's).

Tiles (:data:`TILES`, by regime): decode M <= 16: 16 x 64 x 64, 4 warps, 4 stages (M = 1
wastes 15/16 of the MMA rows, irrelevant: decode is bound by the weight's bytes); M <= 64:
64 x 64 x 64, 4 warps, 3 stages; prefill: 128 x 128 x 32, 8 warps, 3 stages (BLOCK_K 64
spills there). f32 x (:data:`TILES_F32`): 16 x 64 x 32 and 32 x 64 x 32 (tf32x3 operands
triple the registers). Chosen so that nothing spills on sm_80 / sm_90 (the compile check);
not tuned on a GPU.

Split-K (decode): with M <= 16 a 4096-channel weight makes 64 programs, half an H100's 132
SMs, each streaming all of K. ``split_k`` (auto: ``pick_split_k``) cuts K into SPLIT slices
of whole BLOCK_K blocks (so a ONE_GROUP slice never straddles a group), each program writes
f32 partials [SPLIT, M, N] and ``_splitk_epilogue`` sums them in a fixed order (deterministic,
no atomics) and applies bias, activation and the cast. Auto picks enough splits to reach
~2 programs per SM with >= 4 K blocks each; on the CPU (the interpreter: every program costs
~2 ms) it picks 1. Whether it wins on a GPU is for ``bench_qlinear`` to measure.

qmatmul (W8A8)
--------------
x is quantized per row (``act_quant="token"``) or over the whole tensor (``"tensor"``) with
the IR's rule (:func:`transfuse.ir.quant.dynamic_quantize_u8`) by ``_act_quant_kernel``: the
range [min, max] widened to 0, ``scale = (max - min) / 255`` (1 for an all-zero range),
``zp = clamp(rne(-min / scale), 0, 255)``, ``q = clamp(rne(x / scale) + zp, 0, 255)`` with
IEEE divisions (``tl.math.div_rn``; Triton's ``/`` is approximate on NVIDIA GPUs) and
round-half-to-even built from ``floor`` (``rne``; libdevice's rint is not available in the
interpreter): the codes equal the reference's bit for bit. Per tensor, the row ranges of
``_act_quant_kernel`` (STATS) are reduced by torch (min / max are exact) and the rows quantized
with that range. Codes are stored as s8 ``q - 128``.

``_w8a8_kernel`` then takes the s8 activations and the weight's codes as s8 ``q - 128``
(symmetric int8: ``w = (q - 128) * s``), ``tl.dot`` s8 x s8 -> s32 (exact), plus the
zero-point correction ``(128 - zp) * sum_k w8`` (the weight's row sums, accumulated in the
same loop) — the exact integer ``sum_k (q_x - zp) (q_w - 128)`` — times ``sx[m] * s[n]`` in
f32, + bias, cast to x's dtype, activation. The reference multiplies the f32 dequantized
values, so the two differ by f32 rounding only. s32 cannot overflow for K <= 32768
(``W8A8_MAX_K``; 255 * 128 * K + the correction < 2**31). Its tile setup (:func:`tile_rows`,
also qlinear's), K-slice loads (:func:`load_k_slice`) and scaled epilogue
(:func:`store_scaled`) are the fp8 GEMM's (:mod:`.fp8_gemm`) too.

Interpreter notes (triton 3.9 and 3.6 with NumPy < 2.4): int8 and fp8 ``tl.dot``,
``tl.split``, ``tl.erf`` and ``tl.math.div_rn`` all run and are exact there; bf16 is upcast
and rounded as said; the tests cover every path at tiny shapes in ~6 s.

"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from transfuse.codegen.triton import env
from transfuse.codegen.triton.kernels._common import time_ms
from transfuse.codegen.triton.kernels.spec import KernelSpec
from transfuse.errors import LoweringError
from transfuse.ir.opdefs.linalg import LINEAR_ACTIVATIONS
from transfuse.ir.types import QuantType

#: x dtypes the kernels take
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of qlinear by row regime; BLOCK_K is
#: the most the regime takes (:func:`pick_config` lowers it to fit the group)
TILES = {
    "decode": (16, 64, 64, 4, 4),    # M <= 16
    "small": (64, 64, 64, 4, 3),     # M <= 64
    "prefill": (128, 128, 32, 8, 3),  # BLOCK_K 64 spills at 128 x 128 (sm_80 and sm_90)
}
#: the tiles for f32 x (tf32x3 dots hold three times the operands: larger tiles spill)
TILES_F32 = {
    "decode": (16, 64, 32, 4, 3),
    "small": (32, 64, 32, 4, 3),
    "prefill": (32, 64, 32, 4, 3),
}
#: BLOCK_K and the most stages of the gather path (a group that 32 does not divide): its
#: per-(channel, k) scales and zeros are pipelined through shared memory like the codes
GATHER_BLOCK_K = 32
GATHER_STAGES = 2
#: tiles of W8A8 (int8 MMA wants BLOCK_K >= 32; 128 halves the loop count)
W8A8_TILES = {
    "decode": (16, 64, 128, 4, 4),
    "small": (64, 64, 128, 4, 3),
    "prefill": (128, 128, 128, 8, 3),
}
#: the largest K whose s32 accumulation in W8A8 cannot overflow
W8A8_MAX_K = 32768
#: rows of tiles per swizzle group (consecutive programs reuse weight tiles)
GROUP_M = 8
#: the split-K epilogue's block
SPLITK_BLOCK = 1024
#: the activation quantizer's K block
ACT_QUANT_BLOCK = 1024


# -- shared pieces ---------------------------------------------------------------------------


@triton.jit
def activate(y, ACTIVATION: tl.constexpr):
    """One of LINEAR_ACTIVATIONS on f32 ``y`` ("" = none)."""
    if ACTIVATION == "gelu":
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 y (1 + tanh u) = y * sigmoid(2u), u = sqrt(2/pi) (y + 0.044715 y^3)
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y * tl.sigmoid(2.0 * u)
    elif ACTIVATION == "silu":
        y = y * tl.sigmoid(y)
    elif ACTIVATION == "relu":
        y = tl.maximum(y, 0.0)
    return y


@triton.jit
def round_as(v, T: tl.constexpr):
    """f32 ``v`` rounded (to nearest even) to the values of dtype ``T``, as f32. bf16 by its
    bits (add 0x7FFF plus the kept lowest bit, clear the low 16): the interpreter's own f32 ->
    bf16 conversion truncates (triton 3.9); a bf16 store of the result is then exact."""
    if T == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        v = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    elif T == tl.float16:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def finish_tile(acc, b_ptr, offs_n, n_mask, OUT_T: tl.constexpr, HAS_BIAS: tl.constexpr,
            ACTIVATION: tl.constexpr):
    """acc [BM, BN] f32 -> + bias (in OUT_T), rounded to OUT_T, activation, rounded to OUT_T
    again (f32 values of OUT_T)."""
    if HAS_BIAS:
        b = round_as(tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32), OUT_T)
        acc = acc + b[None, :]
    return round_as(activate(round_as(acc, OUT_T), ACTIVATION), OUT_T)


@triton.jit
def _e4m3_to_f32(code):
    """u8 e4m3fn bits -> f32 value, by bit arithmetic (no fp8 instructions). The 7 magnitude
    bits shifted left 7 are an f16 whose value is the e4m3 value times 2^-8 for normals and
    subnormals alike (exponent biases 7 vs 15); the sign goes to bit 15."""
    c = code.to(tl.uint16)
    h = ((c & 0x7F) << 7) | ((c & 0x80) << 8)
    return h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program_id(0), swizzled in groups of GROUP_M tile rows."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


@triton.jit
def tile_rows(x_ptr, w_ptr, M, N, stride_xm, stride_wn, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_N] tile of y (:func:`tile_ids`): (offs_m, offs_n, m_mask,
    n_mask, x_rows, w_rows), the last two the pointers to its x rows [BM, 1] and weight rows
    [BN, 1] (row strides ``stride_xm`` / ``stride_wn`` elements, offsets in int64)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    return offs_m, offs_n, m_mask, n_mask, x_rows, w_rows


@triton.jit
def load_k_slice(x_rows, w_rows, k0, K, m_mask, n_mask, X_ZERO: tl.constexpr,
                 W_ZERO: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns [k0, k0 + BLOCK_K) of the x rows and of the weight rows (one code a byte: the
    W8A8 and fp8 GEMMs), [BM, BK] and [BN, BK]; masked elements read the codes ``X_ZERO`` /
    ``W_ZERO`` (a literal of the element type: 0 for int8, 0.0 for e4m3)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k[None, :] < K
    x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask, other=X_ZERO)
    w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask, other=W_ZERO)
    return x, w


@triton.jit
def store_scaled(acc, sx, s_ptr, b_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym,
                 HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """The epilogue of the GEMMs on quantized activations (W8A8, fp8): ``y = acc * sx[m] *
    s[n] + bias`` (f32 ``acc`` [BM, BN], the tile's activation scales ``sx`` [BM], per-channel
    weight scales at ``s_ptr``), rounded to y's dtype, the activation, stored. The caller loads
    ``sx`` (W8A8 before its zero-point correction: loaded after it, sm_80 took 2-4 more
    registers)."""
    s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc * (sx[:, None] * s[None, :])
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    OUT_T: tl.constexpr = y_ptr.dtype.element_ty
    y = round_as(activate(round_as(y, OUT_T), ACTIVATION), OUT_T)
    y_off = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptr + y_off, y.to(OUT_T), mask=m_mask[:, None] & n_mask[None, :])


# -- qlinear: the weight-only dequant GEMM ---------------------------------------------------


@triton.jit
def _qlinear_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, G, GROUP, K_SPLIT,
    stride_xm, stride_ym, stride_ys,
    BITS: tl.constexpr, FP8: tl.constexpr, HAS_ZEROS: tl.constexpr, ZERO_POINT: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ONE_GROUP: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    X_T: tl.constexpr = x_ptr.dtype.element_ty
    # BYTES_K: stored bytes per BLOCK_K slice of a weight row (int4: two codes per byte)
    BYTES_K: tl.constexpr = BLOCK_K * BITS // 8
    PACK: tl.constexpr = 8 // BITS
    pk = K // PACK  # bytes per weight row
    offs_m, offs_n, m_mask, n_mask, x_rows, w_rows = tile_rows(
        x_ptr, w_ptr, M, N, stride_xm, pk, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        # -- load: x slice [BM, BK], weight bytes [BN, BYTES_K] --
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < K),
                    other=0.0)
        offs_b = k0 // PACK + tl.arange(0, BYTES_K)
        wb = tl.load(w_rows + offs_b[None, :], mask=n_mask[:, None] & (offs_b[None, :] < pk),
                     other=0)
        # -- the slice's scales and zero points: [BN, 1] (one group) or [BN, BYTES_K] --
        if ONE_GROUP:
            g_off = offs_n * G + k0 // GROUP
            s = tl.load(s_ptr + g_off, mask=n_mask, other=0.0)[:, None]
            if HAS_ZEROS:
                z = tl.load(z_ptr + g_off, mask=n_mask, other=0.0)[:, None]
        else:
            g = (offs_b * PACK) // GROUP  # group of each byte (both nibbles share it)
            g_off = offs_n[:, None] * G + g[None, :]
            g_mask = n_mask[:, None] & (g[None, :] < G)
            s = tl.load(s_ptr + g_off, mask=g_mask, other=0.0)
            if HAS_ZEROS:
                z = tl.load(z_ptr + g_off, mask=g_mask, other=0.0)
        if not HAS_ZEROS:
            z = ZERO_POINT
        # -- dequantize in registers (f32), round to x's dtype, dot --
        if UPCAST:
            x = x.to(tl.float32)
        if BITS == 4:
            w_lo = ((wb & 0xF).to(tl.float32) - z) * s  # even k
            w_hi = ((wb >> 4).to(tl.float32) - z) * s  # odd k
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            if UPCAST:
                acc += tl.dot(x_even, tl.trans(round_as(w_lo, X_T)),
                              input_precision=DOT_PRECISION)
                acc += tl.dot(x_odd, tl.trans(round_as(w_hi, X_T)),
                              input_precision=DOT_PRECISION)
            else:
                acc += tl.dot(x_even, tl.trans(w_lo.to(X_T)))
                acc += tl.dot(x_odd, tl.trans(w_hi.to(X_T)))
        else:
            if FP8:
                w = _e4m3_to_f32(wb) * s
            else:
                w = (wb.to(tl.float32) - z) * s
            if UPCAST:
                acc += tl.dot(x, tl.trans(round_as(w, X_T)), input_precision=DOT_PRECISION)
            else:
                acc += tl.dot(x, tl.trans(w.to(X_T)))
    # -- epilogue --
    y_off = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:  # f32 partials; _splitk_epilogue finishes
        tl.store(y_ptr + pid_k * stride_ys + y_off, acc, mask=y_mask)
    else:
        OUT_T: tl.constexpr = y_ptr.dtype.element_ty
        y = finish_tile(acc, b_ptr, offs_n, n_mask, OUT_T, HAS_BIAS, ACTIVATION)
        tl.store(y_ptr + y_off, y.to(OUT_T), mask=y_mask)


@triton.jit
def _splitk_epilogue(ws_ptr, b_ptr, y_ptr, M, N, SPLIT_K, HAS_BIAS: tl.constexpr,
                     ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    """y = finish(sum over splits of ws[s, m, n]) (splits summed in order 0, 1, ...)."""
    OUT_T: tl.constexpr = y_ptr.dtype.element_ty
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += round_as(tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32), OUT_T)
    y = round_as(activate(round_as(acc, OUT_T), ACTIVATION), OUT_T)
    tl.store(y_ptr + offs, y.to(OUT_T), mask=mask)


# -- W8A8: activation quantization and the integer GEMM --------------------------------------


@triton.jit
def rne(v):
    """Round half to even of f32 ``v`` (|v| < 2**23), from floor (no libdevice)."""
    f = tl.floor(v)
    d = v - f  # exact
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, sx_ptr, zx_ptr, lo_ptr, hi_ptr, K, stride_xm,
                      STATS: tl.constexpr, FUSED_STATS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row m of x: STATS: store its range widened to 0 (lo[m], hi[m]) and stop. Otherwise
    quantize it to s8 codes ``q - 128`` with DynamicQuantizeLinear's rule over the range of
    the row (FUSED_STATS: computed here) or the one in lo[0] / hi[0] (per tensor), storing
    its scale sx[m] and zero point zx[m]."""
    m = tl.program_id(0)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    offs = tl.arange(0, BLOCK_K)
    if STATS or FUSED_STATS:
        lo = tl.zeros((BLOCK_K,), dtype=tl.float32)  # widened to include 0
        hi = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + offs < K
            v = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, v)
            hi = tl.maximum(hi, v)
        lo_s = tl.min(lo, axis=0)
        hi_s = tl.max(hi, axis=0)
    else:
        lo_s = tl.load(lo_ptr)
        hi_s = tl.load(hi_ptr)
    if STATS:
        tl.store(lo_ptr + m, lo_s)
        tl.store(hi_ptr + m, hi_s)
    else:
        scale = tl.math.div_rn(hi_s - lo_s, 255.0)
        scale = tl.where(scale > 0.0, scale, 1.0)
        zp = tl.minimum(tl.maximum(rne(tl.math.div_rn(-lo_s, scale)), 0.0), 255.0)
        tl.store(sx_ptr + m, scale)
        tl.store(zx_ptr + m, zp)
        q_row = q_ptr + m.to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + offs < K
            v = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            xs = tl.math.div_rn(v, tl.zeros_like(v) + scale)
            q = tl.minimum(tl.maximum(rne(xs) + zp, 0.0), 255.0)
            tl.store(q_row + k0 + offs, (q.to(tl.int32) - 128).to(tl.int8), mask=mask)


@triton.jit
def _w8a8_kernel(
    xq_ptr, w_ptr, sx_ptr, zx_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, stride_ym,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = ((xq + 128 - zx) @ (wq - 128).T) * sx * s + bias, exact s32 products."""
    offs_m, offs_n, m_mask, n_mask, x_rows, w_rows = tile_rows(
        xq_ptr, w_ptr, M, N, K, K, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x, wq = load_k_slice(x_rows, w_rows, k0, K, m_mask, n_mask, 0, 128, BLOCK_K)
        w = (wq.to(tl.int32) - 128).to(tl.int8)  # [BN, BK] s8
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        w_sum += tl.sum(w.to(tl.int32), axis=1)
    # -- epilogue: the zero-point correction, then scales, bias, activation --
    sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
    zx = tl.load(zx_ptr + offs_m, mask=m_mask, other=128.0).to(tl.int32)
    acc += (128 - zx)[:, None] * w_sum[None, :]
    store_scaled(acc.to(tl.float32), sx, s_ptr, b_ptr, y_ptr, offs_m, offs_n, m_mask,
                 n_mask, stride_ym, HAS_BIAS, ACTIVATION)


# -- choosing blocks -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch configuration of ``_qlinear_kernel``."""

    regime: str
    block_m: int
    block_n: int
    block_k: int
    one_group: bool
    num_warps: int
    num_stages: int


def pick_block_k(group: int, k: int, most: int) -> tuple[int, bool]:
    """(BLOCK_K, ONE_GROUP) for a weight of ``k`` features in groups of ``group``, BLOCK_K at
    most ``most``: a slice within one group when the group allows, else the gather path."""
    if group == k or group % most == 0:
        return most, True
    if group % 32 == 0:
        return 32, True
    return GATHER_BLOCK_K, False


def regime(m: int) -> str:
    """The tile regime of M rows: decode (<= 16), small (<= 64), prefill."""
    return "decode" if m <= 16 else "small" if m <= 64 else "prefill"


def tiles(dtype: torch.dtype) -> dict[str, tuple[int, int, int, int, int]]:
    """The tile table of x dtype ``dtype``: :data:`TILES` or :data:`TILES_F32`."""
    return TILES_F32 if dtype == torch.float32 else TILES


def pick_config(m: int, group: int, k: int, dtype: torch.dtype,
                tile: str | None = None) -> Config:
    """The qlinear configuration for M rows of ``dtype`` and the weight's group (``tile``:
    force a regime)."""
    name = tile or regime(m)
    bm, bn, most, warps, stages = tiles(dtype)[name]
    bk, one = pick_block_k(group, k, most)
    return Config(name, bm, bn, bk, one, warps, stages if one else min(stages, GATHER_STAGES))


def block_k_choices(name: str, dtype: torch.dtype) -> list[tuple[int, bool]]:
    """Every (BLOCK_K, ONE_GROUP) :func:`pick_block_k` may give regime ``name``."""
    most = tiles(dtype)[name][2]
    return sorted({(most, True), (32, True), (GATHER_BLOCK_K, False)}, reverse=True)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for f32 operands: "ieee" under the interpreter (NumPy's
    f32 product), "tf32x3" on a GPU for f32 x (three tf32 MMAs: f32-level accuracy on tensor
    cores; an FMA ("ieee") dot spills at these tiles); f16 / bf16 operands ignore it."""
    return "ieee" if env.interpreting() or dtype != torch.float32 else "tf32x3"


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return _cuda_sm_count(torch.device(device).index or torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def pick_split_k(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int,
                 device: torch.device) -> int:
    """Splits of K for a decode-sized product: enough programs for ~2 per SM, each with at
    least 4 K blocks, at most 16 splits; 1 off the GPU and for M > 16."""
    sms = _sm_count(device)
    if not sms or m > 16:
        return 1
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    blocks = triton.cdiv(k, block_k)
    want = triton.cdiv(2 * sms, tiles)
    return max(1, min(want, blocks // 4, 16))


# -- input checks ----------------------------------------------------------------------------


def describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def require(ok: bool, what: str, t, expected: str) -> None:
    if not ok:
        raise LoweringError(f"{what}: expected {expected}, got {describe(t)}")


def check_x(x, k: int | None, op: str) -> None:
    """x is a float tensor [..., K] (any K when ``k`` is None) where the kernels can run: a
    CUDA tensor, or any tensor under the interpreter."""
    require(isinstance(x, torch.Tensor) and x.dim() >= 1 and x.dtype in X_DTYPES
            and (k is None or x.shape[-1] == k), f"{op}: x", x,
            f"f16/bf16/f32 [..., {'K' if k is None else f'K={k}'}]")
    if x.device.type != "cuda" and not env.interpreting():
        raise LoweringError(f"{op}: x: on {x.device}; compiled Triton kernels need CUDA "
                            "tensors (CPU tensors run only under TRITON_INTERPRET=1)")


def check_bias(bias, n: int, device, op: str) -> None:
    if bias is not None:
        require(isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.shape[0] == n
                and bias.dtype.is_floating_point and bias.device == device
                and bias.is_contiguous(), f"{op}: bias", bias,
                f"a contiguous float [N={n}] on {device}")


def check_activation(activation, op: str) -> str:
    if activation is not None and activation not in LINEAR_ACTIVATIONS:
        raise LoweringError(f"{op}: activation must be one of {sorted(LINEAR_ACTIVATIONS)} or "
                            f"None, got {activation!r}")
    return activation or ""


def check_out(out, shape: tuple, dtype: torch.dtype, device, op: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    require(isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(shape)
            and out.dtype == dtype and out.device == device and out.is_contiguous(),
            f"{op}: out", out, f"a contiguous {dtype} {tuple(shape)} on {device}")
    return out


def _check_qweight(x, qweight, scales, zeros, qtype, op: str) -> None:
    if not isinstance(qtype, QuantType):
        raise LoweringError(f"{op}: qtype: expected a QuantType, got {type(qtype).__name__}")
    check_x(x, qtype.k, op)
    dev = x.device
    wdt = torch.uint8 if qtype.scheme == "int" else torch.float8_e4m3fn
    require(isinstance(qweight, torch.Tensor) and qweight.dtype == wdt and qweight.dim() == 2
            and qweight.shape[1] == qtype.packed_k and qweight.is_contiguous()
            and qweight.device == dev, f"{op}: qweight", qweight,
            f"contiguous {wdt} [N, {qtype.packed_k}] on {dev} ({qtype})")
    n = qweight.shape[0]
    for name, t in (("scales", scales), ("zeros", zeros)):
        if name == "zeros" and qtype.symmetric:
            if zeros is not None:
                raise LoweringError(f"{op}: zeros: a symmetric weight ({qtype}) takes none, "
                                    f"got {describe(zeros)}")
            continue
        require(isinstance(t, torch.Tensor) and t.dtype == torch.float32
                and tuple(t.shape) == (n, qtype.groups) and t.is_contiguous() and t.device == dev,
                f"{op}: {name}", t, f"contiguous f32 [{n}, {qtype.groups}] on {dev} ({qtype})")


# -- wrappers --------------------------------------------------------------------------------


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
            zeros: torch.Tensor | None, bias: torch.Tensor | None, qtype: QuantType,
            activation: str | None = None, out: torch.Tensor | None = None, *,
            split_k: int | None = None, tile: str | None = None) -> torch.Tensor:
    """``activation(x @ dequantize(qweight, scales, zeros, qtype).T + bias)`` in x's dtype:
    the IR's ``qlinear`` for int4 / int8 / fp8 (weight-only) storage. ``split_k`` (None:
    :func:`pick_split_k`) and ``tile`` (a regime of :data:`TILES`; None: by M)
    override the choices (tests, benchmarks)."""
    _check_qweight(x, qweight, scales, zeros, qtype, "qlinear")
    act = check_activation(activation, "qlinear")
    n, k = qweight.shape[0], qtype.k
    check_bias(bias, n, x.device, "qlinear")
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = check_out(out, (*x.shape[:-1], n), x.dtype, x.device, "qlinear")
    if m == 0 or n == 0:
        return y
    if k == 0:  # nothing to dequantize: bias and activation only
        ref = reference_qlinear(x, qweight, scales, zeros, bias, activation)
        return y.copy_(ref)
    if tile is not None and tile not in TILES:
        raise LoweringError(f"qlinear: tile must be one of {sorted(TILES)}, got {tile!r}")
    cfg = pick_config(m, qtype.group, k, x.dtype, tile)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    split = split_k if split_k is not None else pick_split_k(m, n, k, bm, bn, bk, x.device)
    if not isinstance(split, int) or split < 1:
        raise LoweringError(f"qlinear: split_k must be a positive int, got {split!r}")
    k_split = triton.cdiv(triton.cdiv(k, bk), split) * bk
    split = triton.cdiv(k, k_split)  # no empty splits
    fp8 = qtype.scheme == "fp8e4m3"
    w = qweight.view(torch.uint8) if fp8 else qweight
    y2 = y.view(m, n)
    target = y2 if split == 1 else torch.empty((split, m, n), dtype=torch.float32,
                                               device=x.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
    _qlinear_kernel[grid](
        x2, w, scales, zeros if zeros is not None else scales,
        bias if bias is not None else scales, target,
        m, n, k, qtype.groups, qtype.group, k_split,
        x2.stride(0), n, m * n,
        BITS=qtype.bits, FP8=fp8, HAS_ZEROS=zeros is not None,
        ZERO_POINT=float(qtype.default_zero or 0), HAS_BIAS=bias is not None,
        ACTIVATION=act, ONE_GROUP=cfg.one_group, SPLIT=split > 1,
        UPCAST=env.interpreting() or x.dtype == torch.float32,
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=GROUP_M, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        _splitk_epilogue[(triton.cdiv(m * n, SPLITK_BLOCK),)](
            target, bias if bias is not None else scales, y2, m, n, split,
            HAS_BIAS=bias is not None, ACTIVATION=act, BLOCK=SPLITK_BLOCK)
    return y


def quantize_activations(x2: torch.Tensor, act_quant: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """x [M, K] (stride 1 along K) -> (s8 codes ``q - 128`` [M, K], scale f32 [M], zero point
    f32 [M]) by :func:`transfuse.ir.quant.dynamic_quantize_u8`'s rule, per row (``token``)
    or per tensor (``tensor``; the scale and zero point repeated per row)."""
    m, k = x2.shape
    dev = x2.device
    q = torch.empty((m, k), dtype=torch.int8, device=dev)
    sx = torch.empty((m,), dtype=torch.float32, device=dev)
    zx = torch.empty((m,), dtype=torch.float32, device=dev)
    if act_quant == "token":
        _act_quant_kernel[(m,)](x2, q, sx, zx, sx, sx, k, x2.stride(0), STATS=False,
                                FUSED_STATS=True, BLOCK_K=ACT_QUANT_BLOCK)
    else:
        lo = torch.empty((m,), dtype=torch.float32, device=dev)
        hi = torch.empty((m,), dtype=torch.float32, device=dev)
        _act_quant_kernel[(m,)](x2, q, sx, zx, lo, hi, k, x2.stride(0), STATS=True,
                                FUSED_STATS=False, BLOCK_K=ACT_QUANT_BLOCK)
        lo_t, hi_t = lo.amin().reshape(1), hi.amax().reshape(1)  # exact
        _act_quant_kernel[(m,)](x2, q, sx, zx, lo_t, hi_t, k, x2.stride(0), STATS=False,
                                FUSED_STATS=False, BLOCK_K=ACT_QUANT_BLOCK)
    return q, sx, zx


def qmatmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
            bias: torch.Tensor | None = None, act_quant: str = "token",
            activation: str | None = None, out: torch.Tensor | None = None, *,
            tile: str | None = None) -> torch.Tensor:
    """The IR's ``qmatmul`` (W8A8): x quantized to u8 per row / tensor, int8 symmetric
    per-channel weight (u8 codes [N, K], scales f32 [N, 1]), exact s32 dot."""
    op = "qmatmul"
    check_x(x, None, op)
    k = x.shape[-1]
    dev = x.device
    require(isinstance(qweight, torch.Tensor) and qweight.dtype == torch.uint8
            and qweight.dim() == 2 and qweight.shape[1] == k and qweight.is_contiguous()
            and qweight.device == dev, f"{op}: qweight", qweight,
            f"contiguous u8 [N, K={k}] on {dev} (int8 symmetric per channel codes)")
    n = qweight.shape[0]
    require(isinstance(scales, torch.Tensor) and scales.dtype == torch.float32
            and tuple(scales.shape) == (n, 1) and scales.is_contiguous() and scales.device == dev,
            f"{op}: scales", scales, f"contiguous f32 [{n}, 1] on {dev}")
    if act_quant not in ("token", "tensor"):
        raise LoweringError(f"{op}: act_quant must be 'token' or 'tensor', got {act_quant!r}")
    if k > W8A8_MAX_K:
        raise LoweringError(f"{op}: x: K={k} could overflow the s32 accumulation "
                            f"(at most {W8A8_MAX_K})")
    act = check_activation(activation, op)
    check_bias(bias, n, dev, op)
    if tile is not None and tile not in W8A8_TILES:
        raise LoweringError(f"{op}: tile must be one of {sorted(W8A8_TILES)}, got {tile!r}")
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = check_out(out, (*x.shape[:-1], n), x.dtype, dev, op)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.copy_(reference_qmatmul(x, qweight, scales, bias, act_quant, activation))
    q, sx, zx = quantize_activations(x2, act_quant)
    bm, bn, bk, warps, stages = W8A8_TILES[tile or regime(m)]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _w8a8_kernel[grid](q, qweight, sx, zx, scales, bias if bias is not None else scales,
                       y.view(m, n), m, n, k, n, HAS_BIAS=bias is not None, ACTIVATION=act,
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M,
                       num_warps=warps, num_stages=stages)
    return y


# -- references ------------------------------------------------------------------------------


def reference_qlinear(x, qweight, scales, zeros, bias, activation=None) -> torch.Tensor:
    """The IR op's reference implementation (f32 dequantized weight cast to x's dtype)."""
    from transfuse.ir.ops import get_op

    return get_op("qlinear").impl([x, qweight, scales, zeros, bias],
                                  {"activation": activation}, {})


def reference_qmatmul(x, qweight, scales, bias, act_quant="token",
                      activation=None) -> torch.Tensor:
    """The IR op's reference implementation (fake-quantized activations, f32 product)."""
    from transfuse.ir.ops import get_op

    return get_op("qmatmul").impl([x, qweight, scales, bias],
                                  {"act_quant": act_quant, "activation": activation}, {})


# -- benchmark -------------------------------------------------------------------------------


def bench_qlinear(device: str, m: int = 1, n: int = 4096, k: int = 4096, group: int = 128,
                  bits: int = 4, symmetric: bool = False, dtype: torch.dtype = torch.float16,
                  reps: int = 10) -> dict:
    """ms per call of :func:`qlinear` vs torch ``F.linear`` on the weight dequantized once
    (in x's dtype), plus W8A8 :func:`qmatmul` (int8 per channel) and the weight bytes read."""
    from transfuse.ir.quant import quantize_rtn

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    qt = QuantType("int", bits, group, symmetric, k)
    qw = quantize_rtn(w, qt)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    qweight, scales = qw.qweight.to(device), qw.scales.to(device)
    zeros = None if qw.zeros is None else qw.zeros.to(device)
    wd = qw.dequantize().to(device=device, dtype=dtype)
    q8 = quantize_rtn(w, QuantType("int", 8, k, True, k))
    q8w, q8s = q8.qweight.to(device), q8.scales.to(device)
    out = {
        "shape": [m, n, k], "qtype": str(qt), "dtype": str(dtype).removeprefix("torch."),
        "weight_bytes": qw.nbytes,
        "qlinear_ms": time_ms(lambda: qlinear(x, qweight, scales, zeros, None, qt), device,
                               reps),
        "torch_linear_dequantized_ms": time_ms(lambda: torch.nn.functional.linear(x, wd),
                                                device, reps),
        "qmatmul_w8a8_ms": time_ms(lambda: qmatmul(x, q8w, q8s), device, reps),
    }
    out["speedup_vs_torch"] = out["torch_linear_dequantized_ms"] / out["qlinear_ms"]
    return out


# -- shipped configurations ------------------------------------------------------------------

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _qlinear_spec(cfg: Config, dtype: torch.dtype, bits: int, fp8: bool,
                  split: bool) -> KernelSpec:
    t = _PTR[dtype]
    sig = {"x_ptr": t, "w_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*fp32", "b_ptr": t,
           "y_ptr": "*fp32" if split else t}
    sig.update({a: "i32" for a in ("M", "N", "K", "G", "GROUP", "K_SPLIT", "stride_xm",
                                   "stride_ym", "stride_ys")})
    const = {"BITS": bits, "FP8": fp8, "HAS_ZEROS": not fp8, "ZERO_POINT": 0.0,
             "HAS_BIAS": True, "ACTIVATION": "gelu", "ONE_GROUP": cfg.one_group,
             "SPLIT": split, "UPCAST": dtype == torch.float32,
             "DOT_PRECISION": "tf32x3" if dtype == torch.float32 else "ieee",
             "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
             "GROUP_M": GROUP_M}
    sig.update({c: "constexpr" for c in const})
    kind = "fp8" if fp8 else f"int{bits}"
    name = (f"qlinear[{cfg.regime} {kind} bk{cfg.block_k}{'' if cfg.one_group else ' gather'}"
            f"{' splitk' if split else ''} {_short(dtype)}]")
    return KernelSpec(f"{__name__}:_qlinear_kernel", name, sig, const, cfg.num_warps,
                      cfg.num_stages)


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shipped() -> list[KernelSpec]:
    specs = []
    for dtype in X_DTYPES:
        for name, (bm, bn, most, warps, stages) in tiles(dtype).items():
            for bk, one in block_k_choices(name, dtype):
                cfg = Config(name, bm, bn, bk, one, warps,
                             stages if one else min(stages, GATHER_STAGES))
                for bits in (4, 8):
                    specs.append(_qlinear_spec(cfg, dtype, bits, False, False))
                if one and bk == most:  # fp8: one scale per channel
                    specs.append(_qlinear_spec(cfg, dtype, 8, True, False))
        specs.append(_qlinear_spec(pick_config(1, 128, 4096, dtype), dtype, 4, False, True))
        specs.append(KernelSpec(
            f"{__name__}:_splitk_epilogue", f"splitk_epilogue[{_short(dtype)}]",
            {"ws_ptr": "*fp32", "b_ptr": _PTR[dtype], "y_ptr": _PTR[dtype], "M": "i32",
             "N": "i32", "SPLIT_K": "i32", "HAS_BIAS": "constexpr", "ACTIVATION": "constexpr",
             "BLOCK": "constexpr"},
            {"HAS_BIAS": True, "ACTIVATION": "gelu", "BLOCK": SPLITK_BLOCK}))
        for name, (bm, bn, bk, warps, stages) in W8A8_TILES.items():
            specs.append(KernelSpec(
                f"{__name__}:_w8a8_kernel", f"w8a8[{name} {_short(dtype)}]",
                {"xq_ptr": "*i8", "w_ptr": "*u8", "sx_ptr": "*fp32", "zx_ptr": "*fp32",
                 "s_ptr": "*fp32", "b_ptr": _PTR[dtype], "y_ptr": _PTR[dtype], "M": "i32",
                 "N": "i32", "K": "i32", "stride_ym": "i32", "HAS_BIAS": "constexpr",
                 "ACTIVATION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                 "BLOCK_K": "constexpr", "GROUP_M": "constexpr"},
                {"HAS_BIAS": True, "ACTIVATION": "gelu", "BLOCK_M": bm, "BLOCK_N": bn,
                 "BLOCK_K": bk, "GROUP_M": GROUP_M}, warps, stages))
        for stats, fused in ((False, True), (True, False), (False, False)):
            specs.append(KernelSpec(
                f"{__name__}:_act_quant_kernel",
                f"act_quant[{'stats' if stats else 'token' if fused else 'tensor'} {_short(dtype)}]",
                {"x_ptr": _PTR[dtype], "q_ptr": "*i8", "sx_ptr": "*fp32", "zx_ptr": "*fp32",
                 "lo_ptr": "*fp32", "hi_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
                 "STATS": "constexpr", "FUSED_STATS": "constexpr", "BLOCK_K": "constexpr"},
                {"STATS": stats, "FUSED_STATS": fused, "BLOCK_K": ACT_QUANT_BLOCK}))
    return specs


#: every configuration the wrappers launch (bias + gelu + zeros: the largest epilogue)
SHIPPED: list[KernelSpec] = _shipped()

__all__ = ["qlinear", "qmatmul", "quantize_activations", "reference_qlinear",
           "reference_qmatmul", "bench_qlinear", "pick_block_k", "pick_config", "pick_split_k",
           "regime", "block_k_choices", "dot_precision", "tiles", "Config", "TILES_F32",
           "SHIPPED", "TILES", "W8A8_TILES", "W8A8_MAX_K"]
