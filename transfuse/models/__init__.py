"""Readable reference Transformers with named presets and seeded weights.

    model = transfuse.models.gpt2("tiny", seed=0)            # an nn.Module in eval mode
    model, inputs, dynamic = transfuse.models.get_model("llama-small", seq=32)

Each family lives in its own file (gpt2.py, llama.py, bert.py) as plain PyTorch
with explicit attention math, so the compiler's passes have something real to
recognise. The same seed gives bit-identical weights whatever the global RNG
state, and building a model leaves the global RNG untouched.

GPT-2 and Llama are causal LMs that generation can compile
(``transfuse.optimize(model, (ids,), generation=...)``): they expose their LM head
(``get_output_embeddings()``), take ``position_ids`` / ``attention_mask`` / ``use_cache``
like Hugging Face's, and carry ``generation_config`` (GenerationDefaults: no EOS token).

The factory functions gpt2/llama/bert share their names with the submodules, so
`transfuse.models.gpt2` is the function; reach a file's contents with
`from transfuse.models.gpt2 import GPT2Config` (or the re-exports below).
"""

from __future__ import annotations

import torch
from torch import nn

from transfuse.models._common import GenerationDefaults, build, config_from_preset
from transfuse.models.bert import PRESETS as BERT_PRESETS
from transfuse.models.bert import Bert, BertConfig
from transfuse.models.gpt2 import GPT2, GPT2Config
from transfuse.models.gpt2 import PRESETS as GPT2_PRESETS
from transfuse.models.llama import PRESETS as LLAMA_PRESETS
from transfuse.models.llama import Llama, LlamaConfig

_FAMILIES: dict[str, tuple[type[nn.Module], dict]] = {
    "gpt2": (GPT2, GPT2_PRESETS),
    "llama": (Llama, LLAMA_PRESETS),
    "bert": (Bert, BERT_PRESETS),
}

MODEL_NAMES: tuple[str, ...] = tuple(
    f"{family}-{preset}" for family, (_, presets) in _FAMILIES.items() for preset in presets
)


def _config(family: str, preset: str, overrides: dict):
    return config_from_preset(family, _FAMILIES[family][1], preset, **overrides)


def gpt2(preset: str = "tiny", seed: int = 0, **overrides) -> GPT2:
    """GPT-2 from a preset ("tiny", "small" = 124M); `overrides` replace config fields."""
    return build(GPT2, _config("gpt2", preset, overrides), seed)


def llama(preset: str = "tiny", seed: int = 0, **overrides) -> Llama:
    """Llama from a preset ("tiny", "small" ~ 125M); `overrides` replace config fields."""
    return build(Llama, _config("llama", preset, overrides), seed)


def bert(preset: str = "tiny", seed: int = 0, **overrides) -> Bert:
    """BERT from a preset ("tiny", "small" = "base" = 110M); `overrides` replace config fields."""
    return build(Bert, _config("bert", preset, overrides), seed)


def get_model(
    name: str, *, seed: int = 0, batch: int = 1, seq: int = 16, **overrides
) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, tuple[int, int]]]:
    """Build the model called `name` ("gpt2-small", "llama-tiny", "bert-base", ...).

    Returns (model, example_inputs, dynamic_spec):
    - example_inputs: input_ids (batch, seq) drawn from a generator seeded with
      `seed`; BERT also gets an attention_mask (batch, seq) whose last quarter of
      positions is padding (0), so the padding path is exercised.
    - dynamic_spec: {"seq": (1, max_positions)}; "seq" is dim 1 of every input.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}")
    family, _, preset = name.rpartition("-")
    config = _config(family, preset, overrides)
    if batch < 1 or not 1 <= seq <= config.max_positions:
        raise ValueError(
            f"need batch >= 1 and 1 <= seq <= {config.max_positions}, got {batch=} {seq=}"
        )
    model = build(_FAMILIES[family][0], config, seed)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    inputs: tuple[torch.Tensor, ...] = (input_ids,)
    if family == "bert":
        attention_mask = torch.ones(batch, seq, dtype=torch.int64)
        attention_mask[:, seq - seq // 4 :] = 0
        inputs = (input_ids, attention_mask)
    return model, inputs, {"seq": (1, config.max_positions)}


__all__ = [
    "BERT_PRESETS",
    "GPT2_PRESETS",
    "LLAMA_PRESETS",
    "MODEL_NAMES",
    "Bert",
    "BertConfig",
    "GPT2",
    "GPT2Config",
    "GenerationDefaults",
    "Llama",
    "LlamaConfig",
    "bert",
    "get_model",
    "gpt2",
    "llama",
]
