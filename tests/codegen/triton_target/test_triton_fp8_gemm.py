"""The FP8 (e4m3) scaled GEMM (codegen/triton/kernels/fp8_gemm.py) under Triton's interpreter.

The interpreter runs the very kernel (e4m3 loads, conversions of representable values and the
fp8 ``tl.dot``, emulated in f32): these tests check its math against the torch reference; the
GPU's fp8 MMA and its accumulation are only checked by compiling (the compile check) and on a
GPU. The activation quantizer is checked bit for bit, ties, carries and subnormals included."""

import pytest

# env first: it sets TRITON_INTERPRET, which triton reads when it is imported (an earlier
# `import triton` leaves tl.cdiv & co. compiled-mode functions the interpreter cannot call)
from transfuse.codegen.triton import env  # noqa: F401

pytest.importorskip("triton", reason="the triton target needs triton (pip install 'triton>=3.6')")

import torch  # noqa: E402

from transfuse.codegen.triton.kernels import fp8_gemm as fg  # noqa: E402
from transfuse.codegen.triton.kernels import quant_gemm as qg  # noqa: E402
from transfuse.errors import LoweringError  # noqa: E402
from transfuse.ir.quant import FP8_E4M3_MAX, MIN_SCALE, quantize_rtn  # noqa: E402
from transfuse.ir.types import QuantType  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(y, ref) -> float:
    ref = ref.float()
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def fp8_weight(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qt = QuantType("fp8e4m3", 8, k, True, k)
    return quantize_rtn(torch.randn(n, k, generator=gen), qt), qt


# (M, N, K, dtype, bias, activation, tile)
CASES = [
    (1, 24, 64, torch.float32, True, "gelu", None),
    (3, 40, 96, torch.float32, False, "silu", None),
    (17, 24, 128, torch.float32, True, None, None),
    (17, 40, 96, torch.float32, True, "relu", "prefill"),
    (3, 40, 64, torch.float16, True, "gelu_tanh", None),
    (17, 24, 96, torch.bfloat16, True, "silu", None),
    (1, 40, 128, torch.bfloat16, False, None, "decode"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}n{c[1]}k{c[2]}-{str(c[3])[6:]}"
                         f"-{'bias' if c[4] else 'nobias'}-{c[5]}-{c[6]}")
def test_fp8_linear_matches_reference(case):
    m, n, k, dtype, has_bias, act, tile = case
    qw, qt = fp8_weight(n, k)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype)
    y = fg.fp8_linear(x, qw.qweight, qw.scales, bias, act, out=out, tile=tile)
    assert y is out and not torch.isnan(y).any()
    assert rel_err(y, fg.reference_fp8_linear(x, qw.qweight, qw.scales, bias, act)) <= TOL[dtype]
    # against the IR's qlinear on the unquantized x: e4m3's activation rounding (3 bits)
    ir = qg.reference_qlinear(x.float(), qw.qweight, qw.scales, None,
                              None if bias is None else bias.float(), act)
    assert rel_err(y, ir) <= 0.1


def test_fp8_linear_leading_dims_and_zero_row():
    qw, _ = fp8_weight(24, 64)
    x = torch.randn(2, 3, 64)
    x[1, 2] = 0.0  # scale MIN_SCALE, codes 0
    y = fg.fp8_linear(x, qw.qweight, qw.scales, out=torch.full((2, 3, 24), float("nan")))
    assert rel_err(y, fg.reference_fp8_linear(x, qw.qweight, qw.scales)) <= 1e-4
    assert torch.equal(y[1, 2], torch.zeros(24))


def test_activation_quantizer_bit_exact():
    codes = torch.arange(256, dtype=torch.uint8)
    vals = codes[(codes & 0x7F) != 0x7F].view(torch.float8_e4m3fn).float().sort().values
    mids = (vals[1:] + vals[:-1]) / 2  # ties: round to the even code
    gen = torch.Generator().manual_seed(2)
    row = torch.cat([vals, mids, mids * (1 + 1e-6), mids * (1 - 1e-6),
                     torch.tensor([124.3, -125.6, 31.4, -0.0, 0.0009765625]),  # carries, -0
                     torch.randn(200, generator=gen) * 100,
                     torch.rand(200, generator=gen) * 0.03])  # subnormals
    row = row[row.abs() <= FP8_E4M3_MAX]
    x = torch.stack([torch.cat([row, torch.tensor([FP8_E4M3_MAX])]),  # scale exactly 1
                     torch.cat([row * 0.37, torch.tensor([3.0])]),
                     torch.zeros(row.numel() + 1)])
    q, sx = fg.quantize_fp8_rows(x)
    rq, rs = fg.reference_quantize_fp8_rows(x)
    assert sx[0] == 1.0 and sx[2] == MIN_SCALE
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(sx, rs[:, 0])


def test_capability():
    assert "sm_80" in fg.capability_refuses((8, 0))
    assert fg.capability_refuses((8, 9)) is None and fg.capability_refuses((9, 0)) is None
    assert fg.refuses(torch.device("cpu")) is None  # the interpreter
    assert all(getattr(s, "archs", None) == (89, 90) for s in fg.SHIPPED)


def test_bad_inputs_raise_lowering_error_naming_the_argument():
    qw, _ = fp8_weight(24, 64)
    x = torch.randn(3, 64)
    with pytest.raises(LoweringError, match="fp8_linear: x"):
        fg.fp8_linear(x.to(torch.int32), qw.qweight, qw.scales)
    with pytest.raises(LoweringError, match="fp8_linear: qweight"):
        fg.fp8_linear(x, qw.qweight.view(torch.uint8), qw.scales)
    with pytest.raises(LoweringError, match="fp8_linear: qweight"):
        fg.fp8_linear(torch.randn(3, 32), qw.qweight, qw.scales)
    with pytest.raises(LoweringError, match="fp8_linear: scales"):
        fg.fp8_linear(x, qw.qweight, qw.scales[:, 0])
    with pytest.raises(LoweringError, match="fp8_linear: bias"):
        fg.fp8_linear(x, qw.qweight, qw.scales, torch.randn(3))
    with pytest.raises(LoweringError, match="fp8_linear: activation"):
        fg.fp8_linear(x, qw.qweight, qw.scales, activation="swish")
    with pytest.raises(LoweringError, match="fp8_linear: out"):
        fg.fp8_linear(x, qw.qweight, qw.scales, out=torch.empty(3, 25))
    with pytest.raises(LoweringError, match="fp8_linear: tile"):
        fg.fp8_linear(x, qw.qweight, qw.scales, tile="big")


def test_bench_runs_on_tiny_shapes():
    r = fg.bench_fp8_linear("cpu", m=2, n=24, k=64, dtype=torch.float32, reps=1)
    assert r["fp8_linear_ms"] > 0 and r["qlinear_fp8_weight_only_ms"] > 0
    assert r["torch_linear_dequantized_ms"] > 0
