"""Speculative decoding: the target checks k proposed tokens in one forward (:func:`verify`).

Glossary: V vocabulary, k proposed (draft) tokens d_1..d_k of one request in one step, rows
0..k of the target's logits for that request: row i is computed after the request's last
token followed by d_1..d_i, so row i-1 predicts the step's i-th token and row k the *bonus*
token after d_k; p_i the target's processed distribution of the i-th token (row i-1), q_i the
draft's distribution d_i was drawn from.

One speculative step of a request (the engine's loop):

1. ``proposal = proposer.propose_batch([DraftRequest(...)], k)[0]``
   (:class:`~transfuse.serving.prompt_lookup.PromptLookup` or
   :class:`~transfuse.serving.draft.DraftModel`);
2. the target runs the tokens ``[last, d_1..d_k]`` of the request (its cache holds the
   context before ``last``) with logits at all k+1 rows;
3. ``new = verify(logits, proposal, params, history, new_tokens, generator)``: 1..k+1 tokens,
   the accepted drafts then one correction (or bonus) token;
4. the target's cache keeps ``len(context) + len(new) - 1`` tokens (``KVCache.truncate``: the
   accepted drafts' K/V are right, the rejected ones' are dropped; the last new token is not
   in the cache yet, like any freshly sampled token), the proposer is told
   ``rollback(request_id, len(context) + len(new) - 1)``, and the policy ``record``\\ s the step.

Why it is exact (Leviathan et al. 2023, Chen et al. 2023): with ``do_sample``, d_i is
accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is
drawn from norm(max(0, p_i - q_i)); when all k are accepted the bonus is drawn from p_{k+1}.
Each emitted token is then distributed exactly as p given the tokens before it, as in plain
sampling. A deterministic proposal is a q that is one-hot at d_i (accept with probability
p_i(d_i), else draw from p_i without d_i). Greedy: accept while argmax p_i == d_i, then emit
the argmax: exactly plain greedy decoding.

Each row is processed as plain decoding would process it (``process_logits`` with the
request's history followed by the drafts before that row, and ``new_tokens + i`` generated
tokens), so repetition penalty, presence / frequency penalties (counts of the generated
tokens and the drafts before the row) and ``min_new_tokens`` see what they would without
speculation. Greedy: all rows at once (row i is only used when d_1..d_i were accepted, so its
history is known in advance). Sampled: row by row up to the first rejection, so each emitted
token costs the processing of one row (top-p sorts V scores), as in plain decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from transfuse.errors import InputError
from transfuse.runtime.sampling import SamplingParams, process_logits, seen_tokens, token_counts
from transfuse.serving.draft import DraftModel
from transfuse.serving.prompt_lookup import PromptLookup
from transfuse.serving.proposal import DraftRequest, Proposal, Proposer
from transfuse.serving.spec_policy import SpeculationPolicy


def verify(target_logits: torch.Tensor, proposal: Proposal, params: SamplingParams,
           history: Sequence[int] | torch.Tensor, new_tokens: int,
           generator: torch.Generator | None = None) -> list[int]:
    """The tokens one speculative step emits: the accepted drafts, then one correction or
    bonus token (1..k+1 tokens; module docstring).

    ``target_logits`` [k+1, V]: the target's raw logits at the rows of ``[last, d_1..d_k]``;
    ``history``: the request's tokens so far (prompt + generated, ``last`` included; only the
    repetition penalty reads it); ``new_tokens``: how many tokens the request has generated
    before this step; ``generator``: the request's (None: torch's global one).
    """
    drafts = list(proposal.tokens)
    k = len(drafts)
    if not isinstance(target_logits, torch.Tensor) or target_logits.dim() != 2 \
            or target_logits.shape[0] != k + 1:
        got = list(target_logits.shape) if isinstance(target_logits, torch.Tensor) \
            else type(target_logits).__name__
        raise InputError(f"verify: target_logits must be [k+1={k + 1}, V] (the rows of the last "
                         f"token and the {k} drafts), got {got}")
    vocab = target_logits.shape[1]
    if any(d >= vocab for d in drafts):
        raise InputError(f"verify: proposed tokens {drafts} hold an id outside the target's "
                         f"vocabulary [0, {vocab})")
    _check_int("new_tokens", new_tokens)
    if not params.do_sample:  # argmax as sample_next takes it (first of equal maxima)
        scores = process_rows(target_logits, drafts, params, history, new_tokens)
        best = scores.max(dim=-1).indices.tolist()
        n = 0
        while n < k and best[n] == drafts[n]:
            n += 1
        return drafts[:n] + [best[n]]
    # sampled: row by row, so only the rows up to the first rejection are processed (top-p's
    # sort of V scores costs as much per row as in plain decoding, never more per token)
    device = generator.device if generator is not None else target_logits.device
    seen = None
    if params.repetition_penalty != 1.0:
        seen = history_mask(history, vocab, target_logits.device)
    counts = generated_counts(history, new_tokens, vocab, target_logits.device) \
        if params.penalises_counts else None
    q = draft_probs(proposal, vocab, target_logits.device, torch.float32) if k else None
    u = torch.rand(k, generator=generator, device=device).tolist() if k else []
    for n in range(k + 1):
        p = process_logits(target_logits[n:n + 1], seen, params, new_tokens + n, counts)
        p = p.softmax(dim=-1)[0]
        if n == k:
            dist = p  # every draft accepted: the bonus token
            break
        d = drafts[n]
        # accept d iff u < p(d) / q(d), written without dividing (q(d) may be 0)
        if u[n] * float(q[n, d]) < float(p[d]):
            if seen is not None:
                seen[0, d] = True
            if counts is not None:
                counts[0, d] += 1
            continue
        dist = (p - q[n]).clamp_min(0)
        if not bool(dist.sum() > 0):  # p <= q everywhere: p == q up to rounding
            dist = p
        break
    token = torch.multinomial(dist.to(device), 1, generator=generator)
    return drafts[:n] + [int(token)]


def history_mask(history: Sequence[int] | torch.Tensor, vocab: int,
                 device: torch.device) -> torch.Tensor:
    """bool [1, V]: the token ids that occur in ``history`` (what the repetition penalty
    reads)."""
    ids = torch.as_tensor(history, dtype=torch.int64).flatten().to(device)
    return seen_tokens(ids[None], vocab)


def generated_counts(history: Sequence[int] | torch.Tensor, new_tokens: int, vocab: int,
                     device: torch.device) -> torch.Tensor:
    """float [1, V]: the counts of the last ``new_tokens`` ids of ``history`` (the generated
    ones, what the presence / frequency penalties read)."""
    ids = torch.as_tensor(history, dtype=torch.int64).flatten()
    return token_counts(ids[ids.numel() - new_tokens:] if new_tokens else ids[:0], vocab, device)


def process_rows(logits: torch.Tensor, drafts: Sequence[int], params: SamplingParams,
                 history: Sequence[int] | torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Row i of ``logits`` [k+1, V] processed as plain decoding would after ``history`` +
    ``drafts[:i]`` with ``new_tokens + i`` tokens generated (float [k+1, V])."""
    rows, vocab = logits.shape
    seen = None
    if params.repetition_penalty != 1.0:
        seen = history_mask(history, vocab, logits.device).expand(rows, vocab).clone()
        for i, d in enumerate(drafts):  # rows i+1.. also saw d_{i+1}
            seen[i + 1:, d] = True
    counts = None
    if params.penalises_counts:
        counts = generated_counts(history, new_tokens, vocab, logits.device).expand(
            rows, vocab).clone()
        for i, d in enumerate(drafts):
            counts[i + 1:, d] += 1
    # rows before min_new_tokens is reached get the EOS ids suppressed; the others do not
    cut = min(rows, max(0, params.min_new_tokens - new_tokens)) if params.eos_token_id else 0
    parts = []
    for lo, hi in ((0, cut), (cut, rows)):
        if hi > lo:
            parts.append(process_logits(logits[lo:hi], None if seen is None else seen[lo:hi],
                                        params, new_tokens + lo,
                                        None if counts is None else counts[lo:hi]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def draft_probs(proposal: Proposal, vocab: int, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """The draft distributions q [k, V] of a proposal: its ``probs`` (a draft with a smaller
    vocabulary padded with zeros, a larger one cut: the target can never emit those ids) or,
    for a deterministic proposal, one-hot rows at the drafts."""
    k = len(proposal.tokens)
    if proposal.probs is None:
        q = torch.zeros((k, vocab), dtype=dtype, device=device)
        q[torch.arange(k, device=device), torch.tensor(proposal.tokens, device=device)] = 1.0
        return q
    q = proposal.probs.to(device=device, dtype=dtype)
    if q.shape[1] < vocab:
        q = torch.nn.functional.pad(q, (0, vocab - q.shape[1]))
    return q[:, :vocab]


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"verify: {name} must be an int >= 0, got {value!r}")


__all__ = ["verify", "process_rows", "history_mask", "generated_counts", "draft_probs", "Proposal", "DraftRequest", "Proposer",
           "PromptLookup", "DraftModel", "SpeculationPolicy"]
