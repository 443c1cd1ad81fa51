"""ONNX lowerings of ``qlinear`` and ``qmatmul`` (``transfuse/ir/opdefs/quant.py``): ORT's
quantized GEMMs, fed from the one canonical storage of ``transfuse/ir/quant.py``.

``qlinear`` -> ``com.microsoft.MatMulNBits`` {K, N, bits, block_size, accuracy_level=4}:

- B ``[N, K/bs, bs*bits/8]`` is our storage ``[N, K*bits/8]`` reshaped (a view, no copy): for
  4 bits element 2j in the low nibble of byte j is MatMulNBits' order (checked against ORT in
  ``tests/onnx_backend/test_quant_ort.py``);
- block_size ``bs`` (:func:`block_size`): a power of two >= 16 that no block straddles two
  groups, at most :data:`MAX_BLOCK` (ORT quantizes x to int8 per block: larger blocks measured
  faster but coarser); a group larger than bs repeats its scale (and zero point) over its
  blocks. Per channel (group == K) any bs works: one dividing K, else the last block is
  padded;
- scales ``[N, K/bs]``; zero points: symmetric -> omitted (ORT's default ``2**(bits-1)`` is
  ours: 8 / 128); asymmetric -> packed u8 ``[N, ceil(K/bs * bits/8)]`` (4 bits: two per byte,
  low nibble first, each row padded). Fractional zeros (the IR allows them) are rounded for
  MatMulNBits and the rest is added exactly: ``y += sum_g (round(z) - z)[n, g] s[n, g] *
  sum_{k in g} x[k]`` (a ReduceSum per group and a [G, N] MatMul). ORT's float zero points
  would dequantize the whole weight on every call (its unpacked fp32 path), and it refuses
  them for 8 bits;
- accuracy_level 4: ORT quantizes x to int8 per block (symmetric, one scale per block of bs
  values) and runs integer dot products. Measured (onnxruntime 1.32, 1 thread, M=1):
  without it 4-bit is ~1x fp32 on AVX2 (issue 13) and 0.25-0.55x the level-4 speed on
  this AVX-512 machine; the price is an error of ~0.5% of the output's norm against the
  exact product (more with outlier activations), which ``test_quant_ort.py`` states as its
  tolerance.

``qmatmul`` (W8A8; the weight is int8 symmetric per channel, codes u8 with zero point 128):

- act_quant "tensor" -> ``com.microsoft.DynamicQuantizeMatMul`` with u8 weights ``[K, N]``
  (a transposed copy) and zero point 128: ORT quantizes x with DynamicQuantizeLinear's rule,
  exactly the IR's, and multiplies in integers. Never s8 weights: AVX2's u8 x s8 kernel
  (vpmaddubsw) saturates its int16 pair sums (8-10% errors measured in issue 13);
- act_quant "token" -> the IR's per-row rule in standard ops (ReduceMin/ReduceMax, Round,
  Clip; one quantization shared by every qmatmul of the same x), then
  ``com.microsoft.MatMulIntegerToFloat`` (u8 x u8 with b_zero_point 128, times the column
  scales) and the row terms: ``f * sx - (zx * sx) * colsum(W - 128) * s``. ORT has no per-row
  zero point or scale for A (MatMulInteger takes a scalar a_zero_point), hence the colsum
  term. Integer products, f32 rounding only.

Standard ops only (``fused=False``): qlinear is a MatMul on the dequantized f32 weight (the
file then holds float weights; noted), qmatmul the same quantization with ``MatMulInteger``
(int32, the zero-point term subtracted in int32) for both granularities. Glossary: M rows of x, K input features, N output features, G = K / group
groups, bs MatMulNBits block size, kb = ceil(K / bs) blocks per row.
"""

from __future__ import annotations

import torch

from transfuse.codegen.onnx.elementwise import activation
from transfuse.codegen.onnx.registry import LOWERINGS, out_dtype
from transfuse.ir.graph import Node, Value
from transfuse.ir.quant import dequantize
from transfuse.ir.types import DType, QuantType

#: MatMulNBits' accuracy_level: 4 = x quantized to int8 per block, integer dot products
ACCURACY_LEVEL = 4
#: MatMulNBits' smallest block (the op's schema: a power of two >= 16)
MIN_BLOCK = 16
#: the largest block emitted: ORT quantizes x per block; per-channel weights in blocks of 256+
#: measured -10..+10% (int4) and up to 25% (int8) faster than 128 but with 1.2-1.7x the error
#: from rounding x (576x1536, 768x3072, 3072x768, M=1, 1 thread)
MAX_BLOCK = 128
#: 8-bit per-channel weights use blocks of at most 32: x is rounded to int8 per block, and
#: SmolLM2-135M int8-weight (GPTQ, 5610 tokens) measured +1.24% perplexity at blocks of 64/128,
#: +0.92% at 32, +0.75% at 16; MatMulNBits 8-bit at M = 1, 1 thread: 32 as fast as 64 on the
#: 1536x576 / 576x1536 layers (0.020-0.021 ms), 16 1.2-1.7x slower
MAX_BLOCK_8BIT = 32


# -- what ORT can take ---------------------------------------------------------------------


def block_size(qt: QuantType) -> int | None:
    """MatMulNBits' block_size for weights of ``qt`` (None when there is none): a power of two
    >= 16 dividing the group (so no block straddles two groups), at most :data:`MAX_BLOCK`;
    per channel the largest of 128, 64, 32 (8 bits: at most :data:`MAX_BLOCK_8BIT`) dividing
    K, else that maximum (or K's next power of two) with the last block padded."""
    if qt.per_channel:
        top = MAX_BLOCK_8BIT if qt.bits == 8 else MAX_BLOCK
        for bs in (128, 64, 32, 16):
            if bs <= top and qt.k % bs == 0:
                return bs
        return min(top, max(MIN_BLOCK, 1 << (qt.k - 1).bit_length()))
    bs = min(qt.group & -qt.group, MAX_BLOCK)  # the largest power of two dividing the group
    return bs if bs >= MIN_BLOCK else None


def quant_refuses(qt: QuantType | None, op: str) -> str | None:
    """Why the onnxruntime target cannot run ``op`` ("qlinear" / "qmatmul") on a weight of
    ``qt`` (None when it can)."""
    if qt is None:
        return f"{op}: the weight has no quant type"
    if qt.scheme != "int":
        return (f"{qt.name} needs a GPU target: ONNX Runtime's CPU execution provider has no "
                f"{qt.name} GEMM")
    if qt.bits not in (4, 8):
        return f"MatMulNBits here takes 4 or 8 bits, not {qt.bits}"
    if op == "qmatmul":
        if qt.bits != 8 or not qt.symmetric or not qt.per_channel:
            return f"qmatmul needs int8 symmetric per-channel weights, got {qt}"
        return None
    if block_size(qt) is None:
        p = qt.group & -qt.group
        return (f"group {qt.group} cannot be split into MatMulNBits blocks (powers of two >= "
                f"{MIN_BLOCK} that do not straddle groups; the largest power of two dividing "
                f"{qt.group} is {p}): use a group that is a multiple of 16, or per channel")
    return None


def _const_refuses(node: Node, names: tuple[str, ...]) -> str | None:
    for i, what in enumerate(names, start=1):
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is not None and not v.is_const:
            return (f"{node.op}: the {what} must be a constant (ORT packs quantized weights "
                    "when the session is made)")
    return None


def _qlinear_refuses(node: Node) -> str | None:
    return quant_refuses(node.inputs[1].type.quant, "qlinear") or \
        _const_refuses(node, ("quantized weight", "scales", "zeros"))


def _qmatmul_refuses(node: Node) -> str | None:
    return quant_refuses(node.inputs[1].type.quant, "qmatmul") or \
        _const_refuses(node, ("quantized weight", "scales"))


def _optional(node: Node, i: int) -> Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


# -- qlinear -------------------------------------------------------------------------------


def _blocks(t: torch.Tensor, qt: QuantType, bs: int) -> torch.Tensor:
    """Per-group values [N, G] as per-block values [N, kb]."""
    kb = -(-qt.k // bs)
    return t.repeat_interleave(qt.group // bs, dim=1) if not qt.per_channel \
        else t.expand(-1, kb).contiguous()


def _storage_b(w: Value, qt: QuantType, bs: int) -> torch.Tensor:
    """B [N, kb, bs*bits/8]: the storage reshaped (a view), padded when bs does not divide K."""
    n, kb = w.type.shape[0], -(-qt.k // bs)
    packed = w.const
    pad = kb * bs * qt.bits // 8 - packed.shape[1]
    if pad:  # per channel only: the padded codes meet x's zero padding inside ORT
        packed = torch.cat([packed, packed.new_zeros(n, pad)], dim=1)
    return packed.reshape(n, kb, bs * qt.bits // 8)


def _packed_zeros(zi: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer zero points [N, kb] (u8 values < 2**bits) as MatMulNBits' packed u8
    [N, ceil(kb * bits / 8)]: 4 bits two per byte, low nibble first, rows padded."""
    if bits == 8:
        return zi.contiguous()
    if zi.shape[1] % 2:
        zi = torch.cat([zi, zi.new_zeros(zi.shape[0], 1)], dim=1)
    return (zi[:, 0::2] | (zi[:, 1::2] << 4)).contiguous()


def _zero_points(b, node: Node, qt: QuantType, bs: int) -> tuple[str, str | None]:
    """(MatMulNBits' zero_points input or "", the correction [G, N] for fractional zeros or
    None)."""
    zeros, scales = _optional(node, 3), node.inputs[2]
    if qt.symmetric or zeros is None:
        return "", None
    z = zeros.const.to(torch.float32)
    zi = z.round().clamp(0, qt.levels - 1)
    packed = b.derived(("mnb-zp", id(zeros), bs), lambda: _packed_zeros(
        _blocks(zi, qt, bs).to(torch.uint8), qt.bits), f"{zeros.name}_mnb")
    if torch.equal(zi, z):
        return packed, None
    fix = b.derived(("mnb-zfix", id(zeros)), lambda: ((zi - z) * scales.const).t().contiguous(),
                    f"{zeros.name}_fraction")
    return packed, fix


def _zero_fraction(b, x: str, xv: Value, qt: QuantType, fix: str) -> str:
    """sum_g fix[g, n] * (sum of x over group g): the part of fractional zero points that the
    rounded ones in MatMulNBits leave out ([.., N])."""
    rank = xv.type.rank
    grouped = b.add("Reshape", [x, b.ints([0] * (rank - 1) + [qt.groups, qt.group])])
    sums = b.reduce("ReduceSum", grouped, [-1], False)  # [.., G]
    return b.add("MatMul", [sums, fix])


@LOWERINGS.register("qlinear", supports=_qlinear_refuses)
def _qlinear(b, node):
    """x @ dequant(W).T + bias, then the activation: MatMulNBits (fused exports), else MatMul on
    the dequantized weight."""
    dtype = out_dtype(node)
    w, scales, bias = node.inputs[1], node.inputs[2], _optional(node, 4)
    qt = w.type.quant
    act = node.attrs["activation"]
    if not b.fused:
        return _qlinear_std(b, node, qt, dtype)
    x = b.input(node, 0, DType.f32)
    bs = block_size(qt)
    n = w.type.shape[0]
    qb = b.derived(("mnb-b", id(w), bs), lambda: _storage_b(w, qt, bs), f"{w.name}_mnb")
    sc = b.derived(("mnb-s", id(scales), bs), lambda: _blocks(scales.const.to(torch.float32),
                                                              qt, bs), f"{scales.name}_mnb")
    zp, fix = _zero_points(b, node, qt, bs)
    bias_name = b.input(node, 4, DType.f32) if bias is not None else ""
    ins = [x, qb, sc, zp, "", bias_name]
    while ins[-1] == "":
        ins.pop()
    y = b.ms("MatMulNBits", ins, K=qt.k, N=n, bits=qt.bits, block_size=bs,
             accuracy_level=ACCURACY_LEVEL)
    if fix is not None:
        y = b.add("Add", [y, _zero_fraction(b, x, node.inputs[0], qt, fix)])
        b.memo(("qlinear-fraction",), lambda: b.notes.append(
            "qlinear: fractional zero points: MatMulNBits takes them rounded, the rest is "
            "added exactly (ReduceSum per group + MatMul)") or "noted")
    return b.cast(activation(b, node, y, "", act, DType.f32), DType.f32, dtype)


def _qlinear_std(b, node: Node, qt: QuantType, dtype: DType) -> str:
    """Standard ops: MatMul on the dequantized weight [K, N] (f32 in the file)."""
    w, scales, zeros = node.inputs[1], node.inputs[2], _optional(node, 3)
    wt = b.derived(("dequant-t", id(w)), lambda: dequantize(
        w.const, scales.const, zeros.const if zeros is not None else None, qt).t().contiguous(),
        f"{w.name}_dequant_T")
    b.memo(("qlinear-std",), lambda: b.notes.append(
        "qlinear with standard ops (fused=False): MatMul on the dequantized f32 weights (the "
        "model holds float weights)") or "noted")
    y = b.add("MatMul", [b.input(node, 0, DType.f32), wt])
    bias = b.input(node, 4, DType.f32) if _optional(node, 4) is not None else ""
    return b.cast(activation(b, node, y, bias, node.attrs["activation"], DType.f32),
                  DType.f32, dtype)


# -- qmatmul -------------------------------------------------------------------------------


def _weight_kn(b, w: Value) -> str:
    """The u8 codes as [K, N] (MatMul's layout; a transposed copy), zero point 128."""
    return b.derived(("w8-kn", id(w)), lambda: w.const.t().contiguous(), f"{w.name}_KN")


def _dynamic_quant(b, x: str, per_row: bool) -> tuple[str, str, str]:
    """The IR's dynamic u8 quantization of ``x`` (``transfuse.ir.quant.dynamic_quantize_u8``)
    in standard ops: (q u8, scale f32, zero point f32), scale and zero point [.., 1] per row or
    0-d per tensor. Made once per x and granularity.

    Two steps of the IR's rule are implied here rather than written: the zero point
    ``round(-min / scale)`` lies in [0, 255] by construction (no Clip), and an all-zero range
    takes the smallest normal scale instead of 1 (every code is then the zero point 0 and
    dequantizes to 0 exactly, as with scale 1)."""
    def make():
        axes = [-1] if per_row else None
        zero = b.const(0.0, DType.f32, "zero")
        lo = b.add("Min", [b.reduce("ReduceMin", x, axes, per_row), zero])
        hi = b.add("Max", [b.reduce("ReduceMax", x, axes, per_row), zero])
        scale = b.add("Div", [b.add("Sub", [hi, lo]), b.const(255.0, DType.f32, "u8_range")])
        scale = b.add("Max", [scale, b.const(torch.finfo(torch.float32).tiny, DType.f32,
                                             "f32_tiny")])
        zp = b.add("Round", [b.add("Div", [b.add("Neg", [lo]), scale])])
        q = b.add("Clip", [b.add("Add", [b.add("Round", [b.add("Div", [x, scale])]), zp]),
                          zero, b.const(255.0, DType.f32, "u8_max")])
        return b.cast(q, DType.f32, DType.u8), scale, zp
    return b.memo(("dyn-quant", x, per_row), make)


def _scales_n(b, scales: Value) -> str:
    return b.derived(("w8-s", id(scales)), lambda: scales.const.reshape(-1).to(torch.float32),
                     f"{scales.name}_N")


def _colsum(w: Value) -> torch.Tensor:
    """sum over K of (W - 128): [N] int32."""
    return (w.const.to(torch.int32) - 128).sum(dim=1, dtype=torch.int32)


def _qmatmul_std(b, node: Node, x: str, per_row: bool) -> str:
    """((q - zx) * sx) @ ((W - 128) * s).T with integers: MatMulInteger(q, W, b_zp=128), minus
    zx * colsum(W - 128) in int32, times sx and s."""
    w, scales = node.inputs[1], node.inputs[2]
    q, sx, zx = _dynamic_quant(b, x, per_row)
    prod = b.add("MatMulInteger", [q, _weight_kn(b, w), "", b.const(128, DType.u8, "zp128")])
    colsum = b.derived(("w8-colsum", id(w)), lambda: _colsum(w), f"{w.name}_colsum")
    shift = b.add("Mul", [b.cast(zx, DType.f32, DType.i32), colsum])
    acc = b.cast(b.add("Sub", [prod, shift]), DType.i32, DType.f32)
    return b.add("Mul", [b.add("Mul", [acc, sx]), _scales_n(b, scales)])


def _qmatmul_token(b, node: Node, x: str) -> str:
    """Per token with ORT's MatMulIntegerToFloat (fewer nodes than :func:`_qmatmul_std`):
    ``f = sum_k q (W - 128) s`` in one kernel, then ``f * sx - (zx * sx) * colsum(W - 128) s``
    (the row term made once per x)."""
    w, scales = node.inputs[1], node.inputs[2]
    q, sx, zx = _dynamic_quant(b, x, True)
    f = b.ms("MatMulIntegerToFloat", [q, _weight_kn(b, w), b.const(1.0, DType.f32, "one"),
                                      _scales_n(b, scales), "", b.const(128, DType.u8, "zp128")])
    row = b.memo(("dyn-quant-row", x), lambda: b.add("Mul", [zx, sx]))
    col = b.derived(("w8-colsum-s", id(w), id(scales)), lambda: _colsum(w).to(torch.float32)
                    * scales.const.reshape(-1).to(torch.float32), f"{w.name}_colsum_s")
    return b.add("Sub", [b.add("Mul", [f, sx]), b.add("Mul", [row, col])])


@LOWERINGS.register("qmatmul", supports=_qmatmul_refuses)
def _qmatmul(b, node):
    """W8A8: DynamicQuantizeMatMul per tensor, MatMulIntegerToFloat and the quantization
    written out per token (fused exports); the standard-op form otherwise."""
    dtype = out_dtype(node)
    w, scales = node.inputs[1], node.inputs[2]
    x = b.input(node, 0, DType.f32)
    per_row = node.attrs["act_quant"] == "token"
    bias = b.input(node, 3, DType.f32) if _optional(node, 3) is not None else ""
    if b.fused and not per_row:
        zp = b.derived(("w8-zp", w.type.shape[0]), lambda: torch.full(
            (w.type.shape[0],), 128, dtype=torch.uint8), "zp128_N")
        y = b.ms("DynamicQuantizeMatMul", [x, _weight_kn(b, w), _scales_n(b, scales), zp]
                 + ([bias] if bias else []))
        bias = ""  # added by DynamicQuantizeMatMul
    elif b.fused:
        y = _qmatmul_token(b, node, x)
    else:
        y = _qmatmul_std(b, node, x, per_row)
    return b.cast(activation(b, node, y, bias, node.attrs["activation"], DType.f32),
                  DType.f32, dtype)


__all__ = ["block_size", "quant_refuses", "ACCURACY_LEVEL", "MIN_BLOCK", "MAX_BLOCK"]
