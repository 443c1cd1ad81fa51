"""KVCache fork and copy-on-write under a real compiled generation step (tiny Llama).

generate() never forks; beam search and parallel sampling will. Here a prompt is prefilled
once, forked twice, and the three sequences decode different tokens in mixed orders: each
step's logits must equal Hugging Face's full forward over that sequence's own tokens, which
holds only if the shared half-full block was copied before any of them wrote into it.
"""

from __future__ import annotations

import pytest
import torch
from hf_builders import tiny_hf_model

import transfuse

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama():
    return tiny_hf_model("llama", "sdpa", layers=2, hidden=32, vocab=64, positions=64)


@pytest.mark.parametrize("order", ["token-major", "head-major"])
@pytest.mark.parametrize("kv", ["contiguous", "paged"])
def test_forked_sequences_decode_like_their_own_full_forward(llama, kv, order):
    prompt = [3, 1, 4, 1, 5, 9]  # 6 tokens: block 1 (of size 4) is half full when forked
    gen = transfuse.optimize(llama, (torch.tensor([prompt]),), generation={
        "max_seq_len": 24, "max_batch": 4, "kv": kv, "block_size": 4, "cache_order": order})
    cache = gen.cache
    assert cache.layout == kv and cache.order == order
    step = gen.step_for(cache)
    cache.add("p", len(prompt))
    meta = cache.prepare_step([("p", len(prompt))])
    step(torch.tensor([prompt]), meta)
    cache.commit_step()
    cache.fork("p", "a")
    cache.fork("p", "b")
    if kv == "paged":
        assert cache.block_table("a") == cache.block_table("p")
        assert cache.memory_report()["blocks_shared"] == 2
    tokens = {s: list(prompt) for s in ("p", "a", "b")}
    gen_rng = torch.Generator().manual_seed(0)
    for i in range(6):
        order_i = ["a", "p", "b"] if i % 2 == 0 else ["b", "a", "p"]
        new = {s: int(torch.randint(0, 64, (1,), generator=gen_rng)) for s in order_i}
        meta = cache.prepare_step([(s, 1) for s in order_i])
        logits = step(torch.tensor([[new[s] for s in order_i]]), meta)
        cache.commit_step()
        for row, s in enumerate(order_i):
            tokens[s].append(new[s])
            with torch.no_grad():
                want = llama(torch.tensor([tokens[s]])).logits[0, -1]
            torch.testing.assert_close(logits[row], want, atol=1e-4, rtol=1e-4)
    assert len({tuple(t) for t in tokens.values()}) == 3  # the three really diverged
    if kv == "paged":  # block 0 (full) is still shared by all three; block 1 was copied
        table = {s: cache.block_table(s) for s in tokens}
        assert table["p"][0] == table["a"][0] == table["b"][0]
        assert len({table[s][1] for s in tokens}) == 3
        assert cache.ref_count(table["p"][0]) == 3
    for s in tokens:
        cache.free(s)
    report = cache.memory_report()
    assert report["sequences"] == 0
    if kv == "paged":
        assert report["blocks_free"] == report["blocks_total"]
