"""ALiBi recognition: is an additive score term ``slopes[h] · (j − i)`` (or ``slopes[h] · j``)?

Used by the attention fusion (``fuse.py``) on each summand of an additive mask.
A summand is ALiBi when it is ``mul(C, R)`` (optionally under one float cast) with

- ``C`` a float constant holding one slope per query head, laid out along the
  head axis of the scores [B, H, S, T] (every other axis has size 1);
- ``R`` an affine function of the key index j built from ``arange`` through
  casts, reshapes that add/remove size-1 dims, expands, add/sub/neg and
  multiplication by integer scalars: ``R = c_j·j + f(i) + c``, with no
  dependence on the batch or head axes.

The attention op's ALiBi term is ``slope_h · (j − pos_i)`` with pos_i = i + T − S.
``C_h·(c_j·j + f(i) + c)`` differs from it, with slopes ``C_h·c_j``, by
``C_h·(c_j·pos_i + f(i) + c)``: a constant per (h, i) row, which softmax cancels
exactly. So both ``j − i`` and plain ``j`` (BLOOM) forms are accepted. A term
that depends on data (positions from an attention mask, an embedding lookup
of bucketed relative positions as in T5) is no ALiBi and stays a bias.

Two more spellings reach the scores:

- a float **constant** (static shapes fold the whole term, MPT's table built for
  ``max_seq_len``): per head h, every row is ``slope_h · j`` plus a row constant;
  the slope is fitted in float64 and every element must agree with it within
  the rounding of the constant's dtype (a few ulps of its largest magnitude);
- a **slice** with step 1 along the query or key axis of an ALiBi term (MPT cuts
  its table to the last T keys): it shifts i or j, which changes only row constants;
- **views**: reshapes and expands over an ALiBi term that only move size-1 dims and
  broadcast, keeping its head, query and key axes (BLOOM's [H, 1, T] viewed as
  [B·H, 1, T] for the bmm and as [B, H, 1, T] for the op).

On 3-D bmm scores [B·H, S, T] (``rank=3``) the caller passes the head count only
when B is 1, so axis 0 is the head axis.

Glossary: B batch, H query heads, S query length, T key length; i query index,
j key index (the last two axes of the scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transfuse.ir.graph import Node, Value
from transfuse.ir.types import Dim, DType, dims_equal

#: elements a constant ALiBi table may have (larger ones are not inspected)
MAX_TABLE = 1 << 22
#: agreement with the fitted slopes, in units of the dtype's epsilon times the table's magnitude
ULPS = 8


@dataclass(frozen=True)
class Alibi:
    """A recognised ALiBi term: one slope per query head, and the nodes that built it."""

    slopes: tuple[float, ...]
    nodes: tuple[Node, ...]


class _NotAffine(Exception):
    pass


@dataclass(frozen=True)
class _Affine:
    """value[idx] = c0 + sum_k coef[k]·idx[k] over the value's own axes (ints only)."""

    c0: int
    coef: tuple[int, ...]


def _affine(v: Value, nodes: list[Node], depth: int = 0) -> _Affine:
    """``v`` as an exact affine function of its indices, or raise _NotAffine."""
    if depth > 16:
        raise _NotAffine
    n = v.producer
    rank = v.type.rank
    if v.is_const:
        t = v.const
        if t.numel() != 1 or (t.dtype.is_floating_point and float(t) != int(float(t))):
            raise _NotAffine
        return _Affine(int(float(t.reshape(-1)[0])), (0,) * rank)
    if n is None:
        raise _NotAffine
    nodes.append(n)
    if n.op == "arange":
        a = n.attrs
        if not isinstance(a["start"], int):
            raise _NotAffine
        return _Affine(a["start"], (a["step"],))
    if n.op == "cast":
        src, dst = n.inputs[0].dtype, v.dtype
        if src == DType.bool or dst == DType.bool:
            raise _NotAffine
        # integers are exact in f32 below 2**24: positions are far smaller
        if dst.is_float and dst not in (DType.f32, DType.f64):
            raise _NotAffine
        return _affine(n.inputs[0], nodes, depth + 1)
    if n.op in ("reshape", "expand"):
        x = n.inputs[0]
        inner = _affine(x, nodes, depth + 1)
        src, dst = x.shape, v.shape
        if n.op == "expand":  # right-aligned broadcast; expanded axes had size 1 (coef 0)
            off = rank - x.type.rank
            return _Affine(inner.c0, (0,) * off + inner.coef)
        si = [k for k, d in enumerate(src) if d != 1]
        di = [k for k, d in enumerate(dst) if d != 1]
        if len(si) != len(di) or not all(dims_equal(src[p], dst[q]) for p, q in zip(si, di)):
            raise _NotAffine
        coef = [0] * rank
        for p, q in zip(si, di):
            coef[q] = inner.coef[p]
        return _Affine(inner.c0, tuple(coef))
    if n.op in ("add", "sub"):
        a, b = (_aligned(x, rank, nodes, depth) for x in n.inputs)
        sign = 1 if n.op == "add" else -1
        return _Affine(a.c0 + sign * b.c0, tuple(p + sign * q for p, q in zip(a.coef, b.coef)))
    if n.op == "neg":
        a = _affine(n.inputs[0], nodes, depth + 1)
        return _Affine(-a.c0, tuple(-c for c in a.coef))
    if n.op == "mul":
        a, b = (_aligned(x, rank, nodes, depth) for x in n.inputs)
        if any(a.coef) and any(b.coef):
            raise _NotAffine
        k, e = (a, b) if not any(a.coef) else (b, a)
        return _Affine(k.c0 * e.c0, tuple(k.c0 * c for c in e.coef))
    raise _NotAffine


def _aligned(x: Value, rank: int, nodes: list[Node], depth: int) -> _Affine:
    a = _affine(x, nodes, depth + 1)
    return _Affine(a.c0, (0,) * (rank - len(a.coef)) + a.coef)


def match_alibi(term: Value, heads: int, s: Dim, t: Dim, rank: int = 4) -> Alibi | None:
    """``term`` (added to scores of rank ``rank``, [.., H, S, T]) as ALiBi, or None."""
    if rank not in (3, 4) or term.type.rank > rank or not term.dtype.is_float:
        return None
    nodes: list[Node] = []
    v = term
    if v.producer is not None and v.producer.op == "cast" and v.producer.inputs[0].dtype.is_float:
        nodes.append(v.producer)
        v = v.producer.inputs[0]
    if v.is_const:
        return _constant_table(v, heads, s, t, rank, nodes)
    n = v.producer
    if n is not None and n.op == "slice":
        return _sliced(n, heads, s, t, rank, nodes)
    if n is not None and n.op in ("reshape", "expand"):
        return _viewed(v, heads, s, t, rank, nodes)
    if n is None or n.op != "mul":
        return None
    nodes.append(n)
    for c, r in (n.inputs, n.inputs[::-1]):
        slopes = _slopes(c, heads, rank)
        if slopes is None:
            continue
        pos_nodes: list[Node] = []
        try:
            aff = _aligned(r, rank, pos_nodes, 0)
        except _NotAffine:
            return None
        r_shape = (1,) * (rank - r.type.rank) + tuple(r.shape)
        cj = aff.coef[rank - 1]
        # depends on j (the key axis, of length T) and at most on i; never on b or h
        if cj == 0 or not dims_equal(r_shape[rank - 1], t) or any(aff.coef[:rank - 2]):
            return None
        if aff.coef[rank - 2] and not dims_equal(r_shape[rank - 2], s):
            return None
        return Alibi(tuple(x * cj for x in slopes), tuple(nodes + pos_nodes))
    return None


def _sliced(n: Node, heads: int, s: Dim, t: Dim, rank: int, nodes: list[Node]) -> Alibi | None:
    """slice(X) with step 1 along the query or key axis of an ALiBi term X."""
    x, out = n.inputs[0], n.outputs[0]
    axis = n.attrs["axis"] % x.type.rank + rank - x.type.rank
    if n.attrs["step"] != 1 or axis not in (rank - 1, rank - 2):
        return None
    shape = (1,) * (rank - out.type.rank) + tuple(out.shape)
    if not dims_equal(shape[rank - 1], t) or not (shape[rank - 2] == 1
                                                  or dims_equal(shape[rank - 2], s)):
        return None
    full = (1,) * (rank - x.type.rank) + tuple(x.shape)
    inner = match_alibi(x, heads, full[rank - 2], full[rank - 1], rank)
    return None if inner is None else Alibi(inner.slopes, (*nodes, n, *inner.nodes))


def _nonunit(shape) -> list:
    return [d for d in shape if d != 1]


def _viewed(v: Value, heads: int, s: Dim, t: Dim, rank: int, nodes: list[Node]) -> Alibi | None:
    """A chain of reshapes and expands over an ALiBi term x that only moves size-1 dims and
    broadcasts (BLOOM with a dynamic batch: [H, 1, T] -> [B·H, 1, T] -> [B, H, 1, T]).
    Consecutive reshapes compose into one; each must keep the non-unit dims in order; an
    expand adds broadcast dims. x's non-unit dims must keep their axes counted from the end,
    so its head, query and key axes are the scores'."""
    chain, cur = [], v
    while cur.producer is not None and cur.producer.op in ("reshape", "expand"):
        chain.append(cur.producer)
        cur = cur.producer.inputs[0]
    if cur.is_const and cur.const.numel() <= MAX_TABLE and all(
            n.outputs[0].type.is_static for n in chain):  # views of a table: replay them
        table = cur.const
        for n in reversed(chain):
            table = table.reshape(n.outputs[0].shape) if n.op == "reshape" else \
                table.expand(n.outputs[0].shape)
        return _table(table, v.dtype, heads, s, t, rank, [*nodes, *chain])
    slots = list(range(len(_nonunit(v.shape))))  # each non-unit dim of cur: the term's dim
    cur, i = v, 0
    while i < len(chain):
        n, src = chain[i], chain[i].inputs[0]
        if n.op == "reshape":
            while i + 1 < len(chain) and chain[i + 1].op == "reshape":  # one reshape in all
                i += 1
                src = chain[i].inputs[0]
            a, b = _nonunit(cur.shape), _nonunit(src.shape)
            if len(a) != len(b) or not all(dims_equal(x, y) for x, y in zip(a, b)):
                return None
        else:  # right-aligned broadcast: dims that were 1 in the input are not from x
            pad = (1,) * (cur.type.rank - src.type.rank) + tuple(src.shape)
            kept = [p != 1 for d, p in zip(cur.shape, pad) if d != 1]
            slots = [slot for slot, keep in zip(slots, kept) if keep]
        cur, i = src, i + 1
    term_axes = [k - v.type.rank for k, d in enumerate(v.shape) if d != 1]
    x_axes = [k - cur.type.rank for k, d in enumerate(cur.shape) if d != 1]
    if cur.type.rank not in (3, 4) or [term_axes[slot] for slot in slots] != x_axes:
        return None
    inner = match_alibi(cur, heads, s, t, cur.type.rank)
    return None if inner is None else Alibi(inner.slopes, (*nodes, *chain, *inner.nodes))


def _constant_table(c: Value, heads: int, s: Dim, t: Dim, rank: int,
                    nodes: list[Node]) -> Alibi | None:
    """A constant [.., H|1, S|1, T] whose rows are ``slope_h · j`` plus a row constant."""
    if c.const.numel() > MAX_TABLE:
        return None
    return _table(c.const, c.dtype, heads, s, t, rank, nodes)


def _table(const: torch.Tensor, dtype: DType, heads: int, s: Dim, t: Dim, rank: int,
           nodes: list[Node]) -> Alibi | None:
    """``const`` (the same along any axes before the head axis) as an ALiBi table."""
    if const.dim() > rank:
        return None
    shape = (1,) * (rank - const.dim()) + tuple(const.shape)
    hc, sc, tc = shape[rank - 3], shape[rank - 2], shape[rank - 1]
    if (hc not in (1, heads) or tc < 2 or not dims_equal(tc, t)
            or not (sc == 1 or dims_equal(sc, s))):
        return None
    lead = const.reshape(-1, hc, sc, tc).double()
    if not bool((lead == lead[:1]).all()):  # varies along the batch axis
        return None
    table = lead[0]
    if not bool(table.isfinite().all()):
        return None
    rows = table - table[..., :1]  # (Hc, Sc, T): slope_h · j when this is ALiBi
    slopes = rows[..., -1].mean(dim=1) / (tc - 1)  # (Hc,)
    j = torch.arange(tc, dtype=torch.float64)
    tol = ULPS * torch.finfo(dtype.torch).eps * max(float(table.abs().max()), 1.0)
    if bool(((rows - slopes[:, None, None] * j).abs() > tol).any()) or not bool(slopes.any()):
        return None
    values = slopes.tolist() * (heads if hc == 1 else 1)
    return Alibi(tuple(float(x) for x in values), tuple(nodes))


def _slopes(c: Value, heads: int, rank: int) -> tuple[float, ...] | None:
    """A float constant with one value per head, on the head axis (rank - 3) of the scores."""
    if not c.is_const or not c.dtype.is_float or c.type.rank > rank:
        return None
    shape = (1,) * (rank - c.type.rank) + tuple(c.shape)
    if any(d != 1 for k, d in enumerate(shape) if k != rank - 3):
        return None
    if c.const.numel() != heads:
        return None
    return tuple(float(x) for x in c.const.double().reshape(-1).tolist())


__all__ = ["Alibi", "match_alibi"]
