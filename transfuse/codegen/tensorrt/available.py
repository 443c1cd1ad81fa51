"""The one import check for TensorRT. Everything that needs TensorRT calls `tensorrt_unavailable()`."""

from __future__ import annotations

import functools

MIN_TENSORRT_MAJOR = 10


@functools.cache
def tensorrt_unavailable() -> str | None:
    """None when TensorRT (>= 10) and a CUDA device are usable here, else why not (one line)."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except Exception as e:  # ImportError, or a broken install raising anything on import
        return f"TensorRT is not installed (import tensorrt failed: {type(e).__name__}: {e})"
    if not all(hasattr(trt, name) for name in ("Builder", "Runtime", "OnnxParser")):
        # e.g. a directory named tensorrt (no __init__.py) on sys.path imports as an empty
        # namespace package
        where = getattr(trt, "__file__", None) or list(getattr(trt, "__path__", []))
        return (f"TensorRT is not installed ('import tensorrt' found {where}, which has no "
                "Builder/Runtime/OnnxParser)")
    version = str(getattr(trt, "__version__", "") or "")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return f"TensorRT's version {version!r} is unreadable (need >= {MIN_TENSORRT_MAJOR})"
    if major < MIN_TENSORRT_MAJOR:
        return f"TensorRT {version} is too old (need >= {MIN_TENSORRT_MAJOR})"
    try:
        import torch  # noqa: PLC0415

        has_cuda = torch.cuda.is_available()
    except Exception as e:
        return f"no CUDA device to run TensorRT on (torch.cuda failed: {e})"
    if not has_cuda:
        return f"TensorRT {version} is installed but there is no CUDA device"
    return None
