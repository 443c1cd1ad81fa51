"""The work of a candidate fusion group (its *space*) and which nodes may be in one at all.

Two spaces (:class:`GroupSpace`):

- **pointwise**: every member has the same number of elements and is computed in flat
  row-major order; an edge inside the group joins equal shapes or is a reshape (a reshape of
  a member is the identity on the flat index: "contiguous-compatible").
- **row**: M rows of N (the reduced, last dim). Set by a reduction over the last dim
  (``reduce_sum/mean/max/min``), a row op (``softmax``, ``log_softmax``, ``rms_norm``,
  ``layer_norm``, ``add_norm``: reductions inside), or a row scalar broadcast along the last
  dim. A member is a *vector* (M*N elements in flat order: ``L' + [N]``, or a reshape of
  one) or a *row scalar* (M elements: ``L' + [1]``, or ``L'`` for a ``keepdim=False``
  reduction); a row scalar reaches a vector by trailing broadcast only.

A value broadcast into a member along any other dim (``[B, 1, D]`` into ``[B, S, D]``) would be
recomputed per use: :func:`group_space` refuses it with a reason, as it refuses an ``expand``
of a member and two row lengths in one group. :func:`node_problem` says why a node can never
be in a generated kernel (an op that is not pointwise, a reordering view, fp8 values...).

Glossary: M rows, N the row length, L the leading dims.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from transfuse.codegen.triton.gen.ops import (
    POINTWISE,
    REDUCTIONS,
    REORDERING_VIEWS,
    ROW_OPS,
    VIEWS,
    dtype_problem,
    reduction_problem,
    row_levels,
)
from transfuse.ir.graph import Node, Value
from transfuse.ir.types import Dim, dim_product, dim_str, dims_equal

#: rows up to this many elements are held in registers (one pass); longer ones are looped
MAX_ROW_BLOCK = 4096


@dataclasses.dataclass(frozen=True)
class GroupSpace:
    """The work of a group: ``kind`` "pointwise" (``shape``: the shape every member has up to
    reshapes; ``numel`` elements) or "row" (``rows`` M rows of ``row_len`` N elements;
    ``shape`` is ``L + [N]`` of the first row seen; ``roles``: value name -> "vec" / "keep"
    / "drop"). ``levels``: the longest chain of reductions (passes over a looped row)."""

    kind: str
    shape: tuple[Dim, ...]
    numel: Dim
    rows: Dim | None = None
    row_len: Dim | None = None
    roles: dict[str, str] = dataclasses.field(default_factory=dict)
    levels: int = 0

    def role(self, v: Value) -> str:
        """"vec" / "keep" / "drop" in a row group; "flat" in a pointwise one."""
        return self.roles.get(v.name, "flat")


def shape_text(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join(dim_str(d) for d in shape) + "]"


def _eq(a: Sequence[Dim], b: Sequence[Dim]) -> bool:
    return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))


def is_reducing(node: Node) -> bool:
    """A reduction over the last dim or a row op (reductions inside)."""
    return node.op in REDUCTIONS or node.op in ROW_OPS


def _member_inputs(node: Node, members: set[int]) -> list[Value]:
    return [u for u in node.inputs
            if u is not None and u.producer is not None and id(u.producer) in members]


def group_space(nodes: Sequence[Node]) -> GroupSpace | str:
    """The space of the group ``nodes`` (topological order), or why they cannot be one kernel."""
    members = {id(n) for n in nodes}
    n_len: Dim | None = None
    m_rows: Dim | None = None
    first: tuple[Dim, ...] = ()

    def row(shape: Sequence[Dim], what: str) -> str | None:
        nonlocal n_len, m_rows, first
        length, count = shape[-1], dim_product(shape[:-1])
        if n_len is None:
            n_len, m_rows, first = length, count, tuple(shape)
            return None
        if not (dims_equal(length, n_len) and dims_equal(count, m_rows)):
            return (f"shape mismatch: {what} works on rows {shape_text(shape)}, the group on "
                    f"{dim_str(m_rows)} rows of {dim_str(n_len)}")
        return None

    # -- the rows: set by reductions, row ops and trailing broadcasts of member values ----
    for node in nodes:
        out = node.outputs[0]
        if is_reducing(node):
            vec = node.inputs[0] if node.op in REDUCTIONS else out
            bad = row(vec.shape, f"{node.op} %{out.name}")
            if bad:
                return bad
            continue
        for u in _member_inputs(node, members):
            if node.op in VIEWS:
                if node.op == "expand":
                    return (f"expand %{out.name} of the fused value %{u.name}: its elements "
                            f"would be recomputed per use")
                continue
            if _eq(u.shape, out.shape):
                continue
            if (u.type.rank == out.type.rank and u.type.rank >= 1 and u.shape[-1] == 1
                    and _eq(u.shape[:-1], out.shape[:-1])):
                bad = row(out.shape, f"{node.op} %{out.name}")
                if bad:
                    return bad
                continue
            return (f"shape mismatch: %{u.name} {shape_text(u.shape)} is broadcast into "
                    f"%{out.name} {shape_text(out.shape)} along a non-trailing dim (it would "
                    f"be recomputed per use)")
    values = [v for n in nodes for v in n.outputs]
    last = nodes[-1].outputs[0]
    if n_len is None:
        for v in values:
            if not dims_equal(v.type.numel(), last.type.numel()):
                return (f"shape mismatch: %{v.name} {shape_text(v.shape)} and %{last.name} "
                        f"{shape_text(last.shape)} differ in size")
        return GroupSpace("pointwise", tuple(last.shape), last.type.numel())

    # -- a row group: every member value is a vector or a row scalar ----------------------
    roles: dict[str, str] = {}
    for node in nodes:
        for v in node.outputs:
            s = v.shape
            if node.op in REDUCTIONS:
                role = "keep" if node.attrs["keepdim"] else "drop"
            elif dims_equal(dim_product(s), dim_product([m_rows, n_len])) and \
                    not (isinstance(n_len, int) and n_len == 1):
                role = "vec"
            elif s and s[-1] == 1 and dims_equal(dim_product(s[:-1]), m_rows):
                role = "keep"
            elif dims_equal(dim_product(s), m_rows):
                role = "drop"
            else:
                return (f"shape mismatch: %{v.name} {shape_text(s)} is neither a row of "
                        f"{dim_str(n_len)} nor a row scalar of the group's {dim_str(m_rows)} "
                        f"rows")
            roles[v.name] = role
    levels: dict[str, int] = {}
    for node in nodes:
        out = node.outputs[0]
        ins = _member_inputs(node, members)
        level = max((levels[u.name] for u in ins), default=0)
        if is_reducing(node):
            for u in ins:
                if roles[u.name] != "vec" or (node.op not in REDUCTIONS and
                                              not _eq(u.shape, out.shape)):
                    return (f"{node.op} %{out.name} takes %{u.name} {shape_text(u.shape)}: "
                            f"not a row of the group")
            level += row_levels(node)
        for u in ins:
            a, b = roles[u.name], roles[out.name]
            if is_reducing(node) or a == b:
                continue
            if a == "keep" and b == "vec" and dims_equal(out.shape[-1], n_len):
                continue
            if node.op == "reshape" and a != "vec" and b != "vec":
                continue
            return (f"shape mismatch: %{u.name} {shape_text(u.shape)} is broadcast into "
                    f"%{out.name} {shape_text(out.shape)} along a non-trailing dim")
        for v in node.outputs:
            levels[v.name] = level
    return GroupSpace("row", first, dim_product(first), m_rows, n_len, roles,
                      max(levels.values(), default=0))


def node_problem(node: Node) -> str | None:
    """Why ``node`` can never be in a generated kernel (None when it may)."""
    op = node.op
    if op in REORDERING_VIEWS:
        return f"view '{op}' reorders elements: not contiguous-compatible"
    if not (op in POINTWISE or op in REDUCTIONS or op in ROW_OPS or op in VIEWS):
        return f"op '{op}' is not pointwise"
    if len(node.outputs) != 1 and op != "add_norm":
        return f"op '{op}' has {len(node.outputs)} outputs"
    for v in list(node.inputs) + list(node.outputs):
        if v is not None and dtype_problem(v):
            return dtype_problem(v)
    if op in POINTWISE:
        return POINTWISE.supports(node)
    if op in VIEWS:
        return None
    return reduction_problem(node)


def is_compute(node: Node) -> bool:
    """True for a node that computes (not a view)."""
    return node.op not in VIEWS


__all__ = ["GroupSpace", "group_space", "node_problem", "is_compute", "is_reducing",
           "shape_text", "MAX_ROW_BLOCK"]
