"""SwiGLU / GeGLU / GELU / SiLU Triton kernels vs the IR ops' references (interpreter on CPU).

Tiny shapes with tails: widths 48, 100, 257 and 1100 (two column tiles of 1024), 3-7 rows,
merged [gate | up] tensors, row-strided views. Outputs are NaN-poisoned before each run.
"""

import pytest

# env first: it sets TRITON_INTERPRET, which triton reads when it is imported
from transfuse.codegen.triton import env

pytest.importorskip("triton", reason="the triton target needs triton (pip install 'triton>=3.6')")

import torch  # noqa: E402

from transfuse.codegen.triton.kernels import activations as act  # noqa: E402
from transfuse.errors import LoweringError  # noqa: E402

# the interpreter's exp overflows (to inf, as on a GPU) in sigmoid of very negative inputs
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DEV = env.device()
# bf16 is loose: the interpreter truncates fp32 -> bf16 casts (round-to-nearest on a GPU)
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
APPROX = {"gelu": "none", "gelu_tanh": "tanh"}


def _rel(a, b):
    assert not torch.isnan(a).any(), "unwritten (NaN) elements"
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(shape, generator=g)).to(dtype).to(DEV)


def _gated(name, gate, up=None, out=None):
    if name == "silu":
        return act.swiglu(gate, up, out=out)
    return act.geglu(gate, up, approximate=APPROX[name], out=out)


def _plain(name, x, out=None):
    if name == "silu":
        return act.silu(x, out=out)
    return act.gelu(x, approximate=APPROX[name], out=out)


@pytest.mark.parametrize("name", act.ACTS)
@pytest.mark.parametrize("shape", [(5, 48), (2, 3, 100), (7, 257)])
def test_gated_two_tensors_fp32(name, shape):
    gate, up = _randn(*shape), _randn(*shape, seed=1)
    out = torch.full(shape, float("nan"), device=DEV)
    y = _gated(name, gate, up, out=out)
    assert y is out and _rel(y, act.reference_activation(name, gate, up)) <= 1e-4


@pytest.mark.parametrize("name", act.ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gated_merged_and_plain(name, dtype):
    """A merged [gate | up] [3, 2*1100] (F spans two column tiles) and the ungated op."""
    x = _randn(3, 2 * 1100, dtype=dtype, seed=2)
    y = _gated(name, x, out=torch.full((3, 1100), float("nan"), dtype=dtype, device=DEV))
    assert y.dtype == dtype
    assert _rel(y, act.reference_activation(name, x, merged=True)) <= TOL[dtype]
    p = _plain(name, x[:, :257], out=torch.full((3, 257), float("nan"), dtype=dtype, device=DEV))
    assert _rel(p, act.reference_activation(name, x[:, :257])) <= TOL[dtype]


def test_gelu_accuracy_over_a_range():
    """Elementwise against torch over [-30, 30]: finite, max abs error < 1e-6 (fp32)."""
    x = torch.linspace(-30.0, 30.0, 601, device=DEV)
    for name in ("gelu", "gelu_tanh"):
        y = _plain(name, x)
        assert torch.isfinite(y).all()
        assert (y - act.reference_activation(name, x)).abs().max().item() < 1e-6


def test_mixed_dtypes_and_strided_views_and_scalars():
    """fp16 gate x fp32 up -> fp32; a column slice (row stride); a 0-d x; an empty x."""
    big = _randn(4, 150, dtype=torch.float16, seed=3)
    gate, up = big[:, :100], _randn(4, 100, seed=4)
    y = act.swiglu(gate, up)
    assert y.dtype == torch.float32 and _rel(y, act.reference_activation("silu", gate, up)) <= 1e-4
    s = torch.tensor(0.7, device=DEV)
    assert _rel(act.gelu(s), act.reference_activation("gelu", s)) <= 1e-6
    assert act.silu(torch.empty(0, 8, device=DEV)).shape == (0, 8)


def test_bad_inputs_name_the_argument():
    g, u = _randn(3, 48), _randn(3, 48, seed=1)
    cases = [
        (lambda: act.swiglu(g.to(torch.int32), u), "gate"),
        (lambda: act.swiglu(g, u[:, :40]), "up"),
        (lambda: act.swiglu(g, u.double()), "up"),
        (lambda: act.swiglu(g[:, :47]), "gate"),  # merged with an odd width
        (lambda: act.geglu(g, u, approximate="fast"), "approximate"),
        (lambda: act.gelu(g, approximate="erf"), "approximate"),
        (lambda: act.gelu(g.long()), "x"),
        (lambda: act.silu(g, out=torch.empty(3, 48, dtype=torch.float16)), "out"),
        (lambda: act.silu(g, out=torch.empty(48, 3).t()), "out"),
    ]
    for fn, name in cases:
        with pytest.raises(LoweringError, match=name):
            fn()


def test_shipped_and_bench():
    names = [s.name for s in act.SHIPPED]
    assert len(names) == len(set(names))
    assert act.choose_config(20) == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4}
    res = act.bench_swiglu(DEV, rows=2, width=16, dtype=torch.float32)
    assert res["triton_ms"] > 0
