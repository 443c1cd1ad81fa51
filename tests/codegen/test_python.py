"""The python backend: every emitter against the reference interpreter, readable and
safe source, symbolic dims, the reference fallback, devices."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random
import sys

import pytest
import sympy
import torch

from transfuse.codegen.python import LOWERINGS, generate_python
from transfuse.codegen.python.dims import DimPrinter
from transfuse.ir.graph import Graph
from transfuse.ir.interpret import interpret
from transfuse.ir.ops import all_ops
from transfuse.ir.parser import parse_graph
from transfuse.ir.types import DType, TensorType, eval_dim, parse_dim

# -- the per-op case table ---------------------------------------------------------------
#
# A case: (id, op, inputs, attrs, env). An input is a type string, optionally with a
# data kind after a "|": "pos" (positive floats), "int:N" (integers in [0, N)), "true"
# (an all-true bool), "bool"; a leading "const " makes it a constant instead of a graph
# input. ``env`` gives the sizes of symbolic dims for the concrete inputs.

ENV = {"batch": 2, "seq": 5}
X = "f32[2, 3, 4]"
SEQ = "f32[batch, seq, 8]"


def _case(cid, op, inputs, attrs=None, env=None, out_types=None):
    return pytest.param(op, inputs, attrs or {}, env or ENV, out_types, id=cid)


CASES = [
    *[_case(op, op, [X, "f32[4]"]) for op in
      ("add", "sub", "mul", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge")],
    _case("div", "div", [X, "f32[4]|pos"]),
    _case("pow", "pow", [X + "|pos", "f32[]"]),
    _case("floor_div", "floor_div", ["i64[2, 3]|int:50", "i64[3]|pos"]),
    _case("remainder", "remainder", [X, "f32[4]|pos"]),
    *[_case(op, op, ["bool[2, 3]|bool", "bool[3]|bool"]) for op in
      ("logical_and", "logical_or", "logical_xor")],
    *[_case(op, op, [X]) for op in
      ("exp", "tanh", "erf", "sigmoid", "sin", "cos", "silu", "neg", "abs", "relu", "floor",
       "ceil", "sign")],
    *[_case(op, op, [X + "|pos"]) for op in ("log", "sqrt", "rsqrt", "reciprocal")],
    _case("exp-int", "exp", ["i64[3]|int:5"]),
    _case("logical_not", "logical_not", ["bool[2, 3]|bool"]),
    _case("gelu", "gelu", [X]),
    _case("gelu-tanh", "gelu", [X], {"approximate": "tanh"}),
    _case("cast", "cast", [X], {"dtype": DType.f16}),
    _case("cast-int", "cast", [X], {"dtype": DType.i32}),
    _case("where", "where", ["bool[2, 3, 4]|bool", X, "f32[]"]),
    _case("clamp", "clamp", [X], {"min": -0.5, "max": 0.5}),
    _case("clamp-min", "clamp", [X], {"min": 0.0}),
    _case("matmul", "matmul", [X, "f32[4, 6]"]),
    _case("matmul-batched", "matmul", ["f32[2, 3, 4]", "f32[2, 4, 5]"]),
    _case("linear", "linear", [SEQ, "const f32[6, 8]", "const f32[6]"]),
    _case("linear-nobias", "linear", [SEQ, "const f32[6, 8]"]),
    _case("identity", "identity", [X]),
    _case("dropout", "dropout", [X], {"p": 0.1}),
    _case("assert", "assert", ["bool[3]|true"], {"message": "it's 'quoted'"}),
    _case("torch_fallback", "torch_fallback", [X],
          {"target": "aten::flip.default", "args": json.dumps({"args": [{"$in": 0}, [1, 2]]})},
          out_types=["f32[2, 3, 4]"]),
    _case("torch_fallback-2out", "torch_fallback", [X],
          {"target": "aten::sort.default", "args": json.dumps({"args": [{"$in": 0}, -1]})},
          out_types=["f32[2, 3, 4]", "i64[2, 3, 4]"]),
    _case("layer_norm", "layer_norm", [SEQ, "const f32[8]", "const f32[8]"]),
    _case("layer_norm-bare", "layer_norm", [SEQ], {"eps": 1e-3}),
    _case("layer_norm-2d", "layer_norm", [X, "const f32[3, 4]"], {"normalized_ndim": 2}),
    _case("rms_norm", "rms_norm", [SEQ, "const f32[8]"]),
    _case("rms_norm-offset", "rms_norm", [SEQ, "const f32[8]"], {"offset": 1.0}),
    _case("rms_norm-noweight", "rms_norm", [SEQ]),
    _case("rms_norm-bf16", "rms_norm", ["bf16[batch, seq, 8]", "const bf16[8]"]),
    _case("rms_norm-bf16-noupcast", "rms_norm", ["bf16[2, 8]", "const bf16[8]"],
          {"upcast": False}),
    _case("reduce_sum", "reduce_sum", [X], {"axes": (1,)}),
    _case("reduce_sum-all", "reduce_sum", [X]),
    _case("reduce_mean", "reduce_mean", [X], {"axes": (-1,), "keepdim": True}),
    _case("reduce_max", "reduce_max", [X], {"axes": (0, 2)}),
    _case("reduce_min", "reduce_min", [X], {"axes": (2,), "keepdim": True}),
    _case("argmax", "argmax", [X], {"axis": 1}),
    _case("argmax-keep", "argmax", [X], {"axis": -1, "keepdim": True}),
    _case("softmax", "softmax", [X]),
    _case("log_softmax", "log_softmax", [X], {"axis": 1}),
    _case("cumsum", "cumsum", [X], {"axis": 1}),
    _case("cumsum-dtype", "cumsum", ["i32[4, 3]|int:9"], {"axis": 0, "dtype": DType.i64}),
    _case("reshape", "reshape", [SEQ], {"shape": [parse_dim("batch*seq"), 2, 4]}),
    _case("reshape-0d", "reshape", ["f32[1, 1]"], {"shape": []}),
    _case("permute", "permute", [SEQ], {"perm": (2, 0, 1)}),
    _case("expand", "expand", ["f32[batch, 1, 8]"], {"shape": ["batch", "seq", 8]},
          {"batch": 2, "seq": 5}),
    _case("expand-rank", "expand", ["f32[4]"], {"shape": [3, 4]}),
    _case("concat", "concat", [SEQ, SEQ, "f32[batch, seq, 2]"], {"axis": -1}),
    _case("split", "split", [SEQ], {"axis": 2, "sizes": [3, 5]}),
    _case("split-sym", "split", ["f32[batch, seq, 8]"], {"axis": 1, "sizes": [1, "seq - 1"]}),
    _case("slice", "slice", [SEQ], {"axis": 1, "start": 1, "end": "seq"}),
    _case("slice-step", "slice", [X], {"axis": -1, "start": 0, "step": 2}),
    _case("slice-neg", "slice", [X], {"axis": 1, "start": -2, "end": 3}),
    _case("index_select", "index_select", [X, "i64[5]|int:3"], {"axis": 1}),
    _case("index_select-0d", "index_select", [X, "i64[]|int:3"], {"axis": 1}),
    _case("gather", "gather", [X, "i64[2, 3, 2]|int:4"], {"axis": 2}),
    _case("index", "index", [X, "i64[seq]|int:2", "i64[seq]|int:4"], {"axes": (0, 2)}),
    _case("index-mask", "index", ["f32[batch, seq]", "i64[batch, 1]|int:2",
                                  "i64[1, seq]|int:5"], {"axes": (0, 1)}),
    _case("scatter_nd", "scatter_nd", [X, "i64[1, 2]|int:2", "f32[1, 4]"]),
    _case("scatter_nd-add", "scatter_nd", [X, "i64[5, 1]|int:2", "f32[5, 3, 4]"],
          {"reduction": "add"}),
    _case("embedding", "embedding", ["const f32[11, 6]", "i64[batch, seq]|int:11"]),
    _case("arange", "arange", [], {"end": "seq"}),
    _case("arange-step", "arange", [], {"start": 1, "end": parse_dim("2*seq + 1"), "step": 3,
                                        "dtype": DType.i32}),
    _case("full", "full", [], {"shape": [2, "seq"], "value": -1.5, "dtype": DType.f32}),
    _case("full-inf", "full", [], {"shape": [3], "value": float("-inf"), "dtype": DType.f32}),
    _case("tril", "tril", [X], {"diagonal": 1}),
    _case("triu", "triu", ["f32[seq, seq]"], {"diagonal": -1}),
    _case("shape_of", "shape_of", [SEQ], {"axis": 1}),
    # attention: q, k, v (+ bias, key_padding_mask); bhsd unless said
    _case("attention", "attention", ["f32[2, 4, 5, 8]"] * 3),
    _case("attention-causal", "attention", ["f32[batch, 4, seq, 8]"] * 3, {"causal": True}),
    _case("attention-causal-kvcache", "attention",
          ["f32[2, 4, 3, 8]", "f32[2, 4, 7, 8]", "f32[2, 4, 7, 8]"], {"causal": True}),
    _case("attention-window", "attention", ["f32[2, 4, 6, 8]"] * 3,
          {"causal": True, "window": 2, "scale": 0.3}),
    _case("attention-gqa", "attention",
          ["f32[2, 4, 5, 8]", "f32[2, 2, 5, 8]", "f32[2, 2, 5, 8]"], {"kv_heads": 2,
                                                                      "causal": True}),
    _case("attention-mqa-dv", "attention",
          ["f32[2, 4, 5, 8]", "f32[2, 1, 6, 8]", "f32[2, 1, 6, 3]"]),
    _case("attention-alibi", "attention", ["f32[2, 4, 5, 8]"] * 3,
          {"causal": True, "alibi": (0.5, 0.25, 0.125, 0.0625)}),
    _case("attention-bias", "attention", ["f32[2, 4, 5, 8]"] * 3 + ["f32[2, 1, 5, 5]"]),
    _case("attention-bias-causal-kpm", "attention",
          ["f32[2, 4, 5, 8]"] * 3 + ["f32[1, 4, 5, 5]", "i64[2, 5]|kpm"], {"causal": True}),
    _case("attention-kpm", "attention", ["f32[2, 4, 5, 8]"] * 3 + [None, "bool[2, 5]|kpm"]),
    _case("attention-alibi-window-gqa-kpm", "attention",
          ["f32[2, 4, 6, 8]", "f32[2, 2, 6, 8]", "f32[2, 2, 6, 8]", None, "i64[2, 6]|kpm"],
          {"causal": True, "window": 3, "alibi": (0.5, 0.25, 0.125, 0.0625)}),
    _case("attention-bshd", "attention", ["f32[batch, seq, 4, 8]"] * 3,
          {"causal": True, "layout": "bshd"}),
    _case("attention-softcap", "attention", ["f32[2, 4, 5, 8]"] * 3,
          {"causal": True, "softcap": 5.0}),
    # fused ops made by the recognition passes (transfuse/codegen/python/fused.py)
    _case("linear-gelu-tanh", "linear", [SEQ, "const f32[6, 8]", "const f32[6]"],
          {"activation": "gelu_tanh"}),
    _case("linear-silu", "linear", [SEQ, "const f32[6, 8]"], {"activation": "silu"}),
    _case("swiglu", "swiglu", [SEQ, SEQ]),
    _case("rotary", "rotary", ["f32[batch, 2, seq, 8]", "f32[seq, 8]", "f32[seq, 8]"]),
    _case("rotary-interleaved", "rotary", ["f32[2, seq, 2, 8]", "f32[seq, 1, 8]",
                                           "f32[seq, 1, 8]"], {"interleaved": True}),
    _case("add_norm-layer", "add_norm", [SEQ, SEQ, "const f32[8]", "const f32[8]"],
          {"kind": "layer", "eps": 1e-5}),
    _case("add_norm-rms-bf16", "add_norm", ["bf16[batch, seq, 8]", "bf16[batch, seq, 8]",
                                            "const bf16[8]"],
          {"kind": "rms", "eps": 1e-6, "upcast": True}),
    _case("add_norm-rms-broadcast", "add_norm", ["f32[seq, 8]", SEQ],
          {"kind": "rms", "eps": 1e-6}),
    # one token at position 0 of a sequence in a random slot, seq_lens >= 1 (later keys
    # masked); the kernel's steps are tested in tests/ir/test_cached_attention.py
    _case("cached_attention", "cached_attention",
          ["f32[1, 4, 1, 8]", "f32[1, 2, 1, 8]", "f32[1, 2, 1, 8]", "f32[3, 6, 2, 8]",
           "f32[3, 6, 2, 8]", "i64[1]|int:1", "i64[1]|int:1", "i64[1]|pos", "i64[1]|int:3"],
          {"kv_heads": 2}),
]

#: cases whose emitter refuses on purpose (they run the reference implementation)
REFUSED = {"attention-softcap"}


def _data(t: TensorType, kind: str, env) -> torch.Tensor:
    shape = t.concrete(env)
    dtype = t.dtype.torch
    if kind == "true":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "bool":
        return torch.rand(shape) < 0.5
    if kind == "kpm":  # key padding: the first key always attended
        m = torch.rand(shape) < 0.7
        m[..., 0] = True
        return m.to(dtype)
    if kind.startswith("int:"):
        return torch.randint(0, int(kind[4:]), shape, dtype=dtype)
    if kind == "pos":
        if not t.dtype.is_float:
            return torch.randint(1, 5, shape, dtype=dtype)
        return (torch.rand(shape) + 0.5).to(dtype)
    return torch.randn(shape).to(dtype)


def build_case(op, inputs, attrs, env, out_types=None):
    """A one-node graph and concrete inputs for it."""
    g = Graph(op)
    args, feeds = [], []
    for i, spec in enumerate(inputs):
        if spec is None:
            args.append(None)
            continue
        const = spec.startswith("const ")
        text, _, kind = spec.removeprefix("const ").partition("|")
        t = TensorType.parse(text)
        data = _data(t, kind, env)
        if const:
            args.append(g.add_constant(data, f"c{i}"))
        else:
            args.append(g.add_input(f"in{i}", t))
            feeds.append(data)
    g.add_input("sizes", TensorType.parse("i64[batch, seq]"))  # binds the symbols for attrs
    feeds.append(torch.zeros(env["batch"], env["seq"], dtype=torch.int64))
    types = [TensorType.parse(s) for s in out_types] if out_types else None
    node = g.create(op, args, attrs, out_types=types, meta={"source": f"case.{op}"})
    g.set_outputs(list(node.outputs))
    return g, feeds


def assert_same(got, want, what=""):
    assert len(got) == len(want), what
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{list(a.shape)} " \
                                                          f"vs {b.dtype}{list(b.shape)}"
        if a.is_floating_point():
            tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(a.dtype, 1e-5)
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=what)
        else:
            assert torch.equal(a, b), what


@pytest.mark.parametrize("op, inputs, attrs, env, out_types", CASES)
def test_op_matches_interpreter(op, inputs, attrs, env, out_types, request):
    g, feeds = build_case(op, inputs, attrs, env, out_types)
    program = generate_python(g)
    assert_same(program(feeds), interpret(g, feeds), program.source)
    if request.node.callspec.id in REFUSED:
        assert program.reference_ops and program.reference_count == 1
    else:
        assert program.reference_count == 0, program.reference_ops
        assert "_ref(" not in program.source


def _shared_cases():
    """The per-op case table of tests/ir/test_opdefs.py (owned by the IR tests), if present."""
    path = pathlib.Path(__file__).parents[1] / "ir" / "test_opdefs.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("_ir_opdef_cases", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


OPDEF_CASES = _shared_cases()


def _shared_params():
    if OPDEF_CASES is None:
        return [pytest.param(None, None, marks=pytest.mark.skip("tests/ir/test_opdefs.py absent"))]
    return [pytest.param(op, case, id=f"{op}-{case.id or i}")
            for op, cases in OPDEF_CASES.CASES.items() for i, case in enumerate(cases)]


@pytest.mark.parametrize("op, case", _shared_params())
def test_shared_op_cases_match_interpreter(op, case):
    g, node = OPDEF_CASES.build(op, case)
    program = generate_python(g)
    gen = torch.Generator().manual_seed(0)
    for env in OPDEF_CASES.ENVS:
        anchor = torch.zeros(env["batch"], env["seq"])
        tensors = [spec.make(env, gen) for spec in case.inputs if spec is not None]
        feeds = [anchor, *tensors]
        assert_same(program(feeds), interpret(g, feeds, check_types=False),
                    f"{env}\n{program.source}")
    refused = LOWERINGS.supports(node) is not None
    assert program.reference_count == int(refused)
    if op != "attention":  # the only emitter that refuses some nodes (softcap)
        assert not refused, f"{op} has no python emitter"


#: emitters tested in their own file (quantized weights need quant types the cases lack)
OWN_TESTS = {"qlinear": "tests/codegen/test_python_quant.py",
             "qmatmul": "tests/codegen/test_python_quant.py"}


def test_every_emitter_has_a_case():
    covered = {p.values[0] for p in CASES} | set(OWN_TESTS)
    assert LOWERINGS.ops() - covered == set()
    assert LOWERINGS.ops() <= set(all_ops()), "emitter for an op that is not registered"


#: IR ops that deliberately have no python emitter and run their reference implementation
#: (op -> why). Reviewed: add an op here only with the reason its torch reference is the
#: best the python backend can do.
REFERENCE_ONLY: dict[str, str] = {}


def test_every_op_has_an_emitter_or_a_reviewed_reason():
    """A new IR op needs a python emitter (an op-family file of codegen/python) or an entry
    in REFERENCE_ONLY; an entry for an op that has an emitter, or no longer exists, is stale."""
    missing = sorted(set(all_ops()) - LOWERINGS.ops() - set(REFERENCE_ONLY))
    assert missing == [], f"IR ops without a python emitter: {missing}"
    stale = sorted(set(REFERENCE_ONLY) & (LOWERINGS.ops() | (set(REFERENCE_ONLY)
                                                             - set(all_ops()))))
    assert stale == [], f"REFERENCE_ONLY entries that have an emitter or no op: {stale}"


def test_op_without_emitter_runs_the_reference():
    """An op whose emitter is missing compiles through _ref, counted and numerically exact."""
    g, feeds = build_case("gelu", [X], {"approximate": "tanh"}, ENV)
    saved = LOWERINGS.remove("gelu")
    try:
        program = generate_python(g)
    finally:
        LOWERINGS.add(saved)
    assert program.reference_ops == {"gelu": "no python lowering for op 'gelu'"}
    assert "_ref('gelu', 0, [in0], _env)" in program.source
    assert_same(program(feeds), interpret(g, feeds))


# -- whole graphs, readability, safety ----------------------------------------------------------

BLOCK = """
graph block(%x: f32[batch, seq, 16], %mask: i64[batch, seq]) {
  const %ln_w: f32[16]
  const %ln_b: f32[16]
  const %qkv_w: f32[48, 16]
  const %proj_w: f32[16, 16]
  const %proj_b: f32[16]
  %h: f32[batch, seq, 16] = layer_norm(%x, %ln_w, %ln_b)  # @h.0.ln_1
  %qkv: f32[batch, seq, 48] = linear(%h, %qkv_w, _)  # @h.0.attn.c_attn
  %q, %k, %v = split(%qkv) {axis=-1, sizes=[16, 16, 16]}  # @h.0.attn
  %q4: f32[batch, seq, 4, 4] = reshape(%q) {shape=[batch, seq, 4, 4]}  # @h.0.attn
  %k4: f32[batch, seq, 4, 4] = reshape(%k) {shape=[batch, seq, 4, 4]}  # @h.0.attn
  %v4: f32[batch, seq, 4, 4] = reshape(%v) {shape=[batch, seq, 4, 4]}  # @h.0.attn
  %a: f32[batch, seq, 4, 4] = attention(%q4, %k4, %v4, _, %mask) {causal, layout="bshd"}  # @h.0.attn <- attention.fuse-sdpa
  %a2: f32[batch, seq, 16] = reshape(%a) {shape=[batch, seq, 16]}  # @h.0.attn
  %o: f32[batch, seq, 16] = linear(%a2, %proj_w, %proj_b)  # @h.0.attn.c_proj
  %y: f32[batch, seq, 16] = add(%x, %o)  # @h.0
  %half: f32[batch, floor(seq/2), 16] = slice(%y) {axis=1, end=floor(seq/2)}
  return %y, %half
}
"""


def _block_graph():
    text = BLOCK.replace("%q, %k, %v = split",
                         "%q: f32[batch, seq, 16], %k: f32[batch, seq, 16], "
                         "%v: f32[batch, seq, 16] = split")
    return parse_graph(text)


def _block_inputs(batch=2, seq=6):
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, 1:3] = 0  # padding, but no query row loses every key (SDPA gives 0 there, not NaN)
    return [torch.randn(batch, seq, 16), mask]


def test_block_matches_interpreter_at_several_lengths():
    g = _block_graph()
    program = generate_python(g)
    for batch, seq in [(2, 6), (1, 1), (3, 9)]:
        feeds = _block_inputs(batch, seq)
        assert_same(program(feeds), interpret(g, feeds), f"{batch=} {seq=}")


def test_source_is_readable():
    program = generate_python(_block_graph())
    src = program.source
    assert "def forward(x, mask):" in src
    assert "seq = x.shape[1]" in src and "batch = x.shape[0]" in src
    assert "F.scaled_dot_product_attention(" in src
    assert "F.layer_norm(x, (16,), ln_w, ln_b, 1e-05)" in src
    assert "# h.0.attn.c_attn" in src and "<- attention.fuse-sdpa" in src
    assert "y[:, :seq // 2]" in src  # sympy floor printed as //
    assert "del " in src  # values freed after their last use
    assert program.reference_ops == {}


def test_constants_are_not_embedded_in_source():
    g = Graph()
    x = g.add_input("x", TensorType(DType.f32, [4, 512]))
    w = g.add_constant(torch.randn(512, 512), "big_weight")
    g.set_outputs([g.op("linear", x, w)])
    program = generate_python(g)
    assert len(program.source) < 1000, program.source
    assert "big_weight = _c['big_weight']" in program.source
    assert program.constants["big_weight"] is w.const  # bound, not copied


def test_untrusted_graph_text_cannot_inject_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"x\nimport pathlib; pathlib.Path({str(marker)!r}).touch()\n#"
    g = Graph("evil\nimport os")
    x = g.add_input("x", TensorType(DType.bool, [3]))
    n = g.create("assert", [x], {"message": f"'); import os; os.system('touch {marker}'); ('"})
    n.meta["source"] = evil
    n.meta["origin"] = "\r\nimport os"
    y = g.op("logical_not", x)
    g.set_outputs([y])
    program = generate_python(g)
    program([torch.ones(3, dtype=torch.bool)])
    assert not marker.exists()
    assert "\nimport" not in program.source and "\rimport" not in program.source
    with pytest.raises(AssertionError, match="import os"):  # the message is data, not code
        program([torch.zeros(3, dtype=torch.bool)])


def test_value_names_are_sanitised_and_distinct():
    g = Graph()
    a = g.add_input("torch", TensorType(DType.f32, [3]))
    b = g.add_input("F", TensorType(DType.f32, [3]))
    c = g.op("add", a, b, name="class")
    d = g.op("mul", c, c)
    g.set_outputs([d, c])
    assert d.name[0].isdigit()
    program = generate_python(g)
    assert "def forward(torch_1, F_1):" in program.source
    assert "class_1 = torch_1 + F_1" in program.source
    assert f"v{d.name} = class_1 * class_1" in program.source
    xa, xb = torch.randn(3), torch.randn(3)
    assert_same(program([xa, xb]), interpret(g, [xa, xb]))


def test_runtime_error_names_the_node():
    g = Graph()
    x = g.add_input("x", TensorType(DType.f32, [2, 3]))
    g.set_outputs([g.create("torch_fallback", [x], {
        "target": "aten::reshape.default", "args": json.dumps({"args": [{"$in": 0}, [7]]})},
        out_types=[TensorType(DType.f32, [7])], meta={"source": "blocks.3.view"}).output])
    program = generate_python(g)
    with pytest.raises(RuntimeError) as info:
        program([torch.randn(2, 3)])
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "blocks.3.view" in notes and "call_fallback('aten::reshape.default'" in notes


def test_runs_under_inference_mode():
    g = Graph()
    x = g.add_input("x", TensorType(DType.f32, [3]))
    g.set_outputs([g.op("exp", x)])
    out = generate_python(g)([torch.randn(3, requires_grad=True)])[0]
    assert out.is_inference() and not out.requires_grad
    out = generate_python(g, inference_mode=False)([torch.randn(3, requires_grad=True)])[0]
    assert out.requires_grad


def test_to_device_rebinds_constants():
    g = Graph()
    x = g.add_input("x", TensorType(DType.f32, [2, 3]))
    w = g.add_constant(torch.randn(4, 3), "w")
    g.set_outputs([g.op("linear", x, w)])
    program = generate_python(g)
    assert program.device == torch.device("cpu")
    program.to("meta")
    assert program.constants["w"].device.type == "meta" and w.const.device.type == "cpu"
    assert program([torch.empty(2, 3, device="meta")])[0].device.type == "meta"


def test_creation_ops_follow_the_inputs_without_constants():
    g = Graph()
    x = g.add_input("x", TensorType(DType.f32, [sympy.Symbol("n", integer=True, positive=True)]))
    r = g.op("arange", end=parse_dim("n"), dtype=DType.f32)
    g.set_outputs([g.op("add", x, r)])
    program = generate_python(g)
    assert "_dev = x.device" in program.source
    assert program([torch.empty(4, device="meta")])[0].device.type == "meta"


@pytest.mark.parametrize("text", [
    "seq", "seq + 1", "seq - 1", "2*seq + batch", "batch*seq - 3*seq", "seq//2", "(seq + 1)//2",
    "seq*(seq + 1)//2", "Mod(seq, 3)", "-(-seq//4)", "Max(seq, 4)", "Min(seq, batch) + 1",
    "seq**2", "ceiling(seq/3)", "4*floor(seq/4)",
])
def test_dim_printer_matches_eval_dim(text):
    d = parse_dim(text)
    expr = DimPrinter(lambda s: s)(d)
    rng = random.Random(text)
    for _ in range(20):
        env = {"seq": rng.randint(1, 100), "batch": rng.randint(1, 9)}
        assert eval(expr, {"max": max, "min": min}, dict(env)) == eval_dim(d, env), expr


@pytest.mark.gpu
def test_cuda_program_matches_cpu():
    g = _block_graph()
    cpu = generate_python(g)
    gpu = generate_python(g, device="cuda")
    feeds = _block_inputs(2, 7)
    want = cpu(feeds)
    got = gpu([t.cuda() for t in feeds])
    for a, b in zip(got, want):
        assert a.device.type == "cuda"
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)
    assert cpu.to("cuda").constants["qkv_w"].device.type == "cuda"


def test_attention_mask_is_built_once_for_all_layers():
    g = Graph()
    q = g.add_input("q", TensorType.parse("f32[batch, 4, seq, 8]"))
    kpm = g.add_input("kpm", TensorType.parse("i64[batch, seq]"))
    h = q
    for _ in range(3):
        h = g.op("attention", h, h, h, None, kpm, causal=True)
    g.set_outputs([h])
    program = generate_python(g)
    assert program.source.count("_attn_mask(") == 1
    assert program.source.count("attn_mask=attn_mask") == 3
    feeds = [torch.randn(2, 4, 5, 8), torch.ones(2, 5, dtype=torch.int64)]
    feeds[1][1, 3] = 0
    assert_same(program(feeds), interpret(g, feeds))
