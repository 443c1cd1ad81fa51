"""``cached_attention``: the oracle, its python kernel, its verifier and its in-place writes.

The reference (one token at a time) is checked against the plain ``attention`` op on a
single sequence, and the python kernel (batched SDPA over gathered cache prefixes)
against the reference on mixed prefill/decode steps for every attribute form, both
cache layouts and both cache orders. Cleanup passes must keep, not merge and not fold
the op (``OpDef.mutates``).
"""

from __future__ import annotations

import re

import pytest
import torch
from attention_steps import step_inputs

from transfuse.codegen.python.generation import cached_attention_step, plan_for
from transfuse.errors import IRVerifyError
from transfuse.ir.opdefs.generation import cached_attention
from transfuse.ir.opdefs.nn import attention
from transfuse.ir.ops import get_op
from transfuse.ir.parser import parse_graph
from transfuse.ir.verify import verify
from transfuse.passes.base import is_pure
from transfuse.passes.manager import run_passes

H, HKV, D, SLOTS, LEN, BS = 4, 2, 8, 3, 16, 4
NBLOCKS = SLOTS * LEN // BS


def _attrs(**kw):
    base = {"scale": None, "window": None, "kv_heads": None, "alibi": None, "softcap": None,
            "layout": "bhsd", "paged": False, "block_size": None,
            "cache_order": "token-major"}
    base.update(kw)
    return base


def _caches(paged: bool, order: str, hkv: int = HKV):
    rows, length = (NBLOCKS, BS) if paged else (SLOTS, LEN)
    shape = (rows, hkv, length, D) if order == "head-major" else (rows, length, hkv, D)
    return torch.zeros(shape), torch.zeros(shape)


def _table(paged: bool, seqs: list[int]) -> torch.Tensor:
    if not paged:
        return torch.tensor([[2, 0, 1][s] for s in seqs])
    perm = torch.randperm(NBLOCKS, generator=torch.Generator().manual_seed(3))
    per = LEN // BS
    return torch.stack([perm[s * per:(s + 1) * per] for s in seqs])


def _step(starts, counts, gen, hkv=HKV):
    return step_inputs(starts, counts, gen, heads=H, kv_heads=hkv, head_dim=D)


def test_reference_equals_attention_on_one_sequence():
    gen = torch.Generator().manual_seed(0)
    q, k, v, pos, sot, lens = _step([0], [6], gen)
    kc, vc = _caches(False, "token-major")
    out = cached_attention([q, k, v, kc, vc, pos, sot, lens, torch.tensor([1])],
                           _attrs(window=3, alibi=(0.5, 0.25, 0.125, 0.0625)), {})
    want = attention([q, k, v], {"scale": None, "causal": True, "window": 3, "kv_heads": None,
                                 "alibi": (0.5, 0.25, 0.125, 0.0625), "softcap": None,
                                 "layout": "bhsd"}, {})
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(kc[1, :6], k[0].transpose(0, 1))  # written in place


FORMS = {
    "plain": {},
    "window": {"window": 3},
    "alibi": {"alibi": (0.5, 0.25, 0.125, 0.0625)},
    "softcap": {"softcap": 2.0, "scale": 0.3},
    "softcap-window-alibi": {"softcap": 1.5, "window": 4, "alibi": (0.1, 0.2, 0.3, 0.4)},
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("order", ["token-major", "head-major"])
def test_kernel_equals_reference_over_steps(form, paged, order):
    gen = torch.Generator().manual_seed(1)
    attrs = _attrs(paged=paged, block_size=BS if paged else None, cache_order=order,
                   **FORMS[form])
    ref_caches, ker_caches = _caches(paged, order), _caches(paged, order)
    seqs = [0, 1, 2]
    steps = [([0, 0, 0], [5, 2, 7]), ([5, 2, 7], [1, 1, 1]), ([6, 3, 8], [3, 1, 2])]
    for starts, counts in steps:
        q, k, v, pos, sot, lens = _step(starts, counts, gen)
        table = _table(paged, seqs)
        if paged:
            table[:, -1] = -1  # padding past the owned blocks (positions stay < 12)
        ins = [q, k, v, pos, sot, lens, table]
        want = cached_attention([*ins[:3], *ref_caches, *ins[3:]], attrs, {})
        got = cached_attention_step(*ins[:3], *ker_caches, *ins[3:], attrs["scale"],
                                    attrs["window"], attrs["alibi"], attrs["softcap"],
                                    "bhsd", attrs["block_size"], order)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ker_caches[0], ref_caches[0])
    torch.testing.assert_close(ker_caches[1], ref_caches[1])


def test_kernel_bshd_layout_and_mqa():
    gen = torch.Generator().manual_seed(2)
    q, k, v, pos, sot, lens = _step([0, 0], [4, 3], gen, hkv=1)
    ins = [q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)]
    rc, kc = _caches(False, "token-major", hkv=1), _caches(False, "token-major", hkv=1)
    table = _table(False, [0, 1])
    want = cached_attention([*ins, *rc, pos, sot, lens, table], _attrs(layout="bshd"), {})
    got = cached_attention_step(*ins, *kc, pos, sot, lens, table, None, None, None, None,
                                "bshd", None, "token-major")
    assert got.shape == (1, 7, H, D)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


HEADER = ("graph g(%q: f32[1, 4, n, 8], %k: f32[1, 2, n, 8], %v: f32[1, 2, n, 8], "
          "%kc: f32[3, 16, 2, 8], %vc: f32[3, 16, 2, 8], %pos: i64[n], %sot: i64[n], "
          "%lens: i64[b], %table: i64[b]) {")
GRAPH = HEADER + """
  %a: f32[1, 4, n, 8] = cached_attention(%q, %k, %v, %kc, %vc, %pos, %sot, %lens, %table) {ATTRS}
  %b: f32[1, 4, n, 8] = cached_attention(%q, %k, %v, %kc, %vc, %pos, %sot, %lens, %table) {ATTRS}
  %u: f32[1, 4, n, 8] = cached_attention(%q, %k, %v, %kc, %vc, %pos, %sot, %lens, %table) {ATTRS}
  %s: f32[1, 4, n, 8] = add(%a, %b)
  return %s
}
"""


def test_mutating_op_is_kept_unmerged_by_cleanup():
    assert get_op("cached_attention").mutates == (3, 4)
    g = parse_graph(GRAPH.replace("ATTRS", "kv_heads=2"))
    assert all(not is_pure(n) for n in g.find("cached_attention"))
    run_passes(g, ["cleanup.eliminate-common-subexpressions", "cleanup.eliminate-dead-code",
                   "cleanup.fold-constants"])
    # the unused %u still writes the caches; %a and %b are two writes, not one
    assert len(g.find("cached_attention")) == 3


@pytest.mark.parametrize("attrs,text,reason", [
    ("kv_heads=2", "%kc: f32[3, 16, 2, 8]", None),
    ("kv_heads=2", "%kc: f32[3, 16, 4, 8]", "do not hold 2 kv heads"),
    ("paged=true, block_size=4", "%kc: f32[3, 16, 2, 8]", "cache_table must be an i64 [B, W]"),
    ("kv_heads=2, window=0", "%kc: f32[3, 16, 2, 8]", "window must be >= 1"),
    ("cache_order=\"sideways\"", "%kc: f32[3, 16, 2, 8]", "cache_order must be one of"),
])
def test_verify_reasons(attrs, text, reason):
    src = GRAPH.replace("ATTRS", attrs).replace("%kc: f32[3, 16, 2, 8]", text)
    src = src.replace("%vc: f32[3, 16, 2, 8]", text.replace("%kc", "%vc"))
    if reason is None:
        verify(parse_graph(src))
        return
    with pytest.raises(IRVerifyError, match=re.escape(reason)):
        verify(parse_graph(src))


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("table", [[1], [0, 1, 2]], ids=["one-fresh-sequence", "slots-in-order"])
def test_kernel_fast_paths_equal_reference(window, table):
    """One fresh sequence (causal kernel over the step's K/V) and contiguous slots in order
    (cache read as a view) give the reference's outputs and cache contents."""
    gen = torch.Generator().manual_seed(4)
    counts = [6] if len(table) == 1 else [2, 2, 2]  # then decode: every key, no mask
    starts = [0] if len(table) == 1 else [0, 0, 0]
    rc, kc = _caches(False, "token-major"), _caches(False, "token-major")
    for _ in range(2):
        q, k, v, pos, sot, lens = _step(starts, counts, gen)
        ins = [q, k, v, pos, sot, lens, torch.tensor(table)]
        want = cached_attention([*ins[:3], *rc, *ins[3:]], _attrs(window=window), {})
        got = cached_attention_step(*ins[:3], *kc, *ins[3:], None, window, None, None, "bhsd",
                                    None, "token-major")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        starts, counts = [a + c for a, c in zip(starts, counts)], [1] * len(table)
    torch.testing.assert_close(kc[0], rc[0])


def test_step_plan_is_shared_by_layers_and_redone_after_an_in_place_change():
    """Two layers with the same metadata tensors share one plan; metadata rewritten in place
    (a runtime reusing its buffers) gets a new plan, and every output equals the reference."""
    gen = torch.Generator().manual_seed(5)
    table = _table(True, [0, 1, 2])
    attrs = _attrs(paged=True, block_size=BS, window=4)
    caches = {name: (_caches(True, "token-major"), _caches(True, "token-major"))
              for name in ("layer0", "layer1")}
    pos, sot, lens = None, None, None
    for starts, counts in (([0, 0, 0], [5, 2, 7]), ([5, 2, 7], [2, 1, 3])):
        q, k, v, p, s, ln = _step(starts, counts, gen)
        if pos is None:
            pos, sot, lens = p, s, ln
        else:  # same tensors, new contents
            pos.resize_(p.shape).copy_(p)
            sot.resize_(s.shape).copy_(s)
            lens.copy_(ln)
        plans = []
        for ref, ker in caches.values():
            want = cached_attention([q, k, v, *ref, pos, sot, lens, table], attrs, {})
            got = cached_attention_step(q, k, v, *ker, pos, sot, lens, table, None, 4, None,
                                        None, "bhsd", BS, "token-major")
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            plans.append(plan_for(pos, sot, lens, table, BS, BS))
        assert plans[0] is plans[1]
