"""The scheduler: which requests run how many tokens in the next step, within a token budget.

Glossary: B requests of a step, N tokens of a step (``max_tokens_per_step`` at most), BS the
cache's block size, k draft tokens of a speculative decode.

There are no prefill and decode phases, only tokens owed: a request owes the context tokens
(prompt + generated) whose K/V are not yet in the KV cache — its whole prompt when admitted,
then 1 per step (the token it just sampled). Each step (vLLM v1's scheduler is the model):

1. **decodes**: every running request that owes one token gets it (1 + k with speculation),
   oldest first. When the block pool cannot hold a decode's next block, the newest running
   request is *preempted* (its blocks freed, back to the front of the waiting queue with its
   prompt + generated tokens as the prompt to recompute) until it fits, or the request
   preempts itself when it is the newest.
2. **prompt chunks** of running requests still in prefill, oldest first, as far as the budget
   reaches (chunked prefill: a long prompt takes several steps and never starves decodes).
3. **admission** of waiting requests, first come first served, while the batch has room
   (``max_batch``), the budget has tokens, and the pool the blocks of the whole prompt
   (``KVCache.add`` reserves them); none in a step that preempted.

An item *samples* when its tokens reach the end of the request's context: its last row's
logits choose the next token (a prompt's last chunk, a decode). The scheduler decides and
reserves; the engine runs the step (``KVCache.prepare_step`` of the items, the forward,
``commit_step``). Block counts are conservative (the decodes' together, every other item's
alone: a block shared by two writers is counted twice, never too few), so ``prepare_step``
never runs out of blocks. Only the engine thread calls this.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from transfuse.errors import InputError
from transfuse.runtime.kv_cache import KVCache
from transfuse.serving.request import Request


@dataclass(slots=True)
class Scheduled:
    """One item of a step: ``num_tokens`` context tokens of ``req`` from ``req.num_computed``
    on; ``samples``: its last row gives logits. A ``decode`` item reserves ``num_tokens - 1``
    draft tokens (speculation); the engine fills ``draft`` (at most that many) and then runs
    the last context token followed by the draft, with logits at all of those rows."""

    req: Request
    num_tokens: int
    samples: bool
    decode: bool = False
    draft: list[int] = field(default_factory=list)


class Scheduler:
    """Waiting queue and running batch over one :class:`KVCache` (module docstring).

    ``prefix_tokens``: pass each prompt's ids to ``KVCache.add`` (prefix caching on).
    """

    def __init__(self, cache: KVCache, *, max_batch: int, max_tokens_per_step: int,
                 prefix_tokens: bool = False):
        if max_tokens_per_step < max_batch:
            raise InputError(f"max_tokens_per_step {max_tokens_per_step} must be >= max_batch "
                             f"{max_batch}: every running decode needs a token per step")
        self.cache = cache
        self.max_batch = max_batch
        self.max_tokens_per_step = max_tokens_per_step
        self.prefix_tokens = prefix_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last is the newest
        self.num_preemptions = 0
        self.preempted_last_step = False  # schedule() preempted: it admitted nobody then

    # -- queue ------------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        """Queue a new request at the back."""
        self.waiting.append(req)

    def finish(self, req: Request) -> None:
        """Take ``req`` out (finished or cancelled) and give its cache blocks back at once."""
        if req.seq_id is not None:
            self.running.remove(req)
            self.cache.free(req.seq_id)
            req.seq_id = None
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass  # neither waiting nor running: finished already

    def preempt(self, req: Request) -> None:
        """Free ``req``'s blocks and put it at the front of the queue; its context (prompt +
        generated tokens) is recomputed when it is admitted again."""
        self.running.remove(req)
        self.cache.free(req.seq_id)
        req.seq_id = None
        req.num_computed = 0
        req.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def unstick(self) -> Request | None:
        """When :meth:`schedule` found nothing to run: preempt the newest running request (a
        prompt chunk waiting for a copy-on-write block nobody frees) and return it; None when
        nothing runs."""
        if not self.running:
            return None
        victim = self.running[-1]
        self.preempt(victim)
        return victim

    # -- one step ---------------------------------------------------------------------------

    def schedule(self, spec_k: Callable[[Request], int] | None = None) -> list[Scheduled]:
        """The items of the next step (module docstring); admits and preempts as it goes.
        ``spec_k(req)``: the draft tokens to reserve for a decode (speculation; None: 0)."""
        budget = self.max_tokens_per_step
        items: list[Scheduled] = []
        planned = 0  # blocks the items will take from the pool
        preempted = False
        # 1. decodes, oldest first; the newest running requests make room when blocks run out.
        # Drafts only come out of the budget left after one token per decode.
        decodes = [r for r in self.running if r.owed == 1]
        spare = budget - len(decodes)
        want = []
        for req in decodes:
            k = min(spec_k(req), spare) if spec_k is not None and spare > 0 else 0
            spare -= k
            want.append(1 + k)
        together = self._blocks_of(decodes, want) if decodes else 0
        if together <= self._free():
            # the common case: they all fit, one look at the pool for the lot
            planned = together
            items = [Scheduled(r, n, True, decode=True) for r, n in zip(decodes, want)]
            budget -= sum(want)
        else:
            for req, n in zip(decodes, want):
                if req.seq_id is None:
                    continue  # preempted to make room for an older decode
                need = self._blocks(req, n)
                if n > 1 and need > self._free() - planned:
                    n, need = 1, self._blocks(req, 1)  # drop the draft before preempting
                while need > self._free() - planned:
                    victim = self.running[-1]
                    self.preempt(victim)
                    preempted = True
                    if victim is req:
                        break
                if req.seq_id is None:  # it was the newest and preempted itself
                    break
                items.append(Scheduled(req, n, True, decode=True))
                planned += need
                budget -= n
        # 2. prompt chunks of running requests in prefill
        for req in self.running:
            owed = req.owed
            if owed <= 1 or budget == 0:
                continue
            n = min(owed, budget)
            need = self._blocks(req, n)
            if need > self._free() - planned:
                continue  # a copy-on-write block it cannot get now; it waits a step
            items.append(Scheduled(req, n, n == owed))
            planned += need
            budget -= n
        self.preempted_last_step = preempted
        # 3. admission, first come first served
        while self.waiting and budget > 0 and not preempted \
                and len(self.running) < self.max_batch:
            req = self.waiting[0]
            total = len(req.tokens)
            if not self._room_for(total, planned):
                break
            self.waiting.popleft()
            self._admit(req)
            n = min(req.owed, budget)
            need = self._blocks(req, n)  # copy-on-write of a shared partial block, if any
            items.append(Scheduled(req, n, n == req.owed))
            planned += need
            budget -= n
        return items

    # -- internals --------------------------------------------------------------------------

    def _admit(self, req: Request) -> None:
        req.admissions += 1
        req.seq_id = (req.id, req.admissions)
        if self.prefix_tokens and req.prompt_lps is None:  # (prompt log-probabilities need
            # every prompt position computed: no cached prefix for those requests)
            cached = self.cache.add(req.seq_id, len(req.tokens), tokens=list(req.tokens))
        else:
            cached = self.cache.add(req.seq_id, len(req.tokens))
        req.num_computed = int(cached or 0)
        if req.admissions == 1:
            req.cached_tokens = req.num_computed
        self.running.append(req)

    def _free(self) -> int:
        """Free blocks of a paged pool (a contiguous cache needs none per step)."""
        return self.cache.pool.num_free if self.cache.paged else 0

    def _blocks(self, req: Request, n: int) -> int:
        """Blocks a step of ``n`` tokens of ``req`` takes (new + copy-on-write)."""
        if not self.cache.paged:
            return 0
        return self.cache.blocks_needed([(req.seq_id, n)])

    def _blocks_of(self, reqs: list[Request], sizes: list[int]) -> int:
        """Blocks one step of ``sizes[i]`` tokens of each of ``reqs`` takes together."""
        if not self.cache.paged:
            return 0
        return self.cache.blocks_needed([(r.seq_id, n) for r, n in zip(reqs, sizes)])

    def _room_for(self, total: int, planned: int) -> bool:
        """Can ``KVCache.add`` reserve a prompt of ``total`` tokens besides the planned blocks?"""
        cache = self.cache
        if not cache.paged:
            return len(cache) < cache.max_batch
        return math.ceil(total / cache.block_size) <= cache.pool.num_free - planned

    def __repr__(self) -> str:
        return (f"Scheduler({len(self.running)} running, {len(self.waiting)} waiting, "
                f"{self.num_preemptions} preemptions)")


__all__ = ["Scheduler", "Scheduled"]
