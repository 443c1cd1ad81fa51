"""torch-facing wrappers of the native kernels, each with its torch path as the fallback.

The generated python code calls these (``_swiglu``, ``_rms_norm``, ``_add_rms_norm``; ``linear``
through :func:`transfuse.codegen.python.small_linear.small_linear`;
attention goes through :func:`transfuse.codegen.python.cpu_attention.causal_attention`). Each
checks that the native kernel applies (fp32 CPU tensors, no autograd, a layout the kernel
reads: rows of contiguous elements at one stride, see :func:`_rows`) and otherwise runs
the torch expression the backend emitted before these kernels existed, so results never
depend on whether the library could be built, only their last bits do.

Glossary: B batch, S sequence length, H query heads, Hkv key/value heads, D head dim,
n the width of a row (the normalised or gated dimension).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from transfuse.codegen import native


def _rows(t: torch.Tensor) -> tuple[int, int] | None:
    """(number of rows, row stride) when ``t`` is rows of ``t.shape[-1]`` contiguous
    elements at one stride (a contiguous tensor, or a column slice of one), else None."""
    if t.dim() == 0 or t.stride(-1) != 1:
        return None
    dims = [(s, st) for s, st in zip(t.shape[:-1], t.stride()[:-1]) if s != 1]
    rows = math.prod(s for s, _ in dims)
    if not dims:
        return rows, t.shape[-1]
    for (_, outer), (inner_size, inner) in zip(dims, dims[1:]):
        if outer != inner * inner_size:
            return None
    return rows, dims[-1][1]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` for gate and up of one shape."""
    if gate.shape == up.shape and gate.numel() and native.usable(gate, up):
        g, u = _rows(gate), _rows(up)
        if g is not None and u is not None:
            out = torch.empty(gate.shape, dtype=gate.dtype)
            n = gate.shape[-1]
            native.run_split(native.library().tf_swiglu_f32, g[0], n, gate.data_ptr(), g[1],
                             up.data_ptr(), u[1], out.data_ptr(), n)
            return out
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.rms_norm(x, (n,), weight, eps)`` over the last dim."""
    out = _rms_rows(x, None, weight, eps)
    return out[0] if out is not None else F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F.rms_norm(s, (n,), weight, eps), s)`` with ``s = x + residual`` (same shapes)."""
    out = _rms_rows(x, residual, weight, eps) if x.shape == residual.shape else None
    if out is not None:
        return out
    total = x + residual
    return F.rms_norm(total, (x.shape[-1],), weight, eps), total


def _rms_rows(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
              eps: float) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(normed, x + residual or None) by ``tf_add_rms_norm_f32``; None when it does not apply."""
    n = x.shape[-1]
    operands = [x] if residual is None else [x, residual]
    if (not x.numel() or not native.usable(*operands)
            or (weight is not None and (weight.shape != (n,) or not native.usable(weight)))):
        return None
    rx = _rows(x)
    rr = (0, 0) if residual is None else _rows(residual)
    if rx is None or rr is None:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    total = None if residual is None else torch.empty(x.shape, dtype=x.dtype)
    native.run_split(native.library().tf_add_rms_norm_f32, rx[0], n, x.data_ptr(), rx[1],
                     None if residual is None else residual.data_ptr(), rr[1],
                     None if weight is None else weight.data_ptr(), eps,
                     None if total is None else total.data_ptr(), n, out.data_ptr(), n)
    return out, total


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           interleaved: bool) -> torch.Tensor:
    """``x * cos + rotate(x) * sin`` (rotate-half, or pairwise when ``interleaved``), cos and
    sin broadcast to x's shape, which they must not enlarge."""
    d = x.shape[-1]
    if 1 <= x.dim() <= 4 and d >= 2 and d % 2 == 0 and x.numel():
        try:
            ce, se = cos.expand(x.shape), sin.expand(x.shape)
        except RuntimeError:
            ce = None
        if ce is not None and native.usable(x, ce, se):
            out = torch.empty_like(x)
            lead = (None,) * (4 - x.dim())  # views with leading size-1 dims
            x4, c4, s4, o4 = (t[lead] for t in (x, ce, se, out))
            a0, a1, a2, _ = x4.shape
            native.run_split(native.library().tf_rotary_f32, a0 * a1, a0, a1, a2, d,
                             int(interleaved), *_ptr3(x4), *_ptr3(c4), *_ptr3(s4), *_ptr3(o4))
            return out
    half = d // 2
    rot = (torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2) if interleaved
           else torch.cat((-x[..., half:], x[..., :half]), dim=-1))
    return x * cos + rot * sin


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor | None:
    """``F.linear(x, w, b)`` by ``tf_linear_f32`` (gemm.c): x [..., K] (rows of K contiguous
    elements at one stride), w [N, K] with contiguous rows, or K-major (``wt.t()`` of a
    [K, N] with contiguous rows: ``tf_linear_kn_f32``), b [N] contiguous or None; a fresh
    contiguous [..., N] result. Every weight row is read once whatever the number of rows,
    and each result row is bitwise the same computed alone or among others (batch
    invariant). None when the kernel does not apply (the caller runs its GEMM).

    Called once per linear of every decode step, so the checks are the cheap ones (~8 us in
    all, against ~15 us through :func:`native.usable` and :func:`_rows`)."""
    lib = native.library()
    f32 = torch.float32
    if (lib is None or x.dtype is not f32 or w.dtype is not f32 or not x.is_cpu or not w.is_cpu
            or w.dim() != 2 or x.dim() < 1):
        return None
    if w.stride(1) == 1:      # rows of K contiguous: tf_linear_f32
        kernel, units, ldw = lib.tf_linear_f32, lib.tf_linear_units, w.stride(0)
    elif w.stride(0) == 1:    # K-major (a transposed view of [K, N] rows): tf_linear_kn_f32
        kernel, units, ldw = lib.tf_linear_kn_f32, lib.tf_linear_kn_units, w.stride(1)
    else:
        return None
    n, k = w.shape
    if x.shape[-1] != k or not k or not n:
        return None
    if b is not None and (b.dtype is not f32 or not b.is_cpu or b.shape != (n,)
                          or b.stride(0) != 1):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                    or (b is not None and b.requires_grad)):
        return None
    rx = (x.numel() // k, k) if x.is_contiguous() else _rows(x)
    if rx is None or not rx[0]:
        return None
    out = torch.empty((*x.shape[:-1], n), dtype=f32)
    native.run_split(kernel, units(n), rx[0], n, k, x.data_ptr(), rx[1], w.data_ptr(), ldw,
                     None if b is None else b.data_ptr(), out.data_ptr(), n)
    return out


def _ptr3(t: torch.Tensor) -> tuple[int, int, int, int]:
    """A 4-D tensor's address and its three outer strides (the last one is 1)."""
    return t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
              window: int | None = None) -> torch.Tensor | None:
    """Causal self-attention of q [B, H, S, D] over k, v [B, Hkv, S, D] (H % Hkv == 0),
    ``window`` keys at most when given; the result [B, H, S, D] is a view of [B, S, H, D]
    storage. None when the kernel does not apply (the caller runs SDPA)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return None
    b, h, s, d = q.shape
    hkv = k.shape[1]
    if (k.shape != (b, hkv, s, d) or v.shape != k.shape or hkv < 1 or h % hkv or d % 16
            or d > 512 or s < 1 or (window is not None and window < 1)
            or not native.usable(q, k, v)):
        return None
    out = torch.empty((b, s, h, d), dtype=q.dtype)
    sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
    lib = native.library()
    native.run_split(lib.tf_attention_f32, lib.tf_attention_units(b, s, hkv), b, s, h, hkv, d, sc,
                     window or 0,
                     q.data_ptr(), q.stride(0), q.stride(2), q.stride(1),
                     k.data_ptr(), k.stride(0), k.stride(2), k.stride(1),
                     v.data_ptr(), v.stride(0), v.stride(2), v.stride(1),
                     out.data_ptr(), out.stride(0), out.stride(1), out.stride(2))
    return out.transpose(1, 2)


__all__ = ["swiglu", "rms_norm", "add_rms_norm", "rotary", "attention", "linear"]
