"""Applying per-channel input scales (AWQ, SmoothQuant): ``x @ Wᵀ = (x / s) @ (W * s)ᵀ``.

The quantized weights already hold ``W * s``; this module makes their input ``x / s``:

- **fold** into the norm that produces x (``rms_norm``, ``layer_norm``, or ``add_norm``'s
  normed output): its weight (and bias) divided by s, when *every* use of x is one of the
  linears sharing these scales (a merged q/k/v projection is one linear) — free at run time;
- **fold** into the linear that produces x through ``swiglu(gate, up)``: the up rows (a slice
  of a merged gate/up projection) divided by s, planned before that linear is quantized
  (:func:`producer_rows`; the MLP's down projection, as in AWQ);
- else a ``mul(x, 1/s)`` node before the first of those linears (counted and noted).

The norm's old weight constant is never edited in place (graph clones share constants): the
norm gets a new constant.

Glossary: K the channels of x (the linears' input features).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from transfuse.ir.graph import Graph, Node, Value

#: norm ops whose (weight, bias) inputs scale their normalised output, by the output index
#: that is normalised: op -> (output index, weight input, bias input or None)
NORM_PARAMS = {"rms_norm": (0, 1, None), "layer_norm": (0, 1, 2), "add_norm": (0, 2, 3)}


def fold_reason(x: Value, linears: Sequence[Node]) -> str | None:
    """Why 1/s cannot be folded into the producer of ``x`` (None when it can)."""
    mine = {id(n) for n in linears}
    others = [n for n in x.users if id(n) not in mine]
    if others:
        return (f"%{x.name} is also read by {', '.join(sorted({n.op for n in others}))} "
                f"(not only by the layers sharing the scales)")
    if any(o is x for o in x.graph.outputs):
        return f"%{x.name} is a graph output"
    p = x.producer
    if p is None:
        return f"%{x.name} is a graph input or constant, not a norm output"
    spec = NORM_PARAMS.get(p.op)
    if spec is None:
        return f"%{x.name} comes from {p.op}, not a norm"
    out_index, wi, bi = spec
    if x.index != out_index:
        return f"%{x.name} is not the normalised output of {p.op}"
    if p.op == "add_norm" and p.attrs.get("kind") == "rms" and bi is not None and \
            len(p.inputs) > bi and p.inputs[bi] is not None:
        return "add_norm has a bias"
    for i in (wi, bi):
        if i is not None and len(p.inputs) > i and p.inputs[i] is not None and \
                not p.inputs[i].is_const:
            return f"the norm's parameter %{p.inputs[i].name} is not a constant"
    if p.attrs.get("normalized_ndim", 1) != 1:
        return "the norm normalises more than the last dim"
    return None


def producer_rows(x: Value, linears: Sequence[Node]) -> tuple[Value, int, int] | str:
    """(v, start, end): ``x`` is ``swiglu(gate, up)`` whose ``up`` is ``v`` (a linear's
    output) or its feature slice ``start:end`` through a ``split`` (a merged gate/up
    projection), so dividing those rows of the linear by s divides x by s. Else why not."""
    mine = {id(n) for n in linears}
    if any(id(n) not in mine for n in x.users) or any(o is x for o in x.graph.outputs):
        return f"%{x.name} is also read elsewhere"
    p = x.producer
    if p is None or p.op != "swiglu":
        return f"%{x.name} is not a swiglu output"
    up = p.inputs[1]
    if up is p.inputs[0] or len(up.uses) != 1 or any(o is up for o in x.graph.outputs):
        return f"swiglu's up operand %{up.name} is used elsewhere"
    split = up.producer
    if split is not None and split.op == "split":
        src = split.inputs[0]
        if split.attrs["axis"] % src.type.rank != src.type.rank - 1:
            return "the split is not along the features"
        if len(src.uses) != 1 or any(o is src for o in x.graph.outputs):
            return f"%{src.name} (the merged projection) is used elsewhere"
        sizes = split.attrs["sizes"]
        start = sum(sizes[:up.index])
        return src, start, start + sizes[up.index]
    return up, 0, int(up.type.shape[-1])


def fold_into_norm(graph: Graph, x: Value, scales: torch.Tensor) -> Node:
    """Divide the norm producing ``x`` by ``scales`` [K] (see :func:`fold_reason`); the norm
    is rebuilt with new parameter constants and returned."""
    norm = x.producer
    _, wi, bi = NORM_PARAMS[norm.op]
    inv = 1.0 / scales.to(torch.float64)
    inputs = list(norm.inputs) + [None] * (max(wi, bi or 0) + 1 - len(norm.inputs))
    w = inputs[wi]
    offset = 0.0 if norm.op == "layer_norm" else float(norm.attrs.get("offset", 0.0) or 0.0)
    if w is None:  # y = h  ->  y = h * (w' + offset) with w' + offset = 1/s
        new_w = (inv - offset).to(x.dtype.torch)
    else:
        new_w = ((w.const.to(torch.float64) + offset) * inv - offset).to(w.const.dtype)
    base = w.name if w is not None else f"{x.name}_norm_weight"
    inputs[wi] = graph.add_constant(new_w.contiguous(), f"{base}_smoothed")
    old = [w]
    if bi is not None and inputs[bi] is not None:
        b = inputs[bi]
        inputs[bi] = graph.add_constant((b.const.to(torch.float64) * inv).to(b.const.dtype)
                                        .contiguous(), f"{b.name}_smoothed")
        old.append(b)
    while inputs and inputs[-1] is None:
        inputs.pop()
    new = graph.create(norm.op, inputs, dict(norm.attrs), meta=dict(norm.meta), before=norm)
    for a, b in zip(norm.outputs, new.outputs):
        graph.replace_all_uses(a, b)
    graph.erase(norm)
    for c in old:
        if c is not None and not c.uses and not any(o is c for o in graph.outputs) and \
                graph.constants.get(c.name) is c:
            del graph.constants[c.name]
    return new


def insert_scale(graph: Graph, x: Value, scales: torch.Tensor, before: Node) -> Node:
    """A ``mul(x, 1/s)`` node before ``before``."""
    inv = (1.0 / scales.to(torch.float64)).to(x.dtype.torch).contiguous()
    c = graph.add_constant(inv, f"{x.name}_smooth_inv")
    meta = {"source": before.source} if before.source else None
    return graph.create("mul", [x, c], name=f"{x.name}_smoothed", before=before, meta=meta)


__all__ = ["fold_reason", "fold_into_norm", "producer_rows", "insert_scale", "NORM_PARAMS"]
