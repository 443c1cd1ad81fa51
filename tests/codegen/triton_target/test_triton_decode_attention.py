"""Decode attention (split-K + combine, paged, grouped) and the KV cache write, run by Triton's
interpreter on tiny shapes against the plain-torch reference and the IR's cached_attention.

Shapes: B = 3 sequences of lengths 1, 13 and 37 (37 is no multiple of the 16-position tile
or of the 4/8/16-token pages), H = 4 query heads over Hkv = 2 (grouped: tl.dot), 4 (G = 1:
broadcast form) or 1 (MQA), head dims 16/32 and an odd 24 with Dv = 16. Outputs are
NaN-poisoned before each run.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("triton", reason="the triton target needs triton (pip install 'triton>=3.6')")

import kv_noise  # noqa: E402
import torch  # noqa: E402

from transfuse.codegen.triton.kernels import decode_attention as da  # noqa: E402
from transfuse.errors import LoweringError  # noqa: E402
from transfuse.ir.opdefs.generation import cached_attention  # noqa: E402

B, H = 3, 4
LENS = (1, 13, 37)


def make_cache(kind: str, hkv: int, d: int, dv: int | None = None,
               dtype: torch.dtype = torch.float32, lens=LENS, seed: int = 0):
    """kv_noise.make_cache for the B sequences of ``lens``."""
    return kv_noise.make_cache(kind, hkv, d, dv, dtype, lens, seed)


def query(d: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, H, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def poisoned(d: int, dtype=torch.float32) -> torch.Tensor:
    return torch.full((B, H, d), float("nan"), dtype=dtype)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).abs().max() / ref.float().abs().max())


def run(kind, hkv=2, d=16, dv=None, dtype=torch.float32, lens=LENS, **kw):
    """The kernel's and the reference's outputs for one configuration."""
    kc, vc, table, paged, order = make_cache(kind, hkv, d, dv, dtype, lens)
    q = query(d, dtype)
    seq_lens = torch.tensor(lens)
    out = poisoned(dv or d, dtype)
    feats = {k: kw[k] for k in ("window", "alibi", "softcap", "scale") if k in kw}
    got = da.decode_attention(q, kc, vc, seq_lens, table, paged=paged, cache_order=order,
                              out=out, **kw)
    assert got is out
    ref = da.reference_decode_attention(q, kc, vc, seq_lens, table, paged=paged,
                                        cache_order=order, **feats)
    return got, ref


# -- numerics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["contig-token", "contig-head", "paged4-token", "paged8-head",
                                  "paged16-head"])
def test_layouts_grouped(kind):
    """Every cache layout, H = 4 over Hkv = 2 (the grouped tl.dot form), 2 splits of 16-position
    tiles; paged4/paged8 gather a block id per position, paged16 reads one page per tile."""
    got, ref = run(kind, num_splits=2, block_n=16)
    assert rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("kind,hkv,d,dv", [("contig-noslots", 4, 32, None),
                                           ("paged8-token", 1, 24, 16)])
def test_head_ratios_and_dims(kind, hkv, d, dv):
    """G = 1 (broadcast form, no slot table) at D = 32; MQA (G = 4) with an odd D = 24 and a
    value head dim Dv = 16."""
    got, ref = run(kind, hkv=hkv, d=d, dv=dv, num_splits=3, block_n=16)
    assert rel_err(got, ref) <= 1e-4


def test_features_and_splits_agree():
    """Window + ALiBi + softcap: 1 split (written directly) and 3 splits (combined) both match
    the reference and each other."""
    feats = dict(window=9, alibi=[0.5, 0.25, 0.125, 0.0625], softcap=3.0, block_n=16)
    one, ref = run("paged8-token", num_splits=1, **feats)
    three, _ = run("paged8-token", num_splits=3, **feats)
    assert rel_err(one, ref) <= 1e-4 and rel_err(three, ref) <= 1e-4
    assert rel_err(one, three) <= 1e-5


@pytest.mark.parametrize("feats", [dict(window=5), dict(alibi=[0.3, -0.2, 0.1, 0.05]),
                                   dict(softcap=2.0, scale=0.7)], ids=["window", "alibi",
                                                                      "softcap"])
def test_each_feature(feats):
    """Each feature alone (G = 1 over a contiguous head-major cache, 2 splits: with the window
    the second split of each sequence sees nothing and must not disturb the combine)."""
    got, ref = run("contig-head", hkv=4, num_splits=2, block_n=16, **feats)
    assert rel_err(got, ref) <= 1e-4


def test_default_configuration():
    """No block_n / num_splits: the shipped tile and the split heuristic (max_len hint); a
    sequence of length 0 gets zeros."""
    got, ref = run("paged16-token", lens=(1, 0, 37), max_len=37)
    assert rel_err(got, ref) <= 1e-4
    assert torch.all(got[1] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    """fp16 / bf16 caches (upcast after loading), fp32 accumulation; output in q's dtype."""
    got, ref = run("paged16-head", dtype=dtype, num_splits=2, block_n=16)
    assert got.dtype == dtype
    assert rel_err(got, ref) <= (2e-3 if dtype == torch.float16 else 1e-2)


# -- the cache write and one whole cached_attention step ----------------------------------------

STEP_NEW = (1, 3, 2)  # new tokens of each sequence in the step (a decode and two chunks)


def step_meta(lens_before, table):
    pos, sot = [], []
    for b, (n0, k) in enumerate(zip(lens_before, STEP_NEW)):
        pos += range(n0, n0 + k)
        sot += [b] * k
    return torch.tensor(pos), torch.tensor(sot)


@pytest.mark.parametrize("kind", ["contig-token", "contig-noslots", "paged4-token",
                                  "paged8-head"])
def test_cache_write(kind):
    """The write kernel puts each token's K/V row where the IR's write_cache does (exactly), and
    touches nothing else."""
    lens_after = tuple(n + k for n, k in zip((0, 9, 33), STEP_NEW))
    kc, vc, table, paged, order = make_cache(kind, 2, 16, 8, lens=lens_after)
    pos, sot = step_meta((0, 9, 33), table)
    g = torch.Generator().manual_seed(5)
    k_new = torch.randn(2, len(pos), 16, generator=g).transpose(0, 1)  # [N, Hkv, D] strided
    v_new = torch.randn(len(pos), 2, 8, generator=g)
    want_k, want_v = da.reference_write_kv_cache(k_new, v_new, kc, vc, pos, sot, table,
                                                 paged=paged, cache_order=order)
    da.write_kv_cache(k_new, v_new, kc, vc, pos[None], sot, table, paged=paged,
                      cache_order=order, num_seqs=B)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_decode_step_matches_ir_op():
    """write_kv_cache + decode_attention == the IR's cached_attention on a decode step (one new
    token per sequence at position seq_lens - 1), paged head-major, GQA, every feature."""
    lens = torch.tensor(LENS)
    kc, vc, table, paged, order = make_cache("paged8-head", 2, 16)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, h, B, 16, generator=g) for h in (H, 2, 2))  # bhsd, N = B
    pos, sot = lens - 1, torch.arange(B)
    attrs = dict(scale=0.3, window=6, kv_heads=2, alibi=(0.2, 0.1, 0.05, 0.025), softcap=4.0,
                 layout="bhsd", paged=True, block_size=8, cache_order=order)
    kc_ir, vc_ir = kc.clone(), vc.clone()
    want = cached_attention([q, k, v, kc_ir, vc_ir, pos, sot, lens, table], attrs, {})
    da.write_kv_cache(k[0].transpose(0, 1), v[0].transpose(0, 1), kc, vc, pos, sot, table,
                      paged=True, cache_order=order)
    assert torch.equal(kc, kc_ir) and torch.equal(vc, vc_ir)
    got = da.decode_attention(q[0].transpose(0, 1), kc, vc, lens, table, paged=True,
                              cache_order=order, scale=0.3, window=6, alibi=attrs["alibi"],
                              softcap=4.0, num_splits=2, block_n=16, out=poisoned(16))
    assert rel_err(got, want[0].transpose(0, 1)) <= 1e-4


# -- refusals -----------------------------------------------------------------------------------

def _args(kind="paged8-token"):
    kc, vc, table, paged, order = make_cache(kind, 2, 16)
    return dict(q=query(16), k_cache=kc, v_cache=vc, seq_lens=torch.tensor(LENS),
                cache_table=table, paged=paged, cache_order=order)


@pytest.mark.parametrize("change,name", [
    (lambda a: a.update(q=a["q"][None]), "q"),
    (lambda a: a.update(q=a["q"].double()), "q"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), "k_cache"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :4]), "v_cache"),
    (lambda a: a.update(q=torch.randn(B, 3, 16)), "k_cache"),  # H = 3 not a multiple of Hkv
    (lambda a: a.update(seq_lens=torch.tensor([1.0, 2.0, 3.0])), "seq_lens"),
    (lambda a: a.update(seq_lens=torch.tensor([1, 2])), "seq_lens"),
    (lambda a: a.update(cache_table=None), "cache_table"),
    (lambda a: a.update(cache_table=a["cache_table"][:2]), "cache_table"),
    (lambda a: a.update(cache_order="column-major"), "cache_order"),
    (lambda a: a.update(window=0), "window"),
    (lambda a: a.update(softcap=-1.0), "softcap"),
    (lambda a: a.update(alibi=[0.1, 0.2]), "alibi"),
    (lambda a: a.update(num_splits=0), "num_splits"),
    (lambda a: a.update(num_splits=da.MAX_SPLITS + 1), "num_splits"),
    (lambda a: a.update(block_n=24), "block_n"),
    (lambda a: a.update(out=torch.empty(B, H, 8)), "out"),
    (lambda a: a.update(seq_lens=torch.tensor([1, 13, 99])), "seq_lens"),  # past the table
    (lambda a: a["cache_table"].__setitem__((2, 1), -1), "cache_table"),  # a visible hole
])
def test_bad_inputs_name_the_argument(change, name):
    a = _args()
    change(a)
    with pytest.raises(LoweringError, match=rf"\b{name}\b"):
        da.decode_attention(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("seq_lens"),
                            a.pop("cache_table"), **a)


def test_bad_write_inputs_name_the_argument():
    kc, vc, table, paged, order = make_cache("paged4-token", 2, 16)
    k_new, v_new = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    pos, sot = torch.tensor([0, 5, 9]), torch.tensor([0, 1, 2])
    kw = dict(paged=True, cache_order=order)
    with pytest.raises(LoweringError, match=r"\bv_new\b"):
        da.write_kv_cache(k_new, v_new[:, :1], kc, vc, pos, sot, table, **kw)
    with pytest.raises(LoweringError, match=r"\bseq_of_token\b"):
        da.write_kv_cache(k_new, v_new, kc, vc, pos, sot[:2], table, **kw)
    with pytest.raises(LoweringError, match=r"\bposition_ids\b"):
        da.write_kv_cache(k_new, v_new, kc, vc, torch.tensor([0, 5, 999]), sot, table, **kw)
    with pytest.raises(LoweringError, match=r"\bcache_table\b"):  # sequence 0 owns 1 block
        da.write_kv_cache(k_new, v_new, kc, vc, torch.tensor([5, 5, 9]), sot, table, **kw)


# -- configuration, shipped list, benchmark -------------------------------------------------------

def test_pick_num_splits():
    """Two programs per SM, at most one split per MIN_CHUNK positions, at most MAX_SPLITS."""
    assert da.pick_num_splits(8 * 8, 32768, sms=132) == math.ceil(264 / 64)
    assert da.pick_num_splits(1, 32768, sms=132) == da.MAX_SPLITS
    assert da.pick_num_splits(1, 600, sms=132) == 3
    assert da.pick_num_splits(1024, 32768, sms=132) == 1
    assert da.pick_num_splits(4, 10, sms=1) == 1


def test_tiling():
    assert da.tiling(128, True, False, 4096) == (32, False)
    assert da.tiling(64, True, True, 16) == (16, True)  # a tile per page
    assert da.tiling(64, False, True, 128) == (64, True)
    assert da.tiling(64, True, True, 96) == (32, True)  # the largest power of two dividing
    assert da.tiling(128, True, True, 8) == (16, False)  # short pages: gather block ids
    assert da.tiling(128, True, False, 4096, fp32=True) == (16, False)


def test_shipped_configs_are_well_formed():
    names = [s.name for s in da.SHIPPED]
    assert len(names) == len(set(names))
    for spec in da.SHIPPED:
        fn = getattr(da, spec.kernel.split(":")[1])
        assert list(spec.signature) == fn.arg_names
        for p, t in spec.signature.items():
            assert (t == "constexpr") == (p in spec.constexprs), (spec.name, p)
    for d in (64, 128, 256):
        for t in ("fp16", "bf16", "fp32"):
            for what in ("contig G1", "contig G4", "paged16 G4", "paged8 G1"):
                assert f"decode_split[hd{d} {t} {what}]" in names
            assert f"decode_combine[hd{d} {t}]" in names
            assert f"kv_cache_write[hd{d} {t} paged]" in names


def test_bench_runs_on_tiny_shapes():
    r = da.bench_decode_attention("cpu", batch=2, heads=4, kv_heads=2, head_dim=16,
                                  cache_len=20, dtype=torch.float32, block_size=8, num_splits=2)
    assert r["triton_ms"] > 0 and r["sdpa_ms"] > 0 and r["bytes"] == 2 * 2 * 20 * 2 * 16 * 4
    assert r["max_abs_diff"] < 1e-4
