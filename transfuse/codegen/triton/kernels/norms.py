"""RMSNorm and LayerNorm over the last dims, with an optional residual add fused in.

What it computes (the IR ops ``rms_norm``, ``layer_norm`` and ``add_norm``, same attributes):

- ``rms_norm(x, weight?) {eps, offset, upcast}``:
  ``y = round(x * rsqrt(mean(x²) + eps)) * (offset + weight)``;
  ``offset = 1.0`` is Gemma's ``(1 + w)``.
- ``layer_norm(x, weight?, bias?) {eps}``: ``y = (x - mean(x)) * rsqrt(var(x) + eps) * w + b``
  (biased variance, as torch).
- ``add_norm(x, residual, weight?, bias?) {kind, eps, offset, upcast}`` -> ``(normed, sum)``:
  ``sum = x + residual`` (rounded to the result dtype, as the IR computes it), ``normed`` one
  of the two norms of ``sum``. The sum is written only when asked (pre-norm Transformers use
  it as the next residual): one read of ``x`` and ``residual``, one write of each output.

``normalized_ndim`` (both ops) folds the last ``nd`` dims into one row of E elements; every
leading dim becomes a row. Glossary: M rows (the product of the leading dims), E the
normalised size (hidden size), BLOCK_E the power of two >= E a program holds.

Algorithm. One program normalises ROWS rows (ROWS > 1 only when rows are short: a tile of
ROWS x BLOCK_E ~ 1024 elements keeps every thread busy). It loads the rows once as fp32
(fp16/bf16/fp32 inputs), adds the residual, keeps the whole row in registers and computes the
statistics there in fp32: layer norm subtracts the mean before squaring (two passes over
registers, no cancellation), rms norm sums squares. It then scales, applies the weight (and
bias) and stores in the output dtype. Rows longer than ``MAX_BLOCK`` (8192: 8 fp32 values
per thread at 32 warps) take the *looped* variant: one program per row walks the row in
chunks of ``LOOP_BLOCK`` elements, once per statistic (rms: sum of squares; layer: the mean,
then the centred sum of squares) and once more to write, re-reading ``x`` and ``residual``
each time (2 reads for rms, 3 for layer; the re-reads are of one row, usually from L2). The
sum output is written on the first pass.

Rounding follows the python target: the sum is rounded to the result dtype before it is
normalised; rms norm rounds the normalised row to the input dtype before the weight, and
``offset + weight`` is rounded to the weight dtype (torch computes ``w + offset`` in it).
Statistics are always fp32: ``upcast=False`` (statistics in the input dtype in the python
target) is accepted and gives the same or better numbers (an fp16 ``x²`` overflows at 256).

Output dtype: the input dtype for ``rms_norm`` / ``layer_norm`` (the IR's type; torch would
promote fp16 x with an fp32 weight), the promoted dtype of ``x`` and ``residual`` for
``add_norm``.

Interpreter notes (``TRITON_INTERPRET=1``): values are upcast to fp32 right after loading
(bf16 arithmetic is wrong there, triton#11584); fp32 -> bf16 casts truncate there instead of
rounding to nearest (measured, triton 3.9), so bf16 outputs may differ from torch by one
bf16 ulp under the interpreter only.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from transfuse.codegen.triton import env  # noqa: F401  (before any @triton.jit)
from transfuse.codegen.triton.kernels._common import (
    FLOAT_DTYPES,
    check_float,
    fail,
    row_view,
    time_ms,
)
from transfuse.codegen.triton.kernels.spec import KernelSpec
from transfuse.errors import LoweringError

#: the longest row a single-pass program holds in registers
MAX_BLOCK = 8192
#: the chunk the looped variant walks a longer row in
LOOP_BLOCK = 4096
#: the elements a multi-row tile aims at when rows are short
TILE = 1024
_KINDS = ("rms", "layer")


# -- kernel ---------------------------------------------------------------------------------


@triton.jit
def _load_sum(X, R, S, x_off, r_off, s_off, mask, HAS_RES: tl.constexpr,
              WRITE_SUM: tl.constexpr, OUT_TY: tl.constexpr):
    """fp32 values of x (+ residual, rounded to the output dtype; stored to S if asked)."""
    x = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + r_off, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(OUT_TY).to(tl.float32)
        if WRITE_SUM:
            tl.store(S + s_off, x, mask=mask)
    return x


@triton.jit
def _scale_store(Y, W, B, h, cols, col_mask, y_off, mask, offset, IS_RMS: tl.constexpr,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Apply the weight (+ offset) and bias to the normalised fp32 ``h``; store to Y."""
    if IS_RMS:
        h = h.to(Y.dtype.element_ty).to(tl.float32)  # the python target rounds before w
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        if IS_RMS:
            w = (w + offset).to(W.dtype.element_ty).to(tl.float32)
        h = h * w
    if HAS_B:
        h = h + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(Y + y_off, h, mask=mask)


@triton.jit
def norm_fwd_kernel(
    X, R, W, B, Y, S,  # x, residual, weight, bias [E]; normed out, sum out
    M, E,  # rows, normalised size
    stride_x, stride_r, stride_y, stride_s,  # row strides (the last dim is contiguous)
    eps, offset,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, WRITE_SUM: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_E: tl.constexpr, ROWS: tl.constexpr, LOOPED: tl.constexpr,
):
    """Normalise rows ``pid*ROWS ..`` of X (+ R) into Y (and the sum into S)."""
    pid = tl.program_id(0)
    if not LOOPED:
        # -- single pass: ROWS whole rows in registers ------------------------------------
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_E)
        col_mask = cols < E
        mask = (rows < M)[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)[:, None]
        cols2 = cols[None, :]
        x = _load_sum(X, R, S, rows * stride_x + cols2, rows * stride_r + cols2,
                      rows * stride_s + cols2, mask, HAS_RES, WRITE_SUM, Y.dtype.element_ty)
        if IS_RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / E + eps)
            h = x * rstd[:, None]
        else:
            mean = tl.sum(x, axis=1) / E
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / E + eps)
            h = xc * rstd[:, None]
        _scale_store(Y, W, B, h, cols2, col_mask[None, :], rows * stride_y + cols2, mask, offset,
                     IS_RMS, HAS_W, HAS_B)
    else:
        # -- looped: one row in chunks of BLOCK_E, a pass per statistic, then the write ---
        row = pid.to(tl.int64)
        x_row = row * stride_x
        r_row = row * stride_r
        s_row = row * stride_s
        acc = tl.zeros([BLOCK_E], dtype=tl.float32)
        for start in range(0, E, BLOCK_E):
            cols = start + tl.arange(0, BLOCK_E)
            x = _load_sum(X, R, S, x_row + cols, r_row + cols, s_row + cols, cols < E,
                          HAS_RES, WRITE_SUM, Y.dtype.element_ty)
            if IS_RMS:
                acc += x * x
            else:
                acc += x
        mean = 0.0
        if IS_RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / E + eps)
        else:
            mean = tl.sum(acc, axis=0) / E
            acc = tl.zeros([BLOCK_E], dtype=tl.float32)
            for start in range(0, E, BLOCK_E):
                cols = start + tl.arange(0, BLOCK_E)
                x = _load_sum(X, R, S, x_row + cols, r_row + cols, s_row + cols, cols < E,
                              HAS_RES, False, Y.dtype.element_ty)
                xc = tl.where(cols < E, x - mean, 0.0)
                acc += xc * xc
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / E + eps)
        for start in range(0, E, BLOCK_E):
            cols = start + tl.arange(0, BLOCK_E)
            x = _load_sum(X, R, S, x_row + cols, r_row + cols, s_row + cols, cols < E,
                          HAS_RES, False, Y.dtype.element_ty)
            _scale_store(Y, W, B, (x - mean) * rstd, cols, cols < E, row * stride_y + cols,
                         cols < E, offset, IS_RMS, HAS_W, HAS_B)


# -- launch configuration ---------------------------------------------------------------------


def choose_config(e: int, max_block: int = MAX_BLOCK) -> dict:
    """Block size, rows per program, variant and warps for rows of ``e`` elements."""
    if e > max_block:
        block = min(LOOP_BLOCK, 1 << (max_block.bit_length() - 1))  # a power of two
        return {"BLOCK_E": block, "ROWS": 1, "LOOPED": True, "num_warps": _warps(block)}
    block = triton.next_power_of_2(e)
    rows = max(1, min(16, TILE // block))
    return {"BLOCK_E": block, "ROWS": rows, "LOOPED": False, "num_warps": _warps(block * rows)}


def _warps(tile: int) -> int:
    """~16 elements per thread, 1..16 warps; the widest tile (MAX_BLOCK, 8192) 32 warps, 8
    elements a thread: at 16 warps ptxas keeps the 512-thread blocks near 40 registers, and
    fp32 add + layer_norm spilled 4 B on sm_90 under triton 3.6."""
    if tile >= MAX_BLOCK:
        return 32
    return max(1, min(16, tile // 512))


# -- wrappers ---------------------------------------------------------------------------------


_fail = functools.partial(fail, "norm")


def _check_float(name: str, t, device) -> None:
    check_float("norm", name, t, device, "x")


def _rows(name: str, t: torch.Tensor, m: int, n: int, writable: bool) -> torch.Tensor:
    return row_view("norm", name, t, m, n, writable)


def _norm(x, residual, weight, bias, *, kind, eps, offset, normalized_ndim, out, sum_out,
          write_sum, max_block):
    if kind not in _KINDS:
        raise LoweringError(f"triton norm: kind must be one of {_KINDS}, got {kind!r}")
    if not isinstance(x, torch.Tensor):
        _fail("x", x, "a torch.Tensor")
    _check_float("x", x, x.device)
    if not (isinstance(normalized_ndim, int) and 1 <= normalized_ndim <= x.dim()):
        raise LoweringError(f"triton norm: normalized_ndim={normalized_ndim!r} out of range for x "
                            f"of shape {tuple(x.shape)} (1..{x.dim()})")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise LoweringError(f"triton norm: eps={eps!r}; expected a float >= 0")
    norm_shape = tuple(x.shape[x.dim() - normalized_ndim:])
    e = math.prod(norm_shape)
    m = x.numel() // e if e else 0
    if e == 0:
        _fail("x", x, "a non-empty normalised shape")
    out_dtype = x.dtype
    if residual is not None:
        _check_float("residual", residual, x.device)
        if residual.shape != x.shape:
            _fail("residual", residual, f"shape {tuple(x.shape)} (that of x)")
        out_dtype = torch.promote_types(x.dtype, residual.dtype)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _check_float(name, p, x.device)
            if tuple(p.shape) != norm_shape:
                _fail(name, p, f"shape {norm_shape} (the normalised shape of x)")
    if kind == "rms" and bias is not None:
        _fail("bias", bias, "None: an rms norm has no bias")
    for name, o, wanted in (("out", out, True), ("sum_out", sum_out, write_sum)):
        if o is None:
            continue
        if not wanted:
            _fail(name, o, "None when the sum is not written")
        _check_float(name, o, x.device)
        if o.shape != x.shape or o.dtype != out_dtype:
            _fail(name, o, f"shape {tuple(x.shape)} dtype {out_dtype}")
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if write_sum and sum_out is None:
        sum_out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if m == 0:
        return out, sum_out

    x2 = _rows("x", x, m, e, False)
    r2 = _rows("residual", residual, m, e, False) if residual is not None else x2
    y2 = _rows("out", out, m, e, True)
    s2 = _rows("sum_out", sum_out, m, e, True) if write_sum else y2
    w = weight.reshape(e).contiguous() if weight is not None else x2
    b = bias.reshape(e).contiguous() if bias is not None else x2
    cfg = choose_config(e, max_block)
    grid = (m if cfg["LOOPED"] else triton.cdiv(m, cfg["ROWS"]),)
    norm_fwd_kernel[grid](
        x2, r2, w, b, y2, s2, m, e,
        x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0),
        float(eps), float(offset),
        IS_RMS=kind == "rms", HAS_RES=residual is not None, WRITE_SUM=bool(write_sum),
        HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_E=cfg["BLOCK_E"], ROWS=cfg["ROWS"], LOOPED=cfg["LOOPED"],
        num_warps=cfg["num_warps"],
    )
    return out, sum_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, *, eps: float = 1e-6,
             offset: float = 0.0, upcast: bool = True, normalized_ndim: int = 1,
             out: torch.Tensor | None = None, max_block: int = MAX_BLOCK) -> torch.Tensor:
    """The IR's ``rms_norm``. ``upcast`` is accepted for the IR's sake: statistics are fp32.
    ``max_block``: the longest row held in registers (smaller forces the looped variant)."""
    del upcast
    return _norm(x, None, weight, None, kind="rms", eps=eps, offset=offset,
                 normalized_ndim=normalized_ndim, out=out, sum_out=None, write_sum=False,
                 max_block=max_block)[0]


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, *, eps: float = 1e-5, normalized_ndim: int = 1,
               out: torch.Tensor | None = None, max_block: int = MAX_BLOCK) -> torch.Tensor:
    """The IR's ``layer_norm``."""
    return _norm(x, None, weight, bias, kind="layer", eps=eps, offset=0.0,
                 normalized_ndim=normalized_ndim, out=out, sum_out=None, write_sum=False,
                 max_block=max_block)[0]


def add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, *, kind: str, eps: float,
             normalized_ndim: int = 1, offset: float = 0.0, upcast: bool = False,
             write_sum: bool = True, out: torch.Tensor | None = None,
             sum_out: torch.Tensor | None = None, max_block: int = MAX_BLOCK,
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The IR's ``add_norm``: ``(norm(x + residual), x + residual)``; the sum is ``None`` when
    ``write_sum`` is False (nothing reads it)."""
    del upcast
    if kind == "layer" and offset:
        raise LoweringError(f"triton norm: offset={offset!r} is an rms attribute (kind='layer')")
    if residual is None:
        raise LoweringError("triton norm: add_norm needs residual (got None)")
    return _norm(x, residual, weight, bias, kind=kind, eps=eps, offset=offset,
                 normalized_ndim=normalized_ndim, out=out, sum_out=sum_out,
                 write_sum=write_sum, max_block=max_block)


# -- reference --------------------------------------------------------------------------------


def reference_norm(x, residual=None, weight=None, bias=None, *, kind="rms", eps=1e-6,
                   offset=0.0, upcast=True, normalized_ndim=1):
    """The IR ops' own references (python target): ``(normed, sum or None)``."""
    from transfuse.ir.opdefs.fused import add_norm as ir_add_norm
    from transfuse.ir.opdefs.nn import layer_norm as ir_layer_norm
    from transfuse.ir.opdefs.nn import rms_norm as ir_rms_norm

    if residual is not None:
        xs = [x, residual, weight] + ([bias] if bias is not None else [])
        return ir_add_norm(xs, {"kind": kind, "eps": eps, "normalized_ndim": normalized_ndim,
                                "offset": offset, "upcast": upcast}, None)
    if kind == "rms":
        return ir_rms_norm([x, weight], {"eps": eps, "normalized_ndim": normalized_ndim,
                                         "offset": offset, "upcast": upcast}, None), None
    return ir_layer_norm([x, weight, bias], {"eps": eps, "normalized_ndim": normalized_ndim},
                         None), None


# -- benchmark --------------------------------------------------------------------------------


def bench_norm(device: str, rows: int = 8192, hidden: int = 4096,
               dtype: torch.dtype = torch.bfloat16, kind: str = "rms") -> dict:
    """add_norm (x + residual -> normed, sum) vs the torch reference: ms and GB/s."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, hidden, device=device, dtype=dtype, generator=g)
    r = torch.randn(rows, hidden, device=device, dtype=dtype, generator=g)
    w = torch.randn(hidden, device=device, dtype=dtype, generator=g)
    b = torch.randn(hidden, device=device, dtype=dtype, generator=g) if kind == "layer" else None
    ms = time_ms(lambda: add_norm(x, r, w, b, kind=kind, eps=1e-6), device)
    ref = time_ms(lambda: reference_norm(x, r, w, b, kind=kind, eps=1e-6), device)
    nbytes = 4 * x.numel() * x.element_size()  # read x, r; write normed, sum
    return {"kernel": f"add_norm[{kind} {hidden} {str(dtype)[6:]}]", "rows": rows,
            "hidden": hidden, "triton_ms": ms, "torch_ms": ref, "triton_gbps": nbytes / ms / 1e6,
            "torch_gbps": nbytes / ref / 1e6}


# -- shipped configurations -------------------------------------------------------------------

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _spec(kind: str, dtype: torch.dtype, e: int, *, residual: bool = True) -> KernelSpec:
    cfg = choose_config(e)
    p = "*" + _TY[dtype]
    sig = {"X": p, "R": p, "W": p, "B": p, "Y": p, "S": p, "M": "i32", "E": "i32",
           "stride_x": "i32", "stride_r": "i32", "stride_y": "i32", "stride_s": "i32",
           "eps": "fp32", "offset": "fp32"}
    consts = {"IS_RMS": kind == "rms", "HAS_RES": residual, "WRITE_SUM": residual,
              "HAS_W": True, "HAS_B": kind == "layer",
              "BLOCK_E": cfg["BLOCK_E"], "ROWS": cfg["ROWS"], "LOOPED": cfg["LOOPED"]}
    sig.update(dict.fromkeys(consts, "constexpr"))
    variant = "looped" if cfg["LOOPED"] else f"{cfg['ROWS']}x{cfg['BLOCK_E']}"
    return KernelSpec(kernel=f"{__name__}:norm_fwd_kernel",
                      name=f"{'add_' if residual else ''}{kind}_norm[E{e} {variant} {_TY[dtype]}]",
                      signature=sig, constexprs=consts, num_warps=cfg["num_warps"], num_stages=1)


#: what the wrappers launch that matters for registers: the widest single-pass rows (8192) in
#: every dtype with every input, mid sizes, the looped variant, rows of 100 (8 a program)
SHIPPED: list[KernelSpec] = [
    *(_spec(k, d, 8192) for k in _KINDS for d in FLOAT_DTYPES),
    *(_spec(k, torch.bfloat16, e) for k in _KINDS for e in (768, 4096, 16384)),
    _spec("rms", torch.float32, 16384),
    _spec("rms", torch.float16, 8192, residual=False),
    _spec("layer", torch.float16, 1024, residual=False),
    *(_spec(k, torch.float32, 100) for k in _KINDS),  # 8 rows of 128 a program
]

__all__ = ["rms_norm", "layer_norm", "add_norm", "reference_norm", "bench_norm",
           "choose_config", "norm_fwd_kernel", "SHIPPED", "MAX_BLOCK", "LOOP_BLOCK"]
