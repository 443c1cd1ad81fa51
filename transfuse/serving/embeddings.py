"""Sentence embeddings for ``transfuse serve``: an encoder compiled once, pooled, normalised.

    embedder = load_embedder("path/to/all-MiniLM-L6-v2", max_batch=32)
    vectors = embedder.engine.embed([[101, 7592, 102], ...])     # float32 [N, H]

What is served: a Hugging Face encoder directory (``config.json`` + weights + tokenizer),
``AutoModel`` in fp32, compiled with ``transfuse.optimize(model, (ids, mask),
dynamic={"batch": (1, max_batch), "seq": (1, max_seq_len)})`` for the target. The pooling is
the directory's sentence-transformers one when it has ``modules.json`` (its ``Pooling``
module's ``config.json``: mean, CLS, max or mean·sqrt(len) of the last hidden state over the
real tokens; a ``Normalize`` module: unit length); a directory without it gets mean pooling
and unit length (what OpenAI's embeddings are). Glossary: N inputs, B a batch of them, S the
longest input of a batch, H the hidden size.

:class:`EmbeddingEngine` has the parts of :class:`~transfuse.serving.engine.Engine` the server
and ``run_server`` use (``shutdown``, ``closed``, ``stats``) and ``embed``: inputs sorted by
length, cut into batches of at most ``max_batch``, each right-padded to its longest input with
an attention mask, run, pooled over the real tokens; the rows come back in the callers' order.
An input's vector does not depend on what it is batched with beyond float rounding (the mask
hides the padding). Calls are serialised by a lock (the compiled program is one per process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from transfuse.errors import EngineClosedError, InputError

logger = logging.getLogger(__name__)

#: pooling modes (sentence-transformers' names without ``pooling_mode_`` / ``_tokens``)
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
#: default largest batch of inputs per forward, and longest input
DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_SEQ_LEN = 512


@dataclasses.dataclass(frozen=True)
class Pooling:
    """How token states become one vector: ``mode`` (:data:`POOLING_MODES`) and whether it is
    scaled to unit length."""

    mode: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise InputError(f"pooling mode {self.mode!r}: expected one of {POOLING_MODES}")


def read_pooling(directory: str | os.PathLike) -> Pooling:
    """The pooling of a sentence-transformers directory (``modules.json``), else the default
    (mean, unit length); a malformed file is an InputError naming it."""
    root = Path(directory)
    modules = root / "modules.json"
    if not modules.is_file():
        return Pooling()
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
        types = {str(e.get("type", "")).rsplit(".", 1)[-1]: e for e in entries}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise InputError(f"{modules}: not a sentence-transformers module list ({e})") from None
    mode = "mean"
    if "Pooling" in types:
        cfg_path = root / str(types["Pooling"].get("path", "")) / "config.json"
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{cfg_path}: cannot read the pooling config ({e})") from None
        chosen = [m for m in POOLING_MODES
                  if cfg.get(f"pooling_mode_{m}_token" if m == "cls" else
                             f"pooling_mode_{m}_tokens")]
        if len(chosen) != 1:
            raise InputError(f"{cfg_path}: expected exactly one pooling mode, got "
                             f"{chosen or 'none'} (several modes concatenated are not supported)")
        mode = chosen[0]
    return Pooling(mode, normalize="Normalize" in types)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """``hidden`` [B, S, H] and ``mask`` [B, S] (1 = real token) -> float32 [B, H]."""
    hidden = hidden.float()
    m = mask.to(hidden.dtype)[..., None]
    if pooling.mode == "cls":
        out = hidden[:, 0]
    elif pooling.mode == "max":
        out = hidden.masked_fill(m == 0, -torch.inf).amax(dim=1)
    else:
        total = (hidden * m).sum(dim=1)
        count = m.sum(dim=1).clamp(min=1.0)
        out = total / (count if pooling.mode == "mean" else count.sqrt())
    if pooling.normalize:
        out = torch.nn.functional.normalize(out, p=2.0, dim=-1)
    return out


class EmbeddingEngine:
    """Embeds token-id inputs with a compiled encoder (module docstring)."""

    task = "embed"

    def __init__(self, compiled: Any, *, pooling: Pooling, max_batch: int, max_seq_len: int,
                 pad_token_id: int, hidden_size: int):
        for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"EmbeddingEngine: {name} must be a positive int, got {value!r}")
        self.compiled, self.pooling = compiled, pooling
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.pad_token_id, self.hidden_size = pad_token_id, hidden_size
        self._lock = threading.Lock()
        self._closed = False
        self._counts = {"requests": 0, "inputs": 0, "tokens": 0, "batches": 0}
        self._seconds = 0.0

    def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """float32 [N, H]: one vector per input (token ids, 1..max_seq_len of them)."""
        if self._closed:
            raise EngineClosedError("the embedding engine is shut down")
        if not inputs:
            raise InputError("embed: no inputs")
        for i, ids in enumerate(inputs):
            if not ids or len(ids) > self.max_seq_len:
                raise InputError(f"embed: input {i} has {len(ids)} tokens; expected 1.."
                                 f"{self.max_seq_len}")
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        out = torch.empty((len(inputs), self.hidden_size), dtype=torch.float32)
        t0 = time.perf_counter()
        with self._lock:
            for lo in range(0, len(order), self.max_batch):
                rows = order[lo:lo + self.max_batch]
                width = max(len(inputs[i]) for i in rows)
                ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    ids[r, :len(inputs[i])] = torch.tensor(inputs[i])
                    mask[r, :len(inputs[i])] = 1
                result = self.compiled(ids, mask)
                hidden = result.last_hidden_state if hasattr(result, "last_hidden_state") \
                    else result[0]
                out[torch.tensor(rows)] = pool(hidden, mask, self.pooling).cpu()
                self._counts["batches"] += 1
            self._counts["requests"] += 1
            self._counts["inputs"] += len(inputs)
            self._counts["tokens"] += sum(len(x) for x in inputs)
            self._seconds += time.perf_counter() - t0
        return out

    # -- what the server and run_server use -------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def shutdown(self, cancel: bool = True, timeout: float = 30.0) -> None:
        """Refuse new work; a call in progress finishes (``cancel`` and ``timeout`` are the
        generation Engine's; nothing runs in the background here)."""
        self._closed = True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._counts, "seconds": round(self._seconds, 6), "task": self.task}


@dataclasses.dataclass
class ServedEmbedder:
    """An encoder ready to serve: its ``engine``, ``tokenizer``, the ``name`` clients use."""

    engine: EmbeddingEngine
    tokenizer: Any
    name: str
    source: str

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len


def is_embedding_dir(path: str | os.PathLike) -> bool:
    """True for a directory to serve as embeddings: a sentence-transformers folder
    (``modules.json``), or a Hugging Face folder whose architectures are no causal LM."""
    root = Path(path)
    if not root.is_dir():
        return False
    if (root / "modules.json").is_file():
        return True
    config = root / "config.json"
    if not config.is_file() or (root / "manifest.json").is_file():
        return False
    try:
        archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return bool(archs) and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_embedder(path: str | os.PathLike, *, target: str | None = None,
                  max_batch: int | None = None, max_seq_len: int | None = None) -> ServedEmbedder:
    """Load and compile the encoder folder ``path`` (module docstring)."""
    import transformers

    import transfuse

    root = Path(path)
    if not root.is_dir():
        raise InputError(f"embedding model {str(path)!r}: no such directory")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(root, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(root, local_files_only=True,
                                                       dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise InputError(f"embedding model {str(path)!r}: transformers cannot load it: "
                         f"{e}") from None
    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    seq = max_seq_len or min(DEFAULT_MAX_SEQ_LEN, limit or DEFAULT_MAX_SEQ_LEN)
    if limit and seq > limit:
        raise InputError(f"max_seq_len {seq} exceeds the model's {limit} positions")
    batch = max_batch or DEFAULT_MAX_BATCH
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    example = torch.full((2, 8), pad, dtype=torch.long)
    example[:, 0] = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else pad
    mask = torch.ones_like(example)
    compiled = transfuse.optimize(model, (example, mask), target=target or "python",
                                  dynamic={"batch": (1, max(batch, 2)),
                                           "seq": (1, max(seq, 2))})
    engine = EmbeddingEngine(compiled, pooling=read_pooling(root), max_batch=batch,
                             max_seq_len=seq, pad_token_id=pad,
                             hidden_size=int(config.hidden_size))
    logger.info("embedding model %s: %s pooling%s, max_seq_len %d, max_batch %d", root.name,
                engine.pooling.mode, " + unit length" if engine.pooling.normalize else "", seq,
                batch)
    return ServedEmbedder(engine, tokenizer, root.name, str(root))


__all__ = ["EmbeddingEngine", "Pooling", "ServedEmbedder", "POOLING_MODES", "is_embedding_dir",
           "load_embedder", "pool", "read_pooling"]
