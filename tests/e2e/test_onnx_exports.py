"""Dynamo ONNX exports of Hugging Face models through both targets, as a new user makes them:
``torch.onnx.export(model, (ids,), dynamo=True, dynamic_shapes=...)`` of a tiny GPT-2, Llama,
Mistral, Qwen2, Phi-3, GPT-NeoX, Gemma (decoders) and BERT (encoder), then
``transfuse.optimize(path, target=...)``.

The decoders' exports build their masks with ``GatherND`` (``aten::index.Tensor``), which
the ONNX frontend captures as the IR ``index`` op (before, a ``torch_fallback`` the
onnxruntime target refused). For each export and target: every layer's attention is one
fused ``attention`` op (causal for the decoders, Mistral's window, GQA kept as
``kv_heads``), no ``torch_fallback`` is left, and the outputs equal plain ONNX Runtime on
the same file at two sequence lengths. With an attention mask (Llama, BERT) the padding
term stays an ``index`` of the mask at run time, lowered by both targets.

Tiny configs: 2 layers, hidden 64, 4 heads (2 kv heads where the family has GQA), vocab
128, 64 positions, random weights; batch and sequence are dynamic in the export. The
exports are built once per module (a few seconds each)."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
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


class _WithMask(torch.nn.Module):
    """``model(input_ids, attention_mask=...)``'s first output (logits / hidden states)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask=attention_mask)[0]


def export(family: str, path, with_mask: bool) -> None:
    """The dynamo export of ``tiny_model(family)`` (called with the token ids, and the
    attention mask when ``with_mask``) with dynamic batch and sequence."""
    model = tiny_model(family)
    args = (torch.randint(0, VOCAB, (2, 16)),)
    if with_mask:
        model, args = _WithMask(model).eval(), args + (torch.ones(2, 16, dtype=torch.int64),)
    dims = {0: torch.export.Dim("batch", min=1, max=8),
            1: torch.export.Dim("seq", min=2, max=POSITIONS)}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, args, dynamo=True,
                                    dynamic_shapes=tuple(dims for _ in args),
                                    input_names=["input_ids", "attention_mask"][:len(args)],
                                    verbose=False)
        program.save(str(path))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, with_mask) -> path of its export, built on first use, kept for the module."""
    root, paths = tmp_path_factory.mktemp("onnx_exports"), {}

    def get(family: str, with_mask: bool = False):
        key = (family, with_mask)
        if key not in paths:
            paths[key] = root / f"{family}{'-mask' if with_mask else ''}.onnx"
            export(family, paths[key], with_mask)
        return paths[key]

    return get


def _feeds(seq: int, with_mask: bool) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seq)
    feeds = {"input_ids": torch.randint(0, VOCAB, (2, seq), generator=g).numpy()}
    if with_mask:
        mask = np.ones((2, seq), dtype=np.int64)
        mask[1, seq - seq // 4:] = 0  # right padding on the second row
        feeds["attention_mask"] = mask
    return feeds


def _check_against_onnxruntime(path, compiled, with_mask: bool) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seq in SEQ_LENS:
        feeds = _feeds(seq, with_mask)
        want = session.run(None, feeds)
        got = compiled(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        got = [got] if isinstance(got, torch.Tensor) else list(
            got.values() if isinstance(got, dict) else got)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, torch.from_numpy(w), rtol=TOL, atol=TOL)


@pytest.mark.slow
@pytest.mark.hf
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_fuses_attention_and_matches_onnxruntime(exported, family, target):
    """Token ids only: the decoders' masks (causal, same packed sequence, Mistral's window)
    are proven and gone; BERT attends everywhere."""
    path = exported(family)
    compiled = transfuse.optimize(path, target=target)
    graph = compiled.graph
    atts = graph.find("attention")
    assert len(atts) == LAYERS and not graph.find("softmax"), compiled.pass_log.why_not(
        "attention/")
    window = 8 if family == "mistral" else None
    assert all(a.attrs["kv_heads"] == FAMILIES[family] and a.attrs["window"] == window
               and a.attrs["causal"] is (family != "bert") and len(a.inputs) == 3
               for a in atts), [a.attrs for a in atts]
    assert not graph.find("torch_fallback"), graph.meta.get("fallbacks")
    _check_against_onnxruntime(path, compiled, with_mask=False)


@pytest.mark.slow
@pytest.mark.hf
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_export_with_attention_mask(exported, family, target, tmp_path):
    """With an attention mask (right padding): the padding term is an attention bias read
    from the mask with GatherND, the IR index op that both targets run; the onnxruntime
    target's own export runs in plain ONNX Runtime."""
    path = exported(family, with_mask=True)
    compiled = transfuse.optimize(path, target=target)
    graph = compiled.graph
    atts = graph.find("attention")
    assert len(atts) == LAYERS and not graph.find("softmax"), compiled.pass_log.why_not(
        "attention/")
    assert all(a.attrs["causal"] is (family != "bert") and a.inputs[3] is not None
               for a in atts), [a.attrs for a in atts]
    assert graph.find("index") and not graph.find("torch_fallback")
    _check_against_onnxruntime(path, compiled, with_mask=True)
    if target == "onnxruntime":
        out = tmp_path / "transfused.onnx"
        compiled.export_onnx(out)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert "GatherND" in {n.op_type for n in onnx.load(str(out)).graph.node}
        feeds = _feeds(11, with_mask=True)
        (got,) = session.run(None, feeds)
        (want,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, feeds)
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
