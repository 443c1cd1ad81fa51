"""Size limits for tensors a compile step materialises itself (frontend constants such as an
ONNX ``Range`` or ``ConstantOfShape``, folded constants), so that a hostile or broken model is
refused with a clear reason before anything is allocated.

:data:`MAX_TENSOR_BYTES` is the default limit for one tensor (2 GiB). It can be changed
without code changes by the environment variable ``TRANSFUSE_MAX_TENSOR_BYTES`` (bytes), or
for a block of code with ``with tensor_limit(nbytes): ...``. Callers ask
:func:`oversize_reason` and raise their own typed error (``CaptureError`` in a frontend,
naming the node), so the message says what, where and how large.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from transfuse.ir.types import DType

#: default bytes of one tensor a compile step may materialise
MAX_TENSOR_BYTES = 2 * 1024**3
#: environment variable that overrides :data:`MAX_TENSOR_BYTES` (a number of bytes)
ENV_VAR = "TRANSFUSE_MAX_TENSOR_BYTES"

_override: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "transfuse_max_tensor_bytes", default=None
)


def max_tensor_bytes() -> int:
    """The limit in force: a :func:`tensor_limit` block, else the environment, else default."""
    limit = _override.get()
    if limit is not None:
        return limit
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"{ENV_VAR}={env!r} is not a number of bytes") from None
        if value < 0:
            raise ValueError(f"{ENV_VAR}={env!r} must not be negative")
        return value
    return MAX_TENSOR_BYTES


@contextlib.contextmanager
def tensor_limit(nbytes: int) -> Iterator[None]:
    """Use ``nbytes`` as the limit inside the ``with`` block (this thread / task only)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"tensor_limit takes a non-negative int of bytes, got {nbytes!r}")
    token = _override.set(nbytes)
    try:
        yield
    finally:
        _override.reset(token)


def tensor_bytes(numel: int, dtype: DType) -> int:
    """Bytes of a dense tensor of ``numel`` elements of ``dtype``."""
    return numel * dtype.itemsize


def oversize_reason(numel: int, dtype: DType) -> str | None:
    """Why a tensor of ``numel`` elements of ``dtype`` may not be materialised, or None."""
    nbytes = tensor_bytes(numel, dtype)
    limit = max_tensor_bytes()
    if nbytes <= limit:
        return None
    return (
        f"it would materialise {numel} elements of {dtype} = {nbytes} bytes "
        f"({nbytes / 2**30:.1f} GiB), above the limit of {limit} bytes for one tensor "
        f"(raise it with {ENV_VAR} or transfuse.ir.limits.tensor_limit if this is intended)"
    )


__all__ = ["MAX_TENSOR_BYTES", "ENV_VAR", "max_tensor_bytes", "tensor_limit", "tensor_bytes",
           "oversize_reason"]
