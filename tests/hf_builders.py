"""Small Hugging Face models built from configs (random weights), shared by the tests."""

from __future__ import annotations

import pytest
import torch


def tiny_hf_model(family: str, attn: str, *, layers: int, hidden: int, vocab: int,
                  positions: int):
    """gpt2 / llama / mistral (sliding window 8) / qwen2 (GQA: 2 kv heads of 4) / bert / xglm
    (its eager attention clamps the masked scores between two views), and the
    position-bias families: bloom and mpt (ALiBi; eager only in transformers), t5 (the encoder
    alone), t5-seq2seq (encoder-decoder with cross attention), falcon (one K/V head)."""
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
    elif family == "xglm":  # eager attention clamps the masked scores at finfo.min
        config = transformers.XGLMConfig(num_layers=layers, d_model=hidden, attention_heads=4,
                                         ffn_dim=2 * hidden, vocab_size=vocab,
                                         max_position_embeddings=positions, pad_token_id=0,
                                         use_cache=False)
        cls = transformers.XGLMForCausalLM
    elif family in POSITION_BIAS_FAMILIES:
        config, cls = _position_bias_config(transformers, family, layers, hidden, vocab,
                                            positions)
    else:
        name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
        extra = {"sliding_window": 8} if family == "mistral" else {}
        config = getattr(transformers, f"{name}Config")(num_key_value_heads=2, **extra, **common)
        cls = getattr(transformers, f"{name}ForCausalLM")
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation=attn).eval()


#: families whose attention adds a position bias (ALiBi, T5's buckets) or shares one K/V head
POSITION_BIAS_FAMILIES = ("bloom", "mpt", "t5", "t5-seq2seq", "falcon")


def _position_bias_config(transformers, family: str, layers: int, hidden: int, vocab: int,
                          positions: int):
    if family == "bloom":
        return (transformers.BloomConfig(n_layer=layers, hidden_size=hidden, n_head=4,
                                         vocab_size=vocab, use_cache=False),
                transformers.BloomForCausalLM)
    if family == "mpt":  # ALiBi table built for max_seq_len, sliced to the last T keys
        return (transformers.MptConfig(n_layers=layers, d_model=hidden, n_heads=4,
                                       vocab_size=vocab, max_seq_len=positions, use_cache=False),
                transformers.MptForCausalLM)
    if family == "falcon":
        return (transformers.FalconConfig(num_hidden_layers=layers, hidden_size=hidden,
                                          num_attention_heads=4, vocab_size=vocab,
                                          max_position_embeddings=positions, use_cache=False),
                transformers.FalconForCausalLM)
    config = transformers.T5Config(num_layers=layers, num_decoder_layers=layers, d_model=hidden,
                                   d_kv=hidden // 4, d_ff=2 * hidden, num_heads=4,
                                   vocab_size=vocab, decoder_start_token_id=0, use_cache=False)
    cls = transformers.T5EncoderModel if family == "t5" else \
        transformers.T5ForConditionalGeneration
    return config, cls
