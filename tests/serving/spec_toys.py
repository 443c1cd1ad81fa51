"""Toy language models and a chi-square test for the speculative decoding tests.

A toy model maps a context (list of token ids) to logits [V] by a fixed random rule that
depends on the last token and the context length, so what comes next depends on what came
before (as in a real LM) and the exact distribution of a few generated tokens can be
enumerated.
"""

from __future__ import annotations

import itertools
import math

import torch

from transfuse.runtime.sampling import SamplingParams, process_logits, seen_tokens
from transfuse.serving.speculative import Proposal


class ToyLM:
    """logits(context) = A[last token] + B[len(context) % 3], scaled by ``sharpness``."""

    def __init__(self, vocab: int, seed: int, sharpness: float = 1.5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.a = torch.randn(vocab, vocab, generator=g) * sharpness
        self.b = torch.randn(3, vocab, generator=g) * sharpness

    def perturbed(self, seed: int, noise: float) -> ToyLM:
        """A draft for this model: its weights plus Gaussian noise of scale ``noise``."""
        other = ToyLM(self.vocab, seed)
        other.a = self.a + noise * other.a
        other.b = self.b + noise * other.b
        return other

    def logits(self, context: list[int]) -> torch.Tensor:
        return self.a[context[-1]] + self.b[len(context) % 3]

    def rows(self, context: list[int], drafts: list[int]) -> torch.Tensor:
        """[k+1, V]: the logits after context + drafts[:i] for i = 0..k (the target's rows)."""
        return torch.stack([self.logits(context + drafts[:i]) for i in range(len(drafts) + 1)])


def processed_probs(model: ToyLM, context: list[int], params: SamplingParams,
                    new_tokens: int) -> torch.Tensor:
    """The distribution plain decoding samples the next token from: [V]."""
    seen = seen_tokens(torch.tensor([context]), model.vocab)
    scores = process_logits(model.logits(context)[None], seen, params, new_tokens)
    return scores.softmax(dim=-1)[0]


def exact_distribution(model: ToyLM, prompt: list[int], steps: int,
                       params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(x_1..x_steps) of plain sampling, by enumeration."""
    out = {}
    for seq in itertools.product(range(model.vocab), repeat=steps):
        prob, ctx = 1.0, list(prompt)
        for i, t in enumerate(seq):
            prob *= float(processed_probs(model, ctx, params, i)[t])
            ctx.append(t)
        out[seq] = prob
    return out


def draft_proposal(draft: ToyLM, context: list[int], k: int, params: SamplingParams,
                   new_tokens: int, generator: torch.Generator, *,
                   deterministic: bool) -> Proposal:
    """k drafts from the draft model: sampled from its processed q (returned), or its argmax
    chain (a deterministic proposal, q one-hot)."""
    tokens, probs, ctx = [], [], list(context)
    for i in range(k):
        q = processed_probs(draft, ctx, params, new_tokens + i)
        t = int(q.argmax()) if deterministic else int(torch.multinomial(q, 1, generator=generator))
        tokens.append(t)
        probs.append(q)
        ctx.append(t)
    return Proposal(tokens, None if deterministic else torch.stack(probs))


def chi_square(counts: dict[tuple[int, ...], int],
               expected: dict[tuple[int, ...], float]) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of observed ``counts`` against the probabilities
    ``expected``; cells expected fewer than 5 times are pooled into one."""
    n = sum(counts.values())
    stat, cells, pooled_obs, pooled_exp = 0.0, 0, 0, 0.0
    for key, p in expected.items():
        e, o = n * p, counts.get(key, 0)
        if e < 5:
            pooled_obs += o
            pooled_exp += e
            continue
        stat += (o - e) ** 2 / e
        cells += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    stray = sum(c for key, c in counts.items() if key not in expected)
    if stray:
        return math.inf, cells - 1, 0.0
    df = cells - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                            torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, df, p_value
