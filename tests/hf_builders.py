"""Small Hugging Face models built from configs (random weights), shared by the tests."""

from __future__ import annotations

import pytest
import torch


def tiny_hf_model(family: str, attn: str, *, layers: int, hidden: int, vocab: int,
                  positions: int):
    """gpt2 / llama / mistral (sliding window 8) / qwen2 (GQA: 2 kv heads of 4) / bert."""
    transformers = pytest.importorskip("transformers")
    common = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=4,
                  intermediate_size=2 * hidden, vocab_size=vocab,
                  max_position_embeddings=positions)
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=layers, n_embd=hidden, n_head=4,
                                         vocab_size=vocab, n_positions=positions,
                                         bos_token_id=0, eos_token_id=0)
        cls = transformers.GPT2LMHeadModel
    elif family == "bert":
        config, cls = transformers.BertConfig(**common), transformers.BertModel
    else:
        name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
        extra = {"sliding_window": 8} if family == "mistral" else {}
        config = getattr(transformers, f"{name}Config")(num_key_value_heads=2, **extra, **common)
        cls = getattr(transformers, f"{name}ForCausalLM")
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation=attn).eval()
