"""``rotary`` on the onnxruntime target with cos/sin computed in the graph (codegen/onnx/rotary.py).

Each graph computes its angles from a ``position_ids`` input the way the models do (positions
x inverse frequencies, duplicated to full width, cos/sin), then rotates q. Where the lowering
proves the tables duplicates of half-width rows it emits ``com.microsoft.RotaryEmbedding``
reading those rows; the ORT program must then equal the python target on every batch size,
sequence length and position offset. Every refusal keeps the standard ops and says why in
the lowering notes. Whole models: a generation step of tiny Llama / GPT-NeoX (partial
rotary) / Phi-3 (partial rotary) on ORT emits RotaryEmbedding and generates HF's tokens.
"""

from __future__ import annotations

import pytest
import torch

import transfuse
from transfuse.codegen.onnx import MS_DOMAIN, OrtProgram
from transfuse.codegen.python import generate_python
from transfuse.ir.parser import parse_graph

pytest.importorskip("onnxruntime")

H, D = 4, 16
INV = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))  # [D/2]

#: the angles f [P, S, D/2] from %pos [P, S] (P = 1 or batch)
ANGLES = """
  %p: i64[{p}, seq, 1] = reshape(%pos) {{shape=[{p}, seq, 1]}}
  %pf: f32[{p}, seq, 1] = cast(%p) {{dtype=f32}}
  %f: f32[{p}, seq, {h}] = mul(%pf, %inv)"""

#: full-width duplicates %e [P, S, D] of %f: rotate-half and the two interleaved spellings
DUP = {
    "half": """
  %e: f32[{p}, seq, {d}] = concat(%f, %f) {{axis=2}}""",
    "pairs-expand": """
  %f1: f32[{p}, seq, {h}, 1] = reshape(%f) {{shape=[{p}, seq, {h}, 1]}}
  %f2: f32[{p}, seq, {h}, 2] = expand(%f1) {{shape=[{p}, seq, {h}, 2]}}
  %e: f32[{p}, seq, {d}] = reshape(%f2) {{shape=[{p}, seq, {d}]}}""",
    "pairs-concat": """
  %f1: f32[{p}, seq, {h}, 1] = reshape(%f) {{shape=[{p}, seq, {h}, 1]}}
  %f2: f32[{p}, seq, {h}, 2] = concat(%f1, %f1) {{axis=-1}}
  %e: f32[{p}, seq, {d}] = reshape(%f2) {{shape=[{p}, seq, {d}]}}""",
}

TRIG = """
  %c: f32[{p}, seq, {d}] = cos(%e)
  %s: f32[{p}, seq, {d}] = sin(%e)"""

#: cos/sin with an attention scale (a one-element constant), as Hugging Face's scaled RoPEs do
TRIG_SCALED = """
  %c0: f32[{p}, seq, {d}] = cos(%e)
  %s0: f32[{p}, seq, {d}] = sin(%e)
  %c: f32[{p}, seq, {d}] = mul(%c0, %scale)
  %s: f32[{p}, seq, {d}] = mul(%scale, %s0)"""


def rope_graph(*, dup="half", layout="bhsd", per_batch=False, scaled=False, partial=False,
               interleaved=None, edit=lambda text: text, scale=None):
    """q = linear(x) as heads, rotated by cos/sin of %pos; ``partial``: only the first D/2 of
    each head are rotated (GPT-NeoX / Phi-3), the rest passes through; ``edit`` rewrites the
    graph text before it is parsed (the negative tests)."""
    p = "batch" if per_batch else "1"
    rd = D // 2 if partial else D  # the rotated width
    fmt = dict(p=p, h=rd // 2, d=rd)
    table = f"f32[{p}, 1, seq, {rd}]" if layout == "bhsd" else f"f32[{p}, seq, 1, {rd}]"
    qshape = f"f32[batch, {H}, seq, {D}]" if layout == "bhsd" else f"f32[batch, seq, {H}, {D}]"
    rshape = qshape.replace(f", {D}]", f", {rd}]")
    inter = (dup != "half") if interleaved is None else interleaved
    lines = [f"graph rope(%x: f32[batch, seq, {H * D}], %pos: i64[{p}, seq]) {{",
             f"  const %w: f32[{H * D}, {H * D}]", f"  const %inv: f32[{rd // 2}]",
             "  const %scale: f32[]" if scaled else "",
             f"  %q: f32[batch, seq, {H * D}] = linear(%x, %w, _)",
             f"  %q4: f32[batch, seq, {H}, {D}] = reshape(%q) {{shape=[batch, seq, {H}, {D}]}}"]
    if layout == "bhsd":
        lines.append(f"  %qh: {qshape} = permute(%q4) {{perm=[0, 2, 1, 3]}}")
    else:
        lines.append(f"  %qh: {qshape} = reshape(%q4) {{shape=[batch, seq, {H}, {D}]}}")
    lines += [ANGLES.format(**fmt), DUP[dup].format(**fmt),
              (TRIG_SCALED if scaled else TRIG).format(**fmt)]
    dims = f"[{p}, 1, seq, {rd}]" if layout == "bhsd" else f"[{p}, seq, 1, {rd}]"
    lines += [f"  %cos: {table} = reshape(%c) {{shape={dims}}}",
              f"  %sin: {table} = reshape(%s) {{shape={dims}}}"]
    rot = " {interleaved}" if inter else ""
    if partial:
        lines += [f"  %qr: {rshape} = slice(%qh) {{axis=3, end={rd}}}",
                  f"  %qp: {rshape} = slice(%qh) {{axis=3, start={rd}, end={D}}}",
                  f"  %rr: {rshape} = rotary(%qr, %cos, %sin){rot}",
                  f"  %r: {qshape} = concat(%rr, %qp) {{axis=3}}"]
    else:
        lines.append(f"  %r: {qshape} = rotary(%qh, %cos, %sin){rot}")
    lines += ["  return %r", "}"]
    consts = {"w": torch.randn(H * D, H * D, generator=torch.Generator().manual_seed(0)) * 0.2,
              "inv": 1.0 / (10000 ** (torch.arange(0, rd, 2).float() / rd))}
    if scaled:
        consts["scale"] = torch.tensor(0.7) if scale is None else scale
    return parse_graph(edit("\n".join(x for x in lines if x)), consts)


def _feeds(batch: int, seq: int, start: int, per_batch: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, H * D, generator=g)
    rows = batch if per_batch else 1
    pos = torch.stack([torch.arange(seq) + start + 7 * r for r in range(rows)])  # [P, S]
    return [x, pos]


#: (batch, new tokens, first position): a prompt, a decode step far in, a chunk
STEPS = [(2, 6, 0), (1, 1, 37), (3, 4, 9)]


def ort_ops(program: OrtProgram) -> list[str]:
    return [n.op_type if n.domain != MS_DOMAIN else f"ms.{n.op_type}"
            for n in program.model_proto.graph.node]


def check(g, per_batch: bool, *, fused: bool = True) -> OrtProgram:
    """The ORT program of ``g`` equals the python target on every step of STEPS."""
    program, reference = OrtProgram(g, fused=fused), generate_python(g)
    for batch, seq, start in STEPS:
        feeds = _feeds(batch, seq, start, per_batch, seed=seq)
        (got,), (want,) = program(feeds), reference(feeds)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    return program


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dup", ["half", "pairs-expand", "pairs-concat"])
def test_rows_from_positions_become_rotary_embedding(dup, layout, per_batch):
    g = rope_graph(dup=dup, layout=layout, per_batch=per_batch)
    program = check(g, per_batch)
    ops = ort_ops(program)
    assert ops.count("ms.RotaryEmbedding") == 1, program.source
    # the projection is rotated as [B, S, H*D]: no transposes, no rotation by hand
    assert not {"Transpose", "Split", "Neg", "Slice"} & set(ops[:ops.index("ms.RotaryEmbedding")])
    # the half-width rows come from the angles themselves: one Cos, one Sin of width D/2
    nodes = program.model_proto.graph.node
    made_by = {o: n.op_type for n in nodes for o in n.output}
    trig = [n for n in nodes if n.op_type in ("Cos", "Sin")]
    assert len(trig) == 2 and all(made_by[n.input[0]] == "Mul" for n in trig)
    assert not any("rotary" in n for n in program.notes)
    (node,) = [n for n in nodes if n.op_type == "RotaryEmbedding"]
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs["interleaved"] == int(dup != "half") and attrs["num_heads"] == H


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_scaled_tables_are_scaled_half_rows(layout):
    program = check(rope_graph(scaled=True, layout=layout), False)
    assert ort_ops(program).count("ms.RotaryEmbedding") == 1
    assert ort_ops(program).count("Mul") == 3  # the angles, and the scale on each half row


@pytest.mark.parametrize("dup", ["half", "pairs-expand"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_partial_rotary_rotates_the_sliced_part(dup, layout):
    """GPT-NeoX / Phi-3: the first D/2 of each head rotated; the slice has no [B, S, H*D]
    form, so the kernel takes it 4-D (bhsd) or reshaped to [B, S, H*D/2] (bshd)."""
    program = check(rope_graph(dup=dup, layout=layout, partial=True), False)
    assert ort_ops(program).count("ms.RotaryEmbedding") == 1


# -- refusals: standard ops, with the reason -------------------------------------------------


def _refused(g, per_batch=False) -> tuple[OrtProgram, str]:
    program = check(g, per_batch)
    assert "ms.RotaryEmbedding" not in ort_ops(program)
    (note,) = [n for n in program.notes if n.startswith("rotary with standard ops")]
    return program, note


def test_halves_of_two_different_values_are_not_duplicates():
    g = rope_graph(edit=lambda t: t.replace("concat(%f, %f)", "concat(%f, %f9)").replace(
        "  %e:", "  %f9: f32[1, seq, 8] = mul(%f, %f)\n  %e:", 1))
    _, note = _refused(g)
    assert "not one value twice" in note


def test_rotate_half_tables_are_not_taken_for_interleaved():
    # interleaved rotation with cat(f, f) tables: entry i reads f[i mod D/2], the kernel
    # would read f[i div 2]
    _, note = _refused(rope_graph(dup="half", interleaved=True))
    assert "is not reshape(pairs" in note


def test_interleaved_tables_are_not_taken_for_rotate_half():
    _, note = _refused(rope_graph(dup="pairs-expand", interleaved=False))
    assert "is not concat(h, h)" in note


def test_a_table_with_a_head_axis_keeps_standard_ops():
    def per_head(text):
        for t, src in (("cos", "c"), ("sin", "s")):
            text = text.replace(
                f"%{t}: f32[1, 1, seq, 16] = reshape(%{src}) {{shape=[1, 1, seq, 16]}}",
                f"%{t}1: f32[1, 1, seq, 16] = reshape(%{src}) {{shape=[1, 1, seq, 16]}}\n"
                f"  %{t}: f32[1, 4, seq, 16] = expand(%{t}1) {{shape=[1, 4, seq, 16]}}")
        return text

    g = rope_graph(edit=per_head)
    _, note = _refused(g)
    assert "does not run along one axis" in note


def test_a_scale_that_is_not_one_element_keeps_standard_ops():
    g = rope_graph(scaled=True, scale=torch.linspace(0.5, 1.5, D),
                   edit=lambda t: t.replace("const %scale: f32[]", f"const %scale: f32[{D}]"))
    _, note = _refused(g)
    assert "is not concat(h, h)" in note  # the walk stops at the mul


def test_standard_ops_export_has_no_contrib_op_and_no_note():
    program = check(rope_graph(), False, fused=False)
    assert "ms.RotaryEmbedding" not in ort_ops(program) and not program.notes


# -- whole models: a generation step on ORT -------------------------------------------------

VOCAB, PAD = 96, 95


def _tiny(family: str):
    tr = pytest.importorskip("transformers")
    common = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                  intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64)
    if family == "llama":
        model = tr.LlamaForCausalLM._from_config(tr.LlamaConfig(num_key_value_heads=2, **common))
    elif family == "gpt-neox":  # a quarter of each head rotated
        model = tr.GPTNeoXForCausalLM._from_config(tr.GPTNeoXConfig(rotary_pct=0.25, **common))
    else:  # phi3: half of each head rotated
        model = tr.Phi3ForCausalLM._from_config(tr.Phi3Config(
            num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0, **common))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # std 0.3: HF's 0.02 makes a 2-layer model repeat one token
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("cache", [{"max_batch": 1, "cache_order": "head-major"},
                                   {"max_batch": 3}], ids=["gqa-one-slot", "slots"])
@pytest.mark.parametrize("family", ["llama", "gpt-neox", "phi3"])
def test_generation_step_rotates_with_rotary_embedding_like_hf(family, cache):
    model = _tiny(family)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, PAD, (n,), generator=g) for n in (7, 3)][: cache["max_batch"]]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    gen = transfuse.optimize(model, (ids[:1],), target="onnxruntime",
                             generation={"max_seq_len": 32, "kv": "contiguous", **cache})
    program = gen._compiled.program
    ops = [n.op_type for n in program.model_proto.graph.node]
    assert ops.count("RotaryEmbedding") == 4  # q and k of both layers
    assert "Neg" not in ops and not any("rotary" in n for n in program.notes)  # no rotate-half
    kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(gen.generate(ids, attention_mask=mask, **kw), want)
