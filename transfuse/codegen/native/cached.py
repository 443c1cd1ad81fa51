"""torch-facing wrapper of the native ``cached_attention`` read (``cached_attention.c``).

The python target's kernel (``codegen/python/generation.py``) writes a step's K/V rows into
the caches, then calls :func:`cached_attention_read`: every step token attends over its own
sequence's visible cache entries, read in place (contiguous slots or paged blocks, token- or
head-major), with GQA, a sliding window, ALiBi and softcap. None when the kernel does not
apply; the caller then runs its torch path (gather + SDPA), which computes the same function.

Threads: the work is split over (run of tokens, group of kv heads) units with
:func:`transfuse.codegen.native.run_split`; a run is at most :data:`MAX_RUN` consecutive
tokens of one sequence (:func:`token_runs`), so the tokens of a prompt chunk share each K/V
tile the kernel loads. A unit takes all kv heads of its run unless there are fewer runs than
threads: then the heads are split into as many groups as the threads need. All heads of a
run in one unit read each cache row (the Hkv heads of a position are adjacent) from start to
end instead of one head's slice of it per unit: measured 0.65-0.85x the time of one kv head
per unit (GPT-2 shapes, decode B = 1..16, T = 256..1024, 1 thread).

Glossary: N step tokens, B step sequences, H query heads, Hkv kv heads, D key head dim,
Dv value head dim, A cache slots or blocks, L slot length or block size, W block-table width.
"""

from __future__ import annotations

import functools
import math

import torch

from transfuse.codegen import native
from transfuse.errors import InputError

#: tokens per work unit at most: must equal QMAX in cached_attention.c
MAX_RUN = 8


def token_runs(seq_of_token: torch.Tensor, max_run: int = MAX_RUN) -> torch.Tensor:
    """i64 [U + 1]: the starts of the step's runs of at most ``max_run`` consecutive tokens of
    one sequence, then N (token t of run u: ``runs[u] <= t < runs[u + 1]``)."""
    n = seq_of_token.shape[0]
    t = torch.arange(n, device=seq_of_token.device)
    new_seq = torch.ones(n, dtype=torch.bool, device=t.device)
    new_seq[1:] = seq_of_token[1:] != seq_of_token[:-1]
    seq_start = torch.where(new_seq, t, 0).cummax(0).values  # first token of t's sequence run
    starts = t[(t - seq_start) % max_run == 0]
    return torch.cat([starts, t.new_tensor([n])])


@functools.lru_cache(maxsize=64)
def _slopes(alibi: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(alibi, dtype=torch.float32)


def _metadata_ok(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.int64 and t.device.type == "cpu" and t.is_contiguous()
               for t in tensors)


def cached_attention_read(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          position_ids: torch.Tensor, seq_of_token: torch.Tensor,
                          cache_table: torch.Tensor, runs: torch.Tensor, *,
                          scale: float | None, window: int | None,
                          alibi: tuple[float, ...] | None, softcap: float | None,
                          block_size: int | None) -> torch.Tensor | None:
    """[N, H, Dv]: token t's attention over its sequence's cache entries j,
    max(0, p - window + 1) <= j <= p (p = position_ids[t]), read in place.

    q [N, H, D] (any strides, D contiguous); k_cache, v_cache: token-major views
    [A, L, Hkv, D|Dv] (a head-major cache's transpose is fine); cache_table i64 [B] (slots)
    or [B, W] (blocks of ``block_size`` tokens, -1 past a sequence's length); ``runs`` from
    :func:`token_runs`. None when the kernel does not apply (not fp32 CPU, head dims not a
    multiple of 8, no native library, ...).
    """
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        return None
    n, h, d = q.shape
    a, length, hkv, dk = k_cache.shape
    dv = v_cache.shape[3]
    paged = block_size is not None
    if (n < 1 or position_ids.shape != (n,) or seq_of_token.shape != (n,)
            or hkv < 1 or h % hkv or dk != d or d % 8 or dv % 8
            or v_cache.shape[:3] != k_cache.shape[:3]
            or cache_table.dim() != (2 if paged else 1)
            or (paged and (block_size != length or cache_table.shape[1] < 1))
            or (alibi is not None and len(alibi) != h)
            or (window is not None and window < 1) or (softcap is not None and softcap <= 0)
            or not _metadata_ok(position_ids, seq_of_token, cache_table, runs)
            or not native.usable(q, k_cache, v_cache)):
        return None
    out = torch.empty((n, h, dv), dtype=torch.float32)
    slopes = None if alibi is None else _slopes(tuple(float(x) for x in alibi))
    sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
    nruns = runs.shape[0] - 1
    # a unit takes every kv head of its run (each cache row read start to end) unless the
    # threads need more units than there are runs
    groups = min(hkv, -(-torch.get_num_threads() // nruns))
    per_unit = -(-hkv // groups)
    lib = native.library()
    try:
        native.run_split(lib.tf_cached_attention_f32, nruns * -(-hkv // per_unit),
                         n, h, hkv, d, dv, sc,
                         window or 0, softcap or 0.0,
                         None if slopes is None else slopes.data_ptr(),
                         q.data_ptr(), q.stride(0), q.stride(1),
                         k_cache.data_ptr(), *k_cache.stride()[:3],
                         v_cache.data_ptr(), *v_cache.stride()[:3],
                         a, length, position_ids.data_ptr(), seq_of_token.data_ptr(),
                         cache_table.shape[0], cache_table.data_ptr(),
                         cache_table.shape[1] if paged else 0, block_size or 0,
                         runs.data_ptr(), nruns, per_unit, out.data_ptr(), out.stride(0), out.stride(1))
    except RuntimeError as e:  # code 3: metadata outside the cache; 1, 2: arguments, memory
        raise InputError(
            f"cached_attention (native read, {n} tokens, cache {tuple(k_cache.shape)}): {e}; "
            "code 3 means the step's metadata points outside the cache: a sequence index past "
            "cache_table, a slot or position past the cache, or a visible block id of -1 or "
            "past the pool") from e
    return out


__all__ = ["cached_attention_read", "token_runs", "MAX_RUN"]
