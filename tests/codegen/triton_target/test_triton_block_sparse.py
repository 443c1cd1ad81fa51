"""Block-sparse attention (codegen/triton/kernels/block_sparse_attention.py) against the IR
reference with the block mask as a bias; dropped blocks are never loaded (NaN-poisoned K/V
there do not reach the output). Interpreter-sized shapes, 16x16 tiles."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("triton", reason="the triton target needs triton (pip install 'triton>=3.6')")

import torch  # noqa: E402

from transfuse.codegen.triton import env  # noqa: E402
from transfuse.codegen.triton.kernels import block_sparse_attention as bs  # noqa: E402
from transfuse.codegen.triton.kernels import flash_attention as fa  # noqa: E402
from transfuse.errors import LoweringError  # noqa: E402
from transfuse.passes.convert.sparse import BlockPattern, keep_mask  # noqa: E402

SMALL = fa.AttnConfig(16, 16, 4, 1)
B, H = 2, 4


def inputs(sq, sk, d, hkv=2, dtype=torch.float32, layout="bhsd", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(h, s):
        shape = (B, h, s, d) if layout == "bhsd" else (B, s, h, d)
        return torch.randn(*shape, generator=g).to(env.device(), dtype)

    return rnd(H, sq), rnd(hkv, sk), rnd(hkv, sk)


def random_mask(shape, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) > 0.4).to(env.device())


def rel_err(out, ref):
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


def check(q, k, v, mask, bm, bn, tol=1e-4, config=SMALL, **kw):
    out = bs.block_sparse_attention(q, k, v, mask, bm, bn, config=config,
                                    out=torch.full_like(q, float("nan")), **kw)
    ref = bs.reference_block_sparse_attention(q, k, v, mask, bm, bn, **kw)
    assert not out.isnan().any(), "unwritten (NaN) output elements"
    assert rel_err(out, ref) <= tol, f"rel err {rel_err(out, ref):.2e} > {tol}"
    return out


FEATURES = {
    "dense": {},
    "causal": {"causal": True},
    "causal-window": {"causal": True, "window": 11},
    "bias": {"bias": "bias"},
    "the-rest": {"kv_lens": torch.tensor([30, 17]), "softcap": 2.0, "scale": 0.5,
                 "alibi": [0.4, 0.3, 0.2, 0.1], "key_mask": "key_mask"},
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_features_fp32(feature):
    """Sq=37 < Sk=45 (tails), GQA 4:2, D=24, a random per-batch mask of 16x16 blocks."""
    q, k, v = inputs(37, 45, 24)
    kw = dict(FEATURES[feature])
    g = torch.Generator().manual_seed(6)
    if kw.get("bias") == "bias":
        kw["bias"] = torch.randn(1, H, 37, 45, generator=g)
    if kw.get("key_mask") == "key_mask":
        kw["key_mask"] = torch.rand(B, 45, generator=g) > 0.3
    check(q, k, v, random_mask((B, 1, 3, 3)), 16, 16, **kw)


def test_larger_blocks_2d_mask_bshd_mqa():
    """32x48 mask blocks over 16x16 tiles, one 2-D mask for every batch and head, bshd, MQA."""
    q, k, v = inputs(45, 45, 16, hkv=1, layout="bshd")
    check(q, k, v, random_mask((2, 1), seed=7), 32, 48, causal=True, layout="bshd")


def test_half_dtypes():
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        q, k, v = inputs(21, 33, 16, dtype=dtype)
        check(q, k, v, random_mask((1, H, 2, 3)), 16, 16, tol=tol, causal=True)


def test_dropped_blocks_are_never_loaded():
    """NaN in the keys/values of a dropped block stays out of the output; the kernel visits
    exactly the kept tiles (those causal does not rule out)."""
    q, k, v = inputs(40, 40, 16, hkv=H)
    mask = torch.ones(B, H, 3, 3, dtype=torch.bool)
    mask[:, :, :, 1] = False  # key block 1 (keys 16..31) dropped everywhere
    k[:, :, 16:32] = float("nan")
    v[:, :, 16:32] = float("nan")
    visits = torch.zeros(B * H * 3, dtype=torch.int32)
    out = bs.block_sparse_attention(q, k, v, mask, 16, 16, causal=True, config=SMALL,
                                    visits=visits)
    assert not out.isnan().any()
    assert visits.view(B * H, 3).tolist() == [[1, 1, 2]] * (B * H)
    k[:, :, 16:32] = 0.0
    v[:, :, 16:32] = 0.0
    ref = bs.reference_block_sparse_attention(q, k, v, mask, 16, 16, causal=True)
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("causal,window", [(True, None), (True, 7), (False, 20)])
def test_full_mask_visits_what_flash_visits(causal, window):
    """With every block kept, the tile lists pruned by causal / window in torch hold the same
    tiles as flash attention's per-tile loop bounds (and both match the reference)."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 1, s, 16, generator=g) for s in (70, 90, 90))
    qt = math.ceil(70 / 16)
    mask = torch.ones(1, 1, qt, math.ceil(90 / 16), dtype=torch.bool)
    v_sparse, v_flash = (torch.zeros(qt, dtype=torch.int32) for _ in range(2))
    a = bs.block_sparse_attention(q, k, v, mask, 16, 16, causal=causal, window=window,
                                  config=SMALL, visits=v_sparse)
    f = fa.flash_attention(q, k, v, causal=causal, window=window, config=SMALL,
                           visits=v_flash)
    assert v_sparse.tolist() == v_flash.tolist()
    assert rel_err(a, f) <= 1e-5


def test_the_ir_block_pattern():
    """``sparse_attention="block:16,local:1,global:1"`` as the IR builds it (a 0/-inf bias):
    the kernel with local_global_block_mask and causal alone, or with the bias and
    block_mask_from_bias of it, matches the reference with the IR's mask."""
    sq = sk = 48
    q, k, v = inputs(sq, sk, 16)
    pattern = BlockPattern(16, 1, 1)
    keep = keep_mask(pattern, sq, sk)
    ir_bias = torch.zeros(sq, sk).masked_fill(~keep, float("-inf"))
    ref = fa.reference_attention(q, k, v, causal=True, bias=ir_bias)
    mask = bs.local_global_block_mask(sq, sk, 16, 1, 1)
    assert mask.sum() < mask.numel()  # something is skipped
    out = bs.block_sparse_attention(q, k, v, mask, 16, 16, causal=True, config=SMALL)
    assert rel_err(out, ref) <= 1e-4
    from_bias = bs.block_mask_from_bias(ir_bias, 16, 16)
    assert torch.equal(from_bias, mask & torch.ones(3, 3, dtype=torch.bool).tril())
    out = bs.block_sparse_attention(q, k, v, from_bias, 16, 16, causal=True, bias=ir_bias,
                                    config=SMALL)
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("case,name", [("block_m", "block_m"), ("shape", "block_mask"),
                                       ("float", "block_mask"), ("tiles", "config")])
def test_bad_inputs_name_the_argument(case, name):
    q, k, v = inputs(20, 20, 16)
    mask, bm, bn, cfg = torch.ones(2, 2, dtype=torch.bool), 16, 16, None
    if case == "block_m":
        bm = 24
    elif case == "shape":
        mask = torch.ones(3, 2, dtype=torch.bool)
    elif case == "float":
        mask = torch.ones(2, 2)
    elif case == "tiles":
        cfg = fa.AttnConfig(32, 16, 4, 1)
    with pytest.raises(LoweringError, match=name):
        bs.block_sparse_attention(q, k, v, mask, bm, bn, config=cfg)


def test_bench_runs_on_tiny_shapes():
    r = bs.bench_block_sparse_attention(env.device(), batch=1, heads=1, seq=48, head_dim=16,
                                        dtype=torch.float32, block=16, local=1, global_=1)
    assert r["triton_ms"] > 0 and 0 < r["kept_causal_pairs"] < 1


def test_shipped_specs_match_the_kernel():
    params = fa.kernel_params(bs.block_sparse_attention_fwd)
    assert len(bs.SHIPPED) >= 27
    for spec in bs.SHIPPED:
        assert list(spec.signature) == list(params)
        assert {n for n, c in params.items() if c} == set(spec.constexprs)
