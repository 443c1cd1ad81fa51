"""Prefix caching under a real compiled generation step (tiny Llama): a prefix hit must give
the logits and greedy tokens a cold run gives.

Prompt A is prefilled and freed; prompt A+B then finds A's blocks (full ones and A's partial
last block) and only B is computed. Its last-token logits and greedy continuation must equal
those of a cache without prefix caching that computes all of A+B. Then the finished sequence is
freed and added again with its generated tokens (a preempted request recomputed): the hit
covers all but its last token, whose logits must equal the ones the decode saw. And two live
sequences sharing a prompt write its partial last block in one step (copied on write).
"""

from __future__ import annotations

import pytest
import torch
from hf_builders import tiny_hf_model

import transfuse
from transfuse.runtime.kv_cache import KVCache

pytestmark = pytest.mark.slow

A = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # 10 tokens: 2 full blocks of 4 + 2, or a partial 16-block
B = [5, 8, 9, 7, 9, 3, 2]


@pytest.fixture(scope="module")
def llama():
    return tiny_hf_model("llama", "sdpa", layers=2, hidden=32, vocab=64, positions=64)


def cache_for(gen, prefix_caching: bool) -> KVCache:
    spec = gen.cache_spec
    return KVCache(spec["layers"], spec["kv_heads"], spec["head_dim"], spec["dtype"],
                   max_seq_len=spec["max_seq_len"], max_batch=spec["max_batch"],
                   layout="paged", block_size=spec["block_size"], num_blocks=spec["num_blocks"],
                   order=spec["order"], prefix_caching=prefix_caching)


def run(cache, step, items):
    """One step of items = [(seq_id, token ids)]: logits of each item's last token."""
    meta = cache.prepare_step([(s, len(t)) for s, t in items], tokens=[t for _, t in items])
    logits = step(torch.tensor([[x for _, t in items for x in t]]), meta)
    cache.commit_step()
    return logits


def greedy(cache, step, sid, logits, n):
    """n greedy tokens after ``logits``; returns (tokens, logits of each step)."""
    out, seen = [], [logits]
    for _ in range(n):
        out.append(int(seen[-1].argmax()))
        seen.append(run(cache, step, [(sid, [out[-1]])])[0])
    return out, seen


@pytest.mark.parametrize("block_size", [4, 16])
def test_prefix_hit_gives_the_logits_and_tokens_of_a_cold_run(llama, block_size):
    gen = transfuse.optimize(llama, (torch.tensor([A + B]),), generation={
        "max_seq_len": 48, "max_batch": 4, "kv": "paged", "block_size": block_size})
    cold = cache_for(gen, False)
    cold_step = gen.step_for(cold)
    cold.add("ab", len(A + B))
    want = run(cold, cold_step, [("ab", A + B)])[0]
    with torch.no_grad():
        torch.testing.assert_close(want, llama(torch.tensor([A + B])).logits[0, -1],
                                   atol=1e-4, rtol=1e-4)
    want_tokens, want_logits = greedy(cold, cold_step, "ab", want, 6)

    cache = cache_for(gen, True)
    step = gen.step_for(cache)
    assert cache.add("a", len(A), tokens=A) == 0
    run(cache, step, [("a", A)])
    cache.free("a")
    c = cache.add("ab", len(A + B), tokens=A + B)
    assert c == len(A)  # A's full blocks and its partial last block
    got = run(cache, step, [("ab", B)])[0]  # only B is computed
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    tokens, _ = greedy(cache, step, "ab", got, 6)
    assert tokens == want_tokens
    st = cache.prefix_stats()
    blocks_a = -(-len(A) // block_size)
    assert st["hits"] == blocks_a and st["tokens_saved"] == len(A)
    assert st["partial_hits"] == 1 and st["queries"] == blocks_a + -(-len(A + B) // block_size)

    # preempted and recomputed: prompt + generated tokens, all but the last found again
    seq = A + B + tokens  # all written: the hit covers all but the last
    cache.free("ab")
    assert cache.add("re", len(seq), tokens=seq) == len(seq) - 1
    again = run(cache, step, [("re", seq[-1:])])[0]
    torch.testing.assert_close(again, want_logits[-1], atol=1e-5, rtol=1e-5)
    assert cache.prefix_stats()["tokens_saved"] == len(A) + len(seq) - 1
    cache.free("re")

    # two live sequences share a prompt's partial last block and both write it in one step
    C, D = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [21, 22, 23]
    cold.free("ab")
    cold.add("x", len(C) + 1)
    cold.add("y", len(C + D))
    want_x, want_y = run(cold, cold_step, [("x", C + [7]), ("y", C + D)])
    assert cache.add("x", len(C), tokens=C) == 0
    run(cache, step, [("x", C)])
    assert cache.add("y", len(C + D), tokens=C + D) == len(C)  # shares x's blocks
    assert cache.block_table("y")[:blocks_a] == cache.block_table("x")
    logits = run(cache, step, [("x", [7]), ("y", D)])
    assert cache.block_table("y")[blocks_a - 1] != cache.block_table("x")[blocks_a - 1]
    torch.testing.assert_close(logits[0], want_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], want_y, atol=1e-5, rtol=1e-5)
    cache.free("x")
    cache.free("y")
    assert cache.pool.num_free == cache.num_blocks
