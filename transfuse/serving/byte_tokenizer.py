"""``ByteTokenizer``: UTF-8 bytes as token ids, for models that come without a tokenizer.

The built-in presets of ``transfuse serve`` (serving/loading.py) are random-weight models
built from a config; they need *some* tokenizer to turn text into ids and back. This one is
the simplest that round-trips every string: ids 0-255 are the bytes of the UTF-8 encoding,
then a few special tokens (:data:`SPECIALS`). ``encode`` never produces a special id, so text
cannot inject one; ``decode`` drops them with ``skip_special_tokens=True`` (the default,
as OpenAI output shows no specials) and decodes invalid or cut UTF-8 as U+FFFD, like a
byte-level BPE tokenizer does.

It has no chat template: chat prompts use the documented plain fallback
(serving/protocol.py ``chat_prompt``). ``save(dir)`` / ``ByteTokenizer.load(dir)`` write and
read one small JSON file, so an artifact saved from a preset carries its tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transfuse.errors import ArtifactError, InputError

#: the special tokens after the 256 byte ids, in id order
SPECIALS = ("<|endoftext|>", "<|pad|>")
#: the file ``save`` writes
FILE_NAME = "byte_tokenizer.json"


class ByteTokenizer:
    """Bytes as ids (module docstring). ``vocab_size`` = 256 + len(SPECIALS)."""

    chat_template = None  # no template: the server's plain fallback applies

    def __init__(self) -> None:
        self.special_ids = {name: 256 + i for i, name in enumerate(SPECIALS)}
        self.eos_token_id = self.special_ids["<|endoftext|>"]
        self.pad_token_id = self.special_ids["<|pad|>"]
        self.bos_token_id = None

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIALS)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The UTF-8 bytes of ``text`` as ids (specials never; ``add_special_tokens`` is
        accepted for Hugging Face's signature and adds nothing: there is no BOS)."""
        if not isinstance(text, str):
            raise InputError(f"ByteTokenizer.encode takes a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of ``ids``: bytes decoded as UTF-8 (U+FFFD for invalid or cut
        sequences); special ids dropped, or written by name when not skipped."""
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if not 0 <= i < self.vocab_size:
                raise InputError(f"ByteTokenizer.decode: id {i} outside the vocabulary "
                                 f"[0, {self.vocab_size})")
            if not skip_special_tokens:
                out.append(run.decode("utf-8", errors="replace"))
                out.append(SPECIALS[i - 256])
                run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/byte_tokenizer.json`` (the directory is made if missing)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / FILE_NAME).write_text(json.dumps({"kind": "byte", "specials": list(SPECIALS)}),
                                      encoding="utf-8")
        return path / FILE_NAME

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ByteTokenizer:
        """Read what :meth:`save` wrote; ArtifactError if it is not that file."""
        path = Path(directory) / FILE_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{path}: cannot read the byte tokenizer ({e})") from None
        if data != {"kind": "byte", "specials": list(SPECIALS)}:
            raise ArtifactError(f"{path}: not a transfuse byte tokenizer of this version "
                                f"(expected specials {list(SPECIALS)}), got {data!r}")
        return cls()

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


__all__ = ["ByteTokenizer", "FILE_NAME", "SPECIALS"]
