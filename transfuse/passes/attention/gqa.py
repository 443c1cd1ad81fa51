"""attention.remove-repeat-kv: grouped-query attention without materialised K/V repeats.

Rewrite (rule id ``attention/repeat-kv``): an ``attention`` whose K and V are both
Hkv-head tensors repeated to the H query heads, each kv head used by n = H / Hkv
consecutive query heads (query head h reads kv head h // n), takes the Hkv-head
tensors directly with ``kv_heads=Hkv``. Recognised repeats of x [B, Hkv, T, D]:

- Hugging Face ``repeat_kv``: ``reshape(expand(x[:, :, None], [B, Hkv, n, T, D]),
  [B, H, T, D])`` (the ``[:, :, None]`` is a reshape);
- ``x.repeat_interleave(n, dim=1)`` (kept by export as a ``torch_fallback``);
- ``index_select(x, 1, idx)`` with the constant idx = [0]*n + [1]*n + ...;
- an ``expand`` of a single kv head [B, 1, T, D] to H heads (multi-query).

A repeat that tiles the heads instead (``expand`` to [B, n, Hkv, T, D]: query head h
reads kv head h % Hkv) is not what ``kv_heads`` means: a near miss. So are a
repeated K with an unrepeated V (or different factors).

Needs: attention in layout bhsd (``attention.fuse-sdpa`` makes it so).
Guarantees: the same values (the op repeats kv heads the same way); the repeat
nodes are erased when nothing else uses them.

Glossary: B batch, H query heads, Hkv key/value heads, n = H / Hkv, T key length,
D head dim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.types import dims_equal
from transfuse.passes.attention.fuse import register_lazily
from transfuse.passes.base import Pass, PassContext, erase_if_dead

RULE = "attention/repeat-kv"


@dataclass(frozen=True)
class Repeat:
    """``repeated`` = x repeated to H heads, x = ``source`` (or ``source`` reshaped to
    ``shape`` when the repeat started from a [B, Hkv, 1, T, D] view of it)."""

    source: Value
    kv_heads: int
    nodes: tuple[Node, ...]
    shape: tuple | None = None


def _same_dims(a, b) -> bool:
    return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))


def _expand_reshape(x: Value, heads: int) -> Repeat | str | None:
    r = x.producer
    e = r.inputs[0].producer if r is not None and r.op == "reshape" else None
    if e is None or e.op != "expand" or e.outputs[0].type.rank != 5:
        return None
    y = e.inputs[0]
    b, g1, g2, t, d = e.outputs[0].shape
    if not _same_dims(x.shape, (b, heads, t, d)) or y.type.rank != 5:
        return None
    if not (isinstance(g1, int) and isinstance(g2, int)) or g1 * g2 != heads:
        return None
    ys = y.shape
    if ys[2] == 1 and dims_equal(ys[1], g1) and g2 > 1:  # [B, Hkv, 1, T, D] -> groups
        kv = g1
    elif ys[1] == 1 and dims_equal(ys[2], g2) and g1 > 1:
        return (f"%{x.name} repeats the {g2} kv heads as {g1} tiles (query head h reads kv "
                f"head h % {g2}), not in groups (h // n) as kv_heads means")
    else:
        return None
    if not (dims_equal(ys[0], b) and dims_equal(ys[3], t) and dims_equal(ys[4], d)):
        return None
    nodes = (r, e)
    p = y.producer
    if p is not None and p.op == "reshape" and _same_dims(p.inputs[0].shape, (ys[0], kv, t, d)):
        return Repeat(p.inputs[0], kv, nodes + (p,))
    return Repeat(y, kv, nodes, shape=(ys[0], kv, t, d))


def _repeat_interleave(x: Value, heads: int) -> Repeat | str | None:
    n = x.producer
    if n is None or n.op != "torch_fallback" or \
            n.attrs["target"] != "aten::repeat_interleave.self_int":
        return None
    spec = json.loads(n.attrs["args"])
    args, kwargs = list(spec.get("args", [])), dict(spec.get("kwargs", {}))
    reps = args[1] if len(args) > 1 else kwargs.get("repeats")
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    src = n.inputs[0]
    if not isinstance(reps, int) or dim is None or src.type.rank != 4:
        return None
    if dim % 4 != 1:
        return f"%{x.name} repeats dim {dim}, not the head dim"
    kv = src.shape[1]
    if not isinstance(kv, int) or kv * reps != heads:
        return None
    return Repeat(src, kv, (n,))


def _index_select(x: Value, heads: int) -> Repeat | str | None:
    n = x.producer
    if n is None or n.op != "index_select" or n.attrs["axis"] % 4 != 1:
        return None
    src, idx = n.inputs
    kv = src.shape[1]
    if idx.const is None or not isinstance(kv, int) or heads % kv:
        return None
    rep = heads // kv
    if idx.const.reshape(-1).tolist() != [h // rep for h in range(heads)]:
        return f"%{x.name} selects kv heads {idx.const.reshape(-1).tolist()}, not h // {rep}"
    return Repeat(src, kv, (n,))


def _expand_single(x: Value, heads: int) -> Repeat | str | None:
    n = x.producer
    if n is None or n.op != "expand" or n.inputs[0].type.rank != 4:
        return None
    src = n.inputs[0]
    if src.shape[1] != 1 or heads == 1:
        return None
    if not _same_dims((src.shape[0], src.shape[2], src.shape[3]),
                      (x.shape[0], x.shape[2], x.shape[3])):
        return None
    return Repeat(src, 1, (n,))


def find_repeat(x: Value, heads: int) -> Repeat | str | None:
    """How ``x`` [B, H, T, D] repeats fewer kv heads: a Repeat, a reason it is a repeat
    that ``kv_heads`` cannot express, or None (no repeat)."""
    for form in (_expand_reshape, _repeat_interleave, _index_select, _expand_single):
        found = form(x, heads)
        if found is not None:
            return found
    return None


class RemoveRepeatKv(Pass):
    """Remove repeat_kv (expand+reshape / repeat_interleave / index_select) on attention
    K and V: the op reads Hkv < H heads (kv_heads)."""

    name = "attention.remove-repeat-kv"
    rules = (RULE,)

    def run(self, graph: Graph, ctx: PassContext) -> None:
        for node in graph.nodes:
            if node.op == "attention":
                self._visit(graph, ctx, node)

    def _visit(self, graph: Graph, ctx: PassContext, node: Node) -> None:
        q, k, v = node.inputs[:3]
        h = q.shape[1]
        if node.attrs["layout"] != "bhsd" or not isinstance(h, int) or k.shape[1] != h:
            return
        rk, rv = find_repeat(k, h), find_repeat(v, h)
        if rk is None and rv is None:
            return
        ctx.attempt(RULE)
        reason = next((r for r in (rk, rv) if isinstance(r, str)), None)
        if reason is None and (rk is None or rv is None):
            which, other = ("k", "v") if rk is not None else ("v", "k")
            reason = f"{which} is a repeat of fewer kv heads but {other} is not"
        if reason is None and rk.kv_heads != rv.kv_heads:
            reason = f"k repeats {rk.kv_heads} kv heads, v {rv.kv_heads}"
        if reason is not None:
            ctx.near_miss(RULE, node, reason)
            return
        meta = {"source": node.source} if node.source else None
        new: list[Node] = []

        def source(rep: Repeat) -> Value:
            if rep.shape is None:
                return rep.source
            n = graph.create("reshape", [rep.source], {"shape": list(rep.shape)}, before=node,
                             meta=meta)
            new.append(n)
            return n.output

        ins = [q, source(rk), source(rv), *node.inputs[3:]]
        attn = graph.create("attention", ins, {**node.attrs, "kv_heads": rk.kv_heads},
                            before=node, meta=meta)
        new.append(attn)
        ctx.rewrite(RULE, [node, *rk.nodes, *rv.nodes], new)
        graph.replace_all_uses(node.output, attn.output)
        graph.erase(node)
        for n in (*rk.nodes, *rv.nodes):  # outermost first
            erase_if_dead(graph, n)


register_lazily(RemoveRepeatKv)

__all__ = ["RemoveRepeatKv", "Repeat", "find_repeat", "RULE"]
