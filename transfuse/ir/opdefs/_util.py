"""Small helpers for op definitions (type inference and costs)."""

from __future__ import annotations

import torch

from transfuse.errors import IRVerifyError
from transfuse.ir.types import Dim, DType, TensorType, broadcast_shapes, normalize_dim


def in_type(node, i: int) -> TensorType:
    return node.inputs[i].type


def result_dtype(*types: TensorType) -> DType:
    """torch's promotion rules; 0-d tensors participate like torch's 0-d tensors."""
    probes = [torch.empty(() if t.rank == 0 else (1,) * t.rank, dtype=t.dtype.torch) for t in types]
    out = probes[0]
    for p in probes[1:]:
        out = torch.empty((), dtype=torch.result_type(out, p)) if out.dim() == 0 and p.dim() == 0 else \
            torch.empty((1,), dtype=torch.result_type(out, p))
    return DType.from_torch(out.dtype)


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
