"""Block-sparse attention forward: flash attention that skips the key blocks a block mask drops.

What it computes: :func:`~transfuse.codegen.triton.kernels.flash_attention.flash_attention`
(every feature: scale, causal, window, ALiBi, bias, ``kv_lens``, ``key_mask``, softcap, GQA,
both layouts) with one more mask given as data: ``block_mask`` [B|1, H|1, ceil(Sq/block_m),
ceil(Sk/block_n)] (bool or integer, nonzero = attend; 2-D and 3-D masks broadcast from the
left). Query i sees key j only when ``block_mask[b, h, i // block_m, j // block_n]`` is set
(and the other masks keep it). Rows that see no key give zeros, as in flash_attention.

Glossary: as :mod:`.flash_attention` (B, H, Hkv, Sq, Sk, D, Dv, BM / BN the kernel's query /
key tile); block_m / block_n the mask's block sizes (multiples of 16, so tiles divide them);
QT = ceil(Sq/BM), KT = ceil(Sk/BN) the tile counts.

Algorithm: the wrapper turns the mask into per-query-tile lists of key tiles, as FlexAttention
does (``kv_count`` [B|1, H|1, QT] int32 and ``kv_index`` [B|1, H|1, QT, KT] int32, the kept
tiles first, ascending); tiles a query tile cannot see because of ``causal`` / ``window`` are
dropped from the lists first. Each program (query tile, batch·head) opens its tile as flash
attention does (:func:`.flash_attention.open_query_tile`) and walks its list with the
online-softmax step of flash attention (:func:`.flash_attention.attend_tile`, one inner loop
for both kernels), so a dropped tile is never loaded and the cost is proportional to the kept
tiles. Tiles are masked for position everywhere (causal diagonal, window edge, key tail):
with a sparse list there is no long unmasked interior to specialise.

How the IR asks for it: ``optimize(sparse_attention="block:B,local:L,global:G")`` (pass
``convert.sparse-attention``) keeps ``attention`` and adds an additive [S, T] bias of 0 /
-inf built from aranges (no block-mask attribute). A lowering can pass that bias and
:func:`block_mask_from_bias` of it (exact: a tile is kept when any entry is finite, and the
bias masks inside kept tiles), or, when the pattern's blocks line up with the tiles (B a
multiple of 16 and (Sk - Sq) % B == 0), only :func:`local_global_block_mask` with
``causal=True`` and no bias.

Interpreter notes: as flash attention (fp32 tiles after loading, tanh from sigmoid, plain
pointer arithmetic); the index lists are built with torch on the tensors' device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from transfuse.codegen.triton import env  # noqa: F401  (the mode, before any @triton.jit)
from transfuse.codegen.triton.kernels import flash_attention as fa
from transfuse.codegen.triton.kernels._common import time_ms
from transfuse.codegen.triton.kernels.flash_attention import (
    AttnConfig,
    attend_tile,
    bad,
    open_query_tile,
    store_rows,
)
from transfuse.codegen.triton.kernels.spec import KernelSpec

# -- the kernel ------------------------------------------------------------------------------


@triton.jit
def block_sparse_attention_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, bias_ptr, slopes_ptr, kv_lens_ptr, key_mask_ptr, visits_ptr,
    kv_count_ptr, kv_index_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_mb, stride_mn,
    stride_cb, stride_ch, stride_ib, stride_ih, stride_im,
    heads, kv_group, seq_q, seq_k, qk_scale, softcap2, window,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KV_LENS: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, COUNT_VISITS: tl.constexpr,
):
    """Grid (QT, B·H). ``kv_count`` / ``kv_index`` strides are 0 on broadcast mask axes."""
    start_m = tl.program_id(0)
    b, h, q, k_base, v_base, o_base, offs_m, pos_m, m_ok, kv_end, slope2, bias_rows, km_base = \
        open_query_tile(start_m, q_ptr, k_ptr, v_ptr, o_ptr, bias_ptr, slopes_ptr, kv_lens_ptr,
                        key_mask_ptr, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
                        stride_vb, stride_vh, stride_ob, stride_oh, stride_bb, stride_bh,
                        stride_bm, stride_mb, heads, kv_group, seq_q, seq_k, HEAD_DIM, D_PAD,
                        BLOCK_M, HAS_KV_LENS, HAS_ALIBI, UPCAST)
    # -- this tile's list of kept key tiles --
    count = tl.load(kv_count_ptr + b * stride_cb + h * stride_ch + start_m)
    index_base = kv_index_ptr + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih \
        + start_m.to(tl.int64) * stride_im
    # -- online softmax over the kept tiles (position masks everywhere) --
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    for i in range(0, count):
        start_n = tl.load(index_base + i) * BLOCK_N
        acc, m_i, l_i = attend_tile(
            acc, m_i, l_i, q, start_n, offs_m, pos_m, k_base, v_base, stride_kn, stride_vn,
            kv_end, window, qk_scale, softcap2, slope2, bias_rows, stride_bn, m_ok, km_base,
            stride_mn, HEAD_DIM, D_PAD, HEAD_DIM_V, DV_PAD, BLOCK_N, True, CAUSAL, HAS_WINDOW,
            HAS_ALIBI, HAS_BIAS, HAS_KEY_MASK, HAS_SOFTCAP, UPCAST)
    # -- epilogue --
    store_rows(o_base, acc, l_i, offs_m, seq_q, stride_om, HEAD_DIM_V, DV_PAD)
    if COUNT_VISITS:
        tl.store(visits_ptr + tl.program_id(1) * tl.num_programs(0) + start_m, count)


# -- block masks ---------------------------------------------------------------------------


def as_block_mask(fn: str, block_mask, b: int, h: int, sq: int, sk: int, block_m: int,
                  block_n: int) -> torch.Tensor:
    """``block_mask`` checked and broadcast to 4-D bool [B|1, H|1, ceil(Sq/block_m),
    ceil(Sk/block_n)]."""
    for name, x in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 16 or x % 16:
            raise bad(fn, name, x, "a multiple of 16 (the kernel's tiles must divide it)")
    qb, kb = triton.cdiv(sq, block_m), triton.cdiv(sk, block_n)
    want = f"a bool/integer tensor [B|1, H|1, {qb}, {kb}] (ceil(Sq/block_m), ceil(Sk/block_n))"
    if not isinstance(block_mask, torch.Tensor) or not 2 <= block_mask.dim() <= 4 \
            or block_mask.is_floating_point() or block_mask.is_complex():
        raise bad(fn, "block_mask", block_mask, want)
    m = block_mask.reshape((1,) * (4 - block_mask.dim()) + tuple(block_mask.shape))
    if m.shape[2:] != (qb, kb) or m.shape[0] not in (1, b) or m.shape[1] not in (1, h):
        raise bad(fn, "block_mask", block_mask, want)
    return m != 0


def tile_lists(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [B', H', QT, KT] -> (kv_count [B', H', QT] int32, kv_index [B', H', QT, KT] int32:
    the kept tiles first, ascending; the rest unused)."""
    count = tiles.sum(-1, dtype=torch.int32)
    index = torch.argsort((~tiles).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return count.contiguous(), index.contiguous()


def position_tiles(sq: int, sk: int, causal: bool, window: int | None, bm: int, bn: int,
                   device=None) -> torch.Tensor | None:
    """Bool [QT, KT]: the tiles that hold a (query, key) pair ``causal`` / ``window`` keep
    (query tile rows first..last sit at positions first + Sk - Sq ..; a key tile
    [n0, n0 + BN) is needed when n0 <= last position and n0 + BN - 1 > first position - W).
    None when neither is set."""
    if not causal and window is None:
        return None
    r0 = torch.arange(0, sq, bm, device=device)  # [QT] first row of each query tile
    first = r0 + (sk - sq)
    last = torch.clamp(r0 + bm, max=sq) - 1 + (sk - sq)
    n0 = torch.arange(0, sk, bn, device=device)  # [KT]
    keep = torch.ones(first.numel(), n0.numel(), dtype=torch.bool, device=device)
    if causal:
        keep &= n0[None, :] <= last[:, None]
    if window is not None:
        keep &= n0[None, :] + bn - 1 > first[:, None] - window
    return keep


def block_mask_from_bias(bias: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Bool [B|1, H|1, ceil(Sq/block_m), ceil(Sk/block_n)] from an additive bias (at least 2-D,
    [..., Sq, Sk]): a block is kept when any of its entries is finite (> -inf)."""
    x = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)) if bias.dim() < 4 else bias
    b, h, sq, sk = x.shape
    qb, kb = triton.cdiv(sq, block_m), triton.cdiv(sk, block_n)
    keep = torch.zeros(b, h, qb * block_m, kb * block_n, dtype=torch.bool, device=x.device)
    keep[:, :, :sq, :sk] = x > float("-inf")
    return keep.view(b, h, qb, block_m, kb, block_n).any(5).any(3)


def local_global_block_mask(seq_q: int, seq_k: int, block: int, local: int,
                            global_: int = 0) -> torch.Tensor:
    """The block mask [1, 1, QB, KB] of ``sparse_attention="block:B,local:L,global:G"``:
    query block qb (of absolute positions, i.e. rows shifted by Sk - Sq) sees key blocks
    qb-L+1 .. qb and 0 .. G-1; combine with ``causal=True``. Exact (no bias needed) only when
    (Sk - Sq) % block == 0 so that the kernel's query blocks are the pattern's."""
    qb, kb = triton.cdiv(seq_q, block), triton.cdiv(seq_k, block)
    first = (seq_k - seq_q) // block  # the pattern block of query row 0
    q = torch.arange(qb)[:, None] + first
    k = torch.arange(kb)[None, :]
    return ((k > q - local) | (k < global_))[None, None]


# -- the wrapper -----------------------------------------------------------------------------


def tiles_for(cfg: AttnConfig, block_m: int, block_n: int) -> AttnConfig:
    """``cfg`` with tiles shrunk (halved) until they divide the mask's blocks."""
    bm, bn = cfg.block_m, cfg.block_n
    while block_m % bm:
        bm //= 2
    while block_n % bn:
        bn //= 2
    return AttnConfig(bm, bn, cfg.num_warps, cfg.num_stages)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           block_mask: torch.Tensor, block_m: int, block_n: int, *,
                           scale=None, causal=False, window=None, alibi=None, bias=None,
                           kv_lens=None, key_mask=None, softcap=None, layout="bhsd",
                           out: torch.Tensor | None = None, config: AttnConfig | None = None,
                           visits: torch.Tensor | None = None) -> torch.Tensor:
    """Attention forward restricted to the blocks ``block_mask`` keeps; returns ``out``.

    Keyword arguments as :func:`.flash_attention.flash_attention`; ``config`` overrides the
    tiles (they must divide block_m / block_n); ``visits`` (int32 [B·H, QT]) receives the
    number of key tiles each program loaded.
    """
    fn = "block_sparse_attention"
    a = fa.check_attention_args(fn, q, k, v, scale=scale, causal=causal, window=window,
                                alibi=alibi, bias=bias, kv_lens=kv_lens, key_mask=key_mask,
                                softcap=softcap, layout=layout, out=out)
    b, h, _, sq, sk, d, dv = a.dims
    mask = as_block_mask(fn, block_mask, b, h, sq, sk, block_m, block_n).to(q.device)
    cfg = config or tiles_for(fa.pick_config(q.dtype, d, dv, heavy=bias is not None),
                                  block_m, block_n)
    if block_m % cfg.block_m or block_n % cfg.block_n:
        raise bad(fn, "config", cfg, f"tiles dividing block_m={block_m}, block_n={block_n}")
    grid = (triton.cdiv(sq, cfg.block_m), b * h)
    if visits is not None and (visits.dtype != torch.int32 or visits.numel() < grid[0] * grid[1]
                               or not visits.is_contiguous()):
        raise bad(fn, "visits", visits, f"a contiguous int32 tensor of {grid[1]}x{grid[0]}")
    if sq == 0 or b * h == 0:
        return a.out
    if sk == 0:
        return a.out.zero_()
    # -- mask blocks -> kernel tiles -> per-query-tile lists --
    tiles = mask.repeat_interleave(block_m // cfg.block_m, 2)[:, :, :grid[0]]
    tiles = tiles.repeat_interleave(block_n // cfg.block_n, 3)[:, :, :, :triton.cdiv(sk, cfg.block_n)]
    pos = position_tiles(sq, sk, a.causal, a.window, cfg.block_m, cfg.block_n, q.device)
    if pos is not None:
        tiles = tiles & pos
    count, index = tile_lists(tiles)
    cs = [s if n > 1 else 0 for s, n in zip(count.stride()[:2], count.shape[:2])]
    ist = [s if n > 1 else 0 for s, n in zip(index.stride()[:2], index.shape[:2])]
    counter = visits if visits is not None else torch.empty(1, dtype=torch.int32,
                                                            device=q.device)
    block_sparse_attention_fwd[grid](
        *a.pointers(), counter, count, index, *a.strides(), *cs, *ist, index.stride(2),
        *a.scalars(), **a.constexprs(cfg), COUNT_VISITS=visits is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return a.out


# -- reference and benchmark -----------------------------------------------------------------


def reference_block_sparse_attention(q, k, v, block_mask, block_m: int, block_n: int,
                                     **kwargs) -> torch.Tensor:
    """The IR op's reference with the block mask as an extra 0/-inf bias (fp32, returned in
    q's dtype); rows the block mask leaves without any key give zeros."""
    layout = kwargs.get("layout", "bhsd")
    b, sq, sk = q.shape[0], q.shape[2 if layout == "bhsd" else 1], \
        k.shape[2 if layout == "bhsd" else 1]
    m = block_mask.reshape((1,) * (4 - block_mask.dim()) + tuple(block_mask.shape)) != 0
    keep = m.repeat_interleave(block_m, 2)[:, :, :sq].repeat_interleave(block_n, 3)[..., :sk]
    extra = torch.zeros(keep.shape, dtype=torch.float32, device=q.device)
    extra = extra.masked_fill(~keep, float("-inf"))
    bias = kwargs.pop("bias", None)
    bias = extra if bias is None else bias.float() + extra
    out = fa.reference_attention(q, k, v, bias=bias, **kwargs)
    empty = ~keep.any(-1, keepdim=True).expand(b, -1, -1, -1)  # [B, H|1, Sq, 1]
    if layout == "bshd":
        empty = empty.transpose(1, 2)
    return out.masked_fill(empty, 0.0)


def bench_block_sparse_attention(device, batch: int = 2, heads: int = 4, seq: int = 256,
                                 head_dim: int = 64, dtype: torch.dtype = torch.float16,
                                 block: int = 64, local: int = 2, global_: int = 1) -> dict:
    """Time :func:`block_sparse_attention` with a causal local+global pattern against dense
    causal :func:`.flash_attention.flash_attention` and SDPA with the dense boolean mask."""
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device, dtype)

    q, k, v = (rnd(batch, heads, seq, head_dim) for _ in range(3))
    mask = local_global_block_mask(seq, seq, block, local, global_).to(device)
    out = torch.empty_like(q)
    ms = time_ms(lambda: block_sparse_attention(q, k, v, mask, block, block, causal=True,
                                                out=out), device, warmup=False)
    dense_ms = time_ms(lambda: fa.flash_attention(q, k, v, causal=True, out=out), device,
                       warmup=False)
    keep = mask[0, 0].repeat_interleave(block, 0)[:seq].repeat_interleave(block, 1)[:, :seq]
    keep &= torch.ones(seq, seq, dtype=torch.bool, device=keep.device).tril()
    sdpa_ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep), device,
                      warmup=False)
    pairs = int(keep.sum())
    flops = 4.0 * batch * heads * head_dim * pairs
    return {"batch": batch, "heads": heads, "seq": seq, "head_dim": head_dim,
            "dtype": str(dtype).removeprefix("torch."), "block": block, "local": local,
            "global": global_, "kept_causal_pairs": pairs / (seq * (seq + 1) / 2),
            "triton_ms": ms, "dense_flash_ms": dense_ms, "sdpa_masked_ms": sdpa_ms,
            "triton_tflops": flops / ms / 1e9, "speedup_vs_dense_flash": dense_ms / ms,
            "speedup_vs_sdpa_masked": sdpa_ms / ms}


#: the default tiles (mask blocks that are multiples of them, e.g. 128) and the tiles of
#: 64x64 mask blocks where those differ; smaller blocks shrink the tiles further (fewer
#: registers), which SHIPPED does not list
SHIPPED: list[KernelSpec] = fa.shipped_specs(
    block_sparse_attention_fwd, f"{__name__}:block_sparse_attention_fwd", "block_sparse_fwd",
    fa.SHIPPED_FEATURES)
SHIPPED += [s for s in fa.shipped_specs(
    block_sparse_attention_fwd, f"{__name__}:block_sparse_attention_fwd", "block_sparse_fwd",
    fa.SHIPPED_FEATURES, tiles=lambda cfg: tiles_for(cfg, 64, 64)) if s not in SHIPPED]

__all__ = ["block_sparse_attention", "block_sparse_attention_fwd",
           "reference_block_sparse_attention", "bench_block_sparse_attention",
           "block_mask_from_bias", "local_global_block_mask", "tile_lists", "position_tiles",
           "SHIPPED"]
