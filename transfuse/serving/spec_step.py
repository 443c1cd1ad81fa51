"""The engine's side of speculative decoding: which decodes speculate, proposals, verification.

Glossary: k draft tokens of one request in one step, N tokens of a step, m tokens a
speculative step emits for a request (1..k+1).

:class:`SpecDecoding` wraps a proposer (:class:`~transfuse.serving.prompt_lookup.PromptLookup`,
:class:`~transfuse.serving.draft.DraftModel` or anything with ``propose_batch`` / ``rollback``
/ ``release``) and a :class:`~transfuse.serving.spec_policy.SpeculationPolicy`. Per step:

1. ``reserve(req)`` (the scheduler asks once per decode): the k to reserve — 0 when the policy
   has speculation off for the request, never more than its remaining ``max_new_tokens - 1``;
2. ``propose(items)``: one ``propose_batch`` for the decodes that reserved drafts; each item's
   ``draft`` is set (possibly shorter or empty) and its ``num_tokens`` shrunk to 1 + len(draft);
3. after the forward, ``verify(item, rows)`` over the item's k+1 logit rows: the tokens to emit
   (:func:`~transfuse.serving.speculative.verify`), then ``settle``: the cache keeps the
   context up to the last accepted draft (``KVCache.truncate``), the proposer rolls back, the
   policy records acceptance and the step's time against an estimate of the same step without
   drafts.

That estimate comes from a line fitted to every step's forward time against its token count
(least squares with exponential forgetting, :class:`StepTimeModel`): plain = the line at N
minus the step's drafts; speculative = the measured step plus proposing and verifying.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from typing import Any

import torch

from transfuse.errors import InputError
from transfuse.serving.proposal import DraftRequest, Proposal
from transfuse.serving.request import Request
from transfuse.serving.scheduler import Scheduled

logger = logging.getLogger(__name__)


class StepTimeModel:
    """seconds ~ a + b * tokens, fitted with forgetting factor ``decay`` per step."""

    def __init__(self, decay: float = 0.98):
        self.decay = decay
        self._s = [0.0] * 5  # sums of 1, n, n^2, t, n*t

    def add(self, tokens: int, seconds: float) -> None:
        d, s = self.decay, self._s
        for i, v in enumerate((1.0, tokens, tokens * tokens, seconds, tokens * seconds)):
            s[i] = d * s[i] + v

    def predict(self, tokens: int) -> float | None:
        w, n, nn, t, nt = self._s
        if w < 2:
            return None
        var = nn * w - n * n
        if var <= 1e-9 * max(nn * w, 1.0):  # one token count seen so far: the mean time
            return t / w
        b = max(0.0, (nt * w - n * t) / var)
        a = (t - b * n) / w
        return max(a + b * tokens, 1e-9)


class SpecDecoding:
    """Speculative decoding inside the engine (module docstring)."""

    def __init__(self, speculative: Any, spec_tokens: int):
        from transfuse.serving.speculative import PromptLookup, SpeculationPolicy

        if speculative == "prompt-lookup":
            proposer = PromptLookup()
        elif isinstance(speculative, str):
            raise InputError(f"Engine: speculative={speculative!r}: give 'prompt-lookup' or a "
                             "proposer object (e.g. serving.speculative.DraftModel(draft_gen))")
        elif all(callable(getattr(speculative, m, None))
                 for m in ("propose_batch", "rollback", "release")):
            proposer = speculative
        else:
            raise InputError(f"Engine: speculative must be None, 'prompt-lookup' or a proposer "
                             f"with propose_batch/rollback/release, got "
                             f"{type(speculative).__name__}")
        self.proposer = proposer
        self.policy = SpeculationPolicy(k=spec_tokens)
        self.times = StepTimeModel()
        self.counts = {"spec_steps": 0, "proposed": 0, "accepted": 0, "propose_s": 0.0,
                       "propose_errors": 0}
        self._proposals: dict[Hashable, Proposal] = {}

    def reserve(self, req: Request) -> int:
        """Draft tokens to reserve for ``req``'s decode this step (asks the policy once)."""
        room = req.max_new_tokens - req.num_generated - 1
        if room <= 0 or not self.policy.enabled(req.id):
            return 0
        return min(self.policy.k(req.id), room)

    def propose(self, items: list[Scheduled]) -> float:
        """Fill the drafts of the decode items that reserved some; returns seconds spent."""
        spec = [it for it in items if it.decode and it.num_tokens > 1]
        if not spec:
            return 0.0
        t0 = time.perf_counter()
        reqs = [DraftRequest(it.req.id, list(it.req.tokens), it.req.params, it.req.generator,
                             it.req.num_generated, it.num_tokens - 1) for it in spec]
        try:
            proposals = self.proposer.propose_batch(reqs, max(r.k for r in reqs))
        except Exception:  # a broken proposer costs speed, never a request: decode plainly
            logger.exception("speculative proposer %r failed; decoding plainly this step",
                             self.proposer)
            self.counts["propose_errors"] += 1
            proposals = [Proposal() for _ in spec]
        for it, prop in zip(spec, proposals):
            k = it.num_tokens - 1
            if len(prop.tokens) > k:  # a proposer giving more than asked: keep what was asked
                prop = Proposal(list(prop.tokens[:k]),
                                None if prop.probs is None else prop.probs[:k])
            it.draft = list(prop.tokens)
            it.num_tokens = 1 + len(it.draft)
            if it.draft:
                self._proposals[it.req.id] = prop
        spent = time.perf_counter() - t0
        self.counts["propose_s"] += spent
        return spent

    def verify(self, it: Scheduled, rows: torch.Tensor) -> list[int]:
        """The tokens ``it``'s speculative step emits, from its k+1 logit ``rows``."""
        from transfuse.serving.speculative import verify

        req = it.req
        prop = self._proposals.pop(req.id)
        return verify(rows, prop, req.params, req.tokens, req.num_generated, req.generator)

    def settle(self, it: Scheduled, new: list[int], cache: Any, step_s: float,
               plain_s: float | None) -> None:
        """After :meth:`verify`: truncate the cache to the accepted context, roll the proposer
        back, record the step (``req.tokens`` does not hold ``new`` yet)."""
        req = it.req
        k = len(it.draft)
        keep = len(req.tokens) + len(new) - 1  # context through the last accepted draft
        if keep < req.num_computed:
            cache.truncate(req.seq_id, keep)
            req.num_computed = keep
        self.proposer.rollback(req.id, keep)
        accepted = len(new) - 1
        self.policy.record(req.id, k, accepted, step_s, plain_s)
        req.spec_proposed += k
        req.spec_accepted += accepted
        self.counts["spec_steps"] += 1
        self.counts["proposed"] += k
        self.counts["accepted"] += accepted

    def release(self, req: Request) -> None:
        """``req`` is finished: drop the proposer's and the policy's state of it."""
        self._proposals.pop(req.id, None)
        self.proposer.release(req.id)
        self.policy.release(req.id)

    def stats(self) -> dict[str, Any]:
        c = dict(self.counts)
        c["acceptance"] = c["accepted"] / c["proposed"] if c["proposed"] else None
        c["proposer"] = type(self.proposer).__name__
        return c


__all__ = ["SpecDecoding", "StepTimeModel"]
