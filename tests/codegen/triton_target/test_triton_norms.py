"""RMSNorm / LayerNorm / add_norm Triton kernels vs the IR ops' references (interpreter on CPU).

Shapes are tiny but have tails: hidden 48, 100, 257 (not powers of two), 3-7 rows, several
rows per program and a forced looped variant. Outputs are NaN-poisoned before each run.
"""

import pytest

# env first: it sets TRITON_INTERPRET, which triton reads when it is imported (an earlier
# `import triton` leaves tl.sum & co. compiled-mode functions the interpreter cannot call)
from transfuse.codegen.triton import env

pytest.importorskip("triton", reason="the triton target needs triton (pip install 'triton>=3.6')")

import torch  # noqa: E402

from transfuse.codegen.triton.kernels import norms  # noqa: E402
from transfuse.errors import LoweringError  # noqa: E402

DEV = env.device()
# bf16 is loose: the interpreter truncates fp32 -> bf16 casts (round-to-nearest on a GPU)
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 3e-2}


def _rel(a, b):
    assert not torch.isnan(a).any(), "unwritten (NaN) elements"
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def _data(shape, dtype, e, *, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) + offset).to(dtype).to(DEV)  # a mean to subtract
    r = torch.randn(shape, generator=g).to(dtype).to(DEV)
    w = (torch.rand(e, generator=g) + 0.5).to(dtype).to(DEV)
    b = torch.randn(e, generator=g).to(dtype).to(DEV)
    return x, r, w, b


def _poison(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("shape,max_block", [((5, 48), 8192), ((3, 2, 100), 8192),
                                             ((7, 257), 8192), ((3, 257), 64)])
def test_add_norm_fp32(kind, shape, max_block):
    """Residual add + norm, both outputs, every parameter; 257 with max_block=64 loops."""
    e = shape[-1]
    x, r, w, b = _data(shape, torch.float32, e)
    b = b if kind == "layer" else None
    offset = 1.0 if kind == "rms" else 0.0
    out, s_out = _poison(shape, torch.float32), _poison(shape, torch.float32)
    y, s = norms.add_norm(x, r, w, b, kind=kind, eps=1e-5, offset=offset, out=out,
                          sum_out=s_out, max_block=max_block)
    ry, rs = norms.reference_norm(x, r, w, b, kind=kind, eps=1e-5, offset=offset)
    assert y is out and s is s_out
    assert _rel(y, ry) <= 1e-4 and _rel(s, rs) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_add_norm_half(kind, dtype):
    shape, e = (6, 100), 100
    x, r, w, b = _data(shape, dtype, e, seed=1)
    b = b if kind == "layer" else None
    out, s_out = _poison(shape, dtype), _poison(shape, dtype)
    y, s = norms.add_norm(x, r, w, b, kind=kind, eps=1e-6, out=out, sum_out=s_out)
    ry, rs = norms.reference_norm(x, r, w, b, kind=kind, eps=1e-6)
    assert y.dtype == dtype and s.dtype == dtype
    assert _rel(y, ry) <= TOL[dtype] and _rel(s, rs) <= TOL[dtype]


@pytest.mark.parametrize("offset,upcast", [(0.0, True), (1.0, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm(dtype, offset, upcast):
    """Plain rms_norm, Gemma's (1 + w) offset, upcast either way; a 3-D x."""
    x, _, w, _ = _data((2, 3, 48), dtype, 48, seed=2)
    out = _poison(x.shape, dtype)
    y = norms.rms_norm(x, w, eps=1e-6, offset=offset, upcast=upcast, out=out)
    ref, _ = norms.reference_norm(x, None, w, kind="rms", eps=1e-6, offset=offset, upcast=upcast)
    assert y is out and _rel(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("params", ["none", "weight", "bias", "both"])
def test_layer_norm_params(params):
    """Each optional parameter alone; normalized_ndim=2 folds [4, 25] into E=100."""
    x, _, w, b = _data((3, 4, 25), torch.float32, 100, seed=3)
    w = w.view(4, 25) if params in ("weight", "both") else None
    b = b.view(4, 25) if params in ("bias", "both") else None
    out = _poison(x.shape, torch.float32)
    y = norms.layer_norm(x, w, b, eps=1e-5, normalized_ndim=2, out=out)
    ref, _ = norms.reference_norm(x, None, w, b, kind="layer", eps=1e-5, normalized_ndim=2)
    assert _rel(y, ref) <= 1e-4


def test_rms_norm_no_weight_looped_and_strided_input():
    """No weight, the looped variant, an input with a row stride (a column slice)."""
    big = _data((4, 300), torch.float32, 300, seed=4)[0]
    x = big[:, :257]
    y = norms.rms_norm(x, None, eps=1e-6, out=_poison((4, 257), torch.float32), max_block=128)
    ref, _ = norms.reference_norm(x, None, None, kind="rms", eps=1e-6)
    assert _rel(y, ref) <= 1e-4


def test_add_norm_without_sum_and_mixed_dtypes():
    """write_sum=False writes nothing else; fp16 x + fp32 residual promote to fp32."""
    x, r, w, _ = _data((3, 48), torch.float16, 48, seed=5)
    r = r.float()
    y, s = norms.add_norm(x, r, w, kind="rms", eps=1e-6, write_sum=False)
    ry, _ = norms.reference_norm(x, r, w, kind="rms", eps=1e-6)
    assert s is None and y.dtype == torch.float32 and _rel(y, ry) <= 1e-4


def test_empty_rows():
    x = torch.empty(0, 48, device=DEV)
    assert norms.rms_norm(x).shape == (0, 48)


def test_bad_inputs_name_the_argument():
    x, r, w, b = _data((3, 48), torch.float32, 48)
    cases = [
        (lambda: norms.rms_norm(x.to(torch.int32)), "x"),
        (lambda: norms.rms_norm(x, w[:40]), "weight"),
        (lambda: norms.rms_norm(x, w.double()), "weight"),
        (lambda: norms.add_norm(x, r[:2], w, kind="rms", eps=1e-6), "residual"),
        (lambda: norms.add_norm(x, r, w, b, kind="rms", eps=1e-6), "bias"),
        (lambda: norms.add_norm(x, r, w, kind="batch", eps=1e-6), "kind"),
        (lambda: norms.add_norm(x, r, w, kind="layer", eps=1e-6, offset=1.0), "offset"),
        (lambda: norms.rms_norm(x, w, eps=-1.0), "eps"),
        (lambda: norms.rms_norm(x, w, normalized_ndim=3), "normalized_ndim"),
        (lambda: norms.rms_norm(x, w, out=torch.empty(3, 48, dtype=torch.float16)), "out"),
        (lambda: norms.rms_norm(x, w, out=torch.empty(48, 3).t()), "out"),
        (lambda: norms.add_norm(x, r, w, kind="rms", eps=1e-6, write_sum=False,
                                sum_out=torch.empty_like(x)), "sum_out"),
    ]
    for fn, name in cases:
        with pytest.raises(LoweringError, match=name):
            fn()


def test_choose_config_and_shipped():
    assert norms.choose_config(48) == {"BLOCK_E": 64, "ROWS": 16, "LOOPED": False,
                                       "num_warps": 2}
    assert norms.choose_config(8192)["LOOPED"] is False
    big = norms.choose_config(16384)
    assert big["LOOPED"] and big["BLOCK_E"] == norms.LOOP_BLOCK
    names = [s.name for s in norms.SHIPPED]
    assert len(names) == len(set(names))
    for s in norms.SHIPPED:
        assert list(s.signature)[:6] == ["X", "R", "W", "B", "Y", "S"]
        assert all(s.signature[k] == "constexpr" for k in s.constexprs)


def test_bench_runs_on_tiny_shapes():
    res = norms.bench_norm(DEV, rows=2, hidden=48, dtype=torch.float32, kind="layer")
    assert res["triton_ms"] > 0 and res["torch_ms"] > 0
