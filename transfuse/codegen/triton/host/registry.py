"""The triton target's host lowering registry and the context its lowerings write through.

The host program of the triton target is generated Python (like the python target's, and
through the same generator: :mod:`.generator`). Each step of it is one of

- a **fusion group** (:mod:`transfuse.codegen.triton.gen`): a generated Triton kernel;
- a node with a **host lowering** registered here (``@LOWERINGS.register("op")``): a call to a
  hand-written kernel of ``codegen/triton/kernels`` (attention, cached attention, rotary,
  quantized GEMMs) or to cuBLAS through torch (``linear``, ``matmul``), writing its result into
  the buffer the memory plan gave it (``ctx.out(value)``);
- any other node: the python target's emitter (views, indexing, embedding, concat: torch
  calls), the op's reference implementation when that has none.

A host lowering returns the statement's right-hand side, like a python emitter, and writes
every output into ``ctx.out(v)`` (an arena view, or a fresh tensor for a graph output).
``supports(node)`` returns why the kernel cannot take a node (a dtype, an attribute); the
node then goes to the python emitter and the reason is listed in the program's notes.
"""

from __future__ import annotations

from transfuse.codegen.lowering import Lowerings
from transfuse.codegen.python.registry import EmitContext
from transfuse.ir.graph import Node, Value
from transfuse.ir.types import DType

#: every triton host lowering, by IR op
LOWERINGS = Lowerings("triton")

#: activation dtypes the hand-written kernels take
KERNEL_DTYPES = (DType.f16, DType.bf16, DType.f32)


class HostContext(EmitContext):
    """What a host lowering writes through (implemented by :class:`.generator.HostGenerator`)."""

    def out(self, v: Value) -> str:
        """The expression of the tensor ``v`` must be written into (contiguous, ``v``'s shape
        and dtype): its memory-plan view, or a fresh tensor."""
        raise NotImplementedError

    def obj(self, value: object) -> str:
        """An expression naming ``value`` (an object that is no literal: a QuantType), bound
        into the host module once."""
        raise NotImplementedError

    def kernel(self, name: str, node: Node) -> None:
        """Record that ``node`` runs the hand-written kernel ``name`` ("module:function")."""
        raise NotImplementedError


def dtype_reason(node: Node, *indices: int) -> str | None:
    """Why inputs ``indices`` of ``node`` are not of a dtype the kernels take (None: they are)."""
    for i in indices:
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is not None and v.type.dtype not in KERNEL_DTYPES:
            return (f"input {i} (%{v.name}) is {v.type.dtype.name}; the triton kernels take "
                    "f16, bf16 or f32")
    return None


__all__ = ["LOWERINGS", "HostContext", "KERNEL_DTYPES", "dtype_reason"]
