"""Small helpers for op definitions (type inference and costs)."""

from __future__ import annotations

from transfuse.errors import IRVerifyError
from transfuse.ir.types import (  # noqa: F401  (result_dtype: re-exported for opdefs)
    Dim,
    DType,
    TensorType,
    broadcast_shapes,
    normalize_dim,
    result_dtype,
)


def in_type(node, i: int) -> TensorType:
    return node.inputs[i].type


def broadcast(node, *indices: int) -> tuple[Dim, ...]:
    idx = indices or range(len(node.inputs))
    shapes = [node.inputs[i].type.shape for i in idx if node.inputs[i] is not None]
    try:
        return broadcast_shapes(*shapes)
    except IRVerifyError as e:
        raise IRVerifyError(f"{node.op}: {e}") from None


def norm_axis(axis: int, rank: int, where: str) -> int:
    if not -max(rank, 1) <= axis < max(rank, 1):
        raise IRVerifyError(f"{where}: axis {axis} out of range for rank {rank}")
    return axis % max(rank, 1)


def numel(t: TensorType) -> Dim:
    return t.numel()


def add_dims(*ds: Dim) -> Dim:
    total: Dim = 0
    for d in ds:
        total = total + d
    return normalize_dim(total) if not isinstance(total, int) else total
