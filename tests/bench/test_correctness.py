"""The correctness gate's comparison: relative error, structures, shapes, NaN."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

from transfuse.bench.correctness import compare, default_tolerance, flatten_outputs, max_rel_err


def test_relative_error_is_scaled_by_the_reference_max():
    ref = torch.tensor([10.0, -20.0, 5.0], dtype=torch.float64)
    rel, abs_ = max_rel_err(ref + torch.tensor([0.0, 0.002, 0.0], dtype=torch.float64), ref)
    assert abs_ == pytest.approx(0.002, rel=1e-4)
    assert rel == pytest.approx(0.002 / 20.0, rel=1e-4)


def test_compare_passes_within_tolerance_and_fails_beyond():
    ref = torch.randn(2, 3, 8)
    assert compare(ref + 1e-6, ref, 1e-4).ok
    bad = compare(ref + 1.0, ref, 1e-4)
    assert not bad.ok and bad.max_rel_err > 1e-2
    assert "tolerance" in bad.describe()


def test_zero_reference_uses_a_tiny_floor_not_a_division_by_zero():
    assert compare(torch.zeros(4), torch.zeros(4), 1e-4).ok
    assert not compare(torch.full((4,), 1e-3), torch.zeros(4), 1e-4).ok


def test_structures_flatten_in_order():
    a, b = torch.ones(2), torch.zeros(3)
    out = OrderedDict(logits=a, past=None, hidden=(b,))
    assert [t.shape for t in flatten_outputs(out)] == [(2,), (3,)]
    # numpy outputs (ONNX Runtime) compare against tensors
    assert compare([np.ones(2, np.float32), np.zeros(3, np.float32)], out, 1e-4).ok


def test_shape_count_and_nan_mismatches_are_wrong():
    ref = torch.ones(2, 3)
    shape = compare(torch.ones(3, 2), ref, 1e-4)
    assert not shape.ok and "shape" in shape.detail
    count = compare((ref, ref), ref, 1e-4)
    assert not count.ok and "2 outputs, expected 1" in count.detail
    nan = compare(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]), 1e-4)
    assert not nan.ok and math.isinf(nan.max_rel_err)
    # the same -inf where the reference has it (a masked score) is not an error
    assert compare(torch.tensor([1.0, -math.inf]), torch.tensor([1.0, -math.inf]), 1e-4).ok


def test_default_tolerances():
    assert default_tolerance(torch.float32) == 1e-4
    assert default_tolerance(torch.bfloat16) > default_tolerance(torch.float16) > 1e-4
