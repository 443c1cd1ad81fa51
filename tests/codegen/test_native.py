"""codegen/native: the C kernels (attention, SwiGLU, add + RMSNorm) against torch and fp64
references, their fallbacks, the build and its cache, and their use by the python backend."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import transfuse
from transfuse.codegen import native
from transfuse.codegen.native import ops
from transfuse.codegen.python.cpu_attention import causal_attention
from transfuse.models import get_model

needs_lib = pytest.mark.skipif(native.library() is None,
                               reason=f"native kernels unavailable: {native.status()}")


@pytest.fixture
def fresh_native(monkeypatch):
    """A build state of its own; afterwards the next call loads the library again (from the
    machine's cache: ~1 ms)."""
    native.reset()
    yield
    native.reset()


def _qkv(b, s, h, hkv, d, dtype=torch.float32):
    """q, k, v as the model has them: [B, H, S, D] views of one fused projection output."""
    qkv = torch.randn(b, s, (h + 2 * hkv) * d, dtype=dtype)
    q = qkv[..., :h * d].view(b, s, h, d).transpose(1, 2)
    k = qkv[..., h * d:(h + hkv) * d].view(b, s, hkv, d).transpose(1, 2)
    v = qkv[..., (h + hkv) * d:].view(b, s, hkv, d).transpose(1, 2)
    return q, k, v


def _reference(q, k, v, scale, window):
    s = q.shape[2]
    i = torch.arange(s)
    allowed = i[:, None] >= i[None, :]
    if window:
        allowed &= i[:, None] - i[None, :] < window
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed,
                                          scale=scale, enable_gqa=True)


@needs_lib
@pytest.mark.parametrize("b,s,h,hkv,d", [
    (1, 1, 2, 1, 16), (1, 7, 4, 4, 32), (2, 37, 4, 2, 48), (1, 193, 6, 2, 64),
    (1, 200, 8, 1, 128), (2, 400, 4, 4, 16)])
@pytest.mark.parametrize("window", [None, 1, 5, 64, 1000])
def test_attention_matches_fp64_reference(b, s, h, hkv, d, window):
    q, k, v = _qkv(b, s, h, hkv, d)
    out = ops.attention(q, k, v, None, window)
    assert out is not None and out.shape == (b, h, s, d)
    ref = _reference(q, k, v, 1 / math.sqrt(d), window)
    assert (out.double() - ref).abs().max().item() < 3e-6


@needs_lib
def test_attention_scale_strides_and_batch_broadcast():
    q, k, v = _qkv(1, 50, 4, 2, 32)
    out = ops.attention(q, k, v, 0.3, None)
    assert (out.double() - _reference(q, k, v, 0.3, None)).abs().max().item() < 3e-6
    # contiguous [B, H, S, D] inputs and a batch of 2 that shares k/v storage (stride 0)
    qc = torch.randn(2, 4, 50, 32)
    kc, vc = (x.contiguous().expand(2, -1, -1, -1) for x in (k, v))
    out = ops.attention(qc, kc, vc, None, None)
    assert (out.double() - _reference(qc, kc, vc, None, None)).abs().max().item() < 3e-6
    assert out.transpose(1, 2).is_contiguous()  # [B, S, H, D] storage: the model's next layout


@needs_lib
def test_attention_threads_split_the_work_and_agree(monkeypatch):
    q, k, v = _qkv(2, 300, 6, 3, 64)
    one = ops.attention(q, k, v, None, None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    three = ops.attention(q, k, v, None, None)
    assert torch.equal(one, three)  # units are independent: same bits from any split


@needs_lib
def test_attention_refuses_what_it_does_not_compute():
    q, k, v = _qkv(1, 20, 4, 2, 8)
    assert ops.attention(q, k, v, None, None) is None  # head dim not a multiple of 16
    q, k, v = _qkv(1, 20, 4, 2, 16, dtype=torch.float64)
    assert ops.attention(q, k, v, None, None) is None
    q, k, v = _qkv(1, 20, 4, 2, 16)
    assert ops.attention(q, k[:, :, :10], v[:, :, :10], None, None) is None  # not square
    assert ops.attention(q, k, v, None, 0) is None
    k_cols = k.transpose(2, 3).contiguous().transpose(2, 3)  # same values, D not contiguous
    assert ops.attention(q, k_cols, v, None, None) is None
    qg = q.clone().requires_grad_()
    with torch.enable_grad():
        assert ops.attention(qg, k, v, None, None) is None
    with torch.no_grad():
        assert ops.attention(qg, k, v, None, None) is not None


def test_causal_attention_is_sdpa_with_and_without_native(fresh_native, monkeypatch):
    q, k, v = _qkv(1, 150, 6, 2, 32)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with_native = causal_attention(q, k, v, enable_gqa=True)
    monkeypatch.setenv("TRANSFUSE_NATIVE", "0")
    native.reset()
    without = causal_attention(q, k, v, enable_gqa=True)
    assert native.library() is None
    torch.testing.assert_close(with_native, ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(without, ref, atol=2e-6, rtol=0)


@needs_lib
def test_swiglu_matches_torch_on_layouts_and_extremes():
    g = torch.randn(3, 5, 4096) * 6
    gate, up = g.split([2048, 2048], -1)  # column slices: rows at stride 4096
    torch.testing.assert_close(ops.swiglu(gate, up), F.silu(gate) * up, atol=1e-6, rtol=1e-6)
    x = torch.tensor([-1e4, -100.0, -88.0, -87.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 89.0,
                      1e4, float("inf"), float("-inf"), float("nan")])
    got, want = ops.swiglu(x, torch.ones_like(x)), F.silu(x)
    torch.testing.assert_close(got, want, equal_nan=True, atol=1e-30, rtol=1e-6)
    odd = torch.randn(7, 13)  # widths that are not a multiple of the vector width
    torch.testing.assert_close(ops.swiglu(odd, odd * 2), F.silu(odd) * odd * 2)


@needs_lib
def test_fast_exp_is_within_a_few_ulp():
    x = torch.linspace(-87, 88, 200_001)
    # silu(x) / x = sigmoid(x) = 1 / (1 + exp(-x)): compare to fp64 over the whole range
    got = ops.swiglu(x, torch.ones_like(x)).double()
    want = x.double() * torch.sigmoid(x.double())
    rel = ((got - want).abs() / want.abs().clamp_min(1e-300))[x != 0]
    assert rel.max().item() < 1e-6


@needs_lib
def test_swiglu_falls_back_for_what_it_does_not_take():
    a = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(ops.swiglu(a, a), F.silu(a) * a)
    t = torch.randn(6, 4).t()  # last dim not contiguous
    torch.testing.assert_close(ops.swiglu(t, t), F.silu(t) * t)
    a, b = torch.randn(4, 6), torch.randn(4, 1)  # broadcasting is torch's job
    torch.testing.assert_close(ops.swiglu(a, b), F.silu(a) * b)


@needs_lib
@pytest.mark.parametrize("shape", [(1, 64, 768), (3, 5, 100), (2, 7), (9,)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norms_match_torch(shape, with_weight):
    x, r = torch.randn(shape), torch.randn(shape)
    w = torch.randn(shape[-1]) if with_weight else None
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (shape[-1],), w, 1e-5))
    y, s = ops.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, x + r)
    torch.testing.assert_close(y, F.rms_norm(x + r, (shape[-1],), w, 1e-6))


@needs_lib
def test_rms_norm_falls_back_for_broadcast_and_other_dtypes():
    x, r = torch.randn(4, 8), torch.randn(8)
    y, s = ops.add_rms_norm(x, r, None, 1e-5)
    torch.testing.assert_close(y, F.rms_norm(x + r, (8,), None, 1e-5))
    xd = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(ops.rms_norm(xd, None, 1e-5), F.rms_norm(xd, (8,), None, 1e-5))


def test_turned_off_by_environment(fresh_native, monkeypatch):
    monkeypatch.setenv("TRANSFUSE_NATIVE", "0")
    assert native.library() is None
    assert "TRANSFUSE_NATIVE=0" in native.status()
    x = torch.randn(3, 8)
    torch.testing.assert_close(ops.swiglu(x, x), F.silu(x) * x)


def test_no_compiler_is_reported_not_raised(fresh_native, monkeypatch):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert native.library() is None
    assert "no C compiler" in native.status()


def test_failed_build_names_the_error(fresh_native, monkeypatch, tmp_path):
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    bad = tmp_path / "kernels.c"
    bad.write_text("int tf_abi_version(void) { return 1 }\n")  # missing semicolon
    monkeypatch.setattr(native, "SOURCES", (bad,))
    monkeypatch.setenv("TRANSFUSE_CACHE_DIR", str(tmp_path / "cache"))
    assert native.library() is None
    assert "failed to build kernels.c" in native.status()
    assert not list((tmp_path / "cache" / "native").glob("*.tmp"))  # no half-written files


def test_build_is_cached_per_source(fresh_native, monkeypatch, tmp_path):
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("TRANSFUSE_CACHE_DIR", str(tmp_path))
    assert native.library() is not None, native.status()
    built = list((tmp_path / "native").glob("*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    native.reset()
    assert native.library() is not None
    assert built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    assert str(built[0]) in native.status()


def test_python_backend_uses_the_kernels_and_matches_eager_either_way(fresh_native, monkeypatch):
    model, inputs, dynamic = get_model("llama-tiny", seq=40)
    with torch.inference_mode():
        ref = model(*inputs)
    compiled = transfuse.optimize(model, inputs, dynamic=dynamic, level="O2")
    src = compiled.source
    assert all(f"{fn}(" in src for fn in ("_swiglu", "_add_rms_norm", "_causal_attention",
                                            "_rotary"))
    assert compiled.meta["native_kernels"] == native.status()  # says where they came from
    with torch.inference_mode():
        on = compiled(*inputs)
    monkeypatch.setenv("TRANSFUSE_NATIVE", "0")
    native.reset()
    with torch.inference_mode():
        off = compiled(*inputs)
    assert native.library() is None
    torch.testing.assert_close(on, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(off, ref, atol=1e-5, rtol=1e-4)


def test_other_dtypes_keep_the_torch_expressions():
    model, inputs, dynamic = get_model("llama-tiny", seq=16)
    model = model.to(torch.bfloat16)
    compiled = transfuse.optimize(model, inputs, dynamic=dynamic, level="O2")
    assert not any(f"{fn}(" in compiled.source for fn in ("_swiglu", "_add_rms_norm", "_rotary"))
    assert "F.silu(" in compiled.source


def _rotary_reference(x, cos, sin, interleaved):
    half = x.shape[-1] // 2
    rot = (torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2) if interleaved
           else torch.cat((-x[..., half:], x[..., :half]), dim=-1))
    return x * cos + rot * sin


@needs_lib
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("d", [2, 6, 16, 64, 128])
def test_rotary_matches_torch(interleaved, d):
    qkv = torch.randn(2, 9, 3 * 4 * d)
    q = qkv[..., :4 * d].view(2, 9, 4, d).transpose(1, 2)  # [B, H, S, D] view, rows strided
    cos, sin = torch.randn(9, d), torch.randn(9, d)
    got = ops.rotary(q, cos, sin, interleaved)
    torch.testing.assert_close(got, _rotary_reference(q, cos, sin, interleaved),
                               atol=1e-6, rtol=1e-6)
    # [B, S, H, D] with cos per position [B, S, 1, D]; and a 2-D x
    x = torch.randn(2, 9, 4, d)
    cb, sb = torch.randn(2, 9, 1, d), torch.randn(2, 9, 1, d)
    torch.testing.assert_close(ops.rotary(x, cb, sb, interleaved),
                               _rotary_reference(x, cb, sb, interleaved), atol=1e-6, rtol=1e-6)
    x2 = torch.randn(9, d)
    torch.testing.assert_close(ops.rotary(x2, cos, sin, interleaved),
                               _rotary_reference(x2, cos, sin, interleaved), atol=1e-6, rtol=1e-6)


@needs_lib
def test_rotary_falls_back_for_what_it_does_not_take():
    x = torch.randn(1, 2, 3, 4, 8)  # rank 5
    cos, sin = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    torch.testing.assert_close(ops.rotary(x, cos, sin, False),
                               _rotary_reference(x, cos, sin, False))
    xd = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(ops.rotary(xd, cos[0, :3], sin[0, :3], True),
                               _rotary_reference(xd, cos[0, :3], sin[0, :3], True))
    big = torch.randn(2, 3, 8)  # cos would enlarge x: torch broadcasts, as the IR reference
    x1 = torch.randn(3, 8)
    torch.testing.assert_close(ops.rotary(x1, big, big, False),
                               _rotary_reference(x1, big, big, False))


@pytest.mark.hf
def test_sliding_window_attention_goes_to_the_kernel(fresh_native, monkeypatch):
    from hf_builders import tiny_hf_model

    model = tiny_hf_model("mistral", "sdpa", layers=2, hidden=64, vocab=100, positions=128)
    ids = torch.randint(0, 100, (1, 40))  # longer than the window of 8
    with torch.inference_mode():
        ref = model(ids, use_cache=False).logits
    compiled = transfuse.optimize(model, (ids,), {"use_cache": False}, level="O2")
    assert "window=8" in compiled.source and "_causal_attention(" in compiled.source
    with torch.inference_mode():
        on = compiled(ids, use_cache=False)
    monkeypatch.setenv("TRANSFUSE_NATIVE", "0")
    native.reset()
    with torch.inference_mode():
        off = compiled(ids, use_cache=False)
    for got in (on, off):
        got = got.logits if hasattr(got, "logits") else got[0] if isinstance(got, tuple) else got
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
