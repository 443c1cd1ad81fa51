"""A tiny random Llama written as a GGUF file (with a byte-level BPE tokenizer in its metadata),
so the GGUF route of ``transfuse serve`` is tested without downloading a model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

#: the model's shape: E embedding, L layers, H heads, KV K/V heads, F feed-forward width
E, L, H, KV, F = 64, 2, 4, 2, 128
EOS = "<|endoftext|>"


def write_tiny_gguf(path: Path, context: int = 128, seed: int = 0) -> Path:
    """Write a llama-architecture GGUF at ``path``: f32 random weights, a BPE tokenizer trained
    here (tokens, merges, EOS), as llama.cpp's converters lay them out."""
    gguf = pytest.importorskip("gguf")
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, the quick brown fox jumps"] * 10, vocab_size=300,
                            min_frequency=1, special_tokens=[EOS], show_progress=False)
    model = json.loads(bpe.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    V, D = len(tokens), E // H
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L)
    w.add_context_length(context)
    w.add_embedding_length(E)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(D)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == EOS else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges(merges)
    w.add_eos_token_id(model["vocab"][EOS])
    w.add_add_bos_token(False)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(V, E))
    for i in range(L):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(E, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(E, E))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(KV * D, E))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(KV * D, E))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(E, E))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(E, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(F, E))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(F, E))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(E, F))
    w.add_tensor("output_norm.weight", np.ones(E, np.float32))
    w.add_tensor("output.weight", rand(V, E))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
