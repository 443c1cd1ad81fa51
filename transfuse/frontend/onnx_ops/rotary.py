"""ORT contrib RotaryEmbedding and ONNX 23 RotaryEmbedding -> ``rotary``."""

from __future__ import annotations

from transfuse.frontend.build import to_shape
from transfuse.frontend.onnx_ops.registry import MS, onnx_op
from transfuse.ir.graph import Value


def _full_width(cx, half: Value, interleaved: bool) -> Value:
    """cos/sin [.., R/2] -> [.., R]: halves repeated (rotate-half) or each element twice."""
    if not interleaved:
        return cx.emit("concat", [half, half], {"axis": half.type.rank - 1})
    lead, r2 = list(half.shape[:-1]), half.shape[-1]
    pair = cx.op("expand", to_shape(cx, half, lead + [r2, 1]), shape=lead + [r2, 2])
    return to_shape(cx, pair, lead + [2 * r2])


def _rotary(cx, node, x: Value, cos: Value, sin: Value, pos: Value | None, heads: int,
            rot_dim: int, interleaved: bool) -> Value:
    if pos is not None:
        if pos.type.rank != 2:
            raise cx.unsupported(f"RotaryEmbedding with position_ids {pos.type} (only [B, S])")
        cos, sin = (cx.op("embedding", c, pos) if c.type.rank == 2 else
                    cx.fail("cos/sin caches must be 2-D with position_ids") for c in (cos, sin))
    if cos.type.rank != 3:
        raise cx.unsupported(f"RotaryEmbedding cos cache {cos.type} (expected [B, S, R/2])")
    r = x.type.rank
    if r == 3:
        hd = x.shape[2]
        if not heads:
            heads = hd // (2 * cos.shape[-1]) if isinstance(hd, int) else 0
        if not heads or not isinstance(hd, int) or hd % heads:
            raise cx.fail(f"cannot split hidden size {hd} into num_heads={heads}")
        xs = to_shape(cx, x, [x.shape[0], x.shape[1], heads, hd // heads])  # [B, S, H, D]
        unsq = [cos.shape[0], cos.shape[1], 1]
    elif r == 4:
        xs, unsq = x, [cos.shape[0], 1, cos.shape[1]]  # [B, H, S, D]
    else:
        raise cx.unsupported(f"RotaryEmbedding of {x.type}")
    head = xs.shape[3]
    rot = rot_dim or head
    if not isinstance(head, int) or rot % 2 or rot > head or 2 * cos.shape[-1] != rot:
        raise cx.fail(f"rotary dim {rot} does not match head size {head} / cos cache {cos.type}")
    c, sn = (to_shape(cx, _full_width(cx, t, interleaved), unsq + [rot]) for t in (cos, sin))
    part = xs if rot == head else cx.op("slice", xs, axis=3, start=0, end=rot, step=1)
    y = cx.op("rotary", part, c, sn, interleaved=interleaved)
    if rot != head:
        rest = cx.op("slice", xs, axis=3, start=rot, end=head, step=1)
        y = cx.emit("concat", [y, rest], {"axis": 3})
    return to_shape(cx, y, list(x.shape))


@onnx_op("RotaryEmbedding", domain=MS)
def _ms_rotary(cx, node):
    if node.attr("is_packed_batching", 0) or float(node.attr("scale", 1.0)) != 1.0:
        raise cx.unsupported("RotaryEmbedding with packed batching or scale != 1")
    x, pos = cx.value(node.input(0)), cx.value(node.input(1))
    cos, sin = cx.value(node.input(2)), cx.value(node.input(3))
    return [_rotary(cx, node, x, cos, sin, pos, node.attr("num_heads", 0),
                    node.attr("rotary_embedding_dim", 0), bool(node.attr("interleaved", 0)))]


@onnx_op("RotaryEmbedding")
def _rotary_embedding(cx, node):
    x, cos, sin = (cx.value(node.input(i)) for i in range(3))
    pos = cx.value(node.input(3)) if node.has_input(3) else None
    return [_rotary(cx, node, x, cos, sin, pos, node.attr("num_heads", 0),
                    node.attr("rotary_embedding_dim", 0), bool(node.attr("interleaved", 0)))]
