"""The indexing ops (``index``, ``scatter_nd``) through both backends against the IR
interpreter: the python emitter (a subscript / ``torch.index_put``, never the reference
fallback where an emitter exists) and the onnxruntime lowering (Gather, GatherND with
Transposes, ScatterND), on consecutive and non-consecutive axes, broadcast and 0-d index
tensors, negative indices, i32 indices and symbolic dims.

Glossary: r rank of x, k indexed dims, I broadcast index shape.
"""

from __future__ import annotations

import pytest
import torch

from transfuse.codegen.onnx import OrtProgram
from transfuse.codegen.python import generate_python
from transfuse.errors import LoweringError
from transfuse.ir.graph import Graph
from transfuse.ir.interpret import interpret
from transfuse.ir.types import DType, TensorType, sym

B, S = sym("batch"), sym("seq")
ENVS = [{"batch": 2, "seq": 5}, {"batch": 3, "seq": 2}]


def _graph(op: str, types: list[TensorType], **attrs) -> Graph:
    g = Graph(op)
    g.add_input("sizes", TensorType(DType.i64, [B, S]))  # binds the symbols
    vals = [g.add_input(f"x{i}", t) for i, t in enumerate(types)]
    g.set_outputs([g.op(op, *vals, **attrs)])
    return g


def _concrete(t: TensorType, env: dict) -> tuple[int, ...]:
    return t.concrete(env)


def _check(g: Graph, feeds_for, *, onnx_ops: set[str], opset: int = 17) -> None:
    python = generate_python(g)
    assert not python.reference_ops, python.reference_ops
    ort = OrtProgram(g, opset=opset)
    used = {n.op_type for n in ort.model_proto.graph.node}
    assert onnx_ops <= used, used
    for env in ENVS:
        feeds = [torch.zeros(env["batch"], env["seq"], dtype=torch.int64), *feeds_for(env)]
        (want,) = interpret(g, feeds)
        (got_py,) = python(feeds)
        (got_ort,) = ort(feeds)
        assert got_py.shape == want.shape == got_ort.shape
        torch.testing.assert_close(got_py, want, rtol=0, atol=0)
        torch.testing.assert_close(got_ort, want, rtol=1e-6, atol=1e-6)


# (x shape, axes, index shapes, ONNX ops that must appear)
INDEX_CASES = [
    ((B, 5, 4), (1,), [(S, 3)], {"Gather"}),                      # one index: Gather
    ((B, S), (0, 1), [(B, 1, S, 1), (B, 1, S, 1)], {"GatherND"}),  # the HF mask spelling
    ((B, S, 4), (0, 1), [(B, 1), (1, S)], {"GatherND", "Expand"}),  # broadcast components
    ((2, B, 5, 4), (1, 2), [(S,), (S,)], {"GatherND", "Transpose"}),  # consecutive, inner
    ((2, 3, 5, S), (0, 2), [(4,), (4,)], {"GatherND", "Transpose"}),  # not consecutive
    ((2, 3, 5, 4), (1, 3), [(2, 1), (S,)], {"GatherND", "Transpose"}),  # I first, broadcast
    ((2, 3, 5), (0, 1, 2), [(S,), (S,), (S,)], {"GatherND"}),       # every dim
    ((2, S, 5), (0, 2), [(), (4,)], {"GatherND"}),                 # 0-d with 1-D, apart
    ((2, S, 5), (0, 2), [(), ()], {"GatherND"}),                   # all 0-d
    ((2, 3, 5), (1,), [()], {"Gather"}),                           # one 0-d index
]


@pytest.mark.parametrize("dtype", [DType.i64, DType.i32])
@pytest.mark.parametrize("xshape, axes, ishapes, onnx_ops", INDEX_CASES)
def test_index_both_backends(xshape, axes, ishapes, onnx_ops, dtype):
    x_t = TensorType(DType.f32, xshape)
    idx_t = [TensorType(dtype, s) for s in ishapes]
    g = _graph("index", [x_t, *idx_t], axes=axes)
    gen = torch.Generator().manual_seed(0)

    def feeds(env):
        x = torch.randn(_concrete(x_t, env), generator=gen)
        out = [x]
        for a, t in zip(axes, idx_t):  # negative and non-negative, in [-size, size)
            size = x.shape[a]
            out.append(torch.randint(-size, size, _concrete(t, env), generator=gen)
                       .to(dtype.torch))
        return out

    _check(g, feeds, onnx_ops=onnx_ops)


def test_index_of_a_bool_tensor_both_backends():
    g = _graph("index", [TensorType(DType.bool, [B, S]), TensorType(DType.i64, [B, 1]),
                         TensorType(DType.i64, [1, S])], axes=(0, 1))

    def feeds(env):
        b, s = env["batch"], env["seq"]
        return [torch.rand(b, s) < 0.5, torch.arange(b).flip(0).reshape(b, 1),
                torch.arange(s).reshape(1, s)]

    _check(g, feeds, onnx_ops={"GatherND"})


def test_python_index_source_is_a_subscript():
    g = _graph("index", [TensorType(DType.f32, [2, 3, 5]), TensorType(DType.i64, []),
                         TensorType(DType.i64, [4])], axes=(0, 2))
    source = generate_python(g).source
    assert "[x1[None], :, x2]" in source, source


# (x shape, indices shape [*I, k]); updates are I + x.shape[k:]
SCATTER_CASES = [((S, 4), (2, 1)), ((5, B), (3, 2)), ((4, 3, S), (2, 2, 1))]


def _scatter_feeds(x_t, i_t, u_t, unique: bool):
    gen = torch.Generator().manual_seed(1)

    def feeds(env):
        xs, ishape = _concrete(x_t, env), _concrete(i_t, env)
        k, n = ishape[-1], 1
        for d in ishape[:-1]:
            n *= d
        rows = 1
        for d in xs[:k]:
            rows *= d
        flat = (torch.randperm(rows, generator=gen)[:n] if unique
                else torch.randint(0, rows, (n,), generator=gen))
        idx = torch.stack(torch.unravel_index(flat, xs[:k]), -1).reshape(ishape)
        idx = torch.where(torch.rand(ishape, generator=gen) < 0.5, idx - torch.tensor(xs[:k]),
                          idx)
        return [torch.randn(xs, generator=gen), idx.to(i_t.dtype.torch),
                torch.randn(_concrete(u_t, env), generator=gen)]

    return feeds


@pytest.mark.parametrize("dtype", [DType.i64, DType.i32])
@pytest.mark.parametrize("reduction", ["none", "add"])
@pytest.mark.parametrize("xshape, ishape", SCATTER_CASES)
def test_scatter_nd_both_backends(xshape, ishape, reduction, dtype):
    k = ishape[-1]
    x_t, i_t = TensorType(DType.f32, xshape), TensorType(dtype, ishape)
    u_t = TensorType(DType.f32, ishape[:-1] + xshape[k:])
    g = _graph("scatter_nd", [x_t, i_t, u_t], reduction=reduction)
    # "none" with distinct slices (repeats are unspecified there)
    _check(g, _scatter_feeds(x_t, i_t, u_t, unique=reduction == "none"),
           onnx_ops={"ScatterND"})


@pytest.mark.parametrize("reduction", ["mul", "max", "min"])
def test_scatter_nd_reductions(reduction):
    """mul/max/min: the python backend runs the reference (counted, with the reason); ORT
    has max/min from opset 18 and says so at 17."""
    x_t, i_t, u_t = (TensorType(DType.f32, [S, 4]), TensorType(DType.i64, [3, 1]),
                     TensorType(DType.f32, [3, 4]))
    g = _graph("scatter_nd", [x_t, i_t, u_t], reduction=reduction)
    python = generate_python(g)
    assert "scatter_reduce" in python.reference_ops["scatter_nd"]
    if reduction != "mul":
        with pytest.raises(LoweringError, match="needs opset 18"):
            OrtProgram(g)
    ort = OrtProgram(g, opset=18)
    feeds_for = _scatter_feeds(x_t, i_t, u_t, unique=False)
    for env in ENVS[:1]:
        feeds = [torch.zeros(env["batch"], env["seq"], dtype=torch.int64), *feeds_for(env)]
        (want,) = interpret(g, feeds)
        torch.testing.assert_close(python(feeds)[0], want)
        torch.testing.assert_close(ort(feeds)[0], want)
