"""Prefill attention over a KV cache (tiles of one sequence's tokens), run by Triton's
interpreter on tiny shapes against the plain-torch reference and the IR's cached_attention.

Shapes: B = 3 sequences; BLOCK_M = 16 (``block_m=16``) so that a chunk of 21 tokens is a
full tile and a tail of 5, and 18 tokens cross a tile boundary by 2. Steps (``STEPS``):
``mixed`` (a decode, a chunk of 18 at an offset, a decode), ``several`` (three chunks of
different lengths, one from position 0), ``offset`` (one sequence: 21 tokens at positions
9..29). H = 4 query heads over Hkv = 2 unless a test says otherwise, head dim 16 (a 16-wide
tile), 64, or odd 40 with Dv = 24. Caches are noise everywhere (a read past a sequence's
positions or outside its blocks changes the answer); outputs are NaN-poisoned (0xFF bytes)
before each run.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="the triton target needs triton (pip install 'triton>=3.6')")

import kv_noise  # noqa: E402
import torch  # noqa: E402

from transfuse.codegen.triton.host import calls  # noqa: E402
from transfuse.codegen.triton.kernels import decode_attention as da  # noqa: E402
from transfuse.codegen.triton.kernels import prefill_attention as pa  # noqa: E402
from transfuse.errors import LoweringError  # noqa: E402
from transfuse.ir.opdefs.generation import cached_attention  # noqa: E402

B, H, BM = 3, 4, 16
#: a step: (sequence, first position, tokens) runs in token order
STEPS = {
    "mixed": [(0, 12, 1), (1, 5, 18), (2, 3, 1)],
    "several": [(0, 0, 7), (1, 20, 18), (2, 30, 1)],
    "offset": [(0, 9, 21)],
}


def step(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, seq_of_token) of a step."""
    pos, sot = [], []
    for s, p0, k in STEPS[name]:
        pos += range(p0, p0 + k)
        sot += [s] * k
    return torch.tensor(pos), torch.tensor(sot)


def make_cache(kind: str, hkv: int, d: int, dv: int | None, dtype, pos, sot, seed: int = 0):
    """kv_noise.make_cache sized for each sequence's last position in the step."""
    lens = [int(pos[sot == s].max()) + 1 if bool((sot == s).any()) else 0 for s in range(B)]
    return kv_noise.make_cache(kind, hkv, d, dv, dtype, lens, seed)


def poisoned(*shape, dtype=torch.float32) -> torch.Tensor:
    """An output whose every byte is 0xFF (NaN in fp16/bf16/fp32)."""
    nbytes = torch.Size(shape).numel() * torch.finfo(dtype).bits // 8
    return torch.full((nbytes,), 0xFF, dtype=torch.uint8).view(dtype).reshape(shape)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).abs().max() / ref.float().abs().max())


def run(kind="paged5-token", steps="mixed", h=H, hkv=2, d=16, dv=None, dtype=torch.float32,
        block_m=BM, pos_sot=None, **kw):
    """The kernel's and the reference's outputs for one configuration."""
    pos, sot = step(steps) if pos_sot is None else pos_sot
    kc, vc, table, paged, order = make_cache(kind, hkv, d, dv, dtype, pos, sot)
    q = torch.randn(len(pos), h, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = poisoned(len(pos), h, dv or d, dtype=dtype)
    got = pa.prefill_attention(q, kc, vc, pos, sot, table, paged=paged, cache_order=order,
                               block_m=block_m, out=out, num_seqs=B, **kw)
    assert got is out
    ref = pa.reference_prefill_attention(q, kc, vc, pos, sot, table, paged=paged,
                                         cache_order=order, **kw)
    return got, ref


# -- numerics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["contig-token", "contig-head", "contig-noslots",
                                  "paged16-token", "paged16-head", "paged5-token",
                                  "paged5-head"])
def test_layouts_mixed_step(kind):
    """Every cache layout on a mixed step (decode, 18-token chunk at an offset: a full tile
    and a tail of 2, decode): paged16 reads one page per key tile, paged5 gathers a block id
    per position, contig-noslots has no slot table."""
    got, ref = run(kind)
    assert rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("steps", ["several", "offset"])
def test_steps(steps):
    """Several sequences of different lengths in one step (one chunk from position 0), and one
    chunk of 21 tokens at positions 9.. (a full tile and a tail of 5) over earlier positions."""
    got, ref = run("paged16-token", steps)
    assert rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2), (8, 1)], ids=["G1", "G4", "MQA"])
def test_head_ratios(h, hkv):
    """G = 1, 4 and MQA (G = 8; G = 2 is every other test)."""
    got, ref = run("contig-head", h=h, hkv=hkv)
    assert rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("d,dv", [(64, None), (40, 24)])
def test_head_dims(d, dv):
    """D = 64 (the shipped tile width), and an odd D = 40 with Dv = 24 (padded, masked)."""
    got, ref = run("paged5-head", d=d, dv=dv)
    assert rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("feats", [dict(window=6), dict(alibi=[0.5, -0.25, 0.125, 0.0625]),
                                   dict(softcap=2.0, scale=0.7),
                                   dict(window=4, alibi=[0.3, 0.2, 0.1, 0.05], softcap=3.0)],
                         ids=["window", "alibi", "softcap", "all"])
def test_features(feats):
    """Window (smaller than a tile: the rows of a tile see different ranges), ALiBi, softcap,
    and all three, on the 21-token chunk at an offset."""
    got, ref = run("paged5-token", "offset", **feats)
    assert rel_err(got, ref) <= 1e-4


def test_positions_need_not_be_consecutive():
    """Each row loads its own position: a tile of one sequence's tokens at unsorted, gapped
    positions (and two runs of the same sequence split by another's token)."""
    pos = torch.tensor([7, 3, 11, 4, 0, 9, 2, 10, 5])
    sot = torch.tensor([1, 1, 1, 1, 0, 1, 2, 1, 1])
    got, ref = run("paged5-head", pos_sot=(pos, sot), window=5)
    assert rel_err(got, ref) <= 1e-4


def test_default_configuration():
    """No block_m / tiles: the shipped BLOCK_M (fp32: 16) and the tile map made inside."""
    got, ref = run("contig-token", "several", block_m=None)
    assert rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    """fp16 / bf16 caches (upcast after loading in the interpreter), fp32 accumulation; the
    output in q's dtype."""
    got, ref = run("paged16-head", d=64, dtype=dtype)
    assert got.dtype == dtype
    assert rel_err(got, ref) <= (2e-3 if dtype == torch.float16 else 1e-2)


def test_step_matches_ir_op():
    """write_kv_cache + prefill_attention == the IR's cached_attention (write, then one token
    at a time) on a mixed step, paged head-major, GQA, every feature."""
    pos, sot = step("mixed")
    kc, vc, table, _, order = make_cache("paged5-head", 2, 16, None, torch.float32, pos, sot)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, h, len(pos), 16, generator=g) for h in (H, 2, 2))  # bhsd
    lens = torch.tensor([13, 23, 4])
    attrs = dict(scale=0.3, window=7, kv_heads=2, alibi=(0.2, 0.1, 0.05, 0.025), softcap=4.0,
                 layout="bhsd", paged=True, block_size=5, cache_order=order)
    kc_ir, vc_ir = kc.clone(), vc.clone()
    want = cached_attention([q, k, v, kc_ir, vc_ir, pos, sot, lens, table], attrs, {})
    da.write_kv_cache(k[0].transpose(0, 1), v[0].transpose(0, 1), kc, vc, pos, sot, table,
                      paged=True, cache_order=order)
    got = pa.prefill_attention(q[0].transpose(0, 1), kc, vc, pos, sot, table, paged=True,
                               cache_order=order, scale=0.3, window=7, alibi=attrs["alibi"],
                               softcap=4.0, block_m=BM, out=poisoned(len(pos), H, 16))
    assert rel_err(got, want[0].transpose(0, 1)) <= 1e-4


def test_bad_metadata_is_masked_not_read():
    """What a GPU launch (no value checks) does with bad metadata: block ids -1 and past the
    pool, a position past the table, a sequence outside it, a tile past the step's tokens.
    The kernel, launched directly, reads nothing outside the cache and the step (the
    interpreter would fault) and writes finite rows, only the step's."""
    pos, sot = step("mixed")
    kc, vc, table, paged, order = make_cache("paged5-token", 2, 16, None, torch.float32, pos,
                                             sot)
    table[1, 1] = -1
    table[1, 2] = kc.shape[0] + 7
    pos = pos.clone()
    pos[3] = table.shape[1] * 5 + 40  # past the table's positions
    q = torch.randn(len(pos), H, 16)
    out = poisoned(len(pos), H, 16)
    tiles = list(pa.prefill_tiles(sot, BM))
    tiles[2] = tiles[2].clone()
    tiles[2][-1] = B + 5  # a sequence outside the table: that tile sees nothing
    tiles = [torch.cat([t, torch.tensor([v], dtype=torch.int32)]) for t, v in zip(
        tiles, (len(pos) - 3, BM, B + 9))]  # 13 rows past the step's tokens (and no sequence)
    big = poisoned(len(pos) + BM, H, 16)
    out = big[: len(pos)]
    args, const, grid, launch = pa._prefill_launch(
        q, kc, vc, pos, table, None, out, tuple(tiles), paged=True, scale=0.25, window=None,
        softcap=None, num_seqs=B, block_m_=BM)
    pa._prefill_kernel[grid](*args, **const, **launch)
    assert torch.isfinite(out).all()
    assert torch.isnan(big[len(pos):]).all()  # nothing written past the step
    assert torch.all(out[-3:] == 0)  # tiles of a sequence outside the table see nothing


# -- the tile map -----------------------------------------------------------------------------

def test_prefill_tiles():
    """Runs of one sequence cut into tiles of block_m (tails shorter); a sequence whose tokens
    come in two runs gets tiles for each; max_tiles pads with empty tiles (no host sync)."""
    sot = torch.tensor([0, 0, 0, 1, 1, 0, 2, 2, 2, 2, 2])
    start, count, seq = pa.prefill_tiles(sot, 2)
    assert start.dtype == count.dtype == seq.dtype == torch.int32
    assert start.tolist() == [0, 2, 3, 5, 6, 8, 10]
    assert count.tolist() == [2, 1, 2, 1, 2, 2, 1]
    assert seq.tolist() == [0, 0, 1, 0, 2, 2, 2]
    padded = pa.prefill_tiles(sot, 2, max_tiles=len(sot))
    assert [t[:7].tolist() for t in padded] == [start.tolist(), count.tolist(), seq.tolist()]
    assert padded[1][7:].tolist() == [0] * 4
    start, count, seq = pa.prefill_tiles(step("several")[1], BM)  # 7 | 16 + 2 | 1
    assert (start.tolist(), count.tolist(), seq.tolist()) == ([0, 7, 23, 25], [7, 16, 2, 1],
                                                             [0, 1, 1, 2])
    assert all(t.numel() == 0 for t in pa.prefill_tiles(torch.zeros(0, dtype=torch.int64), 4))
    with pytest.raises(LoweringError, match="max_tiles"):
        pa.prefill_tiles(sot, 2, max_tiles=6)
    with pytest.raises(LoweringError, match=r"\bblock_m\b"):
        pa.prefill_tiles(sot, 0)
    with pytest.raises(LoweringError, match=r"\bseq_of_token\b"):
        pa.prefill_tiles(sot.float(), 2)


def test_padded_tile_map_gives_the_same_output():
    """A tile map with empty tiles (as a CUDA-graph step uses) changes nothing."""
    pos, sot = step("mixed")
    kc, vc, table, paged, order = make_cache("paged16-token", 2, 16, None, torch.float32, pos,
                                             sot)
    q = torch.randn(len(pos), H, 16)
    kw = dict(paged=True, cache_order=order, block_m=BM)
    exact = pa.prefill_attention(q, kc, vc, pos, sot, table, **kw)
    padded = pa.prefill_attention(q, kc, vc, pos, sot, table, out=poisoned(len(pos), H, 16),
                                  tiles=pa.prefill_tiles(sot, BM, max_tiles=6), **kw)
    assert torch.equal(exact, padded)


# -- the host call: prefill steps take the prefill kernel, decode steps the decode kernel ------

def test_host_call_routes_by_step(monkeypatch):
    """calls.cached_attention: a mixed step (N > B) runs the prefill kernel with the tile map
    made once for all layers of the step; a decode step (N == B) the decode kernel. Both match
    the IR op."""
    used = []
    for mod, fn in ((pa, "prefill_attention"), (da, "decode_attention")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _real=real, _fn=fn, **k: (
            used.append(_fn), _real(*a, **k))[1])
    attrs = dict(scale=None, window=None, alibi=None, softcap=None, layout="bshd", paged=True,
                 cache_order="token-major")
    for name, want_fn in (("mixed", "prefill_attention"), (None, "decode_attention")):
        pos, sot = step(name) if name else (torch.tensor([12, 22, 3]), torch.arange(B))
        kc, vc, table, _, _ = make_cache("paged16-token", 2, 16, None, torch.float32,
                                         *step("mixed"))
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(1, len(pos), h, 16, generator=g) for h in (H, 2, 2))  # bshd
        kc_ir, vc_ir = kc.clone(), vc.clone()
        want = cached_attention([q, k, v, kc_ir, vc_ir, pos, sot, torch.tensor([13, 23, 4]),
                                 table], dict(attrs, kv_heads=2, block_size=16), {})
        tokens = calls.HOST_CALLS["_t_token_tables"](pos, sot, table)
        used.clear()
        for _ in range(2):  # two layers of one step
            out = poisoned(1, len(pos), H, 16)
            calls.HOST_CALLS["_t_cached_attention"](q, k, v, kc, vc, pos, sot, table, tokens,
                                                    out, **attrs)
            assert rel_err(out, want) <= 1e-4
        assert used == [want_fn, want_fn]
        assert len(tokens[2]) == (1 if want_fn == "prefill_attention" else 0)


# -- refusals ---------------------------------------------------------------------------------

def _args(kind="paged5-token"):
    pos, sot = step("mixed")
    kc, vc, table, paged, order = make_cache(kind, 2, 16, None, torch.float32, pos, sot)
    return dict(q=torch.randn(len(pos), H, 16), k_cache=kc, v_cache=vc, position_ids=pos,
                seq_of_token=sot, cache_table=table, paged=paged, cache_order=order)


def _set(key, index, value):
    return lambda a: a[key].__setitem__(index, value)


@pytest.mark.parametrize("change,name", [
    (lambda a: a.update(q=a["q"][None]), "q"),
    (lambda a: a.update(q=a["q"].double()), "q"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), "k_cache"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :4]), "v_cache"),
    (lambda a: a.update(q=torch.randn(20, 3, 16)), "k_cache"),  # H = 3 not a multiple of Hkv
    (lambda a: a.update(position_ids=a["position_ids"][:5]), "position_ids"),
    (lambda a: a.update(seq_of_token=a["seq_of_token"].float()), "seq_of_token"),
    (lambda a: a.update(cache_table=None), "cache_table"),
    (lambda a: a.update(cache_table=a["cache_table"][0]), "cache_table"),
    (lambda a: a.update(cache_order="column-major"), "cache_order"),
    (lambda a: a.update(window=0), "window"),
    (lambda a: a.update(softcap=-1.0), "softcap"),
    (lambda a: a.update(scale=float("nan")), "scale"),
    (lambda a: a.update(alibi=[0.1, 0.2]), "alibi"),
    (lambda a: a.update(block_m=24), "block_m"),
    (lambda a: a.update(out=torch.empty(20, H, 8)), "out"),
    (lambda a: a.update(tiles=(1, 2, 3)), "tiles"),
    (lambda a: a.update(tiles=tuple(t.long() for t in pa.prefill_tiles(a["seq_of_token"], BM))),
     "tiles"),
    (lambda a: a.update(tiles=pa.prefill_tiles(a["seq_of_token"], 32)), "tiles"),  # > BLOCK_M
    (lambda a: a.update(tiles=pa.prefill_tiles(torch.zeros(20, dtype=torch.int64), BM)),
     "tile_seq"),  # tiles whose tokens belong to another sequence
    (_set("position_ids", 4, 999), "position_ids"),  # past the table's positions
    (_set("seq_of_token", 0, 3), "seq_of_token"),  # B = 3 sequences
    (_set("cache_table", (1, 1), -1), "cache_table"),  # a visible hole in sequence 1's blocks
    (_set("cache_table", (1, 0), 10**6), "cache_table"),  # a block past the pool
])
def test_bad_inputs_name_the_argument(change, name):
    a = _args()
    change(a)
    a.setdefault("block_m", BM)
    with pytest.raises(LoweringError, match=rf"\b{name}\b"):
        pa.prefill_attention(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"),
                             a.pop("position_ids"), a.pop("seq_of_token"), a.pop("cache_table"),
                             **a)


def test_bad_contiguous_slots_name_the_argument():
    a = _args("contig-token")
    a["cache_table"][2] = 5  # 5 slots: 0..4
    with pytest.raises(LoweringError, match=r"\bcache_table\b"):
        pa.prefill_attention(**a, block_m=BM)
    a = _args("contig-noslots")
    with pytest.raises(LoweringError, match=r"\bseq_of_token\b"):  # slot = sequence; 2 slots
        pa.prefill_attention(**dict(a, k_cache=a["k_cache"][:2], v_cache=a["v_cache"][:2]),
                             block_m=BM)


# -- configuration, shipped list, benchmark ---------------------------------------------------

def test_config():
    """BLOCK_M by dtype and padded head dim; BLOCK_N / page tiles from decode's tiling."""
    assert pa.prefill_block_m(torch.float16, 256) == pa.BLOCK_M
    assert pa.prefill_block_m(torch.float32, 64) == pa.FP32_BLOCK_M
    c = pa.prefill_config(torch.float32, 64, 64, True, 128)
    assert (c["block_m"], c["block_n"], c["num_warps"], c["num_stages"]) == (16, 32, 4, 2)
    c = pa.prefill_config(torch.bfloat16, 128, 128, True, 16)
    assert (c["block_n"], c["page_tiles"], c["num_stages"]) == (16, True, 2)
    c = pa.prefill_config(torch.bfloat16, 96, 96, True, 5)
    assert (c["block_n"], c["page_tiles"], c["num_stages"]) == (16, False, 1)
    assert pa.prefill_config(torch.float16, 256, 256, False, 4096)["num_warps"] == 8


def test_shipped_configs_are_well_formed():
    names = [s.name for s in pa.SHIPPED]
    assert len(names) == len(set(names))
    for spec in pa.SHIPPED:
        assert spec.kernel == "transfuse.codegen.triton.kernels.prefill_attention:_prefill_kernel"
        assert list(spec.signature) == pa._prefill_kernel.arg_names
        for p, t in spec.signature.items():
            assert (t == "constexpr") == (p in spec.constexprs), (spec.name, p)
    for d in (64, 128, 256):
        for t in ("fp16", "bf16", "fp32"):
            for what in ("contig G1", "contig G4", "paged16 G4", "paged8 G4"):
                assert f"prefill[hd{d} {t} {what}]" in names


def test_bench_runs_on_tiny_shapes():
    r = pa.bench_prefill_attention("cpu", seqs=2, chunk=5, context=6, heads=4, kv_heads=2,
                                   head_dim=16, dtype=torch.float32, block_size=4)
    assert r["prefill_ms"] > 0 and r["per_token_decode_ms"] > 0 and r["sdpa_ms"] > 0
    assert r["max_abs_diff"] < 1e-4 and r["per_token_max_abs_diff"] < 1e-4
