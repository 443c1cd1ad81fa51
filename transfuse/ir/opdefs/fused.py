"""Fused Transformer ops made by the recognition passes: ``swiglu``, ``rotary``, ``add_norm``.

Each reference implementation is written as the plain math the recognised
pattern computes, in the same order, so a rewrite is equal by construction
(the interpreter gives the same numbers before and after).

Glossary: B batch, H heads, S sequence length, D head dim (even), E the
normalised (hidden) size, F the MLP hidden size.

- ``swiglu(gate, up)`` = ``silu(gate) * up`` (the Llama MLP; gate, up [..., F]).
- ``rotary(x, cos, sin) {interleaved}`` = ``x * cos + rotate(x) * sin``: rotary position
  embedding of ``x`` [..., D]. The op is layout-agnostic: x is [B, H, S, D] (cos/sin
  typically [S, D] or [B, 1, S, D]) or [B, S, H, D] (cos/sin [S, 1, D]); cos and sin
  broadcast against x and never enlarge it. They are full width (D): every frequency
  appears twice, as the two halves (``interleaved=False``, rotate-half / GPT-NeoX /
  Llama: ``rotate(x) = cat(-x[..., D/2:], x[..., :D/2])``) or as neighbouring pairs
  (``interleaved=True``, GPT-J: ``rotate(x)[2i] = -x[2i+1], rotate(x)[2i+1] = x[2i]``).
- ``add_norm(x, residual, weight?, bias?) {kind, eps, ...}`` -> ``(normed, sum)``:
  ``sum = x + residual``; ``normed = layer_norm(sum)`` (``kind="layer"``) or
  ``rms_norm(sum)`` (``kind="rms"``, with rms_norm's ``offset`` and ``upcast``). The sum
  is the second output because pre-norm Transformers need it as the next residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transfuse.ir.opdef import Attr, default_bytes, register
from transfuse.ir.opdefs._util import broadcast, in_type, result_dtype
from transfuse.ir.opdefs.nn import layer_norm, rms_norm
from transfuse.ir.types import TensorType, dim_str, dims_equal

# -- swiglu ---------------------------------------------------------------------------


def _infer_swiglu(node):
    return [TensorType(result_dtype(in_type(node, 0), in_type(node, 1)), broadcast(node))]


def _verify_swiglu(node):
    if not in_type(node, 0).dtype.is_float:
        return f"swiglu: gate must be floating point, got {in_type(node, 0)}"
    return None


@register("swiglu", ["gate", "up"], infer=_infer_swiglu, verify=_verify_swiglu,
          cost=lambda n: (5 * n.outputs[0].type.numel(), default_bytes(n)))
def swiglu(xs, attrs, env):
    """silu(gate) * up."""
    return F.silu(xs[0]) * xs[1]


# -- rotary ---------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) of the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the interleaved rotation."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _infer_rotary(node):
    return [TensorType(result_dtype(*(in_type(node, i) for i in range(3))), broadcast(node))]


def _verify_rotary(node):
    x = in_type(node, 0)
    if x.rank < 1 or not isinstance(x.shape[-1], int) or x.shape[-1] % 2:
        return f"rotary: the last dim of x must be a static even size D, got {x}"
    out = node.outputs[0].type if node.outputs else None
    if out is not None and (out.rank != x.rank or
                            not all(dims_equal(a, b) for a, b in zip(out.shape, x.shape))):
        return (f"rotary: cos {in_type(node, 1)} / sin {in_type(node, 2)} must broadcast into "
                f"x {x} without enlarging it")
    for i, what in ((1, "cos"), (2, "sin")):
        t = in_type(node, i)
        if t.rank == 0 or not dims_equal(t.shape[-1], x.shape[-1]):
            return (f"rotary: {what} {t} must be full width (last dim {dim_str(x.shape[-1])}, "
                    "each frequency twice)")
    return None


@register("rotary", ["x", "cos", "sin"], {"interleaved": Attr("bool", False)},
          infer=_infer_rotary, verify=_verify_rotary,
          cost=lambda n: (3 * n.outputs[0].type.numel(), default_bytes(n)))
def rotary(xs, attrs, env):
    """x * cos + rotate(x) * sin; rotate is rotate-half, or pairwise when ``interleaved``."""
    x, cos, sin = xs
    rot = rotate_pairs(x) if attrs["interleaved"] else rotate_half(x)
    return x * cos + rot * sin


# -- add_norm -------------------------------------------------------------------------

_KINDS = ("layer", "rms")


def _infer_add_norm(node):
    t = TensorType(result_dtype(in_type(node, 0), in_type(node, 1)), broadcast(node, 0, 1))
    return [t, t]


def _verify_add_norm(node):
    a = node.attrs
    if a["kind"] not in _KINDS:
        return f"add_norm: kind must be one of {_KINDS}, got {a['kind']!r}"
    if a["kind"] == "layer" and (a["offset"] or a["upcast"]):
        return "add_norm: offset and upcast are rms attributes"
    if a["kind"] == "rms" and len(node.inputs) > 3 and node.inputs[3] is not None:
        return "add_norm: an rms norm has no bias"
    s = node.outputs[0].type if node.outputs else None
    nd = a["normalized_ndim"]
    if s is not None and not 1 <= nd <= s.rank:
        return f"add_norm: normalized_ndim {nd} out of range for {s}"
    for v in node.inputs[2:]:
        if v is not None and s is not None and (
                v.type.rank != nd or
                not all(dims_equal(p, q) for p, q in zip(v.type.shape, s.shape[-nd:]))):
            return f"add_norm: parameter {v.type} does not match normalized shape of {s}"
    if not a["eps"] >= 0:
        return "add_norm: eps must be >= 0"
    return None


def _cost_add_norm(node):
    return 9 * node.outputs[0].type.numel(), default_bytes(node)


@register("add_norm", ["x", "residual", "weight?", "bias?"],
          {"kind": Attr("str"), "eps": Attr("float"), "normalized_ndim": Attr("int", 1),
           "offset": Attr("float", 0.0), "upcast": Attr("bool", False)},
          infer=_infer_add_norm, verify=_verify_add_norm, cost=_cost_add_norm)
def add_norm(xs, attrs, env):
    """(norm(x + residual), x + residual); norm is ``layer_norm`` or ``rms_norm`` by ``kind``."""
    s = xs[0] + xs[1]
    params = [xs[i] if len(xs) > i else None for i in (2, 3)]
    if attrs["kind"] == "layer":
        normed = layer_norm([s, *params], {"eps": attrs["eps"],
                                           "normalized_ndim": attrs["normalized_ndim"]}, env)
    else:
        normed = rms_norm([s, params[0]], {k: attrs[k] for k in
                                           ("eps", "normalized_ndim", "offset", "upcast")}, env)
    return normed, s
