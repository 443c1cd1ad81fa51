"""Attention-mask analysis: what the reference and Hugging Face models' masks prove to be
(causal, window, padding), numeric cross-checks of every classification at two lengths,
text graphs for each way a mask can fail to be one, and random masks whose proofs must
hold numerically."""

from __future__ import annotations

import random

import pytest
import torch
from hf_builders import tiny_hf_model

from transfuse.frontend.torch_export import capture
from transfuse.ir.graph import Graph
from transfuse.ir.interpret import interpret
from transfuse.ir.opdefs.nn import attention_mask
from transfuse.ir.parser import parse_graph
from transfuse.ir.types import DType, TensorType, sym
from transfuse.ir.verify import verify
from transfuse.models import get_model
from transfuse.passes.attention.masks import (
    NEG_LIMIT,
    MaskFacts,
    analyze_additive_mask,
    analyze_bool_mask,
)
from transfuse.passes.manager import run_pipeline

SEQ, S, T = sym("seq"), sym("s"), sym("t")
VOCAB = 100


# -- finding the mask where the model uses it -------------------------------------------


def _on_scores(v) -> bool:
    """Is ``v`` computed from a matmul (the attention scores), not from a mask?"""
    stack, seen = [v], set()
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen or x.producer is None:
            continue
        seen.add(id(x))
        if x.producer.op == "matmul":
            return True
        stack.extend(x.producer.inputs)
    return False


def find_mask(graph):
    """(mask, kind, s, t) at the first attention/softmax; kind is "add", "keep" or "masked"."""
    for n in graph.nodes:
        if n.op == "attention":
            return n.inputs[3], "add", n.inputs[0].shape[2], n.inputs[1].shape[2]
        if n.op == "softmax":
            x = n.inputs[0]
            p, (s, t) = x.producer, x.shape[-2:]
            if p.op == "add":
                a, b = p.inputs
                return (b if _on_scores(a) else a), "add", s, t
            assert p.op == "where", p
            cond, a, b = p.inputs
            return cond, ("masked" if _on_scores(b) else "keep"), s, t
    raise AssertionError("no attention or softmax in the graph")


def analyze(mask, kind, s, t) -> MaskFacts:
    if kind == "add":
        return analyze_additive_mask(mask, s, t)
    return analyze_bool_mask(mask, s, t, keep_value=kind == "keep")


def check_numerically(graph, flat_inputs, mask, kind, facts: MaskFacts, s: int, t: int):
    """Run the graph up to the mask and compare it with the causal/window/padding facts."""
    g = graph.clone()
    by_name = {v.name: v for v in g.values()}
    extra = [x for x in (facts.padding, facts.padding_keep) if x is not None]
    g.set_outputs([by_name[mask.name]] + [by_name[x.name] for x in extra])
    got, *rest = interpret(g, flat_inputs)
    keep = attention_mask(s, t, facts.causal, facts.window)
    keep = torch.ones(s, t, dtype=torch.bool) if keep is None else keep
    pad = rest.pop(0) if facts.padding is not None else torch.zeros(())
    if facts.padding_keep is not None:
        keep = keep & rest.pop(0)
    if kind != "add":
        want = keep if kind == "keep" else ~keep
        got, want = torch.broadcast_tensors(got, want)
        assert torch.equal(got, want)
        return
    got, keep, pad = torch.broadcast_tensors(got, keep, pad)
    assert torch.equal(got[keep], pad[keep]), "mask is not 0 (+ padding) where attended"
    assert bool((got[~keep] <= NEG_LIMIT).all()), "mask is not very negative where masked"


# -- reference models ---------------------------------------------------------------------


@pytest.mark.parametrize("family,expect", [
    ("gpt2", ("masked", True, False)),  # bool triu mask, masked_fill(-inf)
    ("llama", ("add", True, False)),  # 0 / finfo.min causal mask added
    ("bert", ("add", False, True)),  # (1 - mask[:, None, None, :]) * finfo.min
])
def test_reference_models(family, expect):
    model, inputs, dynamic = get_model(f"{family}-tiny")
    captured = capture(model, inputs, dynamic=dynamic)
    run_pipeline(captured.graph, "O1")
    mask, kind, s, t = find_mask(captured.graph)
    facts = analyze(mask, kind, s, t)
    assert facts.reason is None, facts.reason
    assert (kind, facts.causal, facts.padding is not None) == expect
    assert facts.window is None and facts.padding_keep is None
    for seq in (16, 7):
        _, inputs, _ = get_model(f"{family}-tiny", seq=seq, seed=seq)
        flat = captured.signature.flatten_inputs(inputs, {})
        check_numerically(captured.graph, flat, mask, kind, facts, seq, seq)


def test_static_shapes_fold_the_mask_to_a_constant_that_is_checked_numerically():
    model, inputs, _ = get_model("llama-tiny", seq=12)
    captured = capture(model, inputs)
    run_pipeline(captured.graph, "O1")
    mask, kind, s, t = find_mask(captured.graph)
    assert mask.is_const and (s, t) == (12, 12)
    assert analyze(mask, kind, s, t) == MaskFacts(True, None, None, None)


# -- Hugging Face models ------------------------------------------------------------------

# every family eager with and without attention_mask, and sdpa with it (the mask then reaches
# the IR attention op as its bias). sdpa without a mask is left out to keep the file under 30 s:
# its mask subgraph is eager's, with -inf for finfo.min and the attention op as consumer.
FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "bert")
HF_CASES = [(f, "eager", m) for f in FAMILIES for m in (False, True)] + [
    (f, "sdpa", True) for f in FAMILIES]


def _hf_model(family: str, attn: str):
    return tiny_hf_model(family, attn, layers=1, hidden=32, vocab=VOCAB, positions=64)


def _hf_kwargs(family: str, seq: int, with_mask: bool) -> dict:
    kwargs = {} if family == "bert" else {"use_cache": False}
    if with_mask:
        mask = torch.ones(2, seq, dtype=torch.int64)
        mask[1, seq - seq // 4:] = 0  # right padding on the second row
        kwargs["attention_mask"] = mask
    return kwargs


@pytest.mark.slow
@pytest.mark.hf
@pytest.mark.parametrize("family,attn,with_mask", HF_CASES)
def test_hf_models(family, attn, with_mask):
    model = _hf_model(family, attn)
    ids = torch.randint(0, VOCAB, (2, 16))
    captured = capture(model, (ids,), _hf_kwargs(family, 16, with_mask), dynamic={"seq": (1, 64)})
    run_pipeline(captured.graph, "O1")
    mask, kind, s, t = find_mask(captured.graph)
    assert kind == "add" and (attn == "sdpa") == (mask.uses[0][0].op == "attention")
    facts = analyze(mask, kind, s, t)
    assert facts.causal == (family != "bert")
    assert facts.window == (8 if family == "mistral" else None)
    assert facts.padding is None
    if with_mask:  # transformers >= 5 and-s the padding into one bool mask
        keep = facts.padding_keep
        assert keep is not None and str(keep.type) == "bool[2, 1, 1, seq]"
        assert facts.reason.startswith(f"padding is the bool keep-mask %{keep.name}")
    else:
        assert facts.reason is None and facts.padding_keep is None
    for seq in (16, 11):
        ids = torch.randint(0, VOCAB, (2, seq))
        flat = captured.signature.flatten_inputs((ids,), _hf_kwargs(family, seq, with_mask))
        check_numerically(captured.graph, flat, mask, kind, facts, seq, seq)


# -- text graphs: what is proven ------------------------------------------------------------


def _mask_of(text: str, constants=None):
    graph = parse_graph(text, constants)
    verify(graph)
    return graph.outputs[0]


def _check_text(mask, kind, facts: MaskFacts, sizes):
    """Numeric check of a text graph's mask at each (s, t) in ``sizes``."""
    gen = torch.Generator().manual_seed(0)
    for s, t in sizes:
        env = {"s": s, "t": t, "seq": t, "batch": 2}
        inputs = []
        for v in mask.graph.inputs:
            shape = v.type.concrete(env)
            inputs.append(torch.randn(shape, generator=gen) if v.dtype.is_float else
                          torch.randint(0, 2, shape, generator=gen).to(v.dtype.torch))
        check_numerically(mask.graph, inputs, mask, kind, facts, s, t)


# keep j <= pos_i with the query positions bottom-right: arange(T - S, T)
BOTTOM_RIGHT = """
graph main(%x: f32[s, t]) {
  %q: i64[s] = arange() {start=t - s, end=t}
  %k: i64[t] = arange() {end=t}
  %qc: i64[s, 1] = reshape(%q) {shape=[s, 1]}
  %kr: i64[1, t] = reshape(%k) {shape=[1, t]}
  %keep: bool[s, t] = le(%kr, %qc)
  return %keep
}"""


def test_distinct_symbolic_lengths_bottom_right_causal():
    mask = _mask_of(BOTTOM_RIGHT)
    facts = analyze_bool_mask(mask, S, T, keep_value=True)
    assert facts == MaskFacts(True, None, None, None)
    _check_text(mask, "keep", facts, [(3, 7), (5, 5)])
    top_left = _mask_of(BOTTOM_RIGHT.replace("start=t - s, end=t", "end=s"))
    facts = analyze_bool_mask(top_left, S, T, keep_value=True)
    assert not facts.causal and "not bottom-right" in facts.reason


def test_window_from_a_shifted_comparison_and_or_of_masked_sets():
    # masked = (j > i) | (j <= i - 4): HF's sliding window written as masked sets
    mask = _mask_of("""
graph main(%x: f32[seq, seq]) {
  const %four: i64[] = 4
  %a: i64[seq] = arange() {end=seq}
  %i: i64[seq, 1] = reshape(%a) {shape=[seq, 1]}
  %j: i64[1, seq] = reshape(%a) {shape=[1, seq]}
  %future: bool[seq, seq] = gt(%j, %i)
  %lo: i64[seq, 1] = sub(%i, %four)
  %far: bool[seq, seq] = le(%j, %lo)
  %masked: bool[seq, seq] = logical_or(%future, %far)
  return %masked
}""")
    facts = analyze_bool_mask(mask, SEQ, SEQ, keep_value=False)
    assert facts == MaskFacts(True, 4, None, None)
    _check_text(mask, "masked", facts, [(6, 6), (11, 11)])


def test_gpt2_style_buffer_slice_is_bottom_right_only_with_the_right_offsets():
    buffer = {"bias": torch.ones(1, 1, 16, 16, dtype=torch.bool).tril()}
    text = """
graph main(%x: f32[s, t]) {
  const %bias: bool[1, 1, 16, 16]
  %rows: bool[1, 1, s, 16] = slice(%bias) {axis=2, start=START, end=END}
  %keep: bool[1, 1, s, t] = slice(%rows) {axis=3, end=t}
  return %keep
}"""
    good = _mask_of(text.replace("START", "t - s").replace("END", "t"), buffer)
    facts = analyze_bool_mask(good, S, T, keep_value=True)
    assert facts == MaskFacts(True, None, None, None)
    _check_text(good, "keep", facts, [(3, 7), (9, 16)])
    bad = _mask_of(text.replace("START", "0").replace("END", "s"), buffer)
    assert "not bottom-right" in analyze_bool_mask(bad, S, T, keep_value=True).reason


def test_static_constant_masks_are_checked_element_by_element():
    causal_window = attention_mask(6, 9, causal=True, window=3)
    values = {"m": torch.where(causal_window, 0.0, float("-inf"))}
    mask = _mask_of("""
graph main(%x: f32[6, 9]) {
  const %m: f32[6, 9]
  %0: f32[1, 1, 6, 9] = reshape(%m) {shape=[1, 1, 6, 9]}
  return %0
}""", values)
    facts = analyze_additive_mask(mask, 6, 9)
    assert facts == MaskFacts(True, 3, None, None)
    _check_text(mask, "add", facts, [(6, 9)])
    values["m"][2, 0] = 0.0  # one stray entry: no longer a band
    assert analyze_additive_mask(mask, 6, 9).reason is not None


def test_additive_padding_summand_and_causal():
    mask = _mask_of("""
graph main(%am: i64[batch, seq]) {
  const %one: f32[] = 1.0
  const %min: f32[] = -3.4028234663852886e+38
  %full: f32[seq, seq] = full() {shape=[seq, seq], value=-3.4028234663852886e+38, dtype=f32}
  %causal: f32[seq, seq] = triu(%full) {diagonal=1}
  %a: i64[batch, 1, 1, seq] = reshape(%am) {shape=[batch, 1, 1, seq]}
  %f: f32[batch, 1, 1, seq] = cast(%a) {dtype=f32}
  %inv: f32[batch, 1, 1, seq] = sub(%one, %f)
  %pad: f32[batch, 1, 1, seq] = mul(%inv, %min)
  %mask: f32[batch, 1, seq, seq] = add(%causal, %pad)
  return %mask
}""")
    facts = analyze_additive_mask(mask, SEQ, SEQ)
    assert facts.causal and facts.reason is None and facts.padding.name == "pad"
    _check_text(mask, "add", facts, [(5, 5), (8, 8)])


# -- text graphs: every way of not being a mask has a reason -------------------------------

CAUSAL_KEEP = """
graph main(%x: f32[1, 2, seq, seq], %y: f32[], %z: bool[1, 1, seq, 1], %p: bool[2, 1, 1, seq], %p2: bool[2, 1, 1, seq]) {
  %a: i64[seq] = arange() {end=seq}
  %i: i64[seq, 1] = reshape(%a) {shape=[seq, 1]}
  %j: i64[1, seq] = reshape(%a) {shape=[1, seq]}
  %keep: bool[seq, seq] = le(%j, %i)
  BODY
}"""

NEGATIVE = {
    "diagonal offset": (
        """%ones: bool[seq, seq] = full() {shape=[seq, seq], value=1.0, dtype=bool}
  %m: bool[seq, seq] = triu(%ones) {diagonal=0}
  return %m""", "masked", "mask diagonal is offset by -1"),
    "non-mask input": (
        """%m: f32[1, 2, seq, seq] = add(%x, %y)
  return %m""", "add", "mask value depends on graph input %x"),
    "data along the query axis": (
        """%m: bool[1, 1, seq, seq] = logical_and(%keep, %z)
  return %m""", "keep", "mask depends on graph input %z along (i)"),
    "padding in two pieces": (
        """%kp: bool[2, 1, seq, seq] = logical_and(%keep, %p)
  %m: bool[2, 1, seq, seq] = logical_and(%kp, %p2)
  return %m""", "keep", "is held by no single graph value"),
    "positive values": (
        """%zero: f32[] = full() {shape=[], value=0.0, dtype=f32}
  %big: f32[] = full() {shape=[], value=1000000000.0, dtype=f32}
  %m: f32[seq, seq] = where(%keep, %zero, %big)
  return %m""", "add", "mask is positive (1000000000.0) where j > i"),
    "small negative values": (
        """%zero: f32[] = full() {shape=[], value=0.0, dtype=f32}
  %neg: f32[] = full() {shape=[], value=-10.0, dtype=f32}
  %m: f32[seq, seq] = where(%keep, %zero, %neg)
  return %m""", "add", "neither 0 nor <= -1e4 (-10.0)"),
    "non-constant factor": (
        """%masked: bool[seq, seq] = logical_not(%keep)
  %f: f32[seq, seq] = cast(%masked) {dtype=f32}
  %m: f32[seq, seq] = mul(%f, %y)
  return %m""", "add", "mask value depends on graph input %y"),
    "window on the wrong side": (
        """%m: bool[seq, seq] = le(%j, %i)
  return %m""", "masked", "window on the wrong side: keys j < i + 1 are masked"),
    "keeps only far keys": (
        """const %eight: i64[] = 8
  %lo: i64[seq, 1] = sub(%i, %eight)
  %m: bool[seq, seq] = le(%j, %lo)
  return %m""", "keep", "mask diagonal is offset by -8"),
    "not a band": (
        """const %two: i64[] = 2
  %d: i64[seq, seq] = sub(%j, %i)
  %r: i64[seq, seq] = remainder(%d, %two)
  %m: bool[seq, seq] = eq(%r, %two)
  return %m""", "keep", "%r = remainder (not understood)"),
    "alibi-like values": (
        """%d: i64[seq, seq] = sub(%j, %i)
  %m: f32[seq, seq] = cast(%d) {dtype=f32}
  return %m""", "add", "varies with position"),
    "empty keep set": (
        """%m: bool[1, seq] = gt(%j, %j)
  return %m""", "keep", "mask blocks every key"),
}


@pytest.mark.parametrize("case", list(NEGATIVE))
def test_negative_masks_give_reasons(case):
    body, kind, reason = NEGATIVE[case]
    facts = analyze(_mask_of(CAUSAL_KEEP.replace("BODY", body)), kind, SEQ, SEQ)
    assert facts.reason is not None and reason in facts.reason, facts.reason
    assert facts.padding_keep is None


def test_padding_keep_mask_and_ed_into_a_causal_mask():
    mask = _mask_of(CAUSAL_KEEP.replace("BODY", """%m: bool[2, 1, seq, seq] = logical_and(%keep, %p)
  return %m"""))
    facts = analyze_bool_mask(mask, SEQ, SEQ, keep_value=True)
    assert facts.causal and facts.padding_keep.name == "p" and facts.padding is None
    assert facts.reason.startswith("padding is the bool keep-mask %p")
    _check_text(mask, "keep", facts, [(4, 4), (7, 7)])


def test_mask_that_does_not_broadcast_to_the_scores():
    mask = _mask_of(CAUSAL_KEEP.replace("BODY", "return %keep"))
    assert "does not broadcast" in analyze_bool_mask(mask, 4, 4, keep_value=True).reason
    assert "dtype bool" in analyze_additive_mask(mask, SEQ, SEQ).reason


# -- random masks: whatever is proven must hold numerically ---------------------------------


def _random_mask(rng: random.Random):
    """A random mask graph over [seq, seq]: index comparisons, slices of a constant band
    buffer, transposes, a padding input, combined by and/or/not; bool or additive."""
    g = Graph()
    g.add_input("x", TensorType(DType.f32, [SEQ, SEQ]))
    pad = g.add_input("p", TensorType(DType.bool, [2, 1, 1, SEQ]))
    a = g.op("arange", end=SEQ)
    i, j = g.op("reshape", a, shape=[SEQ, 1]), g.op("reshape", a, shape=[1, SEQ])

    def formula(depth: int):
        r = rng.random()
        if depth and r < 0.2:
            return g.op("logical_not", formula(depth - 1))
        if depth and r < 0.3:
            sub = formula(depth - 1)
            return g.op("permute", sub, perm=[1, 0]) if sub.type.rank == 2 else sub
        if depth and r < 0.7:
            op = rng.choice(["logical_and", "logical_or"])
            return g.op(op, formula(depth - 1), formula(depth - 1))
        if r < 0.8:
            d = torch.arange(20)[None] - torch.arange(20)[:, None]
            buf = g.add_constant((d >= rng.randint(-20, 0)) & (d <= rng.randint(-3, 20)))
            rows = g.op("slice", buf, axis=0, start=(k := rng.randint(0, 3)), end=SEQ + k)
            return g.op("slice", rows, axis=1, end=SEQ)
        if r < 0.85:
            return pad
        shifted = g.op("add", i, g.scalar(rng.randint(-4, 4), DType.i64))
        return g.op(rng.choice(["le", "lt", "ge", "gt", "eq", "ne"]), j, shifted)

    mask, kind = formula(rng.randint(0, 3)), rng.choice(["keep", "masked", "add"])
    if kind == "add":
        fill = g.scalar(rng.choice([-1e9, -100.0, float("-inf"), 2.0]), DType.f32)
        mask = g.op("where", mask, g.scalar(0.0, DType.f32), fill)
    g.set_outputs([mask])
    return mask, kind


def test_random_masks_are_never_misclassified():
    rng, proven = random.Random(0), 0
    for _ in range(200):
        mask, kind = _random_mask(rng)
        facts = analyze(mask, kind, SEQ, SEQ)
        if facts.reason is None or facts.padding_keep is not None:
            proven += 1
            _check_text(mask, kind, facts, [(1, 1), (4, 4), (9, 9)])
    assert proven >= 20
