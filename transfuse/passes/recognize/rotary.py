"""recognize.fuse-rotary: rotary position embeddings (RoPE) -> ``rotary(x, cos, sin)``.

Glossary: B batch, H heads, S sequence length, D head dim (static, even), r the rank of
x. x is [B, H, S, D] (cos/sin [S, D], [B, 1, S, D]) or [B, S, H, D] (cos/sin [S, 1, D]);
the op does not care which, cos and sin broadcast against x and are full width (D).

Rules (root: ``x * cos + rotate(x) * sin``, either product first, either factor first):

- ``rope/rotate-half`` (GPT-NeoX, Llama, Hugging Face ``rotate_half``): ``rotate(x) =
  cat(-x[..., D/2:], x[..., :D/2])`` -> ``rotary(x, cos, sin)``;
- ``rope/interleaved`` (GPT-J ``rotate_every_two``): ``rotate(x) = stack(-x_odd, x_even,
  -1).flatten(-2)`` where the pairs (2i, 2i+1) come from strided slices ``x[..., ::2]``,
  ``x[..., 1::2]``, or from ``x.reshape(..., D/2, 2)`` by ``unbind(-1)`` or by selecting
  ``[..., 0]`` / ``[..., 1]`` -> ``rotary(x, cos, sin) {interleaved}``;
- ``rope/interleaved-pairwise`` (gpt-fast): each pair rotated by hand, ``stack(x0·c - x1·s,
  x1·c + x0·s, -1).flatten(-2)`` with half-width (D/2) tables -> ``rotary {interleaved}`` of
  the tables with every entry repeated (a reshape/expand/reshape of each table).

Needs: cleanup (fold-views leaves at most one reshape between the pieces). Guarantees:
the fused op computes exactly ``x * cos + rotate(x) * sin`` as matched: every slice,
split, reshape and concat is checked to be the rotation of the same ``x`` (a pairwise
rotation is never taken for rotate-half, nor the other way round); cos and sin stay the
graph computations (cache slices or position math) that feed the op.

Limits: the matcher does not backtrack, so in ``rope/interleaved`` the pairs must be cut
from x itself (``x * cos`` alone cannot tell x from cos); the pairwise form has no such
product and takes pairs cut from what x is a view of. Complex-number RoPE
(``view_as_complex``) is captured as a torch fallback and stays one.
"""

from __future__ import annotations

from transfuse.ir.graph import Value
from transfuse.ir.opdefs.shape import INT64_MAX
from transfuse.ir.types import dims_equal, result_dtype
from transfuse.passes.recognize._common import same_shape
from transfuse.passes.registry import register_pass
from transfuse.passes.rewrite import Match, P, Pattern, RewritePass, Rule

_x = P.any("x")


def rope(rot: Pattern) -> Pattern:
    """``x * cos + rot * sin`` (the rotated product first in the pattern: it binds x)."""
    return P.op("add", P.op("mul", rot, P.any("sin"), commutative=True),
                P.op("mul", _x, P.any("cos"), commutative=True), commutative=True)


def _head_dim(m: Match, ref: str = "x") -> tuple[int, str | None]:
    """D, the last dim of the rotated tensor ``m[ref]``, or a reason."""
    x = m[ref]
    d = x.shape[-1] if x.type.rank else None
    if not isinstance(d, int) or d % 2:
        return 0, f"the last dim of %{x.name} {x.type} is not a static even head dim"
    return d, None


def _axis_is_last(node, rank: int) -> bool:
    return node.attrs["axis"] % rank == rank - 1


def _check_tables(m: Match) -> str | None:
    """cos and sin broadcast into x, are full width, and the result keeps x's shape."""
    x, cos, sin = m["x"], m["cos"], m["sin"]
    for t, what in ((cos, "cos"), (sin, "sin")):
        if t.type.rank == 0 or not dims_equal(t.shape[-1], x.shape[-1]):
            return f"{what} %{t.name} {t.type} is not full width (last dim {x.shape[-1]})"
    out = m.root.outputs[0].type
    if not same_shape(out.shape, x.shape):
        return f"cos/sin broadcast x {x.type} up to {out}; rotary keeps x's shape"
    if out.dtype != result_dtype(x.type, cos.type, sin.type):
        return f"the rotated product changes the dtype to {out.dtype}"
    return None


def _replace(interleaved: bool):
    return lambda m, b: b.op("rotary", m["x"], m["cos"], m["sin"], interleaved=interleaved)


# -- rotate-half --------------------------------------------------------------------------

_rot_half = P.op("concat", P.op("neg", P.op("slice", _x, name="x2")),
                 P.op("slice", _x, name="x1"), name="cat")


def _slice_is(node, rank: int, start, end_at_least, step: int) -> bool:
    a = node.attrs
    end = a["end"]
    end_ok = (isinstance(end, int) and end >= INT64_MAX // 2) or dims_equal(end, end_at_least) \
        or (isinstance(end, int) and isinstance(end_at_least, int) and end >= end_at_least)
    return _axis_is_last(node, rank) and dims_equal(a["start"], start) and a["step"] == step \
        and end_ok


def _check_rotate_half(m: Match) -> str | None:
    d, reason = _head_dim(m)
    if reason:
        return reason
    r, h = m["x"].type.rank, d // 2
    x1, x2 = m.node("x1"), m.node("x2")
    if not (_slice_is(x1, r, 0, h, 1) and dims_equal(m["x1"].shape[-1], h)):
        return f"x1 is not the first half x[..., :{h}] (slice {dict(x1.attrs)})"
    if not _slice_is(x2, r, h, d, 1):
        return f"x2 is not the second half x[..., {h}:] (slice {dict(x2.attrs)})"
    if not _axis_is_last(m.node("cat"), r):
        return f"the halves are concatenated on axis {m.node('cat').attrs['axis']}, not the last"
    return _check_tables(m)


ROTATE_HALF = Rule(
    id="rope/rotate-half",
    pattern=rope(_rot_half),
    check=_check_rotate_half,
    replace=_replace(False),
    near_miss_depth=3,  # any sum of two products reaches depth 2
)

# -- interleaved --------------------------------------------------------------------------

# The matcher does not backtrack into an alternative that matched, so the alternatives are
# told apart by their own attributes: strided slices have step 2, pair selects step 1.


def pair_parts(source: Pattern) -> tuple[Pattern, Pattern]:
    """Patterns for pair elements 0 and 1 of x [..., D]: strided slices of x, or an unbind
    (split) / select (slice) of ``source`` = x reshaped to [..., D/2, 2]."""
    even = P.alt(P.op("slice", _x, name="even", attrs={"step": 2}),  # x[..., 0::2]
                 P.op("split", source, name="split", output=0),  # xr.unbind(-1)[0]
                 P.op("slice", source, name="even_sel", attrs={"step": 1}),  # xr[..., 0:1]
                 tags=("strided", "unbind", "select"))
    odd = P.alt(P.op("slice", _x, name="odd", attrs={"step": 2}),
                P.op("split", source, name="split", output=1),
                P.op("slice", source, name="odd_sel", attrs={"step": 1}),
                tags=("strided", "unbind", "select"))
    return even, odd


# here the pairs bind x (x * cos alone could not tell x from cos)
_even, _odd = pair_parts(P.op("reshape", _x, name="xr"))
_stacked = P.op("concat", P.maybe("reshape", P.op("neg", P.maybe("reshape", _odd))),
                P.maybe("reshape", _even), name="stack")
_rot_pairs = P.op("reshape", _stacked, name="rot")


def _unsqueezed(v: Value, lead, h: int) -> bool:
    """``v`` is x.shape[:-1] + [D/2] or that with a trailing 1 (a pure unsqueeze apart)."""
    s = tuple(v.shape)
    return same_shape(s, (*lead, h)) or same_shape(s, (*lead, h, 1))


def _view_root(v: Value) -> Value:
    """What ``v`` is a chain of reshapes of (row-major views of one buffer)."""
    while v.producer is not None and v.producer.op == "reshape":
        v = v.producer.inputs[0]
    return v


def _check_pair_parts(m: Match, d: int, ref: str = "x") -> str | None:
    """The even/odd parts are pair elements 0 and 1 of ``m[ref]``, the rotated tensor
    [..., D] (strided slices of it, or an unbind / select of it reshaped to [..., D/2, 2])."""
    x = m[ref]
    r, h, lead = x.type.rank, d // 2, tuple(x.shape[:-1])
    if "xr" in m and not same_shape(m["xr"].shape, (*lead, h, 2)):
        return f"%{m['xr'].name} {m['xr'].type} is not x reshaped to [..., {h}, 2]"
    if ("even" in m or "odd" in m) and not same_shape(m["x"].shape, x.shape):
        return f"strided slices of %{m['x'].name} {m['x'].type}, not of a {x.type} tensor"
    if "x" in m and "xflat" in m and _view_root(m["x"]) is not _view_root(m["xflat"]):
        return f"the pairs come from two tensors, %{m['x'].name} and %{m['xflat'].name}"
    if "split" in m:
        sp = m.node("split")
        if not _axis_is_last(sp, r + 1) or [int(s) for s in sp.attrs["sizes"]] != [1, 1]:
            return f"the split {dict(sp.attrs)} is not an unbind of the last (pair) axis"
    for name, start in (("even", 0), ("odd", 1)):
        if name in m and not (_slice_is(m.node(name), r, start, d - 1 + start, 2)
                              and dims_equal(m[name].shape[-1], h)):
            return f"{name} is not x[..., {start}::2] (slice {dict(m.node(name).attrs)})"
        sel = f"{name}_sel"
        if sel in m and not _slice_is(m.node(sel), r + 1, start, start + 1, 1):
            return f"{name} is not pair element {start} (slice {dict(m.node(sel).attrs)})"
    for v in (m.get("even"), m.get("odd"), m.get("even_sel"), m.get("odd_sel")):
        if v is not None and not _unsqueezed(v, lead, h):
            return f"a pair part {v.type} is reshaped beyond an unsqueeze"
    return None


def _check_stack(m: Match, d: int, ref: str = "x") -> str | None:
    """The two rotated parts are stacked as pairs and flattened back to ``m[ref]``'s shape."""
    x = m[ref]
    r, h, lead = x.type.rank, d // 2, tuple(x.shape[:-1])
    stack = m.node("stack")
    if not _axis_is_last(stack, r + 1) or not same_shape(m["stack"].shape, (*lead, h, 2)):
        return f"the rotated parts are not stacked as pairs [..., {h}, 2] ({m['stack'].type})"
    for v in stack.inputs:
        if not same_shape(v.shape, (*lead, h, 1)):
            return f"a stacked part {v.type} is not [..., {h}, 1]"
    if not same_shape(m["rot"].shape, x.shape):
        return f"the pairs are flattened to {m['rot'].type}, not x's shape {x.type}"
    return None


def _check_interleaved(m: Match) -> str | None:
    d, reason = _head_dim(m)
    return reason or _check_pair_parts(m, d) or _check_stack(m, d) or _check_tables(m)


INTERLEAVED = Rule(
    id="rope/interleaved",
    pattern=rope(_rot_pairs),
    check=_check_interleaved,
    replace=_replace(True),
    near_miss_depth=4,  # a hand-rotated pair (gpt-fast) reaches depth 3
)


# -- interleaved, pair by pair (gpt-fast) ------------------------------------------------------
#
#   out[2i]   = x[2i] * cos[i] - x[2i+1] * sin[i]
#   out[2i+1] = x[2i+1] * cos[i] + x[2i] * sin[i]
#
# with half-width tables (D/2): the same rotation as rotary {interleaved} with each table entry
# repeated for both elements of its pair (x*c + (-y)*s == x*c - y*s exactly in floating point).

# x is used only through its pairs: fold-views may have cut them from what x is a view of
_flat_even, _flat_odd = pair_parts(P.op("reshape", P.any("xflat"), name="xr"))
_xe = P.maybe("reshape", _flat_even, name="xe")
_xo = P.maybe("reshape", _flat_odd, name="xo")
_cos, _sin = P.any("cos"), P.any("sin")
_out_even = P.op("sub", P.op("mul", _xe, _cos, commutative=True, name="ec"),
                 P.op("mul", _xo, _sin, commutative=True, name="os"))
_out_odd = P.op("add", P.op("mul", _xo, _cos, commutative=True, name="oc"),
                P.op("mul", _xe, _sin, commutative=True, name="es"), commutative=True)
_pairwise = P.op("reshape", P.op("concat", P.maybe("reshape", _out_even),
                                 P.maybe("reshape", _out_odd), name="stack"), name="rot")


def _check_pairwise(m: Match) -> str | None:
    d, reason = _head_dim(m, "rot")  # x may be a flat [..., H*D] the pairs were cut from
    if reason:
        return reason
    x, cos, sin = m["rot"], m["cos"], m["sin"]
    h, lead = d // 2, tuple(x.shape[:-1])
    for t, what in ((cos, "cos"), (sin, "sin")):
        if t.type.rank == 0 or not dims_equal(t.shape[-1], h):
            return f"{what} %{t.name} {t.type} is not half width (last dim {h})"
    for prod in ("ec", "os", "oc", "es"):
        node = m.node(prod)
        part = next(v for v in node.inputs if v is not cos and v is not sin)
        if not same_shape(part.shape, (*lead, h)) or not same_shape(m[prod].shape, (*lead, h)):
            return (f"{prod[0]} pair part {part.type} times the table gives {m[prod].type}, "
                    f"not [..., {h}]")
    reason = _check_pair_parts(m, d, "rot") or _check_stack(m, d, "rot")
    if reason:
        return reason
    source = m.get("x") or m["xflat"]
    if m.root.outputs[0].dtype != result_dtype(source.type, cos.type, sin.type):
        return f"the rotated pairs change the dtype to {m.root.outputs[0].dtype}"
    return None


def _repeat_pairs(b, t: Value) -> Value:
    """[..., D/2] -> [..., D]: every entry twice, as the interleaved tables hold them."""
    shape = list(t.shape)
    t = b.op("reshape", t, shape=[*shape, 1])
    t = b.op("expand", t, shape=[*shape, 2])
    return b.op("reshape", t, shape=[*shape[:-1], 2 * shape[-1]])


def _pairwise_rotary(m, b):
    x, shape = m.get("x") or m["xflat"], m["rot"].shape
    if not same_shape(x.shape, shape):  # fold-views cut the pairs straight from [..., H*D]
        x = b.op("reshape", x, shape=list(shape))
    return b.op("rotary", x, _repeat_pairs(b, m["cos"]), _repeat_pairs(b, m["sin"]),
                interleaved=True)


PAIRWISE = Rule(
    id="rope/interleaved-pairwise",
    pattern=_pairwise,
    check=_check_pairwise,
    replace=_pairwise_rotary,
    near_miss_depth=4,
)


@register_pass
class RecognizeRotary(RewritePass):
    """Rotary position embeddings (rotate-half or interleaved pairs) -> rotary(x, cos, sin)."""

    name = "recognize.fuse-rotary"
    rule_list = [ROTATE_HALF, INTERLEAVED, PAIRWISE]


__all__ = ["RecognizeRotary", "ROTATE_HALF", "INTERLEAVED", "PAIRWISE", "rope"]
