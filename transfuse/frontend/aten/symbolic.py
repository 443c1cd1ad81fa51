"""aten symbolic sizes (``sym_size`` ...), ``item()`` (:class:`Opaque`) and dropped asserts."""

from __future__ import annotations

import torch.fx as fx

from transfuse.frontend.aten.registry import aten
from transfuse.frontend.build import cast
from transfuse.ir.types import DType


@aten("sym_size.int", "sym_numel", "sym_stride.int", "sym_storage_offset", "sym_size", "sym_stride")
def _sym(cx, a):
    return cx.meta_scalar(cx.current)


class Opaque:
    """A scalar the IR cannot hold (read from tensor values by ``item()``, or a symbolic
    bool/float); harmless unless a converter needs it, which then raises CaptureError."""

    def __init__(self, node: fx.Node, reason: str):
        self.node = node
        self.reason = reason


@aten("_local_scalar_dense", "item")
def _item(cx, a):
    return Opaque(cx.current, "is read from tensor values (item()); capture needs it static")


@aten(
    "_assert_tensor_metadata",
    "_assert_scalar",
    "sym_constrain_range",
    "sym_constrain_range_for_size",
    "_functional_sym_constrain_range",
    "_functional_sym_constrain_range_for_size",
    "_functional_assert_scalar",
    "_set_grad_enabled",
)
def _drop_assert(cx, a):
    """Shape and metadata asserts: the signature check guarantees them; counted."""
    if cx.current.target._schema.name != "aten::_set_grad_enabled":
        cx.drop_assert()
    return None


@aten("_assert_async")
def _assert_async(cx, a):
    msg = a.get("assert_msg") or ""
    cx.emit("assert", [cast(cx, cx.value(a["self"]), DType.bool)], {"message": msg})
    return None
