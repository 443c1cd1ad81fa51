"""The ``rotary`` lowering: ORT's ``com.microsoft.RotaryEmbedding`` where it is proven exact.

The IR op computes ``x * cos + rotate(x) * sin`` with full-width (D) cos/sin that
broadcast against x; ``RotaryEmbedding`` reads half-width rows ``cache[pos, :D/2]`` and
rotates x ([B, S, H*D] with ``num_heads``, or [B, H, S, D]) by
``out[i] = x[i] * c[k(i)] -/+ x[j(i)] * s[k(i)]`` with ``k(i) = i mod D/2`` (rotate-half)
or ``i div 2`` (interleaved) — the IR op exactly when every row of cos/sin repeats its
half-width row that way. Two ways to get the half-width rows, tried in this order:

- **constant tables** (:func:`rotary_tables`): cos/sin are rows ``start..`` of constant
  tables [P, D] whose halves (or pairs) are checked equal; the cache is the tables' first
  halves, ``position_ids = [start]``.
- **rows computed in the graph** (:func:`duplicated_rows`, the generation graphs: angles
  from the runtime ``position_ids``): cos is proven structurally to be ``dup(h)`` followed
  by per-element ops, where ``dup`` is ``concat(h, h, -1)`` (rotate-half) or
  ``reshape(expand|concat(h[..., None]) -> [..., D/2, 2]) -> [..., D]`` (interleaved), the
  per-element ops are ``cos``, ``sin``, ``cast`` and a product with a one-element constant,
  and the reshapes in between keep the last dim (so keep the rows in order). Each per-element
  op of a duplicated value is the duplicate of the op on ``h`` (each output element is the
  same function of the same input element), so replaying the ops on ``h`` gives the
  half-width rows of cos: the cache is those rows as [R, D/2], R the rows of cos, and the
  position of token (b, s) is its row: ``position_ids = [0]`` (R = S, cos shared by the
  batch: position s) or ``Range(0, B*S)`` as [B, S] (R = B*S, a row per batch entry).
  x rotates along the axis cos runs along: axis 2 ([B, H, S, D], or its [B, S, H*D]
  projection with ``num_heads``) or axis 1 ([B, S, H, D] as [B, S, H*D]).

Anything else (cos that varies per head, broadcasts a position, or is not proven a
duplicate, non-f32 values, fused ops off) keeps the standard ops (Split/Neg/Concat or
strided slices, two Mul, Add), with the reason in the lowering notes. Numerics against the
python target: ``tests/codegen/test_onnx_rotary.py``. Glossary: B batch, H heads, S
sequence, D head dim (static, even), R rows of the cos/sin cache, P table positions.
"""

from __future__ import annotations

import torch

from transfuse.codegen.onnx.registry import LOWERINGS, fusable, out_dtype, producer
from transfuse.ir.graph import Node, Value
from transfuse.ir.types import DType, dims_equal

# -- constant tables -------------------------------------------------------------------------


def rotary_tables(node: Node) -> tuple[Value, Value, object] | None:
    """(cos table, sin table, first position) when cos/sin are rows start.. of constant tables
    [P, D] (``slice`` along axis 0) whose frequencies repeat the way ``interleaved`` says."""
    cos, sin = node.inputs[1], node.inputs[2]
    sc, ss = producer(cos, "slice"), producer(sin, "slice")
    if sc is None or ss is None:
        return None
    tc, ts = sc.inputs[0], ss.inputs[0]
    if not (tc.is_const and ts.is_const) or tc.type.rank != 2 or ts.type != tc.type:
        return None
    for s in (sc, ss):
        if s.attrs["axis"] % 2 != 0 or s.attrs["step"] != 1:
            return None
    if not dims_equal(sc.attrs["start"], ss.attrs["start"]):
        return None
    d = tc.type.shape[1]
    for t in (tc.const, ts.const):
        if node.attrs["interleaved"]:
            if not torch.equal(t[:, 0::2], t[:, 1::2]):
                return None
        elif not torch.equal(t[:, : d // 2], t[:, d // 2:]):
            return None
    return tc, ts, sc.attrs["start"]


def half_table(b, table: Value, interleaved: bool) -> str:
    d = table.type.shape[1]
    return b.derived(("half", id(table), interleaved),
                     lambda: (table.const[:, 0::2] if interleaved else table.const[:, : d // 2])
                     .contiguous(), f"{table.name}_half")


def rotary_layout(node: Node) -> str | None:
    """'bhsd' (x [B, H, S, D], cos [S, D]) or 'bshd' (x [B, S, H, D], cos [S, 1, D])."""
    x, cos = node.inputs[0].type, node.inputs[1].type
    if x.rank != 4 or node.inputs[2].type != cos:
        return None
    if cos.rank == 2 and dims_equal(cos.shape[0], x.shape[2]):
        return "bhsd"
    if cos.rank == 3 and cos.shape[1] == 1 and dims_equal(cos.shape[0], x.shape[1]):
        return "bshd"
    return None


# -- rows computed in the graph ----------------------------------------------------------------

def duplicated_rows(v: Value, d: int, interleaved: bool) -> tuple[Value, list[Node]] | str:
    """(h, ops) when ``v`` (last dim ``d``) is ``dup(h)`` followed by the per-element ``ops``
    (in application order) and last-dim-keeping reshapes, ``h`` having D/2-wide rows in the
    order of v's rows; else the reason it is not proven."""
    ops: list[Node] = []
    while True:
        p = v.producer
        if p is None:
            return f"%{v.name} is not computed from half-width rows"
        if p.op == "reshape" and _last_dim(p.inputs[0]) == d:
            v = p.inputs[0]
        elif p.op in ("cos", "sin", "cast"):
            ops.append(p)
            v = p.inputs[0]
        elif p.op == "mul" and _scalar_const(p) is not None:
            ops.append(p)
            v = p.inputs[1 - _scalar_const(p)]
        else:
            break
    h = _undup_interleaved(v, d) if interleaved else _undup_half(v, d)
    if isinstance(h, str):
        return h
    return h, ops[::-1]


def _last_dim(v: Value):
    return v.type.shape[-1] if v.type.rank else None


def _scalar_const(node: Node) -> int | None:
    """Which input of a ``mul`` is a one-element constant (None: neither)."""
    for i in (1, 0):
        c = node.inputs[i]
        if c is not None and c.is_const and c.type.numel() == 1:
            return i
    return None


def _undup_half(v: Value, d: int) -> Value | str:
    """h when v = concat(h, h) along the last axis, h D/2 wide."""
    p = v.producer
    if p is None or p.op != "concat" or p.attrs["axis"] % v.type.rank != v.type.rank - 1:
        return f"%{v.name} ({p.op if p else 'an input'}) is not concat(h, h) on the last axis"
    if len(p.inputs) != 2 or p.inputs[0] is not p.inputs[1]:
        return f"the halves of %{v.name} are not one value twice"
    if _last_dim(p.inputs[0]) != d // 2:
        return f"the halves of %{v.name} are not {d // 2} wide"
    return p.inputs[0]


def _undup_interleaved(v: Value, d: int) -> Value | str:
    """h when v = reshape(pairs) with pairs [..., D/2, 2] = expand or concat of
    h[..., None] ([..., D/2, 1]) along the last axis."""
    p = v.producer
    pairs = p.inputs[0] if p is not None and p.op == "reshape" else None
    if pairs is None or pairs.type.rank < 2 or tuple(pairs.type.shape[-2:]) != (d // 2, 2):
        return f"%{v.name} is not reshape(pairs [..., {d // 2}, 2])"
    q = pairs.producer
    if q is not None and q.op == "expand":
        one = q.inputs[0]
        if one.type.rank != pairs.type.rank or not all(
                dims_equal(a, c) for a, c in zip(one.type.shape[:-1], pairs.type.shape[:-1])):
            return f"the expand making %{pairs.name} repeats more than each entry"
    elif (q is not None and q.op == "concat" and len(q.inputs) == 2
          and q.inputs[0] is q.inputs[1] and q.attrs["axis"] % pairs.type.rank
          == pairs.type.rank - 1):
        one = q.inputs[0]
    else:
        return f"the pairs %{pairs.name} are not each entry repeated (expand or concat)"
    if _last_dim(one) != 1:
        return f"%{one.name} {one.type} is not [..., {d // 2}, 1]"
    r = one.producer
    if r is not None and r.op == "reshape" and _last_dim(r.inputs[0]) == d // 2:
        return r.inputs[0]
    return one  # [..., D/2, 1]: rows of D/2 entries all the same


def rows_plan(node: Node) -> dict | str:
    """How RotaryEmbedding takes this node with rows computed in the graph, or why not:
    {"h": (cos h, sin h), "ops": (cos ops, sin ops), "axis": 1 | 2 (the axis cos runs
    along), "per_batch": cos has a row per batch entry}."""
    x, cos, sin = node.inputs
    d = x.type.shape[-1]
    if x.type.rank != 4:
        return f"x {x.type} is not 4-D"
    if cos.type != sin.type or cos.type.rank > 4 or not dims_equal(_last_dim(cos), d):
        return f"cos {cos.type} / sin {sin.type} are not one full-width shape of rank <= 4"
    c0, c1, c2 = (1,) * (4 - cos.type.rank) + tuple(cos.type.shape[:-1])
    if c1 == 1 and dims_equal(c2, x.type.shape[2]):
        axis = 2
    elif c2 == 1 and dims_equal(c1, x.type.shape[1]):
        axis = 1
    else:
        return (f"cos {cos.type} does not run along one axis of x {x.type} (it varies per "
                "head or is broadcast over positions)")
    if c0 != 1 and not dims_equal(c0, x.type.shape[0]):
        return f"cos {cos.type} does not match the batch of x {x.type}"
    plan: dict = {"axis": axis, "per_batch": c0 != 1}
    found = [duplicated_rows(t, d, node.attrs["interleaved"]) for t in (cos, sin)]
    for what, f in zip(("cos", "sin"), found):
        if isinstance(f, str):
            return f"{what}: {f}"
    plan["h"] = tuple(f[0] for f in found)
    plan["ops"] = tuple(tuple(f[1]) for f in found)
    return plan


def _half_rows(b, h: Value, ops: tuple[Node, ...], d: int) -> str:
    """The per-element ``ops`` replayed on ``h``, as [R, D/2] (once per graph)."""

    def make():
        name, dtype = b.name(h), h.type.dtype
        for n in ops:
            out = n.outputs[0].type.dtype
            if n.op == "cast":
                name = b.cast(name, dtype, out)
            elif n.op == "mul":
                c = n.inputs[_scalar_const(n)]
                scalar = b.const(c.const.reshape(()), c.type.dtype, "scale")
                name = b.add("Mul", [b.cast(name, dtype, out), b.cast(scalar, c.type.dtype, out)])
            else:
                name = b.add("Cos" if n.op == "cos" else "Sin", [b.cast(name, dtype, out)])
            dtype = out
        return b.add("Reshape", [name, b.ints([-1, d // 2])], hint=f"{h.name}_rows")

    return b.memo(("rotary-rows", id(h), tuple(id(n) for n in ops)), make)


def _rotary_rows(b, node: Node, plan: dict) -> str:
    x = node.inputs[0]
    t = x.type.shape
    caches = [_half_rows(b, h, ops, t[3]) for h, ops in zip(plan["h"], plan["ops"])]
    if plan["per_batch"]:  # token (b, s) reads row b*S + s

        def row_ids():
            rows = b.add("Shape", [caches[0]], start=0, end=1)
            ids = b.add("Range", [b.const(0, DType.i64, "zero"), b.add("Squeeze", [rows]),
                                  b.const(1, DType.i64, "one")])
            return b.add("Reshape", [ids, b.shape([t[0], -1])])

        pos = b.memo(("rotary-row-ids", caches[0], str(t[0])), row_ids)
    else:  # token (b, s) reads row s
        pos = b.ints([0])
    return _embed(b, node, "bhsd" if plan["axis"] == 2 else "bshd", pos, caches)


def _embed(b, node: Node, layout: str, pos: str, caches: list[str]) -> str:
    """RotaryEmbedding of x ([B, H, S, D] "bhsd" or [B, S, H, D] "bshd") with ``pos`` and
    the half-width ``caches``: on its [B, S, H*D] projection when the builder has it (the
    output is recorded the same way: no transposes), else on x 4-D (bhsd) or reshaped."""
    x = node.inputs[0]
    t = x.type.shape
    interleaved = int(node.attrs["interleaved"])
    views = b.heads_first if layout == "bhsd" else b.split_heads
    heads = t[1] if layout == "bhsd" else t[2]
    flat = views.get(id(x))
    if flat is not None and isinstance(heads, int):
        out3 = b.ms("RotaryEmbedding", [flat, pos, *caches], interleaved=interleaved,
                    num_heads=heads)
        views[id(node.outputs[0])] = out3
        return unflatten(b, out3, node.outputs[0], layout)
    if layout == "bhsd":  # the kernel's 4-D form
        return b.ms("RotaryEmbedding", [b.name(x), pos, *caches], interleaved=interleaved)
    if not isinstance(heads, int):
        return _refuse(b, node, f"x {x.type} has a symbolic head count (num_heads)")
    flat = b.add("Reshape", [b.name(x), b.reshape_target([t[0], t[1], t[2] * t[3]])])
    out3 = b.ms("RotaryEmbedding", [flat, pos, *caches], interleaved=interleaved,
                num_heads=heads)
    return b.add("Reshape", [out3, b.reshape_target(t)])


# -- the lowering ----------------------------------------------------------------------------


def _rotary_std(b, node: Node) -> str:
    dtype = out_dtype(node)
    x, cos, sin = (b.input(node, i, dtype) for i in range(3))
    d = node.inputs[0].type.shape[-1]
    if node.attrs["interleaved"]:
        even = b.add("Slice", [x, b.ints([0]), b.ints([d]), b.ints([-1]), b.ints([2])])
        odd = b.add("Slice", [x, b.ints([1]), b.ints([d]), b.ints([-1]), b.ints([2])])
        pairs = b.add("Concat", [b.unsqueeze(b.add("Neg", [odd]), [-1]),
                                 b.unsqueeze(even, [-1])], axis=-1)
        rot = b.add("Reshape", [pairs, b.add("Shape", [x])])
    else:
        x1, x2 = b.split(x, [d // 2, d // 2], -1)
        rot = b.add("Concat", [b.add("Neg", [x2]), x1], axis=-1)
    return b.add("Add", [b.add("Mul", [x, cos]), b.add("Mul", [rot, sin])])


def _rotary_tables(b, node: Node, tables, layout: str) -> str:
    tc, ts, start = tables
    interleaved = node.attrs["interleaved"]
    caches = [half_table(b, tc, interleaved), half_table(b, ts, interleaved)]
    return _embed(b, node, layout, b.dim(start), caches)


@LOWERINGS.register("rotary")
def _rotary(b, node):
    """x * cos + rotate(x) * sin; ``RotaryEmbedding`` when proven exact (module docstring)."""
    if not fusable(b, node):
        return _rotary_std(b, node)
    tables, layout = rotary_tables(node), rotary_layout(node)
    if tables is not None and layout is not None:
        return _rotary_tables(b, node, tables, layout)
    plan = rows_plan(node)
    if isinstance(plan, dict):
        return _rotary_rows(b, node, plan)
    return _refuse(b, node, plan)


def _refuse(b, node: Node, why: str) -> str:
    """The standard ops, saying once per reason why RotaryEmbedding was not used."""
    b.memo(("rotary-route", why), lambda: b.notes.append(
        f"rotary with standard ops: {why}") or why)
    return _rotary_std(b, node)


def unflatten(b, flat: str, v: Value, layout: str) -> str:
    """The 4-D ``v`` (bhsd or bshd) from its [B, S, H*D] form."""
    t = v.type.shape
    if layout == "bhsd":
        bshd = b.add("Reshape", [flat, b.reshape_target([t[0], t[2], t[1], t[3]])])
        return b.add("Transpose", [bshd], perm=[0, 2, 1, 3])
    return b.add("Reshape", [flat, b.reshape_target(t)])


__all__ = ["rotary_tables", "half_table", "rotary_layout", "rows_plan", "duplicated_rows",
           "unflatten"]
