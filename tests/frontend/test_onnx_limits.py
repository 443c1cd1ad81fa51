"""Hostile ONNX files: constants the frontend would materialise above the size limit of
``transfuse.ir.limits`` (a 16 GiB Range, a ConstantOfShape / Expand / Tile of a huge static
shape) are refused before anything is allocated, with a CaptureError naming the node and the
bytes. The limit can be lowered for a block or through the environment."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from transfuse.errors import CaptureError
from transfuse.frontend.onnx import capture_onnx
from transfuse.ir import limits

F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits=None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "hostile",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in (inits or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _range(limit: int, dtype=np.float32) -> onnx.ModelProto:
    node = helper.make_node("Range", ["start", "limit", "delta"], ["y"], name="huge_range")
    inits = {"start": np.array(0, dtype), "limit": np.array(limit, dtype),
             "delta": np.array(1, dtype)}
    return _model([node], [], [("y", F32, None)], inits)


def test_a_16_gib_range_is_refused_naming_the_node_and_the_bytes():
    with pytest.raises(CaptureError, match=r"huge_range.*17179869184 bytes"):
        capture_onnx(_range(2**32))


def test_constant_of_shape_of_a_huge_static_shape_is_refused():
    shape = np.array([2**20, 2**13], dtype=np.int64)  # 2**33 f32 = 32 GiB
    node = helper.make_node("ConstantOfShape", ["shape"], ["y"], name="zeros",
                            value=numpy_helper.from_array(np.array([0.0], np.float32)))
    with pytest.raises(CaptureError, match=r"zeros.*34359738368 bytes"):
        capture_onnx(_model([node], [], [("y", F32, None)], {"shape": shape}))


def test_expand_of_a_constant_to_a_huge_shape_is_refused():
    node = helper.make_node("Expand", ["one", "shape"], ["y"], name="big_expand")
    inits = {"one": np.ones([1, 3], np.float32),
             "shape": np.array([2**31, 3], dtype=np.int64)}
    with pytest.raises(CaptureError, match=r"big_expand.*25769803776 bytes"):
        capture_onnx(_model([node], [], [("y", F32, None)], inits))


def test_tile_of_a_constant_by_huge_repeats_is_refused():
    node = helper.make_node("Tile", ["c", "reps"], ["y"], name="big_tile")
    inits = {"c": np.arange(2048, dtype=np.float32), "reps": np.array([2**22], np.int64)}
    with pytest.raises(CaptureError, match=r"big_tile.*34359738368 bytes"):
        capture_onnx(_model([node], [], [("y", F32, None)], inits))


def test_expanding_an_input_is_not_a_constant_and_is_kept():
    # the same broadcast of run-time data is an IR expand, not a constant made at capture
    node = helper.make_node("Expand", ["x", "shape"], ["y"], name="expand_input")
    model = _model([node], [("x", F32, [1, 3])], [("y", F32, None)],
                   {"shape": np.array([2**31, 3], dtype=np.int64)})
    captured = capture_onnx(model)
    assert captured.graph.op_histogram() == {"expand": 1}


def test_a_small_range_passes_and_the_limit_can_be_lowered(monkeypatch):
    captured = capture_onnx(_range(1000))
    assert list(captured.graph.outputs[0].type.shape) == [1000]
    with limits.tensor_limit(1000), pytest.raises(CaptureError, match=r"4000 bytes.*1000 bytes"):
        capture_onnx(_range(1000))
    capture_onnx(_range(1000))  # the block's limit is gone after it
    monkeypatch.setenv(limits.ENV_VAR, "3999")
    with pytest.raises(CaptureError, match=r"huge_range.*4000 bytes"):
        capture_onnx(_range(1000))


def test_limit_arguments_are_checked(monkeypatch):
    with pytest.raises(ValueError), limits.tensor_limit(-1):
        pass
    monkeypatch.setenv(limits.ENV_VAR, "lots")
    with pytest.raises(ValueError, match=limits.ENV_VAR):
        limits.max_tensor_bytes()
