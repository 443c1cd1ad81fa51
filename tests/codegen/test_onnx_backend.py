"""The onnxruntime backend: every lowering against the python backend (fused and standard
ops), each com.microsoft mapping checked numerically and structurally, the refusals."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import onnx
import pytest
import torch

from transfuse.codegen.onnx import LOWERINGS, MS_DOMAIN, OrtProgram, export_graph
from transfuse.codegen.python import generate_python
from transfuse.errors import LoweringError
from transfuse.ir.graph import Graph
from transfuse.ir.ops import all_ops
from transfuse.ir.parser import parse_graph
from transfuse.ir.types import DType, TensorType

pytest.importorskip("onnxruntime")


def _load(name: str, rel: str):
    """A sibling test module (they are not a package), for its case tables."""
    path = pathlib.Path(__file__).parents[1] / rel
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


PY = _load("_python_backend_cases", "codegen/test_python.py")

#: ORT's CPU execution provider has no bf16 kernels for these ops
CPU_UNSUPPORTED = {"rms_norm-bf16", "rms_norm-bf16-noupcast", "add_norm-rms-bf16"}
#: fp32: ORT's MLAS GEMMs round more than the python reference's small-M native kernel (measured
#: on the kv_heads=1 attention case against fp64: projection error MLAS-like MKL 4.5e-6 vs native
#: 1.3e-6, attention output 6.0e-5 vs 1.1e-5), so the two may differ by ~5e-5 at |x| ~ 1.5
TOL = {torch.float16: 2e-3, torch.float32: 1e-4}


def assert_close(got, want, what=""):
    assert len(got) == len(want), what
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if a.is_floating_point():
            tol = TOL.get(a.dtype, 2e-5)  # other dtypes (f64): tight
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=what)
        else:
            assert torch.equal(a, b), what


def ops_of(model: onnx.ModelProto) -> list[str]:
    return [n.op_type if n.domain != MS_DOMAIN else f"ms.{n.op_type}" for n in model.graph.node]


# -- every op, both lowerings -----------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "standard"])
@pytest.mark.parametrize("op, inputs, attrs, env, out_types", PY.CASES)
def test_op_matches_python_backend(op, inputs, attrs, env, out_types, fused, request):
    case_id = request.node.callspec.id.rsplit("-", 1)[0]
    g, feeds = PY.build_case(op, inputs, attrs, env, out_types)
    if op == "torch_fallback":
        with pytest.raises(LoweringError, match=attrs["target"]):
            OrtProgram(g, fused=fused)
        return
    if op == "cached_attention":  # in-place caches: GenerationOrtProgram, tested on its own
        with pytest.raises(LoweringError, match="in place"):
            OrtProgram(g, fused=fused)
        return
    if case_id in CPU_UNSUPPORTED:
        with pytest.raises(LoweringError, match="onnxruntime rejected"):
            OrtProgram(g, fused=fused)
        return
    program = OrtProgram(g, fused=fused)
    want = generate_python(g)(feeds)
    assert_close(program(feeds), want, program.source)
    if not fused:
        assert not program.fused_counts, "standard-ops export used a com.microsoft op"


@pytest.mark.parametrize("op, case", PY._shared_params())  # the same params as there
def test_shared_op_cases_at_several_sizes(op, case):
    """The IR's own case table, one session for every size of its symbolic dims."""
    mod = PY.OPDEF_CASES
    g, _ = mod.build(op, case)
    if op == "torch_fallback":
        with pytest.raises(LoweringError, match="torch_fallback"):
            OrtProgram(g)
        return
    if any(v.type.dtype == DType.bf16 for v in g.inputs) or any(
            v.type.dtype == DType.bf16 for n in g.nodes for v in n.outputs):
        pytest.skip("ORT's CPU execution provider has no bf16 kernels")
    try:
        program = OrtProgram(g)
    except LoweringError as e:
        if "NOT_IMPLEMENTED" in str(e):  # an ORT CPU kernel missing for this dtype
            pytest.skip(str(e)[:200])
        raise
    reference = generate_python(g)
    gen = torch.Generator().manual_seed(0)
    for env in mod.ENVS:
        anchor = torch.zeros(env["batch"], env["seq"])
        tensors = [spec.make(env, gen) for spec in case.inputs if spec is not None]
        feeds = [anchor, *tensors]
        assert_close(program(feeds), reference(feeds), f"{env}\n{program.source}")


def test_every_op_has_a_lowering():
    missing = set(all_ops()) - set(LOWERINGS)
    assert missing == set(), f"ops without an onnx lowering: {sorted(missing)}"
    assert set(LOWERINGS) <= set(all_ops())


def test_training_dropout_is_refused_with_the_reason():
    g = Graph()
    x = g.add_input("x", TensorType(DType.f32, [3]))
    g.set_outputs([g.op("dropout", x, p=0.5, train=True)])
    with pytest.raises(LoweringError, match="dropout.*training-mode"):
        export_graph(g)


# -- fused-op mappings --------------------------------------------------------------------------

ATTN = """
graph attn(%x: f32[batch, seq, 64]) {{
  const %w: f32[{qkv}, 64]
  const %bqkv: f32[{qkv}]
  %qkv: f32[batch, seq, {qkv}] = linear(%x, %w, %bqkv)
  %q: f32[batch, seq, 64], %k: f32[batch, seq, {kv}], %v: f32[batch, seq, {kv}] = split(%qkv) {{axis=-1, sizes=[64, {kv}, {kv}]}}
  %q4: f32[batch, seq, 4, 16] = reshape(%q) {{shape=[batch, seq, 4, 16]}}
  %k4: f32[batch, seq, {hkv}, 16] = reshape(%k) {{shape=[batch, seq, {hkv}, 16]}}
  %v4: f32[batch, seq, {hkv}, 16] = reshape(%v) {{shape=[batch, seq, {hkv}, 16]}}
  %qh: f32[batch, 4, seq, 16] = permute(%q4) {{perm=[0, 2, 1, 3]}}
  %kh: f32[batch, {hkv}, seq, 16] = permute(%k4) {{perm=[0, 2, 1, 3]}}
  %vh: f32[batch, {hkv}, seq, 16] = permute(%v4) {{perm=[0, 2, 1, 3]}}
  %a: f32[batch, 4, seq, 16] = attention(%qh, %kh, %vh{extra}) {{{attrs}}}
  %at: f32[batch, seq, 4, 16] = permute(%a) {{perm=[0, 2, 1, 3]}}
  %o: f32[batch, seq, 64] = reshape(%at) {{shape=[batch, seq, 64]}}
  return %o
}}
"""


def attention_graph(attrs: str, hkv: int = 4, extra_inputs: str = "", extra: str = ""):
    text = ATTN.format(qkv=64 + 2 * 16 * hkv, kv=16 * hkv, hkv=hkv, attrs=attrs, extra=extra)
    if extra_inputs:
        text = text.replace("(%x: f32[batch, seq, 64])",
                            f"(%x: f32[batch, seq, 64], {extra_inputs})")
    return parse_graph(text)


def check_program(g, feeds_list, *, expect=(), forbid=(), fused=True, providers=None):
    """Lower ``g``, check the ONNX ops present/absent, and numerics against the python backend."""
    program = OrtProgram(g, fused=fused)
    ops = ops_of(program.model_proto)
    if providers is not None:
        ops = ops_of(export_graph(g, fused=fused, providers=providers))
    for op in expect:
        assert op in ops, f"{op} not emitted: {ops}"
    for op in forbid:
        assert op not in ops, f"{op} emitted: {ops}"
    reference = generate_python(g)
    for feeds in feeds_list:
        assert_close(program(feeds), reference(feeds), program.source)
    return program


def _x(batch=2, seq=7, width=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, width, generator=g)


@pytest.mark.parametrize("attrs, hkv, op", [
    ("causal", 4, "ms.GroupQueryAttention"),
    ("causal, scale=0.3", 2, "ms.GroupQueryAttention"),
    ("causal, kv_heads=1", 1, "ms.GroupQueryAttention"),
    ("causal, window=3", 2, "ms.GroupQueryAttention"),
    ("causal, softcap=2.0", 4, "ms.GroupQueryAttention"),
    ("scale=0.2", 2, "ms.GroupQueryAttention"),  # non-causal GQA: causal=0
    ("", 4, "ms.GroupQueryAttention"),  # non-causal self-attention too (faster than MHA)
    ("causal, alibi=[0.5, 0.25, 0.125, 0.0625]", 4, None),  # standard ops
])
def test_attention_mapping(attrs, hkv, op):
    g = attention_graph(attrs, hkv)
    forbid = ("ms.GroupQueryAttention", "ms.MultiHeadAttention") if op is None else ()
    program = check_program(g, [[_x(2, 7)], [_x(1, 1, seed=1)], [_x(3, 12, seed=2)]],
                            expect=[op] if op else [], forbid=forbid)
    if op == "ms.GroupQueryAttention":  # q|k|v handed over packed: no Split, no transposes
        assert "Split" not in program.onnx_ops and "Transpose" not in program.onnx_ops


def test_attention_padding_bias_is_expanded_to_s_rows():
    g = attention_graph("scale=0.25", 4, "%bias: f32[batch, 1, 1, seq]", extra=", %bias")
    x = _x(2, 6)
    bias = torch.zeros(2, 1, 1, 6)
    bias[1, ..., -2:] = torch.finfo(torch.float32).min
    check_program(g, [[x, bias]], expect=["ms.GroupQueryAttention", "Expand"])


@pytest.mark.parametrize("bias", [False, True])
def test_cross_attention_uses_mha(bias):
    extra = ", %bias" if bias else ""
    sig = ", %bias: f32[batch, 1, 1, t]" if bias else ""
    g = parse_graph(f"""
graph cross(%q: f32[batch, 4, s, 16], %k: f32[batch, 4, t, 16], %v: f32[batch, 4, t, 8]{sig}) {{
  %a: f32[batch, 4, s, 8] = attention(%q, %k, %v{extra}) {{scale=0.3}}
  return %a
}}""")
    feeds = [torch.randn(2, 4, 3, 16), torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 8)]
    if bias:
        feeds.append(torch.randn(2, 1, 1, 7))
    check_program(g, [feeds], expect=["ms.MultiHeadAttention"])


def test_attention_causal_bias_uses_gqa():
    g = attention_graph("causal", 2, "%bias: f32[batch, 1, seq, seq]", extra=", %bias")
    check_program(g, [[_x(2, 6), torch.randn(2, 1, 6, 6)]], expect=["ms.GroupQueryAttention"])


def test_attention_key_padding_mask_with_a_fully_padded_row():
    g = attention_graph("", 4, "%kpm: i64[batch, seq]", extra=", _, %kpm")
    kpm = torch.ones(3, 5, dtype=torch.int64)
    kpm[1, 2:] = 0
    kpm[2] = 0  # every key padded: the IR gives zeros for that batch entry
    program = check_program(g, [[_x(3, 5), kpm]], expect=["ms.MultiHeadAttention"])
    assert program([_x(3, 5), kpm])[0][2].abs().max() == 0


def test_attention_kpm_with_causal_falls_back_to_standard_ops():
    g = attention_graph("causal", 4, "%kpm: i64[batch, seq]", extra=", _, %kpm")
    kpm = torch.ones(2, 5, dtype=torch.int64)
    kpm[1, :3] = 0  # left padding: the first query rows see no key at all
    check_program(g, [[_x(2, 5), kpm]], forbid=["ms.MultiHeadAttention",
                                                 "ms.GroupQueryAttention"])


def test_attention_causal_with_longer_keys_is_bottom_right_aligned():
    g = parse_graph("""
graph kv(%q: f32[2, 4, 3, 16], %k: f32[2, 4, 7, 16], %v: f32[2, 4, 7, 16]) {
  %a: f32[2, 4, 3, 16] = attention(%q, %k, %v) {causal}
  return %a
}""")
    feeds = [torch.randn(2, 4, 3, 16), torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 16)]
    check_program(g, [feeds], forbid=["ms.GroupQueryAttention", "ms.MultiHeadAttention"])


def test_attention_bshd_layout():
    g = parse_graph("""
graph bshd(%q: f32[batch, seq, 4, 16], %k: f32[batch, seq, 2, 16], %v: f32[batch, seq, 2, 16]) {
  %a: f32[batch, seq, 4, 16] = attention(%q, %k, %v) {causal, layout="bshd"}
  return %a
}""")
    feeds = [torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)]
    check_program(g, [feeds], expect=["ms.GroupQueryAttention"])


ROPE = """
graph rope(%x: f32[batch, seq, 64]) {{
  const %w: f32[128, 64]
  const %cos_t: f32[32, 16]
  const %sin_t: f32[32, 16]
  %qkv: f32[batch, seq, 128] = linear(%x, %w, _)
  %q: f32[batch, seq, 64], %k: f32[batch, seq, 32], %v: f32[batch, seq, 32] = split(%qkv) {{axis=-1, sizes=[64, 32, 32]}}
  %cos: f32[seq, 16] = slice(%cos_t) {{axis=0, start={start}, end={end}}}
  %sin: f32[seq, 16] = slice(%sin_t) {{axis=0, start={start}, end={end}}}
  %q4: f32[batch, seq, 4, 16] = reshape(%q) {{shape=[batch, seq, 4, 16]}}
  %k4: f32[batch, seq, 2, 16] = reshape(%k) {{shape=[batch, seq, 2, 16]}}
  %v4: f32[batch, seq, 2, 16] = reshape(%v) {{shape=[batch, seq, 2, 16]}}
  %qh: f32[batch, 4, seq, 16] = permute(%q4) {{perm=[0, 2, 1, 3]}}
  %kh: f32[batch, 2, seq, 16] = permute(%k4) {{perm=[0, 2, 1, 3]}}
  %vh: f32[batch, 2, seq, 16] = permute(%v4) {{perm=[0, 2, 1, 3]}}
  %qr: f32[batch, 4, seq, 16] = rotary(%qh, %cos, %sin) {{{rot}}}
  %kr: f32[batch, 2, seq, 16] = rotary(%kh, %cos, %sin) {{{rot}}}
  %a: f32[batch, 4, seq, 16] = attention(%qr, %kr, %vh) {{causal, kv_heads=2}}
  %at: f32[batch, seq, 4, 16] = permute(%a) {{perm=[0, 2, 1, 3]}}
  %o: f32[batch, seq, 64] = reshape(%at) {{shape=[batch, seq, 64]}}
  return %o, %qr
}}
"""


def rope_tables(interleaved: bool):
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    freqs = torch.outer(torch.arange(32).float(), inv)  # [32, 8]
    full = freqs.repeat_interleave(2, -1) if interleaved else torch.cat([freqs, freqs], -1)
    return {"cos_t": full.cos(), "sin_t": full.sin()}


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_folds_into_gqa_and_rotary_embedding(interleaved):
    rot = "interleaved" if interleaved else ""
    text = ROPE.format(start=0, end="seq", rot=rot)
    consts = {**rope_tables(interleaved), "w": torch.randn(128, 64) * 0.2}
    g = parse_graph(text, consts)
    program = check_program(g, [[_x(2, 9)], [_x(1, 3, seed=1)]],
                            expect=["ms.GroupQueryAttention", "ms.RotaryEmbedding"])
    assert program.fused_counts["GroupQueryAttention(rotary)"] == 1
    assert program.fused_counts["RotaryEmbedding"] == 1  # %qr is also an output


def test_rotary_with_position_offset_uses_rotary_embedding_not_gqa_rotary():
    text = ROPE.format(start=3, end="seq + 3", rot="")
    g = parse_graph(text, {**rope_tables(False), "w": torch.randn(128, 64) * 0.2})
    program = check_program(g, [[_x(2, 9)]], expect=["ms.RotaryEmbedding"])
    assert "GroupQueryAttention(rotary)" not in program.fused_counts


def test_rotary_tables_that_do_not_repeat_use_standard_ops():
    consts = {"cos_t": torch.randn(32, 16), "sin_t": torch.randn(32, 16),
              "w": torch.randn(128, 64) * 0.2}
    g = parse_graph(ROPE.format(start=0, end="seq", rot=""), consts)
    program = check_program(g, [[_x(2, 9)]], forbid=["ms.RotaryEmbedding"])
    assert "GroupQueryAttention(rotary)" not in program.fused_counts


BLOCK = """
graph block(%x: f32[batch, seq, 32], %r: f32[batch, seq, 32]) {{
  const %w1: f32[128, 32]
  const %b1: f32[128]
  const %w2: f32[32, 128]
  const %b2: f32[32]
  const %g: f32[32]
  const %beta: f32[32]
  %h: f32[batch, seq, 128] = linear(%x, %w1, %b1) {{activation="{act}"}}
  %o: f32[batch, seq, 32] = linear(%h, %w2, %b2)
  %n: f32[batch, seq, 32], %s: f32[batch, seq, 32] = add_norm(%o, %r, %g{beta}) {{kind="{kind}", eps=1e-05}}
  return %n, %s
}}
"""


@pytest.mark.parametrize("act, op, absent", [
    ("gelu_tanh", "ms.FastGelu", ["ms.BiasGelu", "ms.Gelu"]),
    ("gelu", "ms.BiasGelu", ["ms.FastGelu"]),
    ("silu", "ms.QuickGelu", []),
    ("relu", "Relu", []),
])
def test_linear_activation_mapping(act, op, absent):
    g = parse_graph(BLOCK.format(act=act, kind="layer", beta=", %beta"))
    check_program(g, [[_x(2, 5, 32), _x(2, 5, 32, seed=1)]], expect=[op], forbid=absent)


def test_tanh_gelu_never_becomes_bias_gelu():
    """Negative test: BiasGelu/Gelu are erf GELU; a tanh GELU (with or without a bias, fused
    into a linear or on its own) must only ever become FastGelu or standard ops."""
    g = parse_graph("""
graph g(%x: f32[batch, 16]) {
  const %w: f32[8, 16]
  const %b: f32[8]
  const %c: f32[8]
  %y: f32[batch, 8] = linear(%x, %w, %b) {activation="gelu_tanh"}
  %z: f32[batch, 8] = add(%y, %c)
  %t: f32[batch, 8] = gelu(%z) {approximate="tanh"}
  return %t
}""")
    for fused in (True, False):
        ops = ops_of(export_graph(g, fused=fused))
        assert "ms.BiasGelu" not in ops and "ms.Gelu" not in ops, ops
        assert ops.count("ms.FastGelu") == (2 if fused else 0), ops
    feeds = [torch.randn(4, 16) * 3]
    check_program(g, [feeds])
    # and the erf GELU is never FastGelu
    g2 = parse_graph("""
graph g(%x: f32[batch, 16]) {
  %t: f32[batch, 16] = gelu(%x)
  return %t
}""")
    ops = ops_of(export_graph(g2))
    assert "ms.Gelu" in ops and "ms.FastGelu" not in ops


@pytest.mark.parametrize("kind, beta", [("layer", ", %beta"), ("layer", ""), ("rms", "")])
def test_add_norm_mapping(kind, beta):
    g = parse_graph(BLOCK.format(act="gelu", kind=kind, beta=beta))
    feeds = [[_x(2, 5, 32), _x(2, 5, 32, seed=1)], [_x(1, 1, 32, seed=2), _x(1, 1, 32, seed=3)]]
    if kind == "rms":
        program = check_program(g, feeds, expect=["ms.SkipSimplifiedLayerNormalization"])
    else:  # CPU: Add + LayerNormalization (faster there); CUDA: SkipLayerNormalization
        program = check_program(g, feeds, expect=["LayerNormalization"],
                                forbid=["ms.SkipLayerNormalization"])
        cuda = export_graph(g, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        assert "ms.SkipLayerNormalization" in ops_of(cuda)
        _check_model_on_cpu(cuda, g, feeds)
    sk = [n for n in program.model_proto.graph.node if n.op_type.startswith("Skip")]
    for n in sk:  # the projection's bias is the fused op's fifth input, not an Add
        assert n.input[-1] == "b2"


def _check_model_on_cpu(model, g, feeds_list):
    """Run an exported model with a plain ORT CPU session against the python backend."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = generate_python(g)
    names = [i.name for i in sess.get_inputs()]
    for feeds in feeds_list:
        got = sess.run(None, {n: t.numpy() for n, t in zip(names, feeds)})
        assert_close([torch.from_numpy(a) for a in got], reference(feeds))


def test_add_norm_with_broadcast_skip():
    g = parse_graph("""
graph g(%x: f32[batch, seq, 32], %r: f32[seq, 32]) {
  const %g: f32[32]
  %n: f32[batch, seq, 32], %s: f32[batch, seq, 32] = add_norm(%r, %x, %g) {kind="rms", eps=1e-06}
  return %n, %s
}""")
    check_program(g, [[_x(2, 5, 32), torch.randn(5, 32)]],
                  expect=["ms.SkipSimplifiedLayerNormalization"])


def test_swiglu_uses_quick_gelu():
    g = parse_graph("""
graph g(%a: f32[batch, 8], %b: f32[batch, 8]) {
  %y: f32[batch, 8] = swiglu(%a, %b)
  return %y
}""")
    check_program(g, [[torch.randn(3, 8) * 4, torch.randn(3, 8)]], expect=["ms.QuickGelu"])


def test_padded_lm_head_is_computed_unpadded():
    """``layout.pad-gemm-columns`` pads wide GEMMs for PyTorch; ORT gets the unpadded width
    (a view of the padded weight) instead of a GEMM plus a Slice copying the logits."""
    g = parse_graph("""
graph g(%x: f32[1, seq, 16], %ids: i64[1, seq]) {
  const %w_padded: f32[128, 16]
  %wr: f32[100, 16] = slice(%w_padded) {axis=0, end=100}
  %e: f32[1, seq, 16] = embedding(%wr, %ids)
  %h: f32[1, seq, 16] = add(%x, %e)
  %y: f32[1, seq, 128] = linear(%h, %w_padded, _)
  %l: f32[1, seq, 100] = slice(%y) {axis=-1, end=100}
  return %l
}""")
    ids = torch.randint(0, 100, (1, 6))
    program = check_program(g, [[_x(1, 6, 16), ids]], forbid=["Slice"])
    inits = {t.name: t for t in program.model_proto.graph.initializer}
    assert [list(t.dims) for t in inits.values() if t.dims[:1] == [100]] == [[100, 16]]


def test_symbolic_dims_are_dim_params_and_constants_are_initializers():
    g = attention_graph("causal", 4)
    model = export_graph(g)
    onnx.checker.check_model(model, full_check=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "seq", 64]
    assert {t.name for t in model.graph.initializer} >= {"w", "bqkv"}
    assert len(model.SerializeToString()) > 4 * 112 * 64  # the weights are inside


def test_standard_ops_export_passes_the_full_checker():
    g = attention_graph("causal", 2)
    model = export_graph(g, fused=False)
    assert not any(n.domain == MS_DOMAIN for n in model.graph.node)
    onnx.checker.check_model(model, full_check=True)


def test_source_summarises_the_model():
    program = OrtProgram(attention_graph("causal", 2))
    src = program.source
    assert "fused ops: FusedMatMul×1, GroupQueryAttention×1" in src
    assert "intra_op_num_threads=" in src and "ORT_ENABLE_ALL" in src
    assert "com.microsoft.GroupQueryAttention(" in src
    assert program.lowering_notes()[0].startswith("fused ops: ")


def test_outputs_are_zero_copy_torch_tensors_and_inputs_may_be_strided():
    g = Graph()
    x = g.add_input("x", TensorType.parse("f32[4, 3]"))
    g.set_outputs([g.op("exp", x), x])
    program = OrtProgram(g)
    xt = torch.randn(3, 4).t()  # non-contiguous
    out, same = program([xt])
    torch.testing.assert_close(out, xt.exp())
    assert isinstance(out, torch.Tensor) and torch.equal(same, xt)
    assert not np.shares_memory(same.numpy(), xt.contiguous().numpy())


def test_weights_are_shared_not_copied_into_the_session():
    g = Graph()
    x = g.add_input("x", TensorType.parse("f32[2, 256]"))
    w = g.add_constant(torch.randn(512, 256), "w")
    g.set_outputs([g.op("linear", x, w)])
    program = OrtProgram(g)
    assert len(program._model.SerializeToString()) < 10_000  # placeholders only
    assert any(t.data_ptr() == w.const.data_ptr() for t, _ in program._keep[:-1])
    full = program.model_proto
    assert len(full.SerializeToString()) > 512 * 256 * 4


def test_unknown_device_is_a_lowering_error():
    g = Graph()
    x = g.add_input("x", TensorType.parse("f32[2]"))
    g.set_outputs([g.op("exp", x)])
    with pytest.raises(LoweringError, match="no execution provider|onnxruntime-gpu"):
        OrtProgram(g, device="meta")


@pytest.mark.parametrize("text", [
    "seq", "seq + 1", "seq - 1", "2*seq + batch", "batch*seq - 3*seq + 5", "seq//2",
    "(seq + 1)//2", "seq*(seq + 1)//2", "Mod(seq, 3)", "-(-seq//4)", "Max(seq, 4)",
    "Min(seq, batch) + 1", "seq**2", "ceiling(seq/3)", "4*floor(seq/4)",
])
def test_symbolic_dims_are_computed_exactly(text):
    """Dims as ONNX arithmetic on Shape outputs: arange(end=dim) has exactly dim elements."""
    from transfuse.ir.types import eval_dim, parse_dim

    g = Graph()
    g.add_input("x", TensorType.parse("f32[batch, seq]"))
    g.set_outputs([g.op("arange", end=parse_dim(text), dtype=DType.i64)])
    program = OrtProgram(g)
    for batch, seq in [(1, 1), (3, 7), (2, 12), (5, 30)]:
        want = eval_dim(parse_dim(text), {"batch": batch, "seq": seq})
        (out,) = program([torch.zeros(batch, seq)])
        assert out.tolist() == list(range(max(want, 0))), (text, batch, seq)
