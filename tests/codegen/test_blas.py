"""codegen/python/blas.py: the OpenBLAS linear, huge-page results, thread sync, timing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transfuse.codegen.python import blas
from transfuse.codegen.python.blas import (
    blas_unavailable,
    empty_huge,
    gemm_linear,
    is_kmajor,
    kmajor,
    time_gemm,
)

needs_blas = pytest.mark.skipif(blas_unavailable() is not None,
                                reason=f"numpy's OpenBLAS is unavailable: {blas_unavailable()}")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@needs_blas
@pytest.mark.parametrize("use_blas", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(use_blas, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 33, generator=gen)
    w = torch.randn(19, 33, generator=gen)
    b = torch.randn(19, generator=gen) if bias else None
    got = gemm_linear(x, w, b, use_blas)
    assert got.shape == (2, 7, 19) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_blas
def test_non_contiguous_input_and_weight_view():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 40, generator=gen)[:, ::2]  # [8, 20], stride 2
    w = torch.randn(20, 12, generator=gen).t()  # [12, 20], a transposed view
    torch.testing.assert_close(gemm_linear(x, w, None, True), F.linear(x, w), rtol=1e-5,
                               atol=1e-5)


@needs_blas
def test_empty_batch():
    x = torch.randn(0, 5)
    w = torch.randn(3, 5)
    assert gemm_linear(x, w, None, True).shape == (0, 3)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(RuntimeError, match="does not match weight"):
        gemm_linear(torch.randn(2, 5), torch.randn(3, 4), None, True)


def test_other_dtypes_and_autograd_go_to_f_linear():
    x = torch.randn(3, 4, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64)
    assert torch.equal(gemm_linear(x, w, None, True), F.linear(x, w))
    xg = torch.randn(3, 4, requires_grad=True)
    wf = torch.randn(5, 4)
    gemm_linear(xg, wf, None, True).sum().backward()  # still differentiable
    torch.testing.assert_close(xg.grad, wf.sum(0).expand(3, 4))


@needs_blas
def test_openblas_threads_follow_torch(one_thread):
    from threadpoolctl import threadpool_info

    gemm_linear(torch.randn(4, 8), torch.randn(8, 8), None, True)
    openblas = [i for i in threadpool_info() if i["internal_api"] == "openblas"]
    assert openblas and all(i["num_threads"] == 1 for i in openblas)


def test_large_results_are_huge_page_aligned_and_usable():
    rows = blas.HUGE_OUTPUT_BYTES // (4 * 256) + 1
    t = empty_huge((rows, 256))
    assert t.shape == (rows, 256) and t.dtype == torch.float32 and t.is_contiguous()
    if blas.HUGE_PAGES:
        assert t.data_ptr() % (2 << 20) == 0
    t.fill_(1.5)
    tail = t[-1]
    del t  # a view keeps the mapping alive
    assert float(tail.sum()) == 1.5 * 256
    small = empty_huge((4, 4))
    assert small.shape == (4, 4)


@needs_blas
def test_large_linear_result_is_correct(one_thread):
    gen = torch.Generator().manual_seed(2)
    n = blas.HUGE_OUTPUT_BYTES // (4 * 64) + 64
    x = torch.randn(64, 16, generator=gen)
    w = torch.randn(n, 16, generator=gen)
    b = torch.randn(n, generator=gen)
    for use_blas in (False, True):
        torch.testing.assert_close(gemm_linear(x, w, b, use_blas), F.linear(x, w, b),
                                   rtol=1e-5, atol=1e-5)


@needs_blas
@pytest.mark.parametrize("relayout", [True, False])
def test_time_gemm_reports_both(one_thread, relayout):
    ws = [torch.randn(64, 48), torch.randn(64, 48)]
    t = time_gemm(32, ws, None, rounds=2, min_seconds=1e-4, relayout=relayout)
    assert (t.m, t.k, t.n) == (32, 48, 64)
    assert t.torch_s > 0 and t.blas_s > 0
    assert t.gflops("torch") == pytest.approx(t.flops / t.torch_s / 1e9)
    assert all(w.is_contiguous() for w in ws)  # the caller's weights are not relaid


def test_kmajor_keeps_values_and_is_idempotent():
    w = torch.randn(5, 3)
    km = kmajor(w)
    assert torch.equal(km, w) and km.shape == (5, 3) and is_kmajor(km) and not is_kmajor(w)
    assert km.t().is_contiguous()
    assert kmajor(km) is km


@needs_blas
def test_kmajor_weight_gives_the_same_product():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 40, generator=gen)
    w = torch.randn(24, 40, generator=gen)
    b = torch.randn(24, generator=gen)
    torch.testing.assert_close(gemm_linear(x, kmajor(w), b, True), F.linear(x, w, b),
                               rtol=1e-5, atol=1e-5)
