"""cleanup.eliminate-common-subexpressions: compute each thing once.

Rewrites (rule ids):

- ``cse/node``: two pure nodes with the same op, the same inputs (in any
  order for commutative ops: add, mul, eq, ne, logical and/or/xor) and
  structurally equal attrs (floats by ``repr``, dims by their text) are one;
  the later node's uses move to the earlier one and it is erased;
- ``cse/constant``: constants that are the same tensor (same storage, shape,
  strides, dtype: tied weights) or small (at most :data:`MAX_HASH_ELEMENTS`
  elements) and bitwise identical are merged into the first one. Big weights
  are never read.

Needs: nothing. Guarantees: bit-identical outputs; impure nodes
(``assert``, training ``dropout``, ops that write inputs in place:
``OpDef.mutates``, e.g. ``cached_attention``) are never merged; the kept node is the
earliest, so the topological order stays valid.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch

from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.ops import get_op
from transfuse.ir.types import DType, dim_str
from transfuse.passes.base import Pass, PassContext, is_pure

#: constants with at most this many elements are compared by value: scalars only, so that
#: parameters that happen to be equal (fresh norm weights) keep their own names
MAX_HASH_ELEMENTS = 1

#: ops whose two inputs may be swapped without changing a single bit of the result
COMMUTATIVE = frozenset({"add", "mul", "eq", "ne", "logical_and", "logical_or", "logical_xor"})


def freeze(value: Any) -> Any:
    """A hashable, structural key for an attribute value."""
    if value is None:
        return None
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int):
        return ("i", value)
    if isinstance(value, float):
        return ("f", repr(value))
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, DType):
        return ("t", value.value)
    if isinstance(value, sympy.Basic):
        return ("d", dim_str(value))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    return ("r", type(value).__name__, repr(value))


def node_key(node: Node) -> tuple:
    """What makes two pure nodes compute the same outputs."""
    ins = tuple(None if v is None else id(v) for v in node.inputs)
    if node.op in COMMUTATIVE and len(ins) == 2:
        ins = tuple(sorted(ins, key=lambda i: -1 if i is None else i))
    attrs = tuple(sorted((k, freeze(v)) for k, v in node.attrs.items()))
    key: tuple = (node.op, ins, attrs, len(node.outputs))
    if get_op(node.op).infer is None:  # types come from capture: they are part of the meaning
        key += (tuple(str(v.type) for v in node.outputs),)
    return key


def _const_key(v: Value) -> tuple | None:
    t = v.const
    if t is None:
        return None
    if t.numel() <= MAX_HASH_ELEMENTS:
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return ("value", str(t.dtype), tuple(t.shape), data)
    if t.device.type == "meta":
        return None
    return ("storage", t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(),
            str(t.dtype), tuple(t.shape), t.stride())


class EliminateCommonSubexpressions(Pass):
    """Merge pure nodes that compute the same thing, and duplicate constants."""

    name = "cleanup.eliminate-common-subexpressions"
    rules = ("cse/constant", "cse/node")

    def run(self, graph: Graph, ctx: PassContext) -> None:
        self._constants(graph, ctx)
        seen: dict[tuple, Node] = {}
        for node in graph.nodes:
            if not node.outputs or not is_pure(node):
                continue
            ctx.attempt("cse/node")
            key = node_key(node)
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            ctx.rewrite("cse/node", [node])
            for old, new in zip(node.outputs, first.outputs):
                graph.replace_all_uses(old, new)
            graph.erase(node)

    def _constants(self, graph: Graph, ctx: PassContext) -> None:
        seen: dict[tuple, Value] = {}
        dups: list[tuple[Value, Value]] = []
        for v in graph.constants.values():
            key = _const_key(v)
            if key is None:
                continue
            ctx.attempt("cse/constant")
            first = seen.setdefault(key, v)
            if first is not v:
                dups.append((v, first))
        for dup, first in dups:
            ctx.count("cse/constant")
            graph.replace_all_uses(dup, first)
            del graph.constants[dup.name]
