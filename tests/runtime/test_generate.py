"""runtime/generate.py: the token loop over a KVCache, against Hugging Face ``generate()``.

The step here is a fake that stands for the compiled graph: it stores each token id where the
cache would store its K/V (through the step's metadata: slot or block table, position) and
computes each sequence's logits by running the tiny HF model over the sequence's whole prefix
read back from that store (no KV cache). So a token at a wrong position or in a wrong
sequence changes the answer.
"""

from __future__ import annotations

import pytest
import torch
from hf_builders import tiny_hf_model
from prompt_batches import random_left_padded

from transfuse.errors import ExecutionError, InputError
from transfuse.runtime.generate import chunk_steps, generate, resolve_options
from transfuse.runtime.kv_cache import KVCache

VOCAB, PAD = 64, 63
LENGTHS = [5, 2, 7, 3]


class PrefixStep:
    """``step(input_ids [1, N], meta) -> logits [B, V]`` recomputing whole prefixes."""

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache
        rows, cols = cache.num_blocks, cache.block_size  # contiguous: slots x max_seq_len
        self.store = torch.full((rows, cols), -1, dtype=torch.long)
        self.steps: list[tuple[int, int]] = []  # (tokens, sequences) of every call

    def _where(self, table_rows: torch.Tensor, positions: torch.Tensor):
        if self.cache.paged:
            size = self.cache.block_size
            return table_rows.gather(1, (positions // size)[:, None])[:, 0], positions % size
        return table_rows, positions

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, meta) -> torch.Tensor:
        positions, seq = meta.position_ids[0], meta.seq_of_token
        self.store[self._where(meta.cache_table[seq], positions)] = input_ids[0]
        self.steps.append((input_ids.shape[1], meta.batch))
        out = []
        for b in range(meta.batch):
            n, last = int(meta.seq_lens[b]), int(meta.last_rows[b])
            assert int(seq[last]) == b and int(positions[last]) == n - 1
            p = torch.arange(n)
            rows = meta.cache_table[b].expand(n, *meta.cache_table[b].shape)
            prefix = self.store[self._where(rows, p)]
            assert bool((prefix >= 0).all()), "a position of the prefix was never written"
            out.append(self.model(prefix[None]).logits[0, -1])
        return torch.stack(out)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return tiny_hf_model(request.param, "eager", layers=2, hidden=32, vocab=VOCAB, positions=64)


def _cache(model, layout="contiguous", max_batch=4, max_seq_len=32, **kw) -> KVCache:
    return KVCache(1, 1, 1, max_seq_len=max_seq_len, max_batch=max_batch, layout=layout,
                   block_size=4 if layout == "paged" else 16, **kw)


def _prompts(lengths, seed=0):
    return random_left_padded(lengths, high=VOCAB - 1, pad=PAD, seed=seed)


def _ours(model, ids, mask, layout="contiguous", **kw):
    cache = _cache(model, layout)
    step = PrefixStep(model, cache)
    out = generate(step, cache, ids, mask, generation_config=model.generation_config,
                   vocab_size=VOCAB, **kw)
    assert len(cache) == 0  # every sequence freed
    return out, step


def _hf(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, **kw)


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_greedy_equals_hf_generate(model, layout, batch):
    ids, mask = _prompts(LENGTHS[:batch])
    kw = dict(max_new_tokens=9, pad_token_id=PAD, eos_token_id=None)
    out, step = _ours(model, ids, mask, layout, **kw)
    assert torch.equal(out, _hf(model, ids, mask, **kw))
    # one prefill of every real token, then one token per sequence per step
    assert step.steps[0] == (sum(LENGTHS[:batch]), batch)
    assert step.steps[1:] == [(batch, batch)] * 8


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_prefill_in_chunks_of_max_step_tokens_equals_hf(model, layout):
    """A step bounded to 6 tokens: the 17 prompt tokens go in three steps, a prompt split across
    two of them; each row's first new token comes from the step with its last prompt token."""
    ids, mask = _prompts(LENGTHS)
    kw = dict(max_new_tokens=5, pad_token_id=PAD, eos_token_id=None)
    out, step = _ours(model, ids, mask, layout, max_step_tokens=6, **kw)
    assert torch.equal(out, _hf(model, ids, mask, **kw))
    assert step.steps == [(6, 2), (6, 2), (5, 2)] + [(4, 4)] * 4
    unbounded, _ = _ours(model, ids, mask, layout, max_step_tokens=17, **kw)
    assert torch.equal(unbounded, out)


def test_chunk_steps():
    assert chunk_steps([5, 2, 7, 3], None) == [[(0, 0, 5), (1, 0, 2), (2, 0, 7), (3, 0, 3)]]
    assert chunk_steps([5, 2, 7, 3], 17) == [[(0, 0, 5), (1, 0, 2), (2, 0, 7), (3, 0, 3)]]
    assert chunk_steps([5, 2, 7, 3], 6) == [[(0, 0, 5), (1, 0, 1)], [(1, 1, 1), (2, 0, 5)],
                                            [(2, 5, 2), (3, 0, 3)]]
    assert chunk_steps([13], 4) == [[(0, 0, 4)], [(0, 4, 4)], [(0, 8, 4)], [(0, 12, 1)]]
    assert chunk_steps([1, 1, 1], 2) == [[(0, 0, 1), (1, 0, 1)], [(2, 0, 1)]]


def test_a_bad_max_step_tokens_is_refused(model):
    ids, mask = _prompts(LENGTHS)
    for bad in (0, True, 2.5):
        with pytest.raises(InputError, match="max_step_tokens must be a positive int"):
            _ours(model, ids, mask, max_step_tokens=bad, max_new_tokens=2)
    with pytest.raises(InputError, match="4 prompts, but a step of this model takes at most 3"):
        _ours(model, ids, mask, max_step_tokens=3, max_new_tokens=2)


def test_batched_equals_unbatched_and_paged_equals_contiguous(model):
    ids, mask = _prompts(LENGTHS)
    batched, _ = _ours(model, ids, mask, "paged", max_new_tokens=7, eos_token_id=None)
    for row, n in enumerate(LENGTHS):
        alone, _ = _ours(model, ids[row:row + 1, -n:], None, max_new_tokens=7, eos_token_id=None)
        assert torch.equal(alone[0, n:], batched[row, ids.shape[1]:])
    contiguous, _ = _ours(model, ids, mask, max_new_tokens=7, eos_token_id=None)
    assert torch.equal(batched, contiguous)


def test_eos_stops_rows_and_pads_them_like_hf(model):
    ids, mask = _prompts(LENGTHS, seed=3)
    free, _ = _ours(model, ids, mask, max_new_tokens=10, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 2])  # row 0 makes it as its third new token
    kw = dict(max_new_tokens=10, pad_token_id=PAD, eos_token_id=eos)
    out, step = _ours(model, ids, mask, **kw)
    assert torch.equal(out, _hf(model, ids, mask, **kw))
    assert out[0, ids.shape[1] + 3:].eq(PAD).all()  # row 0 stopped and was padded
    assert step.steps[3][1] < len(LENGTHS)  # and no longer ran
    # min_new_tokens keeps EOS away for the first tokens (and the batch still matches HF)
    kw["min_new_tokens"] = 5
    out, _ = _ours(model, ids, mask, **kw)
    assert torch.equal(out, _hf(model, ids, mask, **kw))
    assert not out[:, ids.shape[1]:ids.shape[1] + 5].eq(eos).any()
    # a list of EOS ids; pad defaults to the first of them, as in HF
    kw = dict(max_new_tokens=10, eos_token_id=[eos, int(free[1, ids.shape[1]])])
    out, _ = _ours(model, ids, mask, **kw)
    assert torch.equal(out, _hf(model, ids, mask, **kw))


def test_repetition_penalty_equals_hf(model):
    ids, mask = _prompts(LENGTHS[:3], seed=5)
    kw = dict(max_new_tokens=8, eos_token_id=None, pad_token_id=PAD, repetition_penalty=1.5)
    out, _ = _ours(model, ids, mask, **kw)
    assert torch.equal(out, _hf(model, ids, mask, **kw))
    plain, _ = _ours(model, ids, mask, max_new_tokens=8, eos_token_id=None)
    assert not torch.equal(out, plain)  # the penalty changed something


def test_mask_inferred_from_the_pad_id_like_hf(model):
    ids, mask = _prompts(LENGTHS[:3], seed=7)
    kw = dict(max_new_tokens=6, pad_token_id=PAD, eos_token_id=None)
    out, _ = _ours(model, ids, None, **kw)
    assert torch.equal(out, _ours(model, ids, mask, **kw)[0])
    with torch.no_grad():
        assert torch.equal(out, model.generate(ids, do_sample=False, **kw))


def test_stream_yields_each_steps_ids(model):
    ids, mask = _prompts(LENGTHS[:1])
    full, _ = _ours(model, ids, mask, max_new_tokens=6, eos_token_id=None)
    cache = _cache(model)
    stream = generate(PrefixStep(model, cache), cache, ids, mask, max_new_tokens=6,
                      eos_token_id=None, stream=True)
    got = list(stream)
    assert all(isinstance(t, int) for t in got)
    assert got == full[0, ids.shape[1]:].tolist()
    ids, mask = _prompts(LENGTHS[:3])
    full, _ = _ours(model, ids, mask, max_new_tokens=6, eos_token_id=None)
    steps = list(generate(PrefixStep(model, cache), cache, ids, mask, max_new_tokens=6,
                          eos_token_id=None, stream=True))
    assert all(t.shape == (3,) and t.dtype == torch.long for t in steps)
    assert torch.equal(torch.stack(steps, 1), full[:, ids.shape[1]:])
    # a stream dropped half-way frees its sequences
    it = generate(PrefixStep(model, cache), cache, ids, mask, max_new_tokens=6, stream=True)
    next(it)
    assert len(cache) == 3
    it.close()
    assert len(cache) == 0


def test_seeded_sampling_is_reproducible(model):
    ids, mask = _prompts(LENGTHS[:2])
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, top_p=0.95,
              eos_token_id=None)
    a, _ = _ours(model, ids, mask, seed=4, **kw)
    b, _ = _ours(model, ids, mask, seed=4, **kw)
    c, _ = _ours(model, ids, mask, seed=5, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_defaults_follow_hf():
    opts = resolve_options({}, {"eos_token_id": 7}, prompt_width=5)
    assert opts.max_new_tokens == 20 and opts.eos_token_id == (7,) and opts.pad_token_id == 7
    assert not opts.sampling.do_sample and opts.sampling.top_k == 50
    opts = resolve_options({"max_length": 12}, {"max_new_tokens": 3}, prompt_width=5)
    assert opts.max_new_tokens == 7  # the call's max_length wins over the config
    opts = resolve_options({"eos_token_id": None}, {"eos_token_id": 7, "max_length": 9}, 5)
    assert opts.eos_token_id == () and opts.pad_token_id is None and opts.max_new_tokens == 4
    opts = resolve_options({}, {"do_sample": True, "temperature": 0.7, "top_p": 0.9}, 5)
    assert opts.sampling.do_sample and opts.sampling.temperature == 0.7
    # given as None: off, as in HF (its processor list then has no top-k / temperature)
    opts = resolve_options({"top_k": None, "temperature": None}, {"temperature": 0.5}, 5)
    assert opts.sampling.top_k == 0 and opts.sampling.temperature == 1.0


def test_zero_new_tokens_returns_the_prompt(model):
    ids, mask = _prompts(LENGTHS[:2])
    out, step = _ours(model, ids, mask, max_new_tokens=0)
    assert torch.equal(out, ids) and step.steps == []


def _refused(model, match, ids=None, mask=None, layout="contiguous", cache_kw=None, **kw):
    if ids is None:
        ids, mask = _prompts(LENGTHS)
    cache = _cache(model, layout, **(cache_kw or {}))
    step = PrefixStep(model, cache)
    with pytest.raises(InputError, match=match):
        generate(step, cache, ids, mask, vocab_size=VOCAB, **kw)
    assert step.steps == [] and len(cache) == 0  # refused before anything was allocated


def test_bad_input_is_refused_up_front(model):
    ids, mask = _prompts(LENGTHS)
    _refused(model, r"max_seq_len 8", *_prompts([9]), cache_kw={"max_seq_len": 8},
             max_new_tokens=0)
    _refused(model, r"row 0: 5 tokens \+ max_new_tokens 30 = 35 exceeds .* max_seq_len 32",
             max_new_tokens=30)
    _refused(model, r"batch of 4 prompts exceeds the cache's max_batch 2",
             cache_kw={"max_batch": 2})
    _refused(model, r"max_new_tokens must be >= 0, got -1", max_new_tokens=-1)
    _refused(model, r"attention_mask must have the shape of input_ids \[4, 7\]", ids,
             mask[:, 1:])
    bad = mask.clone()
    bad[1, -1] = 0  # right padding
    _refused(model, r"row 1 is not left-padded", ids, bad)
    _refused(model, r"only 0 and 1", ids, mask * 2)
    _refused(model, r"unknown keyword argument\(s\) \['num_beams'\]", num_beams=2)
    _refused(model, r"temperature must be a number > 0", do_sample=True, temperature=0.0)
    _refused(model, r"outside the vocabulary \[0, 64\)", ids + 10, mask)
    _refused(model, r"input_ids must be an i64 tensor", ids.float(), mask)
    _refused(model, r"needs 14 cache blocks .* has 6 of 6 free", layout="paged",
             cache_kw={"num_blocks": 6}, max_new_tokens=8)


def test_no_free_slot_is_refused_and_a_failing_step_frees_everything(model):
    ids, mask = _prompts(LENGTHS[:2])
    cache = _cache(model, max_batch=2)
    cache.add("someone else", 3)
    with pytest.raises(InputError, match=r"needs 2 cache sequences; 1 of 2 are free"):
        generate(PrefixStep(model, cache), cache, ids, mask)
    cache.free("someone else")

    def broken(input_ids, meta):
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        generate(broken, cache, ids, mask, max_new_tokens=3)
    assert len(cache) == 0
    with pytest.raises(ExecutionError, match=r"expected logits \[2, vocab\]"):
        generate(lambda i, m: torch.zeros(3, VOCAB), cache, ids, mask, max_new_tokens=3)
    assert len(cache) == 0


def test_seeded_sampling_of_one_prompt_draws_what_hf_draws(model):
    """HF samples with torch's global generator; ours seeded alike makes the same draws."""
    ids, mask = _prompts([6], seed=9)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=30, top_p=0.97,
              repetition_penalty=1.1, eos_token_id=None)
    ours, _ = _ours(model, ids, mask, seed=21, **kw)
    torch.manual_seed(21)
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(ours, hf)
