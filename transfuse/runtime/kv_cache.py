"""KVCache: the per-layer key/value caches a generation graph reads and writes, and their owners.

Glossary: L layers, Hkv key/value heads, D head dim, S max_seq_len, M max_batch (slots),
NB blocks, BS block_size, N tokens of a step, B sequences of a step.

The tensors are allocated once, zero-filled, when the cache is made (after checking that they
fit in the device's available memory), and written in place by the compiled graph's
``cached_attention`` ops; this object only decides *where* each token goes and hands the graph
the metadata inputs that say so (DESIGN.md section 7: one step = one flattened token axis,
:class:`~transfuse.runtime.step_meta.StepMeta`). Layouts (``order="token-major"`` / ``"head-major"``):

- contiguous: ``k[i]``, ``v[i]`` are [M, S, Hkv, D] / [M, Hkv, S, D]; a sequence owns one slot
  (``cache_table[b]`` = its slot) and token position p lives at ``[slot, p]``.
- paged: [NB, BS, Hkv, D] / [NB, Hkv, BS, D]; a sequence owns a list of blocks
  (``cache_table[b, p // BS]``), shared between forks with reference counts
  (:class:`~transfuse.runtime.block_pool.BlockPool`) and copied before a write (copy-on-write).

A sequence's ``length`` counts the tokens whose K/V are in the cache. A step goes
``prepare_step(items)`` (validate everything, then reserve room: allocate blocks, copy shared
blocks the step writes into; all or nothing) → run the graph → ``commit_step()`` (lengths grow)
or ``abort_step()`` (nothing grows; blocks reserved beyond the lengths are returned).
``add(seq_id, prompt_len)`` registers a sequence of length 0 and reserves room for its prompt;
``extend(seq_id, n)`` reserves room for n more tokens ahead of time; ``truncate(seq_id, length)``
forgets the tokens past ``length`` (rolled-back speculation). Every refusal is an
:class:`~transfuse.errors.InputError` raised before any state changed.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Sequence

import torch

from transfuse.errors import InputError
from transfuse.runtime.block_pool import BlockPool
from transfuse.runtime.kv_checks import SeqChecks, SeqRecord, positive_int
from transfuse.runtime.kv_memory import (
    bytes_per_token,
    cache_shape,
    check_fits,
    memory_report,
    parse_device,
    parse_dtype,
)
from transfuse.runtime.prefix_cache import PrefixCache, check_tokens
from transfuse.runtime.step_meta import StepMeta

__all__ = ["KVCache", "StepMeta", "LAYOUTS", "ORDERS", "bytes_per_token", "cache_shape"]

LAYOUTS = ("contiguous", "paged")
ORDERS = ("token-major", "head-major")


class KVCache(SeqChecks):
    """Contiguous or paged per-layer K/V caches with sequence bookkeeping (module docstring).

    Public attributes (read-only by convention): ``k``, ``v`` (lists of L tensors of
    ``shape``), ``nbytes`` (all of them), ``bytes_per_token`` (K and V of one token in every
    layer), ``layout``, ``order``, ``paged``, ``dtype``, ``device``, ``max_seq_len``,
    ``max_batch``, ``block_size`` (contiguous: max_seq_len), ``num_blocks`` (contiguous:
    max_batch slots), ``max_blocks`` (width of a paged ``cache_table``; contiguous: 1) and
    ``pool`` (the paged :class:`BlockPool`; None when contiguous).

    Paged: ``num_blocks`` defaults to enough for ``max_batch`` sequences of ``max_seq_len``;
    the number of live sequences is limited by blocks only (``max_batch`` only sizes that
    default). Contiguous: at most ``max_batch`` live sequences, one slot each.

    ``prefix_caching=True`` (paged only; :mod:`~transfuse.runtime.prefix_cache`): blocks are
    keyed by the tokens they hold and their prefix and found again by ``add(..., tokens=)``,
    after their sequences are freed too; ``prepare_step`` then needs ``tokens``.
    ``prefix_stats()`` reports hits.
    """

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype | str = torch.float32,
        *,
        max_seq_len: int,
        max_batch: int,
        layout: str = "contiguous",
        block_size: int = 16,
        num_blocks: int | None = None,
        device: str | torch.device = "cpu",
        order: str = "token-major",
        prefix_caching: bool = False,
    ) -> None:
        self.layers = positive_int("layers", layers)
        self.kv_heads = positive_int("kv_heads", kv_heads)
        self.head_dim = positive_int("head_dim", head_dim)
        self.max_seq_len = positive_int("max_seq_len", max_seq_len)
        self.max_batch = positive_int("max_batch", max_batch)
        if layout not in LAYOUTS:
            raise InputError(f"KVCache: layout must be one of {LAYOUTS}, got {layout!r}")
        if order not in ORDERS:
            raise InputError(f"KVCache: order must be one of {ORDERS}, got {order!r}")
        self.layout = layout
        self.order = order
        self.dtype = parse_dtype(dtype)
        self.device = parse_device(device)
        self.paged = layout == "paged"
        if self.paged:
            self.block_size = positive_int("block_size", block_size)
            self.max_blocks = math.ceil(self.max_seq_len / self.block_size)
            default_blocks = self.max_batch * self.max_blocks
            self.num_blocks = default_blocks if num_blocks is None else positive_int(
                "num_blocks", num_blocks
            )
        else:
            if num_blocks is not None:
                raise InputError("KVCache: num_blocks is for layout='paged' only")
            self.block_size = self.max_seq_len
            self.max_blocks = 1
            self.num_blocks = self.max_batch
        self.shape = cache_shape(layout, order, self.kv_heads, self.head_dim,
                                 max_seq_len=self.max_seq_len, max_batch=self.max_batch,
                                 block_size=self.block_size, num_blocks=self.num_blocks)
        self.bytes_per_token = bytes_per_token(self.layers, self.kv_heads, self.head_dim,
                                               self.dtype)
        self.nbytes = self.bytes_per_token * self.num_blocks * self.block_size
        what = (
            f"{self.num_blocks} blocks x {self.block_size} tokens"
            if self.paged
            else f"max_batch {self.max_batch} x max_seq_len {self.max_seq_len}"
        )
        check_fits("KVCache", self.nbytes, self.device, f"{what} x {self.bytes_per_token} bytes "
                   "per token", "lower max_seq_len, max_batch or num_blocks")
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        try:
            for _ in range(self.layers):
                self.k.append(torch.zeros(self.shape, dtype=self.dtype, device=self.device))
                self.v.append(torch.zeros(self.shape, dtype=self.dtype, device=self.device))
        except (RuntimeError, MemoryError) as exc:
            self.k, self.v = [], []  # give back what was taken
            raise InputError(
                f"KVCache: allocating {self.nbytes} bytes on {self.device} failed after the "
                f"memory check passed: {exc}"
            ) from None
        self._seqs: dict[Hashable, SeqRecord] = {}
        self.pool = BlockPool(self.num_blocks) if self.paged else None
        if not isinstance(prefix_caching, bool) or (prefix_caching and not self.paged):
            raise InputError(f"KVCache: prefix_caching={prefix_caching!r}: it is a bool, and "
                             "True needs layout='paged' (blocks are what is shared)")
        self.prefix_caching = prefix_caching
        self._prefix = PrefixCache(self.pool, self.block_size) if prefix_caching else None
        self._step_tokens: list[list[int]] | None = None
        self._free_slots = list(range(self.max_batch))  # a heap: lowest slot first
        self._step: list[tuple[Hashable, int]] | None = None

    # -- memory ---------------------------------------------------------------------------

    def memory_report(self) -> dict[str, object]:
        """Bytes and tokens: total, per token, in use; paged: blocks used/free/shared and
        waste; contiguous: slots (see :func:`~transfuse.runtime.kv_memory.memory_report`)."""
        return memory_report(self)

    # -- queries --------------------------------------------------------------------------

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def seq_ids(self) -> list[Hashable]:
        """The live sequences, in the order they were added."""
        return list(self._seqs)

    def length(self, seq_id: Hashable) -> int:
        """Tokens of ``seq_id`` whose K/V are in the cache."""
        return self._get(seq_id, "length").length

    def slot(self, seq_id: Hashable) -> int:
        """The slot ``seq_id`` owns (contiguous layout)."""
        if self.paged:
            raise InputError("KVCache.slot: a paged cache has block tables, not slots")
        return self._get(seq_id, "slot").slot

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The block ids of ``seq_id`` in position order (paged layout)."""
        if not self.paged:
            raise InputError("KVCache.block_table: a contiguous cache has slots, not blocks")
        return list(self._get(seq_id, "block_table").blocks)

    def ref_count(self, block: int) -> int:
        """How many sequences hold ``block`` (paged layout; 0: free)."""
        if not self.paged:
            raise InputError("KVCache.ref_count: a contiguous cache has no blocks")
        return self.pool.ref_count(block)

    def cache_inputs(self) -> dict[str, torch.Tensor]:
        """The graph's cache inputs in order: ``k_cache_0, v_cache_0, k_cache_1, ...``."""
        out: dict[str, torch.Tensor] = {}
        for i in range(self.layers):
            out[f"k_cache_{i}"] = self.k[i]
            out[f"v_cache_{i}"] = self.v[i]
        return out

    def blocks_needed(self, items: Sequence[tuple[Hashable, int]]) -> int:
        """Free blocks ``prepare_step(items)`` would take (new and copy-on-write); 0 when
        contiguous. Validates ``items`` like prepare_step; changes nothing."""
        self._check_idle("blocks_needed")
        self._check_items(items, "blocks_needed")
        return sum(len(c) + n for _, c, n in self._plan(items))

    # -- sequences ------------------------------------------------------------------------

    def add(self, seq_id: Hashable, prompt_len: int, tokens: Sequence[int] | None = None) -> int:
        """Register ``seq_id`` and reserve room for its ``prompt_len`` tokens; returns its
        starting length ``c``: 0, or with prefix caching and the prompt's ``tokens``, how many
        of them cached blocks already hold (at most ``prompt_len - 1``: compute ``tokens[c:]``)."""
        self._check_new(seq_id, "add")
        self._check_n(prompt_len, "add", "prompt_len", seq_id)
        if prompt_len > self.max_seq_len:
            raise InputError(
                f"KVCache.add: prompt of sequence {seq_id!r} has {prompt_len} tokens, longer "
                f"than max_seq_len {self.max_seq_len}"
            )
        if tokens is not None:
            tokens = check_tokens(tokens, prompt_len, "add", seq_id)
        if self._prefix is not None:
            blocks, c = self._prefix.admit(seq_id, prompt_len, tokens, "add", self.num_blocks)
            self._seqs[seq_id] = s = SeqRecord(blocks=blocks)
            s.length = c
            return c
        if self.paged:
            need = math.ceil(prompt_len / self.block_size)
            free = self.pool.num_free
            if need > free:
                raise InputError(
                    f"KVCache.add: sequence {seq_id!r} needs {need} blocks for its "
                    f"{prompt_len} prompt tokens, {free} of {self.num_blocks} are free"
                )
            self._seqs[seq_id] = SeqRecord(blocks=self.pool.allocate(need))
        else:
            self._seqs[seq_id] = SeqRecord(slot=self._take_slot("add", seq_id))
        return 0

    def extend(self, seq_id: Hashable, n: int) -> None:
        """Reserve room for ``n`` more tokens of ``seq_id`` (its length does not change)."""
        s = self._get(seq_id, "extend")
        if s.pending:
            raise InputError(f"KVCache.extend: sequence {seq_id!r} is in a step in flight")
        self._check_n(n, "extend", "n", seq_id)
        self._check_room(seq_id, s, n, "extend")
        self._reserve([(seq_id, n)], "extend")

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Make ``child_id`` a copy of ``parent_id``'s cached tokens (paged: shares its blocks)."""
        parent = self._get(parent_id, "fork")
        self._check_new(child_id, "fork")
        if parent.pending:
            raise InputError(f"KVCache.fork: sequence {parent_id!r} is in a step in flight")
        if self.paged:
            shared = parent.blocks[: math.ceil(parent.length / self.block_size)]
            self.pool.share(shared)
            child = SeqRecord(blocks=list(shared))
            if self._prefix is not None:
                self._prefix.fork(parent_id, child_id)
        else:
            child = SeqRecord(slot=self._take_slot("fork", child_id))
            n = parent.length
            for t in self.k + self.v:
                src, dst = t[parent.slot], t[child.slot]
                if self.order == "token-major":
                    dst[:n].copy_(src[:n])
                else:
                    dst[:, :n].copy_(src[:, :n])
        child.length = parent.length
        self._seqs[child_id] = child

    def free(self, seq_id: Hashable) -> None:
        """Forget ``seq_id`` and give back its slot or its holds on blocks."""
        s = self._get(seq_id, "free")
        if s.pending:
            raise InputError(f"KVCache.free: sequence {seq_id!r} is in a step in flight")
        del self._seqs[seq_id]
        if self._prefix is not None:
            self._prefix.free(seq_id, s.blocks)
        elif self.paged:
            self.pool.release(s.blocks)
        else:
            heapq.heappush(self._free_slots, s.slot)

    def truncate(self, seq_id: Hashable, length: int) -> None:
        """Keep the first ``length`` cached tokens of ``seq_id`` (0 <= length <= its length):
        the rest are forgotten (e.g. rejected speculative tokens); paged: every block past
        ``ceil(length / block_size)`` is released, room reserved ahead included."""
        s = self._get(seq_id, "truncate")
        if s.pending:
            raise InputError(f"KVCache.truncate: sequence {seq_id!r} is in a step in flight")
        if isinstance(length, bool) or not isinstance(length, int) or not (
            0 <= length <= s.length
        ):
            raise InputError(
                f"KVCache.truncate: length of sequence {seq_id!r} must be an int in "
                f"0..{s.length} (its cached tokens), got {length!r}"
            )
        s.length = length
        if self._prefix is not None:
            self._prefix.truncate(seq_id, length)
        if self.paged:
            self._release_past(s)

    # -- steps ----------------------------------------------------------------------------

    def prepare_step(
        self, items: Sequence[tuple[Hashable, int]], tokens: Sequence[Sequence[int]] | None = None
    ) -> StepMeta:
        """Reserve room for a step of ``items`` = [(seq_id, n_new), ...] and return its
        metadata. ``tokens``: per item its n_new token ids (needed with prefix caching, to key
        the blocks the step fills). All checks run first; on any error nothing has changed."""
        self._check_idle("prepare_step")
        self._check_items(items, "prepare_step")
        if self._prefix is not None:
            step_tokens = self._check_step_tokens(items, tokens)
        self._reserve(items, "prepare_step")
        if self._prefix is not None:
            self._step_tokens = step_tokens
            for sid, n in items:
                s = self._seqs[sid]
                self._prefix.written(s.blocks, s.length, n)
        for sid, n in items:
            self._seqs[sid].pending = n
        self._step = [(sid, n) for sid, n in items]  # a private copy: the caller's may change
        return self._meta(self._step)

    def commit_step(self) -> None:
        """The step ran: each of its sequences now holds its new tokens."""
        if self._step is None:
            raise InputError("KVCache.commit_step: no step in flight (call prepare_step first)")
        for i, (sid, n) in enumerate(self._step):
            s = self._seqs[sid]
            if self._prefix is not None:
                self._prefix.commit(sid, s.blocks, self._step_tokens[i])
            s.length += n
            s.pending = 0
        self._step = self._step_tokens = None

    def abort_step(self) -> None:
        """The step did not run: lengths stay, blocks reserved beyond them are returned."""
        if self._step is None:
            raise InputError("KVCache.abort_step: no step in flight")
        for sid, _ in self._step:
            s = self._seqs[sid]
            s.pending = 0
            if self.paged:
                self._release_past(s)
        self._step = self._step_tokens = None

    def prefix_stats(self) -> dict[str, object]:
        """Prefix caching's counters (:meth:`PrefixCache.stats
        <transfuse.runtime.prefix_cache.PrefixCache.stats>`: queries, hits, hit_rate,
        tokens_saved, cached_blocks, evictions, ...) and ``enabled``; all 0 when it is off."""
        if self._prefix is None:
            return {"enabled": False, "queries": 0, "hits": 0, "partial_hits": 0,
                    "hit_rate": 0.0, "tokens_saved": 0, "cached_blocks": 0,
                    "cached_free_blocks": 0, "evictions": 0}
        return {"enabled": True, **self._prefix.stats()}

    # -- internals ------------------------------------------------------------------------

    def _plan(self, items: Sequence[tuple[Hashable, int]]) -> list[tuple[Hashable, list, int]]:
        """Per item: (seq_id, indices of shared blocks it will write, new blocks to append)."""
        if not self.paged:
            return []
        writes = [(self._seqs[sid].blocks, self._seqs[sid].length, n) for sid, n in items]
        plan = self.pool.plan_writes(writes, self.block_size)
        return [(sid, copies, new) for (sid, _), (copies, new) in zip(items, plan)]

    def _reserve(self, items: Sequence[tuple[Hashable, int]], where: str) -> None:
        plan = self._plan(items)
        need = sum(len(c) + n for _, c, n in plan)
        if need == 0:
            return
        free = self.pool.num_free
        if need > free:
            copies = sum(len(c) for _, c, _ in plan)
            raise InputError(
                f"KVCache.{where}: {'the step' if where == 'prepare_step' else 'this'} needs "
                f"{need} blocks ({need - copies} new, {copies} "
                f"copy-on-write) but {free} of {self.num_blocks} are free (block_size "
                f"{self.block_size}); free or preempt sequences, or raise num_blocks"
            )
        fresh = iter(self._prefix.allocate(need) if self._prefix else self.pool.allocate(need))
        for sid, copies, n_new in plan:
            s = self._seqs[sid]
            for j in copies:
                old, new = s.blocks[j], next(fresh)
                for t in self.k + self.v:
                    t[new].copy_(t[old])
                s.blocks[j] = new
                self.pool.release([old])
            s.blocks.extend(next(fresh) for _ in range(n_new))

    def _release_past(self, s: SeqRecord) -> None:
        """Paged: give back the blocks past ``s.length``'s last one."""
        keep = math.ceil(s.length / self.block_size)
        if self._prefix is not None:
            self._prefix.release(s.blocks[keep:])
        else:
            self.pool.release(s.blocks[keep:])
        del s.blocks[keep:]

    def _take_slot(self, where: str, seq_id: Hashable) -> int:
        if not self._free_slots:
            raise InputError(
                f"KVCache.{where}: no free slot for sequence {seq_id!r}: all max_batch "
                f"{self.max_batch} slots hold sequences"
            )
        return heapq.heappop(self._free_slots)

    def _meta(self, step: list[tuple[Hashable, int]]) -> StepMeta:
        rows = []
        for sid, n in step:
            s = self._seqs[sid]
            rows.append((sid, s.length, n, s.blocks if self.paged else s.slot))
        return StepMeta.build(rows, self.max_blocks if self.paged else None, self.device)

    def __repr__(self) -> str:
        used = (
            f"{self.pool.num_used}/{self.num_blocks} blocks of {self.block_size}"
            if self.paged
            else f"{len(self._seqs)}/{self.max_batch} slots of {self.max_seq_len}"
        )
        return (
            f"KVCache({self.layout}, {self.order}, {self.layers} layers, {self.shape}, "
            f"{str(self.dtype).removeprefix('torch.')}, {self.device}, {used}, "
            f"{self.nbytes} bytes)"
        )
