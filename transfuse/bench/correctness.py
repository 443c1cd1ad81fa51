"""The correctness gate: every contestant is compared with the baseline before timing.

An output structure (a tensor, a tuple/list, a dict or a Hugging Face
``ModelOutput``, numpy arrays from ONNX Runtime) is flattened to a list of
tensors in order, ``None`` entries dropped. Each tensor pair is compared by the
relative error ``max|a - b| / max(max|b|, tiny)`` with ``b`` the reference; the
worst pair decides. A shape or count mismatch, or a NaN where the reference has
none, is an infinite error. Tolerances: fp32 1e-4 (BENCHMARKING.md); half
precision gets a looser default, and a contestant may declare its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

TINY = 1e-12

#: default max relative error by compute dtype
DEFAULT_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float64: 1e-8,
    torch.bfloat16: 3e-2,
    torch.float16: 1e-2,
}


def default_tolerance(dtype: torch.dtype) -> float:
    return DEFAULT_TOLERANCE.get(dtype, 1e-4)


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of an output structure, in order (dict/ModelOutput by key order)."""
    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, np.ndarray):
        return [torch.from_numpy(np.ascontiguousarray(out))]
    if isinstance(out, Mapping) or hasattr(out, "to_tuple"):  # ModelOutput is an OrderedDict
        values = out.values() if isinstance(out, Mapping) else out.to_tuple()
        return [t for v in values for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    if isinstance(out, (int, float, bool)):
        return [torch.tensor(out)]
    raise TypeError(f"cannot compare an output of type {type(out).__name__}")


@dataclasses.dataclass(frozen=True)
class Check:
    """The verdict of one comparison: ``ok`` when ``max_rel_err <= tolerance``."""

    ok: bool
    max_rel_err: float
    max_abs_err: float
    tolerance: float
    detail: str = ""

    def describe(self) -> str:
        if self.detail:
            return self.detail
        return f"max rel err {self.max_rel_err:.2e} (tolerance {self.tolerance:.0e})"


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max relative error, max absolute error) of ``actual`` against ``expected``."""
    a = actual.detach().to("cpu", torch.float64)
    b = expected.detach().to("cpu", torch.float64)
    if a.numel() == 0:
        return 0.0, 0.0
    diff = (a - b).abs()
    # NaN/inf where the reference is finite is a wrong answer; matching non-finite values are not
    same_nonfinite = (~torch.isfinite(b)) & ((a == b) | (a.isnan() & b.isnan()))
    diff = torch.where(same_nonfinite, torch.zeros_like(diff), diff)
    diff = torch.where(diff.isnan(), torch.full_like(diff, math.inf), diff)
    finite_b = b[torch.isfinite(b)]
    scale = max(finite_b.abs().max().item() if finite_b.numel() else 0.0, TINY)
    abs_err = diff.max().item()
    return abs_err / scale, abs_err


def compare(actual: Any, expected: Any, tolerance: float) -> Check:
    """Compare two output structures; the worst tensor pair decides."""
    try:
        got, want = flatten_outputs(actual), flatten_outputs(expected)
    except TypeError as e:
        return Check(False, math.inf, math.inf, tolerance, str(e))
    if len(got) != len(want):
        return Check(False, math.inf, math.inf, tolerance,
                     f"{len(got)} outputs, expected {len(want)}")
    worst_rel = worst_abs = 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        if tuple(a.shape) != tuple(b.shape):
            return Check(False, math.inf, math.inf, tolerance,
                         f"output {i} has shape {tuple(a.shape)}, expected {tuple(b.shape)}")
        rel, abs_ = max_rel_err(a, b)
        worst_rel, worst_abs = max(worst_rel, rel), max(worst_abs, abs_)
    return Check(worst_rel <= tolerance, worst_rel, worst_abs, tolerance)
