"""The python backend's lowering registry and the context its lowerings write through.

A python lowering (an "emitter") turns one node into the right-hand side of one Python
statement made of direct torch calls (``F.layer_norm(x, (768,), w, b, 1e-05)``). It is
registered on :data:`LOWERINGS` (the generic registry of ``codegen/lowering.py``) with
``@LOWERINGS.register("op", supports=...)`` in the file of its op family
(``elementwise.py``, ``linalg.py``, ``misc.py``, ``nn.py``, ``attention.py``, ``reduce.py``,
``shape.py``, ``fused.py``; the package ``__init__`` imports them all). ``supports(node)``
returns a reason when the emitter cannot express the node faithfully, and the backend
then calls the op's reference implementation instead (counted, never an error). An op
with no emitter at all takes the same road.

Emitters only read the node. Everything that becomes source text goes through
:class:`EmitContext` (value names, dims, literals), which guarantees that no
string from the graph reaches the source other than as a ``repr()`` literal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from transfuse.codegen.lowering import Lowerings
from transfuse.errors import LoweringError
from transfuse.ir.graph import Node, Value
from transfuse.ir.types import Dim, DType

#: every python emitter, by IR op
LOWERINGS = Lowerings("python")

# -- the context an emitter writes through ------------------------------------------


class EmitContext:
    """Source-text services for emitters; implemented by the generator in ``generator.py``."""

    def name(self, v: Value | None) -> str:
        """The Python name of a value (``"None"`` for a missing optional input)."""
        raise NotImplementedError

    def dim(self, d: Dim) -> str:
        """A dimension as a Python expression over the bound symbols."""
        raise NotImplementedError

    def hoist(self, expr: str, hint: str) -> str:
        """Bind ``expr`` to a local once, in a statement before this node's; return its name.

        The same expression text hoisted again (a later node) reuses the local, so e.g. one
        attention mask serves every layer of a call.
        """
        raise NotImplementedError

    def helper(self, name: str) -> str:
        """``name`` of a function the generated code calls (``helpers.py``), recorded as used."""
        raise NotImplementedError

    # -- helpers built on the two above ----------------------------------------------

    def dims(self, ds: Sequence[Dim]) -> str:
        """``(a, b, seq)`` — a tuple expression (``()`` when empty)."""
        items = [self.dim(d) for d in ds]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"

    def args(self, ds: Sequence[Dim]) -> str:
        """``a, b, seq`` for varargs methods (``reshape``/``expand``); ``()`` when empty."""
        return ", ".join(self.dim(d) for d in ds) if ds else "()"

    @staticmethod
    def lit(value: Any) -> str:
        """A Python literal for an attribute value (never raw text from the graph)."""
        return literal(value)


def literal(value: Any) -> str:
    """Python source for a plain attribute value: numbers, bools, None, strings, dtypes, tuples."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return repr(int(value))
    if isinstance(value, float):
        if math.isfinite(value):
            return repr(value)
        return f"float({repr(str(value))})"  # float('inf'), float('nan')
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, DType):
        return dtype_literal(value)
    if isinstance(value, torch.dtype):
        return dtype_literal(DType.from_torch(value))
    if isinstance(value, (tuple, list)):
        items = [literal(v) for v in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    raise LoweringError(f"python backend: cannot write attribute value {value!r} "
                        f"({type(value).__name__}) as a literal")


def dtype_literal(d: DType) -> str:
    """``torch.float32``-style source for an IR dtype."""
    return "torch." + str(d.torch).removeprefix("torch.")


def arg(ctx: EmitContext, node: Node, i: int = 0) -> str:
    """The Python name of ``node``'s ``i``-th input (``"None"`` when it has fewer inputs)."""
    return ctx.name(node.inputs[i]) if i < len(node.inputs) else "None"


def norm_shape(ctx: EmitContext, node: Node, x_expr: str | None = None) -> str:
    """The normalized shape of a norm node (the last ``normalized_ndim`` dims of its output):
    a literal when static, else ``x.shape[-nd:]`` of ``x_expr`` (the node's first input
    unless given)."""
    out = node.outputs[0].type
    nd = node.attrs["normalized_ndim"]
    dims = out.shape[out.rank - nd:]
    if all(isinstance(d, int) for d in dims):
        return ctx.dims(dims)
    return f"{x_expr or ctx.name(node.inputs[0])}.shape[-{nd}:]"


__all__ = ["LOWERINGS", "EmitContext", "literal", "dtype_literal", "arg", "norm_shape"]
