"""The dense GEMM template with its fused epilogue (kernels/gemm.py) under the interpreter:
both weight layouts, every epilogue part, every row regime, tails in M, N and K, poisoned
outputs, and the wrapper's errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the triton target needs triton (pip install 'triton>=3.6')")

from transfuse.codegen.triton.kernels import gemm  # noqa: E402
from transfuse.errors import LoweringError  # noqa: E402


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _data(m, n, k, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    if layout == "kn":
        w = w.t().contiguous()
    b = torch.randn(n, generator=g).to(dtype)
    r = torch.randn(m, n, generator=g).to(dtype)
    return x, w, b, r


@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("act,bias,res", [(None, False, False), ("gelu", True, False),
                                          ("silu", False, True), ("gelu_tanh", True, True),
                                          ("relu", True, True)])
def test_fp32_epilogues_and_layouts(layout, act, bias, res):
    m, n, k = 19, 70, 45  # tails in every dim
    x, w, b, r = _data(m, n, k, torch.float32, layout)
    out = torch.full((m, n), float("nan"))
    y = gemm.linear(x, w, b if bias else None, act, r if res else None, layout=layout, out=out)
    want = gemm.reference_linear(x, w, b if bias else None, act, r if res else None, layout)
    assert y is out and torch.isfinite(y).all()
    assert _rel(y, want) <= 1e-4


@pytest.mark.parametrize("tile", ["decode", "small", "prefill"])
def test_every_regime_and_leading_dims(tile):
    x, w, b, r = _data(6, 40, 33, torch.float32, "nk", seed=1)
    x3, r3 = x.reshape(2, 3, 33), r.reshape(2, 3, 40)
    y = gemm.linear(x3, w, b, "gelu", r3, tile=tile)
    assert y.shape == (2, 3, 40)
    assert _rel(y, gemm.reference_linear(x3, w, b, "gelu", r3)) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    x, w, b, r = _data(9, 48, 40, dtype, "nk", seed=2)
    y = gemm.linear(x, w, b, "gelu", r)
    want = gemm.reference_linear(x, w, b, "gelu", r)
    assert y.dtype == dtype and _rel(y, want) <= 2e-2


def test_bench_entry_runs_at_tiny_shapes():
    out = gemm.bench_linear("cpu", m=4, n=32, k=32, dtype=torch.float32)
    assert out["template_ms"] > 0 and out["cublas_unfused_ms"] > 0


def test_shipped_covers_every_regime_and_dtype():
    names = {s.name for s in gemm.SHIPPED}
    assert len(names) == 3 * len(gemm.DTYPES)


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.zeros(2, 3, dtype=torch.int32)), "x must be"),
    (dict(w=torch.zeros(4, 5)), "K=3"),
    (dict(bias=torch.zeros(5)), "bias must be"),
    (dict(residual=torch.zeros(2, 5)), "residual must be"),
    (dict(activation="tanh"), "activation must be"),
    (dict(layout="kk"), "layout must be"),
    (dict(out=torch.zeros(2, 4).t()), "out must be"),
])
def test_bad_arguments_name_what_and_where(kwargs, match):
    args = dict(x=torch.zeros(2, 3), w=torch.zeros(4, 3))
    args.update(kwargs)
    with pytest.raises(LoweringError, match=match):
        gemm.linear(**args)
