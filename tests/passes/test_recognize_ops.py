"""The fused ops the recognition passes make (swiglu, rotary, add_norm, linear's activation):
verifier refusals, and python emitters that compute what the reference does."""

from __future__ import annotations

import pytest
import torch
from pass_helpers import sample_inputs

from transfuse.codegen.python import generate_python
from transfuse.errors import IRVerifyError
from transfuse.ir.graph import Graph
from transfuse.ir.interpret import interpret
from transfuse.ir.parser import parse_graph
from transfuse.ir.types import DType, TensorType
from transfuse.ir.verify import verify


@pytest.mark.parametrize("text", [
    """
graph main(%x: f32[batch, 2, seq, 8], %c: f32[seq, 8], %s: f32[seq, 8]) {
  %0: f32[batch, 2, seq, 8] = rotary(%x, %c, %s)
  return %0
}""",
    """
graph main(%x: bf16[batch, seq, 2, 8], %c: bf16[seq, 1, 8], %s: bf16[seq, 1, 8]) {
  %0: bf16[batch, seq, 2, 8] = rotary(%x, %c, %s) {interleaved}
  return %0
}""",
    """
graph main(%g: f32[batch, seq, 16], %u: f32[batch, seq, 16]) {
  %0: f32[batch, seq, 16] = swiglu(%g, %u)
  return %0
}""",
    """
graph main(%x: f32[batch, seq, 8], %r: f32[batch, seq, 8]) {
  const %w: f32[8]
  const %b: f32[8]
  %0: f32[batch, seq, 8], %1: f32[batch, seq, 8] = add_norm(%x, %r, %w, %b) {kind="layer", eps=1e-05}
  return %0, %1
}""",
    """
graph main(%x: bf16[seq, 8], %r: bf16[batch, seq, 8]) {
  const %w: bf16[8]
  %0: bf16[batch, seq, 8], %1: bf16[batch, seq, 8] = add_norm(%x, %r, %w) {kind="rms", eps=1e-06, offset=1.0, upcast}
  return %0, %1
}""",
    """
graph main(%x: f32[batch, 8]) {
  const %w: f32[16, 8]
  const %b: f32[16]
  %0: f32[batch, 16] = linear(%x, %w, %b) {activation="silu"}
  return %0
}""",
], ids=["rotary-half", "rotary-interleaved-bf16", "swiglu", "add-layer-norm", "add-rms-norm",
        "linear-silu"])
def test_python_emitter_matches_the_reference(text):
    graph = parse_graph(text)
    verify(graph)
    inputs = sample_inputs(graph)
    program = generate_python(graph)
    assert not program.reference_ops, program.reference_ops
    want, got = interpret(graph, inputs), program(inputs)
    for w, g in zip(want, got, strict=True):
        # F.rms_norm / F.layer_norm reduce in their own order; the rest is op-for-op the same
        tol = 1e-2 if w.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def _graph(op: str, types: list[TensorType], **attrs) -> Graph:
    g = Graph()
    vals = [g.add_input(f"x{i}", t) for i, t in enumerate(types)]
    node = g.create(op, vals, attrs)
    g.set_outputs(list(node.outputs))
    return g


def f32(*shape):
    return TensorType(DType.f32, shape)


@pytest.mark.parametrize("op,types,attrs,message", [
    ("rotary", [f32(2, 5, 7), f32(5, 7), f32(5, 7)], {}, "static even size"),
    ("rotary", [f32(2, 5, 8), f32(5, 4), f32(5, 4)], {}, "do not broadcast"),
    ("rotary", [f32(2, 5, 8), f32(5, 1), f32(5, 1)], {}, "full width"),
    ("rotary", [f32(5, 8), f32(3, 5, 8), f32(5, 8)], {}, "without enlarging"),
    ("add_norm", [f32(5, 8), f32(5, 8)], {"kind": "batch", "eps": 1e-5}, "kind must be"),
    ("add_norm", [f32(5, 8), f32(5, 8)], {"kind": "layer", "eps": 1e-5, "upcast": True},
     "rms attributes"),
    ("add_norm", [f32(5, 8), f32(5, 8), f32(4)], {"kind": "rms", "eps": 1e-5},
     "does not match normalized shape"),
    ("linear", [f32(5, 8), f32(3, 8)], {"activation": "tanh"}, "activation must be one of"),
])
def test_verify_rejects(op, types, attrs, message):
    with pytest.raises(IRVerifyError, match=message):
        verify(_graph(op, types, **attrs))
