"""Hugging Face models (small configs) through the torch frontend: capture once with a
dynamic seq, interpret at two lengths and compare with eager, for eager and SDPA attention."""

from __future__ import annotations

import pytest
import torch

from transfuse.frontend.torch_export import capture
from transfuse.ir.interpret import interpret
from transfuse.ir.verify import verify

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.hf]
VOCAB = 100


# the fields Llama and BERT configs share (GPT-2 names them differently)
COMMON = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
}


def _build(family: str, attn: str):
    if family == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        cls = transformers.GPT2LMHeadModel
    elif family == "llama":  # GQA: 2 kv heads for 4 query heads
        config = transformers.LlamaConfig(num_key_value_heads=2, **COMMON)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.BertConfig(**COMMON)
        cls = transformers.BertModel
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation=attn).eval()


def _inputs(seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.int64)
    mask[1, seq - seq // 4 :] = 0  # right padding on the second row
    return ids, mask


def _kwargs(family: str, mask):
    kw = {"attention_mask": mask, "return_dict": True}
    if family != "bert":
        kw["use_cache"] = False
    return kw


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_hf_model_matches_eager_at_two_lengths(family, attn):
    model = _build(family, attn)
    ids, mask = _inputs(16, 0)
    captured = capture(model, (ids,), _kwargs(family, mask), dynamic={"seq": (1, 128)})
    graph = captured.graph
    verify(graph)
    print(f"{family}/{attn}: {len(graph)} nodes, fallbacks {graph.meta['fallbacks']}")
    assert sum(graph.meta["fallbacks"].values()) <= 2, graph.meta["fallbacks"]
    if attn == "sdpa":
        assert len(graph.find("attention")) == 2
    for seq in (16, 7):
        ids, mask = _inputs(seq, seq)
        kwargs = _kwargs(family, mask)
        flat = captured.signature.flatten_inputs((ids,), kwargs)
        got = captured.signature.build_outputs(interpret(graph, flat))
        with torch.no_grad():
            want = model(ids, **kwargs)
        assert type(got) is type(want)
        assert list(got.keys()) == list(want.keys())
        for key in want.keys():
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def test_hf_llama_without_mask_dynamic_batch_and_seq():
    model = _build("llama", "sdpa")
    ids = torch.randint(0, VOCAB, (2, 16))
    kwargs = {"use_cache": False, "return_dict": True}
    captured = capture(model, (ids,), kwargs, dynamic={"batch": (1, 4), "seq": (1, 128)})
    assert str(captured.graph.inputs[0].type) == "i64[batch, seq]"
    for batch, seq in ((1, 5), (3, 1)):
        x = torch.randint(0, VOCAB, (batch, seq))
        got = captured.signature.build_outputs(
            interpret(captured.graph, captured.signature.flatten_inputs((x,), kwargs))
        )
        with torch.no_grad():
            torch.testing.assert_close(got.logits, model(x, **kwargs).logits, rtol=1e-4, atol=1e-5)


def test_hf_gptj_rotary_tables_run_on_the_onnxruntime_target():
    """GPT-J builds its rotary sin/cos tables with repeat_interleave: converted (no fallback
    for it), so the ONNX Runtime target takes the model; attention fuses, equal to eager."""
    import transfuse

    config = transformers.GPTJConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8,
                                     vocab_size=VOCAB, n_positions=64, use_cache=False,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPTJForCausalLM._from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    dynamic = {"batch": (1, 4), "seq": (1, 32)}
    captured = capture(model, (ids,), dynamic=dynamic)
    assert not any("repeat_interleave" in t for t in captured.graph.meta["fallbacks"])
    compiled = transfuse.optimize(model, (ids,), dynamic=dynamic, target="onnxruntime")
    assert compiled.graph.op_histogram().get("attention") == 2
    for b, s in ((2, 9), (3, 13)):
        x = torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(s))
        out = compiled(x)
        got = out["logits"] if isinstance(out, dict) else getattr(out, "logits", out)
        torch.testing.assert_close(got, model(x).logits, atol=1e-4, rtol=1e-4)
