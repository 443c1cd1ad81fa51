"""KVCache.truncate: keeps the first tokens, releases the blocks past them, refuses misuse.

Speculative decoding commits k+1 tokens and then rolls back to the accepted ones; what stays
must read back unchanged, what goes must return to the pool, and the next write must land
right after the kept tokens (copying a block it still shares with a fork).
"""

from __future__ import annotations

import pytest
import torch
from kv_reference import BOTH, make, read_seq, state, step

from transfuse.errors import InputError


@pytest.mark.parametrize("layout,order", BOTH)
def test_truncate_keeps_prefix_and_next_step_continues_after_it(layout, order):
    c = make(layout, order)
    c.add("a", 10)
    _, ks, vs = step(c, [("a", 10)], torch.Generator().manual_seed(0))
    c.truncate("a", 6)
    assert c.length("a") == 6
    if c.paged:  # 10 tokens took 3 blocks of 4; 6 tokens keep 2
        assert len(c.block_table("a")) == 2
        assert c.memory_report()["blocks_used"] == 2
    for layer in range(c.layers):
        k, v = read_seq(c, "a", layer)
        torch.testing.assert_close(k, ks[layer][:6])
        torch.testing.assert_close(v, vs[layer][:6])
    meta, ks2, _ = step(c, [("a", 3)], torch.Generator().manual_seed(1))
    assert meta.position_ids.tolist() == [[6, 7, 8]]
    assert c.length("a") == 9
    k, _ = read_seq(c, "a", 0)
    torch.testing.assert_close(k, torch.cat([ks[0][:6], ks2[0]]))


@pytest.mark.parametrize("layout,order", BOTH)
def test_truncate_to_zero_and_to_the_same_length(layout, order):
    c = make(layout, order)
    c.add("a", 5)
    step(c, [("a", 5)])
    c.truncate("a", 5)  # a no-op on the tokens
    assert c.length("a") == 5
    c.truncate("a", 0)
    assert c.length("a") == 0 and "a" in c
    if c.paged:
        assert c.block_table("a") == [] and c.memory_report()["blocks_used"] == 0
    step(c, [("a", 2)])  # starts over at position 0
    assert c.length("a") == 2
    c.free("a")
    assert c.memory_report()["sequences"] == 0
    if c.paged:
        assert c.memory_report()["blocks_free"] == c.num_blocks


def test_truncate_releases_room_reserved_ahead():
    c = make("paged")
    c.add("a", 3)
    step(c, [("a", 3)])
    c.extend("a", 9)  # 12 tokens of room: 3 blocks
    assert len(c.block_table("a")) == 3
    c.truncate("a", 3)
    assert len(c.block_table("a")) == 1 and c.pool.num_used == 1


def test_truncate_into_a_block_shared_with_a_fork_copies_it_on_the_next_write():
    c = make("paged")
    c.add("p", 7)
    _, ks, _ = step(c, [("p", 7)], torch.Generator().manual_seed(0))
    c.fork("p", "q")
    shared = c.block_table("p")
    c.truncate("q", 5)  # q keeps blocks 0 and 1, both still shared with p
    assert c.block_table("q") == shared and c.ref_count(shared[1]) == 2
    _, ks2, _ = step(c, [("q", 2)], torch.Generator().manual_seed(1))
    assert c.block_table("q")[0] == shared[0] and c.block_table("q")[1] != shared[1]
    assert c.ref_count(shared[1]) == 1
    torch.testing.assert_close(read_seq(c, "p", 0)[0], ks[0])  # p's tokens untouched
    torch.testing.assert_close(read_seq(c, "q", 0)[0], torch.cat([ks[0][:5], ks2[0]]))


def test_truncating_one_of_two_holders_keeps_the_block_for_the_other():
    c = make("paged")
    c.add("p", 8)
    step(c, [("p", 8)])
    c.fork("p", "q")
    c.truncate("q", 2)  # releases q's hold on block 1 only
    assert c.ref_count(c.block_table("p")[1]) == 1
    assert c.ref_count(c.block_table("p")[0]) == 2
    assert c.pool.num_used == 2


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_truncate_refusals_change_nothing(layout):
    c = make(layout)
    c.add("a", 6)
    step(c, [("a", 6)])
    before = state(c)
    for length, match in [(7, r"must be an int in 0\.\.6 .*got 7"), (-1, "got -1"),
                          (True, "got True"), (2.0, "got 2.0"), ("3", "got '3'")]:
        with pytest.raises(InputError, match=match):
            c.truncate("a", length)
    with pytest.raises(InputError, match="KVCache.truncate: unknown sequence 'zz'"):
        c.truncate("zz", 0)
    assert state(c) == before
    c.prepare_step([("a", 1)])
    with pytest.raises(InputError, match="truncate: sequence 'a' is in a step in flight"):
        c.truncate("a", 2)
    c.abort_step()
    assert state(c) == before
