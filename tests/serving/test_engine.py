"""serving/engine.py: many concurrent requests give, each, what it gives alone.

The oracle is ``gen.generate`` on one prompt (engine_models.alone). The engine runs mixed
prompt lengths (some sharing a prefix, some longer than a step's token budget: chunked
prefill), with a block pool small enough to force preemption, cancellations midway, seeded
sampling next to other traffic, stop rules, text with stop strings, and speculative decoding
(prompt lookup; a draft model that is the target itself, so every draft is accepted).
"""

from __future__ import annotations

import threading

import pytest
import torch
from engine_models import (
    EOS,
    VOCAB,
    alone,
    compiled,
    finish_reason,
    hf_greedy,
    hf_model,
    random_prompts,
)

import transfuse
from transfuse.serving import Engine
from transfuse.serving.proposal import Proposal
from transfuse.serving.speculative import DraftModel


@pytest.fixture(scope="module")
def gen():
    return compiled("paged")


def _check_all_free(engine: Engine) -> None:
    assert len(engine.cache) == 0
    if engine.cache.paged:
        assert engine.cache.pool.num_free == engine.cache.num_blocks


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_concurrent_greedy_requests_equal_each_alone(gen, prefix_caching):
    shared = random_prompts([40], seed=11)[0]
    prompts = (random_prompts([3, 25, 6], seed=12, prefix=shared)
               + random_prompts([1, 17, 70, 9, 33, 5, 90, 12, 48, 2], seed=13))
    new = [30, 12, 40, 25, 8, 35, 20, 16, 40, 22, 6, 30, 18]
    expected = [alone(gen, p, n) for p, n in zip(prompts, new)]
    cancel_after = {4: 3, 9: 5}  # request index -> cancel once it has this many tokens
    # 14 blocks of 16 = 224 cache tokens for ~850 tokens of traffic: preemption must happen
    with Engine(gen, max_batch=6, max_tokens_per_step=48, num_blocks=14,
                prefix_caching=prefix_caching) as engine:
        handles = []
        for i, (p, n) in enumerate(zip(prompts, new)):
            h = engine.submit(p, max_new_tokens=n)
            if i in cancel_after:
                def cancel_midway(out, h=h, k=cancel_after[i], got=[0]):  # noqa: B006
                    got[0] += len(out.token_ids)
                    if got[0] >= k:
                        h.cancel()
                h.on_output(cancel_midway)
            handles.append(h)
        waiting = engine.submit(prompts[0], max_new_tokens=5)
        waiting.cancel()  # most likely still queued: cancelled before it runs
        results = [h.result(timeout=120) for h in handles]
        assert waiting.result(timeout=60).finish_reason in ("cancelled", "stop", "length")
        stats = engine.stats()
        _check_all_free(engine)
    assert stats["preemptions"] > 0, stats
    assert stats["cancelled"] >= 2
    for i, (r, want) in enumerate(zip(results, expected)):
        if i in cancel_after and r.finish_reason == "cancelled":
            assert r.token_ids == want[:len(r.token_ids)], i
            assert len(r.token_ids) >= cancel_after[i]
        else:
            assert r.token_ids == want, f"request {i}"
            assert r.finish_reason == finish_reason(want, new[i]), i
        assert r.metrics["prompt_tokens"] == len(prompts[i])
    assert any(r.metrics["preemptions"] for r in results)


def test_prefix_cache_hits_give_the_same_tokens(gen):
    system = random_prompts([50], seed=15)[0]  # 3 full blocks of 16 + 2 tokens
    prompts = random_prompts([7, 20, 1], seed=16, prefix=system)
    want = [alone(gen, p, 12) for p in prompts]
    with Engine(gen, max_batch=4, prefix_caching=True) as engine:
        first = engine.submit(prompts[0], max_new_tokens=12).result(timeout=60)
        later = [engine.submit(p, max_new_tokens=12) for p in prompts[1:]]
        results = [first] + [h.result(timeout=60) for h in later]
        again = engine.submit(prompts[0], max_new_tokens=12).result(timeout=60)
        prefix = engine.stats()["prefix"]
        _check_all_free(engine)
    assert [r.token_ids for r in results] == want and again.token_ids == want[0]
    assert first.metrics["cached_tokens"] == 0
    assert all(r.metrics["cached_tokens"] >= 48 for r in results[1:])
    assert again.metrics["cached_tokens"] >= 48
    assert prefix["hits"] > 0 and prefix["tokens_saved"] >= 3 * 48


class RecordingGen:
    """The tiny gen whose program records each step's (tokens N, sequences B, logit rows R)."""

    def __init__(self, gen):
        self._gen, self.steps = gen, []
        self.cache_spec, self.device = gen.cache_spec, gen.device
        self.vocab_size, self.generation_config = gen.vocab_size, gen.generation_config

    def program(self, inputs):
        ids, seq_lens, rows = inputs[0], inputs[3], inputs[5]
        self.steps.append((ids.shape[1], seq_lens.shape[0], rows.shape[0]))
        return self._gen.program(inputs)


def test_one_forward_mixes_prompt_chunks_and_decodes(gen):
    rec = RecordingGen(gen)
    short, long = random_prompts([4, 100], seed=17)
    with Engine(rec, max_batch=4, max_tokens_per_step=32) as engine:
        h = engine.submit(short, max_new_tokens=60, eos_token_id=None)
        next(h.stream(timeout=30))  # decoding
        h2 = engine.submit(long, max_new_tokens=3, eos_token_id=None)
        assert h.result(timeout=60).token_ids == alone(gen, short, 60, eos_token_id=None)
        assert h2.result(timeout=60).token_ids == alone(gen, long, 3, eos_token_id=None)
    assert all(n <= 32 for n, _, _ in rec.steps)
    # the long prompt's chunks ran beside the decode: 2 sequences, only the decode's logits
    mixed = [(n, b, r) for n, b, r in rec.steps if b == 2 and n > 2]
    assert (32, 2, 1) in mixed  # a 31-token chunk + 1 decode token: one logit row
    assert (100 - 3 * 31 + 1, 2, 2) in mixed  # the last chunk samples too: 2 rows
    assert len(mixed) == 4  # ceil(100 / 31) chunks, each beside the running decode


def test_seeded_sampling_is_reproducible_whatever_else_runs(gen):
    prompt = random_prompts([12], seed=21)[0]
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    want = alone(gen, prompt, 25, do_sample=True, **kw)
    penalised = random_prompts([9], seed=22)[0]
    want_pen = alone(gen, penalised, 20, repetition_penalty=1.5, min_new_tokens=20)
    with Engine(gen, max_batch=8, max_tokens_per_step=32) as engine:
        solo = engine.submit(prompt, max_new_tokens=25, **kw).result(timeout=60)
        others = [engine.submit(p, max_new_tokens=20, temperature=1.0, seed=s)
                  for s, p in enumerate(random_prompts([30, 4, 50, 7], seed=23))]
        busy = engine.submit(prompt, max_new_tokens=25, **kw)
        pen = engine.submit(penalised, max_new_tokens=20, repetition_penalty=1.5,
                            min_new_tokens=20)
        greedy = engine.submit(prompt, max_new_tokens=10)
        assert busy.result(timeout=60).token_ids == want
        assert pen.result(timeout=60).token_ids == want_pen
        assert greedy.result(timeout=60).token_ids == alone(gen, prompt, 10)
        for h in others:
            h.result(timeout=60)
    assert solo.token_ids == want
    assert want != alone(gen, prompt, 25)  # sampling really sampled


def test_stop_rules(gen):
    prompt = random_prompts([10], seed=31)[0]
    free = alone(gen, prompt, 40, eos_token_id=None)
    stop = free[6:8]
    cut = next(i for i in range(len(free) - 1) if free[i:i + 2] == stop) + 2
    with Engine(gen, max_batch=4) as engine:
        r = engine.submit(prompt, max_new_tokens=40, eos_token_id=None,
                          stop=[[VOCAB - 1, VOCAB - 1], stop]).result(timeout=60)
        assert (r.token_ids, r.finish_reason) == (free[:cut], "stop")
        r = engine.submit(prompt, max_new_tokens=40, eos_token_id=None).result(timeout=60)
        assert (r.token_ids, r.finish_reason) == (free, "length")
        eos = free[3]  # a token it makes as the 4th: an EOS id stops it there
        r = engine.submit(prompt, max_new_tokens=40, eos_token_id=[eos]).result(timeout=60)
        assert r.token_ids == alone(gen, prompt, 40, eos_token_id=eos) == free[:4]
        assert r.finish_reason == "stop"
        r = engine.submit(prompt, max_new_tokens=0).result(timeout=60)
        assert (r.token_ids, r.finish_reason) == ([], "length")
        _check_all_free(engine)


class LetterTokenizer:
    """A toy tokenizer: id i decodes to a letter (ids >= 52 to a space)."""

    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.letters[i] if i < 52 else " " for i in ids)


def test_text_outputs_and_stop_strings(gen):
    tok = LetterTokenizer()
    prompt = random_prompts([8], seed=41)[0]
    free = alone(gen, prompt, 30, eos_token_id=None)
    text = tok.decode(free)
    stop = text[10:13]
    with Engine(gen, max_batch=2, tokenizer=tok) as engine:
        r = engine.submit(prompt, max_new_tokens=30, eos_token_id=None).result(timeout=60)
        assert r.text == text and r.token_ids == free
        h = engine.submit(prompt, max_new_tokens=30, eos_token_id=None, stop=[stop])
        r = h.result(timeout=60)
    assert r.finish_reason == "stop"
    assert r.text == text[:text.index(stop)]  # the stop string itself is not shown
    assert tok.decode(r.token_ids).endswith(stop) or stop in tok.decode(r.token_ids)


def test_stream_and_on_output_replay(gen):
    prompt = random_prompts([5], seed=51)[0]
    want = alone(gen, prompt, 15, eos_token_id=None)
    seen, done = [], threading.Event()
    with Engine(gen) as engine:
        h = engine.submit(prompt, max_new_tokens=15, eos_token_id=None)
        assert list(h.stream(timeout=60)) == want
        h.on_output(lambda out: (seen.append(out), out.finished and done.set()))  # replayed
        assert done.wait(5)
    assert [t for o in seen for t in o.token_ids] == want
    assert seen[-1].finished and seen[-1].finish_reason == "length"
    assert not any(o.finished for o in seen[:-1])
    assert h.result().metrics["ttft_s"] > 0 and len(h.result().metrics["itl_s"]) == 14


def test_prompt_lookup_speculation_keeps_greedy_tokens(gen):
    # prompts that repeat themselves, so n-gram lookup finds drafts
    base = random_prompts([6, 9, 4], seed=61)
    prompts = [b * 5 for b in base] + random_prompts([20], seed=62)
    want = [alone(gen, p, 30) for p in prompts]
    with Engine(gen, max_batch=4, speculative="prompt-lookup", spec_tokens=4) as engine:
        got = [h.result(timeout=60).token_ids
               for h in [engine.submit(p, max_new_tokens=30) for p in prompts]]
        stats = engine.stats()["spec"]
        _check_all_free(engine)
    assert got == want
    assert stats["proposed"] > 0 and stats["spec_steps"] > 0


def test_draft_model_speculation_accepts_a_perfect_draft(gen):
    prompts = random_prompts([7, 30, 3], seed=71)
    want = [alone(gen, p, 25, eos_token_id=None) for p in prompts]
    draft = DraftModel(gen, max_batch=4)  # the target drafting for itself: all accepted
    with Engine(gen, max_batch=4, speculative=draft, spec_tokens=3) as engine:
        handles = [engine.submit(p, max_new_tokens=25, eos_token_id=None) for p in prompts]
        got = [h.result(timeout=60) for h in handles]
        stats = engine.stats()["spec"]
        _check_all_free(engine)
    assert [r.token_ids for r in got] == want
    assert stats["proposed"] > 0 and stats["accepted"] == stats["proposed"]
    assert all(r.metrics["spec_accepted"] == r.metrics["spec_proposed"] > 0 for r in got)
    assert len(draft.cache) == 0  # released with their requests


def test_a_bounded_step_bounds_the_engine_and_the_draft():
    """A gen whose step takes at most 20 tokens (max_step_tokens; MPT's capture bounds it so):
    the engine's step budget is lowered to it, a larger max_batch is refused, prompts longer
    than it are chunked, and a draft model on it catches up in chunks; each request = alone."""
    bounded = compiled("paged", max_step_tokens=20)
    assert bounded.cache_spec["max_step_tokens"] == 20
    with pytest.raises(transfuse.InputError, match="max_batch 21 exceeds the 20 tokens one step"):
        Engine(bounded, max_batch=21)
    prompts = random_prompts([45, 7, 30], seed=77)
    want = [alone(bounded, p, 12, eos_token_id=None) for p in prompts]
    draft = DraftModel(bounded, max_batch=4)
    steps = []
    run_step = draft._run_step
    draft._run_step = lambda items: (steps.append(sum(len(t) for _, t in items)),
                                     run_step(items))[1]
    with Engine(bounded, max_batch=4, speculative=draft, spec_tokens=3) as engine:
        assert engine.max_tokens_per_step == 20
        handles = [engine.submit(p, max_new_tokens=12, eos_token_id=None) for p in prompts]
        got = [h.result(timeout=60) for h in handles]
        assert engine.stats()["spec"]["accepted"] > 0
        _check_all_free(engine)
    assert [r.token_ids for r in got] == want
    assert max(steps) <= 20 and sum(steps) >= 45, steps
    with Engine(bounded, max_tokens_per_step=8) as engine:
        assert engine.max_tokens_per_step == 8


def test_logprobs_are_the_models_log_softmax(gen):
    """logprobs=3: each token's log-probability and the top 3 equal the HF model's
    log-softmax at that step (raw logits), in outputs and in the result; logprobs=0 gives the
    chosen token's only; a request that asks for none gets None."""
    model = hf_model("paged")
    prompts = random_prompts([9, 4], seed=91)
    with Engine(gen, max_batch=4) as engine:
        h3 = engine.submit(prompts[0], max_new_tokens=7, eos_token_id=None, logprobs=3)
        h0 = engine.submit(prompts[1], max_new_tokens=5, eos_token_id=None, logprobs=0)
        hn = engine.submit(prompts[1], max_new_tokens=5, eos_token_id=None)
        r3, r0, rn = (h.result(timeout=60) for h in (h3, h0, hn))
        streamed = [lp for out in h3.outputs(timeout=5) for lp in (out.logprobs or [])]
    assert rn.logprobs is None and streamed == r3.logprobs
    for r, prompt, top in ((r3, prompts[0], 3), (r0, prompts[1], 0)):
        want, logps = hf_greedy(model, prompt, len(r.token_ids))
        assert r.token_ids == want
        assert [lp.token_id for lp in r.logprobs] == want
        for lp, ref in zip(r.logprobs, logps):
            assert abs(lp.logprob - float(ref[lp.token_id])) < 1e-4
            assert len(lp.top) == top
            values, ids = torch.topk(ref, top)
            assert [t for t, _ in lp.top] == ids.tolist()
            assert all(abs(v - float(w)) < 1e-4 for (_, v), w in zip(lp.top, values))
    with pytest.raises(transfuse.InputError, match="logprobs must be at most 20"):
        Engine.submit(engine, prompts[0], logprobs=21)


@torch.no_grad()
def test_prompt_logprobs_over_chunks_and_a_cached_prefix(gen):
    """prompt_logprobs=2: every prompt token after the first gets its log-probability (the HF
    model's log-softmax at the position before it) and top 2, in the first output, though the
    prompt runs in chunks of 8 tokens and an identical earlier prompt sits in the prefix cache
    (such a request computes its whole prompt)."""
    model = hf_model("paged")
    prompt = random_prompts([30], seed=95)[0]
    ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    with Engine(gen, max_batch=4, max_tokens_per_step=8, prefix_caching=True) as engine:
        first = engine.submit(prompt, max_new_tokens=2, eos_token_id=None).result(timeout=60)
        h = engine.submit(prompt, max_new_tokens=3, eos_token_id=None, prompt_logprobs=2,
                          logprobs=1)
        r = h.result(timeout=60)
        outs = list(h.outputs(timeout=5))
        _check_all_free(engine)
    assert r.token_ids[:2] == first.token_ids
    plp = r.prompt_logprobs
    assert outs[0].prompt_logprobs is plp and all(o.prompt_logprobs is None for o in outs[1:])
    assert [e.token_id for e in plp] == prompt and plp[0].logprob is None
    for q, e in enumerate(plp[1:]):
        assert abs(e.logprob - float(ref[q, prompt[q + 1]])) < 1e-4
        values, ids = torch.topk(ref[q], 2)
        assert [t for t, _ in e.top] == ids.tolist()
    assert len(r.logprobs) == 3 and r.metrics["cached_tokens"] == 0
    with Engine(gen, max_batch=4, max_tokens_per_step=8) as engine:  # scoring only
        scored = engine.submit(prompt, max_new_tokens=0, prompt_logprobs=0).result(timeout=60)
        _check_all_free(engine)
    assert scored.token_ids == [] and scored.finish_reason == "length"
    assert [e.token_id for e in scored.prompt_logprobs] == prompt
    assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(scored.prompt_logprobs[1:],
                                                                 plp[1:]))


@pytest.mark.parametrize("speculative", [None, "draft", "prompt-lookup"])
def test_presence_frequency_penalties_and_logit_bias_like_openai(gen, speculative):
    """Greedy with OpenAI's penalties over the generated tokens and a logit bias = the HF
    oracle that applies them by hand, with or without speculative decoding (rows past a draft
    count the drafts before them)."""
    model = hf_model("paged")
    prompt = random_prompts([6], seed=93)[0] * 3  # repetitive: prompt lookup proposes drafts
    bias = {int(prompt[0]): 3.0, 7: -100.0}
    cases = [dict(presence=0.0, frequency=1.5, logit_bias=None),
             dict(presence=2.0, frequency=0.0, logit_bias=None),
             dict(presence=0.5, frequency=-0.3, logit_bias=bias)]
    spec = {None: None, "draft": DraftModel(gen, max_batch=4), "prompt-lookup": "prompt-lookup"}
    with Engine(gen, max_batch=4, speculative=spec[speculative], spec_tokens=3) as engine:
        handles = [engine.submit(prompt, max_new_tokens=14, eos_token_id=None,
                                 presence_penalty=c["presence"],
                                 frequency_penalty=c["frequency"],
                                 logit_bias=None if c["logit_bias"] is None else
                                 {str(k): v for k, v in c["logit_bias"].items()})
                   for c in cases]
        got = [h.result(timeout=60).token_ids for h in handles]
        stats = engine.stats()
        _check_all_free(engine)
    if speculative is not None:  # the verification path with counts really ran
        assert stats["spec"]["proposed"] > 0, stats["spec"]
    for c, tokens in zip(cases, got):
        want, _ = hf_greedy(model, prompt, 14, **c)
        assert tokens == want, c
    assert 7 not in got[2]
    plain = alone(gen, prompt, 14, eos_token_id=None)
    assert got[0] != plain  # the penalty changed the answer


def test_bad_openai_options_are_refused(gen):
    with Engine(gen, max_batch=2) as engine:
        for kw, match in ((dict(presence_penalty=2.5), "presence_penalty must be a number in"),
                          (dict(frequency_penalty="1"), "frequency_penalty must be a number"),
                          (dict(logit_bias={"96": 1.0}), "logit_bias key '96' is not a token"),
                          (dict(logit_bias={"-1": 1.0}), "logit_bias key '-1'"),
                          (dict(logit_bias={3: 101.0}), r"logit_bias\[3\] must be a number"),
                          (dict(logit_bias=[1, 2]), "logit_bias must be a dict"),
                          (dict(logprobs=-1), "logprobs must be an integer >= 0")):
            with pytest.raises(transfuse.InputError, match=match):
                engine.submit([1, 2, 3], max_new_tokens=2, **kw)


def test_sampled_requests_with_a_perfect_draft(gen):
    prompts = random_prompts([6, 15], seed=75)
    with Engine(gen, max_batch=2, speculative=DraftModel(gen, max_batch=2),
                spec_tokens=3) as engine:
        got = [h.result(timeout=60) for h in [
            engine.submit(p, max_new_tokens=20, eos_token_id=None, temperature=0.9, seed=i)
            for i, p in enumerate(prompts)]]
        stats = engine.stats()["spec"]
        _check_all_free(engine)
    assert all(len(r.token_ids) == 20 and r.finish_reason == "length" for r in got)
    # q = p up to rounding: min(1, p/q) accepts (almost) every draft
    assert stats["proposed"] > 0 and stats["accepted"] >= 0.95 * stats["proposed"]


class NoisyProposer:
    """Random drafts (mostly rejected) and a failure at its second call."""

    def __init__(self):
        self.calls, self.released = 0, set()
        self.g = torch.Generator().manual_seed(0)

    def propose_batch(self, reqs, k):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("proposer broke")
        return [Proposal(torch.randint(0, VOCAB, (r.want(k),), generator=self.g).tolist())
                for r in reqs]

    def rollback(self, request_id, keep_len):
        pass

    def release(self, request_id):
        self.released.add(request_id)


def test_wrong_drafts_and_a_failing_proposer_change_no_token(gen):
    prompts = random_prompts([5, 22, 9], seed=81)
    want = [alone(gen, p, 20, eos_token_id=None) for p in prompts]
    noisy = NoisyProposer()
    with Engine(gen, max_batch=4, speculative=noisy, spec_tokens=3) as engine:
        handles = [engine.submit(p, max_new_tokens=20, eos_token_id=None) for p in prompts]
        got = [h.result(timeout=60).token_ids for h in handles]
        stats = engine.stats()["spec"]
        _check_all_free(engine)
    assert got == want
    assert stats["propose_errors"] == 1 and stats["proposed"] > stats["accepted"]
    assert noisy.released == {h.id for h in handles}


def test_engine_is_exported_lazily():
    assert transfuse.Engine is Engine
    assert "Engine" in transfuse.__all__
    assert torch.tensor([EOS]).item() == 2
