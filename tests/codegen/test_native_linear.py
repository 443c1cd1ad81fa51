"""codegen/native gemm.c: the small-M linear against F.linear and fp64, its batch invariance,
thread split and refusals; the python backend's ``_small_linear`` helper and its fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import transfuse
from transfuse.codegen import native
from transfuse.codegen.native import ops
from transfuse.codegen.python import small_linear as sl
from transfuse.models import get_model

needs_lib = pytest.mark.skipif(native.library() is None,
                               reason=f"native kernels unavailable: {native.status()}")


@pytest.fixture
def fresh_native():
    native.reset()
    yield
    native.reset()


def _close_to_fp64(out, x, w, b):
    """Within fp32 rounding of the fp64 product: error bounded by K * eps * sum |x w|."""
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    mag = F.linear(x.double().abs(), w.double().abs(),
                   None if b is None else b.double().abs())
    k = x.shape[-1]
    bound = (k + 2) * 2.0 ** -24 * mag + 1e-30
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"max err {err.max().item()} vs bound {bound.max().item()}"


@needs_lib
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 70])
@pytest.mark.parametrize("k,n", [(1, 1), (15, 3), (16, 4), (17, 5), (64, 9), (100, 130),
                                 (513, 7), (1030, 66), (768, 257)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kmajor", [False, True])
def test_matches_linear_and_fp64(m, k, n, bias, kmajor):
    """Both kernels: the weight [N, K] with contiguous rows (tf_linear_f32), or K-major, the
    transposed view of a [K, N] (tf_linear_kn_f32)."""
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(k, n, generator=g).t() if kmajor else torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    out = ops.linear(x, w, b)
    assert out is not None and out.shape == (m, n) and out.is_contiguous()
    _close_to_fp64(out, x, w, b)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-4, atol=1e-4 * k ** 0.5)


@needs_lib
def test_strided_rows_leading_dims_and_weight_row_stride():
    x = torch.randn(2, 3, 80)[..., 5:69]              # rows at stride 80, 64 contiguous
    wbig = torch.randn(40, 100)
    w = wbig[:, 10:74]                                # weight rows at stride 100
    b = torch.randn(40)
    out = ops.linear(x, w, b)
    assert out.shape == (2, 3, 40)
    _close_to_fp64(out, x, w, b)
    one = ops.linear(torch.randn(64), w, None)         # a 1-D input, as F.linear takes it
    assert one.shape == (40,)
    xt = torch.randn(64, 6).t()                        # columns: not rows of contiguous elements
    assert ops.linear(xt, w, b) is None


@needs_lib
@pytest.mark.parametrize("k,n", [(768, 300), (77, 50), (3072, 20), (130, 200)])
@pytest.mark.parametrize("kmajor", [False, True])
def test_batch_invariant_bitwise(k, n, kmajor):
    """Row m of the result is the same bits computed alone, among any rows, at any offset,
    with any number of threads."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(40, k, generator=g) * torch.logspace(-3, 3, k)   # cancellation-prone
    w = torch.randn(k, n, generator=g).t() if kmajor else torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    full = ops.linear(x, w, b)
    for i in range(40):
        assert torch.equal(ops.linear(x[i:i + 1], w, b), full[i:i + 1])
    for lo, hi in ((3, 4), (5, 12), (0, 17), (20, 40), (1, 40)):
        assert torch.equal(ops.linear(x[lo:hi], w, b), full[lo:hi])
    # a different N split (a column slice of the weight) leaves the columns unchanged
    assert torch.equal(ops.linear(x, w[7:], b[7:]), full[:, 7:])


@needs_lib
@pytest.mark.parametrize("kmajor", [False, True])
def test_thread_split_agrees_bitwise(monkeypatch, kmajor):
    x, b = torch.randn(9, 200), torch.randn(1001)
    w = torch.randn(200, 1001).t() if kmajor else torch.randn(1001, 200)
    one = ops.linear(x, w, b)
    for threads in (2, 3, 7):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        assert torch.equal(ops.linear(x, w, b), one)


@needs_lib
def test_refuses_what_it_does_not_compute():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    assert ops.linear(x.double(), w.double()) is None
    assert ops.linear(x, torch.randn(8, 10)[:, ::2].t()) is None  # neither layout
    assert ops.linear(x, w, torch.randn(10)[::2]) is None        # strided bias
    assert ops.linear(x, w, torch.randn(4)) is None              # wrong bias size
    assert ops.linear(torch.randn(3, 7), w) is None               # K mismatch
    assert ops.linear(torch.randn(0, 8), w) is None               # no rows
    xg = torch.randn(3, 8, requires_grad=True)
    assert ops.linear(xg, w) is None                              # autograd wants its graph


def test_small_linear_dispatch(monkeypatch):
    calls = []
    real = ops.linear
    monkeypatch.setattr(sl.native_ops, "linear",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    w, b = torch.randn(64, 32), torch.randn(64)
    for m in (1, sl.NATIVE_MIN_ROWS, sl.NATIVE_MAX_ROWS, sl.NATIVE_MAX_ROWS + 1, 512):
        x = torch.randn(m, 32)
        torch.testing.assert_close(sl.small_linear(x, w, b), F.linear(x, w, b),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sl.small_linear(x, w, b, "wide"), F.linear(x, w, b),
                                   rtol=1e-5, atol=1e-5)
    # the kernel is asked only from NATIVE_MIN_ROWS to NATIVE_MAX_ROWS rows: one row stays on
    # torch's GEMV, a prefill on the GEMM
    assert sorted({s[0] for s in calls}) == [sl.NATIVE_MIN_ROWS, sl.NATIVE_MAX_ROWS]
    # what the kernel refuses goes to F.linear with the same meaning
    xd, wd = torch.randn(2, 32, dtype=torch.float64), w.double()
    assert sl.small_linear(xd, wd).dtype == torch.float64


def test_small_matmul_dispatch():
    w = torch.randn(32, 48)                                       # [K, N], as Conv1D keeps it
    for m in (1, 5, sl.NATIVE_MAX_ROWS + 3):
        x = torch.randn(2, m, 32)
        torch.testing.assert_close(sl.small_matmul(x, w), torch.matmul(x, w),
                                   rtol=1e-5, atol=1e-5)
    assert sl.small_matmul(torch.randn(32), w).shape == (48,)
    # a 3-D second operand is a batched matmul, not a weight: torch's
    a, bm = torch.randn(2, 3, 32), torch.randn(2, 32, 5)
    assert torch.equal(sl.small_matmul(a, bm), torch.matmul(a, bm))


@needs_lib
def test_hf_gpt2_conv1d_matmuls_use_it(fresh_native, monkeypatch):
    """HF GPT-2's Conv1D layers are matmuls by [K, N] weights: a generation step calls
    ``_small_matmul`` for them and generates HF's greedy tokens with the kernel on and off."""
    from hf_builders import tiny_hf_model

    model = tiny_hf_model("gpt2", "sdpa", layers=2, hidden=32, vocab=96, positions=64)
    gen = transfuse.optimize(model, (torch.randint(0, 96, (1, 8)),),
                             generation={"max_seq_len": 32, "max_batch": 2})
    assert gen.source.count("_small_matmul(") == 8  # qkv, o, fc, proj per layer
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=6, pad_token_id=0)
    on = gen.generate(ids, max_new_tokens=6, eos_token_id=None)
    monkeypatch.setenv("TRANSFUSE_NATIVE", "0")
    native.reset()
    off = gen.generate(ids, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(torch.as_tensor(on), ref) and torch.equal(torch.as_tensor(off), ref)


def test_small_linear_without_native(fresh_native, monkeypatch):
    monkeypatch.setenv("TRANSFUSE_NATIVE", "0")
    native.reset()
    x, w, b = torch.randn(4, 48), torch.randn(20, 48), torch.randn(20)
    assert ops.linear(x, w, b) is None
    assert torch.equal(sl.small_linear(x, w, b), F.linear(x, w, b))


@needs_lib
def test_generation_step_uses_it_and_matches_eager(fresh_native, monkeypatch):
    """A generation graph's linears (rows = tokens per step, dynamic) go through
    ``_small_linear``, fused activations included; a prefill of many rows stays on MKL;
    generate() gives HF's greedy tokens with the kernel on and off."""
    model, _, _ = get_model("gpt2-tiny", seq=8)
    gen = transfuse.optimize(model, (torch.ones(1, 8, dtype=torch.long),),
                             generation={"max_seq_len": 64, "max_batch": 2})
    assert "_small_linear(" in gen.source
    assert "F.gelu(_small_linear(" in gen.source  # the fused activation around it
    ids = torch.randint(0, 100, (2, 12))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False) if hasattr(
        model, "generate") else None
    on = gen.generate(ids, max_new_tokens=6, eos_token_id=None)
    monkeypatch.setenv("TRANSFUSE_NATIVE", "0")
    native.reset()
    off = gen.generate(ids, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(torch.as_tensor(on), torch.as_tensor(off))
    if ref is not None:
        assert torch.equal(torch.as_tensor(on), ref)


def test_static_large_rows_keep_f_linear():
    """A graph with a static row count above NATIVE_MAX_ROWS emits F.linear as before."""
    model, inputs, _ = get_model("gpt2-tiny", seq=48)
    compiled = transfuse.optimize(model, inputs, level="O2", options={"gemm": "torch"})
    assert "_small_linear(" not in compiled.source and "F.linear(" in compiled.source
    small = transfuse.optimize(*get_model("gpt2-tiny", seq=4)[:2], level="O2",
                               options={"gemm": "torch"})
    assert "_small_linear(" in small.source
    with torch.inference_mode():
        m2, i2, _ = get_model("gpt2-tiny", seq=4)
        torch.testing.assert_close(small(*i2), m2(*i2), atol=1e-5, rtol=1e-4)
