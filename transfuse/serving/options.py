"""Checking the arguments of ``Engine(...)`` and ``Engine.submit`` once, up front.

Every refusal is an :class:`~transfuse.errors.InputError` naming the argument, the value and
the limit, raised in the caller's thread; the engine thread only ever sees valid requests.
Limits come from the engine's KV cache: prompt + ``max_new_tokens`` within ``max_seq_len``,
and (paged) within the whole block pool, so a request alone always fits and preemption can
always make room for the oldest one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from transfuse.errors import InputError
from transfuse.runtime.sampling import SamplingParams, make_generator


@dataclass(frozen=True)
class RequestOptions:
    """A checked submission: the prompt ids, limits, sampling and stop rules."""

    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    seed: int | None
    stop_ids: tuple[tuple[int, ...], ...]  # token-id sequences that end the output
    stop_strings: tuple[str, ...]  # strings that end the text (need a tokenizer)
    logprobs: int | None = None  # top log-probabilities per token (None: none wanted)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens


#: most top log-probabilities per token (OpenAI's chat limit)
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class Limits:
    """What the engine can take: vocabulary, sequence length, blocks (None: contiguous)."""

    vocab_size: int
    max_seq_len: int
    block_size: int | None = None
    num_blocks: int | None = None


def check_options(prompt: Any, *, limits: Limits, max_new_tokens: Any, temperature: Any,
                  top_p: Any, top_k: Any, repetition_penalty: Any, seed: Any, stop: Any,
                  eos_token_id: Any, min_new_tokens: Any, has_tokenizer: bool,
                  presence_penalty: Any = 0.0, frequency_penalty: Any = 0.0,
                  logit_bias: Any = None, logprobs: Any = None,
                  prompt_logprobs: Any = None) -> RequestOptions:
    """The checked options of one submission (module docstring)."""
    ids = _prompt_ids(prompt, limits.vocab_size)
    new = _int("max_new_tokens", max_new_tokens, 0)
    total = len(ids) + new
    if total > limits.max_seq_len:
        raise InputError(f"prompt of {len(ids)} tokens + max_new_tokens {new} = {total} exceeds "
                         f"the engine's max_seq_len {limits.max_seq_len}")
    if limits.block_size is not None:
        blocks = math.ceil(total / limits.block_size)
        if blocks > limits.num_blocks:
            raise InputError(f"prompt of {len(ids)} tokens + max_new_tokens {new} needs {blocks} "
                             f"cache blocks of {limits.block_size} tokens; the engine's pool "
                             f"has {limits.num_blocks} in all")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature >= 0:
        raise InputError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    eos = _token_list("eos_token_id", eos_token_id, limits.vocab_size)
    params = SamplingParams(do_sample=temperature > 0,
                            temperature=temperature if temperature > 0 else 1.0,
                            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                            min_new_tokens=_int("min_new_tokens", min_new_tokens, 0),
                            eos_token_id=tuple(eos), presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty,
                            logit_bias=_logit_bias(logit_bias, limits.vocab_size))
    if seed is not None:
        _int("seed", seed, 0)
    for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if value is not None:
            _int(name, value, 0)
            if value > MAX_LOGPROBS:
                raise InputError(f"{name} must be at most {MAX_LOGPROBS}, got {value}")
    stop_ids, stop_strings = _stops(stop, limits.vocab_size, has_tokenizer)
    return RequestOptions(ids, new, params, seed, stop_ids, stop_strings, logprobs,
                          prompt_logprobs)


def _logit_bias(bias: Any, vocab: int) -> tuple[tuple[int, float], ...]:
    """``{token id: bias}`` (ids as ints or decimal strings, OpenAI's JSON form) as sorted
    pairs; SamplingParams checks the values."""
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise InputError(f"logit_bias must be a dict of token id -> bias, got "
                         f"{type(bias).__name__}")
    pairs = []
    for key, value in bias.items():
        tid = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < vocab:
            raise InputError(f"logit_bias key {key!r} is not a token id in [0, {vocab})")
        pairs.append((tid, value))
    return tuple(sorted(pairs))


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _prompt_ids(prompt: Any, vocab: int) -> list[int]:
    """A list of token ids from a list/tuple of ints or an integer tensor [S] or [1, S]."""
    if isinstance(prompt, torch.Tensor):
        if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool \
                or prompt.dim() not in (1, 2) or (prompt.dim() == 2 and prompt.shape[0] != 1):
            raise InputError(f"prompt_ids must be token ids: a list of ints or an integer tensor "
                             f"[S] or [1, S], got a {prompt.dtype} tensor {list(prompt.shape)}")
        ids = prompt.flatten().tolist()
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes)):
        ids = list(prompt)
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int):
                raise InputError(f"prompt_ids[{i}] must be an int token id, got {t!r}")
    else:
        raise InputError(f"prompt_ids must be a list of token ids or an integer tensor, got "
                         f"{type(prompt).__name__}")
    if not ids:
        raise InputError("prompt_ids is empty: a request needs at least one prompt token")
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise InputError(f"prompt_ids[{i}] = {t} is outside the vocabulary [0, {vocab})")
    return ids


def _token_list(name: str, value: Any, vocab: int) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for t in values:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise InputError(f"{name} must be token ids in [0, {vocab}), got {value!r}")
    return values


def _stops(stop: Any, vocab: int, has_tokenizer: bool) -> tuple[tuple, tuple]:
    """``stop``: None, a string, a list of token ids, or a list of strings / token-id lists."""
    if stop is None:
        return (), ()
    if isinstance(stop, str):
        stop = [stop]
    elif isinstance(stop, Sequence) and stop and all(
            isinstance(t, int) and not isinstance(t, bool) for t in stop):
        stop = [list(stop)]  # one token-id sequence
    if not isinstance(stop, Sequence) or isinstance(stop, bytes):
        raise InputError(f"stop must be a string, a list of token ids, or a list of those; got "
                         f"{type(stop).__name__}")
    ids, strings = [], []
    for i, s in enumerate(stop):
        if isinstance(s, str):
            if not s:
                raise InputError(f"stop[{i}] is an empty string")
            if not has_tokenizer:
                raise InputError(f"stop[{i}] = {s!r} is a string; stop strings need an engine "
                                 "with a tokenizer (Engine(..., tokenizer=...)); give token ids")
            strings.append(s)
        elif isinstance(s, Sequence) and s:
            ids.append(tuple(_token_list(f"stop[{i}]", list(s), vocab)))
        else:
            raise InputError(f"stop[{i}] must be a non-empty string or token-id list, got {s!r}")
    return tuple(ids), tuple(strings)


def request_generator(seed: int | None, device: Any) -> torch.Generator:
    """A request's own generator: seeded (reproducible whatever else runs) or, without a seed,
    seeded from fresh entropy (never torch's global generator, which other threads share)."""
    if seed is not None:
        return make_generator(seed, device)
    g = torch.Generator(device=device)
    g.seed()
    return g


def check_engine_options(spec: dict, *, max_batch: Any, max_tokens_per_step: Any,
                         max_queue: Any, spec_tokens: Any, prefix_caching: Any,
                         num_blocks: Any) -> tuple[int, bool]:
    """The engine's ``max_batch`` (None: the compiled one) and ``prefix_caching`` (None: on for
    a paged cache) for a gen's cache ``spec``; InputError naming the option otherwise."""
    paged = spec["layout"] == "paged"
    if max_batch is None:
        max_batch = spec["max_batch"]
    for name, value in (("max_batch", max_batch), ("max_tokens_per_step", max_tokens_per_step),
                        ("max_queue", max_queue), ("spec_tokens", spec_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"Engine: {name} must be a positive int, got {value!r}")
    if max_batch > spec["max_step_tokens"]:
        raise InputError(f"Engine: max_batch {max_batch} exceeds the {spec['max_step_tokens']} "
                         "tokens one step of this model takes (its max_step_tokens; a decode "
                         "step has one token per request)")
    if not paged and max_batch > spec["max_batch"]:
        raise InputError(f"Engine: max_batch {max_batch} exceeds the contiguous cache's "
                         f"{spec['max_batch']} slots (compile with a larger max_batch or "
                         "kv='paged')")
    if prefix_caching is None:
        prefix_caching = paged
    if not isinstance(prefix_caching, bool):
        raise InputError(f"Engine: prefix_caching must be True, False or None, got "
                         f"{prefix_caching!r}")
    if prefix_caching and not paged:
        raise InputError("Engine: prefix_caching needs a paged KV cache (compile with "
                         "generation={'kv': 'paged'})")
    if num_blocks is not None:
        if not paged:
            raise InputError("Engine: num_blocks is for a paged KV cache only")
        _int("num_blocks", num_blocks, 1)
    return max_batch, prefix_caching


__all__ = ["RequestOptions", "Limits", "check_options", "check_engine_options",
           "request_generator"]
