"""Activations and gated activations: SwiGLU, GeGLU, GELU (erf and tanh), SiLU.

What it computes:

- ``swiglu(gate, up)`` = ``silu(gate) * up``: the IR op ``swiglu`` (Llama's MLP);
- ``geglu(gate, up, approximate)`` = ``gelu(gate) * up`` (Gemma, T5 v1.1; the IR spells it
  ``mul(gelu(gate), up)``);
- ``gelu(x, approximate)``: the IR op ``gelu``; ``approximate="none"`` is the exact
  ``0.5 x (1 + erf(x / sqrt 2))``, ``"tanh"`` is ``0.5 x (1 + tanh(u))`` with
  ``u = sqrt(2/pi) (x + 0.044715 x³)``, computed as ``x * sigmoid(2u)`` (the same function:
  ``(1 + tanh u) / 2 = sigmoid(2u)``; no libdevice tanh, which the interpreter lacks, and no
  NaN: exp overflows to inf for very negative u and the result is -0, as torch's);
- ``silu(x)``: the IR op ``silu`` (``x * sigmoid(x)``).

The gated forms take ``gate`` and ``up`` [..., F] as two tensors, or one merged tensor
[..., 2F] laid out ``[gate | up]`` (a fused gate_up projection, Phi-3's order) when ``up`` is
None: the two halves are strided views of it, so the merged form is the same kernel.

Glossary: M rows (every leading dim), F the activation width (the last dim).

Algorithm: an elementwise 2-D grid of BLOCK_M x BLOCK_N tiles over [M, F] (row strides, so
the halves of a merged tensor and other row-strided views need no copy); loads, upcasts to
fp32, computes, stores in the output dtype. Rounding follows the python target: the gate's
activation is rounded to the gate dtype before the product with ``up`` (torch computes
``silu(gate)`` as a tensor of gate's dtype), so fp16 results match it to the last bit but for
the exp/erf ulps.

Accuracy: ``erf`` is ``tl.math.erf`` (it runs in the interpreter too, triton 3.9: max abs
error 6e-8 against torch.erf measured here; libdevice ``erff`` on a GPU). fp32 GELU against
torch over [-30, 30]: max abs error 7e-7 (erf) and 5e-7 (tanh); both compute
``1 + erf`` / ``sigmoid`` in fp32, so for x < -3 the relative error of the tiny results
grows (5.6e-4 at |gelu(x)| = 1e-3) in torch and here alike. Interpreter notes:
values are upcast to fp32 right after loading (bf16 arithmetic is wrong there); fp32 -> bf16
casts truncate there (round to nearest on a GPU).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from transfuse.codegen.triton import env  # noqa: F401  (before any @triton.jit)
from transfuse.codegen.triton.kernels._common import (
    check_float,
    fail,
    row_view,
    time_ms,
)
from transfuse.codegen.triton.kernels.spec import KernelSpec
from transfuse.errors import LoweringError

#: elements per program tile
TILE = 2048
#: the widest tile row
MAX_BLOCK_N = 1024
ACTS = ("silu", "gelu", "gelu_tanh")
_SQRT1_2 = 0.7071067811865476
_SQRT_2_PI = 0.7978845608028654  # sqrt(2 / pi)
_KAPPA = 0.044715


# -- kernel ---------------------------------------------------------------------------------


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """ACT of fp32 ``x``."""
    if ACT == "silu":
        y = x * tl.sigmoid(x)
    elif ACT == "gelu":
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:  # gelu_tanh: 0.5 x (1 + tanh u) = x sigmoid(2u)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * tl.sigmoid(2.0 * u)
    return y


@triton.jit
def act_kernel(
    A, B, Y,  # gate (or x), up (GATED), out
    M, N,  # rows, width
    stride_a, stride_b, stride_y,  # row strides (the last dim is contiguous)
    ACT: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Y = ACT(A) (* B) over one BLOCK_M x BLOCK_N tile."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)[:, None]
    cols = cols[None, :]
    a = tl.load(A + rows * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    y = _activation(a, ACT)
    if GATED:
        y = y.to(A.dtype.element_ty).to(tl.float32)  # silu(gate) is a tensor of gate's dtype
        y = y * tl.load(B + rows * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rows * stride_y + cols, y, mask=mask)


# -- launch configuration ---------------------------------------------------------------------


def choose_config(n: int) -> dict:
    """Tile for rows of ``n`` elements."""
    block_n = min(MAX_BLOCK_N, triton.next_power_of_2(max(n, 1)))
    return {"BLOCK_M": max(1, TILE // block_n), "BLOCK_N": block_n, "num_warps": 4}


# -- wrappers ---------------------------------------------------------------------------------


_fail = functools.partial(fail, "activation")


def _check_float(name: str, t, device) -> None:
    check_float("activation", name, t, device, "the input")


def _rows(name: str, t: torch.Tensor, m: int, n: int, writable: bool) -> torch.Tensor:
    return row_view("activation", name, t, m, n, writable)


def _act_name(approximate: str) -> str:
    if approximate not in ("none", "tanh"):
        raise LoweringError(f"triton activation: approximate={approximate!r}; expected "
                            "'none' (erf) or 'tanh'")
    return "gelu" if approximate == "none" else "gelu_tanh"


def _launch(act: str, a: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor | None,
            a_name: str, b_name: str) -> torch.Tensor:
    dtype = a.dtype if b is None else torch.promote_types(a.dtype, b.dtype)
    shape = tuple(a.shape)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=a.device)
    else:
        _check_float("out", out, a.device)
        if tuple(out.shape) != shape or out.dtype != dtype:
            _fail("out", out, f"shape {shape} dtype {dtype}")
    n = shape[-1] if shape else 1
    m = a.numel() // n if n else 0
    if a.numel() == 0:
        return out
    a2 = _rows(a_name, a, m, n, False)
    b2 = _rows(b_name, b, m, n, False) if b is not None else a2
    y2 = _rows("out", out, m, n, True)
    cfg = choose_config(n)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    act_kernel[grid](a2, b2, y2, m, n, a2.stride(0), b2.stride(0), y2.stride(0),
                     ACT=act, GATED=b is not None, BLOCK_M=cfg["BLOCK_M"],
                     BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return out


def _gated(act: str, gate, up, out) -> torch.Tensor:
    _check_float("gate", gate, None)
    if up is None:  # merged [..., 2F] = [gate | up]
        if gate.dim() == 0 or gate.shape[-1] % 2:
            _fail("gate", gate, "a merged [..., 2F] tensor (even last dim) when up is None")
        f = gate.shape[-1] // 2
        gate, up = gate[..., :f], gate[..., f:]
    else:
        _check_float("up", up, gate.device)
        if up.shape != gate.shape:
            _fail("up", up, f"shape {tuple(gate.shape)} (that of gate)")
    return _launch(act, gate, up, out, "gate", "up")


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` (the IR's ``swiglu``); ``up=None``: gate is merged [..., 2F]."""
    return _gated("silu", gate, up, out)


def geglu(gate: torch.Tensor, up: torch.Tensor | None = None, *, approximate: str = "none",
          out: torch.Tensor | None = None) -> torch.Tensor:
    """``gelu(gate) * up``; ``up=None``: gate is merged [..., 2F]."""
    return _gated(_act_name(approximate), gate, up, out)


def gelu(x: torch.Tensor, *, approximate: str = "none",
         out: torch.Tensor | None = None) -> torch.Tensor:
    """The IR's ``gelu`` (``approximate`` "none": erf, "tanh")."""
    act = _act_name(approximate)
    _check_float("x", x, None)
    return _launch(act, x, None, out, "x", "")


def silu(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The IR's ``silu``."""
    _check_float("x", x, None)
    return _launch("silu", x, None, out, "x", "")


# -- reference --------------------------------------------------------------------------------


def reference_activation(act: str, x: torch.Tensor, up: torch.Tensor | None = None,
                         merged: bool = False) -> torch.Tensor:
    """The IR ops' references: ``swiglu`` / ``gelu`` / ``silu`` (times ``up`` when gated)."""
    from transfuse.ir.opdefs.elementwise import UNARY_FLOAT
    from transfuse.ir.opdefs.elementwise import gelu as ir_gelu
    from transfuse.ir.opdefs.fused import swiglu as ir_swiglu

    if merged:
        f = x.shape[-1] // 2
        x, up = x[..., :f], x[..., f:]
    if act == "silu":
        return UNARY_FLOAT["silu"](x) if up is None else ir_swiglu([x, up], {}, None)
    y = ir_gelu([x], {"approximate": "none" if act == "gelu" else "tanh"}, None)
    return y if up is None else y * up


# -- benchmark --------------------------------------------------------------------------------


def bench_swiglu(device: str, rows: int = 4096, width: int = 14336,
                 dtype: torch.dtype = torch.bfloat16) -> dict:
    """SwiGLU of a merged [rows, 2F] gate_up tensor vs torch: ms and GB/s."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, 2 * width, device=device, dtype=dtype, generator=g)
    ms = time_ms(lambda: swiglu(x), device)
    ref = time_ms(lambda: F.silu(x[:, :width]) * x[:, width:], device)
    nbytes = 3 * rows * width * x.element_size()
    return {"kernel": f"swiglu[F{width} {str(dtype)[6:]}]", "triton_ms": ms, "torch_ms": ref,
            "triton_gbps": nbytes / ms / 1e6, "torch_gbps": nbytes / ref / 1e6}


# -- shipped configurations -------------------------------------------------------------------

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _spec(act: str, gated: bool, dtype: torch.dtype, n: int = 14336) -> KernelSpec:
    cfg = choose_config(n)
    p = "*" + _TY[dtype]
    consts = {"ACT": act, "GATED": gated, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
    sig = {"A": p, "B": p, "Y": p, "M": "i32", "N": "i32", "stride_a": "i32", "stride_b": "i32",
           "stride_y": "i32", **dict.fromkeys(consts, "constexpr")}
    name = f"{'gated_' if gated else ''}{act}[{cfg['BLOCK_M']}x{cfg['BLOCK_N']} {_TY[dtype]}]"
    return KernelSpec(kernel=f"{__name__}:act_kernel", name=name, signature=sig,
                      constexprs=consts, num_warps=cfg["num_warps"], num_stages=1)


#: every activation gated and not at the widest tile (2 x 1024) in bf16, the other dtypes for
#: swiglu, and a short-row tile (64 x 32)
SHIPPED: list[KernelSpec] = [
    *(_spec(a, g, torch.bfloat16) for a in ACTS for g in (True, False)),
    _spec("silu", True, torch.float16),
    _spec("silu", True, torch.float32),
    _spec("gelu", True, torch.float32),
    _spec("gelu_tanh", False, torch.float16, n=20),
]

__all__ = ["swiglu", "geglu", "gelu", "silu", "reference_activation", "bench_swiglu",
           "choose_config", "act_kernel", "SHIPPED", "ACTS"]
