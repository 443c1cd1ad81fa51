"""runtime/sampling.py against Hugging Face's logits processors (exact) and by its own rules."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from transfuse.errors import InputError
from transfuse.runtime.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    make_generator,
    process_logits,
    sample_next,
    seen_tokens,
    suppress_tokens,
    token_counts,
)

R, V = 5, 97


def _logits(seed: int = 0, rows: int = R, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def _history(seed: int = 1, rows: int = R, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded token histories and the number of padding tokens of each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (rows, length), generator=g)
    pads = torch.randint(0, length - 1, (rows,), generator=g)
    return ids, pads


def _padded(ids: torch.Tensor, pads: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1])
    return torch.where(pos[None, :] < pads[:, None], -1, ids)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_hf(penalty):
    scores = _logits()
    ids, pads = _history()
    hf = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=pads)(ids, scores.clone())
    ours = apply_repetition_penalty(scores, _padded(ids, pads), penalty)
    assert torch.equal(ours, hf)
    assert not torch.equal(ours, scores)  # it did something


def test_repetition_penalty_takes_the_seen_mask_too():
    scores = _logits()
    ids, pads = _history()
    seen = seen_tokens(_padded(ids, pads), V)
    assert seen.dtype == torch.bool and seen.shape == (R, V)
    assert seen.sum(1).tolist() == [len(set(ids[r, int(pads[r]):].tolist())) for r in range(R)]
    assert torch.equal(apply_repetition_penalty(scores, seen, 1.4),
                       apply_repetition_penalty(scores, _padded(ids, pads), 1.4))
    with pytest.raises(InputError, match=r"bool history must be \[R, V\]"):
        apply_repetition_penalty(scores, seen[:, :-1], 1.4)


def test_repetition_penalty_ignores_ids_outside_the_head():
    scores = _logits()
    hist = torch.full((R, 3), V + 5)  # ids an embedding may have but this head cannot produce
    assert torch.equal(apply_repetition_penalty(scores, hist, 2.0), scores)


def test_min_new_tokens_equals_hf():
    scores = _logits()
    ids, _ = _history()
    prompt = 8
    for eos in (3, [3, 40]):
        hf_proc = MinNewTokensLengthLogitsProcessor(prompt, 2, eos)
        eos_t = (eos,) if isinstance(eos, int) else tuple(eos)
        params = SamplingParams(min_new_tokens=2, eos_token_id=eos_t)
        for new in range(4):  # suppressed while fewer than 2 new tokens
            hf = hf_proc(ids[:, : prompt + new], scores.clone())
            assert torch.equal(process_logits(scores, None, params, new), hf)
        assert torch.isinf(suppress_tokens(scores, eos_t)[:, 3]).all()


@pytest.mark.parametrize("t", [0.5, 1.7])
def test_temperature_equals_hf(t):
    scores = _logits()
    assert torch.equal(apply_temperature(scores, t), TemperatureLogitsWarper(t)(None, scores))


@pytest.mark.parametrize("k,keep", [(1, 1), (7, 1), (3, 5), (V + 10, 1)])
def test_top_k_equals_hf(k, keep):
    scores = _logits()
    scores[0, :4] = scores[0].max()  # ties at the top: all kept
    hf = TopKLogitsWarper(k, min_tokens_to_keep=keep)(None, scores)
    assert torch.equal(apply_top_k(scores, k, min_tokens_to_keep=keep), hf)


@pytest.mark.parametrize("p,keep", [(0.0, 1), (0.3, 1), (0.9, 1), (0.9, 4), (1.0, 1)])
def test_top_p_equals_hf(p, keep):
    scores = _logits(3)
    hf = TopPLogitsWarper(p, min_tokens_to_keep=keep)(None, scores)
    assert torch.equal(apply_top_p(scores, p, min_tokens_to_keep=keep), hf)


def test_whole_chain_equals_hf_in_hf_order():
    scores = _logits(4)
    ids, pads = _history(5)
    prompt = 6
    chain = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.2, prompt_ignore_length=pads),
        MinNewTokensLengthLogitsProcessor(prompt, 9, [2, 11]),
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.9),
    ])
    hf = chain(ids, scores.clone())
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                            repetition_penalty=1.2, min_new_tokens=9, eos_token_id=(2, 11))
    ours = process_logits(scores, _padded(ids, pads), params, new_tokens=ids.shape[1] - prompt)
    assert torch.equal(ours, hf)


def test_greedy_is_argmax_and_ignores_the_sampling_filters():
    scores = _logits(6)
    params = SamplingParams(temperature=0.3, top_k=2, top_p=0.1)  # do_sample False
    assert torch.equal(sample_next(scores, None, params), scores.argmax(-1))
    scores[:, 10] = scores[:, 40] = scores.max() + 1  # ties: the first, as argmax
    assert sample_next(scores, None, params).tolist() == [10] * R == scores.argmax(-1).tolist()
    assert torch.equal(process_logits(scores, None, params, 0), scores)


def test_seeded_sampling_is_reproducible_and_matches_the_global_generator():
    scores = _logits(7)
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=30, top_p=0.95)
    a = [sample_next(scores, None, params, g) for g in [make_generator(11)] * 5]
    b = [sample_next(scores, None, params, g) for g in [make_generator(11)] * 5]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({tuple(x.tolist()) for x in a}) > 1  # the draws do vary
    # HF's way (torch.manual_seed + multinomial of the processed scores) draws the same ids
    torch.manual_seed(11)
    chain = LogitsProcessorList([TemperatureLogitsWarper(0.9), TopKLogitsWarper(30),
                                 TopPLogitsWarper(0.95)])
    hf = torch.multinomial(chain(None, scores).softmax(-1), 1).squeeze(1)
    assert torch.equal(hf, a[0])


def test_sampling_stays_inside_the_filters():
    scores = _logits(8, rows=2, vocab=50)
    g = make_generator(0)
    k_params = SamplingParams(do_sample=True, top_k=3)
    allowed = torch.topk(scores, 3).indices
    for _ in range(200):
        ids = sample_next(scores, None, k_params, g)
        assert all(int(ids[r]) in allowed[r].tolist() for r in range(2))
    counts = torch.zeros(50)
    few = SamplingParams(do_sample=True, top_k=0, temperature=1.0)
    for _ in range(2000):
        counts[sample_next(scores[:1], None, few, g)] += 1
    probs = scores[0].softmax(-1)
    top = int(probs.argmax())
    assert abs(counts[top] / 2000 - probs[top]) < 0.05  # the empirical frequency is sane


def test_top_k_keeps_k_and_top_p_keeps_the_smallest_set_reaching_p():
    scores = _logits(9)
    kept = torch.isfinite(apply_top_k(scores, 7)).sum(-1)
    assert kept.tolist() == [7] * R
    p = 0.8
    filtered = apply_top_p(scores, p)
    probs = scores.softmax(-1)
    for r in range(R):
        keep = torch.isfinite(filtered[r])
        mass = probs[r][keep].sum()
        assert mass >= p - 1e-6
        smallest = probs[r][keep].min()
        assert mass - smallest < p  # one fewer would not reach p
        assert probs[r][~keep].max() <= smallest  # the kept ones are the most probable


def test_repetition_penalty_applies_in_greedy_too():
    scores = torch.tensor([[2.0, 1.9, -1.0]])
    params = SamplingParams(repetition_penalty=2.0)
    assert sample_next(scores, torch.tensor([[0]]), params).item() == 1
    assert sample_next(scores, None, SamplingParams()).item() == 0


@pytest.mark.parametrize("kwargs,name", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_new_tokens": -2}, "min_new_tokens"),
    ({"do_sample": 1}, "do_sample"), ({"temperature": math.nan}, "temperature"),
    ({"eos_token_id": (-1,)}, "eos_token_id"),
])
def test_bad_options_are_input_errors_naming_the_option(kwargs, name):
    with pytest.raises(InputError, match=name):
        SamplingParams(**kwargs)


def test_bad_shapes_and_seed():
    with pytest.raises(InputError, match=r"logits must be \[R, V\]"):
        sample_next(torch.zeros(3), None, SamplingParams())
    with pytest.raises(InputError, match="history"):
        apply_repetition_penalty(torch.zeros(2, 4), torch.zeros(3, 1, dtype=torch.long), 1.1)
    with pytest.raises(InputError, match="seed"):
        make_generator(-1)
    assert make_generator(None) is None


# -- OpenAI's options (serving) ------------------------------------------------------------------


def test_openai_penalties_and_logit_bias():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    counts = token_counts([2, 2, 3, 9, -1], vocab=4)  # 9 and -1 are no ids of this head
    assert counts.tolist() == [[0.0, 0.0, 2.0, 1.0]]
    out = apply_presence_frequency(scores, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [[1.0, 2.0, 3.0 - 0.5 - 0.5, 4.0 - 0.25 - 0.5]]
    assert apply_logit_bias(scores, [(0, 10.0), (3, -100.0), (7, 1.0)]).tolist() == \
        [[11.0, 2.0, 3.0, -96.0]]
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=1.0, logit_bias=((1, 5.0),))
    assert params.changes_scores(0) and params.penalises_counts
    assert not SamplingParams().changes_scores(0)
    # logit bias, then the penalties; greedy takes the argmax of the result
    got = process_logits(scores, None, params, 3, counts)
    assert got.tolist() == [[1.0, 7.0, 0.0, 2.0]]
    assert sample_next(scores, None, params, new_tokens=3, counts=counts).tolist() == [1]


@pytest.mark.parametrize("kw,match", [
    (dict(presence_penalty=2.1), "presence_penalty must be a number in"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty must be a number"),
    (dict(logit_bias={1: 2.0}), "logit_bias must be a tuple"),
    (dict(logit_bias=((1, 2.0, 3),)), "pairs"),
    (dict(logit_bias=((-1, 2.0),)), "logit_bias token id must be an integer >= 0"),
    (dict(logit_bias=((1, 100.5),)), r"logit_bias\[1\] must be a number in \[-100, 100\]"),
])
def test_openai_options_are_checked(kw, match):
    with pytest.raises(InputError, match=match):
        SamplingParams(**kw)
