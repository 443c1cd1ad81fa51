"""ONNX and ORT norms: LayerNormalization, SimplifiedLayerNormalization,
Skip(Simplified)LayerNormalization, EmbedLayerNormalization."""

from __future__ import annotations

from transfuse.frontend.build import cast, to_shape
from transfuse.frontend.onnx_external import dtype_of
from transfuse.frontend.onnx_ops.helpers import axis_of
from transfuse.frontend.onnx_ops.registry import MS, onnx_op
from transfuse.ir.graph import Value
from transfuse.ir.types import DType, dims_equal


def _norm_params(cx, x: Value, nd: int, params: list) -> tuple[list, bool]:
    """Weight/bias as the norm op takes them (exactly the normalised shape), or False when
    they only broadcast to it (then the caller multiplies/adds them itself)."""
    want = list(x.shape[x.type.rank - nd:])
    ok = all(p is None or (p.type.rank == nd and all(dims_equal(a, b) for a, b in
                                                      zip(p.shape, want))) for p in params)
    return params, ok


@onnx_op("LayerNormalization")
def _layer_norm(cx, node):
    x = cx.value(node.input(0))
    axis = axis_of(cx, node.attr("axis", -1), x.type.rank)
    nd = x.type.rank - axis
    w = cx.value(node.input(1)) if node.has_input(1) else None
    b = cx.value(node.input(2)) if node.has_input(2) else None
    eps = float(node.attr("epsilon", 1e-5))
    _, exact = _norm_params(cx, x, nd, [w, b])
    if exact:
        y = cx.op("layer_norm", x, w, b, eps=eps, normalized_ndim=nd)
    else:
        y = cx.op("layer_norm", x, None, None, eps=eps, normalized_ndim=nd)
        if w is not None:
            y = cx.op("mul", y, w)
        if b is not None:
            y = cx.op("add", y, b)
    if not (node.used(1) or node.used(2)):
        return [y, None, None]
    # Mean and InvStdDev (training outputs) in the stash type, over the normalised axes
    stash = dtype_of(node.attr("stash_type", 1), f"the stash_type of {cx.where()}")
    xs = cast(cx, x, stash)
    axes = list(range(axis, x.type.rank))
    mean = cx.op("reduce_mean", xs, axes=axes, keepdim=True)
    diff = cx.op("sub", xs, mean)
    var = cx.op("reduce_mean", cx.op("mul", diff, diff), axes=axes, keepdim=True)
    inv = cx.op("rsqrt", cx.op("add", var, cx.const(eps, stash)))
    return [y, mean, inv]


@onnx_op("SimplifiedLayerNormalization")
@onnx_op("SimplifiedLayerNormalization", domain=MS)
def _simplified_layer_norm(cx, node):
    x = cx.value(node.input(0))
    axis = axis_of(cx, node.attr("axis", -1), x.type.rank)
    nd = x.type.rank - axis
    w = cx.value(node.input(1)) if node.has_input(1) else None
    eps = float(node.attr("epsilon", 1e-5))
    upcast = node.attr("stash_type", 1) == 1
    _, exact = _norm_params(cx, x, nd, [w])
    if exact:
        return [cx.op("rms_norm", x, w, eps=eps, normalized_ndim=nd, upcast=upcast), None]
    y = cx.op("rms_norm", x, None, eps=eps, normalized_ndim=nd, upcast=upcast)
    return [y if w is None else cx.op("mul", y, w), None]


@onnx_op("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MS)
def _skip_layer_norm(cx, node):
    """input + skip (+ bias) -> norm; outputs (normed, mean, inv_std, sum)."""
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    x, skip = cx.value(node.input(0)), cx.value(node.input(1))
    gamma = cx.value(node.input(2)) if node.has_input(2) else None
    beta = None if simplified or not node.has_input(3) else cx.value(node.input(3))
    bias_i = 3 if simplified else 4
    if node.has_input(bias_i):
        x = cx.op("add", x, cx.value(node.input(bias_i)))
    eps = float(node.attr("epsilon", 1e-12 if not simplified else 1e-6))
    if simplified:
        normed, total = cx.emit("add_norm", [x, skip, gamma], {"kind": "rms", "eps": eps,
                                                               "upcast": True})
    else:
        normed, total = cx.emit("add_norm", [x, skip, gamma, beta], {"kind": "layer",
                                                                     "eps": eps})
    return [normed, None, None, total] if not simplified else [normed, None, None, total]


@onnx_op("EmbedLayerNormalization", domain=MS)
def _embed_layer_norm(cx, node):
    """word + position (+ segment) embeddings -> layer_norm; mask_index = the mask's row sums."""
    ids = cx.value(node.input(0))
    b, s = ids.shape
    word, posw = cx.value(node.input(2)), cx.value(node.input(3))
    h = cx.op("embedding", word, ids)
    if node.has_input(8):
        pos = cx.value(node.input(8))
    else:
        pos = to_shape(cx, cx.op("arange", start=0, end=s, step=1, dtype=DType.i64), [1, s])
    h = cx.op("add", h, cx.op("embedding", posw, pos))
    if node.has_input(1) and node.has_input(4):
        h = cx.op("add", h, cx.op("embedding", cx.value(node.input(4)),
                                  cx.value(node.input(1))))
    total = h
    gamma = cx.value(node.input(5))
    beta = cx.value(node.input(6)) if node.has_input(6) else None
    y = cx.op("layer_norm", h, gamma, beta, eps=float(node.attr("epsilon", 1e-12)))
    mask_index = None
    if node.used(1):
        if not node.has_input(7):
            raise cx.unsupported("EmbedLayerNormalization mask_index without a mask input")
        m = cx.value(node.input(7))
        mask_index = cast(cx, cx.op("reduce_sum", cast(cx, m, DType.i64), axes=[1]), DType.i32)
    return [y, mask_index, total]
