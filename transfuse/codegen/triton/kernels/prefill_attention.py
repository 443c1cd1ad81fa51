"""Prefill attention over a KV cache: tiles of a step's query tokens, FlashAttention-style
(contiguous or paged cache; grouped heads; prefill chunks and mixed steps).

What it computes: the read half of the IR's ``cached_attention``
(:mod:`transfuse.ir.opdefs.generation`) for every token of a generation step. Token t (q is
token-major [N, H, D]) of sequence s = seq_of_token[t] at position p = position_ids[t] attends
over its sequence's cache entries j with lo <= j <= p, lo = max(0, p - window + 1) (0 without
a window)::

    x_j = scale * q·k_j;  x_j = softcap * tanh(x_j / softcap);  x_j += slope_h * (j - p)
    out[t, h] = sum_j softmax(x)_j v_j          (query head h reads kv head h // G)

The cache must already hold the step's own K/V (``decode_attention.write_kv_cache`` runs
first). Same function as :func:`~.decode_attention.decode_attention` with one "sequence" per
token (lengths p + 1); that form re-reads a sequence's whole visible range once per token,
O(N·T) cache traffic for a chunk of N tokens over T positions. Here a program serves a tile
of up to BLOCK_M tokens of one sequence and reads each key tile once for all of them:
O(N / BLOCK_M · T).

Glossary: N tokens of the step, B sequences of the step (rows of the cache table), H query
heads, Hkv kv heads, G = H / Hkv, D key head dim, Dv value head dim, M query tile
(``BLOCK_M`` tokens), BN key tile (``BLOCK_N`` positions), A cache slots (contiguous) or
blocks in the pool (paged), L slot length (contiguous) or block size K (paged), W blocks per
row of the paged block table. Cache layouts and orders: as in
:mod:`~.decode_attention` (the kernel sees every cache through its token-major strides).

Tile map (:func:`prefill_tiles`, on the host): the step's tokens are cut into runs of
consecutive tokens of one sequence, each run into tiles of at most BLOCK_M tokens. A tile is
(first token, token count, sequence). Positions inside a tile are loaded per row: they need
not be consecutive or sorted.

Algorithm: grid (tiles, H); the program of (tile, head h) loads its [M, D] query rows and
their positions, and walks the key tiles from min(lo) of its rows (aligned down to BLOCK_N)
to max(p) + 1 with an online softmax in fp32 in the log2 domain (exp2): running row max m,
row sum l, accumulator acc [M, Dv]; per key tile s = q·kᵀ (``tl.dot``), the row masks
lo_row <= j <= p_row, p = exp2(x - m_new), acc = acc·exp2(m_old - m_new) + p·V. A window
only shrinks the range, so a chunk with a window reads about (window + M) positions per
tile, not its whole history. Every key tile is masked per row (no unmasked fast path for
tiles all rows see in full, unlike flash_attention: the rows' positions are data here).
A row that sees nothing (a padded row, a sequence outside the table) gets zeros.

Addressing (decode_attention's :func:`~.decode_attention.tiling`, with the grouped tile
sizes): a contiguous slot is a base pointer plus a row per position; paged caches whose
block size is a multiple of 16 get key tiles inside one page (one block id per tile); other
block sizes (odd, < 16) load a block id per position (BLOCK_N = 16, no pipelining).

Precision: fp32 accumulation, fp32 softmax. On a GPU fp16/bf16 tiles go to the tensor cores
as they are (P cast to V's dtype for P·V); fp32 uses exact fp32 (``ieee``) dots. In the
interpreter (``UPCAST``) every load is upcast to fp32 first.

Block sizes (:func:`prefill_config`; ``SHIPPED`` lists each): BLOCK_M = 64 for fp16/bf16,
16 for fp32; BLOCK_N from ``tiling`` (64 / 32 / 16 by padded D; fp32 at most 32, 16 from
D = 128); 8 warps at a padded head dim of 256 (fp32: only where positions gather their
block ids), else 4; 2 stages, 1 where positions gather their block ids. Sized by the compile check (no spills, sm_80 / sm_90,
triton 3.6 and 3.9), not by timing: no GPU has run this kernel.

Safety: block ids outside [0, A), slots outside [0, A), sequences outside [0, B), tile rows
outside [0, N) and positions past the cache (p >= W·K paged, >= L contiguous) are masked,
never read. With CPU tensors (the interpreter) the wrapper checks the values and raises.

Interpreter notes (``TRITON_INTERPRET=1``): as in decode_attention: loads upcast to fp32
(bf16 arithmetic is wrong there, triton#11584); tanh from exp written out; no jit helpers
(each call re-patches the language module); scalar conditions enter masks through
``tl.where`` and scalar loads use clamped indices. A program costs 10-40 ms there: tests
pass ``block_m=16`` and use a few short sequences.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from transfuse.codegen.triton import env  # before any @triton.jit: fixes the interpreter mode
from transfuse.codegen.triton.kernels._common import time_ms
from transfuse.codegen.triton.kernels.decode_attention import (
    DTYPES,
    INDEX_DTYPES,
    arg_error,
    cache_views,
    check_table,
    check_tensor,
    decode_attention,
    kernel_spec,
    pow2,
    reference_decode_attention,
    tiling,
)
from transfuse.codegen.triton.kernels.spec import KernelSpec
from transfuse.errors import LoweringError
from transfuse.ir.opdefs.generation import token_major

OP = "prefill_attention"
#: query tokens per tile (fp16/bf16)
BLOCK_M = 64
#: fp32 (exact fp32 dots run on FMAs with wide operand layouts; q and acc are fp32 tiles):
#: query tokens per tile and at most this many positions per key tile, at 4 warps (64 x 64
#: spilled 1-2 KB a thread at D = 64; 32 x 16 at D = 128 spilled 0.5 KB on sm_90 with triton
#: 3.6; there ptxas held some 16 x 16 configs at 80 registers and spilled 8-12 B: 8 warps at
#: D = 256, 1 stage at D = 128 with page tiles; gathering block ids at D = 256, 4 warps
#: spilled 32 B on sm_90 with triton 3.9: 8 warps there)
FP32_BLOCK_M = 16
FP32_MAX_BLOCK_N = 32
#: warps per program; WIDE_WARPS at a padded head dim of 256 for fp16/bf16 (acc [64, 256]
#: in fp32) and for fp32 where positions gather their block ids
NUM_WARPS = 4
WIDE_WARPS = 8
#: software-pipelining stages; 1 where positions gather their block ids (dependent loads)
NUM_STAGES = 2
GATHER_STAGES = 1
#: the block sizes ``block_m`` may override (tests, tuning)
BLOCK_M_CHOICES = (16, 32, 64, 128)
#: a window "larger than any cache": the kernel's lower bound max(0, p - WINDOW + 1) is 0
NO_WINDOW = 1 << 30


# -- kernel -----------------------------------------------------------------------------------


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, table_ptr, slopes_ptr, out_ptr,
    tile_start_ptr, tile_count_ptr, tile_seq_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_ka, stride_kl, stride_kh, stride_kd,
    stride_va, stride_vl, stride_vh, stride_vd,
    stride_tb, stride_tw,
    stride_ot, stride_oh, stride_od,
    G, D, DV, NUM_TOKENS, CACHE_A, CACHE_L, CACHE_W, NUM_SEQS, WINDOW, scale, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PAGED: tl.constexpr, PAGE_TILES: tl.constexpr,
    SLOT_TABLE: tl.constexpr, ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G

    # -- the tile's rows: up to BLOCK_M tokens of one sequence, each at its own position --
    t0 = tl.load(tile_start_ptr + tile)
    count = tl.load(tile_count_ptr + tile)
    seq = tl.load(tile_seq_ptr + tile).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    rows = t0 + offs_m
    row_ok = (offs_m < count) & (rows >= 0) & (rows < NUM_TOKENS)  # (a bad map reads nothing)
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1).to(tl.int32)  # [BLOCK_M]
    lo_row = tl.maximum(pos - WINDOW + 1, 0)  # [BLOCK_M] first visible position of each row

    # -- where the sequence lives; a sequence outside the table (or a slot outside the cache)
    # sees nothing: the key range is emptied instead of masking every load --
    seq_ok = (seq >= 0) & (seq < NUM_SEQS)
    seq_c = tl.minimum(tl.maximum(seq, 0), NUM_SEQS - 1)  # (clamped: no scalar masks)
    table_row = table_ptr + seq_c * stride_tb
    if PAGED:
        capacity = CACHE_W * CACHE_L
    else:
        capacity = CACHE_L
        if SLOT_TABLE:
            slot = tl.load(table_row).to(tl.int64)
        else:
            slot = seq_c
        seq_ok = seq_ok & (slot >= 0) & (slot < CACHE_A)
        slot = tl.where(seq_ok, slot, 0)

    # -- the key range of the tile: [min lo, max p] of its rows, clipped to the cache --
    end = tl.minimum(tl.max(pos, axis=0) + 1, capacity)
    end = tl.where(seq_ok, end, 0)
    lo = tl.min(tl.where(row_ok, lo_row, capacity), axis=0)
    start = (lo // BLOCK_N) * BLOCK_N

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_qt + h * stride_qh
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if ALIBI:
        slope = tl.load(slopes_ptr + h).to(tl.float32)
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh

    # -- online softmax over the key tiles (log2 domain, fp32) --
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        j = n0 + offs_n
        # where each position lives (decode_attention's addressing): a base pointer per tile
        # (slot, or the page when the tile lies in one) plus a row per position, or a block
        # id per position for pages shorter than the tile. ``end`` <= capacity, so every
        # page index is inside the table row
        if PAGED:
            if PAGE_TILES:
                page = n0 // CACHE_L
                blk = tl.load(table_row + tl.minimum(page, CACHE_W - 1) * stride_tw).to(tl.int64)
                blk_ok = (blk >= 0) & (blk < CACHE_A)
                k_base = k_head + tl.where(blk_ok, blk, 0) * stride_ka
                v_base = v_head + tl.where(blk_ok, blk, 0) * stride_va
                row = n0 % CACHE_L + offs_n
                ok = tl.where(blk_ok, j < end, False)  # (scalar & block: an int mask there)
            else:
                page = j // CACHE_L
                blk = tl.load(table_row + page * stride_tw, mask=j < end, other=-1).to(tl.int64)
                ok = (j < end) & (blk >= 0) & (blk < CACHE_A)
                blk = tl.where(ok, blk, 0)
                k_base = k_head + blk * stride_ka  # [BLOCK_N] pointers
                v_base = v_head + blk * stride_va
                row = j % CACHE_L
        else:
            k_base = k_head + slot * stride_ka
            v_base = v_head + slot * stride_va
            row = j
            ok = j < end
        k_rows = k_base + row * stride_kl  # [BLOCK_N] pointers to each position's row
        v_rows = v_base + row * stride_vl
        kt = tl.load(k_rows[None, :] + offs_d[:, None] * stride_kd,
                     mask=ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        if UPCAST:
            kt = kt.to(tl.float32)
        x = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N] fp32
        if SOFTCAP:
            # softcap·tanh(x / softcap), tanh(y) = 2·sigmoid(2y) - 1 (no libdevice tanh)
            x = softcap * (2.0 / (1.0 + tl.exp(x * (-2.0 / softcap))) - 1.0)
        if ALIBI:
            x += slope * (j[None, :] - pos[:, None]).to(tl.float32)
        # -- per row: lo_row <= j <= p_row (causal, window), and the position readable --
        seen = ok[None, :] & (j[None, :] <= pos[:, None]) & (j[None, :] >= lo_row[:, None])
        x = tl.where(seen, x * 1.4426950408889634, float("-inf"))  # · 1/ln 2: exp2
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(x - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_rows[:, None] + offs_dv[None, :] * stride_vd,
                    mask=ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
        if UPCAST:
            pv = tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # -- normalise and store the tile's rows (a row that saw nothing: zeros) --
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_ot + h * stride_oh
             + offs_dv[None, :] * stride_od, o.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dv_ok[None, :])


# -- configuration ----------------------------------------------------------------------------


def prefill_block_m(dtype: torch.dtype, head_dim: int, v_head_dim: int | None = None) -> int:
    """Query tokens per tile: :data:`BLOCK_M` (fp16/bf16), :data:`FP32_BLOCK_M` (fp32; the
    head dims do not change it today). The step's tile map (:func:`prefill_tiles`) is made
    for it."""
    return FP32_BLOCK_M if dtype == torch.float32 else BLOCK_M


def prefill_config(dtype: torch.dtype, head_dim: int, v_head_dim: int, paged: bool,
                   page: int) -> dict:
    """BLOCK_M, BLOCK_N, PAGE_TILES, warps and stages of a launch (module docstring)."""
    fp32 = dtype == torch.float32
    bn, page_tiles = tiling(head_dim, True, paged, page, fp32)
    if fp32:  # (a smaller power of two still divides the page)
        bn = min(bn, FP32_MAX_BLOCK_N)
    wide = pow2(max(head_dim, v_head_dim)) >= 256 and (not fp32 or not page_tiles and paged)
    return dict(block_m=prefill_block_m(dtype, head_dim, v_head_dim), block_n=bn,
                page_tiles=page_tiles, num_warps=WIDE_WARPS if wide else NUM_WARPS,
                num_stages=GATHER_STAGES if paged and not page_tiles else NUM_STAGES)


# -- the tile map -----------------------------------------------------------------------------


def prefill_tiles(seq_of_token: torch.Tensor, block_m: int,
                  max_tiles: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query tiles of a step: (tile_token_start, tile_count, tile_seq), int32 [T] on
    seq_of_token's device. The N = len(seq_of_token) tokens are cut into runs of consecutive
    tokens of one sequence, each run into tiles of ``block_m`` tokens (the last one shorter).

    ``max_tiles`` None: T is the exact tile count (one host synchronisation). An int: T =
    ``max_tiles`` with no synchronisation (a CUDA graph can capture it); tiles past the real
    ones have count 0 (their programs do nothing). It must be at least the tile count: N
    always is (checked on the CPU; on a GPU too few would drop tokens).
    """
    if not isinstance(seq_of_token, torch.Tensor) or seq_of_token.dim() != 1 or \
            seq_of_token.dtype not in INDEX_DTYPES:
        raise arg_error("seq_of_token", seq_of_token, "an int64 [N] tensor", "prefill_tiles")
    if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m < 1:
        raise arg_error("block_m", block_m, "an int >= 1", "prefill_tiles")
    if max_tiles is not None and (isinstance(max_tiles, bool) or not isinstance(max_tiles, int)
                                  or max_tiles < 0):
        raise arg_error("max_tiles", max_tiles, "None or an int >= 0", "prefill_tiles")
    dev, n = seq_of_token.device, seq_of_token.shape[0]
    if n == 0:
        empty = torch.zeros(max_tiles or 0, dtype=torch.int32, device=dev)
        return empty, empty.clone(), empty.clone()
    sot = seq_of_token.to(torch.int64)
    new_run = torch.ones(n, dtype=torch.bool, device=dev)
    new_run[1:] = sot[1:] != sot[:-1]
    run = torch.cumsum(new_run, 0) - 1  # [N] run of each token (runs <= N)
    idx = torch.arange(n, device=dev)
    run_start = torch.full((n,), n, dtype=torch.int64, device=dev).scatter_reduce_(
        0, run, idx, "amin")  # [N] first token of each run (n: no such run)
    run_len = torch.zeros(n, dtype=torch.int64, device=dev).scatter_add_(
        0, run, torch.ones_like(idx))
    run_tiles = (run_len + block_m - 1) // block_m
    cum = torch.cumsum(run_tiles, 0)  # [N] tiles up to and including each run
    if max_tiles is None:
        max_tiles = int(cum[-1])
    elif dev.type == "cpu" and int(cum[-1]) > max_tiles:
        raise LoweringError(f"prefill_tiles: the step needs {int(cum[-1])} tiles of "
                            f"{block_m} tokens, more than max_tiles={max_tiles}")
    tile = torch.arange(max_tiles, device=dev)
    r = torch.searchsorted(cum, tile, right=True).clamp_(max=n - 1)  # the run of each tile
    k = tile - (cum[r] - run_tiles[r])  # the tile's index within its run
    count = (run_len[r] - k * block_m).clamp_(0, block_m)
    count = torch.where(tile < cum[-1], count, 0)
    start = torch.where(count > 0, run_start[r] + k * block_m, 0)
    return start.to(torch.int32), count.to(torch.int32), sot[start].to(torch.int32)


# -- checks -----------------------------------------------------------------------------------


def _check_tiles(tiles, n: int, block_m: int, sot: torch.Tensor, dev) -> tuple:
    if not (isinstance(tiles, (tuple, list)) and len(tiles) == 3):
        raise arg_error("tiles", tiles, "None or (tile_token_start, tile_count, tile_seq) of "
                        "prefill_tiles", OP)
    for name, t in zip(("tile_token_start", "tile_count", "tile_seq"), tiles):
        check_tensor(f"tiles.{name}", t, 1, (torch.int32,), dev, "an int32 [T] tensor", OP)
        if t.shape != tiles[0].shape or not t.is_contiguous():
            raise arg_error(f"tiles.{name}", t, f"a contiguous int32 [T={tiles[0].shape[0]}] "
                            "tensor", OP)
    if dev.type == "cpu" and tiles[0].numel():  # values (on a GPU they would synchronise)
        start, count, seq = (t.to(torch.int64) for t in tiles)
        if int(count.min()) < 0 or int(count.max()) > block_m or int(start.min()) < 0 or \
                int((start + count).max()) > n:
            raise LoweringError(f"{OP}: tiles must hold 0..{block_m} tokens each inside the "
                                f"step's N={n}, got starts {start.tolist()} and counts "
                                f"{count.tolist()}")
        offs = torch.arange(block_m)
        tok = (start[:, None] + offs).clamp(max=n - 1)
        inside = offs < count[:, None]
        if bool((sot[tok] != seq[:, None])[inside].any()):
            raise LoweringError(f"{OP}: each tile's tokens must belong to its tile_seq "
                                f"{seq.tolist()} (seq_of_token {sot.tolist()})")
    return tuple(tiles)


def _check_values(pos, sot, table, paged, kc, num_seqs, window) -> None:
    """Value checks, only for CPU tensors (on a GPU they would synchronise)."""
    if pos.device.type != "cpu" or pos.numel() == 0:
        return
    a, length = kc.shape[0], kc.shape[1]
    pos, sot = pos.to(torch.int64), sot.to(torch.int64)
    cap = table.shape[1] * length if paged else length
    if int(pos.min()) < 0 or int(pos.max()) >= cap:
        raise LoweringError(f"{OP}: position_ids {pos.tolist()} must lie in 0..{cap - 1} (the "
                            "positions a sequence's cache holds)")
    if int(sot.min()) < 0 or int(sot.max()) >= num_seqs:
        raise LoweringError(f"{OP}: seq_of_token {sot.tolist()} must lie in 0..{num_seqs - 1} "
                            "(the step's sequences)")
    if paged:  # the blocks of every token's visible range [lo, p]
        lo = (pos - window + 1).clamp(min=0) if window else torch.zeros_like(pos)
        w = torch.arange(table.shape[1])
        need = (w >= (lo // length)[:, None]) & (w <= (pos // length)[:, None])  # [N, W]
        ids = table[sot][need]
        if int(ids.min()) < 0 or int(ids.max()) >= a:
            bad = sorted({int(s) for s in sot[((table[sot] < 0) | (table[sot] >= a))
                                              .logical_and(need).any(1)]})
            raise LoweringError(f"{OP}: cache_table rows {bad} hold block ids outside "
                                f"0..{a - 1} for positions their tokens see")
    else:
        slots = table[sot] if table is not None else sot
        if int(slots.min()) < 0 or int(slots.max()) >= a:
            name = "cache_table" if table is not None else "seq_of_token"
            raise LoweringError(f"{OP}: {name} sends the step's tokens to slots "
                                f"{slots.tolist()}; each must lie in 0..{a - 1}")


# -- wrapper ----------------------------------------------------------------------------------


def _prefill_launch(q, kc, vc, pos, table, slopes, out, tiles, *, paged, scale, window,
                    softcap, num_seqs, block_m_=None, interpret=None):
    """The kernel's arguments, constexprs, grid and launch options (shared by the wrapper and
    SHIPPED, which describes the GPU's launches: ``interpret=False``)."""
    interpret = env.interpreting() if interpret is None else interpret
    h, d = q.shape[1], q.shape[2]
    a, length, hkv, _ = kc.shape
    dv = vc.shape[3]
    cfg = prefill_config(q.dtype, d, dv, paged, length)
    tbl = table if table is not None else pos
    start, count, seq = tiles
    args = (q, kc, vc, pos, tbl, slopes if slopes is not None else q, out, start, count, seq,
            *q.stride(), *kc.stride(), *vc.stride(),
            tbl.stride(0), tbl.stride(1) if tbl.dim() == 2 else 0, *out.stride(),
            h // hkv, d, dv, q.shape[0], a, length, tbl.shape[1] if paged else 1, num_seqs,
            window or NO_WINDOW, float(scale), float(softcap or 1.0))
    const = dict(BLOCK_M=block_m_ or cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_D=pow2(d),
                 BLOCK_DV=pow2(dv), PAGED=paged, PAGE_TILES=cfg["page_tiles"],
                 SLOT_TABLE=table is not None and not paged, ALIBI=slopes is not None,
                 SOFTCAP=softcap is not None, UPCAST=interpret or q.dtype == torch.float32,
                 DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return args, const, (start.shape[0], h), launch


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      position_ids: torch.Tensor, seq_of_token: torch.Tensor,
                      cache_table: torch.Tensor | None = None, *, paged: bool,
                      cache_order: str = "token-major", scale: float | None = None,
                      window: int | None = None,
                      alibi: Sequence[float] | torch.Tensor | None = None,
                      softcap: float | None = None, num_seqs: int | None = None,
                      tiles: tuple | None = None, block_m: int | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, H, Dv]: every token of a step, q [N, H, D] token-major, attending over its
    sequence's cache up to its own position (module docstring), read in place.

    ``position_ids`` i64 [N] (or [1, N]), ``seq_of_token`` i64 [N]; ``cache_table``: paged,
    the [B, W] block table; contiguous, the [B] slot table or None (slot = sequence, B =
    ``num_seqs``, default the number of slots). ``scale`` defaults to 1/sqrt(D); ``window``
    >= 1 positions (the token's own included); ``alibi``: H slopes; ``softcap`` > 0.
    ``tiles``: the step's tile map, :func:`prefill_tiles` of seq_of_token for the launch's
    BLOCK_M (computed here when None; the host computes it once per step for all layers).
    ``block_m``: override BLOCK_M (one of :data:`BLOCK_M_CHOICES`; tests and tuning, not a
    shipped configuration). ``out``: the [N, H, Dv] output to write (any strides; q's dtype).
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in DTYPES:
        raise arg_error("q", q, "a token-major [N, H, D] fp16/bf16/fp32 tensor", OP)
    dev = q.device
    if dev.type != env.device():
        raise arg_error("q", q, f"on {env.device()} (where the kernels run here)", OP)
    n, h, d = q.shape
    if h < 1 or d < 1:
        raise arg_error("q", q, "a tensor with H >= 1 heads of D >= 1", OP)
    kc, vc = cache_views(k_cache, v_cache, q.dtype, dev, paged, cache_order, OP)
    a, length, hkv, dk = kc.shape
    dv = vc.shape[3]
    if dk != d or hkv < 1 or h % hkv:
        raise arg_error("k_cache", k_cache, f"a cache of Hkv kv heads dividing H={h} and head "
                        f"dim D={d} (q's)", OP)
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and \
            position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    for name, t in (("position_ids", position_ids), ("seq_of_token", seq_of_token)):
        check_tensor(name, t, 1, INDEX_DTYPES, dev, f"an int64 [N={n}] tensor", OP)
        if t.shape[0] != n:
            raise arg_error(name, t, f"an int64 [N={n}] tensor", OP)
    if cache_table is None and not paged:
        table = None
        num_seqs = a if num_seqs is None else num_seqs
    else:
        rows = cache_table.shape[0] if isinstance(cache_table, torch.Tensor) and \
            cache_table.dim() >= 1 and cache_table.shape[0] >= 1 else 1
        table = check_table(cache_table, rows, paged, dev, OP)
        num_seqs = rows
    if isinstance(num_seqs, bool) or not isinstance(num_seqs, int) or num_seqs < 1:
        raise arg_error("num_seqs", num_seqs, "None or an int >= 1", OP)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(
            scale):
        raise arg_error("scale", scale, "None or a finite float", OP)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise arg_error("window", window, "None or an int >= 1", OP)
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not softcap > 0):
        raise arg_error("softcap", softcap, "None or a float > 0", OP)
    slopes = None
    if alibi is not None:
        try:
            slopes = torch.as_tensor(alibi, dtype=torch.float32, device=dev).contiguous()
        except (TypeError, ValueError, RuntimeError):
            slopes = None
        if slopes is None or slopes.shape != (h,):
            raise arg_error("alibi", alibi, f"None or H={h} slopes (floats)", OP)
    if block_m is not None and block_m not in BLOCK_M_CHOICES:
        raise arg_error("block_m", block_m, f"None or one of {BLOCK_M_CHOICES}", OP)
    bm = block_m or prefill_block_m(q.dtype, d, dv)
    if out is None:
        out = torch.empty((n, h, dv), dtype=q.dtype, device=dev)
    elif not (isinstance(out, torch.Tensor) and out.shape == (n, h, dv) and out.dtype == q.dtype
              and out.device == dev):
        raise arg_error("out", out, f"a {q.dtype} [N={n}, H={h}, Dv={dv}] tensor on {dev}", OP)
    tiles = prefill_tiles(seq_of_token, bm) if tiles is None else _check_tiles(
        tiles, n, bm, seq_of_token, dev)
    _check_values(position_ids, seq_of_token, table, paged, kc, num_seqs, window)
    if n == 0 or tiles[0].shape[0] == 0:
        return out
    args, const, grid, launch = _prefill_launch(
        q, kc, vc, position_ids, table, slopes, out, tiles, paged=paged, scale=scale,
        window=window, softcap=softcap, num_seqs=num_seqs, block_m_=bm)
    _prefill_kernel[grid](*args, **const, **launch)
    return out


# -- reference --------------------------------------------------------------------------------


def reference_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                position_ids: torch.Tensor, seq_of_token: torch.Tensor,
                                cache_table: torch.Tensor | None = None, *, paged: bool,
                                cache_order: str = "token-major", scale: float | None = None,
                                window: int | None = None, alibi=None,
                                softcap: float | None = None) -> torch.Tensor:
    """The same function in plain torch, in fp32 (q's dtype out): each token is one sequence
    of :func:`~.decode_attention.reference_decode_attention` (length p + 1, its sequence's
    table row; contiguous without a table: slot = sequence)."""
    pos = position_ids.reshape(-1).to(torch.int64)
    sot = seq_of_token.to(torch.int64)
    rows = cache_table[sot] if cache_table is not None else sot
    return reference_decode_attention(q, k_cache, v_cache, pos + 1, rows, paged=paged,
                                      cache_order=cache_order, scale=scale, window=window,
                                      alibi=alibi, softcap=softcap)


# -- benchmark --------------------------------------------------------------------------------


def bench_prefill_attention(device: str | torch.device, *, seqs: int = 2, chunk: int = 512,
                            context: int = 1024, heads: int = 32, kv_heads: int = 8,
                            head_dim: int = 128, dtype: torch.dtype = torch.bfloat16,
                            paged: bool = True, block_size: int = 16,
                            cache_order: str = "token-major", seed: int = 0) -> dict:
    """A prefill step of ``seqs`` sequences, each a chunk of ``chunk`` tokens at positions
    ``context``.. (the cache already holds ``context`` earlier positions): time
    :func:`prefill_attention` against the per-token decode kernel (one "sequence" per token,
    the form it replaces) and ``F.scaled_dot_product_attention`` per sequence on the cache
    gathered into dense [1, Hkv, T, D] tensors (gathering not timed; a bottom-right causal
    mask). On a GPU :func:`triton.testing.do_bench` (ms, median); in the interpreter one timed
    run each. Returns shapes, the three times, the cache bytes a tile-wise read needs, and the
    max abs differences to SDPA."""
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = context + chunk
    nblk = -(-total // block_size)
    if paged:
        shape = (seqs * nblk, block_size, kv_heads, head_dim)
        table = torch.randperm(seqs * nblk, generator=g).reshape(seqs, nblk).to(device)
    else:
        shape = (seqs, total, kv_heads, head_dim)
        table = torch.arange(seqs, device=device)
    if cache_order == "head-major":
        shape = (shape[0], shape[2], shape[1], shape[3])
    kc = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    vc = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    n = seqs * chunk
    q = torch.randn(n, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    pos = torch.arange(context, total, device=device).repeat(seqs)
    sot = torch.arange(seqs, device=device).repeat_interleave(chunk)
    tiles = prefill_tiles(sot, prefill_block_m(dtype, head_dim))
    rows = table[sot]

    def run_prefill():
        return prefill_attention(q, kc, vc, pos, sot, table, paged=paged,
                                 cache_order=cache_order, tiles=tiles)

    def run_per_token():
        return decode_attention(q, kc, vc, pos + 1, rows, paged=paged, cache_order=cache_order,
                                max_len=total)

    ktm, vtm = token_major(kc, cache_order), token_major(vc, cache_order)
    def gathered(cache, s):  # sequence s's [1, Hkv, T, D]
        rows = cache[table[s]].reshape(-1, kv_heads, head_dim)[:total] if paged else cache[s]
        return rows.transpose(0, 1)[None].contiguous()

    dense = [(gathered(ktm, s), gathered(vtm, s)) for s in range(seqs)]
    causal = torch.arange(total, device=device)[None, :] <= pos[:chunk, None]  # [chunk, T]

    def run_sdpa():
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[s * chunk:(s + 1) * chunk].transpose(0, 1)[None], kd, vd, attn_mask=causal,
            enable_gqa=kv_heads != heads)[0].transpose(0, 1) for s, (kd, vd) in enumerate(dense)])

    o_p, o_t, o_s = run_prefill(), run_per_token(), run_sdpa()
    t_prefill = time_ms(run_prefill, device, warmup=False)
    t_token = time_ms(run_per_token, device, warmup=False)
    t_sdpa = time_ms(run_sdpa, device, warmup=False)
    nbytes = 2 * seqs * total * kv_heads * head_dim * kc.element_size()
    return {"seqs": seqs, "chunk": chunk, "context": context, "heads": heads,
            "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."),
            "paged": paged, "block_size": block_size if paged else None,
            "cache_order": cache_order, "prefill_ms": t_prefill, "per_token_decode_ms": t_token,
            "sdpa_ms": t_sdpa, "cache_bytes": nbytes,
            "max_abs_diff": float((o_p.float() - o_s.float()).abs().max()),
            "per_token_max_abs_diff": float((o_t.float() - o_s.float()).abs().max())}


# -- shipped configurations -------------------------------------------------------------------


def _shipped() -> list[KernelSpec]:
    """Every code path the wrapper launches on a GPU at head dims 64/128/256 (Dv = D): dtype x
    D x cache kind (contiguous with a slot table; paged with blocks of 16 and 128 tokens: key
    tiles inside a page; blocks of 8: a block id per position) at G = 4, plus G = 1 (H ==
    Hkv: Triton specialises G = 1) on contiguous caches and ALiBi + softcap at D = 256 bf16.
    Built from meta tensors of a representative shape (a step of N = 512 tokens of B = 8
    sequences, H = 32); duplicates (same constexprs and signature) once."""
    meta = torch.device("meta")
    specs: dict[tuple, KernelSpec] = {}
    b, h, n, tiles_n = 8, 32, 512, 16
    pos = torch.empty(n, dtype=torch.int64, device=meta)
    tiles = tuple(torch.empty(tiles_n, dtype=torch.int32, device=meta) for _ in range(3))
    for dtype in DTYPES:
        tn = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        for d in (64, 128, 256):
            q = torch.empty(n, h, d, dtype=dtype, device=meta)
            for kind, page in (("contig", None), ("paged16", 16), ("paged128", 128),
                               ("paged8", 8)):
                paged = page is not None
                for hkv in (8, h) if not paged else (8,):
                    shape = (4096 // page * b, page, hkv, d) if paged else (b, 4096, hkv, d)
                    kc = torch.empty(shape, dtype=dtype, device=meta)
                    table = torch.empty((b, 4096 // page) if paged else (b,), dtype=torch.int64,
                                        device=meta)
                    feats = [(None, None)]
                    if d == 256 and dtype == torch.bfloat16 and hkv == 8:
                        feats.append((torch.empty(h, device=meta), 30.0))
                    for slopes, cap in feats:
                        args, const, _, launch = _prefill_launch(
                            q, kc, kc, pos, table, slopes, q, tiles, paged=paged, scale=0.125,
                            window=None, softcap=cap, num_seqs=b, interpret=False)
                        name = (f"prefill[hd{d} {tn} {kind} {'G4' if hkv < h else 'G1'}"
                                f"{' alibi softcap' if cap else ''}]")
                        spec = dataclasses.replace(  # (kernel_spec names its own module)
                            kernel_spec(_prefill_kernel, name, args, const, **launch),
                            kernel=f"{__name__}:{_prefill_kernel.__name__}")
                        key = (tuple(spec.signature.items()), tuple(sorted(
                            (k, str(v)) for k, v in spec.constexprs.items())),
                            spec.num_warps, spec.num_stages)
                        specs.setdefault(key, spec)
    return list(specs.values())


SHIPPED: list[KernelSpec] = _shipped()

__all__ = ["prefill_attention", "prefill_tiles", "prefill_block_m", "prefill_config",
           "reference_prefill_attention", "bench_prefill_attention", "SHIPPED", "BLOCK_M",
           "FP32_BLOCK_M", "BLOCK_M_CHOICES"]
