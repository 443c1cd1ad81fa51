"""KVCache's sequence record and its checks: every refusal raised before any state changed.

Split out of :mod:`transfuse.runtime.kv_cache` (which inherits :class:`SeqChecks`) so that the
cache's own file is about where tokens go.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from transfuse.errors import InputError
from transfuse.runtime.prefix_cache import check_tokens


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"KVCache: {name} must be a positive int, got {value!r}")
    return value


class SeqRecord:
    """One sequence's place in the cache (private: KVCache's bookkeeping)."""

    __slots__ = ("length", "slot", "blocks", "pending")

    def __init__(self, slot: int = -1, blocks: list[int] | None = None) -> None:
        self.length = 0  # tokens whose K/V are in the cache
        self.slot = slot  # contiguous: the slot it owns
        self.blocks = blocks if blocks is not None else []  # paged: block ids in order
        self.pending = 0  # tokens of the step in flight (0 outside a step)


class SeqChecks:
    """KVCache's argument and state checks (a mixin: uses ``_seqs``, ``_step``,
    ``max_seq_len``); each raises InputError naming the method and the sequence."""

    _seqs: dict[Hashable, SeqRecord]
    _step: list[tuple[Hashable, int]] | None
    max_seq_len: int

    def _get(self, seq_id: Hashable, where: str) -> SeqRecord:
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise InputError(
                f"KVCache.{where}: unknown sequence {seq_id!r} ({len(self._seqs)} live)"
            ) from None

    def _check_idle(self, where: str) -> None:
        if self._step is not None:
            raise InputError(
                f"KVCache.{where}: a step is in flight; call commit_step() or abort_step()"
            )

    def _check_new(self, seq_id: object, where: str) -> None:
        try:
            exists = seq_id in self._seqs
        except TypeError:
            raise InputError(
                f"KVCache.{where}: sequence id {seq_id!r} is not hashable (use an int or str)"
            ) from None
        if exists:
            raise InputError(f"KVCache.{where}: sequence {seq_id!r} already exists")

    def _check_n(self, n: object, where: str, name: str, seq_id: Hashable) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(
                f"KVCache.{where}: {name} of sequence {seq_id!r} must be a positive int, "
                f"got {n!r}"
            )

    def _check_room(self, seq_id: Hashable, s: SeqRecord, n: int, where: str) -> None:
        if s.length + n > self.max_seq_len:
            raise InputError(
                f"KVCache.{where}: sequence {seq_id!r} would hold {s.length + n} tokens "
                f"({s.length} + {n}), more than max_seq_len {self.max_seq_len}"
            )

    def _check_items(self, items: Sequence[tuple[Hashable, int]], where: str) -> None:
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items:
            raise InputError(f"KVCache.{where}: items must be a non-empty list of (seq_id, n)")
        seen: set[Hashable] = set()
        for item in items:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise InputError(f"KVCache.{where}: each item is (seq_id, n_new), got {item!r}")
            sid, n = item
            s = self._get(sid, where)
            if sid in seen:
                raise InputError(f"KVCache.{where}: sequence {sid!r} appears twice in one step")
            seen.add(sid)
            self._check_n(n, where, "n_new", sid)
            self._check_room(sid, s, n, where)

    def _check_step_tokens(self, items: Sequence[tuple[Hashable, int]],
                           tokens: object) -> list[list[int]]:
        if tokens is None:
            raise InputError("KVCache.prepare_step: with prefix_caching, tokens (per item its "
                             "new token ids) are required to key the blocks the step fills")
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence) or len(
            tokens) != len(items):
            raise InputError(f"KVCache.prepare_step: tokens must be a list of {len(items)} "
                             f"token id lists, one per item, got {tokens!r:.80}")
        return [check_tokens(t, n, "prepare_step", sid) for (sid, n), t in zip(items, tokens)]
