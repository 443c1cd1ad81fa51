"""What machine and software a benchmark ran on (recorded in every results.json).

CPU model and the ISA flags that matter for Transformer kernels (AVX2, AVX-512*,
AMX, FMA, F16C), logical cores, the thread count used, library versions and the
git commit of the transfuse checkout when there is one.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

#: flags kept from /proc/cpuinfo: exact names, and prefixes for the AVX-512 / AMX families
_FLAGS_EXACT = ("avx", "avx2", "fma", "f16c", "avx_vnni")
_FLAGS_PREFIX = ("avx512", "amx")
_LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxscript", "transformers", "numpy", "transfuse")


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as a dict (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """The ISA flags relevant to us (AVX2, AVX-512*, AMX, ...), sorted."""
    flags = set(_cpuinfo().get("flags", "").split())
    keep = {f for f in flags if f in _FLAGS_EXACT or f.startswith(_FLAGS_PREFIX)}
    return sorted(keep)


def machine_slug() -> str:
    """A short, hostname-free name for the CPU: "AMD EPYC 7B13" -> "amd-epyc-7b13"."""
    name = cpu_model()
    name = re.sub(r"\((?:R|TM|tm|r)\)", " ", name)
    name = re.sub(r"@.*$", " ", name)  # clock speed
    name = re.sub(r"\b(?:CPU|Processor|\d+-Core)\b", " ", name, flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:40].rstrip("-") or platform.machine().lower() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    versions.update({lib: _version(lib) for lib in _LIBRARIES})
    versions["torch"] = torch.__version__
    return versions


def git_commit() -> str | None:
    """The commit of the transfuse checkout (with "-dirty" if it has local changes)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty.strip() else sha


def machine_info(threads: int, device: str = "cpu") -> dict[str, Any]:
    """Everything results.json records about where it ran."""
    info: dict[str, Any] = {
        "slug": machine_slug(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "device": device,
        "versions": library_versions(),
        "git_commit": git_commit(),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}",
                       "cuda": torch.version.cuda}
    return info
