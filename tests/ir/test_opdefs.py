"""Every registered op against its reference: inferred types equal what the reference
implementation produces, under two bindings of the symbolic dims; independent torch
references where the IR semantics are more than one torch call; text round trip and cost.

A new op must add a case to ``CASES`` (``test_every_op_has_a_case`` fails otherwise).

Attention glossary: B batch, H query heads, Hkv kv heads, S query length, T key length,
D head dim.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from transfuse.errors import IRVerifyError
from transfuse.ir.cost import node_cost
from transfuse.ir.graph import Graph
from transfuse.ir.interpret import interpret
from transfuse.ir.ops import all_ops
from transfuse.ir.parser import parse_graph
from transfuse.ir.printer import print_graph
from transfuse.ir.types import DType, TensorType, eval_dim, sym
from transfuse.ir.verify import verify

B, S = sym("batch"), sym("seq")
ENVS = [{"batch": 2, "seq": 5}, {"batch": 1, "seq": 3}]
ANCHOR = TensorType(DType.f32, [B, S])  # an unused graph input that binds both symbols


@dataclasses.dataclass
class In:
    """A case input: its type and how to fill it (randn, pos, int<N>, bool, true, kpm)."""

    dtype: str
    shape: tuple
    fill: str = ""

    def type(self) -> TensorType:
        return TensorType(DType.parse(self.dtype), self.shape)

    def make(self, env: dict[str, int], gen: torch.Generator) -> torch.Tensor:
        t = self.type()
        shape = t.concrete(env)
        fill = self.fill or (
            "bool" if t.dtype == DType.bool else "randn" if t.dtype.is_float else "int5"
        )
        if fill == "randn":
            x = torch.randn(shape, generator=gen)
        elif fill == "pos":
            x = torch.rand(shape, generator=gen) + 0.5
        elif fill.startswith("int"):
            hi = int(fill[3:]) if fill[3:].isdigit() else eval_dim(_SYM[fill[3:]], env)
            x = torch.randint(0, hi, shape, generator=gen)
        elif fill == "nonzero":
            x = torch.randint(1, 6, shape, generator=gen) * (
                torch.randint(0, 2, shape, generator=gen) * 2 - 1
            )
        elif fill == "bool":
            x = torch.rand(shape, generator=gen) < 0.5
        elif fill == "true":
            x = torch.ones(shape, dtype=torch.bool)
        elif fill == "kpm":  # key padding mask: key 0 always visible, so no row is all masked
            x = torch.rand(shape, generator=gen) < 0.7
            x[:, 0] = True
        else:
            raise ValueError(fill)
        return x.to(t.dtype.torch)


_SYM = {"seq": S, "batch": B}


def f32(*shape, fill=""):
    return In("f32", shape, fill)


def i64(*shape, fill=""):
    return In("i64", shape, fill)


def boolean(*shape, fill=""):
    return In("bool", shape, fill)


@dataclasses.dataclass
class Case:
    inputs: list[In | None]
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    ref: Callable | None = None  # independent torch reference: ref(*tensors) -> tensor(s)
    id: str = ""


def C(*inputs, ref=None, id="", **attrs) -> Case:
    return Case(list(inputs), attrs, ref, id)


# -- independent references ------------------------------------------------------


def ref_attention(
    q,
    k,
    v,
    bias=None,
    kpm=None,
    *,
    scale=None,
    causal=False,
    window=None,
    kv_heads=None,
    alibi=None,
    softcap=None,
    layout="bhsd",
):
    """Attention written out head by head with explicit positions (no SDPA, no repeat)."""
    if layout == "bshd":
        q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    b, h, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    i = torch.arange(s)[:, None] + (t - s)  # absolute query positions (bottom-right aligned)
    j = torch.arange(t)[None, :]
    out = torch.empty(b, h, s, v.shape[-1], dtype=q.dtype)
    for head in range(h):
        kvh = head // (h // hkv)  # query head -> its kv head group
        scores = torch.einsum("bsd,btd->bst", q[:, head], k[:, kvh]) * scale  # (B, S, T)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if alibi is not None:
            scores = scores + alibi[head] * (j - i).to(scores.dtype)
        if bias is not None:
            scores = scores + bias.expand(b, h, s, t)[:, head]
        allowed = torch.ones(s, t, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if window is not None:
            allowed &= i - j < window
        allowed = allowed.expand(b, s, t)
        if kpm is not None:
            allowed = allowed & kpm.bool()[:, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        p = torch.exp(scores - scores.amax(-1, keepdim=True))
        p = p / p.sum(-1, keepdim=True)
        out[:, head] = torch.einsum("bst,btd->bsd", p, v[:, kvh])
    return out.permute(0, 2, 1, 3) if layout == "bshd" else out


def attn(*inputs, id="", **attrs) -> Case:
    def ref(q, k, v, bias=None, kpm=None):
        return ref_attention(q, k, v, bias, kpm, **attrs)

    return Case(list(inputs), attrs, ref, id)


def ref_rms_norm(eps=1e-6, offset=0.0, upcast=True, normalized_ndim=1):
    def ref(x, w=None):
        dims = tuple(range(-normalized_ndim, 0))
        h = x.float() if upcast else x
        h = (h / torch.sqrt((h * h).mean(dims, keepdim=True) + eps)).to(x.dtype)
        return h if w is None else h * (w + offset)

    return ref


# -- the cases -------------------------------------------------------------------

BINARY_REFS = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.true_divide,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "eq": torch.eq,
    "ne": torch.ne,
    "lt": torch.lt,
    "le": torch.le,
    "gt": torch.gt,
    "ge": torch.ge,
}

CASES: dict[str, list[Case]] = {}

for _op in BINARY_REFS:
    CASES[_op] = [
        C(f32(B, S, 4), f32(4), ref=BINARY_REFS[_op], id="broadcast"),
        C(i64(S, 1), In("f32", ()), ref=BINARY_REFS[_op], id="promote-0d"),
        C(In("f16", (3, 1)), In("i32", (1, S)), ref=BINARY_REFS[_op], id="f16-i32"),
    ]
CASES["pow"] = [
    C(f32(S, 4, fill="pos"), f32(4), ref=lambda a, b: torch.exp(b * torch.log(a))),
    C(i64(S), i64(1), id="int"),
]
CASES["floor_div"] = [
    C(i64(S, 3), In("i64", (3,), "nonzero"), ref=lambda a, b: torch.floor(a / b).long()),
    C(f32(S), f32(S, fill="pos"), ref=lambda a, b: torch.floor(a / b)),
]
CASES["remainder"] = [
    C(i64(S, 3), In("i64", (3,), "nonzero"), ref=lambda a, b: a - torch.floor(a / b).long() * b),
    C(f32(S), f32(1, fill="pos"), ref=lambda a, b: a - torch.floor(a / b) * b),
]
for _op, _fn in {
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
}.items():
    CASES[_op] = [C(boolean(B, S), boolean(S), ref=_fn), C(f32(S), boolean(S), id="mixed")]

UNARY_FLOAT_REFS = {
    "exp": lambda x: math.e**x,
    "log": None,
    "sqrt": lambda x: x**0.5,
    "rsqrt": lambda x: x**-0.5,
    "reciprocal": lambda x: 1 / x,
    "tanh": None,
    "erf": None,
    "sin": None,
    "cos": None,
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
    "silu": lambda x: x / (1 + torch.exp(-x)),
}
for _op, _ref in UNARY_FLOAT_REFS.items():
    CASES[_op] = [
        C(f32(B, S, 4, fill="pos"), ref=_ref),
        C(In("i64", (S,), "int5"), id="int-promotes"),
        C(In("bf16", (3,), "pos"), id="bf16"),
    ]
UNARY_SAME_REFS = {
    "neg": lambda x: -x,
    "abs": lambda x: torch.where(x < 0, -x, x),
    "relu": lambda x: x.clamp_min(0),
    "floor": None,
    "ceil": None,
    "sign": None,
}
for _op, _ref in UNARY_SAME_REFS.items():
    CASES[_op] = [C(f32(B, S), ref=_ref), C(In("f16", (S, 2)), id="f16")]
for _op in ("neg", "abs", "relu", "sign"):
    CASES[_op].append(C(In("i32", (S,), "nonzero"), id="int"))
CASES["logical_not"] = [C(boolean(S, 2), ref=lambda x: ~x), C(f32(S), id="float")]
CASES["gelu"] = [
    C(f32(B, S, 8), ref=lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))),
    C(
        f32(S, 8),
        approximate="tanh",
        ref=lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    ),
]
CASES["cast"] = [
    C(f32(B, S), dtype=DType.f16),
    C(i64(S), dtype=DType.f32),
    C(f32(S), dtype=DType.bool),
    C(In("bf16", (S,)), dtype=DType.i32),
]
CASES["where"] = [
    C(boolean(S, 1), f32(S, 4), f32(4), ref=lambda c, a, b: c * a + (~c) * b),
    C(boolean(B, S), In("f16", ()), i64(S), id="promote"),
]
CASES["clamp"] = [
    C(f32(S, 4), min=-0.5, max=0.5, ref=lambda x: x.clamp(-0.5, 0.5)),
    C(f32(S), min=0.0, id="min-only"),
    C(i64(S), max=2.0, id="int"),
]
CASES["matmul"] = [
    C(f32(B, S, 8), f32(8, 3), ref=lambda a, b: torch.einsum("bsk,kn->bsn", a, b)),
    C(f32(8), f32(8, S), id="1d-2d"),
    C(f32(S, 8), f32(8), id="2d-1d"),
    C(f32(8), f32(8), id="1d-1d"),
    C(f32(2, 1, S, 4), f32(3, 4, 5), id="batch-broadcast"),
]
CASES["linear"] = [
    C(f32(B, S, 8), f32(3, 8), f32(3), ref=lambda x, w, b: torch.einsum("bsk,nk->bsn", x, w) + b),
    C(f32(S, 8), f32(3, 8), None, ref=lambda x, w: x @ w.T, id="no-bias"),
]
CASES["identity"] = [C(f32(B, S), ref=lambda x: x)]
CASES["dropout"] = [C(f32(B, S), p=0.5, ref=lambda x: x)]
CASES["assert"] = [C(boolean(S, fill="true"), boolean(2, fill="true"), message="ok")]
CASES["layer_norm"] = [
    C(
        f32(B, S, 8),
        f32(8),
        f32(8),
        eps=1e-3,
        ref=lambda x, w, b: (
            (x - x.mean(-1, True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-3) * w
            + b
        ),
    ),
    C(
        f32(B, S, 8),
        None,
        None,
        id="no-affine",
        ref=lambda x: (
            (x - x.mean(-1, True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        ),
    ),
    C(f32(S, 4, 8), f32(4, 8), f32(4, 8), normalized_ndim=2, id="2d"),
]
CASES["rms_norm"] = [
    C(f32(B, S, 8), f32(8), ref=ref_rms_norm()),
    C(f32(S, 8), f32(8), offset=1.0, eps=1e-5, ref=ref_rms_norm(eps=1e-5, offset=1.0), id="gemma"),
    C(In("bf16", (S, 8)), In("bf16", (8,)), id="bf16-upcast", ref=ref_rms_norm()),
    C(f32(S, 8), None, upcast=False, ref=ref_rms_norm(upcast=False), id="no-weight"),
]
CASES["attention"] = [
    attn(f32(B, 4, S, 8), f32(B, 4, S, 8), f32(B, 4, S, 8), id="plain"),
    attn(f32(B, 4, S, 8), f32(B, 4, S, 8), f32(B, 4, S, 8), causal=True, id="causal"),
    attn(f32(1, 2, 3, 8), f32(1, 2, 7, 8), f32(1, 2, 7, 8), causal=True, id="causal-kv-cache"),
    attn(f32(B, 4, S, 8), f32(B, 4, S, 8), f32(B, 4, S, 8), causal=True, window=2, id="window"),
    attn(f32(B, 4, S, 8), f32(B, 2, S, 8), f32(B, 2, S, 8), causal=True, kv_heads=2, id="gqa"),
    attn(f32(B, 4, S, 8), f32(B, 1, S, 8), f32(B, 1, S, 8), id="mqa"),
    attn(
        f32(B, 4, S, 8),
        f32(B, 4, S, 8),
        f32(B, 4, S, 8),
        causal=True,
        alibi=[0.5, 0.25, 0.125, 0.0625],
        id="alibi",
    ),
    attn(f32(B, 4, S, 8), f32(B, 4, S, 8), f32(B, 4, S, 8), softcap=2.0, scale=0.7, id="softcap"),
    attn(f32(B, 4, S, 8), f32(B, 4, S, 8), f32(B, 4, S, 8), f32(B, 1, S, S), id="bias"),
    attn(
        f32(B, 4, S, 8),
        f32(B, 4, S, 8),
        f32(B, 4, S, 8),
        None,
        In("bool", (B, S), "kpm"),
        id="key-padding-mask",
    ),
    attn(
        f32(B, 4, S, 8),
        f32(B, 4, S, 8),
        f32(B, 4, S, 8),
        f32(4, S, S),
        In("i64", (B, S), "kpm"),
        causal=True,
        id="bias-and-mask",
    ),
    attn(
        f32(B, S, 4, 8),
        f32(B, S, 2, 8),
        f32(B, S, 2, 6),
        causal=True,
        layout="bshd",
        id="bshd-gqa-dv",
    ),
    attn(f32(B, 4, S, 8), f32(B, 4, S, 8), f32(B, 4, S, 6), id="dv-differs"),
]
for _op, _fn in {"reduce_sum": torch.sum, "reduce_mean": torch.mean}.items():
    CASES[_op] = [
        C(f32(B, S, 4), axes=[1], ref=lambda x, f=_fn: f(x, 1)),
        C(f32(B, S, 4), axes=[0, -1], keepdim=True, id="keepdim"),
        C(f32(S, 4), id="all"),
    ]
for _op, _fn in {"reduce_max": torch.amax, "reduce_min": torch.amin}.items():
    CASES[_op] = [
        C(f32(B, S, 4), axes=[-1], ref=lambda x, f=_fn: f(x, -1)),
        C(i64(B, S), axes=[1], keepdim=True, id="int-keepdim"),
        C(f32(S, 4), id="all"),
    ]
CASES["argmax"] = [C(f32(B, S, 4), axis=1), C(f32(S, 4), axis=-1, keepdim=True, id="keepdim")]
CASES["softmax"] = [
    C(f32(B, S, 6), ref=lambda x: torch.exp(x) / torch.exp(x).sum(-1, keepdim=True)),
    C(f32(S, 6), axis=0, id="axis0"),
]
CASES["log_softmax"] = [
    C(f32(B, S, 6), ref=lambda x: x - torch.log(torch.exp(x).sum(-1, keepdim=True))),
    C(f32(S, 6), axis=0, id="axis0"),
]
CASES["cumsum"] = [
    C(f32(B, S), axis=1),
    C(In("i32", (S, 3)), axis=0, id="int-promotes"),
    C(f32(S), axis=0, dtype=DType.f64, id="dtype"),
    C(boolean(S), axis=0, id="bool"),
]
CASES["reshape"] = [
    C(f32(B, S, 8), shape=[B, S, 2, 4], ref=lambda x: x.view(x.shape[0], x.shape[1], 2, 4)),
    C(f32(B, S, 8), shape=[B * S, 8], id="flatten-symbolic"),
    C(f32(2, 6), shape=[3, 4], id="static"),
]
CASES["permute"] = [
    C(f32(B, S, 4), perm=[0, 2, 1], ref=lambda x: x.transpose(1, 2)),
    C(f32(B, S, 4, 2), perm=[2, 0, 3, 1], id="4d"),
]
CASES["expand"] = [C(f32(1, S, 1), shape=[B, S, 4]), C(f32(S), shape=[3, S], id="new-dims")]
CASES["concat"] = [
    C(f32(B, S, 4), f32(B, 3, 4), axis=1, ref=lambda a, b: torch.cat([a, b], 1)),
    C(f32(S, 2), f32(S, 3), f32(S, 1), axis=-1, id="three"),
    C(f32(S, 2), f32(S, 2), axis=0, id="seq+seq"),
]
CASES["split"] = [
    C(f32(B, S, 8), axis=-1, sizes=[3, 5], ref=lambda x: (x[..., :3], x[..., 3:])),
    C(f32(B, S + 2), axis=1, sizes=[S, 2], ref=lambda x: (x[:, :-2], x[:, -2:]), id="symbolic"),
]
CASES["slice"] = [
    C(f32(B, S, 6), axis=2, start=1, end=5, step=2, ref=lambda x: x[:, :, 1:5:2]),
    C(f32(B, S), axis=1, start=1, ref=lambda x: x[:, 1:], id="to-end"),
    C(f32(B, S), axis=1, start=S - 2, end=S, ref=lambda x: x[:, -2:], id="symbolic-bounds"),
    C(f32(B, S + 1), axis=1, start=1, end=S + 1, id="symbolic-expr"),
    C(f32(S, 4), axis=0, end=2, ref=lambda x: x[:2], id="prefix"),
]
CASES["index_select"] = [
    C(f32(S, 6), In("i64", (3,), "int6"), axis=1, ref=lambda x, i: x[:, i]),
    C(f32(S, 6), In("i64", (), "int6"), axis=1, ref=lambda x, i: x[:, int(i)], id="0d-index"),
    C(f32(S, 6), In("i64", (B,), "intseq"), axis=0, ref=lambda x, i: x[i], id="symbolic-index"),
]
CASES["gather"] = [
    C(
        f32(S, 6),
        In("i64", (S, 2), "int6"),
        axis=1,
        ref=lambda x, i: torch.stack([x[r, i[r]] for r in range(x.shape[0])]),
    )
]
CASES["index"] = [  # more in tests/ir/test_indexing_ops.py
    C(f32(B, S, 6), In("i64", (B, 1), "intbatch"), In("i64", (1, S), "intseq"), axes=[0, 1],
      ref=lambda x, i, j: x[i, j], id="mask-spelling"),
    C(f32(B, 4, S), In("i32", (S, 2), "int4"), axes=[1], ref=lambda x, i: x[:, i.long()],
      id="i32-in-place"),
    C(f32(2, 4, 6), In("i64", (S,), "int2"), In("i64", (S,), "int6"), axes=[0, 2],
      ref=lambda x, i, j: x[i, :, j], id="not-consecutive"),
]
CASES["scatter_nd"] = [  # more in tests/ir/test_indexing_ops.py
    C(f32(S, 6), In("i64", (1, 1), "int1"), f32(1, 6), id="row",
      ref=lambda x, i, u: x.index_put((i[:, 0],), u)),
    C(f32(S, 6), In("i64", (B, 2), "int1"), f32(B), reduction="add", id="add-elements",
      ref=lambda x, i, u: x.index_put((i[:, 0], i[:, 1]), u, accumulate=True)),
]
CASES["embedding"] = [
    C(f32(10, 8), In("i64", (B, S), "int10"), ref=lambda w, i: w[i]),
    C(f32(10, 8), In("i32", (S,), "int10"), id="i32-ids"),
]
CASES["arange"] = [
    C(end=S + 1, ref=lambda: None),
    C(start=2, end=10, step=3, dtype=DType.f32, id="static-f32"),
    C(start=1, end=S, id="symbolic-range"),
]
CASES["full"] = [
    C(shape=[B, S], value=0.5, dtype=DType.f16),
    C(shape=[], value=-math.inf, dtype=DType.f32, id="0d-neg-inf"),
]
CASES["tril"] = [
    C(
        f32(S, S),
        ref=lambda x: x * (torch.arange(x.shape[0])[:, None] >= torch.arange(x.shape[1])[None, :]),
    )
]
CASES["triu"] = [
    C(
        f32(B, S, S),
        diagonal=1,
        ref=lambda x: (
            x * (torch.arange(x.shape[1])[:, None] + 1 <= torch.arange(x.shape[2])[None, :])
        ),
    )
]
CASES["shape_of"] = [C(f32(B, S, 4), axis=1, ref=None)]
# fused ops made by the recognition passes (transfuse/ir/opdefs/fused.py)
CASES["linear"].append(
    C(f32(S, 8), f32(3, 8), f32(3), activation="gelu_tanh", id="gelu-tanh",
      ref=lambda x, w, b: F.gelu(x @ w.T + b, approximate="tanh"))
)
CASES["swiglu"] = [
    C(f32(B, S, 6), f32(B, S, 6), ref=lambda g, u: g * torch.sigmoid(g) * u),
    C(In("bf16", (S, 4)), In("bf16", (S, 4)), id="bf16"),
]


def ref_rotary_half(x, cos, sin):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    c1, c2 = cos[..., : x.shape[-1] // 2], cos[..., x.shape[-1] // 2 :]
    s1, s2 = sin[..., : x.shape[-1] // 2], sin[..., x.shape[-1] // 2 :]
    return torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)


def ref_rotary_pairs(x, cos, sin):
    xe, xo = x[..., 0::2], x[..., 1::2]
    ce, co, se, so = cos[..., 0::2], cos[..., 1::2], sin[..., 0::2], sin[..., 1::2]
    return torch.stack((xe * ce - xo * se, xo * co + xe * so), dim=-1).flatten(-2)


CASES["rotary"] = [
    C(f32(B, 2, S, 8), f32(S, 8), f32(S, 8), ref=ref_rotary_half, id="bhsd-half"),
    C(f32(B, S, 2, 8), f32(S, 1, 8), f32(S, 1, 8), interleaved=True, ref=ref_rotary_pairs,
      id="bshd-interleaved"),
]
CASES["add_norm"] = [
    C(f32(B, S, 8), f32(B, S, 8), f32(8), f32(8), kind="layer", eps=1e-5, id="layer",
      ref=lambda x, r, w, b: (F.layer_norm(x + r, (8,), w, b, 1e-5), x + r)),
    C(In("bf16", (B, S, 8)), In("bf16", (B, S, 8)), In("bf16", (8,)), kind="rms", eps=1e-6,
      upcast=True, id="rms-upcast",
      ref=lambda x, r, w: (ref_rms_norm(eps=1e-6)(x + r, w), x + r)),
    C(f32(S, 8), f32(B, S, 8), None, kind="rms", eps=1e-6, offset=1.0, id="rms-broadcast",
      ref=lambda x, r: (ref_rms_norm(eps=1e-6, upcast=False)(x + r), x + r)),
]

# references that need the symbol values
ENV_REFS: dict[tuple[str, str], Callable] = {
    ("arange", ""): lambda env: torch.arange(env["seq"] + 1),
    ("arange", "symbolic-range"): lambda env: torch.arange(1, env["seq"]),
    ("shape_of", ""): lambda env: torch.tensor(env["seq"]),
    ("full", ""): lambda env: torch.full((env["batch"], env["seq"]), 0.5, dtype=torch.float16),
}

NO_CASE = {"torch_fallback",  # has its own tests below
           "cached_attention",  # writes its inputs: tests/ir/test_cached_attention.py
           "qlinear", "qmatmul"}  # quantized weight types: tests/ir/test_quant.py


def test_every_op_has_a_case():
    missing = sorted(set(all_ops()) - set(CASES) - NO_CASE)
    assert not missing, f"add test cases to tests/ir/test_opdefs.py for: {missing}"
    stale = sorted(set(CASES) - set(all_ops()))
    assert not stale, f"cases for unknown ops: {stale}"


def _params():
    for op, cases in CASES.items():
        for i, case in enumerate(cases):
            yield pytest.param(op, case, id=f"{op}-{case.id or i}")


def build(op: str, case: Case) -> tuple[Graph, list]:
    g = Graph(op)
    g.add_input("dims", ANCHOR)
    ins = [
        None if spec is None else g.add_input(f"in{i}", spec.type())
        for i, spec in enumerate(case.inputs)
    ]
    node = g.create(op, ins, case.attrs)
    g.set_outputs(list(node.outputs))
    return g, node


@pytest.mark.parametrize("op,case", list(_params()))
def test_op_types_match_reference(op, case):
    g, node = build(op, case)
    verify(g)
    # text round trip
    text = print_graph(g)
    g2 = parse_graph(text)
    verify(g2)
    assert print_graph(g2) == text
    gen = torch.Generator().manual_seed(0)
    for env in ENVS:
        anchor = torch.zeros(env["batch"], env["seq"])
        tensors = [None if spec is None else spec.make(env, gen) for spec in case.inputs]
        outs = interpret(g, [anchor] + [t for t in tensors if t is not None], check_types=False)
        assert len(outs) == len(node.outputs)
        for v, out in zip(node.outputs, outs):
            want = (v.type.dtype, v.type.concrete(env))
            got = (DType.from_torch(out.dtype), tuple(out.shape))
            assert got == want, f"{op} {env}: inferred {v.type} = {want}, reference gave {got}"
        ref = ENV_REFS.get((op, case.id))
        expected = ref(env) if ref else None
        if expected is None and case.ref is not None:
            args = list(tensors)
            while args and args[-1] is None:
                args.pop()
            args = [a for a in args if a is not None] if op != "attention" else args
            expected = case.ref(*args)
        if expected is not None:
            expected = list(expected) if isinstance(expected, tuple) else [expected]
            for out, exp in zip(outs, expected, strict=True):
                torch.testing.assert_close(
                    out, exp.to(out.dtype), rtol=1e-5, atol=1e-5, equal_nan=True
                )
        flops, nbytes = node_cost(node)
        assert eval_dim(flops, env) >= 0 and eval_dim(nbytes, env) >= 0


def test_attention_matches_sdpa_for_causal_gqa():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    g = Graph()
    vals = [g.add_input(n, TensorType.of(t)) for n, t in zip("qkv", (q, k, v))]
    g.set_outputs([g.op("attention", *vals, causal=True, kv_heads=2)])
    (out,) = interpret(g, [q, k, v])
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "attrs,kshape,message",
    [
        ({"window": 0}, (1, 4, 5, 8), "window must be >= 1"),
        ({"alibi": [0.5]}, (1, 4, 5, 8), "1 alibi slopes for 4 heads"),
        ({"softcap": -1.0}, (1, 4, 5, 8), "softcap must be > 0"),
        ({"layout": "sbhd"}, (1, 4, 5, 8), "layout must be one of"),
        ({}, (1, 4, 5, 7), "head dims"),
        ({}, (1, 3, 5, 8), "not a multiple"),
    ],
)
def test_attention_verify_rejects(attrs, kshape, message):
    g = Graph()
    q = g.add_input("q", TensorType(DType.f32, (1, 4, 5, 8)))
    k = g.add_input("k", TensorType(DType.f32, kshape))
    g.set_outputs([g.op("attention", q, k, k, **attrs)])
    with pytest.raises(IRVerifyError, match=message):
        verify(g)


@pytest.mark.parametrize(
    "op,inputs,attrs,message",
    [
        ("matmul", [f32(3, 4), f32(5, 6)], {}, "contracted dims differ"),
        ("linear", [f32(3, 4), f32(5, 6)], {}, "does not match weight"),
        ("split", [f32(3, 8)], {"axis": 1, "sizes": [3, 3]}, "do not sum"),
        ("permute", [f32(3, 8)], {"perm": [0, 0]}, "not a permutation"),
        ("add", [f32(3, 8), f32(4)], {}, "do not broadcast"),
        ("softmax", [f32(3, 8)], {"axis": 2}, "out of range"),
        ("embedding", [f32(10, 4), f32(3)], {}, "ids must be integer"),
        ("concat", [f32(3, 8), In("f16", (3, 8))], {"axis": 0}, "differ in rank or dtype"),
        ("expand", [f32(3, 8)], {"shape": [3, 9]}, "cannot expand"),
    ],
)
def test_type_inference_rejects(op, inputs, attrs, message):
    g = Graph()
    vals = [g.add_input(f"x{i}", spec.type()) for i, spec in enumerate(inputs)]
    with pytest.raises(IRVerifyError, match=message):
        g.create(op, vals, attrs)


# -- torch_fallback --------------------------------------------------------------


def _fallback_graph(target: str, args: str, in_types, out_types) -> Graph:
    g = Graph()
    vals = [g.add_input(f"x{i}", t) for i, t in enumerate(in_types)]
    node = g.create(
        "torch_fallback",
        vals,
        {"target": target, "args": args},
        out_types=out_types,
        meta={"source": "model.odd"},
    )
    g.set_outputs(list(node.outputs))
    return g


def test_torch_fallback_cumprod_runs_and_round_trips():
    t = TensorType(DType.f32, [B, S])
    g = _fallback_graph("aten::cumprod.default", '{"args": [{"$in": 0}, 1]}', [t], [t])
    verify(g)
    text = print_graph(g)
    assert 'torch_fallback(%x0) {target="aten::cumprod.default"' in text
    g2 = parse_graph(text)
    assert print_graph(g2) == text
    x = torch.randn(2, 5)
    (out,) = interpret(g2, [x])
    torch.testing.assert_close(out, torch.cumprod(x, 1))


def test_torch_fallback_kwargs_dtype_and_multiple_outputs():
    x = torch.randn(3, 6)
    g = _fallback_graph(
        "aten::sum.dim_IntList",
        '{"args": [{"$in": 0}, [1]], "kwargs": {"keepdim": true, "dtype": {"$dtype": "float64"}}}',
        [TensorType.of(x)],
        [TensorType(DType.f64, [3, 1])],
    )
    (out,) = interpret(g, [x])
    torch.testing.assert_close(out, x.double().sum(1, keepdim=True))
    g = _fallback_graph(
        "aten::topk.default",
        '{"args": [{"$in": 0}, 2]}',
        [TensorType.of(x)],
        [TensorType(DType.f32, [3, 2]), TensorType(DType.i64, [3, 2])],
    )
    values, indices = interpret(g, [x])
    ref = torch.topk(x, 2)
    assert torch.equal(values, ref.values) and torch.equal(indices, ref.indices)


def test_torch_fallback_needs_out_types_and_a_real_target():
    g = Graph()
    x = g.add_input("x", TensorType(DType.f32, [4]))
    with pytest.raises(IRVerifyError, match="cannot infer"):
        g.create("torch_fallback", [x], {"target": "aten::cumprod.default"})
    g = _fallback_graph(
        "aten::no_such_op.default", "{}", [TensorType(DType.f32, [4])], [TensorType(DType.f32, [4])]
    )
    with pytest.raises(IRVerifyError, match="not a torch op"):
        interpret(g, [torch.randn(4)])



_OP_SET = """
import importlib, pkgutil, sys
import {first}
from transfuse.ir.ops import all_ops
import transfuse
alone = sorted(all_ops())
for m in pkgutil.walk_packages(transfuse.__path__, "transfuse."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
print(" ".join(alone))
print(" ".join(sorted(all_ops())))
"""


def test_op_set_is_complete_whatever_is_imported_first():
    """In a fresh interpreter, one op family imported before ``ir.ops`` still leaves every op
    registered, and importing all of transfuse afterwards adds none (no op is declared
    outside the families listed in ``ir/opdefs/__init__.py``)."""
    first = "transfuse.ir.opdefs.fused"
    out = subprocess.run([sys.executable, "-c", _OP_SET.format(first=first)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    alone, everything = out.stdout.splitlines()
    assert alone == everything
    assert alone.split() == sorted(all_ops())
