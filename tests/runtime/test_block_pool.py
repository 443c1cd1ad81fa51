"""BlockPool: free list order, reference counts, all-or-nothing allocation, misuse errors."""

from __future__ import annotations

import pytest

from transfuse.errors import InputError
from transfuse.runtime.block_pool import BlockPool


def test_allocate_share_release_and_reuse_order():
    pool = BlockPool(4)
    a = pool.allocate(2)
    assert a == [0, 1] and pool.num_used == 2 and pool.num_free == 2
    pool.share([1])
    assert [pool.ref_count(b) for b in range(4)] == [1, 2, 0, 0]
    assert pool.release([0, 1]) == 1  # 0 freed, 1 still held once
    assert pool.ref_count(1) == 1 and pool.free_blocks() == [2, 3, 0]
    assert pool.release([1]) == 1
    assert pool.free_blocks() == [2, 3, 0, 1]  # freed blocks queue at the back
    assert pool.allocate(3) == [2, 3, 0]


def test_allocate_is_all_or_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(InputError, match="3 needed, 1 free of 3"):
        pool.allocate(3)
    assert pool.num_free == 1 and pool.free_blocks() == [2]
    assert pool.allocate(0) == []


@pytest.mark.parametrize("n", [0, -1, True, 2.0])
def test_bad_size(n):
    with pytest.raises(InputError, match="num_blocks must be a positive int"):
        BlockPool(n)


def test_misuse_is_refused_without_change():
    pool = BlockPool(3)
    pool.allocate(1)  # block 0
    with pytest.raises(InputError, match="block 1 is free"):
        pool.share([0, 1])
    assert pool.ref_count(0) == 1  # block 0 was not shared half-way
    with pytest.raises(InputError, match="released 2 times, held 1"):
        pool.release([0, 0])
    assert pool.ref_count(0) == 1
    with pytest.raises(InputError, match="block id 3 not in 0..2"):
        pool.ref_count(3)
    with pytest.raises(InputError, match="block id -1"):
        pool.release([-1])


def test_plan_writes_copies_only_shared_blocks_written():
    pool = BlockPool(8)
    a = pool.allocate(3)  # [0, 1, 2]
    pool.share(a[:2])  # a second table holds blocks 0 and 1
    b = a[:2]
    # a writes positions 5..9 (blocks 1, 2): copies 1 (shared), 2 is its own; nothing appended
    # b writes 6..12 (blocks 1..3): 1 is then held by b alone, so no copy; 2 new blocks
    assert pool.plan_writes([(a, 5, 5), (b, 6, 7)], 4) == [([1], 0), ([], 2)]
    assert pool.plan_writes([(b, 8, 1)], 4) == [([], 1)]  # a full shared block is not written
    assert pool.plan_writes([(a, 0, 1), (a, 1, 1)], 4) == [([0], 0), ([], 0)]
    assert [pool.ref_count(x) for x in range(3)] == [2, 2, 1]  # planning changes nothing


def test_take_a_specific_free_block_and_move_free_blocks_to_the_front():
    pool = BlockPool(5)
    pool.allocate(3)  # 0, 1, 2
    pool.release([2, 0])
    assert pool.free_blocks() == [3, 4, 2, 0]
    pool.take(2)  # a prefix-cache hit on a freed block
    assert pool.ref_count(2) == 1 and pool.free_blocks() == [3, 4, 0] and pool.num_free == 3
    pool.to_front([0, 4])
    assert pool.free_blocks() == [0, 4, 3]
    assert pool.allocate(2) == [0, 4]
    with pytest.raises(InputError, match="take: block 1 is in use"):
        pool.take(1)
    with pytest.raises(InputError, match="to_front: block 2 is in use"):
        pool.to_front([3, 2])
    with pytest.raises(InputError, match="block id 9"):
        pool.take(9)
    assert pool.free_blocks() == [3] and pool.ref_count(1) == 1
