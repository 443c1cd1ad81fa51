"""Flash attention forward (codegen/triton/kernels/flash_attention.py) against the IR reference.

Runs through Triton's interpreter on CPU without a GPU: tiny shapes (tails in Sq, Sk and the
head dim, GQA/MQA), 16x16 tiles where a test needs several tiles, outputs poisoned with NaN.
"""

from __future__ import annotations

import math
import warnings

import pytest

pytest.importorskip("triton", reason="the triton target needs triton (pip install 'triton>=3.6')")

import torch  # noqa: E402

from transfuse.codegen.triton import env  # noqa: E402
from transfuse.codegen.triton.kernels import flash_attention as fa  # noqa: E402
from transfuse.errors import LoweringError  # noqa: E402
from transfuse.ir.opdefs.nn import attention_mask  # noqa: E402

SMALL = fa.AttnConfig(16, 16, 4, 1)  # several tiles out of tiny shapes
B, H = 2, 4


def inputs(sq, sk, d, hkv=2, dv=None, dtype=torch.float32, layout="bhsd", seed=0):
    g = torch.Generator().manual_seed(seed)
    dv = dv or d

    def rnd(h, s, dd):
        shape = (B, h, s, dd) if layout == "bhsd" else (B, s, h, dd)
        return torch.randn(*shape, generator=g).to(env.device(), dtype)

    return rnd(H, sq, d), rnd(hkv, sk, d), rnd(hkv, sk, dv)


def poisoned(q, v, layout="bhsd"):
    shape = list(q.shape)
    shape[-1] = v.shape[-1]
    return torch.full(shape, float("nan"), dtype=q.dtype, device=q.device)


def rel_err(out, ref):
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


def check(q, k, v, tol=1e-4, config=SMALL, **kw):
    out = fa.flash_attention(q, k, v, out=poisoned(q, v), config=config, **kw)
    ref = fa.reference_attention(q, k, v, **kw)
    assert not out.isnan().any(), "unwritten (NaN) output elements"
    assert rel_err(out, ref) <= tol, f"rel err {rel_err(out, ref):.2e} > {tol}"
    return out


def key_mask(sk, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, sk, generator=g) > 0.3
    m[:, 0] = True
    return m.to(env.device())


def bias(sq, sk, shape=None, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*(shape or (B, 1, sq, sk)), generator=g).to(env.device())


FEATURES = {
    "dense": lambda sq, sk: {},
    "scale": lambda sq, sk: {"scale": 0.3},
    "causal": lambda sq, sk: {"causal": True},
    "window": lambda sq, sk: {"window": 9},
    "causal-window": lambda sq, sk: {"causal": True, "window": 9},
    "alibi": lambda sq, sk: {"alibi": [2.0 ** -(i + 1) for i in range(H)], "causal": True},
    "bias": lambda sq, sk: {"bias": bias(sq, sk)},
    "bias-2d": lambda sq, sk: {"bias": bias(sq, sk, (sq, sk))},
    "kv-lens": lambda sq, sk: {"kv_lens": torch.tensor([sk - 13, 3], dtype=torch.int32)},
    "key-mask": lambda sq, sk: {"key_mask": key_mask(sk)},
    "softcap": lambda sq, sk: {"softcap": 1.5, "scale": 1.0},
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_each_feature_fp32(feature):
    """Every feature alone (Sq=19 < Sk=45: causal is bottom-right aligned), GQA 4:2, D=24."""
    q, k, v = inputs(19, 45, 24)
    check(q, k, v, **FEATURES[feature](19, 45))


def test_all_features_together_bshd_mqa_odd_dims():
    """Everything at once, bshd layout, MQA (Hkv=1), D=20, Dv=40, Sq=Sk=37 (tails)."""
    q, k, v = inputs(37, 37, 20, hkv=1, dv=40, layout="bshd")
    kw = {"causal": True, "window": 13, "alibi": [0.5, 0.25, 0.125, 0.0625],
          "bias": bias(37, 37, (B, H, 37, 37)), "kv_lens": torch.tensor([30, 37]),
          "key_mask": key_mask(37), "softcap": 2.0, "layout": "bshd"}
    check(q, k, v, **kw)


def test_default_config_d64_mha():
    """The shipped tile table (one tile per row block here), D=64, H=Hkv."""
    q, k, v = inputs(37, 37, 64, hkv=H)
    check(q, k, v, config=None, causal=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_dtypes(dtype, tol):
    q, k, v = inputs(19, 45, 16, dtype=dtype)
    out = check(q, k, v, tol=tol, causal=True, window=20, bias=bias(19, 45).to(dtype),
                key_mask=key_mask(45))
    assert out.dtype == dtype


def test_strided_views_from_packed_qkv():
    """q, k, v as views of one packed [B, S, 3, H, D] tensor (bshd with row stride 3·H·D)."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, 29, 3, H, 32, generator=g).to(env.device())
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    check(q, k, v, causal=True, layout="bshd")


def test_rows_without_keys_give_zeros():
    """Sq > Sk with causal: the first Sq - Sk queries see no key; kv_lens=0 hides a batch."""
    q, k, v = inputs(40, 21, 16)
    out = check(q, k, v, causal=True)
    assert out[:, :, :19].abs().max() == 0
    out = check(q, k, v, kv_lens=torch.tensor([0, 21]))
    assert out[0].abs().max() == 0


def test_finfo_min_masks_do_not_overflow():
    """HF's additive masks are finfo.min, not -inf: times log2(e) that would overflow to -inf,
    and a query masked on every key would give zeros where the IR's softmax of equal finite
    scores averages the values. Rows masked everywhere, rows masked in part, and -inf."""
    q, k, v = inputs(21, 21, 16)
    m = torch.zeros(B, 1, 21, 21)
    lo = torch.finfo(torch.float32).min
    m[0, :, :5] = lo  # every key of the first five queries of batch 0
    m[1, :, :, 7:] = lo  # keys 7.. of batch 1
    m[1, :, 3, :4] = float("-inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no overflow
        out = check(q, k, v, bias=m.to(env.device()))
    assert out[0, :, :5].abs().max() > 0  # averaged, not zeroed


def expected_visits(sq, sk, bm, bn, causal, window):
    """Key tiles holding at least one (query, key) pair of each query tile, brute force."""
    keep = attention_mask(sq, sk, causal, window)
    qt, kt = math.ceil(sq / bm), math.ceil(sk / bn)
    return [sum(bool(keep[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].any()) for j in range(kt))
            for i in range(qt)]


@pytest.mark.parametrize("sq,causal,window", [(96, True, 8), (96, False, 20), (40, True, None),
                                              (96, True, 1)])
def test_window_skips_tiles(sq, causal, window):
    """The kernel visits exactly the tiles the mask needs: with a window of W the count per
    query tile is bounded by (BM + W) / BN + 1 however long the keys are."""
    sk = 96
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 1, sq, 16, generator=g)
    k, v = torch.randn(1, 1, sk, 16, generator=g), torch.randn(1, 1, sk, 16, generator=g)
    visits = torch.zeros(math.ceil(sq / 16), dtype=torch.int32)
    out = fa.flash_attention(q, k, v, causal=causal, window=window, config=SMALL,
                             visits=visits, out=torch.full_like(q, float("nan")))
    ref = fa.reference_attention(q, k, v, causal=causal, window=window)
    assert rel_err(out, ref) <= 1e-4
    assert visits.tolist() == expected_visits(sq, sk, 16, 16, causal, window)
    if window is not None and window <= 16:
        assert max(visits.tolist()) <= 2 < sk // 16


BAD = {
    "layout": ({"layout": "bsdh"}, "layout"),
    "k-dtype": ({"k": "half"}, "'k'"),
    "heads": ({"k": "3heads"}, "'k'"),
    "head-dim": ({"q": "d300"}, "'q'"),
    "window": ({"window": 0}, "window"),
    "softcap": ({"softcap": -1.0}, "softcap"),
    "alibi": ({"alibi": [0.1, 0.2]}, "alibi"),
    "bias": ({"bias": "wrong"}, "bias"),
    "kv-lens": ({"kv_lens": "wrong"}, "kv_lens"),
    "key-mask": ({"key_mask": "wrong"}, "key_mask"),
    "out": ({"out": "wrong"}, "out"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_name_the_argument(case):
    q, k, v = inputs(7, 9, 16)
    kw, name = BAD[case]
    kw = dict(kw)
    if kw.get("k") == "half":
        k = k.half()
    elif kw.get("k") == "3heads":
        k, v = k[:, :1].expand(B, 3, 9, 16), v[:, :1].expand(B, 3, 9, 16)
    elif kw.get("q") == "d300":
        q, k = torch.zeros(B, H, 7, 300), torch.zeros(B, 2, 9, 300)
    for key, wrong in {"bias": torch.zeros(B, H, 7, 8), "kv_lens": torch.zeros(3),
                       "key_mask": torch.ones(B, 8, dtype=torch.bool),
                       "out": torch.zeros(B, H, 7, 15)}.items():
        if kw.get(key) == "wrong":
            kw[key] = wrong
    kw = {x: y for x, y in kw.items() if x not in ("q", "k")}
    with pytest.raises(LoweringError, match=name):
        fa.flash_attention(q, k, v, **kw)


def test_bench_runs_on_tiny_shapes():
    r = fa.bench_attention(env.device(), batch=1, heads=2, kv_heads=1, seq_q=16, seq_k=24,
                           head_dim=16, dtype=torch.float32, causal=True, window=8)
    assert r["triton_ms"] > 0 and r["sdpa_ms"] > 0 and r["triton_tflops"] > 0


def test_shipped_specs_match_the_kernel():
    """SHIPPED covers fp16/bf16/fp32 x hd 64/128/256 with the wrapper's tiles, and each spec
    names every kernel parameter (constexprs with values)."""
    params = fa.kernel_params(fa.flash_attention_fwd)
    seen = set()
    for spec in fa.SHIPPED:
        assert list(spec.signature) == list(params)
        assert {n for n, c in params.items() if c} == set(spec.constexprs)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
            spec.signature["q_ptr"][1:]]
        d = spec.constexprs["HEAD_DIM"]
        cfg = fa.pick_config(dtype, d, d, heavy=spec.constexprs["HAS_BIAS"])
        assert (spec.constexprs["BLOCK_M"], spec.constexprs["BLOCK_N"], spec.num_warps,
                spec.num_stages) == (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
        seen.add((dtype, d))
    assert len(seen) == 9
