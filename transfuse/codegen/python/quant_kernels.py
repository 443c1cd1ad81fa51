"""The python target's quantized GEMM kernels (issue 13): what each takes, prepares and runs.

Glossary: x [..., K] with M rows (the product of its dims but the last), a weight [N, K]
stored in the canonical form of ``transfuse/ir/quant.py`` (codes q, scales s [N, G], zeros
z [N, G] or the fixed zero point of symmetric types), G = K / group.

Kernels (:data:`KERNELS`, by name; ``quant.py`` picks per shape and row count by measurement):

- ``tinygemm_int4`` (qlinear, int4): ``torch._weight_int4pack_mm_for_cpu`` on bf16 activations.
  Its weight is the codes repacked by ``torch._convert_weight_to_int4pack_for_cpu`` and one
  bf16 [G, N, 2] table of (scale, zero') where tinygemm dequantizes ``(q - 8) * s + zero'``,
  so ``zero' = (8 - z) * s``. Needs group 32/64/128/256 (K % group == 0 by the type) and
  N % 16 == 0 — other N are padded with zero channels and the result sliced.
- ``int8pack`` (qlinear, int8 per channel): ``torch._weight_int8pack_mm`` on bf16
  activations with the codes as int8 ``q - 128`` and bf16 scales; an asymmetric weight adds
  ``sum(x) * (128 - z) * s`` per channel. Needs K % 16 == 0 (the kernel crashes otherwise).
- ``dequant_f32`` (qlinear, any type): the reference implementation (dequantize to f32,
  ``F.linear``): the exact numerics, nothing prepared.
- ``int_mm`` (qmatmul): x quantized by the reference rule
  (:func:`transfuse.ir.quant.dynamic_quantize_u8`), codes shifted to s8 (``q - 128``),
  ``torch._int_mm`` s8 x s8 -> s32 against the weight codes as s8, plus the zero-point
  correction ``(128 - zx) * rowsum(w)``: the integer product is exact, so the result equals
  the reference up to f32 rounding.
- ``w8a8_reference`` (qmatmul): the reference implementation.

Measured (one thread, Xeon with AVX-512/AMX, quiet machine, 30 / 12 weights rotated like a
model's layers; ms per call at M = 1, including x -> bf16 and the result -> f32):

    shape N x K        f32 F.linear  tinygemm_int4 g64  int8pack  int_mm (W8A8, token)
    576 x 576          0.058         0.024 (2.4x)       0.030     0.065
    192 x 576          0.019         0.015 (1.2x)       0.017     0.046
    1536 x 576         0.238         0.053 (4.5x)       0.114     0.126
    576 x 1536         0.205         0.057 (3.6x)       0.101     0.103
    49152 x 576        8.49          1.51 (5.6x)        3.78      4.03
    2304 x 768         0.374         0.101 (3.7x)       0.155     0.251
    768 x 768          0.087         0.036 (2.4x)       0.044     0.093
    3072 x 768         0.567         0.135 (4.2x)       0.224     0.351
    768 x 3072         0.528         0.135 (3.9x)       0.170     0.248
    50256 x 768        11.1          1.95 (5.7x)        5.05      6.14

At M = 64 the weight-only kernels lose to f32 (1536 x 576: f32 0.93, tinygemm 1.36, int8pack
1.64 ms) but still beat dequantizing per call (4.4 ms), and ``int_mm`` wins (0.32 ms: AMX);
with f32 activations tinygemm / int8pack are 3-10x slower than f32 (never a candidate). An
AVX2 machine differs: hence the measurement at build time (``quant_timing.py``).

The bf16 kernels round activations, scales (and tinygemm's zero') to bf16 and return bf16
products: ~2-4e-3 relative error per output against the f32 reference (``quant.py`` notes it
in the program). Prepared tensors are made once per weight by :func:`prepare` (the emitters
call it at build time) and kept in a table keyed by the canonical ``qweight`` tensor, which
they never outlive; a call that finds none (the program moved to another device) prepares
then, once.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import weakref
from collections.abc import Callable

import torch

from transfuse.ir.opdefs.linalg import LINEAR_ACTIVATIONS
from transfuse.ir.ops import get_op
from transfuse.ir.quant import dynamic_quantize_u8, storage_quant_type, unpack_codes
from transfuse.ir.types import QuantType

aten = torch.ops.aten

#: tinygemm's (CPU) group sizes
TINYGEMM_GROUPS = (32, 64, 128, 256)
#: tinygemm's CPU packing wants N in multiples of this (other N are padded)
TINYGEMM_N_TILE = 16
#: torch._weight_int8pack_mm reads K in blocks of this (a segfault otherwise, torch 2.13)
INT8PACK_K_MULTIPLE = 16
#: the largest K whose s32 accumulation in int_mm cannot overflow (255 * 128 * K + the
#: zero-point correction < 2**31)
INT_MM_MAX_K = 32768

#: kernel name -> calls since the process started (tests read which kernel ran)
CALLS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One quantized GEMM: ``op`` it implements, why it cannot take a weight, how it
    prepares and runs; ``bf16``: it rounds activations to bf16 (the program says so)."""

    name: str
    op: str
    refuses: Callable[[QuantType, int], str | None]
    prepare: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, QuantType], tuple] | None
    run: Callable[..., torch.Tensor]
    bf16: bool = False
    what: str = ""


# -- tinygemm int4 ---------------------------------------------------------------------------


def _tinygemm_refuses(qt: QuantType, n: int) -> str | None:
    if qt.scheme != "int" or qt.bits != 4:
        return f"tinygemm takes int4 weights, not {qt.name}"
    if qt.group not in TINYGEMM_GROUPS:
        return (f"tinygemm takes groups {'/'.join(map(str, TINYGEMM_GROUPS))}, "
                f"not {qt.group} ({qt})")
    if not hasattr(aten, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    return None


def _tinygemm_prepare(qw, scales, zeros, qt):
    n = qw.shape[0]
    pad = -n % TINYGEMM_N_TILE
    codes = unpack_codes(qw, 4, qt.k).to(torch.int32)  # [N, K]
    s = scales.t()  # [G, N]
    z = zeros.t() if zeros is not None else torch.full_like(s, float(qt.default_zero))
    table = torch.stack((s, (8.0 - z) * s), dim=-1)  # [G, N, 2]: (scale, zero')
    if pad:
        codes = torch.nn.functional.pad(codes, (0, 0, 0, pad), value=8)
        table = torch.nn.functional.pad(table, (0, 0, 0, pad))
    packed = aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
    return packed, table.to(torch.bfloat16).contiguous(), n, qt.group


def _tinygemm_run(x2, prep, bias):
    packed, table, n, group = prep
    y = aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), packed, group, table)
    if y.shape[1] != n:
        y = y[:, :n]
    y = y.to(x2.dtype)
    return y if bias is None else y.add_(bias.to(y.dtype))


# -- int8 weight-only ------------------------------------------------------------------------


def _int8pack_refuses(qt: QuantType, n: int) -> str | None:
    if qt.scheme != "int" or qt.bits != 8:
        return f"_weight_int8pack_mm takes int8 weights, not {qt.name}"
    if not qt.per_channel:
        return f"_weight_int8pack_mm takes one scale per channel, not groups of {qt.group}"
    if qt.k % INT8PACK_K_MULTIPLE:
        return f"_weight_int8pack_mm needs K % {INT8PACK_K_MULTIPLE} == 0, K is {qt.k}"
    return None


def _s8_codes(qw: torch.Tensor) -> torch.Tensor:
    """u8 codes q -> s8 ``q - 128`` (the same bits with the top one flipped)."""
    return torch.bitwise_xor(qw, 128).view(torch.int8).contiguous()


def _int8pack_prepare(qw, scales, zeros, qt):
    s = scales[:, 0]
    shift = None if zeros is None else ((128.0 - zeros[:, 0]) * s).contiguous()
    return _s8_codes(qw), s.to(torch.bfloat16).contiguous(), shift


def _int8pack_run(x2, prep, bias):
    w8, s, shift = prep
    y = aten._weight_int8pack_mm(x2.to(torch.bfloat16), w8, s).to(x2.dtype)
    if shift is not None:  # (q - z) s = (q - 128) s + (128 - z) s
        y.addmm_(x2.sum(dim=1, keepdim=True), shift[None, :].to(x2.dtype))
    return y if bias is None else y.add_(bias.to(y.dtype))


# -- W8A8 on torch._int_mm -------------------------------------------------------------------


def _int_mm_refuses(qt: QuantType, n: int) -> str | None:
    if qt.scheme != "int" or qt.bits != 8 or not qt.symmetric or not qt.per_channel:
        return f"int_mm takes int8 symmetric per-channel weights, not {qt}"
    if qt.k > INT_MM_MAX_K:
        return f"K={qt.k} could overflow int_mm's s32 accumulation (at most {INT_MM_MAX_K})"
    if not hasattr(aten, "_int_mm"):
        return f"torch {torch.__version__} has no _int_mm"
    return int_mm_inexact()


@functools.cache
def int_mm_inexact() -> str | None:
    """Why ``torch._int_mm`` is not exact on this CPU (None when it is), measured once per
    process on the worst case: every product at +-127 * -128 with equal signs in pairs.

    AVX2 has no s8 x s8 dot product: its u8 x s8 instruction (``vpmaddubsw``) adds pairs of
    products into int16 with saturation, so a kernel that runs s8 x s8 through it (with the
    +128 shift) saturates at |pair| > 32767 — measured with ATEN_CPU_CAPABILITY=avx2 on the
    Xeon: 7% relative error on a W8A8 layer. AVX-512 VNNI / AMX accumulate in int32 and are
    exact."""
    k = 64
    a = torch.full((16, k), -128, dtype=torch.int8)
    a[1::2] = 127
    b = torch.full((k, 16), -128, dtype=torch.int8)
    b[:, 1::2] = 127
    try:
        got = aten._int_mm(a, b)
    except RuntimeError as e:  # pragma: no cover - depends on the build
        return f"torch._int_mm fails here: {e}"
    want = (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)
    if not torch.equal(got, want):
        worst = int((got.to(torch.int64) - want.to(torch.int64)).abs().max())
        return (f"torch._int_mm is not exact on this CPU (off by up to {worst} on +-128 "
                f"products: int16 saturation of AVX2's u8 x s8 pairs); W8A8 runs the reference")
    return None


def _int_mm_prepare(qw, scales, zeros, qt):
    w8 = _s8_codes(qw)  # [N, K]
    return w8, w8.sum(dim=1, dtype=torch.int32), scales[:, 0].contiguous()


def _int_mm_run(x2, prep, bias, per_row):
    w8, rowsum, ws = prep
    q, sx, zx = dynamic_quantize_u8(x2, per_row=per_row)  # the reference's codes
    acc = aten._int_mm(torch.bitwise_xor(q, 128).view(torch.int8), w8.t())  # sum (q-128) w
    acc += (128 - zx).to(torch.int32) * rowsum  # sum (q - zx) w, exact in s32
    y = acc.to(torch.float32) * (sx * ws)
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(x2.dtype)


# -- the reference implementations -----------------------------------------------------------


def _qlinear_reference(x, qw, scales, zeros, bias):
    return get_op("qlinear").impl([x, qw, scales, zeros, bias], {"activation": None}, {})


def _qmatmul_reference(x, qw, scales, bias, act_quant):
    return get_op("qmatmul").impl([x, qw, scales, bias],
                                  {"act_quant": act_quant, "activation": None}, {})


def _any(qt: QuantType, n: int) -> str | None:
    return None


#: every kernel, by name
KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("tinygemm_int4", "qlinear", _tinygemm_refuses, _tinygemm_prepare, _tinygemm_run,
           bf16=True, what="torch._weight_int4pack_mm_for_cpu (tinygemm), bf16 activations"),
    Kernel("int8pack", "qlinear", _int8pack_refuses, _int8pack_prepare, _int8pack_run,
           bf16=True, what="torch._weight_int8pack_mm, bf16 activations"),
    Kernel("dequant_f32", "qlinear", _any, None, _qlinear_reference,
           what="dequantize to f32 + F.linear (the reference numerics)"),
    Kernel("int_mm", "qmatmul", _int_mm_refuses, _int_mm_prepare, _int_mm_run,
           what="torch._int_mm s8 x s8 -> s32 (exact integer product)"),
    Kernel("w8a8_reference", "qmatmul", _any, None, _qmatmul_reference,
           what="fake-quantized activations + f32 F.linear (the reference)"),
)}


def kernels_for(op: str) -> list[str]:
    """Names of the kernels of ``op``, in order of preference when nothing was measured."""
    return [k for k, v in KERNELS.items() if v.op == op]


def refuses(name: str, qt: QuantType, n: int) -> str | None:
    """Why kernel ``name`` cannot take a weight of ``qt`` with N channels on this build."""
    return KERNELS[name].refuses(qt, n)


# -- prepared tensors, made once per weight --------------------------------------------------


class _Prepared:
    """The prepared tensors of one canonical weight, by kernel name."""

    __slots__ = ("ref", "scales", "zeros", "by_kernel", "__weakref__")

    def __init__(self, qw: torch.Tensor, scales, zeros):
        self.ref = weakref.ref(qw)
        self.scales = scales
        self.zeros = zeros
        self.by_kernel: dict[str, tuple] = {}


#: id(canonical qweight) -> its prepared tensors (dropped with the qweight)
_PREPARED: dict[int, _Prepared] = {}


def _entry(qw, scales, zeros) -> _Prepared:
    e = _PREPARED.get(id(qw))
    if e is None or e.ref() is not qw or e.scales is not scales or e.zeros is not zeros:
        e = _PREPARED[id(qw)] = _Prepared(qw, scales, zeros)
        weakref.finalize(qw, _drop, id(qw), e)
    return e


def _drop(key: int, entry: _Prepared) -> None:
    if _PREPARED.get(key) is entry:
        del _PREPARED[key]


def prepare(name: str, qw: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            qt: QuantType) -> tuple | None:
    """The prepared tensors of kernel ``name`` for this weight (made on the first call)."""
    k = KERNELS[name]
    if k.prepare is None:
        return None
    e = _entry(qw, scales, zeros)
    prep = e.by_kernel.get(name)
    if prep is None:
        with torch.inference_mode(False), torch.no_grad():
            prep = e.by_kernel[name] = k.prepare(qw, scales, zeros, qt)
    return prep


def _lookup(name: str, qw: torch.Tensor) -> tuple | None:
    """The tensors prepared for kernel ``name`` and this weight, if any (the per-call path)."""
    e = _PREPARED.get(id(qw))
    return e.by_kernel.get(name) if e is not None and e.ref() is qw else None


def prepared_bytes(name: str, qw: torch.Tensor) -> int:
    """Bytes of the tensors prepared for kernel ``name`` and this weight (0 when none)."""
    prep = _lookup(name, qw)
    return sum(t.numel() * t.element_size() for t in prep or ()
               if isinstance(t, torch.Tensor))


# -- the calls the generated code makes ------------------------------------------------------


def run_qlinear(name: str, x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` by kernel ``name`` (the reference off the CPU, for fp8
    storage and for an empty x)."""
    CALLS[name] += 1
    if name == "dequant_f32" or x.device.type != "cpu" or qw.dtype != torch.uint8 \
            or x.numel() == 0:
        return _qlinear_reference(x, qw, scales, zeros, bias)
    prep = _lookup(name, qw)
    if prep is None:
        prep = prepare(name, qw, scales, zeros, storage_quant_type(x.shape[-1], qw, scales, zeros))
    x2 = x.reshape(-1, x.shape[-1])
    return KERNELS[name].run(x2, prep, bias).reshape(*x.shape[:-1], qw.shape[0])


def run_qmatmul(name: str, x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None, act_quant: str) -> torch.Tensor:
    """W8A8 by kernel ``name`` (the reference off the CPU or on an empty x)."""
    CALLS[name] += 1
    if name == "w8a8_reference" or x.device.type != "cpu" or x.numel() == 0:
        return _qmatmul_reference(x, qw, scales, bias, act_quant)
    prep = _lookup(name, qw)
    if prep is None:
        prep = prepare(name, qw, scales, None, storage_quant_type(x.shape[-1], qw, scales, None))
    x2 = x.reshape(-1, x.shape[-1])
    y = _int_mm_run(x2, prep, bias, act_quant == "token")
    return y.reshape(*x.shape[:-1], qw.shape[0])


def quant_linear(x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, bias: torch.Tensor | None, activation: str | None,
                 small: str, rows_max: int | None, large: str) -> torch.Tensor:
    """What generated code calls for ``qlinear``: kernel ``small`` when x has at most
    ``rows_max`` rows (always when None), else ``large``; then ``activation``."""
    few = rows_max is None or x.numel() <= rows_max * x.shape[-1]
    y = run_qlinear(small if few else large, x, qw, scales, zeros, bias)
    return y if activation is None else LINEAR_ACTIVATIONS[activation](y)


def quant_matmul(x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None, act_quant: str, activation: str | None,
                 small: str, rows_max: int | None, large: str) -> torch.Tensor:
    """What generated code calls for ``qmatmul`` (the same dispatch as :func:`quant_linear`)."""
    few = rows_max is None or x.numel() <= rows_max * x.shape[-1]
    y = run_qmatmul(small if few else large, x, qw, scales, bias, act_quant)
    return y if activation is None else LINEAR_ACTIVATIONS[activation](y)


__all__ = ["quant_linear", "quant_matmul", "KERNELS", "Kernel", "CALLS", "kernels_for", "refuses", "prepare", "prepared_bytes",
           "run_qlinear", "run_qmatmul", "TINYGEMM_GROUPS"]
