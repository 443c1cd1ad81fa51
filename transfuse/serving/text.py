"""``TextStream``: token ids in, finished text out, one token at a time.

    stream = TextStream(tokenizer, stop_strings=["\\n\\n"])
    for tok in tokens:
        delta, stopped = stream.push(tok)     # text safe to show now
        if stopped: break
    tail = stream.flush()                     # what was held back, at the end

Two things make a token's text unsafe to show at once:

- **incomplete characters**: a byte-level BPE token can end in the middle of a multi-byte
  UTF-8 character (an emoji is often 2-4 tokens); decoding it alone gives U+FFFD. The stream
  decodes a small window of recent tokens (``ids[prefix:]`` against ``ids[prefix:read]``, the
  way text-generation-inference and vLLM do), so a tokenizer that needs the previous token to
  place a leading space (SentencePiece) is decoded in context, and text ending in U+FFFD is
  held until the character completes.
- **stop strings**: text that could be the start of a stop string is held until it is known
  not to be one. When a stop string appears (possibly spanning several tokens), the text
  before it is the last delta and the stop string itself is never shown (OpenAI's rule).

``flush()`` releases what was held (an incomplete character decodes as U+FFFD then) unless
the stream already stopped. The tokenizer needs only ``decode(ids, skip_special_tokens=...)``
(Hugging Face tokenizers and :class:`~transfuse.serving.byte_tokenizer.ByteTokenizer` have it);
special tokens are skipped by default, as in OpenAI's output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from transfuse.errors import InputError

#: what a decoder returns for bytes that are not (yet) a whole UTF-8 character
REPLACEMENT = "\ufffd"
#: bytes in the longest UTF-8 character
UTF8_MAX = 4
#: tokens held for an incomplete character before they are released as U+FFFD anyway
MAX_PENDING = 16


def check_stop_strings(stop: Iterable[Any] | None, *, where: str = "stop") -> tuple[str, ...]:
    """The stop strings as a tuple, or InputError naming ``where`` (non-string or empty)."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    out = tuple(stop)
    for i, s in enumerate(out):
        if not isinstance(s, str) or not s:
            raise InputError(f"{where}[{i}] must be a non-empty string, got {s!r}")
    return out


class TextStream:
    """Incremental detokenizer with stop strings (module docstring)."""

    def __init__(self, tokenizer: Any, stop_strings: Iterable[str] | None = None, *,
                 skip_special_tokens: bool = True):
        if not callable(getattr(tokenizer, "decode", None)):
            raise InputError(f"TextStream needs a tokenizer with decode(ids), got "
                             f"{type(tokenizer).__name__}")
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stops = check_stop_strings(stop_strings, where="stop_strings")
        self._ids: list[int] = []
        self._prefix = 0   # window start: the tokens decoded for context only
        self._read = 0     # tokens whose text was already taken
        self._held = ""    # decoded text held back: it may start a stop string
        self._text: list[str] = []
        self.stopped = False
        #: the stop string that ended the stream (None until one does)
        self.stop_string: str | None = None

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    @property
    def text(self) -> str:
        """All text returned so far (deltas and flush)."""
        return "".join(self._text)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; returns (text now safe to show, whether a stop string ended it)."""
        if self.stopped:
            return "", True
        self._ids.append(int(token_id))
        return self._emit(self._decode_new(final=False), final=False)

    def push_many(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """``push`` each token; the joined deltas, and whether a stop string ended the stream
        (tokens after the stop are dropped)."""
        parts = []
        for tok in token_ids:
            delta, stopped = self.push(tok)
            parts.append(delta)
            if stopped:
                break
        return "".join(parts), self.stopped

    def flush(self) -> str:
        """The text still held back (incomplete characters as U+FFFD), at the end of output.
        Empty once a stop string ended the stream."""
        if self.stopped:
            return ""
        delta, _ = self._emit(self._decode_new(final=True), final=True)
        return delta

    # -- inside ---------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _decode_new(self, *, final: bool) -> str:
        """The new text of the tokens after ``_read``; '' while it ends in an incomplete
        character (unless ``final``)."""
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix:self._read])
        end = len(self._ids)
        after = self._decode(self._ids[self._prefix:end])
        if not final and (len(after) <= len(before) or after.endswith(REPLACEMENT)):
            if end - self._read < MAX_PENDING:
                return ""  # nothing new yet, or a character still incomplete
            # never a valid character this long: release all but the last few tokens (a
            # character cut there completes), so the window stays bounded on garbage output
            end = next((e for e in range(end - 1, end - UTF8_MAX, -1) if not self._decode(
                self._ids[self._prefix:e]).endswith(REPLACEMENT)), end - UTF8_MAX)
            after = self._decode(self._ids[self._prefix:end])
        # a decoder may rewrite the window's end (a leading space it now places): take the
        # common continuation when `after` does not extend `before` exactly
        new = after[len(before):] if after.startswith(before) else after[_common(before, after):]
        self._prefix, self._read = self._read, end
        return new

    def _emit(self, new: str, *, final: bool) -> tuple[str, bool]:
        buf = self._held + new
        cut = _first_stop(buf, self._stops)
        if cut is not None:
            at, stop = cut
            self.stopped, self.stop_string, self._held = True, stop, ""
            return self._record(buf[:at]), True
        keep = 0 if final else _stop_prefix_len(buf, self._stops)
        self._held = buf[len(buf) - keep:] if keep else ""
        return self._record(buf[:len(buf) - keep]), False

    def _record(self, text: str) -> str:
        if text:
            self._text.append(text)
        return text


def _common(a: str, b: str) -> int:
    """Length of the common prefix of a and b."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string in ``text`` (longest on a tie)."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
            best = (i, s)
    return best


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


__all__ = ["REPLACEMENT", "TextStream", "check_stop_strings"]
