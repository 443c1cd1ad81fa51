"""Each step's token decisions: the next token(s) of every sampling item, and the stop rules.

Glossary: R logit rows of a step, V vocabulary size, k draft tokens of a speculative item.

:func:`choose_tokens` takes the step's logits [R, V] and, per item that samples, its rows:
plain greedy items (no processor changes their scores: no sampling, no repetition penalty,
``min_new_tokens`` reached) share one ``max`` over their rows, as ``sample_next`` takes the
argmax; every other item is sampled alone with its own :class:`SamplingParams`, history and
seeded generator through :func:`~transfuse.runtime.sampling.sample_next` — the code
``gen.generate`` runs, so a request's tokens do not depend on its neighbours; a speculative
item's k+1 rows go to the ``verify`` callback. :func:`append_tokens` adds them to the
request's context up to the first one that ends it (:func:`stop_reason`: EOS ids, stop
token sequences, stop strings via the request's TextStream, ``max_new_tokens``).
:func:`token_logprobs` gives, for the requests that ask, each chosen token's log-probability
and the top alternatives (log-softmax of the raw logits rows that chose them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from transfuse.runtime.sampling import sample_next, seen_tokens, token_counts
from transfuse.serving.request import Request, TokenLogprob
from transfuse.serving.scheduler import Scheduled


def is_plain(req: Request) -> bool:
    """Greedy with no processor that changes the scores at this step."""
    return not req.params.changes_scores(req.num_generated)


def choose_tokens(items: list[Scheduled], first_row: list[int], logits: torch.Tensor,
                  vocab: int, verify: Callable[[Scheduled, torch.Tensor], list[int]] | None
                  = None) -> list[list[int]]:
    """The new tokens of each sampling item: ``items[i]``'s rows of ``logits`` start at
    ``first_row[i]`` (one row; 1 + len(draft) rows for a draft, given to ``verify``)."""
    chosen: list[list[int] | None] = [None] * len(items)
    plain = [i for i, it in enumerate(items) if not it.draft and is_plain(it.req)]
    if plain:  # one max over those rows (first of equal maxima, as sample_next)
        at = [first_row[i] for i in plain]
        rows = logits if at == list(range(logits.shape[0])) else logits[at]
        for i, tok in zip(plain, rows.float().max(dim=-1).indices.tolist()):
            chosen[i] = [tok]
    for i, it in enumerate(items):
        if chosen[i] is not None:
            continue
        req, r = it.req, first_row[i]
        if it.draft:
            chosen[i] = verify(it, logits[r:r + 1 + len(it.draft)])
            continue
        history = None
        if req.params.repetition_penalty != 1.0:
            if req.seen is None:  # bool [1, V] of the context, kept up to date by append
                req.seen = seen_tokens(torch.tensor([req.tokens], device=logits.device), vocab)
            history = req.seen
        if req.params.penalises_counts and req.counts is None:  # kept up to date by append
            req.counts = token_counts(req.generated(), vocab, logits.device)
        chosen[i] = [int(sample_next(logits[r:r + 1], history, req.params, req.generator,
                                     new_tokens=req.num_generated, counts=req.counts)[0])]
    return chosen


def token_logprobs(items: list[Scheduled], first_row: list[int], logits: torch.Tensor,
                   chosen: list[list[int]]) -> list[list[TokenLogprob] | None]:
    """Per item, the log-probabilities of its chosen tokens (row ``first_row[i] + j`` gave
    token j) and of the request's top ``logprobs`` ids, from the log-softmax of the raw
    logits; None for an item whose request asked for none."""
    out: list[list[TokenLogprob] | None] = [None] * len(items)
    for i, (it, toks) in enumerate(zip(items, chosen)):
        n = it.req.logprobs
        if n is None or not toks:
            continue
        r = first_row[i]
        out[i] = _entries(logits[r:r + len(toks)], toks, n)
    return out


def _entries(rows: torch.Tensor, toks: list[int], n: int) -> list[TokenLogprob]:
    """Token ``toks[j]``'s log-probability under logits row j of ``rows`` [k, V], with the
    row's ``n`` most likely (id, log-probability) pairs."""
    logp = torch.log_softmax(rows.float(), dim=-1)
    picked = logp[torch.arange(len(toks), device=logp.device),
                  torch.tensor(toks, device=logp.device)].tolist()
    if n:
        values, ids = torch.topk(logp, min(n, logp.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(toks)
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(toks, picked, tops)]


def score_prompts(prompt_rows: list[tuple[Request, list[int], list[int]]],
                  logits: torch.Tensor) -> None:
    """Append to each request's ``prompt_lps`` the entries of prompt tokens q + 1 for its
    positions q, whose logits rows come in ``logits`` one after the other."""
    r = 0
    for req, qs, _ in prompt_rows:
        req.prompt_lps.extend(_entries(logits[r:r + len(qs)], [req.tokens[q + 1] for q in qs],
                                       req.prompt_logprobs))
        r += len(qs)


def append_tokens(req: Request, new: list[int]) -> tuple[list[int], str, str | None]:
    """Add ``new`` to ``req``'s context up to the first token that ends it; returns the tokens
    kept, their text ('' without a tokenizer) and the finish reason (None: it goes on)."""
    kept: list[int] = []
    reason = None
    text = ""
    for tok in new:
        req.tokens.append(tok)
        kept.append(tok)
        if req.seen is not None:
            req.seen[0, tok] = True
        if req.counts is not None and tok < req.counts.shape[-1]:
            req.counts[0, tok] += 1
        if req.text_stream is not None:
            delta, stopped = req.text_stream.push(tok)
            text += delta
            if stopped:
                reason = "stop"
        if reason is None:
            reason = stop_reason(req, tok)
        if reason is not None:
            break
    return kept, text, reason


def stop_reason(req: Request, tok: int) -> str | None:
    """Why ``req`` ends after its newest token ``tok`` ("stop", "length"), or None."""
    if tok in req.eos:
        return "stop"
    if req.stop_ids:
        context, n = req.tokens, req.num_generated
        for s in req.stop_ids:  # a stop sequence counts within the generated tokens only
            if len(s) <= n and tuple(context[-len(s):]) == s:
                return "stop"
    if req.num_generated >= req.max_new_tokens:
        return "length"
    return None


__all__ = ["choose_tokens", "append_tokens", "stop_reason", "is_plain", "token_logprobs",
           "score_prompts"]
