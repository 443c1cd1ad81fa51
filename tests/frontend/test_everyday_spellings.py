"""Everyday spellings the torch frontend converts into IR ops instead of torch fallbacks:
``x.var``/``x.std`` (every overload), ``torch.square``, ``repeat_interleave`` with one count,
``torch.einsum`` and ``torch.outer``; and the same ops arriving through an ONNX export.

Each case: no ``torch_fallback`` after capture, equal to eager at the example size and at a
second size of the dynamic dim, and the same through ``target="onnxruntime"``. Canonical
forms are checked where passes depend on them (einsum attention is the ``q @ k.mT`` matmul;
var is mean/sub/mul/mean). Negative cases stay fallbacks, with the reason recorded.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import transfuse
from transfuse.frontend.onnx import capture_onnx
from transfuse.frontend.torch_export import capture
from transfuse.ir.interpret import interpret

ATOL, RTOL = 1e-5, 1e-5


class Fn(nn.Module):
    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            setattr(self, k, nn.Parameter(v, requires_grad=False))

    def forward(self, x, y=None):
        return self.fn(self, x, y)


def _seq(name: str, axis: int, lo: int = 2, hi: int = 64) -> dict:
    return {"seq": {"range": (lo, hi), "dims": {name: axis}}}


def _both(axis: int) -> dict:
    return {"seq": {"range": (2, 64), "dims": {"x": axis, "y": axis}}}


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# (id, function of (module, x, y), x shape, y shape or None, dynamic spec, axis of seq in x/y,
#  parameters)
CASES = [
    ("var-dim-keepdim", lambda m, x, y: x.var(-1, keepdim=True), (2, 5, 8), None,
     _seq("x", 1), {}),
    ("var-unbiased-false", lambda m, x, y: x.var(dim=-1, unbiased=False), (2, 5, 8), None,
     _seq("x", 1), {}),
    ("var-correction-over-seq", lambda m, x, y: x.var(dim=(1, 2), correction=2, keepdim=True),
     (2, 5, 8), None, _seq("x", 1), {}),
    ("var-all", lambda m, x, y: x.var(), (2, 5, 8), None, _seq("x", 1), {}),
    ("std-dim", lambda m, x, y: x.std(-1), (2, 5, 8), None, _seq("x", 1), {}),
    ("square", lambda m, x, y: torch.square(x) + x.square().mean(-1, keepdim=True),
     (2, 5, 8), None, _seq("x", 1), {}),
    # Hugging Face repeat_kv written with repeat_interleave: [B, Hkv, S, D] -> [B, H, S, D]
    ("repeat-interleave-gqa", lambda m, x, y: x.repeat_interleave(3, dim=1), (2, 2, 5, 4),
     None, _seq("x", 2), {}),
    # GPT-J rotary tables: sin/cos [S, D/2] -> each element twice along the last axis
    ("repeat-interleave-rotary",
     lambda m, x, y: torch.repeat_interleave(x[None, :, None, :], 2, 3), (5, 4), None,
     _seq("x", 0), {}),
    ("repeat-interleave-flat", lambda m, x, y: torch.repeat_interleave(x, 2), (5, 3), None,
     _seq("x", 0), {}),
    ("einsum-scores", lambda m, x, y: torch.einsum("bhqd,bhkd->bhqk", x, y), (2, 3, 5, 4),
     (2, 3, 5, 4), _both(2), {}),
    ("einsum-context", lambda m, x, y: torch.einsum("bhqk,bhkd->bhqd", x, y), (2, 3, 5, 5),
     (2, 3, 5, 4), {"seq": {"range": (2, 64), "dims": {"x": [2, 3], "y": 2}}}, {}),
    ("einsum-projection", lambda m, x, y: torch.einsum("bsd,od->bso", x, m.w), (2, 5, 8), None,
     _seq("x", 1), {"w": _randn(6, 8, seed=3)}),
    ("einsum-projection-do", lambda m, x, y: torch.einsum("bsd,do->bso", x, m.w), (2, 5, 8),
     None, _seq("x", 1), {"w": _randn(8, 6, seed=3)}),
    ("einsum-outer", lambda m, x, y: torch.einsum("i,j->ij", x, y), (5,), (7,),
     _seq("x", 0), {}),
    ("einsum-three-operands", lambda m, x, y: torch.einsum("bsi,ij,jk->bsk", x, m.a, m.b),
     (2, 5, 4), None, _seq("x", 1), {"a": _randn(4, 3, seed=4), "b": _randn(3, 6, seed=5)}),
    ("einsum-sum-and-transpose", lambda m, x, y: torch.einsum("bsd->db", x), (2, 5, 4), None,
     _seq("x", 1), {}),
    ("einsum-implicit-output", lambda m, x, y: torch.einsum("bij,bjk", x, y), (2, 5, 3),
     (2, 3, 4), {"seq": {"range": (2, 64), "dims": {"x": 1}}}, {}),
    # rotary frequencies: positions (outer) inverse frequencies
    ("outer", lambda m, x, y: torch.outer(x, m.inv_freq), (5,), None, _seq("x", 0),
     {"inv_freq": 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))}),
]


def _inputs(case, seq: int | None = None, seed: int = 0):
    _, _, xs, ys, dyn, _ = case
    dims = dyn["seq"]["dims"]

    def shaped(name, shape):
        axes = dims.get(name, [])
        axes = [axes] if isinstance(axes, int) else axes
        shape = [seq if seq is not None and i in axes else d for i, d in enumerate(shape)]
        return _randn(*shape, seed=seed + (name == "y"))

    args = [shaped("x", xs)]
    if ys is not None:
        args.append(shaped("y", ys))
    return tuple(args)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_spelling_is_converted_and_matches_eager(case):
    model = Fn(case[1], **case[5]).eval()
    example = _inputs(case)
    captured = capture(model, example, dynamic=case[4])
    hist = captured.graph.op_histogram()
    assert "torch_fallback" not in hist, captured.graph.meta.get("fallback_reasons")
    assert captured.graph.meta["fallbacks"] == {}
    for seq, seed in ((None, 0), (9, 1)):
        args = _inputs(case, seq, seed)
        flat = captured.signature.flatten_inputs(args, {})
        (got,) = interpret(captured.graph, flat)
        torch.testing.assert_close(got, model(*args), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_spelling_runs_on_the_onnxruntime_target(case):
    model = Fn(case[1], **case[5]).eval()
    compiled = transfuse.optimize(model, _inputs(case), dynamic=case[4], target="onnxruntime")
    for seq, seed in ((None, 0), (11, 2)):
        args = _inputs(case, seq, seed)
        torch.testing.assert_close(compiled(*args), model(*args), atol=1e-4, rtol=1e-4)


def _ops(graph):
    return [(n.op, {k: v for k, v in n.attrs.items()}) for n in graph.nodes]


def test_einsum_attention_is_the_matmul_transpose_spelling():
    q, k = _randn(2, 3, 5, 4), _randn(2, 3, 6, 4, seed=1)
    by_einsum = capture(Fn(lambda m, x, y: torch.einsum("bhqd,bhkd->bhqk", x, y)).eval(), (q, k))
    by_matmul = capture(Fn(lambda m, x, y: x @ y.transpose(-2, -1)).eval(), (q, k))
    assert _ops(by_einsum.graph) == _ops(by_matmul.graph)
    assert [n.op for n in by_einsum.graph.nodes] == ["permute", "matmul"]
    (perm,) = by_einsum.graph.find("permute")
    assert list(perm.attrs["perm"]) == [0, 1, 3, 2]


class EinsumAttention(nn.Module):
    """Causal self-attention with the scores and the context written as einsums."""

    def __init__(self, e=16, h=2):
        super().__init__()
        self.h, self.d = h, e // h
        self.qkv = nn.Linear(e, 3 * e)
        self.out = nn.Linear(e, e)

    def forward(self, x):  # x: (B, S, E)
        b, s, e = x.shape
        q, k, v = self.qkv(x).split(e, dim=-1)
        q, k, v = (t.view(b, s, self.h, self.d).transpose(1, 2) for t in (q, k, v))
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(self.d)  # (B, H, S, S)
        mask = torch.ones(s, s, dtype=torch.bool).tril()
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        ctx = torch.einsum("bhqk,bhkd->bhqd", p, v)  # (B, H, S, D)
        return self.out(ctx.transpose(1, 2).reshape(b, s, e))


@pytest.mark.parametrize("target", ["python", "onnxruntime"])
def test_einsum_attention_fuses_like_matmul_attention(target):
    torch.manual_seed(0)
    model = EinsumAttention().eval()
    x = _randn(2, 7, 16)
    compiled = transfuse.optimize(model, (x,), dynamic={"batch": (1, 4), "seq": (1, 32)},
                                  target=target)
    assert compiled.graph.op_histogram().get("attention") == 1
    assert "torch_fallback" not in compiled.graph.op_histogram()
    for args in ((x,), (_randn(3, 12, 16, seed=4),)):
        torch.testing.assert_close(compiled(*args), model(*args), atol=1e-4, rtol=1e-4)


def test_var_is_mean_sub_mul_mean():
    captured = capture(Fn(lambda m, x, y: x.var(-1, unbiased=False, keepdim=True)).eval(),
                       (_randn(2, 5, 8),))
    nodes = captured.graph.nodes
    assert [n.op for n in nodes] == ["reduce_mean", "sub", "mul", "reduce_mean"]
    mean, sub, sq, var = nodes
    assert sub.inputs[1] is mean.outputs[0] and sq.inputs[0] is sq.inputs[1] is sub.outputs[0]
    assert list(var.attrs["axes"]) == [2] and var.attrs["keepdim"]


def test_unbiased_var_divides_the_sum_by_n_minus_correction():
    captured = capture(Fn(lambda m, x, y: x.var(-1)).eval(), (_randn(2, 5, 8),))
    ops = [n.op for n in captured.graph.nodes]
    assert ops == ["reduce_mean", "sub", "mul", "reduce_sum", "div"]
    div = list(captured.graph.nodes)[-1]
    assert float(div.inputs[1].const) == 7.0


def test_repeat_interleave_is_expand_of_an_inserted_axis():
    captured = capture(Fn(lambda m, x, y: x.repeat_interleave(2, dim=1)).eval(),
                       (_randn(2, 3, 5, 4),))
    assert [n.op for n in captured.graph.nodes] == ["reshape", "expand", "reshape"]
    assert list(list(captured.graph.nodes)[1].attrs["shape"]) == [2, 3, 2, 5, 4]


def test_outer_is_a_broadcast_mul():
    captured = capture(Fn(lambda m, x, y: torch.outer(x, y)).eval(), (_randn(5), _randn(3)))
    assert [n.op for n in captured.graph.nodes] == ["reshape", "reshape", "mul"]


# -- negative cases: what cannot be converted stays a fallback, with a reason -------------------


def test_einsum_diagonal_stays_a_fallback_with_the_reason_logged(caplog):
    model = Fn(lambda m, x, y: torch.einsum("bii->bi", x)).eval()
    x = _randn(2, 3, 3)
    with caplog.at_level(logging.INFO, logger="transfuse.frontend"):
        captured = capture(model, (x,))
    assert captured.graph.meta["fallbacks"] == {"aten::einsum.default": 1}
    (reason,) = captured.graph.meta["fallback_reasons"]
    assert "bii->bi" in reason and "diagonal" in reason
    assert any("diagonal" in r.getMessage() for r in caplog.records)
    flat = captured.signature.flatten_inputs((x,), {})
    torch.testing.assert_close(interpret(captured.graph, flat)[0], model(x))


def test_repeat_interleave_with_per_element_counts_stays_a_fallback():
    model = Fn(lambda m, x, y: x.repeat_interleave(torch.tensor([1, 2, 3]), dim=0,
                                                   output_size=6)).eval()
    captured = capture(model, (_randn(3, 4),))
    assert captured.graph.meta["fallbacks"] == {"aten::repeat_interleave.self_Tensor": 1}
    (reason,) = captured.graph.meta["fallback_reasons"]
    assert "per-element" in reason


def test_integer_var_is_not_converted():
    # torch refuses var of integers; an integer square stays exact as mul
    captured = capture(Fn(lambda m, x, y: torch.square(x)).eval(),
                       (torch.arange(6).reshape(2, 3),))
    assert [n.op for n in captured.graph.nodes] == ["mul"]
    assert captured.graph.outputs[0].dtype.torch == torch.int64


# -- the same spellings through a dynamo ONNX export ---------------------------------------------


class Spellings(nn.Module):
    def forward(self, x, k, t):
        a = x.var(-1, keepdim=True) + x.var(-1, unbiased=False, keepdim=True)
        b = torch.square(x)
        c = k.repeat_interleave(2, dim=1)
        d = torch.einsum("bhqd,bhkd->bhqk", x, k)
        e = torch.outer(t, t)
        return a, b, c, d, e


def test_spellings_through_an_onnx_export(tmp_path):
    model = Spellings().eval()
    x, k, t = _randn(2, 3, 5, 4), _randn(2, 3, 5, 4, seed=1), _randn(6, seed=2)
    s = torch.export.Dim("s", min=2, max=64)
    path = str(tmp_path / "spellings.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x, k, t), path, dynamo=True,
                          dynamic_shapes=({2: s}, {2: s}, None))
    captured = capture_onnx(path)
    assert "torch_fallback" not in captured.graph.op_histogram()
    assert "matmul" in captured.graph.op_histogram()  # the Einsum
    x2, k2 = _randn(2, 3, 9, 4, seed=3), _randn(2, 3, 9, 4, seed=4)
    sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    want = sess.run(None, dict(zip(names, (x2.numpy(), k2.numpy(), t.numpy()))))
    compiled = transfuse.optimize(path, target="onnxruntime")
    got = compiled(x2, k2, t)
    got = list(got.values()) if isinstance(got, dict) else list(got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, torch.from_numpy(w), atol=1e-4, rtol=1e-4)


def _einsum_model(equation: str, shapes: list[tuple]):
    names = [f"x{i}" for i in range(len(shapes))]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Einsum", names, ["y"], equation=equation)], "einsum",
        [helper.make_tensor_value_info(n, f32, list(s)) for n, s in zip(names, shapes)],
        [helper.make_tensor_value_info("y", f32, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    feeds = {n: _randn(*s, seed=i).numpy() for i, (n, s) in enumerate(zip(names, shapes))}
    return model, feeds


@pytest.mark.parametrize("equation, shapes", [
    ("bsi,ij,jk->bsk", [(2, 5, 4), (4, 3), (3, 6)]),  # three operands, pairwise
    ("i,j->ij", [(5,), (7,)]),  # outer product: a broadcast mul
    ("bhqd,bhkd->bhqk", [(2, 3, 5, 4), (2, 3, 6, 4)]),
])
def test_onnx_einsum_matches_onnxruntime(equation, shapes):
    model, feeds = _einsum_model(equation, shapes)
    captured = capture_onnx(model)
    hist = captured.graph.op_histogram()
    assert "torch_fallback" not in hist
    sess = onnxruntime.InferenceSession(model.SerializeToString(),
                                        providers=["CPUExecutionProvider"])
    (want,) = sess.run(None, feeds)
    (got,) = interpret(captured.graph, [torch.from_numpy(feeds[n]) for n in sorted(feeds)])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=1e-5)
    if equation == "i,j->ij":
        assert hist == {"reshape": 2, "mul": 1}


def test_onnx_einsum_attention_is_the_matmul_transpose_spelling():
    model, _ = _einsum_model("bhqd,bhkd->bhqk", [(2, 3, 5, 4), (2, 3, 6, 4)])
    graph = capture_onnx(model).graph
    assert [n.op for n in graph.nodes] == ["permute", "matmul"]
    assert list(graph.find("permute")[0].attrs["perm"]) == [0, 1, 3, 2]
