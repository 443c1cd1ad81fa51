"""KVCache: allocation, step metadata, write/read through the metadata, fork and copy-on-write,
exhaustion, memory accounting (the property test is in test_kv_cache_random.py)."""

from __future__ import annotations

import pytest
import torch
from kv_reference import BOTH, make, read_seq, state, step

from transfuse.errors import InputError
from transfuse.runtime.kv_cache import KVCache


@pytest.mark.parametrize("layout,order", BOTH)
def test_shapes_bytes_and_zero_fill(layout, order):
    c = make(layout, order)
    rows, cols = (32, 4) if layout == "paged" else (4, 32)  # 4 seqs x 8 blocks of 4
    want = (rows, cols, 2, 3) if order == "token-major" else (rows, 2, cols, 3)
    assert len(c.k) == len(c.v) == 2
    assert all(t.shape == want and t.dtype == torch.float32 for t in c.k + c.v)
    assert all(not t.any() for t in c.k + c.v)
    assert c.bytes_per_token == 2 * 2 * 2 * 3 * 4  # K and V x layers x Hkv x D x fp32
    assert c.nbytes == sum(t.numel() * t.element_size() for t in c.k + c.v)
    assert list(c.cache_inputs()) == ["k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1"]
    assert c.cache_inputs()["v_cache_1"] is c.v[1]


def test_block_budget_and_dtype_names():
    c = KVCache(1, 1, 8, "bf16", max_seq_len=100, max_batch=2, layout="paged", block_size=16,
                num_blocks=5)
    assert c.k[0].shape == (5, 16, 1, 8) and c.dtype == torch.bfloat16
    assert c.max_blocks == 7 and c.bytes_per_token == 2 * 8 * 2
    assert KVCache(1, 1, 8, torch.float16, max_seq_len=8, max_batch=1).dtype == torch.float16
    assert KVCache(1, 1, 1, "torch.float64", max_seq_len=8, max_batch=1).dtype == torch.float64
    meta = KVCache(1, 1, 1, max_seq_len=8, max_batch=1, device="meta")
    assert meta.k[0].device.type == "meta"


def test_metadata_mixed_prefill_and_decode_contiguous():
    c = make("contiguous")
    c.add("a", 3)
    c.add("b", 2)
    step(c, [("a", 3), ("b", 2)])
    c.add("c", 4)
    meta = c.prepare_step([("b", 1), ("c", 4), ("a", 1)])  # decode, prefill, decode
    assert meta.seq_ids == ("b", "c", "a") and meta.num_new == (1, 4, 1)
    assert meta.position_ids.tolist() == [[2, 0, 1, 2, 3, 3]]
    assert meta.seq_of_token.tolist() == [0, 1, 1, 1, 1, 2]
    assert meta.seq_lens.tolist() == [3, 4, 4]
    assert meta.cache_table.tolist() == [1, 2, 0]  # slots in order of add
    assert meta.last_rows.tolist() == [0, 4, 5]
    assert meta.num_tokens == 6 and meta.batch == 3
    assert all(t.dtype == torch.int64 for t in meta.inputs().values())
    assert list(meta.inputs()) == [
        "position_ids", "seq_of_token", "seq_lens", "cache_table", "logit_rows"]
    assert meta.inputs()["logit_rows"] is meta.last_rows
    assert c.length("c") == 0  # nothing grows before commit
    with pytest.raises(InputError, match="blocks_needed: a step is in flight"):
        c.blocks_needed([("a", 1)])
    c.commit_step()
    assert c.blocks_needed([["a", 1]]) == 0  # contiguous; [seq_id, n] lists are items too
    assert [c.length(s) for s in "abc"] == [4, 3, 4]


def test_paged_tables_with_scattered_blocks():
    c = make("paged", max_seq_len=16)  # block_size 4, 4 blocks per seq max, 16 blocks
    c.add("a", 5)  # blocks 0, 1
    c.add("b", 4)  # block 2
    c.add("c", 3)  # block 3
    step(c, [("a", 5), ("b", 4), ("c", 3)])
    c.free("b")  # block 2 back on the free list, behind 4..15
    c.add("d", 16)  # takes 4 blocks: 4, 5, 6, 7
    meta = c.prepare_step([("c", 1), ("a", 4), ("d", 16)])  # a grows into a third block: 8
    assert meta.cache_table.tolist() == [
        [3, -1, -1, -1], [0, 1, 8, -1], [4, 5, 6, 7]]
    assert meta.position_ids.tolist() == [[3, 5, 6, 7, 8] + list(range(16))]
    assert meta.seq_lens.tolist() == [4, 9, 16]
    assert meta.last_rows.tolist() == [0, 4, 20]
    c.commit_step()
    for b in range(8):  # 2 went free and 4 more are handed out before it comes back
        c.add(("x", b), 1)
    assert c.block_table(("x", 7)) == [2]


@pytest.mark.parametrize("layout,order", BOTH)
def test_write_read_through_metadata(layout, order):
    gen = torch.Generator().manual_seed(0)
    c = make(layout, order)
    want = {s: ([[] for _ in range(2)], [[] for _ in range(2)]) for s in "abc"}

    def run(items):
        meta, ks, vs = step(c, items, gen)
        row = 0
        for sid, n in items:
            for layer in range(2):
                want[sid][0][layer].append(ks[layer][row:row + n])
                want[sid][1][layer].append(vs[layer][row:row + n])
            row += n

    for s, n in zip("abc", (7, 1, 4)):
        c.add(s, n)
    run([("a", 7), ("b", 1), ("c", 4)])
    for _ in range(6):
        run([("c", 1), ("a", 1), ("b", 1)])
    run([("b", 9), ("a", 2)])  # a prefill chunk after decodes
    for s in "abc":
        for layer in range(2):
            k, v = read_seq(c, s, layer)
            assert torch.equal(k, torch.cat(want[s][0][layer]))
            assert torch.equal(v, torch.cat(want[s][1][layer]))


def test_paged_fork_copy_on_write_and_reuse():
    gen = torch.Generator().manual_seed(1)
    c = make("paged")  # block_size 4
    c.add("p", 6)
    step(c, [("p", 6)], gen)  # blocks 0 (full), 1 (2 of 4)
    before = [read_seq(c, "p", i) for i in range(2)]
    c.fork("p", "c1")
    c.fork("p", "c2")
    assert c.block_table("c1") == c.block_table("p") == [0, 1]
    assert c.ref_count(0) == c.ref_count(1) == 3
    assert c.blocks_needed([("c1", 1)]) == 1  # copies block 1 and only that one
    step(c, [("c1", 1)], gen)
    assert c.block_table("c1") == [0, 2] and c.ref_count(1) == 2 and c.ref_count(0) == 3
    k1, _ = read_seq(c, "c1", 0)
    assert torch.equal(k1[:6], before[0][0])  # the copy carries the shared prefix
    step(c, [("p", 3), ("c2", 1)], gen)  # p copies 1 (refs 2 -> 1), c2 then owns it
    assert c.block_table("p")[:2] == [0, 3] and c.block_table("c2") == [0, 1]
    assert c.ref_count(1) == 1 and c.ref_count(0) == 3
    for i in range(2):  # the parent's old positions are untouched by the children's writes
        assert all(torch.equal(a[:6], b) for a, b in zip(read_seq(c, "p", i), before[i]))
    assert c.memory_report()["blocks_shared"] == 1
    for s in ("p", "c1", "c2"):
        c.free(s)
    assert all(c.ref_count(b) == 0 for b in range(c.num_blocks))
    assert c.memory_report()["blocks_free"] == c.num_blocks
    c.add("q", 32)
    assert len(set(c.block_table("q")) & {0, 1, 2, 3}) == 0  # fresh blocks come first ...
    c.free("q")
    for i in range(c.num_blocks):
        c.add(i, 1)  # ... and every block, freed ones included, is handed out again
    assert sorted(b for i in range(c.num_blocks) for b in c.block_table(i)) == list(range(32))


def test_fork_of_full_blocks_shares_without_copy():
    c = make("paged")
    c.add("p", 8)
    step(c, [("p", 8)])
    c.fork("p", "c")
    assert c.blocks_needed([("c", 1)]) == 1  # a new block, no copy: blocks 0, 1 are full
    step(c, [("c", 1)])
    assert c.block_table("c")[:2] == [0, 1] and c.ref_count(0) == 2


@pytest.mark.parametrize("order", ["token-major", "head-major"])
def test_contiguous_fork_copies_the_prefix(order):
    gen = torch.Generator().manual_seed(2)
    c = make("contiguous", order)
    c.add("p", 5)
    step(c, [("p", 5)], gen)
    c.fork("p", "c")
    assert c.slot("c") == 1 and c.length("c") == 5
    assert all(torch.equal(a, b) for a, b in zip(read_seq(c, "c", 1), read_seq(c, "p", 1)))
    parent = read_seq(c, "p", 0)
    step(c, [("c", 2)], gen)
    assert all(torch.equal(a, b) for a, b in zip(read_seq(c, "p", 0), parent))
    assert torch.equal(read_seq(c, "c", 0)[0][:5], parent[0])


def test_paged_exhaustion_leaves_state_unchanged():
    c = make("paged", max_seq_len=32, num_blocks=6)  # block_size 4
    c.add("a", 6)
    c.add("b", 4)
    step(c, [("a", 6), ("b", 4)])  # a: 2 blocks, b: 1 block, 3 free
    c.fork("a", "a2")
    snap = state(c)
    data = [t.clone() for t in c.k + c.v]
    # a2 needs 1 copy + 2 new, b needs 2 new: 5 > 3 free
    with pytest.raises(InputError, match=r"needs 5 blocks \(4 new, 1 copy-on-write\) but 3 of 6"):
        c.prepare_step([("a2", 7), ("b", 5)])
    assert state(c) == snap
    assert all(torch.equal(a, b) for a, b in zip(data, c.k + c.v))
    with pytest.raises(InputError, match="needs 4 blocks for its 13 prompt tokens, 3 of 6"):
        c.add("z", 13)
    with pytest.raises(InputError, match=r"KVCache.extend: this needs 4 blocks \(4 new, 0 copy"):
        c.extend("b", 13)
    assert state(c) == snap and "z" not in c
    step(c, [("a2", 7)])  # 1 copy + 2 new: fits exactly
    assert c.memory_report()["blocks_free"] == 0


def test_contiguous_slots_run_out():
    c = make("contiguous", max_batch=2)
    c.add("a", 1)
    c.add("b", 1)
    with pytest.raises(InputError, match="no free slot for sequence 'c': all max_batch 2"):
        c.add("c", 1)
    with pytest.raises(InputError, match="max_batch 2"):
        c.fork("a", "c")
    assert c.seq_ids() == ["a", "b"]
    c.free("a")
    c.add("c", 1)
    assert c.slot("c") == 0


def test_memory_report_and_waste_below_one_block_per_sequence():
    c = make("paged", max_seq_len=64, max_batch=6)  # block_size 4
    lens = {"a": 1, "b": 4, "c": 5, "d": 11, "e": 16, "f": 33}
    for s, n in lens.items():
        c.add(s, n)
    step(c, list(lens.items()))
    for _ in range(3):
        step(c, [(s, 1) for s in lens])
    r = c.memory_report()
    tokens = sum(lens.values()) + 3 * len(lens)
    blocks = sum(-(-(n + 3) // 4) for n in lens.values())
    assert r["tokens"] == tokens and r["blocks_used"] == blocks
    assert r["blocks_free"] == c.num_blocks - blocks and r["blocks_shared"] == 0
    assert r["waste_tokens"] == blocks * 4 - tokens < 4 * len(lens)
    assert all(len(c.block_table(s)) * 4 - c.length(s) < 4 for s in lens)
    assert r["bytes_used"] == blocks * r["bytes_per_block"] == blocks * 4 * c.bytes_per_token
    assert r["bytes"] == c.nbytes and r["capacity_tokens"] == c.num_blocks * 4
    cc = make("contiguous")
    cc.add("a", 3)
    step(cc, [("a", 3)])
    rc = cc.memory_report()
    assert (rc["slots_used"], rc["slots_free"], rc["tokens"]) == (1, 3, 3)
    assert rc["bytes_used"] == 32 * cc.bytes_per_token


def test_step_protocol():
    c = make("paged")
    c.add("a", 2)
    c.add("b", 2)
    with pytest.raises(InputError, match="no step in flight"):
        c.commit_step()
    c.prepare_step([("a", 2)])
    with pytest.raises(InputError, match="a step is in flight"):
        c.prepare_step([("b", 2)])
    for call in (lambda: c.free("a"), lambda: c.fork("a", "x"), lambda: c.extend("a", 1)):
        with pytest.raises(InputError, match="'a' is in a step in flight"):
            call()
    c.free("b")  # not in the step: fine
    c.abort_step()
    assert c.length("a") == 0 and c.block_table("a") == []  # reserved blocks returned
    assert c.memory_report()["blocks_used"] == 0
    c.extend("a", 5)
    assert len(c.block_table("a")) == 2 and c.length("a") == 0
    step(c, [("a", 5)])
    assert len(c.block_table("a")) == 2 and c.length("a") == 5


def test_shape_and_bytes_without_allocating():
    from transfuse.runtime.kv_cache import bytes_per_token, cache_shape

    assert cache_shape("paged", "head-major", 2, 3, max_seq_len=30, max_batch=3,
                       block_size=4) == (24, 2, 4, 3)  # 3 x ceil(30 / 4) blocks
    assert cache_shape("paged", "token-major", 2, 3, max_seq_len=30, max_batch=3, block_size=4,
                       num_blocks=5) == (5, 4, 2, 3)
    assert cache_shape("contiguous", "head-major", 2, 3, max_seq_len=30,
                       max_batch=3) == (3, 2, 30, 3)
    assert bytes_per_token(30, 3, 64, "bf16") == 2 * 30 * 3 * 64 * 2
    c = make("paged", "head-major", dtype="fp16")
    assert c.shape == cache_shape("paged", "head-major", 2, 3, max_seq_len=32, max_batch=4,
                                  block_size=4)
    assert c.bytes_per_token == bytes_per_token(2, 2, 3, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("layout,order", BOTH)
def test_cuda_cache_write_read_and_fork(layout, order):
    c = make(layout, order, device="cuda")
    assert all(t.is_cuda for t in c.k + c.v)
    c.add("a", 6)
    meta, ks, _ = step(c, [("a", 6)])
    assert all(t.is_cuda and t.dtype == torch.int64 for t in meta.inputs().values())
    c.fork("a", "b")
    step(c, [("b", 3), ("a", 1)])
    assert torch.equal(read_seq(c, "a", 1)[0][:6].cpu(), ks[1].cpu())
    assert torch.equal(read_seq(c, "b", 1)[0][:6].cpu(), ks[1].cpu())
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(InputError, match="do not fit in the .* available on cuda"):
        KVCache(1, 1, 1024, max_seq_len=free // 4096 + 1024, max_batch=1, device="cuda")
