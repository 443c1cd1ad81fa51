"""ONNX GatherND, ScatterND and ScatterElements through the ONNX frontend (the IR ``index``
and ``scatter_nd`` ops) and both targets, against plain onnxruntime on the same model:
symbolic dims, batch_dims, indices that are a graph input (not a stack of components),
negative indices, repeated indices with reductions; refused reductions are typed errors.

Glossary: r rank of data, k indexed dims, I index shape.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import transfuse
from transfuse.errors import LoweringError, UnsupportedOpError

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(node, inputs, out_dims, opset: int):
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, t, d) for n, t, d in inputs],
        [helper.make_tensor_value_info("y", F32, out_dims)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _compare(model, feeds: dict, targets=("python", "onnxruntime"), exact=True) -> dict:
    (want,) = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, feeds)
    compiled = {}
    for target in targets:
        c = transfuse.optimize(model, target=target)
        assert not c.graph.find("torch_fallback")
        got = c(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        tol = 0 if exact else 1e-6
        torch.testing.assert_close(got, torch.from_numpy(want), rtol=tol, atol=tol)
        compiled[target] = c
    return compiled


def _ints(rng, lo, hi, shape):
    return rng.integers(lo, hi, size=shape).astype(np.int64)


@pytest.mark.parametrize("batch_dims", [0, 1])
def test_gathernd_of_an_index_input_with_negative_indices(batch_dims):
    """indices [B, n, 2] read from an input (split into components), half negative."""
    node = helper.make_node("GatherND", ["x", "i"], ["y"], batch_dims=batch_dims)
    x_dims = ["batch", 4, 5] if batch_dims == 0 else ["batch", 4, 5, 3]
    model = _model(node, [("x", F32, x_dims), ("i", I64, ["batch", "n", 2])], None, 17)
    rng = np.random.default_rng(batch_dims)
    for b, n in ((3, 6), (2, 1)):
        shape = [b, 4, 5] if batch_dims == 0 else [b, 4, 5, 3]
        lim = [b, 4] if batch_dims == 0 else [4, 5]
        idx = np.stack([_ints(rng, -s, s, (b, n)) for s in lim], -1)
        c = _compare(model, {"x": rng.standard_normal(shape).astype(np.float32), "i": idx})
    assert c["onnxruntime"].graph.find("index")


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatternd(reduction):
    """updates [n, 5] into rows of data [seq, 5]; repeated rows except for "none"."""
    node = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction=reduction)
    model = _model(node, [("x", F32, ["seq", 5]), ("i", I64, ["n", 1]), ("u", F32, ["n", 5])],
                   ["seq", 5], 18)
    rng = np.random.default_rng(1)
    rows = rng.permutation(7)[:4] if reduction == "none" else _ints(rng, 0, 7, 6)
    idx = np.where(rng.random(len(rows)) < 0.5, rows - 7, rows)[:, None].astype(np.int64)
    feeds = {"x": rng.standard_normal((7, 5)).astype(np.float32), "i": idx,
             "u": rng.standard_normal((len(rows), 5)).astype(np.float32)}
    if reduction in ("max", "min"):
        _compare(model, feeds, targets=["python"])
        with pytest.raises(LoweringError, match="needs opset 18"):
            transfuse.optimize(model, target="onnxruntime")
    else:
        _compare(model, feeds, exact=reduction == "none")


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_scatter_elements_with_negative_indices(axis):
    node = helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], axis=axis)
    model = _model(node, [("x", F32, [4, 6]), ("i", I64, [2, 3]), ("u", F32, [2, 3])],
                   [4, 6], 18)
    rng = np.random.default_rng(2)
    size = [4, 6][axis]
    # distinct targets along the axis within each line (repeats are unspecified for "none")
    lines = 3 if axis == 0 else 2
    picks = np.stack([rng.permutation(size)[:[2, 3][axis]] for _ in range(lines)])
    idx = picks.T if axis == 0 else picks
    idx = np.where(rng.random(idx.shape) < 0.5, idx - size, idx).astype(np.int64)
    c = _compare(model, {"x": rng.standard_normal((4, 6)).astype(np.float32), "i": idx,
                         "u": rng.standard_normal((2, 3)).astype(np.float32)})
    assert c["python"].graph.find("scatter_nd")


def test_unknown_reduction_is_a_typed_error():
    node = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction="mean")
    model = _model(node, [("x", F32, [3, 5]), ("i", I64, [2, 1]), ("u", F32, [2, 5])],
                   [3, 5], 18)
    with pytest.raises(UnsupportedOpError, match="ScatterND reduction 'mean'"):
        transfuse.optimize(model)
