"""What a KV cache takes: dtype and device names, its shape and bytes, the memory available.

:func:`available_memory` is asked *before* a cache is allocated so that one that would not fit
is refused with the numbers instead of being half-allocated or swapping the machine:
CPU: ``MemAvailable`` of ``/proc/meminfo`` (else ``os.sysconf`` free pages), lowered to what
the cgroup (container) limit leaves; CUDA: ``torch.cuda.mem_get_info``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from transfuse.errors import InputError

#: dtype names a cache accepts (the CLI's short names and torch's own)
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
}
#: device types a cache can live on (meta: shapes only, no memory; for planning)
DEVICE_TYPES = ("cpu", "cuda", "meta")

_CGROUP_FILES = (  # (limit, usage): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from a dtype or one of :data:`DTYPES`' names."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InputError(f"KV cache dtype must be a floating type, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise InputError(f"KV cache dtype {dtype!r} unknown; one of {sorted(DTYPES)}")


def parse_device(device: torch.device | str) -> torch.device:
    """A torch device of :data:`DEVICE_TYPES` that exists on this machine."""
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except (RuntimeError, ValueError):
            raise InputError(
                f"KV cache device {device!r} is not a device name (e.g. 'cpu', 'cuda:0')"
            ) from None
    if not isinstance(device, torch.device):
        raise InputError(f"KV cache device must be a str or torch.device, got {device!r}")
    if device.type not in DEVICE_TYPES:
        raise InputError(f"KV cache device {str(device)!r}: type not one of {DEVICE_TYPES}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if device.index is None else device.index
        if index >= count:
            raise InputError(
                f"KV cache device {str(device)!r}: this machine has {count} CUDA device(s)"
            )
    return device


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def _cpu_available() -> int | None:
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        available = None
    if available is None and hasattr(os, "sysconf"):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            available = None
    for limit_file, usage_file in _CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**62:
            left = max(0, limit - usage)
            available = left if available is None else min(available, left)
            break
    return available


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``; None where it cannot be known."""
    if device.type == "cpu":
        return _cpu_available()
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def cache_shape(layout: str, order: str, kv_heads: int, head_dim: int, *, max_seq_len: int,
                max_batch: int, block_size: int = 16,
                num_blocks: int | None = None) -> tuple[int, int, int, int]:
    """One layer's K (or V) cache shape for KVCache's arguments (taken as valid; the paged
    default ``num_blocks`` is ``max_batch x ceil(max_seq_len / block_size)``)."""
    if layout == "paged":
        rows = num_blocks or max_batch * math.ceil(max_seq_len / block_size)
        cols = block_size  # [NB, BS, ...]
    else:
        rows, cols = max_batch, max_seq_len  # [M, S, ...]
    if order == "token-major":
        return (rows, cols, kv_heads, head_dim)
    return (rows, kv_heads, cols, head_dim)


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype | str) -> int:
    """Bytes of one token's K and V in every layer."""
    itemsize = torch.empty((), dtype=parse_dtype(dtype)).element_size()
    return 2 * layers * kv_heads * head_dim * itemsize


def memory_report(cache: Any) -> dict[str, object]:
    """A KVCache's memory, from its public state: bytes in all, per token and in use; the
    sequences and their tokens; paged: blocks used/free/shared, bytes per block, and
    ``waste_tokens`` (room in used blocks that holds no token; a shared block counts once);
    contiguous: slots used/free."""
    seqs = cache.seq_ids()
    report: dict[str, object] = {
        "layout": cache.layout,
        "order": cache.order,
        "dtype": str(cache.dtype).removeprefix("torch."),
        "device": str(cache.device),
        "bytes": cache.nbytes,
        "bytes_per_token": cache.bytes_per_token,
        "capacity_tokens": cache.num_blocks * cache.block_size,
        "sequences": len(seqs),
        "tokens": sum(cache.length(s) for s in seqs),
    }
    if not cache.paged:
        used = len(seqs)
        return report | {"slots_total": cache.max_batch, "slots_used": used,
                         "slots_free": cache.max_batch - used,
                         "bytes_used": used * cache.max_seq_len * cache.bytes_per_token}
    bs, pool = cache.block_size, cache.pool
    fill: dict[int, int] = {}  # tokens stored in each used block
    for s in seqs:
        length = cache.length(s)
        for j, b in enumerate(cache.block_table(s)):
            fill[b] = max(fill.get(b, 0), min(bs, max(0, length - j * bs)))
    return report | {
        "block_size": bs,
        "bytes_per_block": cache.bytes_per_token * bs,
        "blocks_total": pool.num_blocks,
        "blocks_used": pool.num_used,
        "blocks_free": pool.num_free,
        "blocks_shared": sum(1 for b in fill if pool.ref_count(b) > 1),
        "bytes_used": pool.num_used * bs * cache.bytes_per_token,
        "waste_tokens": pool.num_used * bs - sum(fill.values()),
    }


def human_bytes(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit that keeps it >= 1 (``1.5 GiB``)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def check_fits(what: str, nbytes: int, device: torch.device, sizes: str, advice: str) -> None:
    """Raise InputError when ``nbytes`` exceed the memory available on ``device``; ``sizes``
    says how the bytes come about, ``advice`` what to lower. Call it before allocating."""
    available = available_memory(device)
    if available is not None and nbytes > available:
        raise InputError(
            f"{what}: {nbytes} bytes ({human_bytes(nbytes)}: {sizes}) do not fit in the "
            f"{available} bytes ({human_bytes(available)}) available on {device}; {advice}"
        )
