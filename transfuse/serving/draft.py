"""DraftModel: a smaller compiled model with the target's tokenizer proposes the next k tokens.

Glossary: B requests asking in one call, k tokens proposed per request, V the draft's
vocabulary, n_b the context tokens of request b the draft has not run yet.

The draft is a :class:`~transfuse.runtime.generation_model.GenerationModel` with a KV cache of
its own (made from its cache spec; its ``generate()`` cache is left alone). For each request
the draft's cache holds a prefix of the request's context (the request id is its sequence
id). One :meth:`DraftModel.propose_batch` call runs:

1. **catch-up**: one batched step with every request's unseen context tokens (a new
   request's whole prompt, else the tokens the target accepted or emitted since the last
   call); its logits at each request's last token give d_1;
2. **drafting**: k - 1 batched decode steps, each feeding d_j and giving d_{j+1} (d_k is
   never fed: the next catch-up feeds whatever the target kept).

The drafts are chosen as the target would choose them (``process_logits`` with the request's
params, its context + the drafts so far as history): greedy requests take the argmax (the
proposal is deterministic), sampled ones draw from the processed distribution q with the
request's generator and return q with the proposal (what ``verify`` needs).

Rollback: the cached prefix is compared with each new context, so tokens the target rejected
are dropped (``KVCache.truncate``) even without :meth:`rollback`; :meth:`rollback` says it
early. A request that finds no room (no free slot or blocks in the draft's cache, or more
than ``max_batch`` requests tracked) gets an empty proposal: it decodes plainly that step.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from transfuse.errors import ExecutionError, InputError
from transfuse.runtime.generate import chunk_steps
from transfuse.runtime.generation_model import make_cache
from transfuse.runtime.sampling import process_logits, seen_tokens
from transfuse.serving.proposal import DraftRequest, Proposal

log = logging.getLogger(__name__)


class _Drafting:
    """One request inside one propose_batch call (private)."""

    __slots__ = ("req", "k", "feed", "drafts", "probs", "seen")

    def __init__(self, req: DraftRequest, k: int, feed: list[int]) -> None:
        self.req, self.k, self.feed = req, k, feed
        self.drafts: list[int] = []
        self.probs: list[torch.Tensor] = []
        self.seen: torch.Tensor | None = None  # bool [1, V]: context + drafts (penalty only)


class DraftModel:
    """Proposals from a draft GenerationModel with its own KV cache (module docstring)."""

    def __init__(self, draft_gen: Any, *, max_batch: int | None = None,
                 device: str | torch.device | None = None,
                 vocab_size: int | None = None) -> None:
        """``max_batch``: requests drafted for at once (default: the draft's compiled
        max_batch); ``vocab_size``: the target's vocabulary when the draft's head is wider
        (padded): drafts and q are then over the target's ids only, so the target can run
        every draft and q stays the distribution the drafts were drawn from."""
        spec = draft_gen.cache_spec
        if vocab_size is not None and (isinstance(vocab_size, bool)
                                       or not isinstance(vocab_size, int) or vocab_size < 1):
            raise InputError(f"DraftModel: vocab_size must be an int >= 1, got {vocab_size!r}")
        if max_batch is None:
            max_batch = spec["max_batch"]
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"DraftModel: max_batch must be an int >= 1, got {max_batch!r}")
        if spec["layout"] == "contiguous" and max_batch > spec["max_batch"]:
            raise InputError(f"DraftModel: max_batch {max_batch} exceeds the draft's compiled "
                             f"max_batch {spec['max_batch']} (contiguous cache slots)")
        self.gen = draft_gen
        self.max_batch = max_batch
        self.cache = make_cache(spec, draft_gen.device if device is None else device)
        self.vocab_size = draft_gen.vocab_size if vocab_size is None \
            else min(vocab_size, draft_gen.vocab_size)
        self._step = draft_gen.step_for(self.cache)
        self._max_step_tokens = spec["max_step_tokens"]
        self._tokens: dict[Hashable, list[int]] = {}  # what the draft cache holds per request
        self.counters = {"calls": 0, "steps": 0, "catch_up_tokens": 0, "proposed": 0,
                         "no_room": 0}

    # -- the proposer interface -------------------------------------------------------------

    def propose_batch(self, reqs: Sequence[DraftRequest], k: int) -> list[Proposal]:
        """One proposal per request (module docstring); empty where it cannot draft."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"DraftModel.propose_batch: k must be an int >= 0, got {k!r}")
        ids = [r.request_id for r in reqs]
        if len(set(ids)) != len(ids):
            raise InputError(f"DraftModel.propose_batch: a request appears twice in {ids}")
        self.counters["calls"] += 1
        out = {r.request_id: Proposal() for r in reqs}
        work = [w for w in (self._admit(r, k) for r in reqs) if w is not None]
        if work:
            try:
                self._draft(work)
            except BaseException:  # cached lengths no longer match what is recorded: forget
                for w in work:
                    self.release(w.req.request_id)
                raise
            for w in work:
                self._tokens[w.req.request_id] = w.req.context + w.drafts[:-1]
                probs = torch.stack(w.probs) if w.req.params.do_sample else None
                out[w.req.request_id] = Proposal(w.drafts, probs)
                self.counters["proposed"] += len(w.drafts)
        return [out[r.request_id] for r in reqs]

    def rollback(self, request_id: Hashable, keep_len: int) -> None:
        """Only the first ``keep_len`` context tokens of the request are still valid."""
        if isinstance(keep_len, bool) or not isinstance(keep_len, int) or keep_len < 0:
            raise InputError(f"DraftModel.rollback: keep_len of request {request_id!r} must be "
                             f"an int >= 0, got {keep_len!r}")
        have = self._tokens.get(request_id)
        if have is not None and keep_len < len(have):
            self._truncate(request_id, keep_len)

    def release(self, request_id: Hashable) -> None:
        """Forget the request and free its draft cache (unknown ids: nothing to do)."""
        if self._tokens.pop(request_id, None) is not None:
            self.cache.free(request_id)

    def close(self) -> None:
        """Release every request."""
        for rid in list(self._tokens):
            self.release(rid)

    def cached_len(self, request_id: Hashable) -> int:
        """Context tokens of the request in the draft's cache (0: none / unknown)."""
        return len(self._tokens.get(request_id, ()))

    # -- internals --------------------------------------------------------------------------

    def _admit(self, req: DraftRequest, k: int) -> _Drafting | None:
        """Sync the request's cached prefix with its context and reserve room for the call;
        None when it cannot draft now."""
        ctx, rid = req.context, req.request_id
        if not ctx:
            raise InputError(f"DraftModel: request {rid!r} has an empty context")
        k = min(req.want(k), self.cache.max_seq_len - len(ctx) + 1)  # d_1..d_{k-1} are fed
        if k < 1:
            return None
        have = self._tokens.get(rid)
        if have is None:
            if len(self._tokens) >= self.max_batch or not self._try(self.cache.add, rid, 1):
                self.counters["no_room"] += 1
                return None
            have = self._tokens[rid] = []
        keep = _common_prefix(have, ctx, len(ctx) - 1)  # the last token is always run
        if keep < len(have):
            self._truncate(rid, keep)
            if rid not in self._tokens:  # truncated to nothing: registered afresh
                return self._admit(req, k)
        feed = ctx[keep:]
        if not self._try(self.cache.extend, rid, len(feed) + k - 1):
            self.counters["no_room"] += 1
            return None
        return _Drafting(req, k, feed)

    def _try(self, fn, rid: Hashable, n: int) -> bool:
        try:
            fn(rid, n)
        except InputError as exc:  # no slot / blocks: this request does not draft now
            log.debug("draft cache has no room for request %r: %s", rid, exc)
            return False
        return True

    def _truncate(self, rid: Hashable, keep: int) -> None:
        if keep == 0:  # nothing valid: start the sequence over
            self.release(rid)
            return
        self.cache.truncate(rid, keep)
        del self._tokens[rid][keep:]

    def _draft(self, work: list[_Drafting]) -> None:
        """The catch-up step, then k - 1 decode steps (each over the requests still drafting)."""
        logits = self._run([(w.req.request_id, w.feed) for w in work])
        self.counters["catch_up_tokens"] += sum(len(w.feed) for w in work)
        self._choose(work, logits)
        active = [w for w in work if len(w.drafts) < w.k]
        while active:
            logits = self._run([(w.req.request_id, [w.drafts[-1]]) for w in active])
            self._choose(active, logits)
            active = [w for w in active if len(w.drafts) < w.k]

    def _run(self, items: list[tuple[Hashable, list[int]]]) -> torch.Tensor:
        """The items' tokens through the draft, one step or (past the draft's
        ``max_step_tokens``) several; logits [B, V] at each item's last token."""
        steps = chunk_steps([len(toks) for _, toks in items], self._max_step_tokens)
        if len(steps) == 1:
            return self._run_step(items)
        rows: list[torch.Tensor | None] = [None] * len(items)
        for chunk in steps:
            logits = self._run_step([(items[i][0], items[i][1][start:start + n])
                                     for i, start, n in chunk])
            for j, (i, start, n) in enumerate(chunk):
                if start + n == len(items[i][1]):
                    rows[i] = logits[j]
        return torch.stack(rows)

    def _run_step(self, items: list[tuple[Hashable, list[int]]]) -> torch.Tensor:
        """One draft step; logits [B, V] at each item's last token."""
        meta = self.cache.prepare_step([(rid, len(toks)) for rid, toks in items])
        try:
            ids = torch.tensor([[t for _, toks in items for t in toks]], dtype=torch.int64)
            logits = self._step(ids, meta)
            if not isinstance(logits, torch.Tensor) or tuple(logits.shape[:1]) != (len(items),):
                raise ExecutionError(f"the draft step returned {type(logits).__name__} "
                                     f"{getattr(logits, 'shape', '')}; expected [{len(items)}, V]")
        except BaseException:
            self.cache.abort_step()
            raise
        self.cache.commit_step()
        self.counters["steps"] += 1
        return logits[:, :self.vocab_size]

    def _choose(self, work: list[_Drafting], logits: torch.Tensor) -> None:
        """Append each request's next draft (and, sampled, its q) from its logits row."""
        plain = [row for row, w in enumerate(work) if _plain_greedy(w)]
        if plain:  # no processor changes the argmax: one batched argmax for those rows
            best = logits[plain].max(dim=-1).indices.tolist()
            for row, token in zip(plain, best):
                work[row].drafts.append(token)
        done = set(plain)
        for row, w in enumerate(work):
            if row in done:
                continue
            params, vocab = w.req.params, logits.shape[-1]
            if params.repetition_penalty != 1.0 and w.seen is None:
                ids = torch.tensor(w.req.context, dtype=torch.int64, device=logits.device)
                w.seen = seen_tokens(ids[None], vocab)
            scores = process_logits(logits[row:row + 1], w.seen, params,
                                    w.req.new_tokens + len(w.drafts))
            if params.do_sample:
                q = scores.softmax(dim=-1)[0]
                g = w.req.generator
                token = int(torch.multinomial(q if g is None else q.to(g.device), 1,
                                              generator=g))
                w.probs.append(q)
            else:
                token = int(scores[0].max(dim=-1).indices)
            w.drafts.append(token)
            if w.seen is not None and token < vocab:
                w.seen[0, token] = True


def _plain_greedy(w: _Drafting) -> bool:
    """Greedy with no processor in effect at this draft (argmax of the raw logits)."""
    p = w.req.params
    return not p.do_sample and p.repetition_penalty == 1.0 and (
        not p.eos_token_id or w.req.new_tokens + len(w.drafts) >= p.min_new_tokens)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``."""
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


__all__ = ["DraftModel"]
