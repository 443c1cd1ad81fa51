"""The block pool of a paged KV cache: which blocks are free and how many sequences use each.

A paged cache stores every sequence's keys and values in fixed-size blocks of ``block_size``
tokens. :class:`BlockPool` is the bookkeeping only (no tensors): a free list and a reference
count per block. A block is *free* when its count is 0 and it is then on the free list exactly
once; a block with a count > 1 is shared by sequences forked from one another and must be
copied before any of them writes into it (copy-on-write, done by :class:`KVCache`).

Freed blocks go to the back of the free list and allocation takes from the front, so a block
that was just freed is the last to be handed out again. The free list is also where a prefix
cache (:mod:`~transfuse.runtime.prefix_cache`) finds blocks that are free but still hold valid
keys and values: :meth:`BlockPool.take` takes one specific free block back and
:meth:`BlockPool.to_front` makes free blocks the next handed out, both O(1) per block (the free
list is an insertion-ordered dict).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from transfuse.errors import InputError


class BlockPool:
    """Free list and reference counts of ``num_blocks`` blocks, ids ``0 .. num_blocks - 1``."""

    __slots__ = ("num_blocks", "_free", "_refs")

    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise InputError(f"BlockPool: num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs: list[int] = [0] * num_blocks

    @property
    def num_free(self) -> int:
        """Blocks no sequence uses (reference count 0)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks used by at least one sequence."""
        return self.num_blocks - len(self._free)

    def ref_count(self, block: int) -> int:
        """How many sequences hold ``block`` (0: it is free)."""
        self._check_id(block)
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with reference count 1; all or nothing.

        Raises InputError naming ``n`` and the free count when fewer than ``n`` are free; then
        nothing was taken.
        """
        if n < 0:
            raise InputError(f"BlockPool.allocate: n must be >= 0, got {n}")
        if n > len(self._free):
            raise InputError(
                f"KV cache out of blocks: {n} needed, {len(self._free)} free of {self.num_blocks}"
            )
        blocks = [self._free.popitem(last=False)[0] for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """One more holder for each of ``blocks`` (a fork); each must be in use."""
        blocks = list(blocks)
        for b in blocks:
            self._check_id(b)
            if self._refs[b] == 0:
                raise InputError(f"BlockPool.share: block {b} is free; only used blocks are shared")
        for b in blocks:
            self._refs[b] += 1

    def release(self, blocks: Iterable[int]) -> int:
        """One holder fewer for each of ``blocks``; a block whose count reaches 0 is freed.

        Returns how many blocks became free. A block given twice is released twice.
        """
        blocks = list(blocks)
        counts: dict[int, int] = {}
        for b in blocks:
            self._check_id(b)
            counts[b] = counts.get(b, 0) + 1
        for b, c in counts.items():
            if c > self._refs[b]:
                raise InputError(
                    f"BlockPool.release: block {b} released {c} times, held {self._refs[b]}"
                )
        freed = 0
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None
                freed += 1
        return freed

    def take(self, block: int) -> None:
        """Take the free ``block`` itself off the free list, with reference count 1 (a prefix
        cache hit on a block no sequence holds any more)."""
        self._check_id(block)
        if self._refs[block] != 0:
            raise InputError(
                f"BlockPool.take: block {block} is in use ({self._refs[block]} holders), "
                "only a free block can be taken"
            )
        del self._free[block]
        self._refs[block] = 1

    def to_front(self, blocks: Sequence[int]) -> None:
        """Make the free ``blocks`` the next ones handed out, in the order given."""
        for b in blocks:
            self._check_id(b)
            if self._refs[b] != 0:
                raise InputError(f"BlockPool.to_front: block {b} is in use, not free")
        for b in reversed(blocks):
            self._free.move_to_end(b, last=False)

    def plan_writes(
        self, writes: Sequence[tuple[Sequence[int], int, int]], block_size: int
    ) -> list[tuple[list[int], int]]:
        """What writing ``n`` tokens from position ``start`` into each block table needs, for
        ``writes`` = [(table, start, n), ...] done in order: per write, the table indices of
        shared blocks it writes into (to copy first) and how many blocks to append. A block
        shared only by writers of the same batch is copied by all but the last. Changes nothing.
        """
        refs_left: dict[int, int] = {}  # counts after the copies planned so far
        plan = []
        for table, start, n in writes:
            first, last = start // block_size, (start + n - 1) // block_size
            copies = []
            for j in range(first, min(last + 1, len(table))):
                refs = refs_left.get(table[j], self._refs[table[j]])
                if refs > 1:
                    copies.append(j)
                    refs_left[table[j]] = refs - 1
            plan.append((copies, max(0, last + 1 - len(table))))
        return plan

    def free_blocks(self) -> list[int]:
        """The free list, in the order blocks will be handed out."""
        return list(self._free)

    def _check_id(self, block: int) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or not (
            0 <= block < self.num_blocks
        ):
            raise InputError(f"BlockPool: block id {block!r} not in 0..{self.num_blocks - 1}")

    def __repr__(self) -> str:
        return f"BlockPool({self.num_used} used, {self.num_free} free of {self.num_blocks})"
