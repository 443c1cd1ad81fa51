"""The aten -> IR conversion table, one file per op family.

One entry per aten overload (``add.Tensor``) or packet (``add``), registered with
:func:`~transfuse.frontend.aten.registry.aten` in the family's file. This package imports
every family file below, so the table is complete once the package is imported, whatever
imports it first.

A converter is ``fn(cx, a) -> result`` where ``a`` holds the call's arguments
by schema name (defaults filled in) and ``cx`` is the frontend's converter
(``transfuse.frontend.torch_export._Converter``): ``cx.value(x)`` is the IR
value of a tensor argument, ``cx.dim(x)`` / ``cx.scalar(x)`` a (symbolic)
number, ``cx.out_type()`` torch's type of the node's result, ``cx.op(...)``
creates an IR node carrying the user's source. The result is an IR value, a
list of them (multi-output ops), a python scalar, ``None`` (dropped asserts) or
:data:`FALLBACK` to keep the node as ``torch_fallback``.

Conventions every entry follows:

- shapes of view-like ops (view, reshape, unsqueeze, expand, ...) are read from
  torch's meta output shape, so ``-1`` and SymInt arithmetic are already resolved;
- python scalars in binary ops become 0-d constants of the dtype torch's
  promotion gives them, so the IR-inferred dtype equals torch's;
- negative dims/axes are normalised to positive;
- ops without an entry, or whose arguments the IR cannot express, fall back.

Glossary for attention: B batch, H heads, Hkv kv heads, S query length, T key length, D head dim.
"""

from transfuse.frontend.aten import (  # noqa: F401  (each file registers its converters)
    casts,
    creation,
    elementwise,
    indexing,
    linalg,
    nn,
    reduce,
    shape,
    symbolic,
)
from transfuse.frontend.aten.fallback import convert_higher_order, emit_fallback
from transfuse.frontend.aten.registry import FALLBACK, TABLE, aten, lookup
from transfuse.frontend.aten.symbolic import Opaque

__all__ = ["FALLBACK", "TABLE", "Opaque", "aten", "lookup", "convert_higher_order", "emit_fallback"]
