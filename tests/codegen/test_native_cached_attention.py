"""The native ``cached_attention`` read (``native/cached.py``, ``cached_attention.c``).

Every step of a scenario runs three ways on their own caches: the op's reference (one token at
a time, ``ir/opdefs/generation.py``), ``cached_attention_step`` with the native read, and
``cached_attention_step`` with the native read switched off (the torch gather + SDPA path).
Outputs must agree to 1e-5 at every step, caches exactly. Scenarios: decode steps, a prompt
chunk (longer than one work unit) mixed with decodes, speculative-style steps (several tokens
of one sequence after its cached prefix); forms: window, GQA/MQA, ALiBi, softcap; contiguous
slots out of order and paged caches with scattered blocks and -1 past each length; token-
and head-major caches; bhsd and bshd. Negative cases: what the kernel refuses falls back to
the torch path, and metadata pointing outside the cache is a typed error.
"""

from __future__ import annotations

import pytest
import torch
from attention_steps import step_inputs

import transfuse.codegen.python.generation as gen_kernel
from transfuse.codegen import native
from transfuse.codegen.native.cached import MAX_RUN, cached_attention_read, token_runs
from transfuse.errors import InputError
from transfuse.ir.opdefs.generation import cached_attention, token_major

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason=f"native kernels unavailable: {native.status()}")

SLOTS, LEN, BS = 3, 96, 4
POOL = SLOTS * LEN // BS + 5  # spare blocks: the tables are scattered over a larger pool

# (starts, counts) per step; sequence s of a step is slot/table row s
SCENARIOS = {
    "decode": [([0, 0, 0], [9, 4, 13]), ([9, 4, 13], [1, 1, 1]), ([10, 5, 14], [1, 1, 1])],
    "mixed-chunk": [([0, 0, 0], [9, 4, 1]), ([9, 4, 1], [1, MAX_RUN + 5, 1]),
                    ([10, 4 + MAX_RUN + 5, 2], [2, 1, 7])],
    "speculative": [([0, 0], [10, 3]), ([10, 3], [5, 1]), ([15, 4], [1, 4])],
    # past several key tiles of the kernel: its online softmax rescales
    "long": [([0, 0, 0], [70, 40, 2]), ([70, 40, 2], [1, 9, 1]), ([71, 49, 3], [3, 1, 1])],
}
FORMS = {
    "plain-mha": ({}, 4),
    "gqa-window": ({"window": 5}, 2),
    "wide-window": ({"window": 45}, 2),
    "mqa-alibi": ({"alibi": (0.5, 0.25, 0.125, 0.0625)}, 1),
    "softcap": ({"softcap": 2.0, "scale": 0.3}, 2),
    "all": ({"softcap": 1.5, "window": 4, "alibi": (0.1, 0.2, 0.3, 0.4)}, 2),
}
H, D = 4, 16


def _attrs(paged, order, layout="bhsd", **kw):
    attrs = {"scale": None, "window": None, "kv_heads": None, "alibi": None, "softcap": None,
             "layout": layout, "paged": paged, "block_size": BS if paged else None,
             "cache_order": order}
    attrs.update(kw)
    return attrs


def _caches(paged, order, hkv, d=D):
    rows, length = (POOL, BS) if paged else (SLOTS, LEN)
    shape = (rows, hkv, length, d) if order == "head-major" else (rows, length, hkv, d)
    return [torch.zeros(shape) for _ in range(2)]


def _table(paged, lens):
    """Slots [2, 0, 1] (out of order), or scattered blocks with -1 past each length."""
    if not paged:
        return torch.tensor([2, 0, 1][:len(lens)])
    perm = torch.randperm(POOL, generator=torch.Generator().manual_seed(3))
    per = LEN // BS
    table = torch.stack([perm[s * per:(s + 1) * per] for s in range(len(lens))])
    for s, n in enumerate(lens.tolist()):
        table[s, -(-n // BS):] = -1
    return table


def _step(fn, attrs, ins, caches):
    q, k, v, pos, sot, lens, table = ins
    return fn(q, k, v, *caches, pos, sot, lens, table, attrs["scale"], attrs["window"],
              attrs["alibi"], attrs["softcap"], attrs["layout"], attrs["block_size"],
              attrs["cache_order"])


def _torch_path(monkeypatch):
    monkeypatch.setattr(gen_kernel, "cached_attention_read", lambda *a, **k: None)


def _run_three(monkeypatch, attrs, steps, hkv, d=D, seed=0, force_native=True):
    """Run ``steps`` by the reference, the native step and the torch step; compare each.
    ``force_native``: also steps of long chunks, which the native step leaves to torch."""
    gen = torch.Generator().manual_seed(seed)
    paged, order = attrs["paged"], attrs["cache_order"]
    ref_c, nat_c, tor_c = (_caches(paged, order, hkv, d) for _ in range(3))
    calls = []
    read = gen_kernel.cached_attention_read

    def counting(*a, **k):
        out = read(*a, **k)
        calls.append(out is not None)
        return out

    for starts, counts in steps:
        gen_kernel._LAST_PLAN.clear()
        q, k, v, pos, sot, lens = step_inputs(starts, counts, gen, heads=H, kv_heads=hkv,
                                              head_dim=d, layout=attrs["layout"])
        ins = [q, k, v, pos, sot, lens, _table(paged, lens)]
        want = cached_attention([*ins[:3], *ref_c, *ins[3:]], attrs, {})
        with monkeypatch.context() as m:
            m.setattr(gen_kernel, "cached_attention_read", counting)
            if force_native:
                m.setattr(gen_kernel, "DENSE_CHUNK", 10**9)
            got = _step(gen_kernel.cached_attention_step, attrs, ins, nat_c)
        with monkeypatch.context() as m:
            _torch_path(m)
            old = _step(gen_kernel.cached_attention_step, attrs, ins, tor_c)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, old, atol=1e-5, rtol=1e-5)
    for a, b in zip(nat_c + tor_c, ref_c + ref_c):
        assert torch.equal(a, b)
    return calls


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("order", ["token-major", "head-major"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_native_equals_reference_and_torch_path(monkeypatch, scenario, paged, order, form):
    extra, hkv = FORMS[form]
    calls = _run_three(monkeypatch, _attrs(paged, order, **extra), SCENARIOS[scenario], hkv)
    assert calls and all(calls)  # every step (none is one fresh sequence) went native


def test_bshd_layout_gpt2_head_dim_and_wider_values(monkeypatch):
    steps = [([0, 0], [6, 3]), ([6, 3], [1, 3]), ([7, 6], [1, 1])]
    calls = _run_three(monkeypatch, _attrs(True, "token-major", layout="bshd"), steps, hkv=1,
                       d=64, seed=4)
    assert all(calls)


def test_fresh_single_sequence_prefill_keeps_the_causal_kernel(monkeypatch):
    calls = _run_three(monkeypatch, _attrs(False, "token-major"), [([0], [7]), ([7], [1])], 2)
    assert calls == [True]  # only the decode step called the native read


@pytest.mark.parametrize("steps,native", [
    ([([0, 0], [20, 18])], False),  # two chunks: the grid is full
    ([([0], [3]), ([3], [16])], False),  # one chunk after a cached prefix
    ([([0, 0, 0], [3, 20, 5]), ([3, 20, 5], [20, 1, 1])], True),  # a chunk beside decodes
    ([([0, 0], [9, 2]), ([9, 2], [15, 15])], True),  # below DENSE_CHUNK tokens per sequence
])
def test_steps_of_long_chunks_go_to_the_torch_path(monkeypatch, steps, native):
    assert gen_kernel.DENSE_CHUNK == 16
    calls = _run_three(monkeypatch, _attrs(True, "token-major"), steps, 2, force_native=False)
    assert calls[-1:] == ([True] if native else [])


@pytest.mark.parametrize("tokens", [11, 1], ids=["runs", "one-token-heads-split"])
def test_threads_split_the_units_without_changing_results(tokens):
    """More runs than threads: a unit per run; fewer: the kv heads are split into groups."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(tokens, 6, 16, generator=gen)
    kc, vc = torch.randn(2, 3, 40, 16, generator=gen), torch.randn(2, 3, 40, 16, generator=gen)
    pos = torch.tensor([30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 20])[-tokens:]
    sot = torch.tensor([0] * 10 + [1])[-tokens:]
    args = (q, kc.transpose(1, 2), vc.transpose(1, 2), pos, sot, torch.tensor([1, 0]),
            token_runs(sot))
    kw = {"scale": None, "window": None, "alibi": None, "softcap": None, "block_size": None}
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 5):
            torch.set_num_threads(n)
            results.append(cached_attention_read(*args, **kw))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_token_runs_split_sequences_and_long_chunks():
    sot = torch.tensor([0] * (MAX_RUN + 2) + [1, 2, 2, 0])
    runs = token_runs(sot).tolist()
    assert runs == [0, MAX_RUN, MAX_RUN + 2, MAX_RUN + 3, MAX_RUN + 5, MAX_RUN + 6]
    assert token_runs(torch.arange(3)).tolist() == [0, 1, 2, 3]


def _decode_args(dtype=torch.float32, d=16):
    q = torch.randn(2, 4, d, dtype=dtype)
    kc, vc = torch.randn(8, BS, 2, d, dtype=dtype), torch.randn(8, BS, 2, d, dtype=dtype)
    pos, sot = torch.tensor([5, 2]), torch.tensor([0, 1])
    table = torch.tensor([[3, 6, -1], [1, -1, -1]])
    return q, kc, vc, pos, sot, table, token_runs(sot)


KW = {"scale": None, "window": None, "alibi": None, "softcap": None, "block_size": BS}


@pytest.mark.parametrize("case", ["float64", "head-dim-12", "strided-metadata", "block-size",
                                  "alibi-length"])
def test_refusals_return_none(case):
    kw = dict(KW)
    args = list(_decode_args(torch.float64 if case == "float64" else torch.float32,
                             12 if case == "head-dim-12" else 16))
    if case == "strided-metadata":
        args[5] = torch.tensor([[3, 1], [6, -1], [-1, -1]]).t()  # a transposed table
    if case == "block-size":
        kw["block_size"] = 8
    if case == "alibi-length":
        kw["alibi"] = (0.5, 0.25)
    assert cached_attention_read(*args, **kw) is None
    assert cached_attention_read(*_decode_args(), **KW) is not None


def test_refused_dtype_falls_back_to_the_torch_path():
    attrs = _attrs(True, "token-major")
    gen = torch.Generator().manual_seed(6)
    q, k, v, pos, sot, lens = step_inputs([0, 0], [3, 2], gen, heads=H, kv_heads=2, head_dim=D)
    ins = [x.double() for x in (q, k, v)] + [pos, sot, lens, _table(True, lens)]
    ref_c = [c.double() for c in _caches(True, "token-major", 2)]
    ker_c = [c.double() for c in _caches(True, "token-major", 2)]
    want = cached_attention([*ins[:3], *ref_c, *ins[3:]], attrs, {})
    torch.testing.assert_close(_step(gen_kernel.cached_attention_step, attrs, ins, ker_c), want)


def test_visible_padding_block_is_an_input_error():
    q, kc, vc, pos, sot, table, runs = _decode_args()
    table[0, 1] = -1  # position 5 of sequence 0 lies in block 1: -1 there is corrupt metadata
    with pytest.raises(InputError, match="outside the cache"):
        cached_attention_read(q, kc, vc, pos, sot, table, runs, **KW)


def test_slot_past_the_cache_is_an_input_error():
    q, kc, vc, pos, sot, _, runs = _decode_args()
    kw = dict(KW, block_size=None)
    with pytest.raises(InputError, match="code 3"):
        cached_attention_read(q, kc, vc, pos, sot, torch.tensor([0, 8]), runs, **kw)


def test_native_off_gives_no_library(monkeypatch):
    monkeypatch.setenv("TRANSFUSE_NATIVE", "0")
    native.reset()
    try:
        assert cached_attention_read(*_decode_args(), **KW) is None
    finally:
        monkeypatch.delenv("TRANSFUSE_NATIVE")
        native.reset()
    assert cached_attention_read(*_decode_args(), **KW) is not None


def test_reference_view_of_head_major_cache_reads_through():
    """The wrapper reads a head-major cache through its token-major view's strides."""
    q, kc, vc, pos, sot, table, runs = _decode_args()
    hm_k, hm_v = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
    a = cached_attention_read(q, kc, vc, pos, sot, table, runs, **KW)
    b = cached_attention_read(q, token_major(hm_k, "head-major"),
                              token_major(hm_v, "head-major"), pos, sot, table, runs, **KW)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
