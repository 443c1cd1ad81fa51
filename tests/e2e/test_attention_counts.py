"""Attention passes end to end: on a model with L layers, cleanup + attention.fuse-sdpa +
attention.remove-repeat-kv leave exactly L ``attention`` ops and no softmax, with the
right attrs (causal for decoders, window for Mistral, kv_heads for GQA configs, a
[B, 1, 1, T] padding bias with a mask), no rollback, and outputs that match eager at
two sequence lengths through the python backend. One reference model with its fusion
blocked on purpose says why through ``why_not``."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from hf_builders import tiny_hf_model

from transfuse.codegen.python import generate_python
from transfuse.frontend.torch_export import capture
from transfuse.models import get_model
from transfuse.models._common import merge_heads, split_heads
from transfuse.passes.attention.fuse import FuseAttention
from transfuse.passes.attention.gqa import RemoveRepeatKv
from transfuse.passes.log import PassLog
from transfuse.passes.manager import run_passes
from transfuse.passes.pipelines import CLEANUP

gpt2_module = importlib.import_module("transfuse.models.gpt2")

PASSES = [*CLEANUP, FuseAttention.name, RemoveRepeatKv.name, "cleanup.eliminate-dead-code"]
RTOL, ATOL = 1e-4, 1e-5


def optimise(captured) -> PassLog:
    """O1's cleanup (verified by its own tests), then the attention passes with verification:
    each must keep the outputs on the example inputs or it is rolled back (a failure here)."""
    run_passes(captured.graph, CLEANUP, keep_ir=False)
    log = run_passes(captured.graph, PASSES[len(CLEANUP):], verify=True,
                     sample_inputs=captured.example_inputs)
    bad = [(r.name, r.status, r.error) for r in log.records if r.status not in
           ("changed", "unchanged")]
    assert not bad, bad
    return log


def check_attention(graph, layers: int, *, causal: bool, window=None, kv_heads=None,
                    padding: bool = False) -> None:
    nodes = graph.find("attention")
    assert len(nodes) == layers, [str(n) for n in nodes]
    assert not graph.find("softmax")
    for n in nodes:
        a = n.attrs
        assert (a["causal"], a["window"], a["kv_heads"]) == (causal, window, kv_heads), a
        bias = n.inputs[3] if len(n.inputs) > 3 else None
        if padding:  # only the small padding term, never [B, H, S, T]
            assert bias is not None and list(bias.shape[1:3]) == [1, 1], bias
        else:
            assert bias is None, bias


def assert_close(got, want) -> None:
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    else:  # a Hugging Face ModelOutput: its first field (logits / last_hidden_state)
        key = next(iter(want.keys()))
        torch.testing.assert_close(got[key], want[key], rtol=RTOL, atol=ATOL)


# -- reference models ---------------------------------------------------------------------

REFERENCE = {  # name: (layers, causal, kv_heads, padding)
    "gpt2-tiny": (2, True, None, False),
    "llama-tiny": (2, True, 2, False),
    "bert-tiny": (2, False, None, True),
}


def _ref_inputs(name: str, model, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=g)
    if name.startswith("bert"):
        mask = torch.ones(1, seq, dtype=torch.int64)
        mask[:, seq - seq // 4:] = 0
        return ids, mask
    return (ids,)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_reference_model(name):
    layers, causal, kv_heads, padding = REFERENCE[name]
    model, inputs, dynamic = get_model(name, seq=16)
    captured = capture(model, inputs, dynamic=dynamic)
    log = optimise(captured)
    check_attention(captured.graph, layers, causal=causal, kv_heads=kv_heads, padding=padding)
    rec = log[FuseAttention.name]
    assert rec.matched("attention/sdpa") == layers and not rec.near_misses
    if kv_heads:
        assert log[RemoveRepeatKv.name].matched("attention/repeat-kv") == layers
    program = generate_python(captured.graph)
    for seq in (16, 5):
        args = _ref_inputs(name, model, seq, seq)
        flat = captured.signature.flatten_inputs(args, {})
        got = captured.signature.build_outputs(program(flat))
        with torch.no_grad():
            assert_close(got, model(*args))


def test_why_not_names_the_reason_and_the_module(monkeypatch):
    """GPT-2 whose softmax runs over the queries (axis -2): no fusion, and why."""

    def forward(self, x, future):
        q, k, v = (split_heads(p(x), self.n_head) for p in (self.q_proj, self.k_proj,
                                                             self.v_proj))
        scores = torch.matmul(q, k.transpose(-2, -1)) * 0.25
        probs = F.softmax(scores.masked_fill(future, float("-inf")), dim=-2)
        return self.o_proj(merge_heads(torch.matmul(probs, v)))

    monkeypatch.setattr(gpt2_module.CausalSelfAttention, "forward", forward)
    model, inputs, dynamic = get_model("gpt2-tiny", seq=8)
    captured = capture(model, inputs, dynamic=dynamic)
    log = optimise(captured)
    assert not captured.graph.find("attention")
    text = log.why_not("attention/")
    assert "softmax is over axis" in text and "not the key axis" in text, text
    assert "h.0.attn" in text and "h.1.attn" in text, text


# -- Hugging Face models ------------------------------------------------------------------

VOCAB = 100
HF_CASES = {  # id: (family, attn, mask, causal, window, kv_heads)
    **{f"{fam}-{attn}": (fam, attn, fam == "bert", causal, window, kv)
       for fam, causal, window, kv in (("gpt2", True, None, None), ("llama", True, None, 2),
                                       ("mistral", True, 8, 2), ("qwen2", True, None, 2),
                                       ("bert", False, None, None))
       for attn in ("eager", "sdpa")},
    # decoders with an attention mask (right padding): causal/window + padding bias
    "mistral-eager-mask": ("mistral", "eager", True, True, 8, 2),
    "llama-sdpa-mask": ("llama", "sdpa", True, True, None, 2),
}


def _hf_model(family: str, attn: str):
    return tiny_hf_model(family, attn, layers=2, hidden=64, vocab=VOCAB, positions=128)


def _hf_inputs(family: str, with_mask: bool, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, seq), generator=g)
    kwargs = {"return_dict": True}
    if family != "bert":
        kwargs["use_cache"] = False
    if with_mask:
        mask = torch.ones(2, seq, dtype=torch.int64)
        mask[1, seq - seq // 4:] = 0  # right padding on the second row
        kwargs["attention_mask"] = mask
    return ids, kwargs


@pytest.mark.slow
@pytest.mark.hf
@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_model(case):
    family, attn, with_mask, causal, window, kv_heads = HF_CASES[case]
    model = _hf_model(family, attn)
    ids, kwargs = _hf_inputs(family, with_mask, 16, 0)
    captured = capture(model, (ids,), kwargs, dynamic={"seq": (1, 128)})
    log = optimise(captured)
    check_attention(captured.graph, 2, causal=causal, window=window, kv_heads=kv_heads,
                    padding=with_mask)
    assert not [m for m in log[FuseAttention.name].near_misses], log.why_not("attention/")
    program = generate_python(captured.graph)
    for seq in (16, 7):
        ids, kwargs = _hf_inputs(family, with_mask, seq, seq)
        got = captured.signature.build_outputs(
            program(captured.signature.flatten_inputs((ids,), kwargs)))
        with torch.no_grad():
            assert_close(got, model(ids, **kwargs))
