"""Fusion groups: which IR nodes one generated Triton kernel computes.

A group is a set of nodes one kernel computes: a **pointwise** chain (elementwise ops,
broadcast operands, casts, ``where``, activations, contiguous reshapes) or a **row** group
(the same around reductions over the last dim and row ops: ``softmax``, ``rms_norm``,
``layer_norm``, ``add_norm``; softmax and norms written out of primitive ops are row groups
too). What a group's work is, and which nodes can never be in one: :mod:`.space`.

Glossary: M rows, N the row length (the reduced, last dim), L the leading dims.

How groups are chosen (the model: torch/_inductor/scheduler.py): nodes are visited in
topological order; a fusible node starts a group of its own and is then merged with the
groups of its producers, most bytes saved first, when three checks pass:

1. **shapes** (:func:`group_space`): every edge inside the group is one the kernel can index
   without recomputing a value: equal shapes, a reshape (contiguous-compatible: members are
   computed in flat row-major order), a reduction of a vector, or a row scalar broadcast
   along the last dim.
   A value broadcast along any other dim would be recomputed per use: refused ("shape
   mismatch: ... broadcast along a non-trailing dim").
2. **no cycle**: no path may leave the merged group and come back into it (through other
   nodes, or through other groups, which run as one kernel each). A search from the
   group's users, jumping through whole groups, restricted to the nodes visited so far
   (every group lies among them: a later node cannot lead back).
3. **bytes** (the cost model): a node's unfused traffic is its tensor inputs read and its
   outputs written (views move nothing); a group's is its external inputs read (once per
   pass over a row for looped rows longer than :data:`MAX_ROW_BLOCK`) and the values it
   must still write (used outside it, or graph outputs). A merge happens when the merged
   group moves fewer bytes than the two apart (a view merges at no gain: it costs nothing).
   Symbolic sizes are compared at :data:`HINT` per symbol; the exact saving is kept.

After the walk, groups that read the same tensor are merged under the same three checks
(siblings: the tensor is read once, one launch instead of two).

Nodes that are not fused say why (:attr:`Partition.reasons`): "op 'linear' is not
pointwise", "would create a cycle via %x (linear)", "shape mismatch: ...", "view 'permute'
reorders elements: not contiguous-compatible". Literals (one-element constants, ``full``,
pointwise ops of literals) are written into the kernels that read them and are not members.
A group with no computation (a lone reshape) is left to the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from transfuse.codegen.triton.gen.ops import literal_value
from transfuse.codegen.triton.gen.space import (
    MAX_ROW_BLOCK,
    GroupSpace,
    group_space,
    is_compute,
    node_problem,
)
from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.types import Dim, dim_str, normalize_dim

#: the value each symbolic dim takes when byte counts are compared
HINT = 256


# -- groups ---------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Group:
    """One generated kernel's worth of IR nodes.

    ``nodes`` in topological order; ``inputs``: the tensors it reads (graph inputs,
    constants, other nodes' outputs; literals are written into the source instead), in
    first-use order; ``outputs``: the member values it writes (used after it or graph
    outputs), in node order. ``bytes_saved = bytes_unfused - bytes_fused`` (symbolic; the
    ``_hint`` at :data:`HINT` per symbol). ``why_not``: its neighbours (producers of its
    inputs, users of its values) that are not in it, with the reason.
    """

    id: int
    nodes: list[Node]
    space: GroupSpace
    inputs: list[Value]
    outputs: list[Value]
    bytes_unfused: Dim
    bytes_fused: Dim
    why_not: list[tuple[Node, str]] = dataclasses.field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.space.kind

    @property
    def bytes_saved(self) -> Dim:
        return _norm(self.bytes_unfused - self.bytes_fused)

    @property
    def bytes_saved_hint(self) -> int:
        return hint(self.bytes_saved)

    @property
    def ops(self) -> list[str]:
        """The computing ops in order, repeats next to each other collapsed."""
        out: list[str] = []
        for n in self.nodes:
            if is_compute(n):
                op = n.op.removeprefix("reduce_")
                if not out or out[-1] != op:
                    out.append(op)
        return out

    @property
    def label(self) -> str:
        """``fused_add_gelu_add``: what the kernel fuses (at most 6 ops named)."""
        ops = self.ops
        text = "_".join(ops[:6]) + (f"_and{len(ops) - 6}" if len(ops) > 6 else "")
        return f"fused_{text}"

    def __repr__(self) -> str:
        return (f"<group {self.id} {self.label} {self.kind} {len(self.nodes)} nodes, "
                f"saves {dim_str(self.bytes_saved)} B>")


@dataclasses.dataclass
class Partition:
    """The groups of a graph, the nodes left to the host and why they were not fused."""

    graph: Graph
    groups: list[Group]
    #: node -> why it is not in a group / not in its producers' group
    reasons: dict[Node, list[str]]
    #: literal nodes: written into the kernels that read them (the host runs them only for
    #: other users)
    inlined: list[Node]

    def group_of(self, node: Node) -> Group | None:
        """The group ``node`` is in (None: the host runs it)."""
        for g in self.groups:
            if any(n is node for n in g.nodes):
                return g
        return None

    def why_not(self, node: Node) -> str:
        """Every recorded reason for ``node``, joined (empty when it was fused freely)."""
        return "; ".join(self.reasons.get(node, []))

    def schedule(self) -> list[Group | Node]:
        """Groups and the nodes outside every group (literals included), in an order that
        respects every dependency: what a host program runs, one step each."""
        order = {id(n): i for i, n in enumerate(self.graph.nodes)}
        unit_of: dict[int, Any] = {}
        units: list[Any] = []
        for g in self.groups:
            units.append(g)
            for n in g.nodes:
                unit_of[id(n)] = g
        for n in self.graph.nodes:
            if id(n) not in unit_of:
                units.append(n)
                unit_of[id(n)] = n
        deps: dict[int, set[int]] = {id(u): set() for u in units}
        users: dict[int, list[Any]] = {id(u): [] for u in units}
        for n in self.graph.nodes:
            mine = unit_of[id(n)]
            for v in n.inputs:
                if v is None or v.producer is None:
                    continue
                src = unit_of[id(v.producer)]
                if src is not mine and id(src) not in deps[id(mine)]:
                    deps[id(mine)].add(id(src))
                    users[id(src)].append(mine)

        def first(u: Any) -> int:
            return min(order[id(n)] for n in u.nodes) if isinstance(u, Group) else order[id(u)]

        import heapq

        ready = [(first(u), i, u) for i, u in enumerate(units) if not deps[id(u)]]
        heapq.heapify(ready)
        index = {id(u): i for i, u in enumerate(units)}
        out: list[Any] = []
        while ready:
            _, _, u = heapq.heappop(ready)
            out.append(u)
            for w in users[id(u)]:
                deps[id(w)].discard(id(u))
                if not deps[id(w)]:
                    heapq.heappush(ready, (first(w), index[id(w)], w))
        if len(out) != len(units):  # pragma: no cover - merges keep the quotient acyclic
            raise AssertionError("fusion groups form a cycle")
        return out


def _norm(d: Any) -> Dim:
    return d if isinstance(d, int) else normalize_dim(d) if d.free_symbols else int(d)


def hint(d: Dim) -> int:
    """``d`` with every symbol at :data:`HINT`."""
    if isinstance(d, int):
        return d
    return int(d.subs({s: HINT for s in d.free_symbols}))


# -- the partitioner -------------------------------------------------------------------------


class _Partitioner:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.order = {id(n): i for i, n in enumerate(graph.nodes)}
        self.memo: dict[int, Any] = {}
        self.group_of: dict[int, list[Node]] = {}  # node -> its (shared) member list
        self.reasons: dict[Node, list[str]] = {}
        self.inlined: list[Node] = []
        self.outputs = {id(v) for v in graph.outputs}
        # refused merges: (the node being placed, the candidate group then, why)
        self.events: list[tuple[Node, list[Node], str]] = []
        self.hints: dict[int, int] = {}
        self.spaces: dict[int, tuple[list[Node], GroupSpace | str]] = {}

    def literal(self, v: Value | None) -> bool:
        return v is not None and literal_value(v, self.memo) is not None

    def note(self, node: Node, reason: str) -> None:
        self.reasons.setdefault(node, [])
        if reason not in self.reasons[node]:
            self.reasons[node].append(reason)

    # -- bytes ---------------------------------------------------------------------------

    def tensor_inputs(self, node: Node) -> list[Value]:
        seen: dict[int, Value] = {}
        for v in node.inputs:
            if v is not None and not self.literal(v):
                seen.setdefault(id(v), v)
        return list(seen.values())

    def nbytes(self, v: Value, exact: bool) -> Dim:
        """``v``'s bytes: exact (symbolic), or at :data:`HINT` per symbol (cached ints, what
        merge decisions compare)."""
        if exact:
            return v.type.nbytes()
        key = id(v)
        if key not in self.hints:
            self.hints[key] = hint(v.type.nbytes())
        return self.hints[key]

    def node_bytes(self, node: Node, exact: bool = False) -> Dim:
        if not is_compute(node):
            return 0
        total: Any = sum((self.nbytes(v, exact) for v in self.tensor_inputs(node)), 0)
        return _norm(total + sum((self.nbytes(v, exact) for v in node.outputs), 0))

    def boundary(self, nodes: Sequence[Node]) -> tuple[list[Value], list[Value]]:
        ids = {id(n) for n in nodes}
        ins: dict[int, Value] = {}
        outs: list[Value] = []
        for n in nodes:
            for v in self.tensor_inputs(n):
                if v.producer is None or id(v.producer) not in ids:
                    ins.setdefault(id(v), v)
            for v in n.outputs:
                if id(v) in self.outputs or any(id(u) not in ids for u, _ in v.uses):
                    outs.append(v)
        return list(ins.values()), outs

    def fused_bytes(self, nodes: Sequence[Node], space: GroupSpace, exact: bool = False) -> Dim:
        ins, outs = self.boundary(nodes)
        passes = 1
        if space.kind == "row" and isinstance(space.row_len, int) and \
                space.row_len > MAX_ROW_BLOCK:
            passes = space.levels + 1
        total: Any = sum((self.nbytes(v, exact) for v in ins), 0) * passes
        return _norm(total + sum((self.nbytes(v, exact) for v in outs), 0))

    def saved(self, nodes: Sequence[Node], space: GroupSpace) -> int:
        """Bytes saved by running ``nodes`` as one kernel, at :data:`HINT` per symbol."""
        unfused = sum(self.node_bytes(n) for n in nodes)
        return int(unfused) - int(self.fused_bytes(nodes, space))

    def space(self, nodes: list[Node]) -> GroupSpace | str:
        """group_space(nodes), cached for the member lists of existing groups."""
        hit = self.spaces.get(id(nodes))
        if hit is not None and hit[0] is nodes:
            return hit[1]
        space = group_space(nodes)
        self.spaces[id(nodes)] = (nodes, space)
        return space

    # -- legality -------------------------------------------------------------------------

    def cycle_via(self, nodes: Sequence[Node], limit: int) -> Node | None:
        """A node outside ``nodes`` on a path from them back into them (None: no cycle).
        Groups are atomic: reaching one member reaches the users of all of them."""
        ids = {id(n) for n in nodes}
        seen: set[int] = set()
        stack = [u for n in nodes for v in n.outputs for u in v.users
                 if id(u) not in ids and self.order[id(u)] <= limit]
        while stack:
            y = stack.pop()
            if id(y) in seen:
                continue
            unit = self.group_of.get(id(y), [y])
            seen.update(id(m) for m in unit)
            for m in unit:
                for v in m.outputs:
                    for u in v.users:
                        if id(u) in ids:
                            return m
                        if id(u) not in seen and self.order[id(u)] <= limit:
                            stack.append(u)
        return None

    def try_merge(self, a: list[Node], b: list[Node], limit: int) -> tuple[list[Node] | None, str]:
        merged = sorted(a + b, key=lambda n: self.order[id(n)])
        space = self.space(merged)
        if isinstance(space, str):
            return None, space
        via = self.cycle_via(merged, limit)
        if via is not None:
            return None, f"would create a cycle via %{via.outputs[0].name} ({via.op})"
        sa, sb = self.space(a), self.space(b)
        assert not isinstance(sa, str) and not isinstance(sb, str)
        delta = self.saved(merged, space) - self.saved(a, sa) - self.saved(b, sb)
        views = not any(map(is_compute, a)) or not any(map(is_compute, b))
        if delta < 0 or (delta == 0 and not views):
            return None, f"no bytes saved ({delta} B at {HINT} per symbol)"
        return merged, ""

    # -- the walk -------------------------------------------------------------------------

    def run(self) -> Partition:
        for node in self.graph.nodes:
            if len(node.outputs) == 1 and self.literal(node.outputs[0]):
                self.inlined.append(node)
                continue
            problem = node_problem(node)
            if problem:
                self.note(node, problem)
                continue
            if not any(v.uses or id(v) in self.outputs for v in node.outputs):
                self.note(node, "unused: nothing reads it")
                continue
            limit = self.order[id(node)]
            group = [node]
            space = group_space(group)
            if isinstance(space, str):
                self.note(node, space)
                continue
            for cand in self.candidates(node):
                merged, reason = self.try_merge(group, cand, limit)
                if merged is None:
                    self.note(node, f"not fused with {self.describe(cand)}: {reason}")
                    self.events.append((node, list(cand), reason))
                    continue
                group = merged
            for n in group:
                self.group_of[id(n)] = group
        self.horizontal()
        return self.finish()

    def horizontal(self) -> None:
        """Merge groups that read the same tensor (siblings: the tensor is read once)."""
        limit = len(self.order)
        for v in self.graph.values():
            groups: list[list[Node]] = []
            for u in v.users:
                g = self.group_of.get(id(u))
                if g is not None and all(g is not h for h in groups):
                    groups.append(g)
            if len(groups) < 2 or self.literal(v):
                continue
            base = groups[0]
            for other in groups[1:]:
                other = self.group_of[id(other[0])]
                if other is base:
                    continue
                merged, _ = self.try_merge(base, other, limit)
                if merged is not None:
                    for n in merged:
                        self.group_of[id(n)] = merged
                    base = merged

    def candidates(self, node: Node) -> list[list[Node]]:
        """The groups of ``node``'s producers, the most bytes saved first."""
        seen: dict[int, list[Node]] = {}
        for v in node.inputs:
            if v is not None and v.producer is not None and id(v.producer) in self.group_of:
                g = self.group_of[id(v.producer)]
                seen.setdefault(id(g), g)
        groups = list(seen.values())
        if len(groups) < 2:
            return groups

        def gain(g: list[Node]) -> int:
            return sum(hint(v.type.nbytes()) for v in node.inputs
                       if v is not None and v.producer is not None and
                       self.group_of.get(id(v.producer)) is g)

        return sorted(groups, key=lambda g: -gain(g))

    def neighbour_reasons(self, g: Group) -> list[tuple[Node, str]]:
        """Why each producer of ``g``'s inputs and user of its values is not in ``g``."""
        ids = {id(n) for n in g.nodes}
        out: list[tuple[Node, str]] = []
        seen: set[int] = set()
        neighbours = [v.producer for v in g.inputs if v.producer is not None] + \
                     [u for v in g.outputs for u in v.users]
        for n in neighbours:
            if id(n) in ids or id(n) in seen:
                continue
            seen.add(id(n))
            found = [r for who, cand, r in self.events
                     if (id(who) in ids and any(c is n for c in cand))
                     or (who is n and any(id(c) in ids for c in cand))]
            if not found:
                problem = node_problem(n)
                found = [problem] if problem else self.reasons.get(n, []) or \
                    ["a literal: written into the kernel" if n in self.inlined
                     else "in another group"]
            out.extend((n, r) for r in dict.fromkeys(found))
        return out

    def describe(self, nodes: Sequence[Node]) -> str:
        names = ", ".join(f"%{n.outputs[0].name}" for n in nodes[:3])
        return f"the group of {names}{', ...' if len(nodes) > 3 else ''}"

    def finish(self) -> Partition:
        unique: dict[int, list[Node]] = {}
        for g in self.group_of.values():
            unique.setdefault(id(g), g)
        groups: list[Group] = []
        for nodes in sorted(unique.values(), key=lambda g: self.order[id(g[0])]):
            if not any(map(is_compute, nodes)):
                for n in nodes:
                    self.note(n, "a view with no pointwise op to fuse with: left to the host")
                continue
            space = group_space(nodes)
            assert not isinstance(space, str)
            ins, outs = self.boundary(nodes)
            unfused = _norm(sum((self.node_bytes(n, exact=True) for n in nodes), 0))
            groups.append(Group(len(groups), list(nodes), space, ins, outs, unfused,
                                self.fused_bytes(nodes, space, exact=True)))
        for g in groups:
            g.why_not = self.neighbour_reasons(g)
        return Partition(self.graph, groups, self.reasons, self.inlined)


def partition(graph: Graph) -> Partition:
    """Fusion groups of ``graph`` (see the module docstring) and the reasons for the rest."""
    return _Partitioner(graph).run()


def fusion_groups(graph: Graph) -> list[Group]:
    """The fusion groups of ``graph``: ``partition(graph).groups``."""
    return partition(graph).groups


def describe(groups: Iterable[Group]) -> str:
    """One line per group: name, kind, nodes, bytes saved (for logs)."""
    return "\n".join(
        f"{g.label} ({g.kind}): {', '.join('%' + n.outputs[0].name for n in g.nodes)}; "
        f"saves {dim_str(g.bytes_saved)} B" for g in groups)


__all__ = ["Group", "Partition", "partition", "fusion_groups", "hint", "describe", "HINT"]
