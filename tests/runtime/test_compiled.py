"""CompiledModel: calls checked against the signature, outputs in the model's structure."""

from __future__ import annotations

import pytest
import torch

from transfuse.errors import InputError, LoweringError
from transfuse.ir.interpret import interpret
from transfuse.ir.parser import parse_graph
from transfuse.ir.signature import InputSpec, Signature
from transfuse.runtime.compiled import CompiledModel

GRAPH = """
graph tiny(%x: f32[batch, seq, 8], %mask: i64[batch, seq]) {
  const %w: f32[4, 8]
  const %b: f32[4]
  %h: f32[batch, seq, 4] = linear(%x, %w, %b)  # uses=2 @proj
  %m: f32[batch, seq] = cast(%mask) {dtype=f32}  # uses=1
  %s: f32[batch, seq] = reduce_sum(%h) {axes=[-1]}  # uses=1 @head
  %y: f32[batch, seq] = mul(%s, %m)  # uses=1 @head
  return %h, %y
}
"""


def tree(kind, *items, keys=None):
    d = {"kind": kind, "items": list(items)}
    if keys is not None:
        d["keys"] = keys
    return d


def leaf(i):
    return {"kind": "tensor", "index": i}


def make_model(output_tree=None, pass_log=None) -> CompiledModel:
    g = parse_graph(GRAPH)
    sig = Signature(
        inputs=[InputSpec("x", g.inputs[0].type),
                InputSpec("mask", g.inputs[1].type, keyword=True)],
        symbols={"batch": (1, 4), "seq": (2, 16)},
        output_tree=output_tree or tree("tuple", leaf(0), leaf(1)),
        num_outputs=2,
    )
    return CompiledModel(g, sig, pass_log)


def inputs(batch=2, seq=5):
    return torch.randn(batch, seq, 8), torch.ones(batch, seq, dtype=torch.int64)


def test_call_matches_the_interpreter_and_keeps_the_tuple():
    model = make_model()
    x, mask = inputs()
    out = model(x, mask=mask)
    assert isinstance(out, tuple) and len(out) == 2
    want = interpret(model.graph, [x, mask])
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b)


def test_nested_dict_outputs():
    model = make_model(tree("dict", leaf(1), tree("list", leaf(0), {"kind": "const", "value": 3}),
                            keys=["logits", "extra"]))
    x, mask = inputs()
    out = model(x, mask=mask)
    assert list(out) == ["logits", "extra"]
    assert out["logits"].shape == (2, 5) and isinstance(out["extra"], list)
    assert out["extra"][1] == 3 and out["extra"][0].shape == (2, 5, 4)


@pytest.mark.parametrize("case, args, kwargs, match", [
    ("dtype", lambda x, m: (x.double(),), lambda x, m: {"mask": m}, r"'x'.*dtype"),
    ("rank", lambda x, m: (x[0],), lambda x, m: {"mask": m}, r"'x'.*rank"),
    ("static dim", lambda x, m: (torch.randn(2, 5, 9),), lambda x, m: {"mask": m},
     r"'x'.*dim 2 must be 8"),
    ("symbol range", lambda x, m: (torch.randn(2, 17, 8),),
     lambda x, m: {"mask": torch.ones(2, 17, dtype=torch.int64)}, r"'x'.*seq.*17.*\[2, 16\]"),
    ("symbol range low", lambda x, m: (torch.randn(2, 1, 8),),
     lambda x, m: {"mask": torch.ones(2, 1, dtype=torch.int64)}, r"'x'.*seq"),
    ("inconsistent symbol", lambda x, m: (x,),
     lambda x, m: {"mask": torch.ones(2, 6, dtype=torch.int64)}, r"'mask'.*seq.*6.*5"),
    ("missing kwarg", lambda x, m: (x,), lambda x, m: {}, r"missing input 'mask'"),
    ("unexpected kwarg", lambda x, m: (x,), lambda x, m: {"mask": m, "foo": m}, r"'foo'"),
    ("too many positional", lambda x, m: (x, m, m), lambda x, m: {}, r"positional"),
    ("not a tensor", lambda x, m: ([1.0],), lambda x, m: {"mask": m}, r"'x'.*tensor"),
])
def test_bad_inputs_are_input_errors(case, args, kwargs, match):
    model = make_model()
    x, mask = inputs()
    with pytest.raises(InputError, match=match):
        model(*args(x, mask), **kwargs(x, mask))


def test_inputs_on_another_device_are_refused():
    model = make_model().to("meta")
    assert model.device.type == "meta"
    assert model.graph.constants["w"].const.device.type == "meta"  # one copy of the weights
    with pytest.raises(InputError, match=r"'x' is on cpu.*meta"):
        model(*inputs()[:1], mask=inputs()[1])


def test_properties_and_repr():
    model = make_model()
    assert model.backend == "python" and model.pass_log is None
    assert "def forward(x, mask):" in model.source
    text = repr(model)
    assert "linear×1" in text and "seq∈[2, 16]" in text and "36 (" in text
    assert "x: f32[batch, seq, 8]" in text


def test_signature_must_match_the_graph():
    g = parse_graph(GRAPH)
    sig = Signature([InputSpec("x", g.inputs[0].type)], {}, tree("tuple", leaf(0)), 2)
    with pytest.raises(LoweringError, match="signature has 1 inputs"):
        CompiledModel(g, sig)
    sig = Signature([InputSpec("x", g.inputs[0].type), InputSpec("mask", g.inputs[0].type)], {},
                    tree("tuple", leaf(0)), 2)
    with pytest.raises(LoweringError, match="'mask' is f32"):
        CompiledModel(g, sig)


def test_unknown_backend():
    g = parse_graph(GRAPH)
    sig = Signature([InputSpec("x", g.inputs[0].type), InputSpec("mask", g.inputs[1].type)], {},
                    tree("tuple", leaf(0), leaf(1)), 2)
    with pytest.raises(LoweringError, match="unknown target 'tvm'"):
        CompiledModel(g, sig, backend="tvm")
