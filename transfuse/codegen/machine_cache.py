"""Where transfuse keeps what it learns about this machine, and how it names the machine.

Used by the python target's GEMM timing cache (``codegen/python/gemm_cache.py``) and the
native kernel build (``codegen/native``). ``$TRANSFUSE_CACHE_DIR`` overrides the default
``~/.cache/transfuse``; set to ``""`` it turns the on-disk caches off.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cache_root() -> Path | None:
    """The cache directory, or None when disabled (``TRANSFUSE_CACHE_DIR=""``)."""
    root = os.environ.get("TRANSFUSE_CACHE_DIR")
    if root is None:
        return Path.home() / ".cache" / "transfuse"
    return Path(root) if root else None


def cpuinfo(*fields: str) -> str:
    """The first line of each ``/proc/cpuinfo`` field named (values joined by "|"), else
    the platform's processor name."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in fields and name not in found:
                    found[name] = value.strip()
                if len(found) == len(fields):
                    break
    except OSError:
        pass
    if not found:
        return platform.processor() or platform.machine()
    return "|".join(found[f] for f in fields if f in found)


__all__ = ["cache_root", "cpuinfo"]
