"""Speculative decoding over tiny compiled models: DraftModel proposals, greedy speculation
through verify = plain greedy decoding of the target, the target as its own draft accepts
everything, and a chi-square test over a real compiled target and draft.

The target is driven by hand, as the engine does: its cache holds the context before the
last token; a step runs ``[last, d_1..d_k]`` with logits at all k+1 rows (``last_rows``
replaced in the step's metadata), verify picks the tokens, ``KVCache.truncate`` drops the
rejected drafts.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

import pytest
import torch
from hf_builders import tiny_hf_model
from spec_toys import chi_square
from test_speculative import always_accept

import transfuse
from transfuse.runtime.generation_model import make_cache
from transfuse.runtime.sampling import SamplingParams, process_logits, seen_tokens
from transfuse.serving.draft import DraftModel
from transfuse.serving.speculative import DraftRequest, PromptLookup, Proposal, verify

pytestmark = pytest.mark.slow

GEN = {"max_seq_len": 256, "max_batch": 8, "kv": "paged", "block_size": 16}
VOCAB = 64


def compile_llama(layers: int, hidden: int, vocab: int = VOCAB, head_scale: float = 1.0):
    model = tiny_hf_model("llama", "sdpa", layers=layers, hidden=hidden, vocab=vocab,
                          positions=256)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)  # sharper next-token distributions
    return transfuse.optimize(model, (torch.tensor([[1, 2, 3]]),), generation=GEN)


@pytest.fixture(scope="module")
def target():
    return compile_llama(layers=2, hidden=32)


@pytest.fixture(scope="module")
def draft():
    return compile_llama(layers=1, hidden=32)


class Target:
    """One request decoded by the target with speculation (module docstring)."""

    def __init__(self, gen):
        self.cache = make_cache(gen.cache_spec)
        self.step = gen.step_for(self.cache)

    def run(self, tokens: list[int], all_rows: bool) -> torch.Tensor:
        meta = self.cache.prepare_step([("r", len(tokens))])
        if all_rows:
            meta = dataclasses.replace(meta, last_rows=torch.arange(len(tokens)))
        logits = self.step(torch.tensor([tokens]), meta)
        self.cache.commit_step()
        return logits

    def generate(self, proposer, prompt: list[int], steps: int, params: SamplingParams,
                 k: int = 4, generator=None):
        """``steps`` new tokens; returns them and (proposed, accepted) draft counts."""
        self.cache.add("r", len(prompt))
        first = process_logits(self.run(prompt, False), seen_tokens(torch.tensor([prompt]),
                               VOCAB), params, 0)
        ctx, out, proposed, accepted = list(prompt), [], 0, 0
        if params.do_sample:
            out.append(int(torch.multinomial(first.softmax(-1)[0], 1, generator=generator)))
        else:
            out.append(int(first[0].argmax()))
        ctx.append(out[-1])
        while len(out) < steps:
            req = DraftRequest("r", list(ctx), params, generator, len(out),
                               min(k, steps - len(out) - 1))
            prop = proposer.propose_batch([req], k)[0] if req.k else Proposal()
            logits = self.run([ctx[-1]] + prop.tokens, True)
            new = verify(logits, prop, params, ctx, len(out), generator)
            keep = len(ctx) + len(new) - 1
            self.cache.truncate("r", keep)
            proposer.rollback("r", keep)
            assert self.cache.length("r") == keep
            proposed += len(prop)
            accepted += len(new) - 1
            ctx += new
            out += new
        proposer.release("r")
        self.cache.free("r")
        assert self.cache.memory_report()["blocks_free"] == self.cache.num_blocks
        return out[:steps], proposed, accepted


def plain_greedy(gen, prompt, steps, **kw):
    ids = gen.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                       eos_token_id=None, **kw)
    return ids[0, len(prompt):].tolist()


PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 27)), [3, 1, 4, 1, 5, 9, 2, 6] * 4 + [3]]


def test_draft_model_proposes_its_own_greedy_continuation(draft):
    dm = DraftModel(draft)
    contexts = [list(p) for p in PROMPTS]
    for _ in range(3):
        reqs = [DraftRequest(i, ctx, k=k) for i, (ctx, k) in enumerate(zip(contexts, (4, 3, 2)))]
        props = dm.propose_batch(reqs, 4)
        for i, (ctx, prop) in enumerate(zip(contexts, props)):
            assert prop.probs is None  # greedy: deterministic drafts
            assert prop.tokens == plain_greedy(draft, ctx, reqs[i].k)
            assert dm.cached_len(i) == len(ctx) + reqs[i].k - 1
        # the target accepted the first draft of request 0 (then emitted 11), none of 1
        # (emitted 12) and all of 2 (+ bonus 13); request 1 is told by rollback
        contexts[0] += props[0].tokens[:1] + [11]
        contexts[1] += [12]
        dm.rollback(1, len(contexts[1]) - 1)
        assert dm.cached_len(1) == len(contexts[1]) - 1
        contexts[2] += props[2].tokens + [13]
    assert dm.counters["steps"] == 3 * 4  # per call: catch-up + k - 1 decode steps
    dm.close()
    assert dm.cache.memory_report()["blocks_free"] == dm.cache.num_blocks


def test_draft_model_mixed_batch(draft):
    """Greedy, greedy with a repetition penalty and sampled requests in one call: each
    greedy proposal is the draft's own decoding with those options; the sampled one returns
    its q rows and its drafts are ids with q > 0."""
    dm = DraftModel(draft)
    g = torch.Generator().manual_seed(0)
    sampled = SamplingParams(do_sample=True, top_k=5)
    looping = PROMPTS[0] + plain_greedy(draft, PROMPTS[0], 12)  # its likely tokens are seen
    reqs = [DraftRequest("plain", PROMPTS[0]),
            DraftRequest("pen", looping, SamplingParams(repetition_penalty=3.0)),
            DraftRequest("s", PROMPTS[1], sampled, g)]
    plain, pen, samp = dm.propose_batch(reqs, 4)
    assert plain.tokens == plain_greedy(draft, PROMPTS[0], 4)
    assert pen.tokens == plain_greedy(draft, looping, 4, repetition_penalty=3.0)
    assert pen.tokens != plain_greedy(draft, looping, 4)  # the penalty mattered
    assert samp.probs.shape == (4, VOCAB)
    assert all(int((row > 0).sum()) == 5 for row in samp.probs)  # top-k 5 applied
    assert all(float(samp.probs[i, t]) > 0 for i, t in enumerate(samp.tokens))
    dm.close()


def test_draft_model_refuses_what_does_not_fit(draft):
    dm = DraftModel(draft, max_batch=1)
    props = dm.propose_batch([DraftRequest("a", [1, 2, 3]), DraftRequest("b", [4, 5])], 2)
    assert len(props[0]) == 2 and len(props[1]) == 0 and dm.counters["no_room"] == 1
    assert len(dm.propose_batch([DraftRequest("c", list(range(256)))], 3)[0]) == 0
    assert len(dm.propose_batch([DraftRequest("a", [1, 2, 3] + [1] * 252)], 3)[0]) == 2
    dm.close()
    # a target with a smaller vocabulary: drafts and q over its 10 ids only
    narrow = DraftModel(draft, vocab_size=10)
    sampled = SamplingParams(do_sample=True, top_k=0)
    greedy, samp = narrow.propose_batch([DraftRequest("g", [1, 2, 3]), DraftRequest(
        "s", [4, 5], sampled, torch.Generator().manual_seed(0))], 6)
    assert max(greedy.tokens + samp.tokens) < 10 and samp.probs.shape == (6, 10)
    narrow.close()
    with pytest.raises(transfuse.errors.InputError, match="appears twice"):
        dm.propose_batch([DraftRequest("a", [1]), DraftRequest("a", [1])], 2)


class FlakyDraft:
    """A draft GenerationModel whose step fails at its ``fail_at``-th call."""

    def __init__(self, gen, fail_at: int):
        self.gen, self.fail_at, self.calls = gen, fail_at, 0
        self.cache_spec, self.device, self.vocab_size = gen.cache_spec, gen.device, gen.vocab_size

    def step_for(self, cache):
        step = self.gen.step_for(cache)

        def flaky(ids, meta):
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("draft step broke")
            return step(ids, meta)

        return flaky


def test_draft_model_forgets_requests_when_a_step_fails(draft):
    dm = DraftModel(FlakyDraft(draft, fail_at=3))  # catch-up, decode, then the failure
    reqs = [DraftRequest("a", PROMPTS[0]), DraftRequest("b", PROMPTS[1])]
    with pytest.raises(RuntimeError, match="broke"):
        dm.propose_batch(reqs, 4)
    assert dm.cached_len("a") == dm.cached_len("b") == 0 and len(dm.cache) == 0
    props = dm.propose_batch(reqs, 4)  # recomputed from scratch, right
    assert [p.tokens for p in props] == [plain_greedy(draft, p, 4) for p in PROMPTS[:2]]
    dm.close()


def test_target_as_draft_accepts_everything_greedy(target):
    prompt = PROMPTS[1]
    out, proposed, accepted = Target(target).generate(DraftModel(target), prompt, 24,
                                                      SamplingParams())
    assert proposed > 0 and accepted == proposed  # acceptance 1.0
    assert out == plain_greedy(target, prompt, 24)


def test_target_as_draft_accepts_everything_sampled(target):
    params = SamplingParams(do_sample=True, top_k=0, temperature=0.7)
    g = torch.Generator().manual_seed(0)
    dm = DraftModel(target)
    props = dm.propose_batch([DraftRequest("x", PROMPTS[0], params, g)], 3)
    assert props[0].probs.shape == (3, VOCAB)
    torch.testing.assert_close(props[0].probs.sum(-1), torch.ones(3))
    dm.close()
    _, proposed, accepted = Target(target).generate(dm, PROMPTS[0], 24, params, generator=g)
    assert proposed > 0 and accepted >= 0.99 * proposed


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_speculative_greedy_equals_plain_greedy(target, draft, penalty):
    params = SamplingParams(repetition_penalty=penalty)
    for prompt in PROMPTS:
        want = plain_greedy(target, prompt, 40, repetition_penalty=penalty)
        for proposer in (PromptLookup(), DraftModel(draft)):
            out, proposed, accepted = Target(target).generate(proposer, prompt, 40, params)
            assert out == want, (type(proposer).__name__, prompt)
            assert proposed > 0


# -- the output distribution over a real compiled target and draft ---------------------------


def test_speculative_sampling_matches_plain_sampling_on_compiled_models():
    """Vocabulary 12, two new tokens after a fixed prompt: the target's and the draft's logits
    after every prefix come from the compiled models (sharpened heads), the exact
    distribution of plain sampling is enumerated, speculative sampling (k=1) must match it
    and always-accept must not."""
    vocab, prompt, steps = 12, [3, 7, 1], 2
    tgt = compile_llama(layers=2, hidden=32, vocab=vocab, head_scale=25.0)
    drf = compile_llama(layers=1, hidden=32, vocab=vocab, head_scale=25.0)
    prefixes = [tuple(prompt) + s for n in range(3) for s in itertools.product(range(vocab),
                                                                               repeat=n)]
    table_t, table_d = logits_table(tgt, prefixes), logits_table(drf, prefixes)
    params = SamplingParams(do_sample=True, top_k=0, repetition_penalty=1.2)

    def probs(table, ctx, i):
        scores = process_logits(table[tuple(ctx)][None],
                                seen_tokens(torch.tensor([ctx]), vocab), params, i)
        return scores.softmax(-1)[0]

    exact = {}
    for seq in itertools.product(range(vocab), repeat=steps):
        p1 = probs(table_t, prompt, 0)[seq[0]]
        exact[seq] = float(p1 * probs(table_t, prompt + [seq[0]], 1)[seq[1]])

    def run(rule, samples=3000):
        g, counts, acc = torch.Generator().manual_seed(0), collections.Counter(), []
        for _ in range(samples):
            ctx, out = list(prompt), []
            while len(out) < steps:
                d, qs = [], []
                for i in range(1):
                    q = probs(table_d, ctx + d, len(out) + i)
                    d.append(int(torch.multinomial(q, 1, generator=g)))
                    qs.append(q)
                rows = torch.stack([table_t[tuple(ctx + d[:i])] for i in range(2)])
                new = rule(rows, Proposal(d, torch.stack(qs)), params, ctx, len(out), g)
                acc.append(len(new) - 1)
                ctx += new
                out += new
            counts[tuple(out[:steps])] += 1
        return counts, sum(acc) / len(acc)

    counts, acceptance = run(verify)
    assert chi_square(counts, exact)[2] > 1e-3
    assert 0.1 < acceptance < 0.9  # the draft differs from the target
    assert chi_square(run(always_accept)[0], exact)[2] < 1e-6


def logits_table(gen, prefixes):
    """{prefix: logits [V] after it} from the compiled step, 8 prefixes per step."""
    cache = make_cache(gen.cache_spec)
    step = gen.step_for(cache)
    table = {}
    for at in range(0, len(prefixes), 8):
        chunk = prefixes[at:at + 8]
        for i, p in enumerate(chunk):
            cache.add(i, len(p))
        meta = cache.prepare_step([(i, len(p)) for i, p in enumerate(chunk)])
        logits = step(torch.tensor([[t for p in chunk for t in p]]), meta)
        cache.commit_step()
        for i, p in enumerate(chunk):
            table[p] = logits[i]
            cache.free(i)
    return table
