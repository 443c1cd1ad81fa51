"""End to end on Hugging Face models built from small configs (random weights):
GPT-2, Llama (GQA) and BERT, eager and SDPA attention, every level, one
compiled model serving three sequence lengths."""

from __future__ import annotations

import pytest
import torch

import transfuse

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

LEVELS = ("O0", "O1", "O2")
VOCAB = 500


def _build(family: str, attn: str):
    torch.manual_seed(0)
    common = dict(attn_implementation=attn)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                      n_positions=128, use_cache=False,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel._from_config(cfg, **common)
    elif family == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       vocab_size=VOCAB, max_position_embeddings=128,
                                       use_cache=False)
        model = transformers.LlamaForCausalLM._from_config(cfg, **common)
    else:
        cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, vocab_size=VOCAB,
                                      max_position_embeddings=128)
        model = transformers.BertModel._from_config(cfg, **common)
    return model.eval()


def _inputs(family: str, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, seq), generator=g)
    if family == "bert":
        mask = torch.ones_like(ids)
        mask[:, seq - seq // 4:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": ids}


def _main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_hf_model_matches_eager(family, attn):
    model = _build(family, attn)
    example = _inputs(family, 16, seed=0)
    for level in LEVELS:
        compiled = transfuse.optimize(model, (), example, dynamic={"seq": (2, 128)}, level=level)
        if level == "O2":  # every layer's attention fused, whatever the spelling
            assert len(compiled.graph.find("attention")) == 2, str(compiled.pass_log)
            assert not compiled.graph.find("softmax"), str(compiled.pass_log)
        with torch.inference_mode():
            for i, seq in enumerate((5, 16, 40)):
                kw = _inputs(family, seq, seed=10 + i)
                ref, out = model(**kw), compiled(**kw)
                assert type(out) is type(ref)
                torch.testing.assert_close(_main_output(out), _main_output(ref),
                                           rtol=1e-4, atol=1e-5)
