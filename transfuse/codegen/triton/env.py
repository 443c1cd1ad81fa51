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
  after loading. fp32 -> bf16 casts round toward zero (one bf16 ulp off torch's
  round-to-nearest): bf16 tolerances in the tests allow it.
- triton's own library functions (``tl.sum``, ``tl.max``) are ``@triton.jit`` functions
  decorated when triton is first imported: the mode must be set before ANY import of triton
  in the process (tests/conftest.py imports this module first; :func:`triton_unavailable`
  says so when triton came first in the wrong mode).
- libdevice functions return None: build tanh from sigmoid.
- each program costs ~2 ms: tests keep shapes small.
- ``OPENBLAS_NUM_THREADS=1`` (OpenBLAS threads fight torch's on 2 cores).
"""

from __future__ import annotations

import importlib.util
import os
import sys

#: the Triton versions the kernels are written for (3.9 here, 3.6 in the GPU image)
SUPPORTED = ((3, 6), (3, 9))


def _cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def _triton_mode() -> str | None:
    """``"interpret"`` / ``"compile"``: how an already imported triton decorated its own
    library functions (``tl.sum`` & co. are ``@triton.jit`` functions too); None when triton
    is not imported yet."""
    core = sys.modules.get("triton.language")
    if core is None:
        return None
    return "interpret" if type(core.sum).__name__ == "InterpretedFunction" else "compile"


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
    mode = _triton_mode()
    if mode is not None and (mode == "interpret") != interpreting():
        return (f"triton was imported before transfuse.codegen.triton with "
                f"TRITON_INTERPRET={'1' if mode == 'interpret' else 'unset/0'}, and its own "
                f"library functions (tl.sum, tl.max, ...) are fixed in that mode; this process "
                f"needs {'the interpreter (no CUDA device)' if interpreting() else 'the GPU'}: "
                f"set TRITON_INTERPRET={'1' if interpreting() else '0'} before anything imports "
                f"triton, or import transfuse.codegen.triton first")
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
