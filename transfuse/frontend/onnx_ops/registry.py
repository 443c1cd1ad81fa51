"""The ONNX -> IR registry: converters by (domain, op type), and the node view they read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
MS = "com.microsoft"

Converter = Callable[[Any, "OnnxNode"], Any]
TABLE: dict[tuple[str, str], Converter] = {}


def onnx_op(*names: str, domain: str = "") -> Callable[[Converter], Converter]:
    """Register a converter for op types of ``domain`` ("" is the default ONNX domain)."""

    def deco(fn: Converter) -> Converter:
        for name in names:
            if (domain, name) in TABLE:
                raise ValueError(f"ONNX op {domain}.{name} registered twice")
            TABLE[(domain, name)] = fn
        return fn

    return deco


def lookup(domain: str, op_type: str) -> Converter | None:
    return TABLE.get(("" if domain == "ai.onnx" else domain, op_type))


def supported_ops() -> list[str]:
    return sorted(f"{d}.{n}" if d else n for d, n in TABLE)


def node_label(n: onnx.NodeProto, index: int) -> str:
    op = f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
    return f"node {n.name!r} ({op})" if n.name else f"node #{index} ({op})"


class Missing:
    """An output transfuse does not produce (an unused optional output); reading it fails."""

    def __init__(self, reason: str):
        self.reason = reason


class OnnxNode:
    """An ONNX node with decoded attributes and its inputs read from the converter."""

    def __init__(self, proto: onnx.NodeProto, index: int, version: int, cx):
        self.proto = proto
        self.op_type = proto.op_type
        self.domain = "" if proto.domain == "ai.onnx" else proto.domain
        self.name = proto.name
        self.version = version
        self.label = node_label(proto, index)
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.attrs = {a.name: _attr(a) for a in proto.attribute}
        self._cx = cx

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def has_input(self, i: int) -> bool:
        return i < len(self.inputs) and bool(self.inputs[i])

    def input(self, i: int) -> Any:
        """The converted input ``i`` (Value or Known), or None when absent."""
        return self._cx.lookup(self.inputs[i]) if self.has_input(i) else None

    def used(self, k: int) -> bool:
        return k < len(self.outputs) and bool(self.outputs[k])


def _attr(a: onnx.AttributeProto) -> Any:
    v = onnx.helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return [x.decode("utf-8", "replace") for x in v]
    return v
