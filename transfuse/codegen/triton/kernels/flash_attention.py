"""Flash attention forward: softmax(scale·Q·Kᵀ [softcap] + alibi + bias, masked) · V in one pass.

What it computes: exactly the IR's ``attention`` op (:func:`transfuse.ir.opdefs.nn.attention`),
plus per-batch key lengths (``kv_lens``) that the IR expresses as a ``key_padding_mask``.

Glossary: B batch, H query heads, Hkv key/value heads (H % Hkv == 0; the kv head of query head
h is ``h // (H // Hkv)``: GQA, MQA when Hkv == 1), Sq query length, Sk key length, D q/k head
dim, Dv v head dim, BM / BN the query / key tile (``BLOCK_M`` / ``BLOCK_N``), D_PAD / DV_PAD
the head dims rounded up to a power of two (>= 16; the padding lanes are masked).

Layouts: q [B, H, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] for ``layout="bhsd"``, or
[B, S, H, D] for ``"bshd"``; the kernel only sees strides of the (b, h, s) axes, so any
strided view works (the head dim must be contiguous: the wrapper copies a tensor whose last
stride is not 1). The output has q's layout and dtype, Dv as its last dim. Offsets within
one (batch, head) are int32 (the wrapper refuses tensors where they would overflow); the
batch and head offsets are int64.

Semantics (the IR op's, see ``attention_mask`` / ``alibi_bias`` in ``ir/opdefs/nn.py``):

- query i sits at absolute position ``pos = i + Sk - Sq`` (bottom-right aligned, as with a
  KV cache); ``causal`` keeps keys j <= pos; ``window`` W keeps j > pos - W (with or without
  ``causal``: without it, only the lower bound);
- score = scale · q·k (scale defaults to 1/sqrt(D)); ``softcap`` c: c·tanh(score / c); then
  ``alibi`` slope_h · (j - pos) and the additive ``bias`` (broadcast to [B, H, Sq, Sk]);
- masked keys (causal, window, ``kv_lens``: j >= kv_lens[b], ``key_mask[b, j] == 0``) get
  -inf; a query row that sees no key gives **zeros**, as the IR reference does whenever a mask
  is present. The one divergence: a ``bias`` row that is all -inf with no other mask gives NaN
  in the IR reference (a plain softmax of -inf) and zeros here.

Algorithm (FlashAttention-2 forward): one program per (query tile, batch·head). It loads its
Q tile once and walks the key tiles with an online softmax: running row max ``m``, running
sum ``l``, fp32 accumulator ``acc``; per tile ``p = exp2(s - m_new)``, ``acc = acc·alpha +
p·V`` with ``alpha = exp2(m_old - m_new)``. Everything is in base 2: log2(e) is folded into
the scale, the softcap (c·log2 e), the ALiBi slopes and the bias, so the inner loop uses
``exp2`` only. The key range is computed per query tile (:func:`kv_tile_range`): causal and
``kv_lens`` cut the end, the window cuts the start, so a sliding window costs O(Sq·W), not
O(Sq·Sk). Inside that range the tiles every row of the tile fully sees run without any
position masking; only the edge tiles (diagonal, window edge, key tail) are masked.
Dots accumulate in fp32; fp16/bf16 tiles go to the tensor cores as they are, fp32 tiles use
IEEE fp32 dots (no TF32, so fp32 keeps fp32 accuracy; slow, fp32 is the reference dtype).

Block sizes (:func:`pick_config`; ``SHIPPED`` lists every one): per dtype, padded head dim
and whether a bias is loaded (a bias adds a [BM, BN] tile per step, so it gets smaller tiles).
They are the largest tiles found that compile for sm_80 and sm_90 without spills under triton
3.6 and 3.9 (registers, not speed, were the constraint; tune on a GPU before chasing SDPA):

=====  ================================  ==============================
D_PAD  fp16 / bf16 (BM BN warps stages)  fp32 (CUDA-core IEEE dots)
=====  ================================  ==============================
64     128 32 8 3; bias: 64 32 4 3       64 32 8 2; bias: 32 16 8 3
128    128 32 8 3; bias: 64 32 4 3       32 16 8 2; bias: 32 16 8 2
256    64 32 8 2; bias: 64 16 8 2        16 16 8 2; bias: 16 16 8 2
=====  ================================  ==============================

Interpreter notes (``TRITON_INTERPRET=1``, CPU tensors): bf16 dots and bf16 arithmetic are
wrong there (triton#11584), so the wrapper passes ``UPCAST=True`` and tiles are converted to
fp32 right after loading (on a GPU they stay 16-bit for the tensor cores); tanh is built
from ``tl.sigmoid`` (libdevice returns None in the interpreter); there is no
``make_block_ptr`` (gone in 3.9): plain pointer arithmetic with masks, valid in 3.6 and 3.9.
Each program costs ~2 ms there: tests use tiny shapes.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from transfuse.codegen.triton import env  # fixes the mode (GPU / interpreter) before @triton.jit
from transfuse.codegen.triton.kernels._common import time_ms
from transfuse.codegen.triton.kernels.spec import KernelSpec
from transfuse.errors import LoweringError
from transfuse.ir.opdefs.nn import attention as ir_attention

LOG2E = 1.4426950408889634
#: the largest head dim (q/k and v) the kernel takes
MAX_HEAD_DIM = 256
LAYOUTS = ("bhsd", "bshd")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# -- jit helpers (shared with block_sparse_attention) -----------------------------------------


@triton.jit
def load_tile(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a 2-D tile; ``rows_ok`` / ``cols_ok`` (1-D) are only applied when their flag is set,
    so a full tile compiles to an unmasked load. Masked elements read 0."""
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def tanh_from_sigmoid(x):
    """tanh(x) = 2·sigmoid(2x) - 1 (libdevice's tanh is None in the interpreter)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def kv_tile_range(start_m, seq_q, seq_k, kv_end, window,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key range of query tile ``start_m``: (lo, full_lo, full_hi, hi), multiples of BLOCK_N
    except ``hi``. Tiles in [lo, hi) hold every key some row of the tile sees (and only tiles
    that hold one: with a window the visible keys of consecutive rows overlap, so their union
    is one interval); tiles in [full_lo, full_hi) are seen in full by every row (no position
    mask needed). ``kv_end`` = min(Sk, kv_lens[b])."""
    offset = seq_k - seq_q  # absolute position of query i is i + offset
    first = start_m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, seq_q) - 1  # the tile's last real row
    hi = kv_end
    full_hi = kv_end
    if CAUSAL:
        hi = tl.minimum(hi, last + offset + 1)
        full_hi = tl.minimum(full_hi, first + offset + 1)
    lo = hi * 0
    full_lo = hi * 0
    if HAS_WINDOW:
        lo = tl.maximum(first + offset - window + 1, 0)
        full_lo = tl.maximum(last + offset - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N  # lo >= 0: floor
    hi = tl.maximum(hi, lo)
    full_lo = tl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo)
    full_hi = tl.minimum(tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N, hi)
    if full_lo >= full_hi:  # no full tile: one masked sweep over [lo, hi)
        full_lo = hi
        full_hi = hi
    return lo, full_lo, full_hi, hi


@triton.jit
def attend_tile(acc, m_i, l_i, q, start_n, offs_m, pos_m,
                k_base, v_base, stride_kn, stride_vn, kv_end, window, qk_scale, softcap2,
                slope2, bias_rows, stride_bn, rows_ok, key_mask_base, stride_mn,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile [start_n, start_n + BLOCK_N) of the online softmax (base 2).

    ``acc`` [BM, DV_PAD] fp32, ``m_i`` / ``l_i`` [BM] fp32 are the running state; ``q``
    [BM, D_PAD]; ``pos_m`` [BM] the queries' absolute positions; ``bias_rows`` [BM] point at
    the bias rows (key 0). ``BOUNDARY`` applies the position masks (key tail at ``kv_end``,
    causal, window); without it the tile must be one every row fully sees. The key mask and
    the bias are applied whenever they are present. Offsets within a (batch, head) are int32
    (the wrapper checks they fit).
    """
    # -- load Kᵀ [D_PAD, BN] and score the tile --
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    n_ok = offs_n < kv_end
    kt = load_tile(k_base + offs_d[:, None] + offs_n[None, :] * stride_kn, offs_d < HEAD_DIM,
                   n_ok, HEAD_DIM != D_PAD, BOUNDARY)
    if UPCAST:
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt, input_precision="ieee") * qk_scale  # [BM, BN], log2 units
    if HAS_SOFTCAP:  # c·tanh(x/c) in log2 units: softcap2 = c·log2(e)
        s = softcap2 * tanh_from_sigmoid(s / softcap2)
    if HAS_ALIBI:
        s += slope2 * (offs_n[None, :] - pos_m[:, None]).to(tl.float32)
    if HAS_BIAS:
        b = load_tile(bias_rows[:, None] + offs_n[None, :] * stride_bn, rows_ok, n_ok,
                      True, BOUNDARY)
        # to log2 units without overflow: an additive mask of finfo.min (HF's) times log2(e)
        # would become -inf, and a row masked everywhere would give zeros where the IR's
        # softmax of equal finite scores averages the values: clamp to -2e38 first (-inf kept)
        bf = b.to(tl.float32)
        s += tl.where(bf == float("-inf"), bf, tl.maximum(bf, -2.0e38) * 1.4426950408889634)
    # -- masks --
    if BOUNDARY:
        keep = n_ok[None, :] & (offs_m[:, None] >= 0)
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= pos_m[:, None])
        if HAS_WINDOW:
            keep = keep & (offs_n[None, :] > pos_m[:, None] - window)
        s = tl.where(keep, s, float("-inf"))
    if HAS_KEY_MASK:
        km = tl.load(key_mask_base + offs_n * stride_mn, mask=n_ok, other=0)
        s = tl.where(km[None, :] != 0, s, float("-inf"))
    # -- online softmax: rescale the state to the new row max --
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: p = 0
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # -- acc += P·V --
    offs_dv = tl.arange(0, DV_PAD)
    v = load_tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], n_ok, offs_dv < HEAD_DIM_V, BOUNDARY, HEAD_DIM_V != DV_PAD)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def store_rows(o_base, acc, l_i, offs_m, seq_q, stride_om,
               HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr):
    """acc / l for the real rows of the tile (rows without any key: l = 0, acc = 0 -> 0)."""
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    offs_dv = tl.arange(0, DV_PAD)
    ptrs = o_base + offs_m[:, None] * stride_om + offs_dv[None, :]
    tl.store(ptrs, out.to(o_base.dtype.element_ty),
             mask=(offs_m[:, None] < seq_q) & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def open_query_tile(start_m, q_ptr, k_ptr, v_ptr, o_ptr, bias_ptr, slopes_ptr, kv_lens_ptr,
                    key_mask_ptr, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
                    stride_vb, stride_vh, stride_ob, stride_oh, stride_bb, stride_bh, stride_bm,
                    stride_mb, heads, kv_group, seq_q, seq_k, HEAD_DIM: tl.constexpr,
                    D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HAS_KV_LENS: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr):
    """The prologue of both attention kernels (flash, block-sparse; grid (query tiles, B·H)):
    what the program of query tile ``start_m`` knows before its first key tile, as (b, h, q,
    k_base, v_base, o_base, offs_m, pos_m, m_ok, kv_end, slope2, bias_rows, key_mask_base).
    ``q`` is its Q tile [BM, D_PAD] (fp32 when ``UPCAST``), the ``*_base`` pointers its
    (batch, head) of K, V (kv head ``h // kv_group``: GQA / MQA) and O, ``kv_end`` =
    min(Sk, kv_lens[b]), ``slope2`` its ALiBi slope in log2 units. The kernel reads
    ``program_id(0)`` once and passes it (a second read here cost triton 3.6's sm_90 build of
    the fp32 hd64 flash kernel 8 registers)."""
    # -- which (batch, head, query tile) --
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    hk = h // kv_group  # GQA / MQA: the kv head of query head h
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_m = offs_m + (seq_k - seq_q)
    m_ok = offs_m < seq_q
    # -- per-program constants --
    offs_d = tl.arange(0, D_PAD)
    q = load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], m_ok,
                  offs_d < HEAD_DIM, True, HEAD_DIM != D_PAD)
    if UPCAST:
        q = q.to(tl.float32)
    kv_end = seq_k
    if HAS_KV_LENS:
        kv_end = tl.minimum(kv_end, tl.load(kv_lens_ptr + b))
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(slopes_ptr + h).to(tl.float32) * 1.4426950408889634
    bias_rows = bias_ptr + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh \
        + offs_m * stride_bm
    key_mask_base = key_mask_ptr + b.to(tl.int64) * stride_mb
    return (b, h, q, k_base, v_base, o_base, offs_m, pos_m, m_ok, kv_end, slope2, bias_rows,
            key_mask_base)


# -- the kernel ------------------------------------------------------------------------------


@triton.jit
def flash_attention_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, bias_ptr, slopes_ptr, kv_lens_ptr, key_mask_ptr, visits_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_mb, stride_mn,
    heads, kv_group, seq_q, seq_k, qk_scale, softcap2, window,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KV_LENS: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, COUNT_VISITS: tl.constexpr,
):
    """Grid (cdiv(Sq, BM), B·H). ``visits_ptr`` [B·H, cdiv(Sq, BM)] int32 receives the number
    of key tiles each program visited when ``COUNT_VISITS`` (a test hook)."""
    start_m = tl.program_id(0)
    b, h, q, k_base, v_base, o_base, offs_m, pos_m, m_ok, kv_end, slope2, bias_rows, km_base = \
        open_query_tile(start_m, q_ptr, k_ptr, v_ptr, o_ptr, bias_ptr, slopes_ptr, kv_lens_ptr,
                        key_mask_ptr, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
                        stride_vb, stride_vh, stride_ob, stride_oh, stride_bb, stride_bh,
                        stride_bm, stride_mb, heads, kv_group, seq_q, seq_k, HEAD_DIM, D_PAD,
                        BLOCK_M, HAS_KV_LENS, HAS_ALIBI, UPCAST)
    lo, full_lo, full_hi, hi = kv_tile_range(start_m, seq_q, seq_k, kv_end, window,
                                             BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    # -- online softmax over the key tiles: masked edge, full interior, masked edge --
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    visited = 0
    for part in tl.static_range(3):  # unrolled: [lo, full_lo), [full_lo, full_hi), [full_hi, hi)
        start = lo if part == 0 else full_lo if part == 1 else full_hi
        stop = full_lo if part == 0 else full_hi if part == 1 else hi
        for start_n in range(start, stop, BLOCK_N):
            acc, m_i, l_i = attend_tile(
                acc, m_i, l_i, q, start_n, offs_m, pos_m, k_base, v_base, stride_kn, stride_vn,
                kv_end, window, qk_scale, softcap2, slope2, bias_rows, stride_bn, m_ok, km_base,
                stride_mn, HEAD_DIM, D_PAD, HEAD_DIM_V, DV_PAD, BLOCK_N, part != 1, CAUSAL,
                HAS_WINDOW, HAS_ALIBI, HAS_BIAS, HAS_KEY_MASK, HAS_SOFTCAP, UPCAST)
            if COUNT_VISITS:
                visited += 1
    # -- epilogue --
    store_rows(o_base, acc, l_i, offs_m, seq_q, stride_om, HEAD_DIM_V, DV_PAD)
    if COUNT_VISITS:
        tl.store(visits_ptr + tl.program_id(1) * tl.num_programs(0) + start_m, visited)


# -- configuration ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """Tile sizes and launch options for one (dtype, padded head dim)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


#: (dtype, D_PAD, heavy) -> config; D_PAD is the larger head dim rounded up to 64, 128 or 256;
#: ``heavy``: an additive bias is present (a [BM, BN] tile more per step: smaller tiles).
#: Chosen with the sm_80 / sm_90 compile check: the largest tiles without spills on either.
CONFIGS: dict[tuple[torch.dtype, int, bool], AttnConfig] = {
    **{(dt, d, heavy): cfg for dt in (torch.float16, torch.bfloat16) for (d, heavy), cfg in {
        (64, False): AttnConfig(128, 32, 8, 3), (64, True): AttnConfig(64, 32, 4, 3),
        (128, False): AttnConfig(128, 32, 8, 3), (128, True): AttnConfig(64, 32, 4, 3),
        (256, False): AttnConfig(64, 32, 8, 2), (256, True): AttnConfig(64, 16, 8, 2),
    }.items()},
    (torch.float32, 64, False): AttnConfig(64, 32, 8, 2),
    (torch.float32, 64, True): AttnConfig(32, 16, 8, 3),  # 2 stages spill 12 B (3.6, sm_90)
    (torch.float32, 128, False): AttnConfig(32, 16, 8, 2),
    (torch.float32, 128, True): AttnConfig(32, 16, 8, 2),
    (torch.float32, 256, False): AttnConfig(16, 16, 8, 2),
    (torch.float32, 256, True): AttnConfig(16, 16, 8, 2),
}


def pad_dim(d: int) -> int:
    """A head dim rounded up to a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(d))


def pick_config(dtype: torch.dtype, head_dim: int, head_dim_v: int,
                heavy: bool = False) -> AttnConfig:
    """The shipped tiles for ``dtype``, the larger padded head dim and whether a bias is
    loaded (``heavy``); see the module docstring for the table and why."""
    d = max(64, pad_dim(max(head_dim, head_dim_v)))
    return CONFIGS[(dtype, d, bool(heavy))]



# -- what the wrapper launches, as KernelSpecs --------------------------------------------------

TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
#: the feature flags that change the kernel's code, in the kernel's order
FEATURES = ("CAUSAL", "HAS_WINDOW", "HAS_ALIBI", "HAS_BIAS", "HAS_KV_LENS", "HAS_KEY_MASK",
            "HAS_SOFTCAP")
#: the feature sets shipped per (dtype, head dim): none (the lightest code), every feature
#: but the bias (the heaviest code on the light tiles) and all of them (on the heavy tiles)
SHIPPED_FEATURES: tuple[tuple[str, ...], ...] = (
    (), tuple(f for f in FEATURES if f != "HAS_BIAS"), FEATURES)


def kernel_params(kernel) -> dict[str, bool]:
    """Parameter name -> is it a constexpr, in order (works for the GPU and the interpreter)."""
    return {n: "constexpr" in str(p.annotation)
            for n, p in inspect.signature(kernel.fn).parameters.items()}


def kernel_signature(kernel, dtype: torch.dtype) -> dict[str, str]:
    """Triton types of ``kernel``'s parameters: ``*_ptr`` by name, scalars i32 (fp32 for the
    two float scalars), constexprs ``"constexpr"``; q/k/v/o and the bias in ``dtype``."""
    t = TRITON_DTYPE[dtype]
    ptr = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "o_ptr": t, "bias_ptr": t, "slopes_ptr": "fp32",
           "kv_lens_ptr": "i32", "key_mask_ptr": "u8", "visits_ptr": "i32",
           "kv_count_ptr": "i32", "kv_index_ptr": "i32"}
    sig = {}
    for name, is_const in kernel_params(kernel).items():
        if is_const:
            sig[name] = "constexpr"
        elif name in ptr:
            sig[name] = "*" + ptr[name]
        else:
            sig[name] = "fp32" if name in ("qk_scale", "softcap2") else "i32"
    return sig


def shipped_specs(kernel, kernel_path: str, name: str,
                  feature_sets: Sequence[tuple[str, ...]],
                  tiles: Callable[[AttnConfig], AttnConfig] | None = None) -> list[KernelSpec]:
    """One :class:`KernelSpec` per dtype x head dim (64, 128, 256) x feature set, with the
    tile sizes :func:`pick_config` gives the wrapper, passed through ``tiles`` when given
    (``UPCAST=False``: a GPU launch)."""
    params = kernel_params(kernel)
    specs = []
    for dtype in DTYPES:
        for d in (64, 128, 256):
            for feats in feature_sets:
                cfg = pick_config(dtype, d, d, heavy="HAS_BIAS" in feats)
                if tiles is not None:
                    cfg = tiles(cfg)
                consts = {"HEAD_DIM": d, "D_PAD": d, "HEAD_DIM_V": d, "DV_PAD": d,
                          "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                          **{f: f in feats for f in FEATURES}, "UPCAST": False,
                          "COUNT_VISITS": False}
                consts = {k: v for k, v in consts.items() if params.get(k)}
                label = "+".join(f.removeprefix("HAS_").lower() for f in feats) or "dense"
                if set(feats) >= set(FEATURES) - {"HAS_BIAS"}:
                    label = "all" if "HAS_BIAS" in feats else "all-but-bias"
                label += f" {cfg.block_m}x{cfg.block_n}"
                specs.append(KernelSpec(kernel_path, f"{name}[hd{d} {TRITON_DTYPE[dtype]} {label}]",
                                        kernel_signature(kernel, dtype), consts,
                                        cfg.num_warps, cfg.num_stages))
    return specs


# -- the wrapper ------------------------------------------------------------------------------


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}, dtype {x.dtype}, on {x.device}"
    return f"{type(x).__name__} {x!r}"


def bad(fn: str, arg: str, value, expected: str) -> LoweringError:
    """The error for argument ``arg`` of ``fn``: what it is and what was expected."""
    return LoweringError(f"{fn}: argument {arg!r} is {describe(value)}; expected {expected}")


@dataclasses.dataclass
class AttentionArgs:
    """Checked inputs of an attention launch, as [B, H, S, D] views (strides of the caller's
    layout) plus the optional operands (None when absent)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor  # the [B, H, Sq, Dv] view of ``out``
    out: torch.Tensor  # in q's layout
    bias: torch.Tensor | None  # broadcast to [B, H, Sq, Sk] (stride 0 on broadcast axes)
    slopes: torch.Tensor | None  # [H] fp32
    kv_lens: torch.Tensor | None  # [B] int32
    key_mask: torch.Tensor | None  # [B, Sk] uint8
    scale: float
    softcap: float | None
    window: int | None
    causal: bool

    @property
    def dims(self) -> tuple[int, int, int, int, int, int, int]:
        """(B, H, Hkv, Sq, Sk, D, Dv)."""
        b, h, sq, d = self.q.shape
        return b, h, self.k.shape[1], sq, self.k.shape[2], d, self.v.shape[3]

    def constexprs(self, cfg: AttnConfig) -> dict:
        """The kernel's constexprs for this call with tiles ``cfg``."""
        _, _, _, _, _, d, dv = self.dims
        flags = {"CAUSAL": self.causal, "HAS_WINDOW": self.window is not None,
                 "HAS_ALIBI": self.slopes is not None, "HAS_BIAS": self.bias is not None,
                 "HAS_KV_LENS": self.kv_lens is not None,
                 "HAS_KEY_MASK": self.key_mask is not None, "HAS_SOFTCAP": self.softcap is not None}
        return {"HEAD_DIM": d, "D_PAD": pad_dim(d), "HEAD_DIM_V": dv, "DV_PAD": pad_dim(dv),
                "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, **flags,
                "UPCAST": env.interpreting()}

    def pointers(self) -> list[torch.Tensor]:
        """q, k, v, o, bias, slopes, kv_lens, key_mask (a 1-element dummy for an absent one)."""
        dev = self.q.device

        def given(x, dtype):
            return x if x is not None else torch.empty(1, dtype=dtype, device=dev)

        return [self.q, self.k, self.v, self.o, given(self.bias, self.q.dtype),
                given(self.slopes, torch.float32), given(self.kv_lens, torch.int32),
                given(self.key_mask, torch.uint8)]

    def strides(self) -> list[int]:
        """Strides of the (b, h, s) axes of q, k, v, o; the bias's four; key_mask's two."""
        bias = self.bias.stride() if self.bias is not None else (0, 0, 0, 0)
        mask = self.key_mask.stride() if self.key_mask is not None else (0, 0)
        return [*self.q.stride()[:3], *self.k.stride()[:3], *self.v.stride()[:3],
                *self.o.stride()[:3], *bias, *mask]

    def scalars(self) -> list:
        """heads, kv_group (H / Hkv), Sq, Sk, scale·log2(e), softcap·log2(e), window."""
        _, h, hkv, sq, sk, _, _ = self.dims
        return [h, h // hkv, sq, sk, self.scale * LOG2E, (self.softcap or 1.0) * LOG2E,
                self.window or 0]


def check_attention_args(fn: str, q, k, v, *, scale=None, causal=False, window=None,
                         alibi=None, bias=None, kv_lens=None, key_mask=None, softcap=None,
                         layout="bhsd", out=None) -> AttentionArgs:
    """Check the arguments of an attention wrapper named ``fn``; raise
    :class:`LoweringError` naming the first bad one."""
    if layout not in LAYOUTS:
        raise bad(fn, "layout", layout, f"one of {LAYOUTS}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise bad(fn, name, x, f"a 4-D tensor ({layout})")
        if x.dtype not in DTYPES:
            raise bad(fn, name, x, "dtype float16, bfloat16 or float32")
        if x.dtype != q.dtype:
            raise bad(fn, name, x, f"q's dtype {q.dtype}")
    want = torch.device(env.device())
    for name, x in (("q", q), ("k", k), ("v", v), ("bias", bias), ("kv_lens", kv_lens),
                    ("key_mask", key_mask), ("out", out)):
        if isinstance(x, torch.Tensor) and x.device.type != want.type:
            raise bad(fn, name, x, f"a tensor on {want.type} (where the kernels run here)")
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    b, h, sq, d = q.shape
    bk, hkv, sk, dk = k.shape
    if bk != b or dk != d:
        raise bad(fn, "k", k, f"batch {b} and head dim {d} as q ({layout})")
    if v.shape[0] != b or v.shape[1] != hkv or v.shape[2] != sk:
        raise bad(fn, "v", v, f"batch {b}, {hkv} kv heads and {sk} keys as k ({layout})")
    if hkv == 0 or h % hkv:
        raise bad(fn, "k", k, f"a number of kv heads dividing q's {h} heads")
    dv = v.shape[3]
    if not (1 <= d <= MAX_HEAD_DIM):
        raise bad(fn, "q", q, f"a head dim in 1..{MAX_HEAD_DIM}")
    if not (1 <= dv <= MAX_HEAD_DIM):
        raise bad(fn, "v", v, f"a head dim in 1..{MAX_HEAD_DIM}")
    q, k, v = (x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous() for x in (q, k, v))
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale):
        raise bad(fn, "scale", scale, "a finite float or None")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise bad(fn, "window", window, "an int >= 1 or None")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not softcap > 0 or not math.isfinite(softcap)):
        raise bad(fn, "softcap", softcap, "a float > 0 or None")
    slopes = None
    if alibi is not None:
        slopes = torch.as_tensor(alibi, dtype=torch.float32).to(q.device).contiguous()
        if slopes.shape != (h,):
            raise bad(fn, "alibi", alibi, f"{h} slopes, one per query head")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in DTYPES or bias.dim() > 4:
            raise bad(fn, "bias", bias, "a float16/bfloat16/float32 tensor of at most 4 dims")
        try:
            bias = torch.broadcast_to(bias, (b, h, sq, sk))
        except RuntimeError:
            raise bad(fn, "bias", bias, f"a shape broadcastable to [B, H, Sq, Sk] = "
                      f"{[b, h, sq, sk]}") from None
    if kv_lens is not None:
        if not isinstance(kv_lens, torch.Tensor) or kv_lens.shape != (b,) \
                or kv_lens.dtype not in (torch.int32, torch.int64):
            raise bad(fn, "kv_lens", kv_lens, f"an int32/int64 tensor of shape [{b}]")
        kv_lens = kv_lens.to(torch.int32).contiguous()
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.shape != (b, sk):
            raise bad(fn, "key_mask", key_mask, f"a [B, Sk] = [{b}, {sk}] tensor (nonzero = "
                      "attend)")
        key_mask = key_mask.view(torch.uint8) if key_mask.dtype == torch.bool \
            else (key_mask != 0).to(torch.uint8)
    out_shape = (b, h, sq, dv) if layout == "bhsd" else (b, sq, h, dv)
    if out is None:
        out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != out_shape \
            or out.dtype != q.dtype or (out.stride(-1) != 1 and dv > 1):
        raise bad(fn, "out", out, f"a {q.dtype} tensor of shape {list(out_shape)} whose last "
                  "dim is contiguous")
    o = out if layout == "bhsd" else out.transpose(1, 2)
    for name, x in (("q", q), ("k", k), ("v", v), ("out", o), ("bias", bias)):
        if x is not None and (x.shape[2] - 1) * x.stride(2) + (x.shape[3] - 1) * x.stride(3) \
                >= 2**31:
            raise bad(fn, name, x, "offsets within one (batch, head) below 2**31 (the kernel "
                      "indexes a head with int32)")
    return AttentionArgs(q, k, v, o, out, bias, slopes, kv_lens, key_mask, float(scale),
                         None if softcap is None else float(softcap), window, bool(causal))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    scale: float | None = None, causal: bool = False, window: int | None = None,
                    alibi: Sequence[float] | torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None,
                    key_mask: torch.Tensor | None = None, softcap: float | None = None,
                    layout: str = "bhsd", out: torch.Tensor | None = None,
                    config: AttnConfig | None = None,
                    visits: torch.Tensor | None = None) -> torch.Tensor:
    """Attention forward (the IR's ``attention`` op) with the flash kernel; returns ``out``.

    ``kv_lens`` [B] int: keys j >= kv_lens[b] are masked; ``key_mask`` [B, Sk]: nonzero =
    attend. ``config`` overrides the tile sizes (tests use small tiles to get several tiles
    from tiny shapes); ``visits`` (int32, [B·H, cdiv(Sq, BM)]) receives the number of key tiles
    each program visited.
    """
    fn = "flash_attention"
    a = check_attention_args(fn, q, k, v, scale=scale, causal=causal, window=window,
                             alibi=alibi, bias=bias, kv_lens=kv_lens, key_mask=key_mask,
                             softcap=softcap, layout=layout, out=out)
    b, h, _, sq, sk, d, dv = a.dims
    cfg = config or pick_config(q.dtype, d, dv, heavy=bias is not None)
    grid = (triton.cdiv(sq, cfg.block_m), b * h)
    if visits is not None and (visits.dtype != torch.int32 or visits.numel() < grid[0] * grid[1]
                               or not visits.is_contiguous()):
        raise bad(fn, "visits", visits, f"a contiguous int32 tensor of {grid[1]}x{grid[0]}")
    if sq == 0 or b * h == 0:
        return a.out
    if sk == 0:
        return a.out.zero_()
    count = visits if visits is not None else torch.empty(1, dtype=torch.int32,
                                                          device=q.device)
    flash_attention_fwd[grid](*a.pointers(), count, *a.strides(), *a.scalars(),
                              **a.constexprs(cfg),
                              COUNT_VISITS=visits is not None, num_warps=cfg.num_warps,
                              num_stages=cfg.num_stages)
    return a.out


# -- reference and benchmark -----------------------------------------------------------------


def key_padding(b: int, sk: int, kv_lens=None, key_mask=None, device=None):
    """[B, Sk] bool (True = attend) from ``kv_lens`` and ``key_mask``; None when neither."""
    if kv_lens is None and key_mask is None:
        return None
    keep = torch.ones(b, sk, dtype=torch.bool, device=device)
    if kv_lens is not None:
        keep &= torch.arange(sk, device=device)[None, :] < kv_lens.to(device)[:, None]
    if key_mask is not None:
        keep &= key_mask.to(device).bool()
    return keep


def reference_attention(q, k, v, *, scale=None, causal=False, window=None, alibi=None,
                        bias=None, kv_lens=None, key_mask=None, softcap=None,
                        layout="bhsd") -> torch.Tensor:
    """The IR op's reference (:func:`transfuse.ir.opdefs.nn.attention`) computed in fp32 and
    returned in q's dtype; ``kv_lens`` and ``key_mask`` become its ``key_padding_mask``."""
    b = q.shape[0]
    sk = k.shape[2] if layout == "bhsd" else k.shape[1]
    kpm = key_padding(b, sk, kv_lens, key_mask, q.device)
    xs = [x.float() for x in (q, k, v)] + [None if bias is None else bias.float(), kpm]
    attrs = {"scale": scale, "causal": causal, "window": window, "kv_heads": None,
             "alibi": None if alibi is None else [float(s) for s in alibi],
             "softcap": softcap, "layout": layout}
    return ir_attention(xs, attrs, None).to(q.dtype)


def visible_pairs(sq: int, sk: int, causal: bool, window: int | None) -> int:
    """Number of (query, key) pairs causal / window attention computes (for FLOP counts)."""
    pos = torch.arange(sq, dtype=torch.int64) + (sk - sq)
    hi = torch.clamp(pos + 1, max=sk) if causal else torch.full_like(pos, sk)
    lo = torch.clamp(pos - window + 1, min=0) if window is not None else torch.zeros_like(pos)
    return int(torch.clamp(hi - lo, min=0).sum())


def bench_attention(device, batch: int = 2, heads: int = 4, kv_heads: int | None = None,
                    seq_q: int = 64, seq_k: int | None = None, head_dim: int = 64,
                    dtype: torch.dtype = torch.float16, causal: bool = False,
                    window: int | None = None) -> dict:
    """Time :func:`flash_attention` against torch SDPA on random inputs; a dict of the shape,
    milliseconds and TFLOP/s of both (SDPA gets a dense boolean mask for a window, or for
    causal with Sq != Sk since its ``is_causal`` is top-left aligned)."""
    import torch.nn.functional as F

    from transfuse.ir.opdefs.nn import attention_mask

    seq_k = seq_k or seq_q
    kv_heads = kv_heads or heads
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device, dtype)

    q = rnd(batch, heads, seq_q, head_dim)
    k, v = rnd(batch, kv_heads, seq_k, head_dim), rnd(batch, kv_heads, seq_k, head_dim)
    out = torch.empty_like(q)
    ms = time_ms(lambda: flash_attention(q, k, v, causal=causal, window=window, out=out), device,
                 warmup=False)
    mask = None
    if window is not None or (causal and seq_q != seq_k):
        mask = attention_mask(seq_q, seq_k, causal, window, device=q.device)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              is_causal=causal and mask is None,
                                              enable_gqa=kv_heads != heads)

    sdpa_ms = time_ms(sdpa, device, warmup=False)
    flops = 4.0 * batch * heads * head_dim * visible_pairs(seq_q, seq_k, causal, window)
    return {"batch": batch, "heads": heads, "kv_heads": kv_heads, "seq_q": seq_q,
            "seq_k": seq_k, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."),
            "causal": causal, "window": window, "triton_ms": ms, "sdpa_ms": sdpa_ms,
            "triton_tflops": flops / ms / 1e9, "sdpa_tflops": flops / sdpa_ms / 1e9,
            "speedup_vs_sdpa": sdpa_ms / ms}


SHIPPED: list[KernelSpec] = shipped_specs(
    flash_attention_fwd, f"{__name__}:flash_attention_fwd", "flash_fwd", SHIPPED_FEATURES)

__all__ = ["flash_attention", "flash_attention_fwd", "reference_attention", "bench_attention",
           "pick_config", "AttnConfig", "CONFIGS", "SHIPPED", "attend_tile", "kv_tile_range",
           "load_tile", "store_rows", "open_query_tile", "check_attention_args", "AttentionArgs",
           "key_padding"]
