"""Speculative decoding without a compiled model: verify (greedy and the accept/reject rule,
checked by chi-square against the exact distribution of plain sampling, with two wrong rules
that the same test rejects), prompt lookup, the policy. The compiled-model tests are in
test_speculative_model.py."""

from __future__ import annotations

import collections
import random

import pytest
import torch
from spec_toys import ToyLM, chi_square, draft_proposal, exact_distribution

from transfuse.errors import InputError
from transfuse.runtime.sampling import SamplingParams, sample_next, seen_tokens
from transfuse.serving.speculative import (
    PromptLookup,
    Proposal,
    SpeculationPolicy,
    draft_probs,
    process_rows,
    verify,
)

# -- verify: greedy ------------------------------------------------------------------------


def plain_greedy(model: ToyLM, prompt: list[int], steps: int, params: SamplingParams):
    ctx = list(prompt)
    for i in range(steps):
        seen = seen_tokens(torch.tensor([ctx]), model.vocab)
        ctx.append(int(sample_next(model.logits(ctx)[None], seen, params, new_tokens=i)))
    return ctx[len(prompt):]


def test_greedy_verify_equals_argmax_decoding():
    model, prompt, steps = ToyLM(40, seed=1), [5, 9, 5], 60
    params = SamplingParams(repetition_penalty=1.4, min_new_tokens=4, eos_token_id=(0, 3))
    want = plain_greedy(model, prompt, steps, params)
    # the processors matter here: without them greedy decoding picks other tokens
    assert want != plain_greedy(model, prompt, steps, SamplingParams())
    rng = random.Random(0)
    ctx, out, accepted_all, rejected = list(prompt), [], 0, 0
    while len(out) < steps:
        # drafts: the true continuation, each token corrupted with probability 0.3
        k = rng.randint(0, 5)
        truth = want[len(out):len(out) + k]
        drafts = [t if rng.random() > 0.3 else rng.randrange(40) for t in truth]
        new = verify(model.rows(ctx, drafts), Proposal(drafts), params, ctx, len(out))
        assert 1 <= len(new) <= len(drafts) + 1
        accepted_all += len(new) == len(drafts) + 1
        rejected += len(new) <= len(drafts)
        ctx += new
        out += new
    assert out[:steps] == want
    assert accepted_all > 3 and rejected > 3  # both paths were taken


def test_verify_checks_its_inputs():
    logits = torch.zeros(3, 8)
    with pytest.raises(InputError, match=r"k\+1=2"):
        verify(logits, Proposal([1]), SamplingParams(), [1], 0)
    with pytest.raises(InputError, match="outside the target's vocabulary"):
        verify(logits, Proposal([1, 8]), SamplingParams(), [1], 0)
    with pytest.raises(InputError, match="new_tokens"):
        verify(logits, Proposal([1, 2]), SamplingParams(), [1], -1)
    with pytest.raises(InputError, match="Proposal.probs"):
        Proposal([1, 2], torch.ones(3, 8))
    with pytest.raises(InputError, match="token ids"):
        Proposal([1, -2])


def test_rows_see_history_and_earlier_drafts():
    """Row i is penalised for history + d_1..d_i and has EOS suppressed while
    new_tokens + i < min_new_tokens."""
    params = SamplingParams(repetition_penalty=2.0, min_new_tokens=3, eos_token_id=(0,))
    logits = torch.full((4, 6), 1.0)
    rows = process_rows(logits, [2, 3, 4], params, [1], new_tokens=1)
    penalised = rows == 0.5
    assert penalised.tolist() == [
        [False, True, False, False, False, False],
        [False, True, True, False, False, False],
        [False, True, True, True, False, False],
        [False, True, True, True, True, False]]
    assert torch.isinf(rows[:2, 0]).all() and torch.isfinite(rows[2:, 0]).all()


def test_draft_probs_pad_cut_and_one_hot():
    q = draft_probs(Proposal([1, 2]), 4, torch.device("cpu"), torch.float32)
    assert q.tolist() == [[0, 1, 0, 0], [0, 0, 1, 0]]
    small = Proposal([1], torch.tensor([[0.5, 0.5]]))
    assert draft_probs(small, 4, torch.device("cpu"), torch.float32).tolist() == [[.5, .5, 0, 0]]
    big = Proposal([1], torch.tensor([[0.25] * 4]))
    assert draft_probs(big, 2, torch.device("cpu"), torch.float32).shape == (1, 2)


# -- verify: sampling keeps the target's distribution ----------------------------------------

PARAMS = SamplingParams(do_sample=True, temperature=0.9, top_k=0, top_p=0.95,
                        repetition_penalty=1.3, min_new_tokens=1, eos_token_id=(0,))
VOCAB, STEPS, K, SAMPLES = 6, 3, 2, 4000


def always_accept(logits, proposal, params, history, new_tokens, generator):
    """A wrong rule: every draft is kept, then a bonus token from the last row."""
    p = process_rows(logits, proposal.tokens, params, history, new_tokens).softmax(-1)
    return list(proposal.tokens) + [int(torch.multinomial(p[-1], 1, generator=generator))]


def resample_from_p(logits, proposal, params, history, new_tokens, generator):
    """A subtly wrong rule: on rejection, draw from p instead of norm(max(0, p - q))."""
    p = process_rows(logits, proposal.tokens, params, history, new_tokens).softmax(-1)
    q = draft_probs(proposal, p.shape[1], p.device, p.dtype)
    for i, d in enumerate(proposal.tokens):
        if float(torch.rand(1, generator=generator)) * float(q[i, d]) >= float(p[i, d]):
            return proposal.tokens[:i] + [int(torch.multinomial(p[i], 1, generator=generator))]
    return list(proposal.tokens) + [int(torch.multinomial(p[-1], 1, generator=generator))]


def speculative_counts(rule, deterministic: bool, seed: int = 0):
    """Counts of the first STEPS tokens of SAMPLES speculative generations (toy target, toy
    draft with other weights) and the fraction of drafts accepted."""
    target, prompt = ToyLM(VOCAB, seed=1), [1, 4]
    draft = target.perturbed(seed=2, noise=0.7)
    g = torch.Generator().manual_seed(seed)
    counts, proposed, accepted = collections.Counter(), 0, 0
    for _ in range(SAMPLES):
        ctx, out = list(prompt), []
        while len(out) < STEPS:
            prop = draft_proposal(draft, ctx, K, PARAMS, len(out), g,
                                  deterministic=deterministic)
            new = rule(target.rows(ctx, prop.tokens), prop, PARAMS, ctx, len(out), g)
            proposed += len(prop)
            accepted += len(new) - 1
            ctx += new
            out += new
        counts[tuple(out[:STEPS])] += 1
    return counts, accepted / proposed


@pytest.fixture(scope="module")
def exact():
    return exact_distribution(ToyLM(VOCAB, seed=1), [1, 4], STEPS, PARAMS)


@pytest.mark.parametrize("rule", [verify, always_accept])
def test_first_token_of_one_step_is_distributed_as_p(rule):
    """Fixed toy p and q over 8 tokens, k = 1: the first emitted token ~ p (and ~ q with
    always-accept, which the chi-square test rejects)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.30, 0.05, 0.20, 0.02, 0.13, 0.10, 0.15, 0.05])
    q = torch.tensor([0.05, 0.30, 0.10, 0.20, 0.05, 0.10, 0.05, 0.15])
    logits = p.log().expand(2, 8)
    params = SamplingParams(do_sample=True, top_k=0)
    counts = collections.Counter()
    for _ in range(4000):
        d = int(torch.multinomial(q, 1, generator=g))
        counts[(rule(logits, Proposal([d], q[None]), params, [], 0, g)[0],)] += 1
    p_value = chi_square(counts, {(t,): float(p[t]) for t in range(8)})[2]
    assert p_value > 1e-3 if rule is verify else p_value < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [False, True], ids=["sampled-q", "one-hot-q"])
def test_speculative_sampling_matches_plain_sampling(exact, deterministic):
    counts, acceptance = speculative_counts(verify, deterministic)
    stat, df, p_value = chi_square(counts, exact)
    assert p_value > 1e-3, (stat, df)
    assert 0.2 < acceptance < 0.9  # drafts were both accepted and rejected


@pytest.mark.slow
@pytest.mark.parametrize("rule", [always_accept, resample_from_p])
def test_chi_square_rejects_a_wrong_rule(exact, rule):
    counts, _ = speculative_counts(rule, deterministic=False)
    stat, df, p_value = chi_square(counts, exact)
    assert p_value < 1e-6, (stat, df)


@pytest.mark.slow
def test_plain_sampling_passes_the_same_test(exact):
    """The test's own calibration: plain sampling of the toy target passes it."""
    from spec_toys import processed_probs
    target, g = ToyLM(VOCAB, seed=1), torch.Generator().manual_seed(3)
    counts = collections.Counter()
    for _ in range(SAMPLES):
        ctx = [1, 4]
        for i in range(STEPS):
            ctx.append(int(torch.multinomial(processed_probs(target, ctx, PARAMS, i), 1,
                                             generator=g)))
        counts[tuple(ctx[2:])] += 1
    assert chi_square(counts, exact)[2] > 1e-3


def test_equal_draft_and_target_accept_everything():
    logits = torch.randn(4, 10)
    params = SamplingParams(do_sample=True, top_k=0)
    q = process_rows(logits, [], params, [], 0).softmax(-1)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(3)]
        new = verify(logits, Proposal(drafts, q[:3]), params, [], 0, g)
        assert new[:3] == drafts and len(new) == 4


# -- prompt lookup -------------------------------------------------------------------------


def test_prompt_lookup_longest_ngram_first_then_most_recent():
    pl = PromptLookup(max_ngram=3)
    # the 3-gram (7, 8, 9) occurred once, followed by 1 2 3; the 1-gram 9 occurs later (-> 5)
    ctx = [7, 8, 9, 1, 2, 3, 4, 9, 5, 7, 8, 9]
    assert pl.propose(ctx, 3).tokens == [1, 2, 3]
    assert PromptLookup(max_ngram=1).propose(ctx, 3).tokens == [5, 7, 8]  # most recent 9
    # two earlier matches of the same length: the most recent wins
    assert pl.propose([1, 2, 10, 1, 2, 20, 1, 2], 1).tokens == [20]


def test_prompt_lookup_k_end_of_context_and_no_match():
    pl = PromptLookup()
    assert pl.propose([1, 2, 3, 4, 5, 1, 2], 2).tokens == [3, 4]
    assert pl.propose([1, 2, 3, 4, 5, 1, 2], 10).tokens == [3, 4, 5, 1, 2]  # up to the end
    assert pl.propose([1, 2, 3, 4], 3).tokens == []
    assert pl.propose([1, 2, 3, 2], 0).tokens == []
    assert pl.propose([4], 3).tokens == []
    assert PromptLookup(max_ngram=3, min_ngram=2).propose([1, 2, 3, 9, 3], 2).tokens == []
    assert PromptLookup(max_ngram=3, min_ngram=2).propose([5, 3, 1, 9, 5, 3], 2).tokens == [1, 9]


def test_prompt_lookup_ignores_matches_that_straddle_tokens():
    # the bytes of 256 (00 01 00 ...) then 0 contain the bytes of token 1 at offset 1
    assert PromptLookup(max_ngram=1).propose([256, 0, 5, 1], 2).tokens == []
    assert PromptLookup(max_ngram=1).propose([256, 0, 1, 6, 1], 2).tokens == [6, 1]


def test_prompt_lookup_batch_and_errors():
    from transfuse.serving.speculative import DraftRequest
    pl = PromptLookup()
    reqs = [DraftRequest("a", [1, 2, 3, 1, 2]), DraftRequest("b", [4, 5, 4], k=1)]
    assert [p.tokens for p in pl.propose_batch(reqs, 2)] == [[3, 1], [5]]
    with pytest.raises(InputError, match="min_ngram 3 is larger"):
        PromptLookup(max_ngram=2, min_ngram=3)
    with pytest.raises(InputError, match="k must be"):
        pl.propose([1, 2], -1)


# -- policy --------------------------------------------------------------------------------


def test_policy_keeps_speculating_and_raises_k_when_it_pays():
    policy = SpeculationPolicy(k=2, max_k=6, min_steps=3)
    for _ in range(10):
        assert policy.enabled("r")
        k = policy.k("r")
        policy.record("r", k, k, spec_step_s=0.0105, plain_step_s_estimate=0.010)
    assert policy.enabled("r") and policy.k("r") == 6
    assert policy.stats("r")["acceptance"] > 0.9


def test_policy_turns_off_when_slower_and_reprobes_rarely():
    policy = SpeculationPolicy(k=4, min_steps=3, reprobe_after=5)
    steps = 0
    while policy.enabled("r"):  # acceptance 0 at twice the step time: off after a few steps
        policy.record("r", 4, 0, spec_step_s=0.02, plain_step_s_estimate=0.01)
        steps += 1
    assert 3 <= steps <= 8 and policy.stats("r")["disabled_times"] == 1
    assert [policy.enabled("r") for _ in range(4)] == [False] * 3 + [True]  # the probe
    for _ in range(steps):
        policy.record("r", 4, 0, spec_step_s=0.02, plain_step_s_estimate=0.01)
    assert [policy.enabled("r") for _ in range(10)] == [False] * 9 + [True]  # wait doubled
    never = SpeculationPolicy(min_steps=1, reprobe_after=None)
    for _ in range(8):
        never.record("r", 4, 0, 0.02, 0.01)
    assert not any(never.enabled("r") for _ in range(1000))


def test_policy_keeps_low_acceptance_when_drafts_are_nearly_free():
    """Acceptance 0.3 pays when a draft costs 2% of a step (batched, memory-bound)."""
    policy = SpeculationPolicy(k=4, min_steps=2)
    for _ in range(20):
        policy.record("r", 4, 1, spec_step_s=0.0108, plain_step_s_estimate=0.010)
    assert policy.enabled("r")
    assert policy.stats("r")["expected_speedup"] > 1.0


def test_policy_checks_and_ignores_empty_proposals():
    policy = SpeculationPolicy(min_steps=1)
    policy.record("r", 0, 0, 0.5, 0.01)  # prompt lookup found nothing: no evidence
    assert policy.enabled("r") and policy.stats("r")["proposed"] == 0
    with pytest.raises(InputError, match="accepted 3 of 2"):
        policy.record("r", 2, 3, 0.01, 0.01)
    with pytest.raises(InputError, match="max_k"):
        SpeculationPolicy(k=4, max_k=2)
    policy.release("r")
    assert policy.stats("r")["proposed"] == 0  # a fresh state
