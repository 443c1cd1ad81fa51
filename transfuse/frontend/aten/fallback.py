"""What has no table entry: higher-order ops (inlined grad/autocast regions) and
``torch_fallback`` nodes (the call kept as a JSON template for the python backend)."""

from __future__ import annotations

import json
from typing import Any

import sympy
import torch
import torch.fx as fx

from transfuse.errors import CaptureError
from transfuse.ir.graph import Value
from transfuse.ir.types import TensorType


def convert_higher_order(cx, n: fx.Node) -> Any:
    """Inline ``wrap_with_set_grad_enabled`` and disabled ``wrap_with_autocast`` regions."""
    name = getattr(n.target, "__name__", str(n.target))
    if name == "wrap_with_set_grad_enabled":
        sub, operands_ = n.args[1], n.args[2:]
    elif name == "wrap_with_autocast":
        enabled = n.args[2]
        if enabled:
            raise CaptureError(
                f"autocast region at {cx.where(n)} changes dtypes at run time; capture the model "
                "in the dtype you want instead"
            )
        sub, operands_ = n.args[4], n.args[5:]
    else:
        raise CaptureError(
            f"{name} at {cx.where(n)}: control flow / higher-order ops are not supported"
        )
    gm = cx.lookup(sub)
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    for p, arg in zip(placeholders, operands_):
        cx.env[p] = cx.lookup(arg)
    outs: list = []
    saved = cx.current
    cx.convert_graph(gm.graph, outputs_to=outs)
    cx.current = saved
    return tuple(outs)


class _Drop(Exception):
    pass


_DEFAULT_ENUMS = (torch.strided, torch.preserve_format, torch.contiguous_format)


def emit_fallback(cx, n: fx.Node) -> Any:
    """``n`` as a ``torch_fallback`` node: the call as a JSON template, types from meta."""
    inputs: list[Value] = []

    def enc(x):
        if isinstance(x, fx.Node):
            v = cx.lookup(x)
            if isinstance(v, Value):
                inputs.append(v)
                return {"$in": len(inputs) - 1}
            v = cx.scalar(x)
            if isinstance(v, sympy.Basic):
                raise CaptureError(
                    f"{cx.op_name(n)} at {cx.where(n)} has no IR conversion and takes the "
                    f"symbolic size {v}; it cannot be kept as a torch fallback"
                )
            return v
        if isinstance(x, (list, tuple)):
            return [enc(e) for e in x]
        if isinstance(x, torch.dtype):
            return {"$dtype": str(x).removeprefix("torch.")}
        if isinstance(x, torch.device):
            return str(x)
        if isinstance(x, (torch.layout, torch.memory_format)):
            if x in _DEFAULT_ENUMS:
                raise _Drop
            raise CaptureError(f"{cx.op_name(n)} at {cx.where(n)}: cannot keep argument {x}")
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise CaptureError(f"{cx.op_name(n)} at {cx.where(n)}: cannot encode argument {x!r}")

    try:
        args = [enc(x) for x in n.args]
    except _Drop:
        raise CaptureError(
            f"{cx.op_name(n)} at {cx.where(n)}: cannot keep a positional layout"
        ) from None
    kwargs = {}
    for k, x in n.kwargs.items():
        try:
            kwargs[k] = enc(x)
        except _Drop:
            continue
    val = n.meta.get("val")
    vals = (
        [val]
        if isinstance(val, torch.Tensor)
        else list(val)
        if isinstance(val, (list, tuple))
        else None
    )
    if not vals or not all(isinstance(v, torch.Tensor) for v in vals):
        raise CaptureError(
            f"{cx.op_name(n)} at {cx.where(n)} has no IR conversion and does not "
            "return tensors; it cannot be kept as a torch fallback"
        )
    types: list[TensorType] = [cx.meta_type(n, v) for v in vals]
    target = cx.op_name(n)
    attrs = {"target": target, "args": json.dumps({"args": args, "kwargs": kwargs})}
    out = cx.emit("torch_fallback", inputs, attrs, out_types=types)
    if isinstance(val, torch.Tensor):
        return out
    return [out] if isinstance(out, Value) else list(out)
