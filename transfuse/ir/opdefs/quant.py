"""Quantized matrix products: ``qlinear`` (weight-only) and ``qmatmul`` (W8A8).

Glossary: M rows of x (all its dims but the last), K input features, N output features,
G = K / group scale groups per output channel.

- ``qlinear(x, qweight, scales, zeros?, bias?) {activation}``: ``x @ W.T + bias`` with ``W``
  the dequantized weight (``transfuse/ir/quant.py``): the quantized weight's type carries the
  :class:`~transfuse.ir.types.QuantType` (``u8{int4 g64 asym k576}[N, K/2]``). The reference
  computes in x's dtype from the exact f32 dequantized weight; backends run their fastest
  kernel (which may round activations, e.g. to bf16: their notes say so).
- ``qmatmul(x, qweight, scales, bias?) {act_quant, activation}``: W8A8. The weight is int8
  symmetric per channel; x is quantized on the fly to u8 with ONNX ``DynamicQuantizeLinear``'s
  rule, per row (``act_quant="token"``) or over the whole tensor (``"tensor"``), and the
  product is ``((xq - zx) * sx) @ W.T + bias``.

Both take the ``activation`` set of ``linear`` (``LINEAR_ACTIVATIONS``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transfuse.errors import IRVerifyError
from transfuse.ir.opdef import Attr, default_bytes, register
from transfuse.ir.opdefs._util import in_type
from transfuse.ir.opdefs.linalg import LINEAR_ACTIVATIONS
from transfuse.ir.quant import dequantize, fake_quantize_activations, storage_quant_type
from transfuse.ir.types import DType, TensorType, dims_equal

#: values of qmatmul's ``act_quant``: one activation scale per row (token) or per tensor
ACT_QUANTS = ("token", "tensor")


def _weight_check(node, op: str, zeros_index: int | None) -> str | None:
    """Why the quantized weight inputs of ``node`` are inconsistent (None when they are fine)."""
    x, w, s = node.inputs[0], node.inputs[1], node.inputs[2]
    qt = w.type.quant
    if qt is None:
        return f"{op}: weight {w.type} has no quant type"
    n = w.type.shape[0]
    if x.type.rank < 1 or not dims_equal(x.type.shape[-1], qt.k):
        return f"{op}: input {x.type} does not match the weight's K={qt.k} ({qt})"
    if not x.type.dtype.is_float:
        return f"{op}: input must be float, got {x.type}"
    want = TensorType(DType.f32, (n, qt.groups))
    if s.type.storage() != want:
        return f"{op}: scales must be {want} for {qt}, got {s.type}"
    zeros = node.inputs[zeros_index] if zeros_index is not None and \
        len(node.inputs) > zeros_index else None
    if qt.symmetric and zeros is not None:
        return f"{op}: a symmetric weight ({qt}) takes no zeros"
    if not qt.symmetric and (zeros is None or zeros.type.storage() != want):
        got = "none" if zeros is None else str(zeros.type)
        return f"{op}: an asymmetric weight ({qt}) needs zeros {want}, got {got}"
    return None


def _bias(node, index: int):
    return node.inputs[index] if len(node.inputs) > index else None


def _bias_check(node, index: int, op: str) -> str | None:
    b = _bias(node, index)
    n = node.inputs[1].type.shape[0]
    if b is not None and (b.type.rank != 1 or not dims_equal(b.type.shape[0], n)):
        return f"{op}: bias {b.type} does not match N={n}"
    return None


def _act_check(node, op: str) -> str | None:
    act = node.attrs["activation"]
    if act is not None and act not in LINEAR_ACTIVATIONS:
        return f"{op}: activation must be one of {sorted(LINEAR_ACTIVATIONS)} or none, got {act!r}"
    return None


def _out_type(node) -> list[TensorType]:
    x, w = in_type(node, 0), in_type(node, 1)
    return [TensorType(x.dtype, x.shape[:-1] + (w.shape[0],))]


def _infer_qlinear(node):
    reason = _weight_check(node, "qlinear", 3) or _bias_check(node, 4, "qlinear")
    if reason:
        raise IRVerifyError(reason)
    return _out_type(node)


def _verify_qlinear(node):
    return _act_check(node, "qlinear")


def _cost(node):
    x, w = in_type(node, 0), in_type(node, 1)
    return 2 * x.numel() * w.shape[0] * 1, default_bytes(node)


def _finish(y: torch.Tensor, attrs) -> torch.Tensor:
    act = attrs["activation"]
    return y if act is None else LINEAR_ACTIVATIONS[act](y)


@register("qlinear", ["x", "qweight", "scales", "zeros?", "bias?"],
          {"activation": Attr("str?", None)},
          infer=_infer_qlinear, verify=_verify_qlinear, cost=_cost)
def qlinear(xs, attrs, env):
    """x @ dequantize(qweight, scales, zeros).T + bias, then ``activation``."""
    x, qw, scales = xs[0], xs[1], xs[2]
    zeros = xs[3] if len(xs) > 3 else None
    bias = xs[4] if len(xs) > 4 else None
    qt = storage_quant_type(x.shape[-1], qw, scales, zeros)
    w = dequantize(qw, scales, zeros, qt).to(x.dtype)
    return _finish(F.linear(x, w, None if bias is None else bias.to(x.dtype)), attrs)


def _infer_qmatmul(node):
    reason = _weight_check(node, "qmatmul", None) or _bias_check(node, 3, "qmatmul")
    if reason:
        raise IRVerifyError(reason)
    return _out_type(node)


def _verify_qmatmul(node):
    qt = node.inputs[1].type.quant
    if qt.scheme != "int" or qt.bits != 8 or not qt.symmetric or not qt.per_channel:
        return f"qmatmul: the weight must be int8 symmetric per channel, got {qt}"
    if node.attrs["act_quant"] not in ACT_QUANTS:
        return f"qmatmul: act_quant must be one of {list(ACT_QUANTS)}, got " \
               f"{node.attrs['act_quant']!r}"
    return _act_check(node, "qmatmul")


@register("qmatmul", ["x", "qweight", "scales", "bias?"],
          {"act_quant": Attr("str", "token"), "activation": Attr("str?", None)},
          infer=_infer_qmatmul, verify=_verify_qmatmul, cost=_cost)
def qmatmul(xs, attrs, env):
    """W8A8: x quantized dynamically to u8 (per row or per tensor), times the int8 weight."""
    x, qw, scales = xs[0], xs[1], xs[2]
    bias = xs[3] if len(xs) > 3 else None
    xd = fake_quantize_activations(x, per_row=attrs["act_quant"] == "token")
    w = (qw.to(torch.float32) - 128.0) * scales
    y = F.linear(xd, w, None if bias is None else bias.to(torch.float32))
    return _finish(y.to(x.dtype), attrs)
