"""Dynamo ONNX exports of Hugging Face models through both targets, as a new user makes them:
``torch.onnx.export(model, (ids,), dynamo=True, dynamic_shapes=...)`` of a tiny GPT-2, Llama,
Mistral, Qwen2, Phi-3, GPT-NeoX, Gemma (decoders) and BERT (encoder), then
``transfuse.optimize(path, target=...)``.

The decoders' exports build their masks with ``GatherND`` (``aten::index.Tensor``), which
the ONNX frontend captures as the IR ``index`` op; both targets lower it (before, it was a
``torch_fallback`` the onnxruntime target refused). For each export and target: every layer's
attention is one fused ``attention`` op (GQA kept as ``kv_heads``), no ``torch_fallback`` is
left, and the outputs equal plain ONNX Runtime on the same file at two sequence lengths.

Tiny configs: 2 layers, hidden 64, 4 heads (2 kv heads where the family has GQA), vocab
128, 64 positions, random weights; batch and sequence are dynamic in the export. The
exports are built once per module (a few seconds each).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest
import torch

import transfuse

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB, POSITIONS = 2, 64, 4, 2, 128, 64
#: family -> kv heads of its fused attention (None: no GQA in the family)
FAMILIES = {"gpt2": None, "llama": KV_HEADS, "mistral": KV_HEADS, "qwen2": KV_HEADS,
            "phi3": KV_HEADS, "gpt_neox": None, "gemma": KV_HEADS, "bert": None}
TARGETS = ("python", "onnxruntime")
SEQ_LENS = (16, 7)
TOL = 1e-5  # fp32: the same math in a different order


def tiny_model(family: str) -> torch.nn.Module:
    """A tiny ``family`` model with random weights (sdpa attention, no KV cache output)."""
    common = dict(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                  intermediate_size=2 * HIDDEN, vocab_size=VOCAB,
                  max_position_embeddings=POSITIONS)
    tokens = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS,
                                         vocab_size=VOCAB, n_positions=POSITIONS,
                                         use_cache=False, **tokens)
        cls = transformers.GPT2LMHeadModel
    elif family == "bert":
        config, cls = transformers.BertConfig(pad_token_id=0, **common), transformers.BertModel
    elif family == "gpt_neox":
        config = transformers.GPTNeoXConfig(use_cache=False, **tokens, **common)
        cls = transformers.GPTNeoXForCausalLM
    else:
        name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "phi3": "Phi3",
                "gemma": "Gemma"}[family]
        extra = {"sliding_window": 8} if family == "mistral" else {}
        if family == "gemma":
            extra["head_dim"] = HIDDEN // HEADS  # Gemma's default is 256
        config = getattr(transformers, f"{name}Config")(
            num_key_value_heads=FAMILIES[family], use_cache=False, **tokens, **extra, **common)
        cls = getattr(transformers, f"{name}ForCausalLM")
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation="sdpa").eval()


def export(family: str, path) -> None:
    """The dynamo export of ``tiny_model(family)`` with dynamic batch and sequence."""
    ids = torch.randint(0, VOCAB, (2, 16))
    batch = torch.export.Dim("batch", min=1, max=8)
    seq = torch.export.Dim("seq", min=2, max=POSITIONS)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(tiny_model(family), (ids,), dynamo=True,
                                    dynamic_shapes=({0: batch, 1: seq},),
                                    input_names=["input_ids"], verbose=False)
        program.save(str(path))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> path of its export, built on first use and kept for the module."""
    root, paths = tmp_path_factory.mktemp("onnx_exports"), {}

    def get(family: str):
        if family not in paths:
            export(family, root / f"{family}.onnx")
            paths[family] = root / f"{family}.onnx"
        return paths[family]

    return get


def _feeds(seq: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seq)
    return {"input_ids": torch.randint(0, VOCAB, (2, seq), generator=g).numpy()}


@pytest.mark.slow
@pytest.mark.hf
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_fuses_attention_and_matches_onnxruntime(exported, family, target):
    path = exported(family)
    compiled = transfuse.optimize(path, target=target)
    graph = compiled.graph
    atts = graph.find("attention")
    assert len(atts) == LAYERS and not graph.find("softmax"), compiled.pass_log.why_not(
        "attention/")
    assert all(a.attrs["kv_heads"] == FAMILIES[family] for a in atts), [a.attrs for a in atts]
    assert not graph.find("torch_fallback"), graph.meta.get("fallbacks")
    if family != "bert":  # the decoders' mask indexing is the IR op (GatherND in the file)
        assert graph.find("index")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seq in SEQ_LENS:
        feeds = _feeds(seq)
        want = session.run(None, feeds)
        got = compiled(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        got = [got] if isinstance(got, torch.Tensor) else list(
            got.values() if isinstance(got, dict) else got)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, torch.from_numpy(w), rtol=TOL, atol=TOL)
