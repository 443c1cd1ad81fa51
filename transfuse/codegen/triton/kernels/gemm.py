"""Dense GEMM template with a fused epilogue: ``y = residual + activation(x @ W + bias)``.

What it computes: the IR's ``linear`` (``x @ w.T + bias``, then ``activation``) and the
dense ``matmul`` by a constant [K, N] weight (GPT-2's Conv1D), with an optional residual
added last, all in one kernel; and, through :func:`gemm_tile`, the main loop of the
*generated* GEMM kernels (``codegen/triton/gen/epilogue.py``) whose epilogue is the pointwise
fusion group that consumes the GEMM's result.

Glossary: x [M, K] (a wrapper flattens x [..., K] to M rows), the weight as [N, K]
(``layout="nk"``: a linear's) or [K, N] (``"kn"``: a matmul's), y [M, N]; BM / BN / BK the
tile. The weight is read through two strides (``stride_wn``, ``stride_wk``), so both layouts
are the same kernel.

Algorithm (the standard tiled GEMM, as in Triton's matmul tutorial and TorchInductor's
templates): one program computes a [BM, BN] tile of y; programs are ordered in groups of
GROUP_M tile rows so consecutive programs share weight tiles in L2 (:func:`tile_ids`); the K
loop loads an x tile [BM, BK] and a weight tile [BK, BN] and accumulates ``tl.dot`` in f32
(f16 / bf16 on tensor cores; f32 operands use ``tf32x3`` on a GPU: f32-level accuracy, "ieee"
in the interpreter). The epilogue rounds to y's dtype at each step the IR does (bias added to
the rounded product, activation on the rounded value, the residual added last), so the result
equals the unfused ops' bit for bit up to the accumulation order.

When the template wins (the host's choice, ``codegen/triton/host``): below
:data:`EPILOGUE_ROWS` rows a GEMM streams its weight (arithmetic intensity ~M flops per weight
byte, under an H100's ~300 flop/B ridge), a Triton tile streams it as fast as cuBLAS, and
fusing the epilogue saves the round trip of y through memory and a launch. Above it the GEMM
is compute-bound, cuBLAS's hand-tuned kernels win, and the epilogue runs as its own generated
kernel. Not measured on a GPU here (none lent); ``bench_linear`` is the measurement.

Tiles (:data:`TILES`, by row regime as the quantized GEMMs): chosen so nothing spills on
sm_80 / sm_90 (the compile check); not tuned on a GPU.

Interpreter notes: bf16 dots and arithmetic are wrong there (triton#11584): operands are
upcast to f32 after loading (``UPCAST``); roundings to bf16 go through ``round_as``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from transfuse.codegen.triton import env
from transfuse.codegen.triton.kernels._common import time_ms
from transfuse.codegen.triton.kernels.quant_gemm import (
    GROUP_M,
    activate,
    check_activation,
    dot_precision,
    finish_tile,
    regime,
    round_as,
    tile_ids,
)
from transfuse.codegen.triton.kernels.spec import KernelSpec
from transfuse.errors import LoweringError

#: x dtypes the template takes
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by row regime (f16 / bf16)
TILES = {
    "decode": (16, 64, 64, 4, 4),
    "small": (64, 64, 64, 4, 3),
    "prefill": (128, 128, 32, 8, 3),
}
#: f32 operands (tf32x3 holds three times the operands: smaller tiles)
TILES_F32 = {
    "decode": (16, 64, 32, 4, 3),
    "small": (32, 64, 32, 4, 3),
    "prefill": (32, 64, 32, 4, 3),
}
#: the most rows for which the host takes the template (with its fused epilogue) over cuBLAS
EPILOGUE_ROWS = 64
#: weight layouts: "nk" (a linear's [N, K]) and "kn" (a matmul's [K, N])
LAYOUTS = ("nk", "kn")

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


# -- the kernels ------------------------------------------------------------------------------


@triton.jit
def gemm_tile(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, stride_wk, pid_m, pid_n,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The f32 accumulator [BM, BN] of tile (pid_m, pid_n) of x [M, K] @ W, W read as
    [K, N] through (stride_wk, stride_wn)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn  # [1, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_cols + offs_k.to(tl.int64)[:, None] * stride_wk,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(x, w)
    return acc


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_wk, stride_rm, stride_ym,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RES: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = gemm_tile(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, stride_wk, pid_m, pid_n,
                    BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    OUT_T: tl.constexpr = y_ptr.dtype.element_ty
    y = finish_tile(acc, b_ptr, offs_n, n_mask, OUT_T, HAS_BIAS, ACTIVATION)
    if HAS_RES:
        r = tl.load(r_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :],
                    mask=mask, other=0.0)
        y = round_as(y + r.to(tl.float32), OUT_T)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :],
             y.to(OUT_T), mask=mask)


# -- configuration ----------------------------------------------------------------------------


def tiles(dtype: torch.dtype) -> dict[str, tuple[int, int, int, int, int]]:
    """The tile table of x dtype ``dtype``."""
    return TILES_F32 if dtype == torch.float32 else TILES


def pick_config(m: int, dtype: torch.dtype, tile: str | None = None) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for M rows of ``dtype``."""
    return tiles(dtype)[tile or regime(m)]


def launch_args(x2: torch.Tensor, w: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(N, K, stride_wn, stride_wk) of weight ``w`` in ``layout`` for x2 [M, K]."""
    if layout == "nk":
        n, k = w.shape
        return n, k, w.stride(0), w.stride(1)
    k, n = w.shape
    return n, k, w.stride(1), w.stride(0)


# -- the wrapper ------------------------------------------------------------------------------


def _bad(name: str, t, expected: str) -> LoweringError:
    got = (f"a {str(t.dtype).removeprefix('torch.')} tensor of shape {tuple(t.shape)} on "
           f"{t.device}" if isinstance(t, torch.Tensor) else repr(t))
    return LoweringError(f"linear: {name} must be {expected}, got {got}")


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None, residual: torch.Tensor | None = None, *,
           layout: str = "nk", out: torch.Tensor | None = None,
           tile: str | None = None) -> torch.Tensor:
    """``residual + activation(x @ W + bias)`` in x's dtype; W is ``w`` [N, K] (``"nk"``) or
    [K, N] (``"kn"``). ``tile`` forces a regime of :data:`TILES` (tests, benchmarks)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in DTYPES:
        raise _bad("x", x, "a float16/bfloat16/float32 tensor [..., K]")
    dev = x.device
    if dev.type != env.device():
        raise _bad("x", x, f"a tensor on {env.device()} (where the kernels run here)")
    if layout not in LAYOUTS:
        raise LoweringError(f"linear: layout must be one of {LAYOUTS}, got {layout!r}")
    if not (isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype == x.dtype
            and w.device == dev):
        raise _bad("w", w, f"a 2-D {x.dtype} weight on {dev} ({layout})")
    k = x.shape[-1]
    n, wk, stride_wn, stride_wk = launch_args(x, w, layout)
    if wk != k:
        raise _bad("w", w, f"K={k} features (x's last dim) in layout {layout}")
    act = check_activation(activation, "linear")
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.shape == (n,)
                                 and bias.dtype == x.dtype and bias.device == dev):
        raise _bad("bias", bias, f"a {x.dtype} [{n}] tensor on {dev}")
    shape = (*x.shape[:-1], n)
    if residual is not None and not (isinstance(residual, torch.Tensor)
                                     and tuple(residual.shape) == shape
                                     and residual.dtype == x.dtype and residual.device == dev):
        raise _bad("residual", residual, f"a {x.dtype} {list(shape)} tensor on {dev}")
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=dev)
    elif not (isinstance(out, torch.Tensor) and tuple(out.shape) == shape
              and out.dtype == x.dtype and out.device == dev and out.is_contiguous()):
        raise _bad("out", out, f"a contiguous {x.dtype} {list(shape)} tensor on {dev}")
    if tile is not None and tile not in TILES:
        raise LoweringError(f"linear: tile must be one of {sorted(TILES)}, got {tile!r}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return out
    r2 = None
    if residual is not None:
        r2 = residual.reshape(m, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    bm, bn, bk, warps, stages = pick_config(m, x.dtype, tile)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _linear_kernel[grid](
        x2, w, bias if bias is not None else x2, r2 if r2 is not None else x2, out.view(m, n),
        m, n, k, x2.stride(0), stride_wn, stride_wk, r2.stride(0) if r2 is not None else 0, n,
        HAS_BIAS=bias is not None, ACTIVATION=act, HAS_RES=residual is not None,
        UPCAST=env.interpreting() or x.dtype == torch.float32,
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=GROUP_M, num_warps=warps, num_stages=stages)
    return out


# -- reference and benchmark ------------------------------------------------------------------


def reference_linear(x, w, bias=None, activation=None, residual=None, layout="nk"):
    """The unfused IR ops in x's dtype: linear (or matmul + add), activation, add."""
    from transfuse.ir.opdefs.linalg import LINEAR_ACTIVATIONS

    wt = w if layout == "nk" else w.t()
    y = torch.nn.functional.linear(x.float(), wt.float()).to(x.dtype)
    if bias is not None:
        y = y + bias
    if activation is not None:
        y = LINEAR_ACTIVATIONS[activation](y)
    if residual is not None:
        y = y + residual
    return y


def bench_linear(device: str, m: int = 16, n: int = 4096, k: int = 4096,
                 dtype: torch.dtype = torch.bfloat16, activation: str | None = "gelu") -> dict:
    """ms of the template with its epilogue vs cuBLAS (``F.linear``) + the activation +
    the residual add as torch ops, at M rows."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=g) / k ** 0.5
    b = torch.randn(n, device=device, dtype=dtype, generator=g)
    r = torch.randn(m, n, device=device, dtype=dtype, generator=g)
    ours = time_ms(lambda: linear(x, w, b, activation, r), device)

    from transfuse.ir.opdefs.linalg import LINEAR_ACTIVATIONS

    def unfused():
        y = torch.nn.functional.linear(x, w, b)
        if activation is not None:
            y = LINEAR_ACTIVATIONS[activation](y)
        return y + r

    ref = time_ms(unfused, device)
    return {"m": m, "n": n, "k": k, "dtype": str(dtype), "template_ms": ours,
            "cublas_unfused_ms": ref, "speedup": ref / ours if ours else None}


# -- shipped configurations -------------------------------------------------------------------


def _shipped() -> list[KernelSpec]:
    specs = []
    for dtype in DTYPES:
        t = _PTR[dtype]
        short = str(dtype).removeprefix("torch.")
        for name, (bm, bn, bk, warps, stages) in tiles(dtype).items():
            sig = {"x_ptr": t, "w_ptr": t, "b_ptr": t, "r_ptr": t, "y_ptr": t}
            sig.update({a: "i32" for a in ("M", "N", "K", "stride_xm", "stride_wn",
                                           "stride_wk", "stride_rm", "stride_ym")})
            const = {"HAS_BIAS": True, "ACTIVATION": "gelu", "HAS_RES": True,
                     "UPCAST": dtype == torch.float32,
                     "DOT_PRECISION": "tf32x3" if dtype == torch.float32 else "ieee",
                     "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M}
            sig.update({c: "constexpr" for c in const})
            specs.append(KernelSpec(f"{__name__}:_linear_kernel", f"linear[{name} {short}]",
                                    sig, const, warps, stages))
    return specs


#: every configuration the wrapper launches (bias + gelu + residual: the largest epilogue)
SHIPPED: list[KernelSpec] = _shipped()

__all__ = ["linear", "gemm_tile", "reference_linear", "bench_linear", "pick_config", "tiles",
           "launch_args", "activate", "TILES", "TILES_F32", "EPILOGUE_ROWS", "SHIPPED", "DTYPES"]
