"""End to end, the attributes a fusion must carry over change the answer by far more than
rounding: a LayerNorm/RMSNorm eps of 1e-2 on low-variance activations, GELU on inputs of
magnitude 2-4 (where erf and tanh GELU differ by ~5e-4, 40x the relative tolerance on the
negative side), and a non-default attention scale (scale=0.3 by hand and through SDPA, and
Gemma's ``query_pre_attn_scalar``).

Each case goes through ``transfuse.optimize`` at O2 on both targets, asserts that the
fusion under test fired (so the attribute really went through it), and compares with eager
PyTorch at rtol 1e-4 / atol 1e-5. Measured by breaking each fusion on purpose: an eps
dropped to the default is off by up to 2.3 (absolute), a swapped GELU by 4.7e-4 (47x atol,
relative error 0.4 on the negative side), an attention scale dropped to 1/sqrt(D) by
5.6e-3 to 0.32, in the fusion (``attention.fuse-sdpa``) or in SDPA's conversion.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import transfuse

TARGETS = ("python", "onnxruntime")
RTOL, ATOL = 1e-4, 1e-5
DYNAMIC = {"seq": (2, 64)}
D = 32  # model width
EPS = 1e-2  # the non-default eps; activations below have variance ~1e-3


def _assert_close(got, want, what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        where = f"{what}[{i}]"
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL,
                                   msg=lambda m, where=where: f"{where}: {m}")


def _compile_and_compare(model: nn.Module, make_input, target: str, seqs=(5, 16, 23)):
    """O2 on ``target``; outputs match eager at several lengths; returns the compiled model."""
    compiled = transfuse.optimize(model, (make_input(16, 0),), dynamic=DYNAMIC, target=target)
    bad = [(r.name, r.status) for r in compiled.pass_log.records
           if r.status not in ("changed", "unchanged")]
    assert not bad, bad
    with torch.inference_mode():
        for i, s in enumerate(seqs):
            x = make_input(s, 1 + i)
            _assert_close(compiled(x), model(x), f"{target} seq={s}")
    return compiled


# -- norms with eps=1e-2 ---------------------------------------------------------------------


class LowVarianceNorms(nn.Module):
    """A residual block's sum through three norms with eps=1e-2: ``nn.LayerNorm``, LayerNorm
    written out (GPT-2 style) and RMSNorm written out (Llama style)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.ln = nn.LayerNorm(D, eps=EPS)
        self.w = nn.Parameter(1.0 + 0.1 * torch.randn(D))
        self.b = nn.Parameter(0.1 * torch.randn(D))
        with torch.no_grad():
            self.proj.weight.mul_(0.1)
            self.proj.bias.zero_()

    def forward(self, x):  # x: (B, S, D) with std ~0.03: variance ~1e-3, well below eps
        h = x + self.proj(x)  # the residual add: norms after it fuse into add_norm
        a = self.ln(h)
        mu = h.mean(-1, keepdim=True)
        var = (h - mu).pow(2).mean(-1, keepdim=True)
        b = (h - mu) / torch.sqrt(var + EPS) * self.w + self.b
        c = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * self.w
        return a, b, c


def _gaussian(std: float):
    """Inputs (1, S, D) of standard deviation ``std``: ``make(seq, seed)``."""

    def make(seq: int, seed: int) -> torch.Tensor:
        return std * torch.randn(1, seq, D, generator=torch.Generator().manual_seed(seed))

    return make


@pytest.mark.parametrize("target", TARGETS)
def test_norm_eps_1e2_on_low_variance_inputs(target):
    torch.manual_seed(0)
    model = LowVarianceNorms().eval()
    compiled = _compile_and_compare(model, _gaussian(0.03), target)
    g = compiled.graph
    norms = g.find("layer_norm") + g.find("rms_norm") + g.find("add_norm")
    kinds = sorted(n.op if n.op != "add_norm" else f"add_norm:{n.attrs['kind']}" for n in norms)
    assert len(norms) == 3, kinds  # every spelling fused (into add_norm with the residual add)
    assert {"sqrt", "rsqrt", "pow", "mean"}.isdisjoint(g.op_histogram()), g.op_histogram()
    assert all(n.attrs["eps"] == pytest.approx(EPS) for n in norms), [n.attrs for n in norms]


# -- GELU on inputs of magnitude 2..4 -----------------------------------------------------------


class Gelus(nn.Module):
    """One GELU flavour three ways: ``F.gelu``, written out, and after a linear layer (where
    O2 folds it into the linear's epilogue). The linear is the identity, so every GELU sees
    inputs of magnitude 2..4."""

    def __init__(self, approximate: str):
        super().__init__()
        self.approximate = approximate
        self.fc = nn.Linear(D, D)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(D))
            self.fc.bias.zero_()

    def forward(self, x):
        a = F.gelu(x, approximate=self.approximate)
        if self.approximate == "tanh":
            b = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
        else:
            b = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
        c = F.gelu(self.fc(x), approximate=self.approximate)
        return a, b, c


def _magnitude_2_to_4(seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    magnitude = 2.0 + 2.0 * torch.rand(1, seq, D, generator=g)
    sign = torch.where(torch.rand(1, seq, D, generator=g) < 0.5, -1.0, 1.0)
    return sign * magnitude


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_flavour_on_inputs_of_magnitude_2_to_4(approximate, target):
    model = Gelus(approximate).eval()
    compiled = _compile_and_compare(model, _magnitude_2_to_4, target)
    g = compiled.graph
    assert {"erf", "tanh", "pow"}.isdisjoint(g.op_histogram()), g.op_histogram()
    # the written-out GELU became the same op as F.gelu's, and CSE made them one
    (gelu,) = g.find("gelu")
    assert gelu.attrs["approximate"] == approximate
    (fc,) = g.find("linear")
    assert fc.attrs["activation"] == ("gelu_tanh" if approximate == "tanh" else "gelu")


# -- attention with a non-default scale ---------------------------------------------------------

SCALE = 0.3  # 1/sqrt(8) = 0.354 would be the default for head dim 8
HEADS, HEAD_DIM = 4, 8


class ScaledAttention(nn.Module):
    """Causal self-attention with scale 0.3, written out and through SDPA (same q, k, v)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        with torch.no_grad():
            self.qkv.weight.mul_(4.0)  # scores of order 1..10: the scale matters

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = (t.view(B, S, HEADS, HEAD_DIM).transpose(1, 2)
                   for t in self.qkv(x).split(D, dim=-1))  # (B, H, S, D)
        scores = (q @ k.transpose(-1, -2)) * SCALE
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        a = torch.softmax(scores, dim=-1) @ v
        b = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)
        return a.transpose(1, 2).reshape(B, S, D), b.transpose(1, 2).reshape(B, S, D)


@pytest.mark.parametrize("target", TARGETS)
def test_attention_scale_0_3(target):
    torch.manual_seed(0)
    model = ScaledAttention().eval()
    compiled = _compile_and_compare(model, _gaussian(1.0), target)
    g = compiled.graph
    attention = g.find("attention")
    assert attention and not g.find("softmax"), g.op_histogram()
    assert all(n.attrs["scale"] == pytest.approx(SCALE) and n.attrs["causal"]
               for n in attention), [n.attrs for n in attention]


GEMMA_HEAD_DIM, GEMMA_SCALAR = 16, 64  # scale 1/8, not 1/sqrt(16) = 1/4


def _gemma(kind: str, attn: str):
    transformers = pytest.importorskip("transformers")
    config = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=GEMMA_HEAD_DIM,
                  query_pre_attn_scalar=GEMMA_SCALAR, sliding_window=8, vocab_size=500,
                  max_position_embeddings=128, use_cache=False)
    if kind == "gemma2":  # also attention logit softcapping (50)
        cfg, cls = transformers.Gemma2Config(**config), transformers.Gemma2ForCausalLM
    else:  # q/k norms; both layers sliding-window
        cfg, cls = transformers.Gemma3TextConfig(**config), transformers.Gemma3ForCausalLM
    torch.manual_seed(0)
    return cls._from_config(cfg, attn_implementation=attn).eval()


@pytest.mark.hf
@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind, attn", [("gemma2", "eager"), ("gemma3", "eager"),
                                        ("gemma3", "sdpa")])
def test_gemma_query_pre_attn_scalar(kind, attn, target):
    model = _gemma(kind, attn)

    def ids(seq, seed):
        return torch.randint(0, 500, (1, seq), generator=torch.Generator().manual_seed(seed))

    compiled = transfuse.optimize(model, (), {"input_ids": ids(16, 0)}, dynamic=DYNAMIC,
                                  target=target)
    with torch.inference_mode():
        for i, seq in enumerate((5, 21)):  # 21 > the sliding window
            x = ids(seq, 1 + i)
            torch.testing.assert_close(compiled(input_ids=x).logits, model(input_ids=x).logits,
                                       rtol=RTOL, atol=ATOL)
    attention = compiled.graph.find("attention")
    assert len(attention) == 2 and not compiled.graph.find("softmax")
    assert all(n.attrs["scale"] == pytest.approx(GEMMA_SCALAR ** -0.5) for n in attention)
