"""What is benchmarked: a model and its inputs at one case (batch, sequence length).

Three sources, one shape of result (:class:`Workload`):

- a built-in reference model (``gpt2-small``, ``llama-tiny``, ... from
  :func:`transfuse.models.get_model`);
- a Hugging Face model built from a config JSON with random weights
  (``hf:gpt2``, ``hf:llama``, ``hf:bert``, ``hf:mistral``, ``hf:qwen2``; any other
  ``hf:<model_type>`` goes through ``AutoConfig``/``AutoModel*``);
- an ONNX file (``model.onnx``): inputs are synthesised from its declared inputs.

A :class:`Case` is what contestants build for: the shape point plus the device,
dtype and thread count, the model's facts (:class:`ModelInfo`) and a scratch
space shared by the contestants of that case (one ONNX export serves both ORT
contestants).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

#: hf:<name> -> (config class, model class) in transformers
HF_CLASSES: dict[str, tuple[str, str]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "bert": ("BertConfig", "BertModel"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}
#: model types that are encoders (get an attention mask with padding, use AutoModel)
ENCODERS = ("bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Facts about a model that contestants need (ORT's optimizer wants heads and width)."""

    name: str
    kind: str  # "torch" or "onnx"
    family: str | None = None  # gpt2 / llama / bert / mistral / qwen2 / ...
    num_heads: int = 0  # 0: unknown (ORT's optimizer then detects it)
    hidden_size: int = 0
    max_seq: int | None = None
    attn_implementation: str | None = None  # Hugging Face models only


@dataclasses.dataclass
class Inputs:
    """Positional and keyword inputs of one call; ``named()`` pairs them with parameter names."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    names: tuple[str, ...] = ()  # one per tensor in args then kwargs

    def named(self) -> dict[str, Any]:
        values = list(self.args) + list(self.kwargs.values())
        return dict(zip(self.names, values))


@dataclasses.dataclass
class Case:
    """One benchmark point and everything a contestant's ``build`` may need."""

    model: str
    batch: int
    seq: int
    mode: str = "prefill"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    threads: int = 1
    info: ModelInfo | None = None
    dynamic: dict[str, Any] | None = None  # transfuse's dynamic spec, e.g. {"seq": (1, 1024)}
    workdir: Path | None = None  # a temp dir that lives as long as the case
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        name = Path(self.model).name if self.model.endswith(".onnx") else self.model
        return f"{name} b{self.batch} s{self.seq}"


@dataclasses.dataclass
class Workload:
    model: nn.Module | Path
    inputs: Inputs
    info: ModelInfo
    dynamic: dict[str, Any] | None = None


# -- built-in and Hugging Face models ----------------------------------------------------------


def _bind_names(model: nn.Module, args: tuple, kwargs: dict) -> tuple[str, ...]:
    params = list(inspect.signature(model.forward).parameters)
    return tuple(params[: len(args)]) + tuple(kwargs)


def _to_device(model: nn.Module, inputs: Inputs, device: str, dtype: torch.dtype) -> None:
    model.to(device=device, dtype=dtype)
    inputs.args = tuple(t.to(device) for t in inputs.args)
    inputs.kwargs = {k: t.to(device) for k, t in inputs.kwargs.items()}


def _builtin(name: str, batch: int, seq: int) -> Workload:
    from transfuse.models import get_model

    model, args, dynamic = get_model(name, seq=seq, batch=batch)
    cfg = model.config
    info = ModelInfo(name=name, kind="torch", family=name.rpartition("-")[0],
                     num_heads=cfg.n_head, hidden_size=cfg.dim, max_seq=cfg.max_positions)
    return Workload(model, Inputs(args, {}, _bind_names(model, args, {})), info, dynamic)


def load_hf_config(family: str, config: dict[str, Any], attn: str | None):
    """A transformers config for ``hf:<family>`` from a dict (a config JSON's contents)."""
    try:
        import transformers
    except ImportError as e:
        raise ValueError("hf: models need transformers (pip install 'transfuse[hf]')") from e
    fields = {k: v for k, v in config.items()
              if k not in ("model_type", "architectures", "transformers_version")}
    fields["use_cache"] = False  # prefill: logits only, no KV cache outputs
    if attn is not None:
        fields["attn_implementation"] = attn
    if family in HF_CLASSES:
        return getattr(transformers, HF_CLASSES[family][0])(**fields)
    try:
        return transformers.AutoConfig.for_model(family, **fields)
    except ValueError as e:
        raise ValueError(f"unknown Hugging Face model type {family!r}: {e}") from None


def _hf(name: str, batch: int, seq: int, config_path: str | None, attn: str | None,
        seed: int = 0) -> Workload:
    import transformers

    family = name.removeprefix("hf:")
    if not config_path:
        raise ValueError(f"{name} needs --config CONFIG.json (a transformers config)")
    config = load_hf_config(family, json.loads(Path(config_path).read_text()), attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family in HF_CLASSES:
            model = getattr(transformers, HF_CLASSES[family][1])(config)
        elif family in ENCODERS:
            model = transformers.AutoModel.from_config(config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval()
    max_seq = getattr(config, "max_position_embeddings", None)
    if max_seq is not None and not 1 <= seq <= max_seq:
        raise ValueError(f"{name}: need 1 <= seq <= {max_seq}, got {seq}")
    g = torch.Generator().manual_seed(seed)
    kwargs = {"input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=g)}
    if family in ENCODERS:  # the padding path, as in the built-in BERT
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[:, seq - seq // 4:] = 0
        kwargs["attention_mask"] = mask
    info = ModelInfo(name=name, kind="torch", family=family,
                     num_heads=getattr(config, "num_attention_heads", 0) or 0,
                     hidden_size=getattr(config, "hidden_size", 0) or 0, max_seq=max_seq,
                     attn_implementation=model.config._attn_implementation)
    dynamic = {"seq": (min(2, seq), max_seq or 4096)}
    return Workload(model, Inputs((), kwargs, tuple(kwargs)), info, dynamic)


# -- ONNX files ----------------------------------------------------------------------------


def _onnx_feed(name: str, elem_type: int, dims: list, batch: int, seq: int,
               rng: np.random.Generator) -> np.ndarray:
    import onnx

    shape = []
    for i, d in enumerate(dims):
        if isinstance(d, int) and d > 0:
            shape.append(d)
        elif isinstance(d, str) and "batch" in d.lower():
            shape.append(batch)
        elif i == 0 and not (isinstance(d, str) and "seq" in d.lower()):
            shape.append(batch)
        else:
            shape.append(seq)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    lname = name.lower()
    if np.issubdtype(dtype, np.integer):
        if "mask" in lname:
            return np.ones(shape, dtype)
        if "position" in lname:
            return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        if "type" in lname:
            return np.zeros(shape, dtype)
        return rng.integers(0, 100, size=shape).astype(dtype)  # token ids below any vocab
    if dtype == np.bool_:
        return np.ones(shape, dtype)
    return rng.standard_normal(shape).astype(dtype)


def _onnx_file(path: str, batch: int, seq: int, family: str | None) -> Workload:
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no such ONNX file: {path}")
    proto = onnx.load(str(p), load_external_data=False)
    initializers = {i.name for i in proto.graph.initializer}
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for vi in proto.graph.input:
        if vi.name in initializers:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in t.shape.dim]
        feeds[vi.name] = _onnx_feed(vi.name, t.elem_type, dims, batch, seq, rng)
    if family is None:
        stem = p.stem.lower()
        family = next((f for f in ("gpt2", "llama", "mistral", "qwen2", "bert") if f in stem),
                      None)
    info = ModelInfo(name=p.name, kind="onnx", family=family)
    return Workload(p, Inputs((), feeds, tuple(feeds)), info, None)


def load_workload(name: str, batch: int, seq: int, *, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, config: str | None = None,
                  attn: str | None = None, family: str | None = None) -> Workload:
    """Build the model ``name`` and its inputs for (``batch``, ``seq``) on ``device``."""
    if name.endswith(".onnx"):
        return _onnx_file(name, batch, seq, family)
    if name.startswith("hf:"):
        if attn is None and torch.device(device).type == "cuda":
            attn = "sdpa"  # torch SDPA is the GPU peer
        w = _hf(name, batch, seq, config, attn)
    else:
        w = _builtin(name, batch, seq)
    _to_device(w.model, w.inputs, device, dtype)
    return w


def model_kind(name: str) -> str:
    return "onnx" if name.endswith(".onnx") else "torch"
