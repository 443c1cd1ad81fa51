"""serving/scheduler.py: the step plans over a real (tiny) KVCache, without a model.

A step is simulated the way the engine runs it: ``prepare_step`` of the items, ``commit_step``,
``num_computed`` grows, and an item that samples appends a made-up next token. Checked: every
running decode gets its token each step, the token budget and batch limit hold, long prompts
are chunked, admission is first come first served within blocks, preemption takes the newest
request and it is recomputed later, and every block is back in the pool at the end.
"""

from __future__ import annotations

import random

import pytest
import torch

from transfuse.errors import InputError
from transfuse.runtime.kv_cache import KVCache
from transfuse.runtime.sampling import SamplingParams
from transfuse.serving.request import Request, RequestHandle
from transfuse.serving.scheduler import Scheduler

BLOCK = 4


def cache(num_blocks: int = 32, layout: str = "paged", max_batch: int = 4) -> KVCache:
    kw = {"block_size": BLOCK, "num_blocks": num_blocks} if layout == "paged" else {}
    return KVCache(1, 1, 2, max_seq_len=64, max_batch=max_batch, layout=layout, **kw)


def request(rid: int, prompt: int, new: int = 8) -> Request:
    handle = RequestHandle(rid, prompt, lambda _: None)
    return Request(rid, handle, [rid % 7 + 1] * prompt, max_new_tokens=new,
                   params=SamplingParams(), generator=torch.Generator(), stop_ids=())


def run(sched: Scheduler, spec_k=None) -> list:
    """One simulated step; returns the items. Finished requests (max_new_tokens) leave."""
    decodes = [r for r in sched.running if r.owed == 1]
    items = sched.schedule(spec_k)
    if not items:
        return items
    sched.cache.prepare_step([(it.req.seq_id, it.num_tokens) for it in items])
    sched.cache.commit_step()
    for it in items:
        it.req.num_computed += it.num_tokens
        assert sched.cache.length(it.req.seq_id) == it.req.num_computed
    scheduled = {id(it.req) for it in items}
    assert all(id(r) in scheduled for r in decodes if r.seq_id is not None), \
        "a running decode was skipped"
    for it in items:
        if it.samples:
            it.req.tokens.append(len(it.req.tokens) % 50)
            if it.req.num_generated >= it.req.max_new_tokens:
                sched.finish(it.req)
    return items


def test_decodes_first_then_prompt_chunks():
    sched = Scheduler(cache(), max_batch=4, max_tokens_per_step=16)
    a, b = request(0, 3), request(1, 5)
    sched.add(a)
    sched.add(b)
    items = run(sched)  # both prompts fit in one step: 3 + 5 tokens, both sample
    assert [(it.req.id, it.num_tokens, it.samples) for it in items] == [(0, 3, True), (1, 5, True)]
    long = request(2, 40)
    sched.add(long)
    items = run(sched)
    # the two decodes first (1 token each), then a 14-token chunk of the long prompt
    assert [(it.req.id, it.num_tokens, it.samples, it.decode) for it in items] == [
        (0, 1, True, True), (1, 1, True, True), (2, 14, False, False)]
    items = run(sched)
    assert [(it.req.id, it.num_tokens) for it in items] == [(0, 1), (1, 1), (2, 14)]
    items = run(sched)  # the last 12 prompt tokens: the chunk that samples
    assert [(it.req.id, it.num_tokens, it.samples) for it in items] == [
        (0, 1, True), (1, 1, True), (2, 12, True)]
    assert long.num_generated == 1


def test_budget_batch_and_blocks_hold_under_random_traffic():
    rng = random.Random(0)
    c = cache(num_blocks=20)
    sched = Scheduler(c, max_batch=3, max_tokens_per_step=12)
    reqs = [request(i, rng.randint(1, 30), rng.randint(1, 20)) for i in range(25)]
    pending = list(reqs)
    steps = 0
    while pending or sched.has_work():
        for _ in range(rng.randint(0, 2)):
            if pending:
                sched.add(pending.pop(0))
        items = run(sched)
        steps += 1
        assert sum(it.num_tokens for it in items) <= 12
        assert len(sched.running) <= 3
        assert len({id(it.req) for it in items}) == len(items)
        assert steps < 2000
    assert all(r.num_generated == r.max_new_tokens for r in reqs)
    assert c.pool.num_free == 20 and len(c) == 0
    assert sched.num_preemptions > 0  # 20 blocks of 4 for 3 requests of up to 50 tokens


def test_preempts_the_newest_request_and_recomputes_it():
    c = cache(num_blocks=4)  # 16 token slots
    sched = Scheduler(c, max_batch=4, max_tokens_per_step=16)
    old, new = request(0, 4, new=12), request(1, 4, new=12)
    sched.add(old)
    sched.add(new)
    run(sched)  # 4 + 4 prompt tokens: 2 blocks, both sample
    run(sched)  # decodes at length 4 need a block each: 4 blocks used
    assert c.pool.num_free == 0
    for _ in range(3):
        run(sched)  # fill the blocks up to 8 tokens each
    assert (old.num_computed, new.num_computed) == (8, 8)
    items = run(sched)  # old needs a third block: the newest (new) is preempted
    assert [it.req.id for it in items] == [0]
    assert new.seq_id is None and new.num_computed == 0 and new.preemptions == 1
    assert list(sched.waiting) == [new] and sched.num_preemptions == 1
    generated = new.generated()
    while new.seq_id is None:
        run(sched)
    # re-admitted once old finished: its whole context (prompt + generated) is recomputed
    assert old.num_generated == 12 and old.seq_id is None
    assert new.generated()[:len(generated)] == generated
    while sched.has_work():
        run(sched)
    assert new.num_generated == 12 and c.pool.num_free == 4


def test_newest_preempts_itself_and_no_admission_after_a_preemption():
    c = cache(num_blocks=3)
    sched = Scheduler(c, max_batch=4, max_tokens_per_step=16)
    old, new = request(0, 7, new=4), request(1, 4, new=8)
    sched.add(old)
    sched.add(new)
    run(sched)  # old: 7 tokens in 2 blocks, new: 4 in 1 block, pool empty
    late = request(2, 1)
    sched.add(late)
    items = run(sched)  # old's token fits its second block; new needs a block: none free
    assert [it.req.id for it in items] == [0] and old.seq_id is not None
    assert new.seq_id is None and new.preemptions == 1
    assert list(sched.waiting) == [new, late]  # late is not admitted in a preempting step
    assert c.pool.num_free == 1


def test_admission_is_first_come_first_served_within_blocks():
    c = cache(num_blocks=4)
    sched = Scheduler(c, max_batch=4, max_tokens_per_step=64)
    big, small = request(0, 20), request(1, 2)  # big needs 5 blocks: more than the pool
    first = request(2, 12)  # 3 blocks
    sched.add(first)
    sched.add(big)
    sched.add(small)
    items = run(sched)
    assert [it.req.id for it in items] == [2]  # big waits at the head; small waits behind it
    assert list(sched.waiting) == [big, small]


def test_contiguous_admission_is_bounded_by_slots():
    c = cache(layout="contiguous", max_batch=2)
    sched = Scheduler(c, max_batch=4, max_tokens_per_step=64)
    for i in range(3):
        sched.add(request(i, 3))
    items = run(sched)
    assert [it.req.id for it in items] == [0, 1] and len(sched.waiting) == 1


def test_speculative_reservation_within_budget_and_blocks():
    c = cache(num_blocks=32)
    sched = Scheduler(c, max_batch=4, max_tokens_per_step=6)
    a, b = request(0, 3), request(1, 3)
    sched.add(a)
    sched.add(b)
    run(sched)
    items = sched.schedule(lambda req: 4)
    # a reserves 1 + 4 tokens; b gets what is left of the budget of 6: its token alone
    assert [(it.req.id, it.num_tokens, it.decode) for it in items] == [(0, 5, True), (1, 1, True)]
    c.prepare_step([(it.req.seq_id, 1) for it in items])  # the engine shrinks empty drafts
    c.commit_step()


def test_drafts_never_take_a_decode_token():
    c = cache(num_blocks=32)
    sched = Scheduler(c, max_batch=4, max_tokens_per_step=4)
    reqs = [request(i, 1) for i in range(4)]
    for r in reqs:
        sched.add(r)
    run(sched)
    items = sched.schedule(lambda req: 4)  # a budget of 4 for 4 decodes: no room for drafts
    assert [(it.req.id, it.num_tokens) for it in items] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    c.prepare_step([(it.req.seq_id, 1) for it in items])
    c.commit_step()
    for it in items:
        it.req.num_computed += 1
        it.req.tokens.append(5)
    sched.max_tokens_per_step = 6  # 2 spare tokens: the oldest decodes get them
    items = sched.schedule(lambda req: 4)
    assert [it.num_tokens for it in items] == [3, 1, 1, 1]


def test_unstick_preempts_the_newest_running_request():
    c = cache(num_blocks=8)
    sched = Scheduler(c, max_batch=4, max_tokens_per_step=16)
    a, b = request(0, 10), request(1, 3)
    sched.add(a)
    sched.add(b)
    assert len(sched.schedule()) == 2  # admits both (nothing runs: a plan only)
    assert sched.unstick() is b and b.seq_id is None and list(sched.waiting) == [b]
    assert sched.unstick() is a and sched.unstick() is None
    assert c.pool.num_free == 8


def test_speculative_draft_is_dropped_before_preempting():
    c = cache(num_blocks=2)
    sched = Scheduler(c, max_batch=4, max_tokens_per_step=16)
    a = request(0, 3)
    b = request(1, 4)
    sched.add(a)
    sched.add(b)
    run(sched)  # a: 3 tokens in block 0, b: 4 tokens in block 1; pool empty
    items = sched.schedule(lambda req: 3)  # a's draft would need a new block: decoded plainly
    assert [(it.req.id, it.num_tokens) for it in items][0] == (0, 1)


def test_finish_frees_blocks_at_once_and_cancels_waiting():
    c = cache(num_blocks=8)
    sched = Scheduler(c, max_batch=1, max_tokens_per_step=16)
    a, b = request(0, 9), request(1, 3)
    sched.add(a)
    sched.add(b)
    run(sched)
    assert c.pool.num_free == 5
    sched.finish(a)
    assert c.pool.num_free == 8 and a.seq_id is None and not sched.running
    sched.finish(b)  # still waiting: just leaves the queue
    assert not sched.has_work()


def test_budget_below_batch_is_refused():
    with pytest.raises(InputError, match="max_tokens_per_step 2 must be >= max_batch 4"):
        Scheduler(cache(), max_batch=4, max_tokens_per_step=2)
