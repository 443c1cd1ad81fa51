"""What a speculative proposer returns and what it is asked: :class:`Proposal`, :class:`DraftRequest`.

Glossary: k draft tokens of one request in one step, V vocabulary size.

A *proposer* guesses the next k tokens of a request cheaply; the target model then checks
them all in one forward (:func:`transfuse.serving.speculative.verify`). Every proposer of this
package has the same three methods, so the engine treats them alike:

- ``propose_batch(reqs: list[DraftRequest], k) -> list[Proposal]`` (one per request, in order;
  an empty proposal means "no guess this step": decode that request plainly);
- ``rollback(request_id, keep_len)``: only the first ``keep_len`` tokens of the request's
  context are still valid (the rest were rejected);
- ``release(request_id)``: the request is gone; drop whatever is kept for it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from transfuse.errors import InputError
from transfuse.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class Proposal:
    """``tokens``: the proposed ids d_1..d_k (k may be 0); ``probs``: the draft's processed
    distribution q_i [k, V] each d_i was drawn from, or None for a deterministic guess (prompt
    lookup, greedy drafts: q_i is then one-hot at d_i)."""

    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tokens, (str, bytes)) or not isinstance(self.tokens, Sequence):
            raise InputError(f"Proposal.tokens must be a list of token ids, got "
                             f"{type(self.tokens).__name__}")
        for t in self.tokens:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise InputError(f"Proposal.tokens holds {t!r}; token ids are ints >= 0")
        if self.probs is not None:
            if not isinstance(self.probs, torch.Tensor) or self.probs.dim() != 2 \
                    or self.probs.shape[0] != len(self.tokens):
                shape = list(self.probs.shape) if isinstance(self.probs, torch.Tensor) \
                    else type(self.probs).__name__
                raise InputError(f"Proposal.probs must be [k={len(self.tokens)}, V] (one draft "
                                 f"distribution per proposed token), got {shape}")

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class DraftRequest:
    """One request asking for a proposal: its id, its whole context (prompt + generated
    tokens so far, the last one not yet run through the target), how the target samples it,
    its generator (None: torch's global one), how many tokens it has generated (for
    ``min_new_tokens``), and optionally its own k (None: the batch's)."""

    request_id: Hashable
    context: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None
    new_tokens: int = 0
    k: int | None = None

    def want(self, k: int) -> int:
        """How many tokens this request asks for when the batch asks for ``k``."""
        n = k if self.k is None else self.k
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InputError(f"request {self.request_id!r}: k must be an int >= 0, got {n!r}")
        return n


class Proposer(Protocol):
    """What the engine calls (module docstring)."""

    def propose_batch(self, reqs: Sequence[DraftRequest], k: int) -> list[Proposal]: ...

    def rollback(self, request_id: Hashable, keep_len: int) -> None: ...

    def release(self, request_id: Hashable) -> None: ...


__all__ = ["Proposal", "DraftRequest", "Proposer"]
