"""KVCache against a simple model of the expected state: many seeded random add / extend /
fork / free / step / abort sequences, for both layouts and both orders.

The model holds, per sequence, the values written at each position and how many tokens were
reserved; the cache must read every sequence back equal (through the oracle scatter/gather of
kv_reference), hold exactly ceil(reserved / block_size) blocks, keep reference counts equal to
the number of block tables naming a block, never hand out a block twice, and refuse exactly
the steps that need more blocks (or slots, or max_seq_len) than there are, changing nothing.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from kv_reference import read_seq, write_step

from transfuse.errors import InputError
from transfuse.runtime.kv_cache import KVCache

MAX_LEN, BS, LAYERS = 24, 4, 2


class Model:
    def __init__(self):
        self.values: dict[int, list[float]] = {}  # seq -> value written at each position
        self.reserved: dict[int, int] = {}  # seq -> tokens of room reserved
        self.next_value = 1.0
        self.events: dict[str, int] = {}  # what the run went through, to check it is thorough

    def saw(self, event: str) -> None:
        self.events[event] = self.events.get(event, 0) + 1

    def fresh(self, n: int) -> list[float]:
        vals = [self.next_value + i for i in range(n)]
        self.next_value += n
        return vals


def holders(cache: KVCache) -> dict[int, int]:
    count: dict[int, int] = {}
    for s in cache.seq_ids():
        for b in cache.block_table(s):
            count[b] = count.get(b, 0) + 1
    return count


def blocks_needed(cache: KVCache, items) -> int:
    """Blocks a step takes, computed from the observable tables (new + copy-on-write)."""
    refs = holders(cache)
    need = 0
    for sid, n in items:
        table, length = cache.block_table(sid), cache.length(sid)
        last = (length + n - 1) // BS
        need += max(0, last + 1 - len(table))
        for j in range(length // BS, min(last + 1, len(table))):
            if refs[table[j]] > 1:
                need += 1
                refs[table[j]] -= 1
    return need


def check(cache: KVCache, model: Model) -> None:
    assert sorted(cache.seq_ids()) == sorted(model.values)
    for s, vals in model.values.items():
        assert cache.length(s) == len(vals)
        for layer in range(LAYERS):
            k, v = read_seq(cache, s, layer)
            want = torch.tensor(vals).view(-1, 1, 1).expand_as(k) * 10 + layer
            assert torch.equal(k, want) and torch.equal(v, -want), (s, layer)
    report = cache.memory_report()
    if cache.paged:
        refs = holders(cache)
        assert all(cache.ref_count(b) == refs.get(b, 0) for b in range(cache.num_blocks))
        free = cache.pool.free_blocks()
        assert len(free) == len(set(free)) and not set(free) & set(refs)
        assert report["blocks_used"] == len(refs) == cache.num_blocks - len(free)
        for s, vals in model.values.items():
            assert len(cache.block_table(s)) == math.ceil(model.reserved[s] / BS)
            if model.reserved[s] == len(vals):
                assert len(cache.block_table(s)) * BS - len(vals) < BS  # waste < 1 block
    else:
        slots = [cache.slot(s) for s in model.values]
        assert len(set(slots)) == len(slots) and all(0 <= x < cache.max_batch for x in slots)
    assert report["tokens"] == sum(len(v) for v in model.values.values())


def snapshot(cache: KVCache):
    tables = {s: (cache.block_table(s) if cache.paged else cache.slot(s)) for s in cache.seq_ids()}
    return tables, cache.memory_report(), [t.clone() for t in cache.k + cache.v]


def same(a, b) -> bool:
    return a[:2] == b[:2] and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def run_step(cache: KVCache, model: Model, items, rng: random.Random) -> None:
    over = any(len(model.values[s]) + n > MAX_LEN for s, n in items)
    short = cache.paged and not over and blocks_needed(cache, items) > cache.pool.num_free
    if over or short:
        before = snapshot(cache)
        with pytest.raises(InputError, match="max_seq_len" if over else "blocks"):
            cache.prepare_step(items)
        assert same(before, snapshot(cache))
        model.saw("too long" if over else "out of blocks")
        return
    if cache.paged:
        refs = holders(cache)
        shared = {s for s, _ in items if any(refs[b] > 1 for b in cache.block_table(s))}
    meta = cache.prepare_step(items)
    if cache.paged and shared:
        model.saw("step of a sharing sequence")
    vals = [v for _, n in items for v in model.fresh(n)]
    t = torch.tensor(vals).view(-1, 1, 1).expand(-1, cache.kv_heads, cache.head_dim)
    for layer in range(LAYERS):
        write_step(cache, meta, layer, t * 10 + layer, -(t * 10 + layer))
    if rng.random() < 0.1:  # the step "failed": nothing may grow, reservations go back
        cache.abort_step()
        model.saw("abort")
        for s, _ in items:
            model.reserved[s] = len(model.values[s])
        return
    cache.commit_step()
    model.saw("step")
    row = 0
    for s, n in items:
        model.values[s] += vals[row:row + n]
        model.reserved[s] = max(model.reserved[s], len(model.values[s]))
        row += n


def one_op(cache: KVCache, model: Model, rng: random.Random, next_id: list[int]) -> None:
    live = list(model.values)
    op = rng.choices(["add", "step", "fork", "free", "extend"], [3, 6, 2, 3, 1])[0]
    if op == "add" or not live:
        sid, next_id[0] = next_id[0], next_id[0] + 1
        n = rng.randint(1, MAX_LEN)
        before = snapshot(cache)
        if cache.paged:
            full = math.ceil(n / BS) > cache.pool.num_free
        else:
            full = len(live) == cache.max_batch
        if full:
            with pytest.raises(InputError, match="blocks" if cache.paged else "no free slot"):
                cache.add(sid, n)
            assert same(before, snapshot(cache))
            model.saw("add refused")
            return
        cache.add(sid, n)
        model.values[sid], model.reserved[sid] = [], n
    elif op == "step":
        room = {s: MAX_LEN - len(model.values[s]) for s in live}
        growing = [s for s in live if room[s] > 0] or live
        chosen = rng.sample(growing, rng.randint(1, len(growing)))
        items = [(s, min(rng.choice([1, 1, 1, 2, 5, room[s]]), room[s]) or 1) for s in chosen]
        if rng.random() < 0.05:
            items[0] = (items[0][0], MAX_LEN + 1 - len(model.values[items[0][0]]))
        run_step(cache, model, items, rng)
    elif op == "fork":
        parent = rng.choice(live)
        sid, next_id[0] = next_id[0], next_id[0] + 1
        if not cache.paged and len(live) == cache.max_batch:
            with pytest.raises(InputError, match="no free slot"):
                cache.fork(parent, sid)
            return
        cache.fork(parent, sid)
        model.saw("fork")
        model.values[sid] = list(model.values[parent])
        model.reserved[sid] = len(model.values[parent])
    elif op == "free":
        sid = rng.choice(live)
        cache.free(sid)
        del model.values[sid], model.reserved[sid]
    else:  # extend: reserve ahead
        sid = rng.choice(live)
        n = rng.randint(1, 6)
        length = len(model.values[sid])
        if length + n > MAX_LEN:
            with pytest.raises(InputError, match="max_seq_len"):
                cache.extend(sid, n)
            return
        if cache.paged and blocks_needed(cache, [(sid, n)]) > cache.pool.num_free:
            with pytest.raises(InputError, match="blocks"):
                cache.extend(sid, n)
            return
        cache.extend(sid, n)
        model.saw("extend")
        model.reserved[sid] = max(model.reserved[sid], length + n)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("order", ["token-major", "head-major"])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_random_operations_match_the_model(layout, order, seed):
    rng = random.Random(seed)
    kw = dict(block_size=BS, num_blocks=20) if layout == "paged" else {}
    cache = KVCache(LAYERS, 2, 2, max_seq_len=MAX_LEN, max_batch=4, layout=layout, order=order,
                    **kw)
    model, next_id = Model(), [0]
    for _ in range(400):
        one_op(cache, model, rng, next_id)
        check(cache, model)
    for s in list(model.values):
        cache.free(s)
    assert cache.memory_report()["sequences"] == 0
    if cache.paged:
        assert cache.memory_report()["blocks_free"] == cache.num_blocks
        assert all(cache.ref_count(b) == 0 for b in range(cache.num_blocks))
    assert model.events["step"] > 50
    want = {"fork", "abort", "too long", "add refused", "extend"}
    if cache.paged:
        want |= {"out of blocks", "step of a sharing sequence"}
    assert want <= set(model.events), model.events  # the run went through every case
