"""Attention-mask analysis: prove from the graph what a mask operand is.

The attention fusion finds ``softmax(scale·Q·Kᵀ + mask)`` (or ``where``/``masked_fill``
with a bool mask) and asks this module what the mask is. The answer is a proof
from the graph or a reason; nothing is guessed and nothing here edits the graph.

Glossary: B batch, H heads, S query length, T key length (``s``, ``t``: ints or
sympy dims from the scores' type). A mask broadcasts to the scores [B, H, S, T];
its last two axes are query i and key j. Query i sits at absolute position
pos_i = i + (T - S) (bottom-right aligned); d = j - i.

  causal      keys j > pos_i masked:            keep d <= T - S
  window w    keys j <= pos_i - w masked:       keep d >= T - S - w + 1
  padding     an additive term that depends only on (b, j), kept as a bias

Abstract domain. Each value reached from the mask is a function of its own axis
indices ``_a0.._a{r-1}`` (a size-1 axis has index 0, so its symbol never
appears; broadcasting is right-alignment of symbols):
  - a bool value is a sympy formula: relations between index expressions
    (``_a3 <= _a2``), True/False, And/Or/Not;
  - any other value is ``Cases``: disjoint, exhaustive (condition, value) pairs;
    values are index expressions (``arange`` gives ``start + step·_a0``) or numbers
    rounded exactly as the op's dtype rounds them (``finfo.min``, ``-oo``);
  - what cannot be understood (graph inputs, unsupported ops, constants that are
    no pattern) is "data": an opaque function ``%name(_a0, ..)`` of its indices,
    so gathers, slices and broadcasts still compose around it.
Constants are recognised exactly: uniform, affine in their indices, or a band
``lo <= j - i <= hi`` over the last two axes (bool, or two values).

Classification. For an additive mask, summands (through ``add``) that are data of
shape [B|1, 1, 1, T] are the padding; the rest must be exactly 0 on a keep set
and <= -1e4 (or -inf) elsewhere. The keep set is split into conjuncts: those on
d = j - i alone are decided exactly on the segments between their thresholds (a
1-D proof: the keep set must be one interval of d, compared with T - S); data
conjuncts over (b, j) are a bool padding keep-mask. Anything else is a reason,
and the caller keeps the whole mask as an explicit bias.

Accepted approximation: masked scores become -inf in the fused op instead of
score + v with v <= -1e4, the same softmax up to underflow; rows where every key
is masked may differ (the original gives uniform or NaN weights there).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import sympy
import torch
from sympy.core.function import AppliedUndef
from sympy.core.relational import Relational
from sympy.logic.boolalg import BooleanAtom

from transfuse.ir.graph import Node, Value
from transfuse.ir.types import Dim, DType, dims_equal

log = logging.getLogger(__name__)
NEG_LIMIT = -1e4  # a masked entry must be at most this (or -inf)
MAX_NODES = 256  # nodes interpreted per query; beyond that values are opaque
MAX_CONST = 1 << 20  # larger constants are not inspected
MAX_CASES = 64  # pieces of one value; more is opaque
_AX = tuple(sympy.Symbol(f"_a{k}", integer=True, nonnegative=True) for k in range(8))
_D = sympy.Symbol("_d", integer=True)  # d = j - i in the 1-D decision
_T, _F = sympy.true, sympy.false


@dataclass(frozen=True)
class MaskFacts:
    """What a mask provably is; ``reason`` is None only when causal/window/padding
    account for the whole mask.

    ``padding_keep`` (an addition to the contract): a bool Value broadcastable to
    [B, 1, 1, T], True = attend, when the padding is and-ed into a bool mask (HF
    transformers >= 5) rather than added. It is set only when it is the one thing
    left, and ``reason`` then says so: a caller that only knows ``padding`` keeps the
    whole mask; one that knows ``padding_keep`` may add ``where(padding_keep, 0, -inf)``
    as the bias (or pass it as ``key_padding_mask``) and treat the mask as resolved.
    """

    causal: bool
    window: int | None
    padding: Value | None
    reason: str | None
    padding_keep: Value | None = None


class _Opaque(Exception):
    """Raised by an op rule: the value is data; the message says what it is."""


# -- the domain ------------------------------------------------------------------------


def _num(x, dtype: DType):
    """A number as a tensor of ``dtype`` holds it (exact emulation of one op's rounding)."""
    x = sympy.sympify(int(bool(x)) if isinstance(x, (bool, BooleanAtom)) else x)
    if dtype == DType.bool:
        return _F if x.is_zero else _T
    if not dtype.is_float:
        return sympy.Integer(int(x)) if x.is_finite else x
    f = float(torch.tensor(float(x), dtype=torch.float64).to(dtype.torch))
    return sympy.nan if f != f else sympy.oo if f == float("inf") else \
        -sympy.oo if f == float("-inf") else sympy.Float(f)


def _sub(a, mapping: dict):
    """Substitute in a formula, or in every condition and value of Cases."""
    if mapping and isinstance(a, tuple):
        return tuple((c.xreplace(mapping), v.xreplace(mapping)) for c, v in a)
    return a.xreplace(mapping) if mapping else a


def _shift(a, by: int):
    """Move axis symbols right by ``by`` (right-aligned broadcasting to a higher rank)."""
    return _sub(a, {_AX[k]: _AX[k + by] for k in range(8 - by)}) if by else a


def _cases(a) -> tuple:
    return a if isinstance(a, tuple) else ((a, sympy.Integer(1)), (sympy.Not(a), sympy.Integer(0)))


def _as_bool(a):
    return sympy.Or(*(sympy.And(c, sympy.Ne(v, 0)) for c, v in a)) if isinstance(a, tuple) else a


def _merge(pairs, dtype: DType) -> tuple:
    """Cases from (condition, value) pairs: rounded, impossible ones dropped, equal joined."""
    out: dict = {}
    for c, v in pairs:
        v = sympy.sympify(v)
        v = _num(v, dtype) if v.is_number else v
        if c is not _F:
            out[v] = sympy.Or(out[v], c) if v in out else c
    if len(out) > MAX_CASES:
        raise _Opaque(f"a value with more than {MAX_CASES} cases")
    return tuple((c, v) for v, c in out.items())


def _apply(fn: Callable, args: list, dtype: DType) -> tuple:
    """``fn`` over the cross product of the operands' cases."""
    pairs = [(_T, [])]
    for a in args:
        pairs = [(sympy.And(c, ca), vs + [va]) for c, vs in pairs for ca, va in _cases(a)]
    return _merge([(c, fn(*vs)) for c, vs in pairs], dtype)


def _is_data(a) -> bool:
    exprs = [e for pair in a for e in pair] if isinstance(a, tuple) else [a]
    return any(e.atoms(AppliedUndef) for e in exprs)


def _axis_syms(e) -> set:
    return e.free_symbols & set(_AX)


class _Interp:
    """Abstract interpretation of a mask's producer subgraph, memoised per value."""

    def __init__(self):
        self.memo: dict[int, tuple[Value, object]] = {}
        self.opaque: dict[str, str] = {}  # opaque function name -> what it stands for
        self.nodes = 0

    def eval(self, root: Value):
        stack = [root]
        while stack:  # post-order without recursion
            v = stack[-1]
            n = v.producer
            deps = [] if n is None or n.op not in _RULES or self.nodes >= MAX_NODES else \
                [x for x in n.inputs if x is not None and id(x) not in self.memo]
            if deps:
                stack.extend(deps)
                continue
            stack.pop()
            if id(v) not in self.memo:
                self.memo[id(v)] = (v, self._compute(v))
        return self.memo[id(root)][1]

    def _compute(self, v: Value):
        n = v.producer
        try:
            if v.is_const:
                a = _const(v)
            elif n is None:
                raise _Opaque(f"graph input %{v.name}")
            elif n.op not in _RULES or self.nodes >= MAX_NODES:
                raise _Opaque(f"%{v.name} = {_op_name(n)} (not understood)" if n.op not in _RULES
                              else f"%{v.name} (mask subgraph over {MAX_NODES} nodes)")
            else:
                self.nodes += 1
                try:
                    a = _RULES[n.op](n, [None if x is None else self.memo[id(x)][1]
                                         for x in n.inputs])
                except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
                    log.debug("mask analysis of %s failed", n, exc_info=True)
                    raise _Opaque(f"%{v.name} = {_op_name(n)} (analysis failed: {e})") from e
        except _Opaque as e:
            self.opaque[f"%{v.name}"] = str(e) if f"%{v.name}" in str(e) else f"%{v.name}: {e}"
            idx = [sympy.Integer(0) if d == 1 else _AX[k] for k, d in enumerate(v.shape)]
            atom = sympy.Function(f"%{v.name}")(*idx)
            a = sympy.Ne(atom, 0) if v.dtype == DType.bool else ((_T, atom),)
        return _sub(a, {_AX[k]: 0 for k, d in enumerate(v.shape) if d == 1})

    def describe(self, e) -> str:
        names = sorted({f.func.__name__ for f in e.atoms(AppliedUndef)})
        return "; ".join(self.opaque.get(n, n) for n in names)


def _op_name(n: Node) -> str:
    return f"torch_fallback({n.attr('target')})" if n.op == "torch_fallback" else n.op


# -- op rules: (node, abstract inputs) -> abstract output -------------------------------------


def _broadcast(n: Node, xs: list) -> list:
    r = n.outputs[0].type.rank
    return [_shift(a, r - v.type.rank) for a, v in zip(xs, n.inputs)]


def _opaque(n: Node, why: str):
    raise _Opaque(f"%{n.outputs[0].name} = {n.op} {why}")


def _arith(fn):
    def rule(n, xs):
        if any(v.dtype == DType.bool for v in n.inputs):
            _opaque(n, "of bools")
        return _apply(fn, _broadcast(n, xs), n.outputs[0].dtype)
    return rule


_REL = {"eq": sympy.Eq, "ne": sympy.Ne, "lt": sympy.Lt, "le": sympy.Le, "gt": sympy.Gt,
        "ge": sympy.Ge}


def _compare(n, xs):
    a, b = _broadcast(n, xs)
    if DType.bool in (n.inputs[0].dtype, n.inputs[1].dtype) or any(
            v is sympy.nan for _, v in a + b):
        _opaque(n, "of bools or NaN")
    rel = _REL[n.op]
    return sympy.Or(*(sympy.And(ca, cb, rel(va, vb)) for ca, va in a for cb, vb in b))


def _logical(n, xs):
    fn = {"logical_and": sympy.And, "logical_or": sympy.Or, "logical_xor": sympy.Xor}[n.op]
    return fn(*(_as_bool(a) for a in _broadcast(n, xs)))


def _where(n, xs):
    c, a, b = _broadcast(n, xs)
    c, out = _as_bool(c), n.outputs[0].dtype
    if out == DType.bool:
        return sympy.Or(sympy.And(c, _as_bool(a)), sympy.And(sympy.Not(c), _as_bool(b)))
    return _merge([(sympy.And(c, ca), va) for ca, va in _cases(a)]
                  + [(sympy.And(sympy.Not(c), cb), vb) for cb, vb in _cases(b)], out)


def _cast(n, xs):
    (a,), src, dst = xs, n.inputs[0].dtype, n.outputs[0].dtype
    if dst == DType.bool:
        return _as_bool(a)
    if src == DType.bool:
        return _merge(_cases(a), dst)
    # index expressions stay exact in integer types and in f32/f64 (below 2**24)
    if not all(v.is_number or not src.is_float and (not dst.is_float or dst in
                                                    (DType.f32, DType.f64)) for _, v in a):
        _opaque(n, f"{src}->{dst} of a non-constant")
    return _merge([(c, sympy.Integer(int(v)) if v.is_number and v.is_finite and not dst.is_float
                    else v) for c, v in a], dst)


def _tri(n, xs):
    (a,), r, k = xs, n.outputs[0].type.rank, n.attr("diagonal")
    keep = (sympy.Le if n.op == "tril" else sympy.Ge)(_AX[r - 1] - _AX[r - 2], k)
    if n.outputs[0].dtype == DType.bool:
        return sympy.And(a, keep)
    return _merge([(sympy.And(c, keep), v) for c, v in a] + [(sympy.Not(keep), 0)],
                  n.outputs[0].dtype)


def _reshape(n, xs):
    src, dst = n.inputs[0].shape, n.outputs[0].shape
    si, di = ([k for k, d in enumerate(sh) if d != 1] for sh in (src, dst))
    if len(si) != len(di) or not all(dims_equal(src[p], dst[q]) for p, q in zip(si, di)):
        _opaque(n, "merges or splits dims")
    return _sub(xs[0], {_AX[p]: _AX[q] for p, q in zip(si, di)})


def _slice(n, xs):
    axis = n.attr("axis") % n.inputs[0].type.rank
    start, size = n.attr("start"), n.inputs[0].shape[axis]
    if isinstance(start, int) and start < 0:  # python semantics: from the end
        if not isinstance(size, int):
            _opaque(n, "from the end of a symbolic dim")
        start = max(size + start, 0)
    return _sub(xs[0], {_AX[axis]: start + n.attr("step") * _AX[axis]})


def _arange(n, xs):
    a = n.attrs
    if a["dtype"].is_float and (a["dtype"] not in (DType.f32, DType.f64)
                                or not isinstance(a["start"], int)):
        _opaque(n, f"in {a['dtype']} from {a['start']}")
    return ((_T, sympy.sympify(a["start"]) + a["step"] * _AX[0]),)


def _full(n, xs):
    v = _num(n.attr("value"), n.attr("dtype"))
    return v if n.attr("dtype") == DType.bool else ((_T, v),)


def _cumsum(n, xs):
    axis, out = n.attr("axis") % n.inputs[0].type.rank, n.outputs[0].dtype
    a = _cases(xs[0])
    if any(_AX[axis] in c.free_symbols | v.free_symbols for c, v in a) or (
            out.is_float and any(not v.is_zero for _, v in a)):
        _opaque(n, "of values that vary along the axis (or float rounding)")
    return _merge([(c, v * (_AX[axis] + 1)) for c, v in a], out)


def _fallback(n, xs):
    target, spec = n.attr("target"), json.loads(n.attr("args"))
    args = spec.get("args", [])
    val = lambda a: None if a is None else xs[a["$in"]]  # noqa: E731
    if target == "aten::index.Tensor" and not spec.get("kwargs") and None not in args[1]:
        return _index(n, val(args[0]), [(val(i), n.inputs[i["$in"]]) for i in args[1]],
                      list(range(len(args[1]))))
    if target == "aten::diff.default" and len(args) == 4 and args[1] == 1 and args[3]:
        return _diff(n, val(args[0]), val(args[3]), args[2], n.inputs[args[3]["$in"]])
    raise _Opaque(f"%{n.outputs[0].name} = {_op_name(n)} (not understood)")


def _index(n: Node, x, idx: list, axes: list[int]):
    """x[.., i0, .., i1, ..] with integer index tensors on dims ``axes`` (advanced indexing:
    the index shape I sits where the dims were when they are consecutive, else first)."""
    r = n.inputs[0].type.rank
    rb = n.outputs[0].type.rank - (r - len(idx))  # rank of I
    at = axes[0] if all(b == a + 1 for a, b in zip(axes, axes[1:])) else 0
    mapping = {}
    for axis, (a, v) in zip(axes, idx):
        if v.dtype in (DType.bool, DType.u8) or len(a) != 1 or a[0][0] is not _T \
                or not a[0][1].is_nonnegative:
            _opaque(n, "with a bool, data-dependent or maybe negative index")
        mapping[_AX[axis]] = _shift(a, at + rb - v.type.rank)[0][1]
    for p, m in enumerate(m for m in range(r) if m not in axes):
        mapping[_AX[m]] = _AX[p if m < at else rb + p]
    return _sub(x, mapping)


def _concat(n: Node, xs):
    """concat along one axis, when every part is one index expression shifted to its offset
    (a part one wide is checked at its position): the ONNX exporter writes ``torch.diff(p,
    prepend=p[:, :1] - 1)`` as ``concat([p[:, :1] - 1, p])`` and two slices. Else data."""
    axis = n.attr("axis") % n.outputs[0].type.rank
    parts, off = [], 0
    for a, v in zip(xs, n.inputs):
        if v.dtype == DType.bool or len(a) != 1 or a[0][0] is not _T:
            _opaque(n, "of bool or piecewise parts")
        parts.append((off, v.shape[axis], a[0][1].xreplace({_AX[axis]: _AX[axis] - off})))
        off = off + v.shape[axis]

    def agrees(e, at, size, part):
        if sympy.simplify(e - part) == 0:
            return True
        return size == 1 and sympy.simplify((e - part).xreplace({_AX[axis]: at})) == 0

    for _, _, e in parts:
        if all(agrees(e, *part) for part in parts):
            return ((_T, e),)
    _opaque(n, "of parts that are not one index expression")


def _diff(n: Node, x, prepend, dim: int, prepend_value: Value):
    """torch.diff(x, n=1, dim, prepend=p) with a size-1 p: one formula if the first element
    x[0] - p equals the general x[k] - x[k-1] at k = 0."""
    k = dim % n.inputs[0].type.rank
    if not (isinstance(x, tuple) and isinstance(prepend, tuple) and len(x) == len(prepend) == 1
            and x[0][0] is _T and prepend[0][0] is _T and prepend_value.shape[k] == 1):
        _opaque(n, "of piecewise values")
    (e,), (p,) = (v for _, v in x), (v for _, v in prepend)
    body = sympy.simplify(e - e.xreplace({_AX[k]: _AX[k] - 1}))
    at0 = body.xreplace({_AX[k]: 0}) - (e.xreplace({_AX[k]: 0}) - p)
    if sympy.simplify(at0).is_zero is not True:
        _opaque(n, "whose first element differs")
    return ((_T, body),)


_RULES: dict[str, Callable] = {
    "add": _arith(lambda a, b: a + b), "sub": _arith(lambda a, b: a - b),
    "mul": _arith(lambda a, b: a * b), "neg": _arith(lambda a: -a),
    **{op: _compare for op in _REL},
    "logical_and": _logical, "logical_or": _logical, "logical_xor": _logical,
    "logical_not": lambda n, xs: sympy.Not(_as_bool(xs[0])),
    "where": _where, "cast": _cast, "tril": _tri, "triu": _tri, "reshape": _reshape,
    "expand": lambda n, xs: _broadcast(n, xs)[0], "identity": lambda n, xs: xs[0],
    "permute": lambda n, xs: _sub(xs[0], {_AX[p]: _AX[m] for m, p in enumerate(n.attr("perm"))}),
    "slice": _slice, "arange": _arange, "full": _full, "cumsum": _cumsum, "concat": _concat,
    "torch_fallback": _fallback,
    "index": lambda n, xs: _index(n, xs[0], list(zip(xs[1:], n.inputs[1:])), n.attr("axes")),
    "shape_of": lambda n, xs: ((_T, sympy.sympify(n.inputs[0].shape[n.attr("axis")])),),
}


# -- constants ---------------------------------------------------------------------------------


def _const(v: Value):
    t, dtype = v.const, v.dtype
    if t.numel() == 0 or t.numel() > MAX_CONST or (dtype.is_float and t.isnan().any()):
        raise _Opaque(f"constant %{v.name}")
    first = t.flatten()[0]
    if bool((t == first).all()):
        x = _num(first.item(), dtype)
        return x if dtype == DType.bool else ((_T, x),)
    if dtype == DType.bool and (band := _band(t)) is not None:
        return band
    if dtype != DType.bool and not dtype.is_float and (affine := _affine(t)) is not None:
        return ((_T, affine),)
    values = t.unique() if dtype != DType.bool else ()
    if len(values) == 2:
        for x, y in (values, values.flip(0)):
            if (band := _band(t == x)) is not None:
                return ((band, _num(x.item(), dtype)), (sympy.Not(band), _num(y.item(), dtype)))
    raise _Opaque(f"constant %{v.name} (not uniform, affine or a band)")


def _affine(t: torch.Tensor):
    """c0 + sum_k c_k·_a_k when the integer tensor is exactly that, else None."""
    t = t.long()
    base = t[(0,) * t.dim()]
    expr, grid = sympy.Integer(int(base)), torch.zeros_like(t) + base
    for k, size in enumerate(t.shape):
        if size > 1:
            step = t[tuple(1 if m == k else 0 for m in range(t.dim()))] - base
            shape = [1] * t.dim()
            shape[k] = size
            grid = grid + step * torch.arange(size).reshape(shape)
            expr += int(step) * _AX[k]
    return expr if torch.equal(grid, t) else None


def _band(keep: torch.Tensor):
    """The formula lo <= j - i <= hi (last two axes) equal to a bool tensor, else None."""
    rank = keep.dim()
    keep = keep[None] if rank == 1 else keep
    lead = keep[(0,) * (keep.dim() - 2)]
    if not bool((keep == lead).all()):
        return None
    p, q = lead.shape
    d = torch.arange(q)[None, :] - torch.arange(p)[:, None]
    if not lead.any():
        return _F
    lo, hi = int(d[lead].min()), int(d[lead].max())
    if not torch.equal((d >= lo) & (d <= hi), lead):
        return None
    diag = (_AX[rank - 1] if q > 1 else 0) - (_AX[rank - 2] if p > 1 else 0)
    return sympy.And(sympy.Ge(diag, lo) if lo > int(d.min()) else _T,
                     sympy.Le(diag, hi) if hi < int(d.max()) else _T)


# -- classification ----------------------------------------------------------------------------


def _frame(mask: Value, s: Dim, t: Dim) -> tuple[dict, str | None]:
    """Axis symbols of b, h, i, j in the mask's frame, or why it is no mask of [.., S, T]."""
    shape, r = mask.shape, mask.type.rank
    frame = {name: _AX[r - k] if r >= k else sympy.Dummy(name)
             for k, name in ((1, "j"), (2, "i"), (3, "h"), (4, "b"))}
    if r == 0 or r > 8 or any(d != 1 for d in shape[:-4]):
        return frame, f"mask of type {mask.type} is not a mask over [B, H, S, T]"
    if not (shape[-1] == 1 or dims_equal(shape[-1], t)) or (
            r >= 2 and not (shape[-2] == 1 or dims_equal(shape[-2], s))):
        return frame, f"mask of type {mask.type} does not broadcast to scores [.., {s}, {t}]"
    return frame, None


def _key_only(v: Value, rank: int) -> bool:
    """Is ``v`` broadcastable to [B, 1, 1, T] in a frame of ``rank`` axes?"""
    off = rank - v.type.rank
    return off >= 0 and all(d == 1 for k, d in enumerate(v.shape)
                            if k + off not in (rank - 1, rank - 4))


def _pretty(e, frame: dict) -> str:
    return str(e.xreplace({s: sympy.Symbol(n) for n, s in frame.items()}))


def _keep_of_additive(total: tuple, it: _Interp, frame: dict):
    """Where an additive mask is 0 (the keep set); everywhere else must be very negative."""
    keep = []
    for c, v in total:
        if not _is_data(c) and isinstance(seg := _segments(c, frame), tuple) and _T not in seg[1]:
            continue  # a case that holds nowhere
        if _is_data(v):
            return None, f"mask value depends on {it.describe(v)}"
        if not v.is_number:
            return None, f"mask value {_pretty(v, frame)} varies with position"
        if v.is_zero:
            keep.append(c)
        elif not (v == -sympy.oo or (v.is_comparable and v <= NEG_LIMIT)):
            kind = "positive" if v.is_comparable and v > 0 else "neither 0 nor <= -1e4"
            return None, f"mask is {kind} ({float(v)!r}) where {_pretty(c, frame)}"
    return sympy.Or(*keep), None


def _classify(keep, it: _Interp, frame: dict, rank: int, s: Dim, t: Dim):
    """A keep formula -> (causal, window, padding_keep, reason)."""
    keep = sympy.to_nnf(keep, simplify=False)
    conj = () if keep is _T else sympy.And.make_args(keep)
    data = sympy.And(*(c for c in conj if _is_data(c)))
    pad, reason = None, None
    if data is not _T:
        extra = _axis_syms(data) - {frame["b"], frame["j"]}
        if extra:
            axes = ", ".join(sorted(n for n, x in frame.items() if x in extra))
            return False, None, None, f"mask depends on {it.describe(data)} along ({axes})"
        pad = next((v for v, a in it.memo.values() if v.dtype == DType.bool and
                    _key_only(v, rank) and _shift(a, rank - v.type.rank) == data), None)
        reason = (f"padding is the bool keep-mask %{pad.name} and-ed into the mask, not an "
                  "additive term (see padding_keep)" if pad is not None else
                  f"padding {_pretty(data, frame)} is held by no single graph value")
    index = sympy.And(*(c for c in conj if not _is_data(c)))
    causal, window, why = _diagonals(index, frame, s, t)
    return causal, window, None if why else pad, why or reason


def _canonical(rel, i, j):
    """A relation between index expressions as a formula over _D = j - i, or None."""
    e = sympy.expand(rel.lhs - rel.rhs)
    cj, ci = e.coeff(j), e.coeff(i)
    c0 = sympy.expand(e - cj * j - ci * i)
    if _axis_syms(e) - {i, j} or (cj, ci) not in ((1, -1), (-1, 1)) or _axis_syms(c0) \
            or not c0.is_integer:
        return None
    k = int(cj)  # e = k·d + c0; on integers "sign·e + shift <= 0" is a bound on d

    def le0(sign, shift=0):
        u = -(sign * c0 + shift)
        return sympy.Le(_D, u) if sign * k == 1 else sympy.Not(sympy.Le(_D, -u - 1))
    return {sympy.Le: lambda: le0(1), sympy.Lt: lambda: le0(1, 1), sympy.Ge: lambda: le0(-1),
            sympy.Gt: lambda: le0(-1, 1), sympy.Eq: lambda: sympy.And(le0(1), le0(-1)),
            sympy.Ne: lambda: sympy.Not(sympy.And(le0(1), le0(-1)))}[type(rel)]()


def _segments(keep, frame: dict):
    """Decide a formula over index relations on every segment of d = j - i between its
    thresholds u_1 < .. < u_m (segments (-inf, u_1], (u_1, u_2], .., (u_m, inf)).
    Returns (thresholds, truth per segment) or a reason."""
    canon = {}
    for rel in keep.atoms(Relational):
        canon[rel] = _canonical(rel, frame["i"], frame["j"])
        if canon[rel] is None:
            return f"mask condition {_pretty(rel, frame)} is not a bound on j - i"
    keep = keep.xreplace(canon)
    bounds = sorted({a.rhs for a in keep.atoms(Relational)}, key=sympy.default_sort_key)
    base = bounds[0] if bounds else 0
    if not all((b - base).is_Integer for b in bounds):
        return f"cannot order the mask bounds {bounds} on j - i"
    bounds.sort(key=lambda b: int(b - base))
    points = bounds + [bounds[-1] + 1] if bounds else [sympy.Integer(0)]
    truth = [keep.xreplace({_D: p}) for p in points]  # one point per segment
    if any(x not in (_T, _F) for x in truth):
        return "cannot decide the mask on j - i"
    return bounds, truth


def _diagonals(keep, frame: dict, s: Dim, t: Dim):
    """A keep formula over index relations -> (causal, window, reason)."""
    seg = _segments(keep, frame)
    if isinstance(seg, str):
        return False, None, seg
    bounds, truth = seg
    if _T not in truth:
        return False, None, "mask blocks every key"
    first, last = truth.index(_T), len(truth) - 1 - truth[::-1].index(_T)
    if _F in truth[first:last]:
        return False, None, "keep set is not one band of diagonals"
    off = sympy.sympify(t) - sympy.sympify(s)
    causal, window, reason = False, None, None
    if last < len(truth) - 1:  # keep d <= hi
        shift = sympy.simplify(bounds[last] - off)
        causal = shift.is_zero is True
        if not causal:
            reason = (f"mask diagonal is offset by {shift}" if shift.is_Integer else
                      f"mask keeps j <= i + {bounds[last]}, not bottom-right (T - S = {off})")
    if first > 0:  # keep d >= lo
        lo = bounds[first - 1] + 1
        w = sympy.simplify(off - lo + 1)
        if w.is_Integer and w >= 1:
            window = int(w)
        else:
            reason = reason or (f"window on the wrong side: keys j < i + {lo} are masked"
                                if w.is_Integer else f"window bound j >= i + {lo} is not constant")
    return causal, window, reason


# -- API ---------------------------------------------------------------------------------------


def additive_summands(mask: Value) -> list[Value]:
    """The terms of a float sum of ``add`` nodes, left to right (``mask`` itself if none)."""
    out, stack = [], [mask]
    while stack:
        v = stack.pop()
        if v.producer is not None and v.producer.op == "add" and v.dtype.is_float:
            stack.extend(reversed(v.producer.inputs))
        else:
            out.append(v)
    return out


def analyze_additive_mask(mask: Value, s: Dim, t: Dim) -> MaskFacts:
    """What ``mask`` is when it is added to scores [.., S, T]."""
    frame, reason = _frame(mask, s, t)
    if reason or not mask.dtype.is_float:
        return MaskFacts(False, None, None, reason or f"additive mask has dtype {mask.dtype}")
    it, rank = _Interp(), mask.type.rank
    padding, total = [], ((_T, sympy.Integer(0)),)
    for v in additive_summands(mask):
        a = it.eval(v)
        if _is_data(a) and _key_only(v, rank):
            padding.append(v)
        else:
            try:
                total = _apply(lambda x, y: x + y, [total, _shift(a, rank - v.type.rank)],
                               mask.dtype)
            except _Opaque as e:
                return MaskFacts(False, None, None, f"the mask's sum has {e}")
    if len(padding) > 1:
        return MaskFacts(False, None, None, "padding is split over several summands: "
                         + ", ".join(f"%{v.name}" for v in padding))
    keep, reason = _keep_of_additive(total, it, frame)
    pad = padding[0] if padding else None
    if keep is None:
        return MaskFacts(False, None, pad, reason)
    causal, window, pad_keep, reason = _classify(keep, it, frame, rank, s, t)
    if pad is not None and pad_keep is not None:
        pad_keep, reason = None, "padding is both an additive term and a bool keep-mask"
    return MaskFacts(causal, window, pad, reason, pad_keep)


def analyze_bool_mask(mask: Value, s: Dim, t: Dim, keep_value: bool) -> MaskFacts:
    """What a bool ``mask`` is in where(mask, scores, -inf) (``keep_value=True``: True =
    attend) or in masked_fill(mask, -inf) / where(mask, -inf, scores) (True = masked)."""
    frame, reason = _frame(mask, s, t)
    if reason or mask.dtype != DType.bool:
        return MaskFacts(False, None, None, reason or f"bool mask has dtype {mask.dtype}")
    it = _Interp()
    keep = it.eval(mask) if keep_value else sympy.Not(it.eval(mask))
    causal, window, pad_keep, reason = _classify(keep, it, frame, mask.type.rank, s, t)
    return MaskFacts(causal, window, None, reason, pad_keep)


__all__ = ["NEG_LIMIT", "MaskFacts", "additive_summands", "analyze_additive_mask",
           "analyze_bool_mask"]
