"""AWQ's two searches (transfuse/passes/quant/awq.py) on synthetic layers: correlated inputs
with a few outlier channels 25x the rest, and two weights sharing that input (like k/v).

Measured: the output error ||X Wᵀ - (X/s) Q(W·s)ᵀ|| against round-to-nearest (RTN) on the
sample rows and on held-out rows. α = 0 is RTN, so the scale search is never worse; on
outlier data it wins clearly. Observed with these seeds (int4, K=256, g32/g64, asym/sym): scales/RTN
0.53-0.62 (α 0.25-0.4), scales then clip/RTN 0.44-0.56, the same on held-out rows; the clip
search alone on heavy-tailed (Student t) weights 0.53-0.61.
"""

from __future__ import annotations

import pytest
import torch

from transfuse.errors import PassError
from transfuse.ir.quant import fake_quantize, quant_params
from transfuse.ir.types import QuantType
from transfuse.passes.quant.awq import awq_search_clip, awq_search_scales, fake_quantize_int

K, R = 256, 192


def layer(seed: int = 0, outliers: int = 6, rows: int = R, heavy_tails: bool = False):
    """(x [rows, K], [w0 [64, K], w1 [32, K]], x_test [rows, K]); inputs mixed from 16 latent
    factors plus noise with ``outliers`` channels x25; Student-t weights when
    ``heavy_tails`` (a few large weights per group: what clipping is for)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, K, generator=g) / 4.0
    idx = torch.randperm(K, generator=g)[:outliers]

    def rows_of(n):
        x = torch.randn(n, 16, generator=g) @ mix + 0.5 * torch.randn(n, K, generator=g)
        x[:, idx] *= 25.0
        return x

    def weight(n):
        if not heavy_tails:
            return 0.02 * torch.randn(n, K, generator=g)
        z = torch.randn(n, K, generator=g)
        chi = torch.randn(n, K, 3, generator=g).pow(2).mean(-1)  # chi² with 3 dof / 3
        return 0.02 * z / chi.sqrt()  # Student t, 3 degrees of freedom

    return rows_of(rows), [weight(64), weight(32)], rows_of(rows)


def out_error(x, w, approx) -> float:
    return float((x @ w.t() - x @ approx.t()).norm())


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group", [32, 64])
def test_scale_search_beats_rtn_on_outlier_inputs(group, symmetric):
    x, ws, x_test = layer()
    qtype = QuantType("int", 4, group, symmetric, K)
    s, info = awq_search_scales(ws, x, qtype)
    w = torch.cat(ws)
    awq = (w * s)
    for rows in (x, x_test):
        rtn = out_error(rows, w, fake_quantize(w, qtype))
        scaled = out_error(rows / s, awq, fake_quantize(awq, qtype))
        assert scaled < 0.75 * rtn, (scaled / rtn, info["alpha"])
    assert 0 < info["alpha"] < 1 and info["error"] < info["error_rtn"]
    assert info["errors"][0] == info["error_rtn"] and len(info["errors"]) == 20
    assert min(info["errors"]) == info["error"]
    # the reported errors are the mean squared output errors on x
    rtn_mse = out_error(x, w, fake_quantize(w, qtype)) ** 2 / (R * w.shape[0])
    assert info["error_rtn"] == pytest.approx(rtn_mse, rel=1e-4)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_scale_search_is_never_worse_than_rtn(seed):
    """Inputs without outliers: little to gain, but never a loss (α = 0 is RTN)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, K, generator=g)
    w = 0.02 * torch.randn(48, K, generator=g)
    qtype = QuantType("int", 4, 64, False, K)
    s, info = awq_search_scales([w], x, qtype)
    rtn = out_error(x, w, fake_quantize(w, qtype))
    assert out_error(x / s, w * s, fake_quantize(w * s, qtype)) <= rtn * (1 + 1e-6)
    assert info["error"] <= info["error_rtn"]


def test_scales_are_normalised_and_grid_one_is_rtn():
    x, ws, _ = layer(seed=4)
    qtype = QuantType("int", 4, 64, False, K)
    s, info = awq_search_scales(ws, x, qtype)
    assert s.shape == (K,) and s.dtype == torch.float32 and bool((s > 0).all())
    assert float((s.max() * s.min()).sqrt()) == pytest.approx(1.0, rel=1e-5)
    # larger mean|x| -> larger scale (α > 0): the outlier channels get the biggest scales
    top = x.abs().mean(0).topk(6).indices
    assert set(s.topk(6).indices.tolist()) == set(top.tolist())
    s1, info1 = awq_search_scales(ws, x, qtype, grid=1)
    assert torch.equal(s1, torch.ones(K)) and info1["alpha"] == 0.0
    assert info1["error"] == info1["error_rtn"]


@pytest.mark.parametrize("rows", [K, 2 * K], ids=["rows", "gram"])
def test_reported_errors_are_the_output_errors(rows):
    """Up to K rows the error is measured on the rows, beyond through XᵀX: both report the
    mean squared output error of RTN and of the chosen scales."""
    x, ws, _ = layer(seed=5, rows=rows)
    qtype = QuantType("int", 4, 32, True, K)
    s, info = awq_search_scales(ws, x, qtype)
    w = torch.cat(ws)
    size = rows * w.shape[0]
    assert info["error_rtn"] == pytest.approx(
        out_error(x, w, fake_quantize(w, qtype)) ** 2 / size, rel=1e-3)
    assert info["error"] == pytest.approx(
        out_error(x / s, w * s, fake_quantize(w * s, qtype)) ** 2 / size, rel=1e-3)
    assert info["error"] < 0.5 * info["error_rtn"]


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_clip_search_ratios_and_gain(symmetric):
    x, ws, x_test = layer(seed=6, heavy_tails=True)
    w = ws[0]
    qtype = QuantType("int", 4, 64, symmetric, K)
    clip = awq_search_clip(w, x, qtype)
    assert clip.shape == (64, K // 64) and clip.dtype == torch.float32
    assert bool(((clip >= 0.5) & (clip <= 1.0)).all())
    steps = (1.0 - clip) * 20  # on the grid 1, 0.95, ..., 0.5
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    assert bool((clip < 1).any())  # heavy tails: some groups do clip
    quant_params(w, qtype, clip=clip)  # usable as is
    plain = out_error(x, w, fake_quantize(w, qtype))
    clipped = out_error(x, w, fake_quantize(w, qtype, clip=clip))
    assert clipped < 0.95 * plain
    assert out_error(x_test, w, fake_quantize(w, qtype, clip=clip)) < \
        out_error(x_test, w, fake_quantize(w, qtype))


def test_clip_search_never_worse_per_group_and_max_shrink():
    """Each (channel, group) keeps ratio 1 unless another is strictly better for its own
    share of the output, so every group's error is at most RTN's."""
    x, ws, _ = layer(seed=7)
    w, qtype = ws[1], QuantType("int", 4, 32, False, K)
    clip = awq_search_clip(w, x, qtype, grid=10, max_shrink=0.3)
    assert bool(((clip >= 0.7 - 1e-6) & (clip <= 1.0)).all())
    xg = x.reshape(R, K // 32, 32)

    def group_errors(approx):
        d = (w - approx).reshape(w.shape[0], K // 32, 32)
        return torch.einsum("rgi,ngi->rng", xg, d).pow(2).sum(0)  # [N, G]

    assert bool((group_errors(fake_quantize(w, qtype, clip=clip))
                 <= group_errors(fake_quantize(w, qtype)) * (1 + 1e-4) + 1e-9).all())
    assert torch.equal(awq_search_clip(w, x, qtype, max_shrink=0.0), torch.ones_like(clip))


@pytest.mark.parametrize(("bits", "group", "symmetric"),
                         [(4, 32, False), (4, 64, True), (8, K, True), (8, 64, False)])
def test_the_searches_fake_quantization_is_the_ir_one(bits, group, symmetric):
    """The searches' in-place fake quantization must give the values of
    transfuse.ir.quant.fake_quantize (the storage the caller writes), with or without clip."""
    _, ws, _ = layer(seed=9, heavy_tails=True)
    w, qtype = ws[0], QuantType("int", bits, group, symmetric, K)
    clip = torch.rand(w.shape[0], K // group, generator=torch.Generator().manual_seed(0)) / 2 + 0.5
    for c in (1.0, 0.8, clip):
        assert torch.equal(fake_quantize_int(w, qtype, clip=c), fake_quantize(w, qtype, clip=c))


def _qt(k=K):
    return QuantType("int", 4, 64, False, k)


@pytest.mark.parametrize(("call", "message"), [
    (lambda x, w: awq_search_scales([w], x[0], _qt()), r"sample rows \[R, K\] must be a 2-D"),
    (lambda x, w: awq_search_scales([w], x.long(), _qt()), r"got int64\[192, 256\]"),
    (lambda x, w: awq_search_scales([w, w[:, :128]], x, _qt()),
     r"weight 1 must be a 2-D float tensor \[N, 256\].*float32\[64, 128\]"),
    (lambda x, w: awq_search_scales([], x, _qt()), r"non-empty list of weights"),
    (lambda x, w: awq_search_scales(w, x, _qt()), r"non-empty list of weights.*got float32\[64, 256\]"),
    (lambda x, w: awq_search_scales([w], x, _qt(128)), r"is for K=128, the sample rows have K=256"),
    (lambda x, w: awq_search_scales([w], x, QuantType("fp8e4m3", 8, K, True, K)), r"'int'"),
    (lambda x, w: awq_search_scales([w], x, _qt(), grid=0), r"grid must be a positive int"),
    (lambda x, w: awq_search_scales([w], x * float("nan"), _qt()), r"NaN or infinite"),
    (lambda x, w: awq_search_clip(w, x, _qt(), max_shrink=1.0), r"max_shrink must be in \[0, 1\)"),
    (lambda x, w: awq_search_clip(w.t(), x, _qt()), r"weight 0 must be .*\[N, 256\]"),
    (lambda x, w: awq_search_clip(w, x[:0], _qt()), r"no sample rows"),
], ids=["x-1d", "x-int", "k-mismatch", "empty", "not-a-list", "qtype-k", "fp8", "grid-0",
        "nan", "max-shrink", "clip-shape", "no-rows"])
def test_bad_inputs_raise_pass_error_naming_them(call, message):
    x, ws, _ = layer(seed=8)
    with pytest.raises(PassError, match=message):
        call(x, ws[0])
