"""Prompt lookup: propose the tokens that followed the last n-gram the last time it occurred.

A request that summarises, extracts from or edits its prompt often repeats spans of it. The
last ``n`` tokens of the context (prompt + generated so far) are searched earlier in the same
context, longest ``n`` first (``max_ngram`` down to ``min_ngram``) and, for one ``n``, the most
recent occurrence; the up to ``k`` tokens that followed it are the proposal. No model runs and
nothing is kept between steps, so ``rollback`` and ``release`` have nothing to do.

The search runs in C: the context becomes the bytes of an int64 array and ``bytes.rfind``
finds the n-gram; a hit whose byte offset is not a multiple of 8 straddles two tokens and the
search goes on before it.
"""

from __future__ import annotations

from array import array
from collections.abc import Hashable, Sequence

from transfuse.errors import InputError
from transfuse.serving.proposal import DraftRequest, Proposal

_ITEM = array("q").itemsize  # bytes per token in the search buffer (8)


def _last_aligned(haystack: bytes, needle: bytes, end: int) -> int:
    """The highest byte offset of ``needle`` in ``haystack[:end]`` that starts a token, or -1."""
    while True:
        at = haystack.rfind(needle, 0, end)
        if at < 0 or at % _ITEM == 0:
            return at
        end = at + len(needle) - 1  # a match starting before ``at``


class PromptLookup:
    """n-gram lookup in the request's own context (module docstring)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        for name, value in (("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"PromptLookup: {name} must be an int >= 1, got {value!r}")
        if min_ngram > max_ngram:
            raise InputError(f"PromptLookup: min_ngram {min_ngram} is larger than max_ngram "
                             f"{max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, context: Sequence[int], k: int) -> Proposal:
        """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest
        matching suffix of ``context``; empty when nothing matches."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"PromptLookup.propose: k must be an int >= 0, got {k!r}")
        size = len(context)
        if k == 0 or size < self.min_ngram + 1:
            return Proposal()
        try:
            buf = array("q", context).tobytes()
        except (TypeError, OverflowError):
            raise InputError("PromptLookup.propose: context must be a list of int token "
                             "ids") from None
        # a match must end before the last token, so that at least one token follows it
        end = (size - 1) * _ITEM
        for n in range(min(self.max_ngram, size - 1), self.min_ngram - 1, -1):
            at = _last_aligned(buf, buf[(size - n) * _ITEM:], end)
            if at >= 0:
                start = at // _ITEM + n
                return Proposal([int(t) for t in context[start:start + k]])
        return Proposal()

    def propose_batch(self, reqs: Sequence[DraftRequest], k: int) -> list[Proposal]:
        """:meth:`propose` for each request (its own ``k`` when it has one)."""
        return [self.propose(r.context, r.want(k)) for r in reqs]

    def rollback(self, request_id: Hashable, keep_len: int) -> None:
        """Nothing is kept per request."""

    def release(self, request_id: Hashable) -> None:
        """Nothing is kept per request."""

    def __repr__(self) -> str:
        return f"PromptLookup(max_ngram={self.max_ngram}, min_ngram={self.min_ngram})"


__all__ = ["PromptLookup"]
