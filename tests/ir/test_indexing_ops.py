"""The indexing ops (``index``, ``scatter_nd``) against independent references: numpy's
advanced indexing for ``index`` and onnx's reference evaluator (ScatterND, GatherND) for
``scatter_nd``; exact symbolic type inference; verify reasons; text round trip; cost.

Glossary: r rank of x, k indexed dims, I broadcast index shape.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from transfuse.errors import IRVerifyError
from transfuse.ir.cost import node_cost
from transfuse.ir.graph import Graph
from transfuse.ir.interpret import interpret
from transfuse.ir.opdefs.indexing import index_shape, linear_slice_index
from transfuse.ir.parser import parse_graph
from transfuse.ir.printer import print_graph
from transfuse.ir.types import DType, TensorType, eval_dim, sym
from transfuse.ir.verify import verify

B, S = sym("batch"), sym("seq")


def _graph(op: str, types: list[TensorType], **attrs) -> tuple[Graph, object]:
    g = Graph(op)
    vals = [g.add_input(f"x{i}", t) for i, t in enumerate(types)]
    node = g.create(op, vals, attrs)
    g.set_outputs(list(node.outputs))
    verify(g)
    return g, node


def _run(g: Graph, tensors: list[torch.Tensor]) -> torch.Tensor:
    (out,) = interpret(g, tensors)
    return out


# -- index -----------------------------------------------------------------------------------

# (x shape, axes, index shapes): consecutive axes keep I in place, others put it first
INDEX_CASES = [
    ((5, 4), (0,), [(3,)]),                       # x[i]
    ((2, 5, 4), (1,), [(2, 3)]),                  # x[:, i] with a 2-D index
    ((2, 5, 4), (0, 1), [(2, 1), (1, 3)]),        # x[i, j] broadcast to [2, 3]
    ((2, 3, 5, 4), (1, 2), [(6,), (6,)]),         # x[:, i, j]: consecutive, I in place
    ((2, 3, 5, 4), (0, 2), [(6,), (6,)]),         # x[i, :, j]: not consecutive, I first
    ((2, 3, 5, 4), (1, 3), [(2, 1), (3,)]),       # x[:, i, :, j]: I first, broadcast
    ((2, 3, 5), (0, 1, 2), [(4,), (4,), (4,)]),   # every dim: a gather of elements
    ((2, 3, 5), (1,), [()]),                      # a 0-d index drops the dim
    ((2, 3, 5), (0, 2), [(), (4,)]),              # 0-d with a 1-D index, not consecutive
    ((2, 3, 5), (0, 2), [(), ()]),                # all 0-d: I = [] (its place is moot)
]


def _numpy_index(x: np.ndarray, axes, idx: list[np.ndarray]) -> np.ndarray:
    key: list = [slice(None)] * x.ndim
    for a, i in zip(axes, idx):
        key[a] = i
    return x[tuple(key)]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("xshape, axes, ishapes", INDEX_CASES)
def test_index_matches_numpy_advanced_indexing(xshape, axes, ishapes, dtype):
    gen = torch.Generator().manual_seed(len(ishapes) + sum(axes))
    x = torch.randn(xshape, generator=gen)
    # negative and non-negative indices in range [-size, size)
    idx = [torch.randint(-xshape[a], xshape[a], s, generator=gen, dtype=torch.int64).to(dtype)
           for a, s in zip(axes, ishapes)]
    g, node = _graph("index", [TensorType.of(x)] + [TensorType.of(i) for i in idx], axes=axes)
    want = _numpy_index(x.numpy(), axes, [i.numpy() for i in idx])
    assert node.outputs[0].type.shape == want.shape
    torch.testing.assert_close(_run(g, [x, *idx]), torch.from_numpy(want), rtol=0, atol=0)


def test_index_symbolic_type_is_exact_under_two_bindings():
    """x[B, S, 8] indexed on dims 0 and 1 by [B, 1] and [1, S] components (the mask
    spelling) is [B, S, 8]; x[:, :, j] with j [S, 2] is [B, S, S, 2] (I in place)."""
    x_t = TensorType(DType.f32, [B, S, 8])
    g, node = _graph("index", [x_t, TensorType(DType.i64, [B, 1]), TensorType(DType.i64, [1, S])],
                     axes=(0, 1))
    assert node.outputs[0].type == TensorType(DType.f32, [B, S, 8])
    g2, node2 = _graph("index", [x_t, TensorType(DType.i64, [S, 2])], axes=(2,))
    assert node2.outputs[0].type == TensorType(DType.f32, [B, S, S, 2])
    for env in ({"batch": 2, "seq": 5}, {"batch": 1, "seq": 3}):
        b, s = env["batch"], env["seq"]
        x = torch.randn(b, s, 8)
        bi, si = torch.arange(b).reshape(b, 1), torch.arange(s).flip(0).reshape(1, s)
        torch.testing.assert_close(_run(g, [x, bi, si]), x[bi, si])
        j = torch.randint(0, 8, (s, 2))
        out = _run(g2, [x, j])
        assert out.shape == node2.outputs[0].type.concrete(env)
        torch.testing.assert_close(out, x[:, :, j])


def test_index_out_of_range_is_an_error():
    g, _ = _graph("index", [TensorType(DType.f32, [3, 4]), TensorType(DType.i64, [2])], axes=(0,))
    with pytest.raises(IRVerifyError, match="IndexError: index 3 is out of bounds"):
        _run(g, [torch.randn(3, 4), torch.tensor([0, 3])])


def _rejects(op: str, types, attrs: dict, message: str) -> None:
    g = Graph()
    vals = [g.add_input(f"x{i}", TensorType(d, s)) for i, (d, s) in enumerate(types)]
    with pytest.raises(IRVerifyError, match=message):
        g.create(op, vals, attrs)


@pytest.mark.parametrize("types, axes, message", [
    ([(DType.f32, [3, 4]), (DType.i64, [2]), (DType.i64, [2])], (1, 0), "increasing"),
    ([(DType.f32, [3, 4]), (DType.i64, [2])], (2,), "increasing dims"),
    ([(DType.f32, [3, 4]), (DType.i64, [2]), (DType.i64, [2])], (0, 0), "increasing"),
    ([(DType.f32, [3, 4]), (DType.i64, [2])], (0, 1), "1 index tensors for 2 axes"),
    ([(DType.f32, [3, 4]), (DType.bool, [3])], (0,), "must be i64 or i32"),
    ([(DType.f32, [3, 4]), (DType.f32, [3])], (0,), "must be i64 or i32"),
    ([(DType.f32, [3, 4]), (DType.i64, [2]), (DType.i64, [3])], (0, 1), "do not broadcast"),
    ([(DType.f32, [3, 4])], (), "at least one index"),
])
def test_index_rejects(types, axes, message):
    _rejects("index", types, {"axes": axes}, message)


def test_index_shape_helper_places_the_index_shape():
    assert index_shape([2, 3, 5, 4], [7], (1, 2)) == (2, 7, 4)
    assert index_shape([2, 3, 5, 4], [7], (1, 3)) == (7, 2, 5)
    assert index_shape([2, 3, 5, 4], [7, 1], (0,)) == (7, 1, 3, 5, 4)


# -- scatter_nd ------------------------------------------------------------------------------


def _onnx_reference(op: str, arrays: list[np.ndarray], **attrs) -> np.ndarray:
    names = [f"i{k}" for k in range(len(arrays))]
    to = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
          np.dtype(np.int32): TensorProto.INT32}
    graph = helper.make_graph(
        [helper.make_node(op, names, ["y"], **attrs)], "g",
        [helper.make_tensor_value_info(n, to[a.dtype], a.shape) for n, a in zip(names, arrays)],
        [helper.make_tensor_value_info("y", to[arrays[0].dtype], [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ReferenceEvaluator(model).run(None, dict(zip(names, arrays)))[0]


# (x shape, indices shape [*I, k])
SCATTER_SHAPES = [((6,), (3, 1)), ((4, 5), (2, 1)), ((4, 5), (3, 2)), ((5, 4, 3), (2, 2, 1)),
                  ((3, 4, 5), (2, 3))]


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
@pytest.mark.parametrize("xshape, ishape", SCATTER_SHAPES)
def test_scatter_nd_matches_onnx_reference(xshape, ishape, reduction):
    gen = torch.Generator().manual_seed(len(xshape) * 10 + ishape[-1])
    k = ishape[-1]
    x = torch.randn(xshape, generator=gen)
    n = int(np.prod(ishape[:-1]))
    # distinct slices for "none" (repeats are unspecified there); repeats for the reductions
    # (they combine in turn); half of the indices negative
    flat = torch.randperm(int(np.prod(xshape[:k])), generator=gen)[:n] if reduction == "none" \
        else torch.randint(0, int(np.prod(xshape[:k])), (n,), generator=gen)
    idx = torch.stack(torch.unravel_index(flat, xshape[:k]), -1).reshape(ishape)
    idx = torch.where(torch.rand(ishape, generator=gen) < 0.5, idx - torch.tensor(xshape[:k]),
                      idx)
    upd = torch.randn(ishape[:-1] + xshape[k:], generator=gen)
    g, node = _graph("scatter_nd", [TensorType.of(t) for t in (x, idx, upd)],
                     reduction=reduction)
    want = _onnx_reference("ScatterND", [x.numpy(), idx.numpy(), upd.numpy()],
                           reduction=reduction)
    torch.testing.assert_close(_run(g, [x, idx, upd]), torch.from_numpy(want))
    assert node.outputs[0].type == TensorType.of(x)


def test_scatter_nd_repeated_add_accumulates_and_symbolic_type():
    x_t = TensorType(DType.f32, [S, 4])
    g, node = _graph("scatter_nd", [x_t, TensorType(DType.i64, [B, 1]),
                                    TensorType(DType.f32, [B, 4])], reduction="add")
    assert node.outputs[0].type == x_t
    x, idx, upd = torch.zeros(5, 4), torch.tensor([[1], [1], [-1]]), torch.ones(3, 4)
    want = torch.zeros(5, 4)
    want[1] = 2
    want[4] = 1
    torch.testing.assert_close(_run(g, [x, idx, upd]), want)


def test_gather_nd_with_batch_dims_is_index_with_arange_components():
    """ONNX GatherND(batch_dims=1) = index with the batch position as the first component:
    the spelling the ONNX frontend emits, checked against onnx's reference."""
    gen = torch.Generator().manual_seed(3)
    x, idx = torch.randn(2, 3, 4), torch.randint(-3, 3, (2, 5, 1), generator=gen)
    want = _onnx_reference("GatherND", [x.numpy(), idx.numpy()], batch_dims=1)
    g, node = _graph("index", [TensorType.of(x), TensorType(DType.i64, [2, 1]),
                               TensorType(DType.i64, [2, 5])], axes=(0, 1))
    got = _run(g, [x, torch.arange(2).reshape(2, 1), idx[..., 0]])
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=0, atol=0)


def test_scatter_nd_out_of_range_is_an_error():
    assert linear_slice_index(torch.tensor([[1, -1]]), (3, 4)).tolist() == [7]
    with pytest.raises(IndexError, match="out of range"):
        linear_slice_index(torch.tensor([[3, 0]]), (3, 4))


@pytest.mark.parametrize("types, reduction, message", [
    ([(DType.f32, [3, 4]), (DType.i64, [2, 1]), (DType.f32, [2, 4])], "sum", "not one of"),
    ([(DType.f32, [3, 4]), (DType.f32, [2, 1]), (DType.f32, [2, 4])], "none", "i64 or i32"),
    ([(DType.f32, [3, 4]), (DType.i64, [2, 3]), (DType.f32, [2])], "none", "static last dim"),
    ([(DType.f32, [3, 4]), (DType.i64, [2, S]), (DType.f32, [2])], "none", "static last dim"),
    ([(DType.f32, [3, 4]), (DType.i64, [2, 1]), (DType.f32, [2, 3])], "none", "must have shape"),
    ([(DType.f32, [3, 4]), (DType.i64, [2, 1]), (DType.f16, [2, 4])], "none", "differ in dtype"),
    ([(DType.bool, [3]), (DType.i64, [2, 1]), (DType.bool, [2])], "max", "of bool"),
])
def test_scatter_nd_rejects(types, reduction, message):
    _rejects("scatter_nd", types, {"reduction": reduction}, message)


# -- text form and cost ----------------------------------------------------------------------


def test_text_round_trip_and_cost():
    g = Graph("t")
    x = g.add_input("x", TensorType(DType.f32, [B, S, 8]))
    i = g.add_input("i", TensorType(DType.i64, [B, 1]))
    j = g.add_input("j", TensorType(DType.i64, [1, S]))
    y = g.op("index", x, i, j, axes=(0, 1))
    idx = g.add_input("idx", TensorType(DType.i64, [S, 2]))
    upd = g.add_input("u", TensorType(DType.f32, [S, 8]))
    z = g.op("scatter_nd", y, idx, upd, reduction="max")
    g.set_outputs([z])
    verify(g)
    text = print_graph(g)
    assert "index(%x, %i, %j) {axes=[0, 1]}" in text and 'reduction="max"' in text
    g2 = parse_graph(text)
    verify(g2)
    assert print_graph(g2) == text
    env = {"batch": 2, "seq": 5}
    flops, nbytes = node_cost(y.producer)
    assert eval_dim(flops, env) == 0
    assert eval_dim(nbytes, env) == 2 * (2 * 5 * 8 * 4) + 2 * 8 + 5 * 8  # picked r/w + indices
    flops, _ = node_cost(z.producer)
    assert eval_dim(flops, env) == 5 * 8
