"""GEMM timings of the python target, kept across processes (the disk half of ``gemm_timing.py``).

Timing both libraries costs ~0.6-0.9 s on the first compile of a small model; the answer
is a property of the machine and the libraries, not of the model. So timings are stored
in ``$TRANSFUSE_CACHE_DIR/gemm-timings-v1.json`` (default ``~/.cache/transfuse``), under
a fingerprint of what decides them: CPU model, torch, numpy and OpenBLAS versions,
thread count. A different machine or library build never reads another's entries.

The file is plain JSON, only numbers are read from it (checked: finite and positive), and
it is written atomically (temporary file + ``os.replace``). A missing, unreadable, corrupt
or unwritable file is never an error: the target times again and ``layout.select-gemm``
says so in its log. ``TRANSFUSE_CACHE_DIR=""`` (empty) or the option
``select_gemm_cache=False`` turns the file off; the in-process memo stays.

Entries are pairs of seconds: (torch, OpenBLAS) for a GEMM shape, and under keys starting
``quant|`` (``quant_timing.py``) (quantized kernel, f32 F.linear) for a quantized linear's
candidate kernel at a row count.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import torch

from transfuse.codegen.machine_cache import cache_root, cpuinfo

logger = logging.getLogger(__name__)

FILENAME = "gemm-timings-v1.json"
#: entries kept per fingerprint (oldest dropped first)
MAX_ENTRIES = 4096


def cache_path() -> Path | None:
    """Where the file lives, or None when disabled (``TRANSFUSE_CACHE_DIR=""``)."""
    root = cache_root()
    return None if root is None else root / FILENAME


_FINGERPRINTS: dict[int, str] = {}


def fingerprint() -> str:
    """What the timings depend on besides the shape (computed once per thread count)."""
    threads = torch.get_num_threads()
    if threads not in _FINGERPRINTS:
        _FINGERPRINTS[threads] = _fingerprint(threads)
    return _FINGERPRINTS[threads]


def _fingerprint(threads: int) -> str:
    import numpy as np

    blas = "?"
    try:
        from threadpoolctl import threadpool_info

        blas = ",".join(sorted(f"{i.get('internal_api')}-{i.get('version')}"
                               for i in threadpool_info() if i.get("user_api") == "blas"))
    except Exception:  # noqa: BLE001 - the version is only a key component
        pass
    return (f"{cpuinfo('model name')}|torch-{torch.__version__}|numpy-{np.__version__}|{blas}|"
            f"threads-{threads}")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable GEMM timing cache %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _valid(entry) -> tuple[float, float] | None:
    if (isinstance(entry, list) and len(entry) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in entry)
            and all(math.isfinite(x) and x > 0 for x in entry)):
        return float(entry[0]), float(entry[1])
    return None


def load(key: str) -> tuple[float, float] | None:
    """(torch seconds, blas seconds) stored for this machine and ``key``, if any."""
    path = cache_path()
    if path is None:
        return None
    table = _read(path).get(fingerprint())
    return _valid(table.get(key)) if isinstance(table, dict) else None


def store(key: str, torch_s: float, blas_s: float) -> bool:
    """Add one timing; True when the file was written."""
    path = cache_path()
    if path is None:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        fp = fingerprint()
        table = data.get(fp)
        if not isinstance(table, dict):
            table = {}
        table.pop(key, None)
        table[key] = [torch_s, blas_s]
        while len(table) > MAX_ENTRIES:
            table.pop(next(iter(table)))
        data[fp] = table
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".gemm-timings-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=0)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return True
    except OSError as e:
        logger.warning("could not write GEMM timing cache %s: %s", path, e)
        return False


__all__ = ["cache_path", "fingerprint", "load", "store", "FILENAME"]
