"""Decode attention over a KV cache (split-K + combine; contiguous or paged; grouped heads),
and the kernel that writes a step's new K/V rows into the cache.

What it computes: the read half of the IR's ``cached_attention``
(:mod:`transfuse.ir.opdefs.generation`) for one query token per sequence. Sequence b's query
q[b] sits at position pos = seq_lens[b] - 1 and attends over its cache entries j with
lo <= j <= pos, lo = max(0, pos - window + 1) (0 without a window)::

    x_j = scale * q·k_j;  x_j = softcap * tanh(x_j / softcap);  x_j += slope_h * (j - pos)
    out[b, h] = sum_j softmax(x)_j v_j          (query head h reads kv head h // G)

Glossary: B sequences (one query token each), H query heads, Hkv kv heads, G = H / Hkv query
heads per kv head, D key head dim, Dv value head dim, S splits of the visible range, A cache
slots (contiguous) or blocks in the pool (paged), L slot length (contiguous) or block size K
(paged), W blocks per row of the paged block table, N tokens of a step (cache write).

Cache layouts (as the IR defines them; ``cache_order``):

- contiguous: token-major ``[A, L, Hkv, D]``, head-major ``[A, Hkv, L, D]``; sequence b lives
  in slot ``cache_table[b]`` (an i64 [B] slot table; ``None``: slot b), position j at
  ``[slot, j]``;
- paged: token-major ``[A, K, Hkv, D]``, head-major ``[A, Hkv, K, D]``; ``cache_table`` is the
  i64 [B, W] block table (-1 past a sequence's blocks), position j at
  ``[cache_table[b, j // K], j % K]``.

The kernels see every cache through its token-major view's four strides (the head-major
transpose is free), so the cache order never changes the code; ``paged`` does (a constexpr).

Algorithm (FlashDecoding): a single query row gives one program per (sequence, head) too
little work and too few programs to fill a GPU, so the visible range [lo, seq_len) of each
sequence is cut into S parts. Tiles of BLOCK_N positions are aligned to multiples of
BLOCK_N; the tiles covering [lo, seq_len) are dealt out to the S splits in contiguous runs
of ceil(tiles / S) (per sequence, so short and long sequences alike use every split).

1. ``_decode_split_kernel``, grid (B, Hkv, S): the program of (b, kv head, split) walks its
   tiles, keeps an online softmax in fp32 in the log2 domain (exp2), and writes per query
   head the normalised partial output o_s [Dv] and its log2-sum-exp lse_s (0 and -inf when
   the split saw nothing). With S = 1 it writes the final output directly and no combine
   runs.
2. ``_decode_combine_kernel``, grid (B, H): out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),
   M = max_s lse_s.

A window only shrinks the visible range, so tiles outside it are never visited: the cost is
proportional to min(window, seq_len).

Addressing (:func:`tiling`): contiguous caches read a tile as the slot's base pointer plus
a row offset per position. Paged caches whose block size K is a multiple of 16 get tiles
inside one page (BLOCK_N divides K): one block-id load per tile and the same affine rows.
Pages of other sizes (K < 16, odd K) load a block id per position (a 64-bit address per
row, costly in registers: BLOCK_N = 16 and no software pipelining there).

Grouped heads (H > Hkv): a program serves all G query heads of its kv head, so each K/V
tile is loaded once for G heads. The heads are a [BLOCK_G, D] tile padded to BLOCK_G =
max(16, next_pow2(G)) rows (``tl.dot`` needs M >= 16) and the scores and P·V are ``tl.dot``s.
The padding wastes tensor-core work, not bandwidth, and decode is bandwidth bound: one code
path for every G >= 2 was preferred to a broadcast-multiply variant for G = 2..8, whose
[G, BLOCK_N, D] product would cost registers. With G = 1 (H == Hkv) the kernel uses the
broadcast-multiply-and-sum form (a GEMV in fp32: no tensor cores, no padding).

Precision: fp32 accumulation everywhere; the softmax runs in fp32. The G = 1 form upcasts
K and V to fp32 after loading. The grouped form feeds ``tl.dot`` the cache's own dtype on a
GPU (fp16/bf16 tensor cores; P is cast to V's dtype for P·V, as flash attention does) and
exact fp32 (``ieee``) for fp32 caches; in the interpreter (``UPCAST``) every load is upcast
to fp32 first (bf16 arithmetic is wrong there). The scale is applied after the dot.

Number of splits (:func:`pick_num_splits`): programs per split = B·Hkv; S = ceil(2·SMs /
(B·Hkv)) so that at least two programs per SM are in flight, at most one split per
:data:`MIN_CHUNK` positions of the longest visible range (capacity of the cache, the
window, or the caller's ``max_len``), at most :data:`MAX_SPLITS`, at least 1.

Cache write (``_cache_write_kernel``, grid (N, ceil(Hkv / BLOCK_H))): token t of sequence
s = seq_of_token[t] at p = position_ids[t] writes its [Hkv, D] K row and [Hkv, Dv] V row to
``[table[s], p]`` (contiguous) or ``[table[s, p // K], p % K]`` (paged), the IR's
``write_cache``. Rows whose slot, block or position fall outside the cache are not written
(a GPU kernel cannot raise; the wrapper validates values when the tensors are on the CPU).

Safety of the read: positions whose block id is outside [0, A) (or slot position past L)
are masked out of the softmax instead of read, so bad metadata never reads outside the
cache on a GPU. With CPU tensors (the interpreter) the wrappers check the values and raise.

Interpreter notes (``TRITON_INTERPRET=1``): bf16 arithmetic is wrong there (triton#11584):
every load is upcast to fp32 before any arithmetic; libdevice returns None: tanh is built
from sigmoid written out (1 / (1 + exp)); jit helpers (tl.cdiv, tl.sigmoid) are avoided
because each call re-patches the language module (slow); scalar masks are refused and a
scalar bool ``&`` a block bool gives an int mask, so scalar conditions enter masks through
``tl.where`` and scalar loads use clamped indices; a program costs 10-40 ms there at the
test shapes, so tests use tiny shapes and few programs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from transfuse.codegen.triton import env  # before any @triton.jit: fixes the interpreter mode
from transfuse.codegen.triton.kernels._common import time_ms
from transfuse.codegen.triton.kernels.spec import KernelSpec
from transfuse.errors import LoweringError
from transfuse.ir.opdefs.generation import CACHE_ORDERS, token_major, write_cache

#: at most this many splits (the combine kernel holds them in one vector)
MAX_SPLITS = 64
#: at least this many visible positions per split when the wrapper picks the count
MIN_CHUNK = 256
#: warps per program of every kernel here, but the G = 1 split kernel with tiles of at most
#: 1024 elements (D = 64 with 16-position tiles spilled 8-16 bytes on sm_80 at 4 warps)
NUM_WARPS = 4
SMALL_TILE_WARPS = 2
#: software-pipelining stages of the split kernel; 1 where positions gather their block ids
#: (pipelining the dependent loads took 255 registers and spilled, fp32 D=128 G=4)
NUM_STAGES = 2
GATHER_STAGES = 1
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# -- kernels ----------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, table_ptr, slopes_ptr, part_o_ptr, part_lse_ptr, out_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_ka, stride_kl, stride_kh, stride_kd,
    stride_va, stride_vl, stride_vh, stride_vd,
    stride_tb, stride_tw,
    stride_ob, stride_oh, stride_od,
    H, G, D, DV, CACHE_A, CACHE_L, CACHE_W, NUM_SPLITS, WINDOW, scale, softcap,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PAGED: tl.constexpr, PAGE_TILES: tl.constexpr,
    SLOT_TABLE: tl.constexpr, ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # -- this program's tiles: tiles are aligned to multiples of BLOCK_N, those covering the
    # visible range [lo, seq_len) are dealt out to the splits in contiguous runs --
    seq_len = tl.load(lens_ptr + pid_b).to(tl.int32)
    lo = tl.where(WINDOW > 0, tl.maximum(seq_len - WINDOW, 0), 0)
    first = lo // BLOCK_N
    n_tiles = tl.maximum((seq_len + BLOCK_N - 1) // BLOCK_N - first, 0)
    per_split = (n_tiles + NUM_SPLITS - 1) // NUM_SPLITS  # (no tl.cdiv: slow to interpret)
    start = (first + split * per_split) * BLOCK_N
    end = tl.minimum(start + per_split * BLOCK_N, seq_len)

    # -- the G query heads of kv head kvh: a [BLOCK_G, BLOCK_D] tile --
    offs_g = tl.arange(0, BLOCK_G)
    heads = kvh * G + offs_g
    g_ok = offs_g < G
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q = tl.load(q_ptr + pid_b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST or not USE_DOT:
        q = q.to(tl.float32)
    if ALIBI:
        slope = tl.load(slopes_ptr + heads, mask=g_ok, other=0.0).to(tl.float32)
    table_row = table_ptr + pid_b.to(tl.int64) * stride_tb
    if not PAGED:
        if SLOT_TABLE:
            slot = tl.load(table_row).to(tl.int64)
        else:
            slot = pid_b.to(tl.int64)
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh

    # -- online softmax over the tiles (log2 domain, fp32) --
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        j = n0 + offs_n
        # where each position lives: a base pointer per tile (its slot, or its page when the
        # tile lies in one page) plus a row per position, or (pages shorter than the tile) a
        # block id per position. The row offsets are formed from j inside the loop on
        # purpose: loop-invariant [D, BLOCK_N] offsets would be hoisted and held in
        # registers across iterations (measured: spills)
        if PAGED:
            if PAGE_TILES:  # the tile lies in one page: one block id
                # (a scalar load at a clamped index: the interpreter takes no scalar masks)
                page = n0 // CACHE_L
                blk = tl.load(table_row + tl.minimum(page, CACHE_W - 1) * stride_tw).to(tl.int64)
                blk_ok = (blk >= 0) & (blk < CACHE_A) & (page < CACHE_W)
                k_base = k_head + tl.where(blk_ok, blk, 0) * stride_ka
                v_base = v_head + tl.where(blk_ok, blk, 0) * stride_va
                row = n0 % CACHE_L + offs_n
                # (a scalar condition enters a block mask through where: scalar & block
                # gives an int mask in the interpreter)
                ok = tl.where(blk_ok, (j >= lo) & (j < end), False)
            else:
                page = j // CACHE_L
                blk = tl.load(table_row + page * stride_tw, mask=(j < end) & (page < CACHE_W),
                              other=-1).to(tl.int64)
                ok = (j >= lo) & (j < end) & (blk >= 0) & (blk < CACHE_A)
                k_base = k_head + blk * stride_ka  # [BLOCK_N] pointers
                v_base = v_head + blk * stride_va
                row = j % CACHE_L
        else:
            k_base = k_head + slot * stride_ka
            v_base = v_head + slot * stride_va
            row = j
            ok = (j >= lo) & (j < end) & (j < CACHE_L)
        k_rows = k_base + row * stride_kl  # [BLOCK_N] pointers to each position's row
        v_rows = v_base + row * stride_vl
        if USE_DOT:
            kt = tl.load(k_rows[None, :] + offs_d[:, None] * stride_kd,
                         mask=ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION)  # [BLOCK_G, BLOCK_N] fp32
        else:
            k = tl.load(k_rows[:, None] + offs_d[None, :] * stride_kd,
                        mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_G, BLOCK_N]
        x = s * scale
        if SOFTCAP:
            # softcap·tanh(x / softcap), tanh(y) = 2·sigmoid(2y) - 1 (no libdevice tanh)
            x = softcap * (2.0 / (1.0 + tl.exp(x * (-2.0 / softcap))) - 1.0)
        if ALIBI:
            x += slope[:, None] * (j - (seq_len - 1)).to(tl.float32)[None, :]
        x = tl.where(ok[None, :], x * 1.4426950408889634, float("-inf"))  # · 1/ln 2: exp2
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile of bad rows only
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(x - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_rows[:, None] + offs_dv[None, :] * stride_vd,
                    mask=ok[:, None] & dv_ok[None, :], other=0.0)
        if USE_DOT:
            if UPCAST:
                pv = tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
            else:
                pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # -- the split's normalised output and log2-sum-exp (nothing visible: 0 and -inf) --
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
    if NUM_SPLITS == 1:
        o_ptrs = (out_ptr + pid_b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh
                  + offs_dv[None, :] * stride_od)
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & dv_ok[None, :])
    else:
        part = (pid_b * H + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_lse_ptr + part, lse, mask=g_ok)
        tl.store(part_o_ptr + part[:, None].to(tl.int64) * DV + offs_dv[None, :], o,
                 mask=g_ok[:, None] & dv_ok[None, :])


@triton.jit
def _decode_combine_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, stride_od, H, DV, NUM_SPLITS,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    base = (pid_b * H + h) * NUM_SPLITS
    offs_s = tl.arange(0, BLOCK_S)
    lse = tl.load(part_lse_ptr + base + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse - m_safe), axis=0)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s in range(NUM_SPLITS):
        w = tl.exp2(tl.load(part_lse_ptr + base + s) - m_safe)
        acc += w * tl.load(part_o_ptr + (base + s).to(tl.int64) * DV + offs_dv, mask=dv_ok,
                           other=0.0)
    o = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + pid_b.to(tl.int64) * stride_ob + h * stride_oh + offs_dv * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=dv_ok)


@triton.jit
def _cache_write_kernel(
    k_new_ptr, v_new_ptr, k_ptr, v_ptr, pos_ptr, sot_ptr, table_ptr,
    stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd,
    stride_ka, stride_kl, stride_kh, stride_kd,
    stride_va, stride_vl, stride_vh, stride_vd,
    stride_tb, stride_tw,
    HKV, D, DV, CACHE_A, CACHE_L, CACHE_W, NUM_SEQS,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGED: tl.constexpr, SLOT_TABLE: tl.constexpr,
):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < HKV
    p = tl.load(pos_ptr + t).to(tl.int64)
    seq = tl.load(sot_ptr + t).to(tl.int64)
    seq_ok = (seq >= 0) & (seq < NUM_SEQS) & (p >= 0)
    # table reads at clamped indices (the interpreter takes no scalar masks); a clamped read
    # only happens for a row that is not written
    seq_c = tl.minimum(tl.maximum(seq, 0), NUM_SEQS - 1)
    if PAGED:
        page = p // CACHE_L
        blk = tl.load(table_ptr + seq_c * stride_tb
                      + tl.minimum(tl.maximum(page, 0), CACHE_W - 1) * stride_tw).to(tl.int64)
        blk = tl.where(page < CACHE_W, blk, -1)
        row = p % CACHE_L
    else:
        if SLOT_TABLE:
            blk = tl.load(table_ptr + seq_c * stride_tb).to(tl.int64)
        else:
            blk = seq
        row = p
    ok = tl.where(seq_ok & (blk >= 0) & (blk < CACHE_A) & (row < CACHE_L), h_ok, False)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mk = ok[:, None] & (offs_d < D)[None, :]
    mv = ok[:, None] & (offs_dv < DV)[None, :]
    t64 = t.to(tl.int64)
    k = tl.load(k_new_ptr + t64 * stride_knt + heads[:, None] * stride_knh
                + offs_d[None, :] * stride_knd, mask=mk)
    tl.store(k_ptr + blk * stride_ka + row * stride_kl + heads[:, None] * stride_kh
             + offs_d[None, :] * stride_kd, k.to(k_ptr.dtype.element_ty), mask=mk)
    v = tl.load(v_new_ptr + t64 * stride_vnt + heads[:, None] * stride_vnh
                + offs_dv[None, :] * stride_vnd, mask=mv)
    tl.store(v_ptr + blk * stride_va + row * stride_vl + heads[:, None] * stride_vh
             + offs_dv[None, :] * stride_vd, v.to(v_ptr.dtype.element_ty), mask=mv)


# -- configuration ----------------------------------------------------------------------------


def pow2(n: int, least: int = 16) -> int:
    """The next power of two >= n, at least ``least`` (a tile's padded extent)."""
    return max(least, triton.next_power_of_2(int(n)))


def default_block_n(head_dim: int, grouped: bool, fp32: bool = False) -> int:
    """Positions per tile, by the padded head dim: 64 (D <= 64), 32 (128), 16 (256); grouped
    fp32 caches 16 from D = 128 (the ieee dot runs on FMAs with wide operand layouts). Sized
    by the compile check of SHIPPED: under 255 registers a thread at 4 warps, no spills
    (grouped contiguous D = 128 at 64 positions: 255 registers; at 32: 168)."""
    d = pow2(head_dim)
    if d <= 64:
        return 64
    if grouped and fp32:
        return 16
    return 32 if d <= 128 else 16


def tiling(head_dim: int, grouped: bool, paged: bool, page: int, fp32: bool = False,
           block_n: int | None = None) -> tuple[int, bool]:
    """(BLOCK_N, PAGE_TILES). Paged caches whose block size is a multiple of 16 get tiles
    inside one page (BLOCK_N = the largest power of two <= the default dividing the page):
    one block id per tile and affine addresses. Shorter or odd pages gather a block id per
    position, with BLOCK_N = 16 (per-position 64-bit addresses cost registers).
    ``block_n`` overrides the tile; PAGE_TILES then holds when it divides the page."""
    bn = default_block_n(head_dim, grouped, fp32) if block_n is None else block_n
    if not paged:
        return bn, False
    if block_n is None:
        if page % 16:
            return 16, False
        while page % bn:
            bn //= 2
    return bn, page % bn == 0


def write_block_h(head_dim: int, v_head_dim: int) -> int:
    """kv heads per program of the cache write: tiles of about 1024 elements (2048 spilled
    8 bytes at D = 64)."""
    return max(1, min(32, 1024 // pow2(max(head_dim, v_head_dim))))


def sm_count() -> int:
    """Streaming multiprocessors of the current GPU (1 in the interpreter)."""
    if env.interpreting() or not torch.cuda.is_available():
        return 1
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def pick_num_splits(programs_per_split: int, max_visible: int, sms: int | None = None) -> int:
    """S: enough splits for two programs per SM, at most one per MIN_CHUNK visible positions
    and MAX_SPLITS, at least 1 (module docstring)."""
    sms = sm_count() if sms is None else sms
    want = -(-2 * sms // max(1, programs_per_split))
    cap = max(1, -(-max(1, max_visible) // MIN_CHUNK))
    return max(1, min(want, cap, MAX_SPLITS))


# -- checks -----------------------------------------------------------------------------------


def arg_error(name: str, t: object, expected: str,
              op: str = "decode_attention") -> LoweringError:
    """The LoweringError of op ``op`` for argument ``name`` (value ``t``): what it must be and
    what it is (a tensor's dtype, shape and device, or the repr)."""
    if isinstance(t, torch.Tensor):
        got = (f"a {str(t.dtype).removeprefix('torch.')} tensor of shape {tuple(t.shape)} "
               f"on {t.device}")
    else:
        got = repr(t)
    return LoweringError(f"{op}: {name} must be {expected}, got {got}")


def check_tensor(name: str, t: object, rank: int, dtypes: Sequence[torch.dtype], device,
                 expected: str, op: str = "decode_attention") -> torch.Tensor:
    """``t`` if it is a tensor of this rank, one of ``dtypes``, on ``device`` (unless None);
    else :func:`arg_error` with ``expected``."""
    if (not isinstance(t, torch.Tensor) or t.dim() != rank or t.dtype not in dtypes
            or (device is not None and t.device != device)):
        where = f" on {device}" if device is not None else ""
        raise arg_error(name, t, expected + where, op)
    return t


INDEX_DTYPES = (torch.int64, torch.int32)


def cache_views(k_cache, v_cache, dtype, device, paged, cache_order,
                op: str = "decode_attention"):
    """The checked caches as token-major views (k [A, L|K, Hkv, D], v [A, L|K, Hkv, Dv]):
    4-D, of ``dtype`` on ``device``, the same [A, L|K, Hkv] for k and v, a known order."""
    if cache_order not in CACHE_ORDERS:
        raise arg_error("cache_order", cache_order, f"one of {CACHE_ORDERS}", op)
    if not isinstance(paged, bool):
        raise arg_error("paged", paged, "a bool", op)
    form = "[A, K, Hkv, D]" if paged else "[A, L, Hkv, D]"
    if cache_order == "head-major":
        form = form.replace("K, Hkv", "Hkv, K").replace("L, Hkv", "Hkv, L")
    kc = token_major(check_tensor("k_cache", k_cache, 4, (dtype,), device,
                             f"a 4-D {dtype} {form} {cache_order} cache", op), cache_order)
    vc = token_major(check_tensor("v_cache", v_cache, 4, (dtype,), device,
                             f"a 4-D {dtype} {form} {cache_order} cache", op), cache_order)
    if vc.shape[:3] != kc.shape[:3]:
        raise arg_error("v_cache", v_cache, f"the same {form[:-4]} as k_cache "
                    f"{tuple(k_cache.shape)} ({cache_order})", op)
    return kc, vc


def check_table(cache_table, b: int, paged: bool, device,
                op: str = "decode_attention") -> torch.Tensor | None:
    """The checked ``cache_table`` of B sequences: the [B, W] block table (paged), None or the
    [B] slot table (contiguous); int64 or int32 on ``device``."""
    if paged:
        want = f"an int64 [B={b}, W] block table (paged)"
        check_tensor("cache_table", cache_table, 2, INDEX_DTYPES, device, want, op)
        if cache_table.shape[0] != b or cache_table.shape[1] < 1:
            raise arg_error("cache_table", cache_table, want, op)
        return cache_table
    if cache_table is None:
        return None
    want = f"None or an int64 [B={b}] slot table (contiguous)"
    check_tensor("cache_table", cache_table, 1, INDEX_DTYPES, device, want, op)
    if cache_table.shape[0] != b:
        raise arg_error("cache_table", cache_table, want, op)
    return cache_table


def _check_values(seq_lens, table, paged, kc, window) -> None:
    """Value checks, only for CPU tensors (on a GPU they would synchronise)."""
    if seq_lens.device.type != "cpu":
        return
    a, length = kc.shape[0], kc.shape[1]
    cap = table.shape[1] * length if paged else length
    lens = seq_lens.to(torch.int64)
    if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > cap):
        raise LoweringError(f"decode_attention: seq_lens {lens.tolist()} must lie in 0..{cap} "
                            f"(the positions a sequence's cache holds)")
    if table is None:
        if not paged and lens.numel() > a:
            raise LoweringError(f"decode_attention: without a cache_table sequence b uses slot "
                                f"b, but there are {lens.numel()} sequences and {a} slots")
        return
    if paged:
        for b, n in enumerate(lens.tolist()):
            lo = max(0, n - window) if window else 0
            ids = table[b, lo // length: -(-n // length)]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= a):
                raise LoweringError(
                    f"decode_attention: cache_table row {b} holds block ids {ids.tolist()} for "
                    f"its {n} cached positions; each must lie in 0..{a - 1}")
    elif table.numel() and (int(table.min()) < 0 or int(table.max()) >= a):
        raise LoweringError(f"decode_attention: cache_table slots {table.tolist()} must lie in "
                            f"0..{a - 1}")


# -- wrappers ---------------------------------------------------------------------------------


def _split_launch(q, kc, vc, seq_lens, table, slopes, part_o, part_lse, out, *, paged,
                  scale, window, softcap, num_splits, block_n_=None, interpret=None):
    """The split kernel's arguments and constexprs (shared by the wrapper and SHIPPED, which
    describes the GPU's launches: ``interpret=False``)."""
    interpret = env.interpreting() if interpret is None else interpret
    b, h, d = q.shape
    a, length, hkv, _ = kc.shape
    dv = vc.shape[3]
    g = h // hkv
    grouped = g > 1
    bn, page_tiles = tiling(d, grouped, paged, length, q.dtype == torch.float32, block_n_)
    tbl = table if table is not None else seq_lens
    args = (q, kc, vc, seq_lens, tbl, slopes if slopes is not None else q, part_o, part_lse,
            out, *q.stride(), *kc.stride(), *vc.stride(),
            tbl.stride(0), tbl.stride(1) if tbl.dim() == 2 else 0, *out.stride(),
            h, g, d, dv, a, length, tbl.shape[1] if paged else 1, num_splits, window or 0,
            float(scale), float(softcap or 1.0))
    const = dict(BLOCK_G=max(16, triton.next_power_of_2(g)) if grouped else 1,
                 BLOCK_N=bn, BLOCK_D=pow2(d), BLOCK_DV=pow2(dv), PAGED=paged,
                 PAGE_TILES=page_tiles, SLOT_TABLE=table is not None and not paged,
                 ALIBI=slopes is not None, SOFTCAP=softcap is not None, USE_DOT=grouped,
                 UPCAST=interpret or q.dtype == torch.float32,
                 DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    stages = GATHER_STAGES if paged and not page_tiles else NUM_STAGES
    warps = SMALL_TILE_WARPS if not grouped and bn * pow2(d) <= 1024 else NUM_WARPS
    return args, const, (b, hkv, num_splits), dict(num_warps=warps, num_stages=stages)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     seq_lens: torch.Tensor, cache_table: torch.Tensor | None = None, *,
                     paged: bool, cache_order: str = "token-major", scale: float | None = None,
                     window: int | None = None, alibi: Sequence[float] | torch.Tensor | None = None,
                     softcap: float | None = None, num_splits: int | None = None,
                     max_len: int | None = None, block_n: int | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, Dv]: each sequence's one query token q [B, H, D] attending over the first
    seq_lens[b] positions of its cache (module docstring), read in place.

    ``cache_table``: paged, the i64 [B, W] block table; contiguous, None (slot b) or the i64
    [B] slot table. ``scale`` defaults to 1/sqrt(D); ``window`` >= 1 positions (the query's
    own included); ``alibi``: H slopes; ``softcap`` > 0. ``num_splits``: S (default
    :func:`pick_num_splits` of B·Hkv and ``max_len``, an upper bound of seq_lens known on the
    host; default the cache's capacity, or the window). ``block_n``: override the tile (a
    power of two 16..128; tests and tuning; not a shipped configuration). ``out``: the
    [B, H, Dv] output to write (any strides; q's dtype).
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in DTYPES:
        raise arg_error("q", q, "a [B, H, D] fp16/bf16/fp32 tensor (one query token per sequence)")
    dev = q.device
    if dev.type != env.device():
        raise arg_error("q", q, f"on {env.device()} (where the kernels run here)")
    b, h, d = q.shape
    kc, vc = cache_views(k_cache, v_cache, q.dtype, dev, paged, cache_order)
    a, length, hkv, dk = kc.shape
    dv = vc.shape[3]
    if dk != d or hkv < 1 or h % hkv:
        raise arg_error("k_cache", k_cache, f"a cache of Hkv kv heads dividing H={h} and head dim "
                    f"D={d} (q's)")
    if b < 1 or h < 1 or d < 1:
        raise arg_error("q", q, "non-empty")
    check_tensor("seq_lens", seq_lens, 1, INDEX_DTYPES, dev, f"an int64 [B={b}] tensor")
    if seq_lens.shape[0] != b:
        raise arg_error("seq_lens", seq_lens, f"an int64 [B={b}] tensor")
    table = check_table(cache_table, b, paged, dev)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(
            scale):
        raise arg_error("scale", scale, "None or a finite float")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise arg_error("window", window, "None or an int >= 1")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not softcap > 0):
        raise arg_error("softcap", softcap, "None or a float > 0")
    slopes = None
    if alibi is not None:
        try:
            slopes = torch.as_tensor(alibi, dtype=torch.float32, device=dev).contiguous()
        except (TypeError, ValueError, RuntimeError):
            slopes = None
        if slopes is None or slopes.shape != (h,):
            raise arg_error("alibi", alibi, f"None or H={h} slopes (floats)")
    if block_n is not None and block_n not in (16, 32, 64, 128):
        raise arg_error("block_n", block_n, "None or a power of two in 16..128")
    capacity = table.shape[1] * length if paged else length
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)
                                or max_len < 0):
        raise arg_error("max_len", max_len, "None or an int >= 0")
    visible = min(capacity, max_len if max_len is not None else capacity, window or capacity)
    if num_splits is None:
        num_splits = pick_num_splits(b * hkv, visible)
    elif (isinstance(num_splits, bool) or not isinstance(num_splits, int)
          or not 1 <= num_splits <= MAX_SPLITS):
        raise arg_error("num_splits", num_splits, f"None or an int in 1..{MAX_SPLITS}")
    if out is None:
        out = torch.empty((b, h, dv), dtype=q.dtype, device=dev)
    elif not (isinstance(out, torch.Tensor) and out.shape == (b, h, dv) and out.dtype == q.dtype
              and out.device == dev):
        raise arg_error("out", out, f"a {q.dtype} [B={b}, H={h}, Dv={dv}] tensor on {dev}")
    _check_values(seq_lens, table, paged, kc, window)
    if num_splits > 1:
        part_o = torch.empty((b, h, num_splits, dv), dtype=torch.float32, device=dev)
        part_lse = torch.empty((b, h, num_splits), dtype=torch.float32, device=dev)
    else:
        part_o = part_lse = out  # unused: the split kernel stores the output itself
    args, const, grid, launch = _split_launch(
        q, kc, vc, seq_lens, table, slopes, part_o, part_lse, out, paged=paged, scale=scale,
        window=window, softcap=softcap, num_splits=num_splits, block_n_=block_n)
    _decode_split_kernel[grid](*args, **const, **launch)
    if num_splits > 1:
        _decode_combine_kernel[(b, h)](part_o, part_lse, out, *out.stride(), h, dv, num_splits,
                                       BLOCK_S=MAX_SPLITS, BLOCK_DV=pow2(dv),
                                       num_warps=NUM_WARPS, num_stages=1)
    return out


def _write_launch(k_new, v_new, kc, vc, position_ids, seq_of_token, table, paged, num_seqs):
    n, hkv, d = k_new.shape
    dv = v_new.shape[2]
    bh = write_block_h(d, dv)
    tbl = table if table is not None else position_ids
    args = (k_new, v_new, kc, vc, position_ids, seq_of_token, tbl, *k_new.stride(),
            *v_new.stride(), *kc.stride(), *vc.stride(), tbl.stride(0),
            tbl.stride(1) if tbl.dim() == 2 else 0, hkv, d, dv, kc.shape[0], kc.shape[1],
            tbl.shape[1] if paged else 1, num_seqs)
    const = dict(BLOCK_H=bh, BLOCK_D=pow2(d, 1), BLOCK_DV=pow2(dv, 1), PAGED=paged,
                 SLOT_TABLE=table is not None and not paged)
    return args, const, (n, -(-hkv // bh))


def write_kv_cache(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, position_ids: torch.Tensor, seq_of_token: torch.Tensor,
                   cache_table: torch.Tensor | None = None, *, paged: bool,
                   cache_order: str = "token-major", num_seqs: int | None = None) -> None:
    """Write a step's new rows k_new [N, Hkv, D], v_new [N, Hkv, Dv] (any strides) into the
    caches in place: the write half of ``cached_attention`` (module docstring).

    ``position_ids`` i64 [N] (or [1, N]), ``seq_of_token`` i64 [N]; ``cache_table`` as in
    :func:`decode_attention` (its rows are the step's B sequences); ``num_seqs``: B when there
    is no table (contiguous, slot = sequence index; default the number of slots).
    """
    op = "write_kv_cache"
    if not isinstance(k_new, torch.Tensor) or k_new.dim() != 3 or k_new.dtype not in DTYPES:
        raise arg_error("k_new", k_new, "an [N, Hkv, D] fp16/bf16/fp32 tensor", op)
    dev = k_new.device
    if dev.type != env.device():
        raise arg_error("k_new", k_new, f"on {env.device()} (where the kernels run here)", op)
    n, hkv, d = k_new.shape
    kc, vc = cache_views(k_cache, v_cache, k_new.dtype, dev, paged, cache_order, op)
    if kc.shape[2:] != (hkv, d):
        raise arg_error("k_cache", k_cache, f"a cache of Hkv={hkv} heads of D={d} (k_new's)", op)
    dv = vc.shape[3]
    if not (isinstance(v_new, torch.Tensor) and v_new.shape == (n, hkv, dv)
            and v_new.dtype == k_new.dtype and v_new.device == dev):
        raise arg_error("v_new", v_new, f"a {k_new.dtype} [N={n}, Hkv={hkv}, Dv={dv}] tensor on "
                    f"{dev}", op)
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and \
            position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    for name, t in (("position_ids", position_ids), ("seq_of_token", seq_of_token)):
        check_tensor(name, t, 1, INDEX_DTYPES, dev, f"an int64 [N={n}] tensor", op)
        if t.shape[0] != n:
            raise arg_error(name, t, f"an int64 [N={n}] tensor", op)
    if cache_table is None and not paged:
        table = None
        num_seqs = kc.shape[0] if num_seqs is None else num_seqs
    else:
        rows = cache_table.shape[0] if isinstance(cache_table, torch.Tensor) and \
            cache_table.dim() >= 1 and cache_table.shape[0] >= 1 else 0
        table = check_table(cache_table, max(rows, 1), paged, dev, op)
        num_seqs = rows
    if n == 0:
        return
    if dev.type == "cpu":  # value checks (on a GPU they would synchronise)
        pos, sot = position_ids.to(torch.int64), seq_of_token.to(torch.int64)
        cap = table.shape[1] * kc.shape[1] if paged else kc.shape[1]
        if int(pos.min()) < 0 or int(pos.max()) >= cap:
            raise LoweringError(f"{op}: position_ids {pos.tolist()} must lie in 0..{cap - 1}")
        if int(sot.min()) < 0 or int(sot.max()) >= num_seqs:
            raise LoweringError(f"{op}: seq_of_token {sot.tolist()} must lie in "
                                f"0..{num_seqs - 1} (the step's sequences)")
        where = (table[sot, pos // kc.shape[1]] if paged else
                 table[sot] if table is not None else sot)
        if int(where.min()) < 0 or int(where.max()) >= kc.shape[0]:
            name = "cache_table" if table is not None else "seq_of_token"
            raise LoweringError(f"{op}: {name} sends the step's tokens to "
                                f"{'blocks' if paged else 'slots'} {where.tolist()}; each must "
                                f"lie in 0..{kc.shape[0] - 1}")
    args, const, grid = _write_launch(k_new, v_new, kc, vc, position_ids, seq_of_token, table,
                                      paged, num_seqs)
    _cache_write_kernel[grid](*args, **const, num_warps=NUM_WARPS, num_stages=1)


# -- references -------------------------------------------------------------------------------


def reference_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               seq_lens: torch.Tensor, cache_table: torch.Tensor | None = None,
                               *, paged: bool, cache_order: str = "token-major",
                               scale: float | None = None, window: int | None = None,
                               alibi: Sequence[float] | torch.Tensor | None = None,
                               softcap: float | None = None) -> torch.Tensor:
    """The same function in plain torch, one sequence at a time, in fp32 (q's dtype out)."""
    kc, vc = token_major(k_cache, cache_order), token_major(v_cache, cache_order)
    b, h, d = q.shape
    length, hkv = kc.shape[1], kc.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, h, vc.shape[3], dtype=torch.float32, device=q.device)
    for i in range(b):
        n = int(seq_lens[i])
        if n == 0:
            continue
        if paged:
            rows = kc[cache_table[i, :-(-n // length)]], vc[cache_table[i, :-(-n // length)]]
            keys, vals = (r.reshape(-1, *r.shape[2:])[:n] for r in rows)
        else:
            slot = int(cache_table[i]) if cache_table is not None else i
            keys, vals = kc[slot, :n], vc[slot, :n]
        keys = keys.float().repeat_interleave(h // hkv, dim=1)  # [n, H, D]
        vals = vals.float().repeat_interleave(h // hkv, dim=1)
        x = torch.einsum("hd,jhd->hj", q[i].float(), keys) * scale
        if softcap is not None:
            x = softcap * torch.tanh(x / softcap)
        j = torch.arange(n, device=q.device)
        if alibi is not None:
            slopes = torch.as_tensor(alibi, dtype=torch.float32, device=q.device)
            x = x + slopes[:, None] * (j - (n - 1)).float()
        if window is not None:
            x = x.masked_fill(j < n - window, float("-inf"))
        out[i] = torch.einsum("hj,jhd->hd", torch.softmax(x, dim=-1), vals)
    return out.to(q.dtype)


def reference_write_kv_cache(k_new, v_new, k_cache, v_cache, position_ids, seq_of_token,
                             cache_table=None, *, paged: bool, cache_order: str = "token-major"):
    """The IR's ``write_cache`` on copies: returns the written (k_cache, v_cache)."""
    kc, vc = k_cache.clone(), v_cache.clone()
    pos = position_ids.reshape(-1)
    table = cache_table if cache_table is not None else torch.arange(
        kc.shape[0], device=kc.device)
    bs = token_major(kc, cache_order).shape[1] if paged else None
    write_cache(token_major(kc, cache_order), k_new, pos, seq_of_token, table, bs)
    write_cache(token_major(vc, cache_order), v_new, pos, seq_of_token, table, bs)
    return kc, vc


# -- benchmark --------------------------------------------------------------------------------


def bench_decode_attention(device: str | torch.device, *, batch: int = 8, heads: int = 32,
                           kv_heads: int = 8, head_dim: int = 128, cache_len: int = 4096,
                           dtype: torch.dtype = torch.bfloat16, paged: bool = True,
                           block_size: int = 16, cache_order: str = "token-major",
                           num_splits: int | None = None, seed: int = 0) -> dict:
    """Time :func:`decode_attention` against ``F.scaled_dot_product_attention`` on the cache
    gathered into a dense [B, Hkv, T, D] tensor (gathering not timed; a key-padding mask when
    the lengths differ, which here they do not: every sequence holds ``cache_len``). On a GPU
    :func:`triton.testing.do_bench` (ms, median); in the interpreter one timed run each.
    Returns shapes, both times, the bytes the kernel must read and its GB/s, and the max abs
    difference of the two outputs."""
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    nblk = -(-cache_len // block_size)
    if paged:
        shape = (batch * nblk, block_size, kv_heads, head_dim)
        perm = torch.randperm(batch * nblk, generator=g)
        table = perm.reshape(batch, nblk).to(device)
    else:
        shape = (batch, cache_len, kv_heads, head_dim)
        table = None
    if cache_order == "head-major":
        shape = (shape[0], shape[2], shape[1], shape[3])
    kc = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    vc = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(batch, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    lens = torch.full((batch,), cache_len, dtype=torch.int64, device=device)

    def run_triton():
        return decode_attention(q, kc, vc, lens, table, paged=paged, cache_order=cache_order,
                                num_splits=num_splits)

    ktm, vtm = token_major(kc, cache_order), token_major(vc, cache_order)
    if paged:
        kd = ktm[table].reshape(batch, -1, kv_heads, head_dim)[:, :cache_len]
        vd = vtm[table].reshape(batch, -1, kv_heads, head_dim)[:, :cache_len]
    else:
        kd, vd = ktm, vtm
    kd, vd = kd.transpose(1, 2).contiguous(), vd.transpose(1, 2).contiguous()  # [B, Hkv, T, D]
    qd = q[:, :, None, :]

    def run_sdpa():
        return torch.nn.functional.scaled_dot_product_attention(
            qd, kd, vd, enable_gqa=kv_heads != heads)[:, :, 0]

    o_t, o_s = run_triton(), run_sdpa()
    t_triton = time_ms(run_triton, device, warmup=False)
    t_sdpa = time_ms(run_sdpa, device, warmup=False)
    nbytes = 2 * batch * cache_len * kv_heads * head_dim * kc.element_size()
    return {"batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "cache_len": cache_len, "dtype": str(dtype).removeprefix("torch."), "paged": paged,
            "block_size": block_size if paged else None, "cache_order": cache_order,
            "triton_ms": t_triton, "sdpa_ms": t_sdpa, "bytes": nbytes,
            "triton_gbps": nbytes / (t_triton * 1e-3) / 1e9,
            "sdpa_gbps": nbytes / (t_sdpa * 1e-3) / 1e9,
            "max_abs_diff": float((o_t.float() - o_s.float()).abs().max())}


# -- shipped configurations -------------------------------------------------------------------


def _sig_type(x) -> str:
    if isinstance(x, torch.Tensor):
        return "*" + _TL_NAME.get(x.dtype, {torch.int64: "i64", torch.int32: "i32"}.get(x.dtype))
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i32" if -2**31 <= x < 2**31 else "i64"
    return "fp32"


def kernel_spec(fn, name: str, args: Sequence, const: dict, num_stages: int,
                num_warps: int = NUM_WARPS) -> KernelSpec:
    """A KernelSpec for launching ``fn`` with ``args``: ints equal to 1 become constexprs, as
    Triton's launcher specialises them."""
    names = fn.arg_names
    sig, consts = {}, dict(const)
    for pname, value in zip(names, args):
        if isinstance(value, int) and not isinstance(value, bool) and value == 1:
            sig[pname], consts[pname] = "constexpr", 1
        else:
            sig[pname] = _sig_type(value)
    for pname in const:
        sig[pname] = "constexpr"
    sig = {p: sig[p] for p in names}
    return KernelSpec(f"{__name__}:{fn.__name__}", name, sig, consts, num_warps, num_stages)


def _shipped() -> list[KernelSpec]:
    """Every code path the wrappers launch on a GPU at head dims 64/128/256 (Dv = D): for the
    split kernel dtype x D x grouped (G = 4) or not x cache kind (contiguous; paged with
    blocks of 16 and 128 tokens: tiles inside a page; blocks of 8: a block id per position),
    plus ALiBi + softcap on at D = 256 bf16 (the most registers); the combine per dtype x Dv;
    the cache write per dtype x D x paged. Built from meta tensors of a representative shape
    (B = 8, H = 32, 4 splits); duplicates (same constexprs and signature) once."""
    meta = torch.device("meta")
    specs: dict[tuple, KernelSpec] = {}

    def add(fn, name, args, const, num_stages, num_warps=NUM_WARPS):
        spec = kernel_spec(fn, name, args, const, num_stages, num_warps)
        key = (spec.kernel, tuple(spec.signature.items()), tuple(sorted(
            (k, str(v)) for k, v in spec.constexprs.items())), num_stages, num_warps)
        specs.setdefault(key, spec)

    b, h, splits = 8, 32, 4
    lens = torch.empty(b, dtype=torch.int64, device=meta)
    for dtype in DTYPES:
        tn = _TL_NAME[dtype]
        for d in (64, 128, 256):
            q = torch.empty(b, h, d, dtype=dtype, device=meta)
            part_o = torch.empty(b, h, splits, d, device=meta)
            part_lse = torch.empty(b, h, splits, device=meta)
            for kind, page in (("contig", None), ("paged16", 16), ("paged128", 128),
                               ("paged8", 8)):
                paged = page is not None
                for hkv in (h, 8):
                    shape = (4096 // page * b, page, hkv, d) if paged else (b, 4096, hkv, d)
                    kc = torch.empty(shape, dtype=dtype, device=meta)
                    table = torch.empty((b, 4096 // page) if paged else (b,), dtype=torch.int64,
                                        device=meta)
                    feats = [(None, None)]
                    if d == 256 and dtype == torch.bfloat16:
                        feats.append((torch.empty(h, device=meta), 30.0))
                    for slopes, cap in feats:
                        args, const, _, launch = _split_launch(
                            q, kc, kc, lens, table, slopes, part_o, part_lse, q, paged=paged,
                            scale=0.125, window=None, softcap=cap, num_splits=splits,
                            interpret=False)
                        name = (f"decode_split[hd{d} {tn} {kind} "
                                f"{'G4' if hkv < h else 'G1'}{' alibi softcap' if cap else ''}]")
                        add(_decode_split_kernel, name, args, const, **launch)
                    if hkv == 8 and page in (None, 16):
                        kn = torch.empty(16, hkv, d, dtype=dtype, device=meta)
                        pos = torch.empty(16, dtype=torch.int64, device=meta)
                        args, const, _ = _write_launch(kn, kn, kc, kc, pos, pos, table, paged, b)
                        add(_cache_write_kernel, f"kv_cache_write[hd{d} {tn} "
                            f"{'paged' if paged else 'contig'}]", args, const, 1)
            args = (part_o, part_lse, q, *q.stride(), h, d, splits)
            add(_decode_combine_kernel, f"decode_combine[hd{d} {tn}]", args,
                dict(BLOCK_S=MAX_SPLITS, BLOCK_DV=pow2(d)), 1)
    return list(specs.values())


SHIPPED: list[KernelSpec] = _shipped()

__all__ = ["decode_attention", "write_kv_cache", "reference_decode_attention",
           "reference_write_kv_cache", "bench_decode_attention", "pick_num_splits", "default_block_n",
           "write_block_h", "sm_count", "SHIPPED", "MAX_SPLITS", "MIN_CHUNK"]
