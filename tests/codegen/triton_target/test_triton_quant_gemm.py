"""The quantized GEMM kernels (codegen/triton/kernels/quant_gemm.py) under Triton's interpreter:
weight-only qlinear (int4 / int8 / fp8 storage, every group path, split-K, tiles) and W8A8
qmatmul against the IR's reference implementations; outputs NaN-poisoned before each run."""

import pytest

# env first: it sets TRITON_INTERPRET, which triton reads when it is imported (an earlier
# `import triton` leaves tl.cdiv & co. compiled-mode functions the interpreter cannot call)
from transfuse.codegen.triton import env  # noqa: F401

pytest.importorskip("triton", reason="the triton target needs triton (pip install 'triton>=3.6')")

import torch  # noqa: E402

from transfuse.codegen.triton.kernels import quant_gemm as qg  # noqa: E402
from transfuse.errors import LoweringError  # noqa: E402
from transfuse.ir.quant import dynamic_quantize_u8, quantize_rtn  # noqa: E402
from transfuse.ir.types import QuantType  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

#: max |y - ref| / max |ref| allowed per x dtype (f16/bf16: about one ulp of the largest output)
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def make(bits, group, symmetric, n, k, seed=0, scheme="int"):
    gen = torch.Generator().manual_seed(seed)
    qt = QuantType(scheme, bits, group, symmetric, k)
    return quantize_rtn(torch.randn(n, k, generator=gen), qt), qt


# (bits, group, symmetric, M, N, K, dtype, bias, activation, split_k, tile, one_group)
CASES = [
    (4, 32, False, 3, 24, 64, torch.float32, True, "gelu", None, None, True),
    (4, 64, True, 1, 40, 128, torch.float32, False, "silu", 2, None, True),
    (4, 96, False, 17, 24, 96, torch.float32, True, "relu", None, None, True),  # per channel
    (4, 16, False, 3, 40, 64, torch.float32, True, "gelu_tanh", None, None, False),  # gather
    (4, 64, False, 3, 24, 192, torch.float32, True, None, 3, None, True),
    (8, 32, False, 17, 40, 64, torch.float32, True, None, None, None, True),
    (8, 96, True, 1, 24, 96, torch.float32, True, "gelu", 2, None, True),  # per channel
    (8, 48, False, 3, 24, 96, torch.float32, False, "relu", None, None, False),  # gather
    (8, 64, True, 17, 40, 128, torch.float32, True, "silu", None, "prefill", True),
    (4, 32, False, 17, 40, 64, torch.float16, True, "gelu", None, "prefill", True),
    (4, 64, True, 1, 24, 128, torch.float16, True, None, 2, None, True),
    (8, 32, False, 3, 40, 96, torch.float16, False, "silu", None, None, True),
    (4, 32, False, 3, 24, 64, torch.bfloat16, True, "gelu_tanh", None, None, True),
    (8, 48, True, 17, 40, 96, torch.bfloat16, True, "relu", None, None, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"int{c[0]}g{c[1]}{'s' if c[2] else 'a'}"
                         f"-m{c[3]}n{c[4]}k{c[5]}-{str(c[6])[6:]}-{c[8]}-split{c[9]}-{c[10]}")
def test_qlinear_matches_reference(case):
    bits, group, sym, m, n, k, dtype, has_bias, act, split, tile, one_group = case
    qw, qt = make(bits, group, sym, n, k)
    if not sym:  # RTN's zero points are fractional: the kernel must not round them
        assert not torch.equal(qw.zeros, qw.zeros.round())
    assert qg.pick_config(m, group, k, dtype, tile).one_group == one_group
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    out = poisoned((m, n), dtype)
    y = qg.qlinear(x, qw.qweight, qw.scales, qw.zeros, bias, qt, act, out=out, split_k=split,
                   tile=tile)
    assert y is out and y.dtype == dtype and not torch.isnan(y).any()
    ref = qg.reference_qlinear(x, qw.qweight, qw.scales, qw.zeros, bias, act)
    assert rel_err(y, ref) <= TOL[dtype]


def test_qlinear_leading_dims_and_integer_zeros():
    gen = torch.Generator().manual_seed(2)
    qt = QuantType("int", 4, 32, False, 64)
    qw = quantize_rtn(torch.randn(24, 64, generator=gen), qt, integer_zeros=True)
    x = torch.randn(2, 3, 64, generator=gen)
    y = qg.qlinear(x, qw.qweight, qw.scales, qw.zeros, None, qt, out=poisoned((2, 3, 24),
                                                                               torch.float32))
    assert y.shape == (2, 3, 24)
    assert rel_err(y, qg.reference_qlinear(x, qw.qweight, qw.scales, qw.zeros, None)) <= 1e-4


def test_qlinear_fp8_weight_only():
    qw, qt = make(8, 96, True, 40, 96, scheme="fp8e4m3")
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 96, generator=gen).to(dtype)
        bias = torch.randn(40, generator=gen).to(dtype)
        y = qg.qlinear(x, qw.qweight, qw.scales, None, bias, qt, "gelu",
                       out=poisoned((3, 40), dtype))
        ref = qg.reference_qlinear(x, qw.qweight, qw.scales, None, bias, "gelu")
        assert rel_err(y, ref) <= TOL[dtype]


def test_e4m3_decoding_exact_for_every_finite_code():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # 0x7F / 0xFF are NaN
    w = codes.view(torch.float8_e4m3fn).reshape(-1, 1).repeat(1, 2).contiguous()  # [254, 2]
    qt = QuantType("fp8e4m3", 8, 2, True, 2)
    y = qg.qlinear(torch.tensor([[1.0, 0.0]]), w, torch.ones(w.shape[0], 1), None, None, qt,
                   out=poisoned((1, w.shape[0]), torch.float32))
    assert torch.equal(y[0], w[:, 0].float())


def test_block_choices():
    assert qg.pick_split_k(1, 4096, 4096, 16, 64, 64, torch.device("cpu")) == 1
    assert qg.pick_block_k(128, 4096, 64) == (64, True)
    assert qg.pick_block_k(32, 4096, 64) == (32, True)
    assert qg.pick_block_k(48, 4800, 64) == (qg.GATHER_BLOCK_K, False)
    assert qg.pick_block_k(100, 100, 64) == (64, True)  # per channel: the tail is masked
    assert qg.pick_config(1, 128, 4096, torch.float16).regime == "decode"
    cfg = qg.pick_config(200, 16, 4096, torch.bfloat16)
    assert (cfg.regime, cfg.one_group, cfg.num_stages) == ("prefill", False, qg.GATHER_STAGES)


@pytest.mark.parametrize("act_quant", ["token", "tensor"])
def test_activation_codes_bit_exact(act_quant):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 70, generator=gen) * 3
    x[1] = 0.0  # all-zero row: scale 1, every code the zero point
    x[2] = x[2].abs() + 0.5  # all positive: the range is widened to 0
    x[3] = torch.arange(70) / 69 * 2.55 - 1.275  # ties at .5 after scaling
    x[4, :7] = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, 127.5, -128.5]) * 0.01
    q, sx, zx = qg.quantize_activations(x, act_quant)
    rq, rs, rz = dynamic_quantize_u8(x, act_quant == "token")
    assert torch.equal((q.to(torch.int16) + 128).to(torch.uint8), rq)
    assert torch.equal(sx, rs.reshape(-1).expand(5)) and torch.equal(zx, rz.reshape(-1).expand(5))


# (M, N, K, dtype, act_quant, bias, activation, tile)
W8A8_CASES = [
    (1, 24, 64, torch.float32, "token", True, None, None),
    (3, 40, 96, torch.float32, "tensor", True, "gelu", None),
    (17, 24, 128, torch.float32, "token", False, "silu", None),
    (17, 40, 96, torch.float32, "token", True, "relu", "prefill"),
    (3, 24, 64, torch.float16, "token", True, "gelu_tanh", None),
    (17, 40, 96, torch.bfloat16, "tensor", True, None, None),
]


@pytest.mark.parametrize("case", W8A8_CASES, ids=lambda c: f"m{c[0]}n{c[1]}k{c[2]}-"
                         f"{str(c[3])[6:]}-{c[4]}-{c[6]}-{c[7]}")
def test_qmatmul_matches_reference(case):
    m, n, k, dtype, act_quant, has_bias, act, tile = case
    qw, _ = make(8, k, True, n, k, seed=5)
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
    bias = torch.randn(n, generator=gen) if has_bias else None
    out = poisoned((m, n), dtype)
    y = qg.qmatmul(x, qw.qweight, qw.scales, bias, act_quant, act, out=out, tile=tile)
    assert y is out and not torch.isnan(y).any()
    ref = qg.reference_qmatmul(x, qw.qweight, qw.scales, bias, act_quant, act)
    assert rel_err(y, ref) <= TOL[dtype]


def test_empty_rows():
    qw, qt = make(4, 32, False, 24, 64)
    y = qg.qlinear(torch.empty(0, 64), qw.qweight, qw.scales, qw.zeros, None, qt)
    assert y.shape == (0, 24)
    q8, _ = make(8, 64, True, 24, 64)
    assert qg.qmatmul(torch.empty(2, 0, 64), q8.qweight, q8.scales).shape == (2, 0, 24)


def test_bad_inputs_raise_lowering_error_naming_the_argument():
    qw, qt = make(4, 32, False, 24, 64)
    x = torch.randn(3, 64)
    args = dict(x=x, qweight=qw.qweight, scales=qw.scales, zeros=qw.zeros, bias=None, qtype=qt)

    def bad(match, **over):
        with pytest.raises(LoweringError, match=match):
            qg.qlinear(**{**args, **over})

    bad("qlinear: x", x=torch.randn(3, 32))
    bad("qlinear: x", x=torch.randint(0, 3, (3, 64)))
    bad("qlinear: qweight", qweight=qw.qweight.to(torch.int8))
    bad("qlinear: qweight", qweight=qw.qweight[:, :16])
    bad("qlinear: scales", scales=qw.scales[:, :1])
    bad("qlinear: zeros", zeros=None)
    bad("qlinear: bias", bias=torch.randn(23))
    bad("qlinear: qtype", qtype="int4 g32 asym k64")
    bad("qlinear: activation", activation="tanh")
    bad("qlinear: out", out=torch.empty(3, 24, dtype=torch.float16))
    bad("qlinear: split_k", split_k=0)
    bad("qlinear: tile", tile="huge")
    sym, sqt = make(4, 32, True, 24, 64)
    bad("qlinear: zeros", qweight=sym.qweight, scales=sym.scales, zeros=qw.zeros, qtype=sqt)
    q8, _ = make(8, 64, True, 24, 64)
    with pytest.raises(LoweringError, match="qmatmul: act_quant"):
        qg.qmatmul(x, q8.qweight, q8.scales, act_quant="channel")
    with pytest.raises(LoweringError, match="qmatmul: scales"):
        qg.qmatmul(x, q8.qweight, q8.scales[:3])
    with pytest.raises(LoweringError, match="qmatmul: qweight"):
        qg.qmatmul(torch.randn(3, 32), q8.qweight, q8.scales)
    big = torch.zeros(1, qg.W8A8_MAX_K + 1)
    with pytest.raises(LoweringError, match="qmatmul: x: K="):
        qg.qmatmul(big, torch.zeros(1, big.shape[1], dtype=torch.uint8), torch.ones(1, 1))


def test_bench_runs_on_tiny_shapes():
    r = qg.bench_qlinear("cpu", m=1, n=24, k=64, group=32, bits=4, dtype=torch.float32, reps=1)
    assert r["qlinear_ms"] > 0 and r["torch_linear_dequantized_ms"] > 0
    assert r["qmatmul_w8a8_ms"] > 0 and r["weight_bytes"] > 0


def test_shipped_specs_match_the_kernels():
    import importlib
    import inspect

    names = set()
    for spec in qg.SHIPPED:
        mod, fn = spec.kernel.split(":")
        kernel = getattr(importlib.import_module(mod), fn)
        assert list(spec.signature) == list(inspect.signature(kernel.fn).parameters), spec.name
        assert {a for a, t in spec.signature.items() if t == "constexpr"} == set(spec.constexprs)
        names.add(spec.name)
    assert len(names) == len(qg.SHIPPED)
    # every tile / BLOCK_K / path the wrapper picks is shipped, for every x dtype
    by_name = {s.name: s for s in qg.SHIPPED}
    for dtype in qg.X_DTYPES:
        dt = str(dtype).removeprefix("torch.")
        for m in (1, 17, 200):
            for group, k in ((128, 4096), (32, 4096), (48, 4800), (100, 100)):
                c = qg.pick_config(m, group, k, dtype)
                for bits in (4, 8):
                    name = (f"qlinear[{c.regime} int{bits} bk{c.block_k}"
                            f"{'' if c.one_group else ' gather'} {dt}]")
                    spec = by_name[name]
                    assert (spec.constexprs["BLOCK_M"], spec.constexprs["BLOCK_N"],
                            spec.num_warps, spec.num_stages) == (c.block_m, c.block_n,
                                                                 c.num_warps, c.num_stages)
