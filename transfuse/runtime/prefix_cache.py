"""Prefix caching for a paged KV cache: blocks found again by the tokens they hold.

Two requests that start with the same tokens (a system prompt, a preempted request computed
again, a conversation's next turn) need the same keys and values for that prefix. With prefix
caching a :class:`~transfuse.runtime.kv_cache.KVCache` remembers, for blocks whose content is
known, a *key*: ``(digest of every token before the block, tokens in the block)``. The digests
form a chain over full blocks, ``d_i = sha256(d_{i-1} || tokens of block i)`` (``d_-1 = b""``),
so a key names the block's whole prefix; sha256 rather than Python's ``hash`` because a prompt
chosen to collide must not read another request's cache (vLLM's CVE-2025-25183). Within a key
the tokens are compared exactly.

- A *full* block is keyed when the step that fills it commits.
- A *partial* block (``m < block_size`` tokens) is keyed when a prompt's last block is complete
  (``m = prompt_len % block_size``) and when its sequence is freed (``m = length %
  block_size``). Its owner may still append past ``m``: those writes leave positions ``< m``
  unchanged, so the key stays true.
- A write into positions a key covers (only after a truncate, or when a hit leaves the last
  prompt token to compute) drops that key first; a block shared with another sequence is copied
  before the write instead (copy-on-write), so the cached original stays intact.
- Freed blocks keep their keys and content while on the pool's free list. The pool hands out
  unkeyed free blocks first, then keyed ones least recently freed first (a sequence's blocks
  are freed last block first, so a prefix's tail is evicted before its head); handing out a
  keyed block drops its keys (an eviction).

``match`` walks the chain over the prompt's full blocks (exact key lookups), then, among the
cached blocks that follow the matched prefix (full or partial), takes the one whose known tokens
share the longest start with the prompt's next tokens: a request with the same system prompt
but its own question shares the block where the system prompt ends and copies it on its first
write. Every key maps to one block; a block may carry a full key and partial keys of the same
position. Statistics: :meth:`PrefixCache.stats`.
"""

from __future__ import annotations

import hashlib
import operator
from array import array
from collections.abc import Hashable, Sequence

from transfuse.errors import InputError
from transfuse.runtime.block_pool import BlockPool

__all__ = ["PrefixCache", "chain_digest", "check_tokens", "ROOT"]

#: the digest before the first block
ROOT = b""
_MAX_ID = 2**63  # token ids are packed as int64 into the digest

Key = tuple[bytes, tuple[int, ...]]


def chain_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The digest of a full block of ``tokens`` after the prefix whose digest is ``parent``."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def check_tokens(tokens: object, n: int, where: str, seq_id: Hashable) -> list[int]:
    """``tokens`` as a list of ``n`` token ids (ints in 0..2**63-1), else InputError."""
    if hasattr(tokens, "tolist") and callable(tokens.tolist):  # a tensor or an array
        tokens = tokens.tolist()
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise InputError(
            f"KVCache.{where}: tokens of sequence {seq_id!r} must be a list of {n} token ids, "
            f"got {type(tokens).__name__}"
        )
    if len(tokens) != n:
        raise InputError(
            f"KVCache.{where}: sequence {seq_id!r} has {n} tokens but {len(tokens)} token ids "
            "were given"
        )
    out = []
    for t in tokens:
        try:
            i = operator.index(t)
        except TypeError:
            i = None
        if i is None or isinstance(t, bool) or not 0 <= i < _MAX_ID:
            raise InputError(
                f"KVCache.{where}: token id {t!r} of sequence {seq_id!r} is not an int in "
                f"0..{_MAX_ID - 1}"
            )
        out.append(i)
    return out


class _Chain:
    """A sequence's committed tokens and the digests of its full blocks."""

    __slots__ = ("tokens", "digests", "prompt_len")

    def __init__(self, tokens: list[int], digests: list[bytes], prompt_len: int) -> None:
        self.tokens = tokens  # every token whose K/V are in the cache (len == its length)
        self.digests = digests  # d_i of each full block, len == len(tokens) // block_size
        self.prompt_len = prompt_len  # 0: no prompt tail to key


class PrefixCache:
    """Block keys, sequences' chains and hit statistics of one paged KVCache (module doc).

    KVCache calls it at each point where blocks change hands or content: :meth:`admit` (add),
    :meth:`written` (prepare_step), :meth:`commit`, :meth:`evicted` (blocks the pool handed
    out), :meth:`release` (free, truncate, abort), :meth:`fork`, :meth:`truncate`.
    """

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._table: dict[Key, int] = {}  # key -> the block holding it
        self._keys: dict[int, list[Key]] = {}  # block -> its keys (only blocks with any)
        # prefix digest -> {block after that prefix: its longest keyed tokens}
        self._children: dict[bytes, dict[int, tuple[int, ...]]] = {}
        self._chains: dict[Hashable, _Chain] = {}
        self._queries = self._hits = self._partial_hits = self._saved = self._evictions = 0

    # -- lookup -----------------------------------------------------------------------------

    def match(self, tokens: Sequence[int]) -> tuple[list[int], int, list[bytes]]:
        """The cached blocks holding the longest prefix of ``tokens``: (blocks, tokens they
        hold, digests of the full ones). Changes nothing."""
        bs, parent = self.block_size, ROOT
        blocks: list[int] = []
        digests: list[bytes] = []
        n = len(tokens)
        while (len(blocks) + 1) * bs <= n:
            part = tuple(tokens[len(blocks) * bs:(len(blocks) + 1) * bs])
            b = self._table.get((parent, part))
            if b is None:
                break
            blocks.append(b)
            parent = chain_digest(parent, part)
            digests.append(parent)
        done = len(blocks) * bs
        rest = tokens[done:done + bs]
        best, best_m = -1, 0
        for b, known in self._children.get(parent, {}).items() if rest else ():  # shared start
            m = 0
            for x, y in zip(known, rest):
                if x != y:
                    break
                m += 1
            if m > best_m:
                best, best_m = b, m
                if m == len(rest):
                    break
        if best_m:
            blocks.append(best)
        return blocks, done + best_m, digests

    def admit(self, seq_id: Hashable, prompt_len: int, tokens: list[int] | None,
              where: str, num_blocks: int) -> tuple[list[int], int]:
        """Blocks for a new sequence's prompt (cached ones shared, the rest allocated) and
        its cached length ``c <= prompt_len - 1``; all or nothing."""
        bs = self.block_size
        hit: list[int] = []
        digests: list[bytes] = []
        c = 0
        if tokens is not None:
            hit, matched, digests = self.match(tokens)
            c = min(matched, prompt_len - 1)  # the last prompt token is always computed
            hit = hit[: -(-c // bs)]
            digests = digests[: c // bs]
        need = -(-prompt_len // bs) - len(hit)
        taken = [b for b in hit if self.pool.ref_count(b) == 0]
        free = self.pool.num_free
        if need + len(taken) > free:
            raise InputError(
                f"KVCache.{where}: sequence {seq_id!r} needs {need + len(taken)} blocks for its "
                f"{prompt_len} prompt tokens ({len(hit)} cached, {len(taken)} of them free), "
                f"{free} of {num_blocks} are free"
            )
        for b in hit:  # before allocating, which could evict them
            if self.pool.ref_count(b) == 0:
                self.pool.take(b)
            else:
                self.pool.share([b])
        blocks = hit + self.allocate(need)
        if tokens is not None:
            self._queries += -(-prompt_len // bs)
            self._hits += len(hit)
            self._partial_hits += bool(c % bs)
            self._saved += c
        self._chains[seq_id] = _Chain(list(tokens[:c]) if c else [], digests, prompt_len)
        return blocks, c

    # -- content changes --------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks from the pool; keyed ones among them are evicted."""
        blocks = self.pool.allocate(n)
        for b in blocks:
            if b in self._keys:
                self._drop(b, 0)
                self._evictions += 1
        return blocks

    def written(self, blocks: Sequence[int], start: int, n: int) -> None:
        """Positions ``start .. start + n - 1`` of a table are about to be written: drop the
        keys covering them (the blocks are the writer's own by now: copy-on-write ran)."""
        bs = self.block_size
        first = start // bs
        for j in range(first, (start + n - 1) // bs + 1):
            if blocks[j] in self._keys:
                self._drop(blocks[j], start - j * bs if j == first else 0)

    def commit(self, seq_id: Hashable, blocks: Sequence[int], new: Sequence[int]) -> None:
        """``new`` tokens of ``seq_id`` were written: key the blocks they filled, and the
        prompt's last block when the prompt is now complete."""
        ch = self._chains[seq_id]
        bs = self.block_size
        ch.tokens.extend(new)
        length = len(ch.tokens)
        while (len(ch.digests) + 1) * bs <= length:
            i = len(ch.digests)
            part = tuple(ch.tokens[i * bs:(i + 1) * bs])
            parent = ch.digests[-1] if ch.digests else ROOT
            self._register(blocks[i], (parent, part))
            ch.digests.append(chain_digest(parent, part))
        p = ch.prompt_len
        if p % bs and length - len(new) < p <= length:
            self._key_partial(ch, blocks, p)

    def release(self, blocks: Sequence[int]) -> None:
        """Give back a sequence's holds on ``blocks`` (in table order): freed last block
        first; freed blocks without a key are handed out before every keyed one."""
        self.pool.release(reversed(blocks))
        plain = [b for b in blocks if b not in self._keys and self.pool.ref_count(b) == 0]
        if plain:
            self.pool.to_front(plain)

    def free(self, seq_id: Hashable, blocks: Sequence[int]) -> None:
        """``seq_id`` is gone: key its partial last block, then release its blocks."""
        ch = self._chains.pop(seq_id)
        if len(ch.tokens) % self.block_size:
            self._key_partial(ch, blocks, len(ch.tokens))
        self.release(blocks)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        ch = self._chains[parent_id]
        self._chains[child_id] = _Chain(list(ch.tokens), list(ch.digests), 0)

    def truncate(self, seq_id: Hashable, length: int) -> None:
        ch = self._chains[seq_id]
        del ch.tokens[length:]
        del ch.digests[length // self.block_size:]

    # -- bookkeeping ------------------------------------------------------------------------

    def _key_partial(self, ch: _Chain, blocks: Sequence[int], end: int) -> None:
        k = end // self.block_size
        parent = ch.digests[k - 1] if k else ROOT
        self._register(blocks[k], (parent, tuple(ch.tokens[k * self.block_size:end])))

    def _register(self, block: int, key: Key) -> None:
        if key in self._table:  # the same content is cached in another block already
            return
        self._table[key] = block
        self._keys.setdefault(block, []).append(key)
        known = self._children.setdefault(key[0], {})
        if len(key[1]) > len(known.get(block, ())):
            known[block] = key[1]

    def _drop(self, block: int, offset: int) -> None:
        """Forget the keys of ``block`` covering position ``offset`` (0: all of them)."""
        keys = self._keys.pop(block)
        keep = [k for k in keys if len(k[1]) <= offset]
        for key in keys:
            if len(key[1]) > offset:
                del self._table[key]
        parent = keys[0][0]  # all keys of a block follow the same prefix
        if keep:
            self._keys[block] = keep
            self._children[parent][block] = max((k[1] for k in keep), key=len)
        else:
            known = self._children[parent]
            del known[block]
            if not known:
                del self._children[parent]

    def keys_of(self, block: int) -> list[Key]:
        """The keys ``block`` holds now (for tests and debugging)."""
        return list(self._keys.get(block, ()))

    def stats(self) -> dict[str, float | int]:
        """``queries`` (prompt blocks looked up), ``hits`` (blocks reused, = blocks saved),
        ``partial_hits`` (of them, partial last blocks), ``hit_rate``, ``tokens_saved``,
        ``cached_blocks`` (blocks findable now), ``cached_free_blocks`` (of them, held by no
        sequence), ``evictions`` (keyed blocks handed out again)."""
        cached_free = sum(1 for b in self._keys if self.pool.ref_count(b) == 0)
        return {
            "queries": self._queries,
            "hits": self._hits,
            "partial_hits": self._partial_hits,
            "hit_rate": self._hits / self._queries if self._queries else 0.0,
            "tokens_saved": self._saved,
            "cached_blocks": len(self._keys),
            "cached_free_blocks": cached_free,
            "evictions": self._evictions,
        }
