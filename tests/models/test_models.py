"""Reference models: seeded init, shapes, masks, GQA, export, presets, and parity with HF."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim, export

import transfuse.models as models
from transfuse.models import BERT_PRESETS, GPT2, GPT2_PRESETS, LLAMA_PRESETS, Bert, Llama
from transfuse.models.llama import repeat_kv

TINY = ["gpt2-tiny", "llama-tiny", "bert-tiny"]
FACTORIES = {"gpt2": models.gpt2, "llama": models.llama, "bert": models.bert}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- seeded init --


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_same_seed_gives_identical_weights_whatever_the_global_rng(family):
    torch.manual_seed(1)
    a = _state(FACTORIES[family]("tiny", seed=3))
    torch.manual_seed(2)
    torch.rand(100)
    b = _state(FACTORIES[family]("tiny", seed=3))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_different_seeds_give_different_weights(family):
    a = FACTORIES[family]("tiny", seed=0).state_dict()
    b = FACTORIES[family]("tiny", seed=1).state_dict()
    matrices = [k for k, v in a.items() if v.dim() >= 2]
    assert matrices and all(not torch.equal(a[k], b[k]) for k in matrices)


def test_building_a_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    models.llama("tiny", seed=0)
    assert torch.equal(before, torch.get_rng_state())


# -- shapes and presets --


@pytest.mark.parametrize("name", TINY)
def test_get_model_output_shapes(name):
    model, inputs, dynamic = models.get_model(name, batch=2, seq=10)
    assert not model.training
    assert [tuple(x.shape) for x in inputs] == [(2, 10)] * len(inputs)
    assert dynamic == {"seq": (1, model.config.max_positions)}
    with torch.no_grad():
        out = model(*inputs)
    last = model.config.dim if name.startswith("bert") else model.config.vocab_size
    assert out.shape == (2, 10, last) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_get_model_example_inputs_are_deterministic():
    _, a, _ = models.get_model("gpt2-tiny", seed=5)
    _, b, _ = models.get_model("gpt2-tiny", seed=5)
    assert torch.equal(a[0], b[0])


def test_model_names_cover_every_preset():
    assert set(models.MODEL_NAMES) >= {"gpt2-tiny", "gpt2-small", "llama-tiny", "llama-small"}
    assert {"bert-tiny", "bert-small", "bert-base"} <= set(models.MODEL_NAMES)
    assert BERT_PRESETS["small"] == BERT_PRESETS["base"]


def test_gpt2_lm_head_is_tied_to_token_embedding():
    model = models.gpt2("tiny")
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize(
    ("cls", "presets", "low", "high"),
    [
        (GPT2, GPT2_PRESETS, 124_439_808, 124_439_808),  # HF GPT-2
        (Llama, LLAMA_PRESETS, 100e6, 130e6),
        (Bert, BERT_PRESETS, 108_891_648, 108_891_648),  # HF BertModel minus pooler
    ],
)
def test_small_preset_parameter_count(cls, presets, low, high):
    with torch.device("meta"):
        model = cls(presets["small"])
    n = sum(p.numel() for p in model.parameters())
    print(f"{cls.__name__} small: {n:,} parameters")
    assert low <= n <= high


# -- masks --


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_a_later_token_does_not_change_earlier_logits(name):
    model, (ids,), _ = models.get_model(name, seq=12)
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_bert_padded_keys_do_not_change_unpadded_outputs():
    model, (ids, mask), _ = models.get_model("bert-tiny", batch=2, seq=16)
    keep = int(mask[0].sum())
    assert 0 < keep < 16
    noise = ids.clone()
    noise[:, keep:] = (ids[:, keep:] + 7) % model.config.vocab_size
    with torch.no_grad():
        padded = model(ids, mask)
        other_padding = model(noise, mask)
        unpadded = model(ids[:, :keep])
        no_mask = model(noise)
    torch.testing.assert_close(padded[:, :keep], other_padding[:, :keep])
    torch.testing.assert_close(padded[:, :keep], unpadded)
    assert not torch.allclose(padded[:, :keep], no_mask[:, :keep])


def test_dropout_acts_only_in_train_mode():
    model, inputs, _ = models.get_model("bert-tiny")
    with torch.no_grad():
        assert torch.equal(model(*inputs), model(*inputs))
        model.train()
        assert not torch.equal(model(*inputs), model(*inputs))


# -- GQA --


def test_llama_tiny_uses_fewer_kv_heads():
    model = models.llama("tiny")
    cfg = model.config
    D = cfg.dim // cfg.n_head
    assert cfg.n_kv_head < cfg.n_head
    attn = model.layers[0].attn
    assert attn.k_proj.out_features == attn.v_proj.out_features == cfg.n_kv_head * D
    assert attn.q_proj.out_features == cfg.n_head * D


def test_repeat_kv_gives_each_kv_head_to_a_group_of_query_heads():
    x = torch.randn(2, 3, 5, 4)  # (B, Hkv, T, D)
    y = repeat_kv(x, 2)  # (B, H, T, D)
    assert y.shape == (2, 6, 5, 4)
    for h in range(6):
        assert torch.equal(y[:, h], x[:, h // 2])


# -- export --


@pytest.mark.parametrize("name", TINY)
def test_export_with_dynamic_seq(name):
    model, inputs, dynamic = models.get_model(name)
    low, high = dynamic["seq"]
    seq = Dim("seq", min=low, max=high)
    program = export(model, inputs, dynamic_shapes=tuple({1: seq} for _ in inputs), strict=False)
    targets = {str(n.target) for n in program.graph.nodes}
    assert not any("scaled_dot_product" in t for t in targets)
    for length in (3, high):
        _, other, _ = models.get_model(name, seq=length)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(*other), model(*other))


# -- bad input --


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown llama preset 'huge'.*'small'.*'tiny'"):
        models.llama("huge")


def test_unknown_model_name_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'gpt3-tiny'.*gpt2-tiny"):
        models.get_model("gpt3-tiny")


def test_unknown_config_field_is_rejected():
    with pytest.raises(ValueError, match=r"unknown gpt2 config field\(s\) \['n_heads'\]"):
        models.gpt2("tiny", n_heads=3)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="n_kv_head"):
        models.llama("tiny", n_kv_head=3)
    with pytest.raises(ValueError, match="seq <= 256"):
        models.get_model("gpt2-tiny", seq=257)


def test_overrides_apply():
    model = models.gpt2("tiny", n_layer=1, dropout=0.0)
    assert len(model.h) == 1 and model.config.dropout == 0.0


# -- parity with Hugging Face transformers (pins GELU form, norms, RoPE layout) --


def _hf_gpt2(model):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=c.vocab_size,
            n_positions=c.max_positions,
            n_embd=c.dim,
            n_layer=c.n_layer,
            n_head=c.n_head,
            layer_norm_epsilon=c.norm_eps,
            bos_token_id=None,
            eos_token_id=None,
        )
    )
    sd = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight}
    sd |= {"transformer.ln_f." + k: v for k, v in model.ln_f.state_dict().items()}
    for i, block in enumerate(model.h):
        p, a = f"transformer.h.{i}.", block.attn
        qkv = (a.q_proj, a.k_proj, a.v_proj)
        sd[p + "attn.c_attn.weight"] = torch.cat([m.weight for m in qkv]).T  # Conv1D: (in, out)
        sd[p + "attn.c_attn.bias"] = torch.cat([m.bias for m in qkv])
        linears = {"attn.c_proj": a.o_proj, "mlp.c_fc": block.mlp.fc, "mlp.c_proj": block.mlp.proj}
        for theirs, ours in linears.items():
            sd[p + theirs + ".weight"], sd[p + theirs + ".bias"] = ours.weight.T, ours.bias
        for ln in ("ln_1", "ln_2"):
            sd |= {p + f"{ln}.{k}": v for k, v in getattr(block, ln).state_dict().items()}
    missing, unexpected = hf.eval().load_state_dict(sd, strict=False)
    assert not unexpected and missing == ["lm_head.weight"], (missing, unexpected)  # tied
    return lambda ids: hf(ids).logits


def _hf_llama(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.dim,
            intermediate_size=c.ffn_dim,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            num_key_value_heads=c.n_kv_head,
            max_position_embeddings=c.max_positions,
            rms_norm_eps=c.norm_eps,
            rope_theta=c.rope_theta,
        )
    )
    sd = {}
    for k, v in model.state_dict().items():
        k = k.replace(".attn.", ".self_attn.").replace("post_attn_norm", "post_attention_layernorm")
        k = k.replace("input_norm", "input_layernorm")
        if k.startswith("embed."):
            k = "model.embed_tokens." + k.removeprefix("embed.")
        elif k.startswith(("norm.", "layers.")):
            k = "model." + k
        sd[k] = v
    missing, unexpected = hf.eval().load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return lambda ids: hf(ids).logits


def _hf_bert(model):
    from transformers import BertConfig, BertModel

    c = model.config
    hf = BertModel(
        BertConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.dim,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            intermediate_size=c.ffn_dim,
            max_position_embeddings=c.max_positions,
            type_vocab_size=c.type_vocab_size,
            layer_norm_eps=c.norm_eps,
        ),
        add_pooling_layer=False,
    )
    sd = {f"embeddings.{k}": v for k, v in model.state_dict().items() if "_embeddings" in k}
    sd |= {f"embeddings.LayerNorm.{k}": v for k, v in model.embed_norm.state_dict().items()}
    names = {
        "attn.query": "attention.self.query",
        "attn.key": "attention.self.key",
        "attn.value": "attention.self.value",
        "attn.out": "attention.output.dense",
        "attn.norm": "attention.output.LayerNorm",
        "mlp.fc": "intermediate.dense",
        "mlp.proj": "output.dense",
        "mlp.norm": "output.LayerNorm",
    }
    for i, layer in enumerate(model.layers):
        for ours, theirs in names.items():
            sub = layer.get_submodule(ours)
            sd |= {f"encoder.layer.{i}.{theirs}.{k}": v for k, v in sub.state_dict().items()}
    missing, unexpected = hf.eval().load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return lambda ids, mask: hf(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize(
    ("name", "to_hf"), [("gpt2-tiny", _hf_gpt2), ("llama-tiny", _hf_llama), ("bert-tiny", _hf_bert)]
)
def test_matches_hugging_face(name, to_hf):
    model, inputs, _ = models.get_model(name, batch=2, seq=12)
    hf = to_hf(model)  # a closure over an HF model in eval mode with our weights
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), hf(*inputs), rtol=1e-4, atol=1e-4)
