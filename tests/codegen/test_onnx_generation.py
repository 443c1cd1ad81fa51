"""``cached_attention`` on the onnxruntime target (codegen/onnx/generation.py).

Every step (prefill chunks of three sequences in scattered slots, decode tokens, a mixed
step) is run by the GenerationOrtProgram and by the op's reference implementation on
separate caches: outputs and caches must agree, for every attribute form, both cache
orders, both q/k/v layouts, GQA / MHA / MQA. The caches are written in the caller's own
tensors (IO binding of the written value to the cache input), and the refusals name why.
"""

from __future__ import annotations

import pytest
import torch

from transfuse.codegen.onnx import OrtProgram
from transfuse.codegen.onnx.generation import GenerationOrtProgram
from transfuse.errors import ExecutionError, LoweringError
from transfuse.ir.opdefs.generation import cached_attention
from transfuse.ir.parser import parse_graph

H, D, SLOTS, LEN = 4, 8, 3, 16
FORMS = {
    "plain": {},
    "window": {"window": 3},
    "alibi": {"alibi": [0.5, 0.25, 0.125, 0.0625]},
    "softcap-scale": {"softcap": 2.0, "scale": 0.3},
    "softcap-window-alibi": {"softcap": 1.5, "window": 4, "alibi": [0.1, 0.2, 0.3, 0.4]},
}
#: (first position, new tokens) of sequences 0, 1, 2 per step: prefill, decode, mixed
STEPS = [([0, 0, 0], [5, 2, 7]), ([5, 2, 7], [1, 1, 1]), ([6, 3, 8], [3, 1, 2])]
SLOT_OF = [2, 0, 1]  # sequence s lives in cache slot SLOT_OF[s]


def _attr_text(attrs: dict) -> str:
    def lit(x):
        if isinstance(x, str):
            return f'"{x}"'
        if isinstance(x, bool):
            return "true" if x else "false"
        return str(x)
    return "{" + ", ".join(f"{k}={lit(v)}" for k, v in attrs.items()) + "}"


def _graph(attrs: dict, hkv: int, layout: str = "bhsd", order: str = "token-major",
           layers: int = 1):
    qkv = (lambda h: f"f32[1, {h}, n, {D}]") if layout == "bhsd" else \
        (lambda h: f"f32[1, n, {h}, {D}]")
    cache = f"f32[{SLOTS}, {hkv}, {LEN}, {D}]" if order == "head-major" else \
        f"f32[{SLOTS}, {LEN}, {hkv}, {D}]"
    caches = ", ".join(f"%kc{i}: {cache}, %vc{i}: {cache}" for i in range(layers))
    lines = [f"graph g(%q: {qkv(H)}, %k: {qkv(hkv)}, %v: {qkv(hkv)}, {caches}, "
             "%pos: i64[n], %sot: i64[n], %lens: i64[b], %table: i64[b]) {"]
    text = _attr_text({"kv_heads": hkv, "layout": layout, "cache_order": order, **attrs})
    prev = "%q"
    for i in range(layers):  # layer i's output is layer i+1's query
        lines.append(f"  %a{i}: {qkv(H)} = cached_attention({prev}, %k, %v, %kc{i}, %vc{i}, "
                     f"%pos, %sot, %lens, %table) {text}")
        prev = f"%a{i}"
    lines += [f"  return {prev}", "}"]
    return parse_graph("\n".join(lines))


def _caches(hkv: int, order: str, layers: int = 1):
    shape = (SLOTS, hkv, LEN, D) if order == "head-major" else (SLOTS, LEN, hkv, D)
    return [torch.zeros(shape) for _ in range(2 * layers)]


def _step(starts, counts, gen, hkv, layout):
    n = sum(counts)
    pos = torch.cat([torch.arange(a, a + c) for a, c in zip(starts, counts)])
    sot = torch.cat([torch.full((c,), s) for s, c in enumerate(counts)])
    lens = torch.tensor([a + c for a, c in zip(starts, counts)])
    q = torch.randn(1, H, n, D, generator=gen)
    k, v = (torch.randn(1, hkv, n, D, generator=gen) for _ in range(2))
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return q, k, v, pos, sot, lens, torch.tensor(SLOT_OF)


def _reference(attrs, hkv, layout, order, qkv, caches, meta, layers=1):
    full = {"scale": None, "window": None, "kv_heads": hkv, "alibi": None, "softcap": None,
            "layout": layout, "paged": False, "block_size": None, "cache_order": order}
    full.update({k: tuple(v) if isinstance(v, list) else v for k, v in attrs.items()})
    q, k, v = qkv
    for i in range(layers):
        q = cached_attention([q, k, v, caches[2 * i], caches[2 * i + 1], *meta], full, {})
    return q


def _run_steps(attrs, hkv, layout="bhsd", order="token-major", layers=1, steps=STEPS):
    program = GenerationOrtProgram(_graph(attrs, hkv, layout, order, layers), threads=1)
    gen = torch.Generator().manual_seed(0)
    ours, ref = _caches(hkv, order, layers), _caches(hkv, order, layers)
    for starts, counts in steps:
        q, k, v, *meta = _step(starts, counts, gen, hkv, layout)
        (got,) = program([q, k, v, *ours, *meta])
        want = _reference(attrs, hkv, layout, order, (q, k, v), ref, meta, layers)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    return program, ours


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("order", ["token-major", "head-major"])
def test_steps_equal_the_reference(form, order):
    _run_steps(FORMS[form], hkv=2, order=order)


@pytest.mark.parametrize("hkv", [1, 4], ids=["mqa", "mha"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_head_counts_and_layouts(hkv, layout):
    _run_steps({"window": 5}, hkv=hkv, layout=layout, order="head-major")


def test_layers_write_their_own_caches_in_the_callers_tensors():
    program, caches = _run_steps({}, hkv=2, layers=2)
    assert len(program.cache_outputs) == 4
    written = SLOT_OF[0], 8  # sequence 0 has positions 0..8 after the three steps
    for c in caches:
        assert c[written[0], : written[1] + 1].abs().sum() > 0
        assert c[written[0], written[1] + 1:].abs().sum() == 0  # nothing past the end
    assert {o.op_type for o in program.model_proto.graph.node} >= {"ScatterND", "Softmax"}


def test_a_single_sequence_prefill_then_decode():
    steps = [([0], [9])] + [([9 + i], [1]) for i in range(5)]
    program = GenerationOrtProgram(_graph({}, 2), threads=1)
    gen = torch.Generator().manual_seed(4)
    ours, ref = _caches(2, "token-major"), _caches(2, "token-major")
    for starts, counts in steps:
        q, k, v, pos, sot, lens, _ = _step(starts, counts, gen, 2, "bhsd")
        table = torch.tensor([1])
        (got,) = program([q, k, v, *ours, pos, sot, lens, table])
        want = _reference({}, 2, "bhsd", "token-major", (q, k, v), ref, [pos, sot, lens, table])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[0], ref[0])


def test_paged_caches_are_refused_with_the_layout_named():
    g = parse_graph(
        f"graph g(%q: f32[1, 4, n, {D}], %k: f32[1, 2, n, {D}], %v: f32[1, 2, n, {D}], "
        f"%kc: f32[12, 4, 2, {D}], %vc: f32[12, 4, 2, {D}], %pos: i64[n], %sot: i64[n], "
        "%lens: i64[b], %table: i64[b, 4]) {\n"
        f"  %a: f32[1, 4, n, {D}] = cached_attention(%q, %k, %v, %kc, %vc, %pos, %sot, %lens, "
        "%table) {kv_heads=2, paged=true, block_size=4}\n  return %a\n}")
    with pytest.raises(LoweringError, match="paged KV caches"):
        GenerationOrtProgram(g)


def test_plain_ort_program_refuses_instead_of_dropping_the_writes():
    with pytest.raises(LoweringError, match="GenerationOrtProgram"):
        OrtProgram(_graph({}, 2))


def test_a_cache_that_cannot_be_written_in_place_is_refused():
    program = GenerationOrtProgram(_graph({}, 2), threads=1)
    q, k, v, *meta = _step([0, 0, 0], [1, 1, 1], torch.Generator().manual_seed(0), 2, "bhsd")
    kc, vc = _caches(2, "token-major")
    strided = torch.zeros(SLOTS, 2, LEN, D).transpose(1, 2)
    with pytest.raises(ExecutionError, match="contiguous CPU"):
        program([q, k, v, strided, vc, *meta])
    with pytest.raises(ExecutionError, match="takes 9 inputs"):
        program([q, k, v, kc])


# -- a whole generation graph (generation.insert-kv-cache) on onnxruntime -----------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral"])
@pytest.mark.parametrize("order", ["token-major", "head-major"])
def test_greedy_generate_on_onnxruntime_equals_hugging_face(family, order):
    """A batch of two left-padded prompts, greedy, token-identical to HF generate()."""
    from hf_builders import tiny_hf_model

    from transfuse.api import GenerationStep, compile_generation_step
    from transfuse.runtime.generate import generate
    from transfuse.runtime.kv_cache import KVCache

    model = tiny_hf_model(family, "sdpa", layers=2, hidden=64, vocab=128, positions=64)
    options = {"max_seq_len": 32, "max_batch": 2, "kv": "contiguous", "cache_order": order}
    python_step = compile_generation_step(model, torch.randint(0, 128, (1, 8)), options)
    step = GenerationStep(python_step.graph, GenerationOrtProgram(python_step.graph, threads=1),
                          python_step.pass_log, python_step.geometry)
    _, shape, _ = step.cache_specs[0]
    hkv, d = (shape[1], shape[3]) if order == "head-major" else (shape[2], shape[3])
    cache = KVCache(len(step.cache_specs) // 2, hkv, d, max_seq_len=32, max_batch=2,
                    order=order)
    torch.manual_seed(3)
    ids = torch.randint(1, 128, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second prompt is 4 tokens, left-padded
    ids[1, :3] = 0
    got = generate(step.bind(cache), cache, ids, mask, max_new_tokens=10, min_new_tokens=10,
                   do_sample=False, pad_token_id=0, generation_config=model.generation_config)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_the_onnxruntime_target_builds_generation_graphs_with_this_program():
    from transfuse.codegen.targets import get_target

    program = get_target("onnxruntime").build(_graph({}, 2))
    assert isinstance(program, GenerationOrtProgram) and program.device.type == "cpu"
    assert "2 KV caches written in place" in program.lowering_notes()[0]
    with pytest.raises(LoweringError, match="CPU only"):
        GenerationOrtProgram(_graph({}, 2), device="meta")
