"""Rotary position embedding (RoPE) of q and/or k, in place or into ``out=``, in one launch.

What it computes: the IR op ``rotary(x, cos, sin) {interleaved}`` =
``x * cos + rotate(x) * sin`` on the last dim of ``x``, where ``rotate`` is

- rotate-half (``interleaved=False``; GPT-NeoX, Llama): element ``j`` of the first half pairs
  with element ``j + R/2``: ``(a, b) -> (a*cos[j] - b*sin[j], b*cos[j+R/2] + a*sin[j+R/2])``;
- pairwise (``interleaved=True``; GPT-J): element ``2j`` pairs with ``2j + 1`` the same way.

As in the IR, ``cos`` and ``sin`` are full width (each frequency twice) and are read at both
members of a pair, so tables whose halves differ give the IR's numbers too. Two extensions
the lowering can use to save a gather and a concat:

- ``positions=``: ``cos``/``sin`` are tables [T, R] and row ``positions[...]`` of them is used
  for each token (positions broadcast against x's leading dims, e.g. [B, S] position ids
  reshaped to [B, S, 1] for [B, S, H, D] or [B, 1, S] for [B, H, S, D]). Without it, ``cos``
  and ``sin`` broadcast against x, as the IR op's inputs do ([S, D], [B, 1, S, D], [S, 1, D]).
- partial rotary: when ``cos.shape[-1] = R < D`` only the first R elements of each head are
  rotated (GPT-NeoX / Phi's ``rotary_pct``); the other ``D - R`` are copied when out of
  place and left alone in place.

Layouts: x is any tensor of rank 1-4 whose last dim is contiguous ([B, S, H, D] or
[B, H, S, D] or a strided view such as q/k slices of a fused qkv projection); the kernel sees
it as [N0, N1, N2, D] and indexes rows with strides, so transposed layouts cost nothing.
Glossary: D head dim, R rotary dim (even, <= D), T table rows (positions), rows
N0*N1*N2 (tokens x heads).

Algorithm. One program rotates BLOCK_R rows: a tile of BLOCK_R x BLOCK_H pairs (BLOCK_H the
power of two >= R/2; ~1024 pairs, and at most ~1024 elements of the D - R copy when there
is one). It decomposes its row indices into (i0, i1, i2), loads the two members of every
pair and the cos/sin at both (from the broadcast strides, or from the table row that
``positions`` names), computes in fp32 and stores in the output dtype. q and k are rotated
in the same launch: programs ``[0, q_programs)`` take q's rows, the rest k's (k may have fewer
heads: GQA). In place is safe: every element is loaded and stored by the same program,
loads first. Interleaved pairs are loaded as one contiguous row and split into even / odd
(``tl.reshape`` + ``tl.split``; ``tl.join`` on the way back), so every access is contiguous.

Interpreter notes: values are upcast to fp32 right after loading (bf16 arithmetic is wrong
there); fp32 -> bf16 casts truncate there (round to nearest on a GPU). ``positions`` are
range-checked on CPU tensors; on a GPU that check would synchronise, so they are the
caller's contract there (the lowering builds them).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from transfuse.codegen.triton import env  # noqa: F401  (before any @triton.jit)
from transfuse.codegen.triton.kernels._common import (
    check_float,
    fail,
    time_ms,
)
from transfuse.codegen.triton.kernels.spec import KernelSpec

#: pairs per program tile (BLOCK_R x BLOCK_H)
TILE = 1024


# -- kernel ---------------------------------------------------------------------------------


@triton.jit
def _pairs(ptrs, mask, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """fp32 (even, odd) elements [BLOCK_R, BLOCK_H] of a contiguous [BLOCK_R, 2*BLOCK_H] load."""
    v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(v, [BLOCK_R, BLOCK_H, 2]))


@triton.jit
def _rotate_rows(X, OUT, COS, SIN, POS, tile, rows, n1, n2, sx0, sx1, sx2, so0, so1, so2,
                 c0, c1, c2, stride_table,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                 INTERLEAVED: tl.constexpr, HAS_POS: tl.constexpr, TAIL: tl.constexpr,
                 BLOCK_T: tl.constexpr):
    """Rotate rows ``tile*BLOCK_R ..`` of one tensor (x viewed as [N0, N1, N2, D])."""
    r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = r < rows
    r = r.to(tl.int64)
    i2 = r % n2
    i1 = (r // n2) % n1
    i0 = r // (n2 * n1)
    x_row = (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None]  # [BLOCK_R, 1]
    o_row = (i0 * so0 + i1 * so1 + i2 * so2)[:, None]
    c_row = i0 * c0 + i1 * c1 + i2 * c2
    if HAS_POS:  # the strides were POS's: look the table row up
        c_row = tl.load(POS + c_row, mask=row_mask, other=0).to(tl.int64) * stride_table
    c_row = c_row[:, None]

    # -- the two members (a, b) of every pair; x * cos + rotate(x) * sin, rotate = (-b, a) --
    if INTERLEAVED:  # pairs are neighbours: load R contiguous elements, split even / odd
        c = tl.arange(0, 2 * BLOCK_H)[None, :]
        mask = row_mask[:, None] & (c < 2 * HALF)
        xa, xb = _pairs(X + x_row + c, mask, BLOCK_R, BLOCK_H)
        ca, cb = _pairs(COS + c_row + c, mask, BLOCK_R, BLOCK_H)
        sa, sb = _pairs(SIN + c_row + c, mask, BLOCK_R, BLOCK_H)
        y = tl.join(xa * ca - xb * sa, xb * cb + xa * sb)  # [BLOCK_R, BLOCK_H, 2]
        tl.store(OUT + o_row + c, tl.reshape(y, [BLOCK_R, 2 * BLOCK_H]), mask=mask)
    else:  # pairs are HALF apart: two contiguous halves
        j = tl.arange(0, BLOCK_H)[None, :]
        mask = row_mask[:, None] & (j < HALF)
        xa = tl.load(X + x_row + j, mask=mask, other=0.0).to(tl.float32)
        xb = tl.load(X + x_row + HALF + j, mask=mask, other=0.0).to(tl.float32)
        ca = tl.load(COS + c_row + j, mask=mask, other=0.0).to(tl.float32)
        cb = tl.load(COS + c_row + HALF + j, mask=mask, other=0.0).to(tl.float32)
        sa = tl.load(SIN + c_row + j, mask=mask, other=0.0).to(tl.float32)
        sb = tl.load(SIN + c_row + HALF + j, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + o_row + j, xa * ca - xb * sa, mask=mask)
        tl.store(OUT + o_row + HALF + j, xb * cb + xa * sb, mask=mask)

    # -- partial rotary out of place: copy the unrotated D - R elements --------------------
    if TAIL > 0:
        t = tl.arange(0, BLOCK_T)
        tmask = row_mask[:, None] & (t < TAIL)[None, :]
        v = tl.load(X + x_row + 2 * HALF + t[None, :], mask=tmask)
        tl.store(OUT + o_row + 2 * HALF + t[None, :], v, mask=tmask)


@triton.jit
def rotary_kernel(
    Q, QO, K, KO, COS, SIN, POS,
    q_rows, q_n1, q_n2, q_sx0, q_sx1, q_sx2, q_so0, q_so1, q_so2, q_c0, q_c1, q_c2,
    k_rows, k_n1, k_n2, k_sx0, k_sx1, k_sx2, k_so0, k_so1, k_so2, k_c0, k_c1, k_c2,
    stride_table, q_programs,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_POS: tl.constexpr, HAS_K: tl.constexpr,
    TAIL: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Programs [0, q_programs) rotate q's rows, the rest k's (when HAS_K)."""
    pid = tl.program_id(0)
    is_k = False
    if HAS_K:
        is_k = pid >= q_programs
    if is_k:
        _rotate_rows(K, KO, COS, SIN, POS, pid - q_programs, k_rows, k_n1, k_n2,
                     k_sx0, k_sx1, k_sx2, k_so0, k_so1, k_so2, k_c0, k_c1, k_c2, stride_table,
                     HALF, BLOCK_H, BLOCK_R, INTERLEAVED, HAS_POS, TAIL, BLOCK_T)
    else:
        _rotate_rows(Q, QO, COS, SIN, POS, pid, q_rows, q_n1, q_n2,
                     q_sx0, q_sx1, q_sx2, q_so0, q_so1, q_so2, q_c0, q_c1, q_c2, stride_table,
                     HALF, BLOCK_H, BLOCK_R, INTERLEAVED, HAS_POS, TAIL, BLOCK_T)


# -- launch configuration ---------------------------------------------------------------------


def choose_config(rotary_dim: int, head_dim: int, in_place: bool,
                  interleaved: bool = False) -> dict:
    """Tile and warps for a rotary dim R of a head dim D. Interleaved tiles are half as tall:
    the even / odd split needs a layout conversion (through shared memory) that doubles the
    registers (244 a thread at 1024 pairs without the 16-divisibility hints, sm_80)."""
    half = rotary_dim // 2
    block_h = triton.next_power_of_2(half)
    tail = 0 if in_place else head_dim - rotary_dim
    block_t = triton.next_power_of_2(max(tail, 1))
    tile = TILE // 2 if interleaved else TILE
    rows = max(1, min(64, tile // max(block_h, block_t)))  # the tail copy is a tile too
    return {"HALF": half, "BLOCK_H": block_h, "BLOCK_R": rows, "TAIL": tail, "BLOCK_T": block_t,
            "num_warps": 4}


# -- wrappers ---------------------------------------------------------------------------------


_fail = functools.partial(fail, "rotary")


def _check_float(name: str, t, device) -> None:
    check_float("rotary", name, t, device, "x")


def _as4(t: torch.Tensor) -> torch.Tensor:
    """``t`` with leading size-1 dims up to rank 4 (a view: broadcast strides survive)."""
    return t[(None,) * (4 - t.dim())]


def _tables(cos, sin, x_shape, positions, r, device):
    """(cos, sin, three row strides, table row stride, positions or None) for one x shape."""
    lead = tuple(x_shape[:-1])
    if positions is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dim() != 2:
                _fail(name, t, "a table [T, R] when positions are given")
        if positions.dtype not in (torch.int32, torch.int64) or positions.device != device:
            _fail("positions", positions, f"int32 or int64 position ids on {device}")
        try:
            pe = positions.expand(lead)
        except RuntimeError:
            _fail("positions", positions, f"a shape that broadcasts to x's leading dims {lead}")
        if pe.numel() and positions.device.type == "cpu" and (
                int(positions.min()) < 0 or int(positions.max()) >= cos.shape[0]):
            _fail("positions", positions, f"values in [0, {cos.shape[0]}) (rows of cos/sin)")
        return pe.unsqueeze(-1), cos.stride(0)  # [..., 1]: x's rank, like a broadcast cos
    full = lead + (r,)
    try:
        if torch.broadcast_shapes(cos.shape, full) != full:
            raise RuntimeError
        ce = cos.expand(full)
    except RuntimeError:
        _fail("cos", cos, f"a shape that broadcasts to {full} without enlarging x")
    return ce, 0


def _slot(name, x, out_name, out, cos, sin, positions, r):
    """The per-tensor kernel arguments (rows, n1, n2, x/out/cos strides) and the out tensor."""
    _check_float(name, x, None)
    if not 1 <= x.dim() <= 4:
        _fail(name, x, "rank 1 to 4 ([B, S, H, D], [B, H, S, D], ...)")
    d = x.shape[-1]
    if r > d:
        _fail("cos", cos, f"a rotary dim (last dim) <= the head dim {d} of {name}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    in_place = out is x
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    else:
        _check_float(out_name, out, x.device)
        if out.shape != x.shape:
            _fail(out_name, out, f"shape {tuple(x.shape)} (that of {name})")
        if out.stride(-1) != 1 or any(s == 0 and n > 1 for s, n in zip(out.stride(), out.shape)):
            _fail(out_name, out, "a writable tensor with a contiguous last dim and no "
                                 "broadcast (stride 0) dims")
    if x.stride(-1) != 1:
        if in_place:
            _fail(name, x, "a contiguous last dim to rotate in place")
        x = x.contiguous()
    table, stride_table = _tables(cos, sin, x.shape, positions, r, x.device)
    x4, o4, t4 = _as4(x), _as4(out), _as4(table)
    n0, n1, n2 = x4.shape[:3]
    args = [n0 * n1 * n2, n1, n2, *x4.stride()[:3], *o4.stride()[:3], *t4.stride()[:3]]
    return x, out, args, stride_table, in_place


def _launch(q, k, cos, sin, *, interleaved, positions, q_out, k_out):
    _check_float("q" if k is not None else "x", q, None)
    for name, t in (("cos", cos), ("sin", sin)):
        _check_float(name, t, q.device)
        if t.dim() == 0 or t.shape[-1] % 2:
            _fail(name, t, "an even rotary dim (last dim): full width, each frequency twice")
    if sin.shape != cos.shape:
        _fail("sin", sin, f"the shape of cos {tuple(cos.shape)}")
    r = cos.shape[-1]
    if positions is not None and not isinstance(positions, torch.Tensor):
        _fail("positions", positions, "a tensor of position ids")
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    qn, kn = ("q", "k") if k is not None else ("x", None)
    q, q_out, q_args, stride_table, q_in_place = _slot(
        qn, q, "q_out" if k is not None else "out", q_out, cos, sin, positions, r)
    if k is not None:
        _check_float("k", k, q.device)
        if k.dtype != q.dtype or k.shape[-1] != q.shape[-1]:
            _fail("k", k, f"dtype {q.dtype} and head dim {q.shape[-1]} (those of q)")
        k, k_out, k_args, _, k_in_place = _slot("k", k, "k_out", k_out, cos, sin, positions, r)
        if k_out.dtype != q_out.dtype or k_in_place != q_in_place:
            _fail("k_out", k_out, f"dtype {q_out.dtype} and {'' if q_in_place else 'not '}in "
                                  "place, like q_out")
    else:
        k_args = [0] * len(q_args)
    cfg = choose_config(r, q.shape[-1], q_in_place, bool(interleaved))
    q_programs = triton.cdiv(q_args[0], cfg["BLOCK_R"])
    grid = (q_programs + (triton.cdiv(k_args[0], cfg["BLOCK_R"]) if k is not None else 0),)
    if grid[0] == 0:
        return q_out, k_out
    pos = positions if positions is not None else cos
    rotary_kernel[grid](
        q, q_out, k if k is not None else q, k_out if k is not None else q_out, cos, sin, pos,
        *q_args, *k_args, stride_table, q_programs,
        HALF=cfg["HALF"], BLOCK_H=cfg["BLOCK_H"], BLOCK_R=cfg["BLOCK_R"],
        INTERLEAVED=bool(interleaved), HAS_POS=positions is not None, HAS_K=k is not None,
        TAIL=cfg["TAIL"], BLOCK_T=cfg["BLOCK_T"], num_warps=cfg["num_warps"],
    )
    return q_out, k_out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False,
           positions: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The IR's ``rotary``; ``out=x`` rotates in place. Returns ``out``."""
    return _launch(x, None, cos, sin, interleaved=interleaved, positions=positions,
                   q_out=out, k_out=None)[0]


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
              interleaved: bool = False, positions: torch.Tensor | None = None,
              q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary of q and k (same layout, dtype and head dim; k may have fewer heads) in one
    launch; ``q_out=q, k_out=k`` rotates both in place."""
    if not isinstance(k, torch.Tensor):
        _fail("k", k, "a tensor (use rotary() for q alone)")
    return _launch(q, k, cos, sin, interleaved=interleaved, positions=positions,
                   q_out=q_out, k_out=k_out)


# -- reference --------------------------------------------------------------------------------


def reference_rotary(x, cos, sin, *, interleaved=False, positions=None):
    """The IR op's reference, after the table lookup and on the first R elements."""
    from transfuse.ir.opdefs.fused import rotary as ir_rotary

    if positions is not None:
        idx = positions.expand(x.shape[:-1]).long()
        cos, sin = cos[idx], sin[idx]
    r = cos.shape[-1]
    y = ir_rotary([x[..., :r], cos, sin], {"interleaved": interleaved}, None)
    return torch.cat([y, x[..., r:].to(y.dtype)], dim=-1) if r < x.shape[-1] else y


# -- benchmark --------------------------------------------------------------------------------


def bench_rotary(device: str, batch: int = 8, seq: int = 512, heads: int = 32,
                 kv_heads: int = 8, head_dim: int = 128,
                 dtype: torch.dtype = torch.bfloat16) -> dict:
    """q and k [B, S, H, D] rotated in place from a position-indexed table vs the reference."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, generator=g)
    k = torch.randn(batch, seq, kv_heads, head_dim, device=device, dtype=dtype, generator=g)
    ang = torch.rand(seq, head_dim // 2, device=device, generator=g) * 6.28
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    pos = torch.arange(seq, device=device).expand(batch, seq)[..., None]  # [B, S, 1]
    ms = time_ms(lambda: rotary_qk(q, k, cos, sin, positions=pos, q_out=q, k_out=k), device)
    ref = time_ms(lambda: (reference_rotary(q, cos, sin, positions=pos),
                           reference_rotary(k, cos, sin, positions=pos)), device)
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
    return {"kernel": f"rotary_qk[hd{head_dim} {str(dtype)[6:]}]", "triton_ms": ms,
            "torch_ms": ref, "triton_gbps": nbytes / ms / 1e6, "torch_gbps": nbytes / ref / 1e6}


# -- shipped configurations -------------------------------------------------------------------

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_SLOT = ("rows", "n1", "n2", "sx0", "sx1", "sx2", "so0", "so1", "so2", "c0", "c1", "c2")


def _spec(dtype, r, d=None, *, interleaved=False, positions=True, k=True, in_place=True):
    d = d or r
    cfg = choose_config(r, d, in_place, interleaved)
    p = "*" + _TY[dtype]
    sig = {"Q": p, "QO": p, "K": p, "KO": p, "COS": p, "SIN": p,
           "POS": "*i32" if positions else p,
           **{f"q_{a}": "i32" for a in _SLOT}, **{f"k_{a}": "i32" for a in _SLOT},
           "stride_table": "i32", "q_programs": "i32"}
    consts = {"HALF": cfg["HALF"], "BLOCK_H": cfg["BLOCK_H"], "BLOCK_R": cfg["BLOCK_R"],
              "INTERLEAVED": interleaved, "HAS_POS": positions, "HAS_K": k,
              "TAIL": cfg["TAIL"], "BLOCK_T": cfg["BLOCK_T"]}
    sig.update(dict.fromkeys(consts, "constexpr"))
    name = (f"rotary{'_qk' if k else ''}[{'gptj' if interleaved else 'neox'} R{r} D{d} "
            f"{_TY[dtype]}{' pos' if positions else ''}{'' if in_place else ' out'}]")
    return KernelSpec(kernel=f"{__name__}:rotary_kernel", name=name, signature=sig,
                      constexprs=consts, num_warps=cfg["num_warps"], num_stages=1)


#: head dims 64/80/128/256 (80: a padded tile), both pair styles, with and without a
#: position table, q alone or q and k, partial rotary out of place, each dtype
SHIPPED: list[KernelSpec] = [
    *(_spec(torch.bfloat16, r) for r in (64, 80, 128, 256)),
    _spec(torch.float16, 128),
    _spec(torch.float32, 128),
    _spec(torch.float16, 64, interleaved=True),
    _spec(torch.bfloat16, 128, interleaved=True, positions=False, k=False),
    _spec(torch.float16, 128, positions=False, in_place=False),
    _spec(torch.float16, 32, 128, in_place=False),
    _spec(torch.float32, 64, 80, in_place=False),
]

__all__ = ["rotary", "rotary_qk", "reference_rotary", "bench_rotary", "choose_config",
           "rotary_kernel", "SHIPPED"]
