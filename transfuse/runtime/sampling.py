"""Choosing the next token from logits: Hugging Face's processors, written for one batch of rows.

Glossary: R rows (the sequences that need a next token this step), V vocabulary size,
L the longest history of a row (its real prompt tokens, then what it generated).

Each function takes ``scores`` [R, V] (float) and returns new scores; none changes its input.
The semantics and the order are those of ``transformers`` ``generate()`` (its
``LogitsProcessorList`` for these options), so that the same logits give the same tokens:

0. (serving only, OpenAI's options; HF's generate has none of them) ``logit_bias``: a number
   added to the scores of given token ids; then ``presence_penalty`` / ``frequency_penalty``
   (as OpenAI and vLLM define them, over the tokens the row has *generated*):
   ``score -= frequency_penalty * count + presence_penalty * (count > 0)``.
1. repetition penalty (``RepetitionPenaltyLogitsProcessor``): every token id that occurs in
   the row's history, once however often it occurs: a score < 0 is multiplied by the
   penalty, any other divided by it; the left padding of a prompt is not history.
2. ``min_new_tokens`` (``MinNewTokensLengthLogitsProcessor``): the EOS ids get -inf while
   fewer new tokens than that have been generated (the count is the same for every row).
3. only when sampling: temperature (scores / t), top-k (keep the scores >= the k-th largest,
   ties kept; ``k = max(top_k, min_tokens_to_keep)``), top-p (sort ascending, cumulative
   softmax, drop the tokens whose cumulative probability is <= 1 - p, always keep the
   ``min_tokens_to_keep`` most probable); filtered scores become ``filter_value`` (-inf).
4. greedy: ``argmax``; sampling: ``multinomial(softmax(scores))`` from a ``torch.Generator``
   (seeded: reproducible; ``None``: torch's global generator, as HF uses it).

:class:`SamplingParams` checks the options once (:class:`InputError` naming the option and
the allowed range) and :func:`sample_next` applies them in that order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from transfuse.errors import InputError

#: what a filtered-out score becomes (HF's default ``filter_value``)
FILTERED = -math.inf


# -- processors -----------------------------------------------------------------------------


def seen_tokens(history: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [R, V]: which token ids occur in each row's ``history`` [R, L] (i64; ids < 0 are
    padding, ids >= V, which the head cannot produce, are left out)."""
    if history.dim() != 2:
        raise InputError(f"history must be [R, L], got shape {list(history.shape)}")
    # one extra column absorbs the ids that are no token of this head (padding, ids >= V)
    ids = torch.where((history < 0) | (history >= vocab), vocab, history)
    seen = torch.zeros((history.shape[0], vocab + 1), dtype=torch.bool, device=history.device)
    seen.scatter_(1, ids, True)
    return seen[:, :vocab]


def apply_repetition_penalty(scores: torch.Tensor, history: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """Penalise every token that occurs in a row's ``history``: ids [R, L] as in
    :func:`seen_tokens`, or its bool [R, V] result (a loop keeps that one up to date)."""
    _check_rows(scores, history, "history")
    seen = history if history.dtype == torch.bool else seen_tokens(history, scores.shape[-1])
    if seen.shape != scores.shape:
        raise InputError(f"a bool history must be [R, V] like the scores {list(scores.shape)}, "
                         f"got {list(seen.shape)}")
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen.to(scores.device), penalised, scores)


def suppress_tokens(scores: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Set the scores of ``token_ids`` (e.g. the EOS ids before ``min_new_tokens``) to -inf."""
    vocab = torch.arange(scores.shape[-1], device=scores.device)
    banned = torch.isin(vocab, torch.tensor(list(token_ids), device=scores.device,
                                            dtype=torch.long))
    return torch.where(banned, -math.inf, scores)


def token_counts(generated: Sequence[int] | torch.Tensor, vocab: int,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """float [1, V]: how often each token id occurs in ``generated`` (ids outside [0, V) are
    left out), what the presence and frequency penalties read."""
    ids = torch.as_tensor(generated, dtype=torch.int64, device=device).flatten()
    ids = ids[(ids >= 0) & (ids < vocab)]
    counts = torch.zeros((1, vocab), dtype=torch.float32, device=device)
    counts[0].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts


def apply_logit_bias(scores: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """Add ``bias`` ((token id, value) pairs; ids >= V are no token of this head: left out)."""
    pairs = [(t, b) for t, b in bias if t < scores.shape[-1]]
    if not pairs:
        return scores
    ids = torch.tensor([t for t, _ in pairs], device=scores.device, dtype=torch.long)
    add = torch.zeros(scores.shape[-1], device=scores.device, dtype=scores.dtype)
    add.index_put_((ids,), torch.tensor([b for _, b in pairs], device=scores.device,
                                        dtype=scores.dtype), accumulate=True)
    return scores + add


def apply_presence_frequency(scores: torch.Tensor, counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """``scores - frequency * counts - presence * (counts > 0)``; ``counts`` [R, V] or [1, V]
    (:func:`token_counts`)."""
    if counts.shape[-1] != scores.shape[-1] or counts.dim() != 2:
        raise InputError(f"token counts must be [R, V] like the scores {list(scores.shape)}, "
                         f"got {list(counts.shape)}")
    counts = counts.to(device=scores.device, dtype=scores.dtype)
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by ``temperature`` (> 0)."""
    return scores / temperature


def apply_top_k(scores: torch.Tensor, top_k: int, *, min_tokens_to_keep: int = 1,
                filter_value: float = FILTERED) -> torch.Tensor:
    """Keep each row's scores that are >= its k-th largest (ties at the k-th all kept)."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, filter_value)


def apply_top_p(scores: torch.Tensor, top_p: float, *, min_tokens_to_keep: int = 1,
                filter_value: float = FILTERED) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose probabilities add up to >= ``top_p``
    (computed as HF does: ascending sort, drop cumulative probability <= 1 - top_p)."""
    ascending, order = torch.sort(scores, dim=-1, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -min_tokens_to_keep:] = False  # the most probable stay
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, filter_value)


# -- the options ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; the defaults are HF's (greedy, no penalty).

    ``top_k`` 0 and ``top_p`` 1.0 disable those filters; temperature, top-k and top-p only
    apply when ``do_sample``. ``eos_token_id`` is the tuple of EOS ids ``min_new_tokens``
    suppresses (empty: nothing to suppress). ``presence_penalty``, ``frequency_penalty`` (in
    [-2, 2]) and ``logit_bias`` ((token id, value in [-100, 100]) pairs) are OpenAI's.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    eos_token_id: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise InputError(f"do_sample must be True or False, got {self.do_sample!r}")
        _check_number("temperature", self.temperature, "> 0", lambda x: x > 0)
        _check_number("repetition_penalty", self.repetition_penalty, "> 0", lambda x: x > 0)
        _check_number("top_p", self.top_p, "in [0, 1]", lambda x: 0 <= x <= 1)
        _check_int("top_k", self.top_k, 0)
        _check_int("min_new_tokens", self.min_new_tokens, 0)
        for t in self.eos_token_id:
            _check_int("eos_token_id", t, 0)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), "in [-2, 2]", lambda x: -2 <= x <= 2)
            object.__setattr__(self, name, float(getattr(self, name)))
        if not isinstance(self.logit_bias, tuple):
            raise InputError(f"logit_bias must be a tuple of (token id, bias) pairs, got "
                             f"{type(self.logit_bias).__name__}")
        for pair in self.logit_bias:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise InputError(f"logit_bias entries must be (token id, bias) pairs, got "
                                 f"{pair!r}")
            _check_int("logit_bias token id", pair[0], 0)
            _check_number(f"logit_bias[{pair[0]}]", pair[1], "in [-100, 100]",
                          lambda x: -100 <= x <= 100)
        object.__setattr__(self, "logit_bias",
                           tuple((int(t), float(b)) for t, b in self.logit_bias))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))

    @property
    def penalises_counts(self) -> bool:
        """True when the presence or frequency penalty reads the generated tokens' counts."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def changes_scores(self, new_tokens: int) -> bool:
        """True when some processor changes the scores at a step with ``new_tokens`` generated
        (False: greedy is the plain argmax of the logits)."""
        return (self.do_sample or self.repetition_penalty != 1.0 or self.penalises_counts
                or bool(self.logit_bias)
                or bool(self.eos_token_id and new_tokens < self.min_new_tokens))


def _check_number(name: str, value: object, rule: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not ok(value):
        raise InputError(f"{name} must be a number {rule}, got {value!r}")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_rows(scores: torch.Tensor, history: torch.Tensor, what: str) -> None:
    if scores.dim() != 2 or history.dim() != 2 or history.shape[0] != scores.shape[0]:
        raise InputError(f"{what} must be [R, L] for scores [R, V]; got {what} "
                         f"{list(history.shape)} and scores {list(scores.shape)}")


# -- choosing -----------------------------------------------------------------------------------


def process_logits(scores: torch.Tensor, history: torch.Tensor | None, params: SamplingParams,
                   new_tokens: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """The scores after every processor ``params`` turns on, in HF's order (``new_tokens``:
    how many tokens each row has generated so far; ``counts``: the generated tokens' counts
    [R or 1, V] for the presence / frequency penalties, :func:`token_counts`)."""
    scores = scores.float()
    if params.logit_bias:
        scores = apply_logit_bias(scores, params.logit_bias)
    if params.repetition_penalty != 1.0 and history is not None:
        scores = apply_repetition_penalty(scores, history, params.repetition_penalty)
    if params.penalises_counts and counts is not None:
        scores = apply_presence_frequency(scores, counts, params.presence_penalty,
                                          params.frequency_penalty)
    if params.eos_token_id and new_tokens < params.min_new_tokens:
        scores = suppress_tokens(scores, params.eos_token_id)
    if params.do_sample:
        if params.temperature != 1.0:
            scores = apply_temperature(scores, params.temperature)
        if params.top_k != 0:
            scores = apply_top_k(scores, params.top_k)
        if params.top_p < 1.0:
            scores = apply_top_p(scores, params.top_p)
    return scores


def sample_next(logits: torch.Tensor, history: torch.Tensor | None, params: SamplingParams,
                generator: torch.Generator | None = None, *, new_tokens: int = 0,
                counts: torch.Tensor | None = None) -> torch.Tensor:
    """The next token id of every row: ``logits`` [R, V] -> i64 [R].

    ``history`` [R, L] holds each row's tokens so far (negative = padding), or the bool
    [R, V] mask of them (:func:`seen_tokens`), used by the repetition penalty; ``counts`` the
    generated tokens' counts for the presence / frequency penalties; ``generator`` draws the
    samples (``None``: torch's global one).
    """
    if logits.dim() != 2:
        raise InputError(f"logits must be [R, V], got shape {list(logits.shape)}")
    scores = process_logits(logits, history, params, new_tokens, counts)
    if not params.do_sample:  # argmax (first of equal maxima); max() is ~3x faster on CPU
        return scores.max(dim=-1).indices
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device``; ``None`` for no seed (torch's global
    generator is used then, so ``torch.manual_seed`` controls it as it does HF's)."""
    if seed is None:
        return None
    _check_int("seed", seed, 0)
    return torch.Generator(device=device).manual_seed(seed)


__all__ = ["SamplingParams", "sample_next", "process_logits", "make_generator", "seen_tokens",
           "apply_repetition_penalty", "suppress_tokens", "apply_temperature", "apply_top_k",
           "apply_top_p", "apply_logit_bias", "apply_presence_frequency", "token_counts",
           "FILTERED"]
