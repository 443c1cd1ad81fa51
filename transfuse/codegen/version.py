"""The installed transfuse version, as recorded in what transfuse writes (ONNX models,
artifacts).

Read from the package metadata (``pyproject.toml``'s ``version``) rather than from
``transfuse.__version__``: codegen and runtime may not import the top-level package,
whose lazy attributes import them back (DESIGN.md §2).
"""

from __future__ import annotations

import functools
from importlib import metadata


@functools.cache
def transfuse_version() -> str:
    """``"0.1.0"``-style version of the installed package; ``"unknown"`` when transfuse runs
    from a source tree that was never installed."""
    try:
        return metadata.version("transfuse")
    except metadata.PackageNotFoundError:
        return "unknown"


__all__ = ["transfuse_version"]
