"""``generate()``: the token loop over a compiled step and a :class:`KVCache`.

Glossary: B prompts (rows), S the padded prompt width, L_b row b's real prompt length,
T ``max_new_tokens``, N tokens in one step, R rows that need logits in one step, V vocabulary.

A *step* is ``step(input_ids [1, N], meta) -> logits [R, V]``: the new tokens of some
sequences, one after the other on one axis, and the ``StepMeta`` the cache built for them
(positions, sequence of each token, lengths, slot or block tables, ``last_rows``: the row of
each sequence's last token, whose logits come back, in the order of the step's items).

The loop (GEN_DESIGN.md):

1. **check** everything before anything is allocated (:class:`InputError` naming what and
   the limit): the options, the ids and mask (left padding only, as HF decoder-only models
   take it), the batch against ``max_batch``, each prompt + T against ``max_seq_len`` and,
   paged, the blocks the whole batch needs against the pool.
2. **prefill**: one step with every prompt's real tokens (padding dropped; each row's
   positions start at 0, so a padded row computes what it would alone); in chunks of at most
   ``max_step_tokens`` tokens when the step takes fewer (a model whose capture bounds the
   tokens of a step), a row's logits coming from the step with its last prompt token.
3. **decode**: one step per new token with the last token of every live row; a row stops at
   an EOS id (``eos_token_id=None``: never) and is filled with ``pad_token_id`` afterwards;
   the loop ends when every row stopped or T tokens were made.
4. the cache's sequences are freed, also when the step fails or a stream is dropped.

Options are Hugging Face's keyword arguments with its defaults, taken from the model's
generation config where it sets them (see :func:`resolve_options`). The result is HF's:
the prompt as given (left padding kept) followed by the new tokens, ``[B, S + steps]``.
``stream=True`` returns an iterator instead, checked the same way before it is returned,
that yields each step's new token ids: an ``int`` for a single prompt, else an i64 ``[B]``
tensor (``pad_token_id`` for rows that stopped).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from transfuse.errors import ExecutionError, InputError
from transfuse.runtime.sampling import SamplingParams, make_generator, sample_next, seen_tokens

#: the keyword arguments generate() understands (HF's names)
OPTIONS = ("max_new_tokens", "max_length", "min_new_tokens", "eos_token_id", "pad_token_id",
           "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stream")
#: HF's defaults where neither the call nor the model's generation config sets an option
HF_DEFAULTS = {"max_length": 20, "min_new_tokens": 0, "do_sample": False, "temperature": 1.0,
               "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
#: what an option given as None means (HF: the processor is not used)
OFF = {"min_new_tokens": 0, "do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
       "repetition_penalty": 1.0}

Step = Callable[[torch.Tensor, Any], torch.Tensor]
_SEQUENCE_IDS = itertools.count()  # seq ids of the cache, unique within the process


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """The resolved options of one generate() call."""

    max_new_tokens: int
    sampling: SamplingParams
    eos_token_id: tuple[int, ...]  # empty: never stop early
    pad_token_id: int | None
    seed: int | None
    stream: bool


def resolve_options(kwargs: Mapping[str, Any], config: Any, prompt_width: int) -> GenerateOptions:
    """Merge the call's keyword arguments over the generation config over HF's defaults.

    ``config`` is a ``GenerationConfig``, a mapping of its fields, or None.
    ``max_new_tokens`` wins over ``max_length`` (prompt width S included, as in HF); with
    neither, the config's own, else 20 new tokens. An option given as None turns its
    processor off (:data:`OFF`; ``eos_token_id=None``: no stopping), as in HF; one the config
    leaves None takes HF's default. ``pad_token_id`` defaults to the first EOS id, as HF's.
    """
    unknown = sorted(set(kwargs) - set(OPTIONS))
    if unknown:
        raise InputError(f"generate() got unknown keyword argument(s) {unknown}; supported: "
                         f"{', '.join(OPTIONS)}")
    cfg = _config_dict(config)

    def pick(name: str) -> Any:
        if name in kwargs:  # given as None: that processor is off, as in HF
            return OFF.get(name) if kwargs[name] is None else kwargs[name]
        value = cfg.get(name)
        return HF_DEFAULTS.get(name) if value is None else value

    if kwargs.get("max_new_tokens") is not None:
        new = kwargs["max_new_tokens"]
    elif kwargs.get("max_length") is not None:
        new = _int("max_length", kwargs["max_length"]) - prompt_width
    elif cfg.get("max_new_tokens") is not None:
        new = cfg["max_new_tokens"]
    elif cfg.get("max_length") is not None:
        new = _int("max_length", cfg["max_length"]) - prompt_width
    else:
        new = HF_DEFAULTS["max_length"]  # HF: 20 new tokens by default
    new = _int("max_new_tokens", new)
    if new < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {new}"
                         + (f" (max_length is shorter than the prompt width {prompt_width})"
                            if kwargs.get("max_new_tokens") is None else ""))
    eos = _token_ids("eos_token_id", kwargs["eos_token_id"] if "eos_token_id" in kwargs
                     else cfg.get("eos_token_id"))
    pad = pick("pad_token_id")
    if pad is not None:
        pad = _int("pad_token_id", pad)
    elif eos:
        pad = eos[0]
    sampling = SamplingParams(
        do_sample=pick("do_sample"), temperature=pick("temperature"),
        top_k=pick("top_k"), top_p=pick("top_p"), repetition_penalty=pick("repetition_penalty"),
        min_new_tokens=pick("min_new_tokens"), eos_token_id=eos)
    seed = kwargs.get("seed")
    make_generator(seed)  # checks it
    stream = kwargs.get("stream", False)
    if not isinstance(stream, bool):
        raise InputError(f"stream must be True or False, got {stream!r}")
    return GenerateOptions(new, sampling, eos, pad, seed, stream)


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise InputError(f"generation_config must be a GenerationConfig or a mapping, got "
                     f"{type(config).__name__}")


def _int(name: str, value: Any) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    return value


def _token_ids(name: str, value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    values = value if isinstance(value, (list, tuple)) else [value]
    out = tuple(_int(name, v) for v in values)
    if any(v < 0 for v in out):
        raise InputError(f"{name} must be token ids >= 0, got {value!r}")
    return out


# -- checking the prompts ---------------------------------------------------------------------


@dataclasses.dataclass
class Prompts:
    """The checked batch: ids [B, S], each row's real length and where its tokens start."""

    ids: torch.Tensor
    lengths: list[int]

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def tokens(self, row: int) -> torch.Tensor:
        return self.ids[row, self.width - self.lengths[row]:]


def check_prompts(input_ids: Any, attention_mask: Any, pad_token_id: int | None,
                  eos_token_id: tuple[int, ...], vocab_size: int | None = None) -> Prompts:
    """ids i64 [B, S] and an optional 0/1 mask of the same shape whose rows are left padding
    (zeros, then ones). Without a mask, HF's rule: the pad id marks padding when it occurs and
    is no EOS id; else every token is real."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
            or input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be an i64 tensor [batch, seq], got "
                         f"{_describe(input_ids)}")
    b, s = input_ids.shape
    if b == 0 or s == 0:
        raise InputError(f"input_ids is empty: shape {list(input_ids.shape)}")
    ids = input_ids.long()
    if attention_mask is None:
        infer = pad_token_id is not None and pad_token_id not in eos_token_id \
            and bool((ids == pad_token_id).any())
        mask = (ids != pad_token_id) if infer else torch.ones_like(ids, dtype=torch.bool)
        where = f"input_ids (pad_token_id {pad_token_id} marks the padding)"
    else:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != ids.shape:
            raise InputError(f"attention_mask must have the shape of input_ids "
                             f"{list(ids.shape)}, got {_describe(attention_mask)}")
        if attention_mask.is_floating_point() or attention_mask.is_complex() \
                or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise InputError("attention_mask must hold only 0 and 1 (integers or bools)")
        mask = attention_mask.to(device=ids.device, dtype=torch.bool)
        where = "attention_mask"
    lengths = mask.sum(dim=1).tolist()
    positions = torch.arange(s, device=ids.device)
    for row, n in enumerate(lengths):
        if n == 0:
            raise InputError(f"{where}: row {row} has no tokens")
        if not bool((mask[row] == (positions >= s - n)).all()):
            raise InputError(f"{where}: row {row} is not left-padded (zeros, then ones); "
                             "decoder-only generation takes left padding, as Hugging Face does")
    if vocab_size is not None:
        real = ids[mask]
        bad = (real < 0) | (real >= vocab_size)
        if bool(bad.any()):
            raise InputError(f"input_ids holds token id {int(real[bad][0])}, outside the "
                             f"vocabulary [0, {vocab_size})")
    return Prompts(ids, lengths)


@dataclasses.dataclass(frozen=True)
class CacheRoom:
    """What a cache can take now: its limits and free slots or (paged) blocks."""

    max_seq_len: int
    max_batch: int
    free_slots: int
    block_size: int | None = None  # paged only
    free_blocks: int | None = None
    total_blocks: int | None = None

    @classmethod
    def of(cls, cache: Any) -> CacheRoom:
        """The room of a :class:`KVCache` as it is now (its ``memory_report()``)."""
        report = cache.memory_report()
        if cache.layout == "paged":
            return cls(cache.max_seq_len, cache.max_batch, cache.max_batch - len(cache),
                       cache.block_size, report["blocks_free"], report["blocks_total"])
        return cls(cache.max_seq_len, cache.max_batch, report["slots_free"])


def check_room(room: CacheRoom, prompts: Prompts, max_new_tokens: int) -> None:
    """The batch, each row's final length and, paged, the blocks of every row's final length
    must fit ``room``."""
    batch, max_len = len(prompts.lengths), room.max_seq_len
    if batch > room.max_batch:
        raise InputError(f"a batch of {batch} prompts exceeds the cache's max_batch "
                         f"{room.max_batch}")
    for row, n in enumerate(prompts.lengths):
        if n > max_len:
            raise InputError(f"prompt row {row} has {n} tokens, more than max_seq_len {max_len}")
        if n + max_new_tokens > max_len:
            raise InputError(f"prompt row {row}: {n} tokens + max_new_tokens {max_new_tokens} = "
                             f"{n + max_new_tokens} exceeds the cache's max_seq_len {max_len}")
    if room.block_size is not None:
        size = room.block_size
        need = sum(-(-(n + max_new_tokens) // size) for n in prompts.lengths)
        if need > room.free_blocks:
            raise InputError(f"the batch needs {need} cache blocks of {size} tokens (prompts + "
                             f"max_new_tokens {max_new_tokens}); the paged cache has "
                             f"{room.free_blocks} of {room.total_blocks} free")
    if batch > room.free_slots:
        raise InputError(f"a batch of {batch} prompts needs {batch} cache sequences; "
                         f"{room.free_slots} of {room.max_batch} are free")


def check_call(input_ids: Any, attention_mask: Any, kwargs: Mapping[str, Any],
               generation_config: Any, vocab_size: int | None,
               room: CacheRoom) -> tuple[GenerateOptions, Prompts]:
    """Every check of a generate() call, against ``room``; nothing is allocated."""
    opts = resolve_options(kwargs, generation_config, _width(input_ids))
    prompts = check_prompts(input_ids, attention_mask, opts.pad_token_id, opts.eos_token_id,
                            vocab_size)
    check_room(room, prompts, opts.max_new_tokens)
    return opts, prompts


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


# -- the loop ---------------------------------------------------------------------------------


def generate(step: Step, cache: Any, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None, *, generation_config: Any = None,
             vocab_size: int | None = None, max_step_tokens: int | None = None,
             **kwargs: Any) -> torch.Tensor | Iterator[Any]:
    """Generate with ``step`` over ``cache``; returns ``[B, S + steps]`` ids, or an iterator of
    each step's new ids with ``stream=True`` (see the module docstring).

    ``kwargs``: :data:`OPTIONS`. ``generation_config`` supplies the defaults;
    ``vocab_size``, when known, bounds the prompt's ids; ``max_step_tokens`` (None: no bound)
    the tokens of one step (the prefill is chunked to it).
    """
    if max_step_tokens is not None and (isinstance(max_step_tokens, bool) or not isinstance(
            max_step_tokens, int) or max_step_tokens < 1):
        raise InputError(f"generate: max_step_tokens must be a positive int, got "
                         f"{max_step_tokens!r}")
    opts, prompts = check_call(input_ids, attention_mask, kwargs, generation_config, vocab_size,
                               CacheRoom.of(cache))
    if max_step_tokens is not None and len(prompts.lengths) > max_step_tokens:
        raise InputError(f"generate: {len(prompts.lengths)} prompts, but a step of this model "
                         f"takes at most {max_step_tokens} tokens (one per prompt in decode)")
    tokens = _loop(step, cache, prompts, opts, max_step_tokens)
    if opts.stream:
        return tokens if len(prompts.lengths) > 1 else _ints(tokens)
    columns = list(tokens)
    if not columns:
        return input_ids.clone()
    new = torch.stack(columns, dim=1).to(device=input_ids.device, dtype=input_ids.dtype)
    return torch.cat([input_ids, new], dim=1)


def _width(input_ids: Any) -> int:
    return input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) and input_ids.dim() else 0


def _loop(step: Step, cache: Any, prompts: Prompts, opts: GenerateOptions,
          max_step_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """Yield each step's new ids [B] (CPU, i64); frees the cache's sequences at the end."""
    if opts.max_new_tokens == 0:
        return
    batch = len(prompts.lengths)
    ids = prompts.ids
    seq_ids = [next(_SEQUENCE_IDS) for _ in range(batch)]
    added: list[int] = []
    params = opts.sampling
    generator = None  # made on the logits' device at the first draw
    penalise = params.repetition_penalty != 1.0
    # for the repetition penalty: which ids each row has seen (its real prompt, then the new
    # ids), bool [B, V], made at the first logits and kept up to date
    seen = None
    live = torch.ones(batch, dtype=torch.bool)
    eos = torch.tensor(opts.eos_token_id, dtype=torch.long)
    try:
        for row, sid in enumerate(seq_ids):
            cache.add(sid, prompts.lengths[row])
            added.append(sid)
        logits = _prefill(step, cache, seq_ids, prompts, max_step_tokens)
        for made in range(opts.max_new_tokens):
            rows = live.nonzero().flatten()
            if penalise and seen is None:
                history = torch.where(_real(prompts), ids, -1).to(logits.device)
                seen = seen_tokens(history, logits.shape[-1])
            hist = seen[rows.to(seen.device)] if seen is not None else None
            if generator is None and opts.seed is not None:
                generator = make_generator(opts.seed, logits.device)
            chosen = sample_next(logits, hist, params, generator, new_tokens=made).cpu()
            column = torch.full((batch,), -1 if opts.pad_token_id is None else opts.pad_token_id,
                                dtype=torch.long)
            column[rows] = chosen
            if seen is not None:  # chosen ids are < V: they index the logits
                seen[rows.to(seen.device), chosen.to(seen.device)] = True
            if len(eos):
                live[rows] = ~torch.isin(chosen, eos)
            yield column
            if made + 1 == opts.max_new_tokens or not bool(live.any()):
                return
            rows = live.nonzero().flatten().tolist()
            logits = _run(step, cache, [(seq_ids[r], 1) for r in rows],
                          column[rows].to(ids.device))
    finally:
        for sid in added:
            cache.free(sid)


def _prefill(step: Step, cache: Any, seq_ids: list[int], prompts: Prompts,
             limit: int | None) -> torch.Tensor:
    """Every prompt's real tokens through the step, in one step or, past ``limit`` tokens, in
    chunks (a prompt may span steps); logits [B, V], row b from the step that took row b's
    last prompt token."""
    lengths = prompts.lengths
    rows: list[torch.Tensor | None] = [None] * len(seq_ids)
    steps = chunk_steps(lengths, limit)
    for chunk in steps:
        logits = _run(step, cache, [(seq_ids[r], n) for r, _, n in chunk],
                      torch.cat([prompts.tokens(r)[start:start + n] for r, start, n in chunk]))
        if len(steps) == 1:  # the whole prefill in one step
            return logits
        for i, (r, start, n) in enumerate(chunk):
            if start + n == lengths[r]:
                rows[r] = logits[i]
    return torch.stack(rows)


def chunk_steps(lengths: Sequence[int], limit: int | None) -> list[list[tuple[int, int, int]]]:
    """The tokens of sequences of these ``lengths`` (each >= 1), in order, cut into steps of at
    most ``limit`` tokens (None: one step): each step a list of ``(sequence, start, count)``; a
    sequence may span steps and appears at most once in each."""
    if limit is None or sum(lengths) <= limit:
        return [[(i, 0, n) for i, n in enumerate(lengths)]]
    steps, step, budget = [], [], limit
    for i, n in enumerate(lengths):
        start = 0
        while start < n:
            if budget == 0:
                steps.append(step)
                step, budget = [], limit
            take = min(n - start, budget)
            step.append((i, start, take))
            start += take
            budget -= take
    if step:
        steps.append(step)
    return steps


def _ints(tokens: Iterator[torch.Tensor]) -> Iterator[int]:
    """A single prompt's stream: plain ints; closing it closes (and frees) the loop."""
    try:
        for column in tokens:
            yield int(column[0])
    finally:
        tokens.close()


def _real(prompts: Prompts) -> torch.Tensor:
    """bool [B, S]: which entries of the prompt ids are real tokens."""
    positions = torch.arange(prompts.width, device=prompts.ids.device)
    lengths = torch.tensor(prompts.lengths, device=prompts.ids.device)
    return positions[None, :] >= (prompts.width - lengths)[:, None]


def _run(step: Step, cache: Any, items: list[tuple[int, int]], tokens: torch.Tensor) -> torch.Tensor:
    """One step: the cache's metadata for ``items``, the step, the cache's commit."""
    meta = cache.prepare_step(items)
    try:
        logits = step(tokens[None, :], meta)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 \
                or logits.shape[0] != len(items):
            raise ExecutionError(f"the step returned {_describe(logits)}; expected logits "
                                 f"[{len(items)}, vocab] (one row per sequence of the step)")
    except BaseException:
        cache.abort_step()  # nothing written counts; the sequences can be freed
        raise
    cache.commit_step()
    return logits


__all__ = ["generate", "chunk_steps", "resolve_options", "check_prompts", "check_room", "check_call",
           "CacheRoom", "GenerateOptions",
           "Prompts", "OPTIONS", "HF_DEFAULTS"]
