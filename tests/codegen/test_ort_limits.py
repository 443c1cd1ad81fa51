"""The onnxruntime target routes attention by what ORT's contrib kernels accept, and wraps
ORT's run errors in ExecutionError.

The head-size rules in ``codegen/onnx/contrib_limits.py`` are measured again here against the
installed ORT: an ORT that changes a limit fails this file, not a user's first call."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto
from onnx import helper as oh

import transfuse
from transfuse.codegen.onnx import MS_DOMAIN, OrtProgram
from transfuse.codegen.onnx import attention as onnx_attention
from transfuse.codegen.onnx.contrib_limits import (
    GQA_HEAD_SIZE,
    HEAD_SIZE_LIMITS,
    MHA_HEAD_SIZE,
    HeadSizeLimit,
)
from transfuse.codegen.python import generate_python
from transfuse.errors import ExecutionError, TransfuseError
from transfuse.ir.parser import parse_graph

HEAD_SIZES = [4, 6, 8, 12, 16]


def _run_contrib(op: str, d: int, heads: int = 2, s: int = 5) -> str | None:
    """Run ``op`` alone with head size ``d`` on ORT's CPU EP; ORT's error text, or None."""
    hidden = heads * d
    if op == "GroupQueryAttention":
        ins, extra = ["q", "k", "v", "", "", "seqlens_k", "total"], dict(kv_num_heads=heads)
        outs = ["o", "present_k", "present_v"]
    else:
        ins, extra, outs = ["q", "k", "v"], {}, ["o"]
    node = oh.make_node(op, ins, outs, domain=MS_DOMAIN, num_heads=heads, **extra)
    infos = [oh.make_tensor_value_info(n, TensorProto.FLOAT, [1, s, hidden]) for n in "qkv"]
    if op == "GroupQueryAttention":
        infos += [oh.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
                  oh.make_tensor_value_info("total", TensorProto.INT32, [])]
    graph = oh.make_graph([node], "g", infos,
                          [oh.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17),
                                                oh.make_opsetid(MS_DOMAIN, 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, s, hidden)).astype(np.float32) for n in "qkv"}
    if op == "GroupQueryAttention":
        feeds |= {"seqlens_k": np.array([s - 1], np.int32), "total": np.array(s, np.int32)}
    try:
        sess.run(None, feeds)
    except Exception as e:  # what the router must never let a user see
        return str(e)
    return None


@pytest.mark.parametrize("limit", sorted(HEAD_SIZE_LIMITS.values(), key=lambda x: x.op),
                         ids=lambda x: x.op)
@pytest.mark.parametrize("d", HEAD_SIZES)
def test_limits_match_the_installed_onnxruntime(limit, d):
    error = _run_contrib(limit.op, d)
    refused = limit.refuses(d, d)
    assert (error is not None) == (refused is not None), (limit.op, d, error, refused)
    assert limit.source  # every rule says where it comes from


def test_limit_reason_names_op_and_size():
    assert GQA_HEAD_SIZE.refuses(16, 16) is None
    assert "GroupQueryAttention" in GQA_HEAD_SIZE.refuses(12, 12)
    assert "got 12" in GQA_HEAD_SIZE.refuses(12, 12)
    assert "value head size" in HeadSizeLimit("X", 8, "test").refuses(8, 4)
    assert MHA_HEAD_SIZE.refuses(3, 3) is None


ATTN = """
graph attn(%x: f32[batch, seq, {hid}]) {{
  const %wq: f32[{hid}, {hid}]
  const %wk: f32[{hid}, {hid}]
  const %wv: f32[{hid}, {hid}]
  %q: f32[batch, seq, {hid}] = linear(%x, %wq)
  %k: f32[batch, seq, {hid}] = linear(%x, %wk)
  %v: f32[batch, seq, {hid}] = linear(%x, %wv)
  %q4: f32[batch, seq, 2, {d}] = reshape(%q) {{shape=[batch, seq, 2, {d}]}}
  %k4: f32[batch, seq, 2, {d}] = reshape(%k) {{shape=[batch, seq, 2, {d}]}}
  %v4: f32[batch, seq, 2, {d}] = reshape(%v) {{shape=[batch, seq, 2, {d}]}}
  %a: f32[batch, seq, 2, {d}] = attention(%q4, %k4, %v4) {{layout="bshd"{attrs}}}
  %o: f32[batch, seq, {hid}] = reshape(%a) {{shape=[batch, seq, {hid}]}}
  return %o
}}
"""


def _graph(d: int, attrs: str = ""):
    g = parse_graph(ATTN.format(hid=2 * d, d=d, attrs=attrs))
    gen = torch.Generator().manual_seed(d)
    for v in g.constants.values():
        v.const.copy_(torch.randn(v.type.shape, generator=gen) / d ** 0.5)
    return g


def _ops(program) -> set[str]:
    return set(program.onnx_ops)


@pytest.mark.parametrize("d, causal, want", [
    (4, False, "MultiHeadAttention"), (6, False, "MultiHeadAttention"),
    (12, False, "MultiHeadAttention"), (16, False, "GroupQueryAttention"),
    (4, True, None), (12, True, None), (8, True, "GroupQueryAttention"),
])
def test_attention_routes_by_head_size_and_runs(d, causal, want):
    g = _graph(d, ", causal" if causal else "")
    program = OrtProgram(g)
    ops = _ops(program)
    for op in ("GroupQueryAttention", "MultiHeadAttention"):
        assert (f"{MS_DOMAIN}.{op}" in ops) == (op == want), (d, causal, ops)
    if want is None:
        assert any("GroupQueryAttention (ORT CPU) needs a head size" in n
                   for n in program.notes), program.notes
    reference = generate_python(g)
    for shape in ((2, 7), (1, 1), (3, 12)):
        x = torch.randn(*shape, 2 * d)
        torch.testing.assert_close(program([x])[0], reference([x])[0], rtol=1e-4, atol=1e-5)


class _SelfAttention(torch.nn.Module):
    """Plain non-causal self-attention, head size 6: once a raw ORT InvalidArgument at the
    first call of a model that compiled fine."""

    def __init__(self, heads: int = 2, d: int = 6):
        super().__init__()
        self.heads, self.d = heads, d
        self.qkv = torch.nn.Linear(heads * d, 3 * heads * d)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, self.heads, self.d).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)


def test_head_size_6_self_attention_runs_on_onnxruntime():
    torch.manual_seed(0)
    model = _SelfAttention().eval()
    x = torch.randn(2, 5, 12)
    compiled = transfuse.optimize(model, (x,), target="onnxruntime",
                                  dynamic={"seq": (1, 32)})
    assert compiled.graph.find("attention"), "attention did not fuse"
    for s in (5, 9):
        y = torch.randn(2, s, 12)
        torch.testing.assert_close(compiled(y), model(y), rtol=1e-4, atol=1e-5)


def test_ort_run_error_is_an_execution_error(monkeypatch):
    """A route the kernel rejects at run time (forced here: GQA with head size 4) surfaces
    as ExecutionError naming the ORT node, the graph and the call's shapes."""
    monkeypatch.setattr(onnx_attention, "GQA_HEAD_SIZE",
                        HeadSizeLimit("GroupQueryAttention", 1, "test: no limit"))
    program = OrtProgram(_graph(4))
    assert f"{MS_DOMAIN}.GroupQueryAttention" in _ops(program)
    with pytest.raises(ExecutionError) as info:
        program([torch.randn(2, 5, 8)])
    text = str(info.value)
    assert "GroupQueryAttention node" in text and "head_size must be a multiple of 8" in text
    assert "'attn'" in text and "[2, 5, 8]" in text
    assert isinstance(info.value, TransfuseError)
