"""Quantized weights as plain tensors: packing, round-to-nearest quantization, dequantization.

The one storage every pass produces and every backend lowers from (:class:`QuantType` in
``ir/types.py`` says what it is):

- integer codes ``q`` are unsigned, in ``[0, 2**bits)``; ``w = (q - z) * s`` per group of
  ``group`` consecutive elements along K, with ``scales`` s [N, K/group] (f32) and, for
  asymmetric types, ``zeros`` z [N, K/group] (f32, fractional in general: see
  :func:`quant_params`). Symmetric types have the fixed zero point ``2**(bits-1)``.
- 4-bit codes are packed two per byte along K: element ``2j`` in the low nibble of byte ``j``
  (ONNX Runtime's ``MatMulNBits`` layout once reshaped to [N, K/group, group/2]).
- fp8 (e4m3) weights are stored as e4m3 values with one f32 scale per output channel.

Glossary: N output channels (rows of a ``linear`` weight), K input features, G = K / group
groups per channel, R rows of activations.

Everything here is deterministic torch code on any device; ``ir`` imports nothing above it,
so passes and backends share these functions.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from transfuse.errors import IRVerifyError
from transfuse.ir.types import QuantType

#: the largest finite e4m3 value (torch.float8_e4m3fn)
FP8_E4M3_MAX = 448.0
#: scales never go below this (an all-zero group gets this scale and codes at the zero point)
MIN_SCALE = 1e-12


def _check_weight(w: torch.Tensor, qtype: QuantType, what: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise IRVerifyError(f"{what}: expected a 2-D weight [N, K], got "
                            f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise IRVerifyError(f"{what}: expected a float weight, got {w.dtype}")
    if w.shape[1] != qtype.k:
        raise IRVerifyError(f"{what}: weight has K={w.shape[1]} but the quant type says {qtype}")


# -- packing ---------------------------------------------------------------------------------


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """u8 codes [N, K] (values < 2**bits) -> storage [N, K * bits / 8]."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise IRVerifyError(f"pack_codes: expected u8 [N, K] codes, got {codes.dtype} "
                            f"{tuple(codes.shape)}")
    if bits == 8:
        return codes.contiguous()
    if bits != 4:
        raise IRVerifyError(f"pack_codes: 4 or 8 bits, got {bits}")
    if codes.shape[1] % 2:
        raise IRVerifyError(f"pack_codes: 4-bit codes need an even K, got {codes.shape[1]}")
    lo, hi = codes[:, 0::2], codes[:, 1::2]
    return (lo | (hi << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Storage [N, K * bits / 8] -> u8 codes [N, K]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise IRVerifyError(f"unpack_codes: expected u8 [N, K*bits/8], got {packed.dtype} "
                            f"{tuple(packed.shape)}")
    if bits == 8:
        return packed
    if bits != 4 or packed.shape[1] * 2 != k:
        raise IRVerifyError(f"unpack_codes: {tuple(packed.shape)} is not 4-bit storage of K={k}")
    out = torch.empty(packed.shape[0], k, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


# -- the quantized weight --------------------------------------------------------------------


@dataclasses.dataclass
class QuantizedWeight:
    """A weight in the canonical storage: ``qweight`` (codes or fp8 values), ``scales``,
    ``zeros`` (asymmetric integer types only) and its :class:`QuantType`."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    qtype: QuantType

    def __post_init__(self):
        check_storage(self.qweight, self.scales, self.zeros, self.qtype)

    @property
    def n(self) -> int:
        return self.qweight.shape[0]

    def dequantize(self) -> torch.Tensor:
        """The f32 weight [N, K] it stands for."""
        return dequantize(self.qweight, self.scales, self.zeros, self.qtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        ts = [self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def check_storage(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  qtype: QuantType) -> None:
    """IRVerifyError unless the tensors are a valid storage of ``qtype``."""
    n = qweight.shape[0] if qweight.dim() == 2 else -1
    if qweight.dtype != qtype.storage_dtype.torch or qweight.dim() != 2 or \
            qweight.shape[1] != qtype.packed_k:
        raise IRVerifyError(f"{qtype}: weight storage must be {qtype.storage_dtype.value}"
                            f"[N, {qtype.packed_k}], got {qweight.dtype} {tuple(qweight.shape)}")
    if scales.dtype != torch.float32 or tuple(scales.shape) != (n, qtype.groups):
        raise IRVerifyError(f"{qtype}: scales must be f32 [{n}, {qtype.groups}], got "
                            f"{scales.dtype} {tuple(scales.shape)}")
    if qtype.symmetric:
        if zeros is not None:
            raise IRVerifyError(f"{qtype}: a symmetric type has no zeros")
    elif zeros is None or zeros.dtype != torch.float32 or tuple(zeros.shape) != (n, qtype.groups):
        got = "none" if zeros is None else f"{zeros.dtype} {tuple(zeros.shape)}"
        raise IRVerifyError(f"{qtype}: zeros must be f32 [{n}, {qtype.groups}], got {got}")


def _grouped(t: torch.Tensor, qtype: QuantType) -> torch.Tensor:
    """[N, K] -> [N, G, group]."""
    return t.reshape(t.shape[0], qtype.groups, qtype.group)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               qtype: QuantType) -> torch.Tensor:
    """The f32 weight [N, K] of a stored quantized weight."""
    if qtype.scheme == "fp8e4m3":
        return qweight.to(torch.float32) * scales
    codes = unpack_codes(qweight, qtype.bits, qtype.k).to(torch.float32)
    zero = zeros if zeros is not None else torch.full_like(scales, float(qtype.default_zero))
    w = (_grouped(codes, qtype) - zero[..., None]) * scales[..., None]
    return w.reshape(codes.shape)


# -- round to nearest ------------------------------------------------------------------------


def quant_params(w: torch.Tensor, qtype: QuantType, clip: float | torch.Tensor = 1.0, *,
                 integer_zeros: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scales, zeros) of round-to-nearest quantization of ``w`` [N, K] to ``qtype``.

    Per group: asymmetric ``s = (max - min) / (L - 1)``, ``z = -min / s`` (the codes 0 and
    L - 1 are the group's min and max exactly; ``z`` is fractional in general, and
    ``integer_zeros=True`` rounds it as GPTQ/AWQ's reference code does); symmetric
    ``s = max|w| / (L/2 - 1)`` (int4: /7, int8: /127, codes centred on ``L/2``); fp8
    ``s = max|w| / 448``. ``clip`` (a ratio, or a [N, G] tensor of ratios, ≤ 1) shrinks the
    range first (AWQ's clipping search).

    Why fractional zeros: weights that were quantized before with a min/max grid (a GGUF
    Q4_1 checkpoint: ``w = d q + m`` per block of 32) land back on exactly that grid at the
    same group size; rounding ``z`` shifts the grid by up to half a step and costs as much as
    a fresh quantization (SmolLM2-135M, int4 g32: +0.0% perplexity vs +57%). A group whose
    values are all equal gets ``s = |w| / (L - 1)`` (or 1 for zeros) and is exact.
    """
    _check_weight(w, qtype, "quant_params")
    wg = _grouped(w.detach().to(torch.float32), qtype)
    ratio = clip if not isinstance(clip, torch.Tensor) else clip.to(torch.float32)[..., None]
    if qtype.scheme == "fp8e4m3":
        amax = w.detach().abs().amax(dim=1, keepdim=True).float() * (
            ratio if not isinstance(ratio, torch.Tensor) else ratio[..., 0])
        return (amax / FP8_E4M3_MAX).clamp_min(MIN_SCALE), None
    levels = qtype.levels
    if qtype.symmetric:
        amax = (wg.abs().amax(dim=-1, keepdim=True) * ratio)[..., 0]
        return (amax / (levels // 2 - 1)).clamp_min(MIN_SCALE), None
    lo = (wg.amin(dim=-1, keepdim=True) * ratio)[..., 0]
    hi = (wg.amax(dim=-1, keepdim=True) * ratio)[..., 0]
    span = hi - lo
    flat = span <= MIN_SCALE * (levels - 1)  # all values (nearly) equal: code 0 is the value
    scales = torch.where(flat, lo.abs() / (levels - 1), span / (levels - 1)).clamp_min(MIN_SCALE)
    zeros = -lo / scales
    if integer_zeros:
        zeros = torch.round(zeros)
    return scales, zeros


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   qtype: QuantType) -> torch.Tensor:
    """Codes [N, K] of ``w`` at given scales/zeros: u8 for integer types (unpacked, clamped to
    ``[0, 2**bits)``), e4m3 values for fp8."""
    _check_weight(w, qtype, "quantize_codes")
    w = w.detach().to(torch.float32)
    if qtype.scheme == "fp8e4m3":
        return (w / scales).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    zero = zeros if zeros is not None else torch.full_like(scales, float(qtype.default_zero))
    q = torch.round(_grouped(w, qtype) / scales[..., None] + zero[..., None])
    return q.clamp(0, qtype.levels - 1).reshape(w.shape).to(torch.uint8)


def quantize_rtn(w: torch.Tensor, qtype: QuantType, clip: float | torch.Tensor = 1.0, *,
                 integer_zeros: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` [N, K] (:func:`quant_params` then codes)."""
    scales, zeros = quant_params(w, qtype, clip, integer_zeros=integer_zeros)
    codes = quantize_codes(w, scales, zeros, qtype)
    packed = codes if qtype.scheme == "fp8e4m3" else pack_codes(codes, qtype.bits)
    return QuantizedWeight(packed, scales.contiguous(), None if zeros is None
                           else zeros.contiguous(), qtype)


def fake_quantize(w: torch.Tensor, qtype: QuantType,
                  clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``w`` quantized and dequantized (f32 [N, K]): the values of
    ``quantize_rtn(w, qtype, clip).dequantize()``; integer types are computed in place without
    packing codes (~5x faster: AWQ's searches call this 20-30 times per layer)."""
    if qtype.scheme != "int":
        return quantize_rtn(w, qtype, clip).dequantize()
    scales, zeros = quant_params(w, qtype, clip)
    scales = scales[..., None]
    zero = zeros[..., None] if zeros is not None else float(qtype.default_zero)
    q = (_grouped(w.detach().to(torch.float32), qtype) / scales).add_(zero).round_()
    q.clamp_(0, qtype.levels - 1).sub_(zero).mul_(scales)
    return q.reshape(w.shape)


# -- measuring -------------------------------------------------------------------------------


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal to quantization noise ratio in dB: 10 log10(Σ ref² / Σ (ref - approx)²);
    ``inf`` when they are equal."""
    ref = reference.detach().double()
    noise = float(((ref - approx.detach().double()) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# -- dynamic activation quantization (W8A8) --------------------------------------------------


def dynamic_quantize_u8(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """ONNX ``DynamicQuantizeLinear`` over the whole tensor or each row (last dim): returns
    (q u8 like x, scale f32, zero point f32), scale/zero of shape [..., 1] per row or [] per
    tensor.

    The rule: the range [min, max] is widened to include 0; ``scale = (max - min) / 255``;
    ``zp = clip(round(-min / scale), 0, 255)``; ``q = clip(round(x / scale) + zp, 0, 255)``;
    rounding half to even. An all-zero range (where ONNX would divide by a zero scale) takes
    scale 1: every code is the zero point and dequantizes to 0 exactly.
    """
    xf = x.to(torch.float32)
    if per_row:
        lo = xf.amin(dim=-1, keepdim=True).clamp_max(0.0)
        hi = xf.amax(dim=-1, keepdim=True).clamp_min(0.0)
    else:
        lo, hi = xf.min().clamp_max(0.0), xf.max().clamp_min(0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.round(-lo / scale).clamp(0, 255)
    q = (torch.round(xf / scale) + zp).clamp(0, 255).to(torch.uint8)
    return q, scale, zp


def storage_quant_type(k: int, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor | None) -> QuantType:
    """The QuantType of stored tensors whose weight has ``k`` input features (a kernel or a
    reference implementation gets tensors, not typed values): bits from the stored columns,
    the group from the scales, symmetric when there are no zeros."""
    if qweight.dtype == torch.float8_e4m3fn:
        return QuantType("fp8e4m3", 8, k, True, k)
    return QuantType("int", 8 * qweight.shape[1] // k, k // scales.shape[1], zeros is None, k)


def fake_quantize_activations(x: torch.Tensor, per_row: bool) -> torch.Tensor:
    """``x`` through :func:`dynamic_quantize_u8` and back (f32): what W8A8 multiplies."""
    q, scale, zero = dynamic_quantize_u8(x, per_row)
    return (q.to(torch.float32) - zero) * scale


__all__ = ["QuantType", "QuantizedWeight", "pack_codes", "unpack_codes", "check_storage",
           "dequantize", "quant_params", "quantize_codes", "quantize_rtn", "fake_quantize",
           "sqnr_db", "dynamic_quantize_u8", "fake_quantize_activations", "storage_quant_type", "FP8_E4M3_MAX"]
