"""What ``transfuse serve MODEL`` loads: a compiled generation model, its tokenizer, a name.

    served = load_served("path/to/hf-dir", max_seq_len=1024, max_batch=16)
    served.gen, served.tokenizer, served.name, served.kind

``MODEL`` is one of (tried in this order):

- **a saved transfuse generation artifact**: a directory with ``manifest.json`` whose manifest
  has the ``generation`` field (``transfuse.load``). Its tokenizer is read from the
  ``tokenizer/`` folder beside the artifact's files, which :func:`save_served` writes (a
  Hugging Face tokenizer's ``save_pretrained`` files, or ``byte_tokenizer.json``). The cache
  geometry and backend are the artifact's: a different ``max_seq_len``/``max_batch``/
  ``target`` asked for is an InputError (re-save to change them).
- **a Hugging Face model directory** (``config.json`` + weights + tokenizer files):
  ``AutoModelForCausalLM`` and ``AutoTokenizer``, local files only, fp32, compiled with
  ``transfuse.optimize(..., generation=...)`` for the target.
- **a GGUF file** (``*.gguf``): transformers reads the weights (de-quantized to fp32) and the
  tokenizer from the file (``gguf_file=``; needs the ``gguf`` package), then compiled.
- **a built-in preset** (:func:`preset_names`: ``llama-tiny``, ``gpt2-tiny``, ``llama-small``,
  ``gpt2-small``): a reference model of :mod:`transfuse.models` with seeded random weights
  (the same every time) and :class:`ByteTokenizer` (UTF-8 bytes; the model's vocabulary is
  made 258 to match, EOS ``<|endoftext|>``). For tests and demos: its text is noise.

Compiled models use a paged KV cache (block size 16, one full-length row of blocks per
batch slot) of ``max_seq_len`` tokens (default: the model's position limit, at most
:data:`DEFAULT_MAX_SEQ_LEN`) for ``max_batch`` sequences.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from transfuse.errors import ArtifactError, InputError
from transfuse.serving.byte_tokenizer import FILE_NAME as BYTE_TOKENIZER_FILE
from transfuse.serving.byte_tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)

#: the tokenizer's folder inside a served artifact directory
TOKENIZER_DIR = "tokenizer"
#: max_seq_len when neither the caller nor a smaller model position limit says otherwise
DEFAULT_MAX_SEQ_LEN = 2048
#: the paged cache's block size
BLOCK_SIZE = 16


@dataclasses.dataclass
class ServedModel:
    """A model ready to serve: the compiled ``gen``, its ``tokenizer``, the ``name`` clients
    use in requests, ``kind`` (preset | hf | gguf | artifact) and where it came from."""

    gen: Any  # GenerationModel
    tokenizer: Any
    name: str
    kind: str
    source: str

    @property
    def max_seq_len(self) -> int:
        return int(self.gen.cache_spec["max_seq_len"])

    @property
    def max_batch(self) -> int:
        return int(self.gen.cache_spec["max_batch"])

    def eos_token_ids(self) -> list[int]:
        """The model's EOS ids (generation config), else the tokenizer's, else none."""
        eos = self.gen.generation_config.get("eos_token_id")
        if eos is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


# -- presets ----------------------------------------------------------------------------------

#: the causal families of transfuse.models whose presets serve as ``FAMILY-PRESET``
PRESET_FAMILIES = ("llama", "gpt2")


def preset_names() -> list[str]:
    """``llama-tiny``, ``llama-small``, ``gpt2-tiny``, ``gpt2-small``, ... (transfuse.models)."""
    from transfuse import models

    return [f"{family}-{preset}" for family in PRESET_FAMILIES
            for preset in getattr(models, f"{family.upper()}_PRESETS")]


def _build_preset(name: str, max_seq_len: int | None, seed: int = 0):
    """A reference model (transfuse.models) with seeded random weights, its vocabulary the
    ByteTokenizer's and its position limit ``max_seq_len`` (default: the preset's)."""
    from transfuse import models

    family, _, preset = name.rpartition("-")
    tokenizer = ByteTokenizer()
    overrides: dict[str, Any] = {"vocab_size": tokenizer.vocab_size}
    if max_seq_len is not None:
        overrides["max_positions"] = max_seq_len
    model = getattr(models, family)(preset, seed=seed, **overrides).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# -- loading ----------------------------------------------------------------------------------


def load_served(model: str | os.PathLike, *, target: str | None = None,
                max_seq_len: int | None = None, max_batch: int | None = None,
                device: str | None = None) -> ServedModel:
    """Load and compile ``model`` (module docstring) for serving. ``target`` None means the
    artifact's own backend, else ``"python"``; ``max_batch`` None means 16 (or the
    artifact's)."""
    spec = str(model)
    path = Path(spec)
    for name, value in (("max_seq_len", max_seq_len), ("max_batch", max_batch)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if path.is_dir() and (path / "manifest.json").is_file():
        return _load_artifact(path, target, max_seq_len, max_batch, device)
    if path.is_dir() and (path / "config.json").is_file():
        hf, tokenizer = _load_hf_dir(path)
        return _compile(hf, tokenizer, path.name or spec, "hf", spec, target, max_seq_len,
                        max_batch, device)
    if path.is_file() and path.suffix.lower() == ".gguf":
        hf, tokenizer = _load_gguf(path)
        return _compile(hf, tokenizer, path.stem, "gguf", spec, target, max_seq_len, max_batch,
                        device)
    if spec in preset_names():
        hf, tokenizer = _build_preset(spec, max_seq_len)
        return _compile(hf, tokenizer, spec, "preset", spec, target, max_seq_len, max_batch,
                        device)
    if path.exists():
        raise InputError(f"model {spec!r}: not a transfuse artifact (no manifest.json), a "
                         "Hugging Face model directory (no config.json) or a .gguf file")
    raise InputError(f"model {spec!r}: no such file or directory, and not a built-in preset "
                     f"(presets: {', '.join(preset_names())})")


def _load_hf_dir(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"model directory {path}: no usable tokenizer there ({e})") from None
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                  dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"model directory {path}: transformers cannot load a causal LM from "
                         f"it ({type(e).__name__}: {e})") from None
    return hf.eval(), tokenizer


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": path.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
        hf = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError) as e:  # transformers' ways of saying "cannot read"
        raise InputError(f"GGUF file {path}: transformers cannot load it "
                         f"({type(e).__name__}: {e}); it needs the gguf package and a model "
                         "architecture transformers reads from GGUF") from None
    return hf.eval(), tokenizer


def _compile(hf: Any, tokenizer: Any, name: str, kind: str, source: str, target: str | None,
             max_seq_len: int | None, max_batch: int | None, device: str | None) -> ServedModel:
    import transfuse

    limit = _position_limit(hf)
    if max_seq_len is None:
        max_seq_len = min(limit or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    elif limit is not None and max_seq_len > limit:
        raise InputError(f"max_seq_len {max_seq_len} is over {name}'s position limit {limit}")
    _check_vocab(tokenizer, hf.config.vocab_size, name)
    options = {"max_seq_len": max_seq_len, "max_batch": max_batch or 16, "kv": "paged",
               "block_size": BLOCK_SIZE}
    ids = torch.arange(8)[None] % hf.config.vocab_size
    logger.info("compiling %s (%s) for generation: %s, target %s", name, kind, options,
                target or "python")
    gen = transfuse.optimize(hf, (ids,), generation=options, target=target or "python",
                             device=device)
    return ServedModel(gen, tokenizer, name, kind, source)


def _position_limit(hf: Any) -> int | None:
    config = hf.config
    for key in ("max_position_embeddings", "n_positions", "max_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_vocab(tokenizer: Any, vocab: int, name: str) -> None:
    size = len(tokenizer)
    if size > vocab:
        raise InputError(f"{name}: the tokenizer has {size} tokens but the model's vocabulary "
                         f"is {vocab}; they do not belong together")


def _load_artifact(path: Path, target: str | None, max_seq_len: int | None,
                   max_batch: int | None, device: str | None) -> ServedModel:
    import transfuse
    from transfuse.runtime.generation_model import GenerationModel

    gen = transfuse.load(path, device=device)
    if not isinstance(gen, GenerationModel):
        raise ArtifactError(f"{path}: a compiled model without generation; serve needs one "
                            "saved from transfuse.optimize(..., generation=...)")
    spec = gen.cache_spec
    for option, asked, have in (("target", target, gen.backend),
                                ("max_seq_len", max_seq_len, spec["max_seq_len"]),
                                ("max_batch", max_batch, spec["max_batch"])):
        if asked is not None and asked != have:
            raise InputError(f"{path}: the artifact was compiled with {option}={have!r}, "
                             f"{asked!r} was asked for; leave it out or re-save the model")
    tokenizer = load_tokenizer(path / TOKENIZER_DIR)
    _check_vocab(tokenizer, gen.vocab_size, str(path))
    return ServedModel(gen, tokenizer, path.name, "artifact", str(path))


def load_speculative(option: str | None, served: ServedModel, *, target: str | None = None):
    """What ``--speculative`` gives the Engine: None, ``"prompt-lookup"``, or for
    ``draft:MODEL2`` a :class:`~transfuse.serving.draft.DraftModel` over MODEL2 loaded like
    MODEL (same max_seq_len and max_batch) — its tokenizer must be ``served``'s."""
    if option is None or option == "prompt-lookup":
        return option
    if not option.startswith("draft:") or not option[len("draft:"):]:
        raise InputError(f"speculative {option!r}: expected 'prompt-lookup' or 'draft:MODEL'")
    from transfuse.serving.draft import DraftModel

    draft = load_served(option[len("draft:"):], target=target, max_seq_len=served.max_seq_len,
                        max_batch=served.max_batch)
    mine, theirs = _tokenizer_identity(served.tokenizer), _tokenizer_identity(draft.tokenizer)
    if mine != theirs or draft.gen.vocab_size != served.gen.vocab_size:
        raise InputError(f"speculative {option}: the draft's tokenizer and vocabulary "
                         f"({theirs}, vocab {draft.gen.vocab_size}) are not {served.name}'s "
                         f"({mine}, vocab {served.gen.vocab_size}); a draft model must share "
                         "the tokenizer")
    return DraftModel(draft.gen, max_batch=served.max_batch)


def _tokenizer_identity(tokenizer: Any) -> tuple:
    """What two tokenizers must share to be the same: their class, size and vocabulary."""
    vocab = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else None
    return type(tokenizer).__name__, len(tokenizer), hash(frozenset(vocab.items())) if vocab \
        else None


# -- tokenizers beside an artifact ------------------------------------------------------------


def save_served(served: ServedModel, path: str | os.PathLike) -> Path:
    """Save ``served`` so ``transfuse serve PATH`` loads it: the generation artifact
    (``gen.save``), then its tokenizer in ``PATH/tokenizer/``."""
    path = Path(path)
    served.gen.save(path)  # replaces the directory: the tokenizer goes in after
    save_tokenizer(served.tokenizer, path / TOKENIZER_DIR)
    return path


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike) -> Path:
    """Write ``tokenizer`` to ``directory``: a ByteTokenizer's JSON file, or a Hugging Face
    tokenizer's ``save_pretrained`` files."""
    directory = Path(directory)
    if isinstance(tokenizer, ByteTokenizer):
        tokenizer.save(directory)
    elif callable(getattr(tokenizer, "save_pretrained", None)):
        tokenizer.save_pretrained(directory)
    else:
        raise InputError(f"cannot save a tokenizer of type {type(tokenizer).__name__}: "
                         "expected a ByteTokenizer or a Hugging Face tokenizer")
    return directory


def load_tokenizer(directory: str | os.PathLike):
    """Read what :func:`save_tokenizer` wrote; ArtifactError naming the folder if nothing is
    there."""
    directory = Path(directory)
    if (directory / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer.load(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no tokenizer beside the artifact; save the model "
                            "with transfuse.serving.loading.save_served(...) (or put a "
                            f"tokenizer's save_pretrained files in {TOKENIZER_DIR}/)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{directory}: cannot read the tokenizer ({e})") from None


__all__ = ["BLOCK_SIZE", "DEFAULT_MAX_SEQ_LEN", "ServedModel", "TOKENIZER_DIR", "load_served",
           "load_speculative", "load_tokenizer", "preset_names", "save_served", "save_tokenizer"]
