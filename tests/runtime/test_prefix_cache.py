"""Prefix caching in KVCache: hits, partial blocks, copy-on-write, keys dropped on overwrite,
LRU eviction, statistics, refusals, and a seeded random run against an oracle.

The oracle: the key/value written at position p is a function of the sequence's tokens
0..p (as a real model's is), so any sequence reading its cache back must see exactly
``f(tokens[:p + 1])`` at every position, whether it computed the position or got it from a hit.
"""

from __future__ import annotations

import hashlib
import random

import pytest
import torch
from kv_reference import read_seq, state, write_step

from transfuse.errors import InputError
from transfuse.runtime.kv_cache import KVCache

BS = 4


def make(num_blocks=16, **kw):
    args = dict(max_seq_len=32, max_batch=4, layout="paged", block_size=BS,
                num_blocks=num_blocks, prefix_caching=True)
    args.update(kw)
    return KVCache(2, 1, 2, **args)


def value(prefix) -> float:
    """f(tokens 0..p): what a model would store at position p (exact in float32)."""
    digest = hashlib.sha256(repr(tuple(prefix)).encode()).digest()
    return float(int.from_bytes(digest[:2], "little") + 1)


class Seqs:
    """The test's record of each sequence's tokens (committed) and prompt."""

    def __init__(self, cache):
        self.cache = cache
        self.tokens: dict[object, list[int]] = {}

    def add(self, sid, prompt):
        c = self.cache.add(sid, len(prompt), tokens=prompt)
        self.tokens[sid] = list(prompt[:c])
        return c

    def step(self, items_tokens, commit=True):
        """items_tokens: [(sid, new token ids)]; writes f(prefix) at each new position."""
        items = [(s, len(t)) for s, t in items_tokens]
        meta = self.cache.prepare_step(items, tokens=[t for _, t in items_tokens])
        vals = []
        for s, t in items_tokens:
            seq = self.tokens[s]
            vals += [value(seq + t[:i + 1]) for i in range(len(t))]
        k = torch.tensor(vals).view(-1, 1, 1).expand(-1, 1, 2)
        for layer in range(self.cache.layers):
            write_step(self.cache, meta, layer, k + layer, -k - layer)
        if commit:
            self.cache.commit_step()
            for s, t in items_tokens:
                self.tokens[s] += t
        else:
            self.cache.abort_step()

    def prefill(self, sid, prompt):
        c = self.add(sid, prompt)
        self.step([(sid, list(prompt[c:]))])
        return c

    def free(self, sid):
        self.cache.free(sid)
        del self.tokens[sid]

    def check(self):
        """Every sequence reads back f(prefix) at each position; pool and keys consistent."""
        cache = self.cache
        for s, toks in self.tokens.items():
            assert cache.length(s) == len(toks)
            want = torch.tensor([value(toks[:p + 1]) for p in range(len(toks))])
            for layer in range(cache.layers):
                k, v = read_seq(cache, s, layer)
                assert torch.equal(k[:, 0, 0], want + layer), (s, layer)
                assert torch.equal(v[:, 0, 1], -want - layer), (s, layer)
        holders: dict[int, int] = {}
        for s in cache.seq_ids():
            for b in cache.block_table(s):
                holders[b] = holders.get(b, 0) + 1
        assert all(cache.ref_count(b) == holders.get(b, 0) for b in range(cache.num_blocks))
        free = cache.pool.free_blocks()
        assert len(free) == len(set(free)) == cache.num_blocks - len(holders)
        prefix = cache._prefix
        assert all(prefix._table[key] == b for b, keys in prefix._keys.items() for key in keys)
        assert len(prefix._table) == sum(len(k) for k in prefix._keys.values())
        known = {b: max((k[1] for k in keys), key=len) for b, keys in prefix._keys.items()}
        assert {b: t for ch in prefix._children.values() for b, t in ch.items()} == known
        assert all(prefix._table[(p, t)] == b for p, ch in prefix._children.items()
                   for b, t in ch.items())
        keyed_free = [b for b in free if b in prefix._keys]  # keyed blocks trail the free list
        assert free[len(free) - len(keyed_free):] == keyed_free


def test_refused_when_contiguous_or_not_a_bool():
    with pytest.raises(InputError, match="prefix_caching=True.*needs layout='paged'"):
        KVCache(1, 1, 2, max_seq_len=8, max_batch=1, prefix_caching=True)
    with pytest.raises(InputError, match="prefix_caching=1: it is a bool"):
        make(prefix_caching=1)
    off = KVCache(1, 1, 2, max_seq_len=8, max_batch=1, layout="paged", block_size=4)
    assert off.add("a", 5, tokens=[1, 2, 3, 4, 5]) == 0  # tokens are only checked when off
    assert off.prefix_stats()["enabled"] is False and off.prefix_stats()["hits"] == 0


def test_freed_prompt_is_found_again_full_and_partial_blocks():
    c = make()
    s = Seqs(c)
    a = [5, 6, 7, 8, 1, 2, 3, 4, 9, 9]  # 2 full blocks + 2 tokens
    assert s.prefill("a", a) == 0
    blocks_a = c.block_table("a")
    s.free("a")
    st = c.prefix_stats()
    assert st["cached_blocks"] == 3 and st["cached_free_blocks"] == 3 and st["hits"] == 0
    assert s.add("b", a + [4, 4]) == 10  # all of a: 2 full + the partial block
    assert c.block_table("b")[:3] == blocks_a
    s.step([("b", [4, 4])])  # writes positions 10, 11 of the hit partial block: keys < 10 stay
    s.check()
    assert s.add("c", a) == 9  # the last prompt token is always computed
    assert c.block_table("c") == blocks_a and c.ref_count(blocks_a[2]) == 2
    s.step([("c", [9])])  # shared with b: copied before the write
    assert c.block_table("c")[2] != blocks_a[2] and c.ref_count(blocks_a[2]) == 1
    s.check()
    st = c.prefix_stats()
    assert st["queries"] == 3 + 3 + 3 and st["hits"] == 3 + 3 and st["partial_hits"] == 2
    assert st["tokens_saved"] == 19 and st["hit_rate"] == pytest.approx(6 / 9)


def test_chain_keys_the_whole_prefix_not_just_the_block():
    c = make()
    s = Seqs(c)
    s.prefill("a", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert s.add("b", [9, 9, 9, 9, 5, 6, 7, 8, 0]) == 0  # block 1 equal, its prefix not
    assert s.add("c", [1, 2, 3, 4, 5, 6, 7, 0, 0]) == 7  # block 0, 3 tokens of block 1
    assert s.add("d", [1, 2, 3, 5]) == 3  # the start of a full block
    assert c.block_table("d")[0] == c.block_table("a")[0]
    s.step([("b", [9, 9, 9, 9, 5, 6, 7, 8, 0]), ("c", [0, 0]), ("d", [5])])
    s.check()


def test_live_sequences_share_and_copy_on_write():
    c = make()
    s = Seqs(c)
    s.prefill("a", [1, 2, 3, 4, 5, 6])  # block 1 keyed partial (2 tokens) at prompt end
    s.step([("a", [7])])  # a keeps writing into its own partial block: key of 2 tokens stays
    assert s.add("b", [1, 2, 3, 4, 5, 6, 1]) == 6
    assert c.block_table("b") == c.block_table("a") and c.ref_count(c.block_table("a")[1]) == 2
    s.step([("a", [8]), ("b", [1])])  # both write block 1: one copies, the other keeps it
    assert c.block_table("a")[1] != c.block_table("b")[1]
    s.check()


def test_same_system_prompt_other_question_shares_the_block_where_it_ends():
    c = make()
    s = Seqs(c)
    system = [7, 7, 1, 2, 3, 4, 8, 9, 5, 5]  # 2 full blocks + 2 tokens
    s.prefill("q1", system + [1, 1, 1, 1, 1])  # block 2 = [5, 5, 1, 1], full, keyed
    assert s.add("q2", system + [2, 2]) == 10
    shared = c.block_table("q1")[2]
    assert c.block_table("q2")[2] == shared
    s.step([("q2", [2, 2])])  # copies the block first: q1's stays and keeps its key
    assert c.block_table("q2")[2] != shared and c._prefix.keys_of(shared)
    s.free("q1")
    assert s.add("q3", system + [3]) == 10  # now from the free block, overwritten in place
    s.step([("q3", [3])])
    assert c.block_table("q3")[2] == shared  # q1's full key is gone, q3's prompt tail keyed
    assert [k[1] for k in c._prefix.keys_of(shared)] == [(5, 5, 3)]
    s.check()
    assert c.prefix_stats()["partial_hits"] == 2


def test_overwritten_keys_are_dropped_and_registered_again():
    c = make()
    s = Seqs(c)
    s.prefill("a", [1, 2, 3, 4, 5, 6, 7, 8])
    b1 = c.block_table("a")[1]
    assert len(c._prefix.keys_of(b1)) == 1  # full key, registered at commit
    c.truncate("a", 6)
    s.tokens["a"] = s.tokens["a"][:6]
    assert len(c._prefix.keys_of(b1)) == 1  # truncate never drops nor registers
    s.step([("a", [0, 0])])  # overwrites positions 6, 7 of b1: its old key must go
    assert c.block_table("a")[1] == b1
    s.check()
    s.free("a")
    assert s.add("x", [1, 2, 3, 4, 5, 6, 7, 8, 3]) == 6  # only the old block 1's start
    assert s.add("y", [1, 2, 3, 4, 5, 6, 0, 0, 3]) == 8  # its new content
    assert c.block_table("x")[1] == c.block_table("y")[1] == b1
    s.step([("x", [7, 8, 3]), ("y", [3])])  # x copies b1 before writing position 6
    assert c.block_table("x")[1] != b1 and len(c._prefix.keys_of(b1)) == 1
    s.check()


def test_identical_prompt_computes_its_last_token_in_a_taken_block():
    c = make()
    s = Seqs(c)
    p = [1, 2, 3, 4, 5, 6, 7, 8]
    s.prefill("a", p)
    s.free("a")
    assert s.add("b", p) == 7  # block 1 taken back alone: position 7 rewritten in place
    s.step([("b", [8])])
    s.check()
    s.free("b")
    assert s.add("c", p) == 7  # keyed again when that step committed
    assert c.prefix_stats()["hits"] == 4


def test_lru_eviction_hands_out_unkeyed_blocks_first_then_least_recently_freed():
    c = make(num_blocks=8)
    s = Seqs(c)
    s.prefill("a", [1, 1, 1, 1, 2, 2, 2, 2])  # blocks 0, 1
    s.prefill("b", [3, 3, 3, 3, 4, 4, 4, 4])  # blocks 2, 3
    s.free("a")
    s.free("b")
    assert c.pool.free_blocks() == [4, 5, 6, 7, 1, 0, 3, 2]  # unkeyed, then tail-first LRU
    s.prefill("c", [9] * 20)  # 5 blocks: the 4 unkeyed ones, then evicts a's tail block 1
    assert c.block_table("c") == [4, 5, 6, 7, 1]
    assert c.prefix_stats()["evictions"] == 1
    assert s.add("d", [1, 1, 1, 1, 2]) == 4  # a's head block 0 survived; d's 2nd block
    assert c.block_table("d") == [0, 3]  # evicts b's tail (least recently freed now)
    assert c.prefix_stats()["evictions"] == 2
    assert s.add("e", [3, 3, 3, 3]) == 3  # b's head block 2 survived
    assert c.block_table("e") == [2] and c.pool.num_free == 0
    s.step([("d", [2]), ("e", [3])])
    s.check()
    st = c.prefix_stats()
    # c's 5 full blocks, d's head and its 1-token prompt tail, e's block (keyed again)
    assert st["cached_blocks"] == 5 + 2 + 1 and st["cached_free_blocks"] == 0


def test_add_is_all_or_nothing_when_blocks_run_out():
    c = make(num_blocks=3)
    s = Seqs(c)
    s.prefill("a", [1, 2, 3, 4, 5])
    s.free("a")
    s.prefill("b", [7])
    before = state(c), c.prefix_stats()
    with pytest.raises(InputError, match=r"needs 3 blocks .*\(1 cached, 1 of them free\), 2 of"):
        c.add("c", 12, tokens=[1, 2, 3, 4] + [0] * 8)
    assert (state(c), c.prefix_stats()) == before


def test_step_tokens_are_required_and_checked():
    c = make()
    c.add("a", 3, tokens=[1, 2, 3])
    before = state(c)
    for tokens, match in [(None, "tokens .* are required"), ([[1, 2]], "has 3 tokens but 2"),
                          ([[1, 2, -1]], "token id -1 of sequence 'a'"),
                          ([[1, 2, 3.0]], "token id 3.0"), ([[1, 2, True]], "token id True"),
                          ("abc", "one per item"), ([[1, 2, 3], [4]], "one per item")]:
        with pytest.raises(InputError, match=match):
            c.prepare_step([("a", 3)], tokens=tokens)
    with pytest.raises(InputError, match="add: sequence 'b' has 2 tokens but 3 token ids"):
        c.add("b", 2, tokens=[1, 2, 3])
    assert state(c) == before and c._step is None
    c.prepare_step([("a", 3)], tokens=[torch.tensor([1, 2, 3])])  # a tensor row is fine
    c.commit_step()
    assert c.prefix_stats()["cached_blocks"] == 1  # partial prompt block keyed


def test_fork_carries_the_chain():
    c = make()
    s = Seqs(c)
    s.prefill("a", [1, 2, 3, 4, 5, 6])
    c.fork("a", "f")
    s.tokens["f"] = list(s.tokens["a"])
    s.step([("f", [7, 8, 9])])  # fills block 1 in f's copy: keyed under a's chain
    s.free("a")
    s.free("f")
    assert s.add("g", [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]) == 9
    s.step([("g", [0])])
    s.check()


def test_abort_registers_nothing():
    c = make()
    s = Seqs(c)
    s.add("a", [1, 2, 3, 4, 5])
    s.step([("a", [1, 2, 3, 4, 5])], commit=False)
    assert c.prefix_stats()["cached_blocks"] == 0 and c.pool.num_used == 0  # room returned
    s.step([("a", [1, 2, 3, 4, 5])])
    assert c.prefix_stats()["cached_blocks"] == 2
    s.check()


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_content_and_bookkeeping(seed):
    rng = random.Random(seed)
    c = make(num_blocks=14, max_seq_len=24)
    s = Seqs(c)
    bases = [[rng.randrange(3) for _ in range(rng.randint(3, 14))] for _ in range(3)]
    todo: dict[object, list[int]] = {}  # prompt tokens still to prefill
    seen = set()
    for i in range(150):
        live = list(s.tokens)
        op = rng.choices(["add", "step", "free", "truncate", "fork"], [3, 6, 2, 1, 1])[0]
        if op == "add" or not live:
            prompt = rng.choice(bases)[: rng.randint(1, 14)] + [
                rng.randrange(3) for _ in range(rng.randint(0, 6))]
            before = state(c)
            try:
                got = s.add(i, prompt)
            except InputError as e:
                assert "blocks" in str(e) and state(c) == before
                seen.add("full")
                continue
            seen.add("hit" if got else "miss")
            todo[i] = prompt[got:]
        elif op == "step":
            chosen = rng.sample(live, rng.randint(1, len(live)))
            items = []
            for sid in chosen:
                rest = todo.get(sid)
                new = rest[: rng.randint(1, 5)] if rest else [rng.randrange(3)]
                if len(s.tokens[sid]) + len(new) <= 24:
                    items.append((sid, new))
            if not items:
                continue
            need = c.blocks_needed([(sid, len(t)) for sid, t in items])
            if need > c.pool.num_free:
                before = state(c)
                with pytest.raises(InputError, match="blocks"):
                    c.prepare_step([(sid, len(t)) for sid, t in items],
                                   tokens=[t for _, t in items])
                assert state(c) == before
                seen.add("short")
                continue
            commit = rng.random() > 0.1
            s.step(items, commit=commit)
            for sid, t in items:
                if commit and todo.get(sid):
                    del todo[sid][: len(t)]
        elif op == "free":
            sid = rng.choice(live)
            s.free(sid)
            todo.pop(sid, None)
        elif op == "truncate":
            sid = rng.choice(live)
            keep = rng.randint(0, len(s.tokens[sid]))
            c.truncate(sid, keep)
            s.tokens[sid] = s.tokens[sid][:keep]
            todo.pop(sid, None)
            seen.add("truncate")
        else:
            sid = rng.choice(live)
            if sid not in todo:
                c.fork(sid, f"f{i}")
                s.tokens[f"f{i}"] = list(s.tokens[sid])
        s.check()
    assert {"hit", "miss"} <= seen, seen
    for sid in list(s.tokens):
        s.free(sid)
    s.check()
    assert c.pool.num_free == c.num_blocks
