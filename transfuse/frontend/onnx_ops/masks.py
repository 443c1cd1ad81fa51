"""ONNX IsNaN/IsInf/Where, and the exporter's NaN guard around a finitely masked
softmax: ``Where(IsNaN(Softmax(s + where(m, 0, c))), 0, ·)`` with a finite ``c`` is the
softmax itself (the row of a finite mask is never all -inf)."""

from __future__ import annotations

import math

import numpy as np
import torch

from transfuse.frontend.onnx_ops.known import KNOWN_MAX, Known, all_known, known, vec_map
from transfuse.frontend.onnx_ops.registry import onnx_op
from transfuse.ir.graph import Value
from transfuse.ir.types import DType


@onnx_op("IsNaN")
def _isnan(cx, node):
    v = cx.value(node.input(0))
    out = cx.op("ne", v, v)
    cx.cache[("isnan", id(out))] = v
    return [out]


@onnx_op("IsInf")
def _isinf(cx, node):
    v = cx.value(node.input(0))
    pos, neg = node.attr("detect_positive", 1), node.attr("detect_negative", 1)
    inf = cx.const(math.inf, v.dtype)
    if pos and neg:
        return [cx.op("eq", cx.op("abs", v), inf)]
    if pos:
        return [cx.op("eq", v, inf)]
    if neg:
        return [cx.op("eq", v, cx.const(-math.inf, v.dtype))]
    return [cx.op("full", shape=list(v.shape), value=0.0, dtype=DType.bool)]


@onnx_op("Where")
def _where(cx, node):
    ks = all_known(cx, node)
    if ks is not None and all(k is not None for k in ks):
        c, a, b = ks
        shape = np.broadcast_shapes(c.shape, a.shape, b.shape)
        decided = all(isinstance(e, bool) for e in c.elements())
        if decided and int(np.prod(shape, dtype=object)) <= KNOWN_MAX:
            return [Known(vec_map(lambda p, x, y: x if p else y, c.data, a.data, b.data), a.dtype)]
    cond = cx.value(node.input(0))
    src = cx.cache.get(("isnan", id(cond)))
    if src is not None and _is_zero(cx, node.input(1)) and node.input(2) is src \
            and _finite_masked_softmax(src):
        return [src]
    return [cx.op("where", cond, cx.value(node.input(1)), cx.value(node.input(2)))]


def _is_zero(cx, x) -> bool:
    k = known(cx, x)
    return k is not None and k.is_concrete and all(e == 0 for e in k.elements())


def _finite_const(v: Value | None) -> bool:
    while v is not None and v.producer is not None and v.producer.op == "cast":
        v = v.producer.inputs[0]
    return v is not None and v.is_const and v.dtype.is_float and bool(torch.isfinite(v.const).all())


def _finite_masked_softmax(v: Value) -> bool:
    """``v = softmax(matmul(..) + where(m, a, b))`` over the last axis with finite constants
    a, b (the scores optionally scaled by a finite constant): no row is all -inf, so the
    softmax of finite scores has no NaN."""
    p = v.producer
    if p is None or p.op != "softmax" or p.attrs["axis"] % v.type.rank != v.type.rank - 1:
        return False
    add = p.inputs[0].producer
    if add is None or add.op != "add":
        return False
    for m, scores in (add.inputs, add.inputs[::-1]):
        w = m.producer
        while w is not None and w.op in ("cast", "expand", "reshape"):
            w = w.inputs[0].producer
        if w is not None and w.op == "where" and _finite_const(w.inputs[1]) and \
                _finite_const(w.inputs[2]) and _scores(scores):
            return True
    return False


def _scores(v: Value) -> bool:
    """A matmul, possibly cast or scaled by a finite constant: no -inf of its own."""
    p = v.producer
    while p is not None and (p.op == "cast" or p.op in ("mul", "div") and
                             any(_finite_const(x) for x in p.inputs)):
        v = p.inputs[0] if p.op == "cast" or not _finite_const(p.inputs[0]) else p.inputs[1]
        p = v.producer
    return p is not None and p.op == "matmul"
