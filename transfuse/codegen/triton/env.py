"""Where the triton target's kernels run: a CUDA GPU, or Triton's interpreter on the CPU.

Triton decides at ``@triton.jit`` time whether a function is compiled for a GPU or
interpreted (``TRITON_INTERPRET=1``: every program runs as NumPy on CPU tensors). So this
module is imported before any kernel module of ``transfuse.codegen.triton`` and fixes the
mode for the process: without a CUDA device and without ``TRITON_INTERPRET`` in the
environment it sets ``TRITON_INTERPRET=1`` (the only way the kernels can run here); with one
it leaves the environment alone. A process that wants the GPU compiler without a GPU (the
compile checks of :mod:`transfuse.codegen.triton.compile_check`) runs in a subprocess
started with ``TRITON_INTERPRET=0``.

Facts about the interpreter (triton 3.9, measured here; the issue lists them):

- bf16 ``tl.dot`` and bf16 arithmetic are wrong (triton#11584): kernels upcast to fp32
  after loading when :func:`interpreting` (``INTERPRET`` constexpr below).
- libdevice functions return None: build tanh from sigmoid.
- each program costs ~2 ms: tests keep shapes small.
- ``OPENBLAS_NUM_THREADS=1`` (OpenBLAS threads fight torch's on 2 cores).
"""

from __future__ import annotations

import importlib.util
import os

#: the Triton versions the kernels are written for (3.9 here, 3.6 in the GPU image)
SUPPORTED = ((3, 6), (3, 9))


def _cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


if "TRITON_INTERPRET" not in os.environ and not _cuda():
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def interpreting() -> bool:
    """True when kernels run in Triton's interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def triton_unavailable() -> str | None:
    """Why the triton target cannot run here (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'triton>=3.6')"
    import triton

    try:
        major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:
        return f"unrecognised triton version {triton.__version__!r}"
    if (major, minor) < SUPPORTED[0]:
        return (f"triton {triton.__version__} is older than "
                f"{SUPPORTED[0][0]}.{SUPPORTED[0][1]}, the oldest the kernels are written for")
    return None


def device() -> str:
    """The torch device kernels run on: ``cuda`` on a GPU, ``cpu`` in the interpreter."""
    return "cpu" if interpreting() else "cuda"


__all__ = ["interpreting", "triton_unavailable", "device", "SUPPORTED"]
