"""The tiny compiled models the engine tests share, and the oracle: a request run alone.

A 2-layer Llama (vocab 96, GQA 4/2 heads) with weights of std 0.3 (HF's 0.02 makes a tiny
model repeat one token, which would hide scheduling mistakes), compiled once per cache layout
with ``transfuse.optimize(..., generation=...)``. ``alone(gen, prompt, ...)`` is
``gen.generate`` on that one prompt (runtime/generate.py: Hugging Face's semantics) and returns
the new token ids: what the engine must produce for the request whatever else runs.
"""

from __future__ import annotations

import torch
from hf_builders import tiny_hf_model

import transfuse

VOCAB = 96
EOS = 2  # the Llama config's eos_token_id
OPTIONS = {"max_seq_len": 256, "max_batch": 8, "block_size": 16}

_COMPILED: dict[str, object] = {}
_MODELS: dict[str, object] = {}  # the HF model each compiled gen came from


def compiled(kv: str = "paged", max_batch: int = 8, max_step_tokens: int | None = None):
    """The tiny Llama compiled for generation with a ``kv`` cache (cached per process);
    ``max_step_tokens``: a bound on a step's tokens (None: max_batch x max_seq_len)."""
    key = f"{kv}/{max_batch}/{max_step_tokens}"
    if key not in _COMPILED:
        model = tiny_hf_model("llama", "sdpa", layers=2, hidden=32, vocab=VOCAB, positions=256)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        _COMPILED[key] = transfuse.optimize(
            model, (torch.randint(0, VOCAB, (1, 8)),),
            generation={**OPTIONS, "kv": kv, "max_batch": max_batch,
                        **({"max_step_tokens": max_step_tokens} if max_step_tokens else {})})
        _MODELS[key] = model
    return _COMPILED[key]


def hf_model(kv: str = "paged", max_batch: int = 8):
    """The Hugging Face model behind :func:`compiled` (the same weights)."""
    compiled(kv, max_batch)
    return _MODELS[f"{kv}/{max_batch}/None"]


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int, *, presence: float = 0.0,
              frequency: float = 0.0, logit_bias: dict[int, float] | None = None):
    """The oracle of OpenAI's options: greedy over the HF model's full-forward logits with
    ``logit_bias`` added and ``score -= frequency * count + presence * (count > 0)`` over the
    generated tokens; returns the new ids and each step's log-softmax of the raw logits."""
    ids, new, logps = list(prompt), [], []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        logps.append(torch.log_softmax(logits, -1))
        scores = logits.clone()
        for t, b in (logit_bias or {}).items():
            scores[t] += b
        counts = torch.bincount(torch.tensor(new, dtype=torch.long), minlength=VOCAB).float() \
            if new else torch.zeros(VOCAB)
        scores -= frequency * counts + presence * (counts > 0).float()
        tok = int(scores.argmax())
        new.append(tok)
        ids.append(tok)
    return new, logps


def alone(gen, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """The new tokens of ``prompt`` run alone through ``gen.generate`` (the oracle)."""
    out = gen.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, **kwargs)
    return out[0, len(prompt):].tolist()


def random_prompts(lengths: list[int], seed: int, prefix: list[int] | None = None,
                   low: int = 3) -> list[list[int]]:
    """Prompts of the given lengths (ids in [low, VOCAB): no EOS), after ``prefix`` if given."""
    g = torch.Generator().manual_seed(seed)
    return [(prefix or []) + torch.randint(low, VOCAB, (n,), generator=g).tolist()
            for n in lengths]


def finish_reason(tokens: list[int], max_new_tokens: int, eos: int | None = EOS) -> str:
    """What the engine must report for an uncancelled request that produced ``tokens``."""
    return "stop" if eos is not None and tokens and tokens[-1] == eos else "length"
