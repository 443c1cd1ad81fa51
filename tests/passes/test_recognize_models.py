"""The recognition passes on captured reference models (and Hugging Face Llama): every block
recognised, no pass rolled back, and the generated Python computes what the interpreter does.

L is the number of layers (2 in the tiny presets)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from transfuse.codegen.python import generate_python
from transfuse.frontend.torch_export import capture
from transfuse.ir.interpret import interpret
from transfuse.models import get_model
from transfuse.passes.manager import compare_outputs, run_pipeline
from transfuse.passes.recognize import RECOGNIZE

L = 2


def _recognise(captured):
    graph = captured.graph.clone()
    run_pipeline(graph, "O1")
    log = run_pipeline(graph, RECOGNIZE, verify=True, sample_inputs=captured.example_inputs)
    bad = [f"{r.name}: {r.status} {r.error}" for r in log.records
           if r.status not in ("changed", "unchanged")]
    assert not bad, bad
    matched = Counter({rule: stats["matched"] for r in log.records
                       for rule, stats in r.rules.items()})
    return graph, log, matched


def _codegen_matches(graph, inputs):
    program = generate_python(graph)
    check = compare_outputs(interpret(graph, inputs), program(inputs), rtol=1e-5, atol=1e-5)
    assert check.ok, check
    for op in ("rotary", "swiglu", "add_norm"):
        assert op not in program.reference_ops, program.reference_ops


def _model(name: str):
    model, inputs, dynamic = get_model(name, seq=8)
    return capture(model, inputs, dynamic=dynamic)


def test_llama_tiny():
    captured = _model("llama-tiny")
    graph, log, matched = _recognise(captured)
    assert matched["norm/rms-norm"] == matched["norm/rms-norm-weight"] == 2 * L + 1
    assert matched["act/swiglu"] == L
    assert matched["rope/rotate-half"] == 2 * L  # q and k of every layer
    assert matched["residual/add-rms-norm"] == 2 * L  # every norm but the first reads a sum
    ops = graph.op_histogram()
    assert (ops["rms_norm"], ops["add_norm"], ops["swiglu"], ops["rotary"]) == (1, 2 * L, L, 2 * L)
    assert not ops["silu"] and not ops["pow"] and not ops["rsqrt"] and not ops["neg"]
    # cos/sin stay the slices of the cached tables that feed the op
    assert all(n.inputs[1] is graph.find("rotary")[0].inputs[1] for n in graph.find("rotary"))
    _codegen_matches(graph, captured.example_inputs)


def test_gpt2_tiny():
    captured = _model("gpt2-tiny")
    graph, log, matched = _recognise(captured)
    # 2 norms per block and ln_f, each after a sum (the first after wte + wpe, broadcast)
    assert matched["residual/add-layer-norm"] == 2 * L + 1
    assert matched["residual/linear-activation"] == L
    ops = graph.op_histogram()
    assert not ops["layer_norm"] and not ops["gelu"] and ops["add_norm"] == 2 * L + 1
    acts = Counter(n.attrs["activation"] for n in graph.find("linear"))
    assert acts["gelu_tanh"] == L  # GPT-2's tanh GELU keeps its approximation
    _codegen_matches(graph, captured.example_inputs)


def test_bert_tiny():
    captured = _model("bert-tiny")
    graph, log, matched = _recognise(captured)
    # post-norm: norm(x + f(x)) after the embeddings and twice per block; the sum is not reused
    assert matched["residual/add-layer-norm"] == 2 * L + 1
    acts = Counter(n.attrs["activation"] for n in graph.find("linear"))
    assert acts["gelu"] == L and acts["gelu_tanh"] == 0  # BERT's erf GELU
    assert all(not n.outputs[1].uses for n in graph.find("add_norm"))
    _codegen_matches(graph, captured.example_inputs)


@pytest.mark.slow
def test_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    captured = capture(model.eval(), (ids,), {"use_cache": False}, dynamic={"seq": (1, 64)})
    graph, log, matched = _recognise(captured)
    # LlamaRMSNorm (x.to(f32) ... weight * h.to(dtype)), rotate_half with cat, cos/sin from the
    # rotary embedding module (unsqueezed), SiLU-gated MLP
    assert matched["norm/rms-norm"] == matched["norm/rms-norm-weight"] == 2 * L + 1
    assert matched["rope/rotate-half"] == 2 * L and matched["act/swiglu"] == L
    ops = graph.op_histogram()
    assert (ops["rms_norm"], ops["add_norm"], ops["swiglu"], ops["rotary"]) == (1, 2 * L, L, 2 * L)
    cos = graph.find("rotary")[0].inputs[1]
    assert cos.type.rank == 4  # [1, 1, seq, D]: the module's table, unsqueezed for the heads
    _codegen_matches(graph, captured.example_inputs)
