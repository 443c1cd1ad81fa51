"""The IR graph: values, nodes and the graph that owns them.

Ownership: a :class:`Graph` owns its nodes (kept in topological order in a
doubly linked list) and its values. A :class:`Value` knows its producer (a node
and output index, or nothing for graph inputs and constants) and its uses, a
list of ``(node, input_index)`` pairs kept up to date by the graph: every edit
goes through ``Graph`` methods, never by assigning lists by hand.

Constants are values with a ``const`` tensor payload (weights included); they
are owned by the graph (``graph.constants``), not by a node.

Iterating ``graph.nodes`` while inserting or erasing is safe: the iterator
remembers the next node before yielding the current one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from transfuse.errors import IRVerifyError
from transfuse.ir.types import DType, QuantType, TensorType


class Value:
    """An SSA value: a graph input, a constant, or an output of a node."""

    __slots__ = ("name", "type", "producer", "index", "uses", "const", "graph")

    def __init__(self, graph: Graph, name: str, type: TensorType):
        self.graph = graph
        self.name = name
        self.type = type
        self.producer: Node | None = None
        self.index = 0
        self.uses: list[tuple[Node, int]] = []
        self.const: torch.Tensor | None = None

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def is_input(self) -> bool:
        return self.producer is None and self.const is None

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    @property
    def shape(self):
        return self.type.shape

    @property
    def users(self) -> list[Node]:
        """Distinct user nodes, in use order."""
        seen: dict[int, Node] = {}
        for n, _ in self.uses:
            seen.setdefault(id(n), n)
        return list(seen.values())

    @property
    def num_uses(self) -> int:
        """Uses by nodes plus uses as a graph output."""
        return len(self.uses) + sum(1 for o in self.graph.outputs if o is self)

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """One operation: ``op`` applied to ``inputs`` with frozen ``attrs``.

    ``meta`` holds provenance: ``source`` (the user's module path), ``loc``
    (file:line of the user's code), ``origin`` (``pass/rule`` that created it).
    """

    __slots__ = ("op", "inputs", "outputs", "attrs", "meta", "graph", "_prev", "_next", "_erased")

    def __init__(self, graph: Graph, op: str, attrs: dict[str, Any]):
        self.graph = graph
        self.op = op
        self.inputs: tuple[Value | None, ...] = ()
        self.outputs: tuple[Value, ...] = ()
        self.attrs: dict[str, Any] = dict(attrs)
        self.meta: dict[str, Any] = {}
        self._prev: Node | None = None
        self._next: Node | None = None
        self._erased = False

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise IRVerifyError(f"node {self.op} has {len(self.outputs)} outputs, not one")
        return self.outputs[0]

    @property
    def source(self) -> str:
        return self.meta.get("source", "")

    @property
    def is_erased(self) -> bool:
        """True once the node was erased from its graph (a stale reference a pass may still hold)."""
        return self._erased

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def __repr__(self) -> str:
        outs = ", ".join(f"%{v.name}" for v in self.outputs)
        ins = ", ".join("None" if v is None else f"%{v.name}" for v in self.inputs)
        return f"<{outs} = {self.op}({ins})>"


class _NodeList:
    """Doubly linked list of nodes with sentinel; iteration tolerates edits."""

    def __init__(self, graph: Graph):
        self._root = Node(graph, "<root>", {})
        self._root._prev = self._root._next = self._root
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Node]:
        cur = self._root._next
        while cur is not self._root:
            nxt = cur._next
            if not cur._erased:
                yield cur
            cur = nxt

    def __reversed__(self) -> Iterator[Node]:
        cur = self._root._prev
        while cur is not self._root:
            prv = cur._prev
            if not cur._erased:
                yield cur
            cur = prv

    def insert_after(self, anchor: Node | None, node: Node) -> None:
        a = self._root if anchor is None else anchor
        node._prev, node._next = a, a._next
        a._next._prev = node
        a._next = node
        self._len += 1

    def insert_before(self, anchor: Node | None, node: Node) -> None:
        a = self._root if anchor is None else anchor
        self.insert_after(a._prev if a._prev is not self._root else None, node)

    def append(self, node: Node) -> None:
        self.insert_after(self._root._prev if self._root._prev is not self._root else None, node)

    def remove(self, node: Node) -> None:
        node._prev._next = node._next
        node._next._prev = node._prev
        node._erased = True
        self._len -= 1


class Graph:
    """A function: named inputs, constants, nodes in topological order, outputs."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.constants: dict[str, Value] = {}
        self.nodes = _NodeList(self)
        self.meta: dict[str, Any] = {}
        self._names: set[str] = set()
        self._next_id = 0
        self._insert_point: tuple[str, Node | None] = ("end", None)
        # objects with on_create(node) / on_erase(node) and, optionally, on_rewire(node):
        # called when an input of ``node`` is rewired, with ``None`` when the graph outputs change
        self.listeners: list[Any] = []

    # -- naming ---------------------------------------------------------------

    def _claim(self, name: str) -> str:
        """Reserve ``name`` exactly; a name already in use is an error."""
        if name in self._names:
            raise IRVerifyError(f"graph {self.name}: value name %{name} is already in use")
        self._names.add(name)
        return name

    def fresh_name(self, hint: str | None = None) -> str:
        if hint:
            base = "".join(c if (c.isalnum() or c == "_") else "_" for c in hint)
            if base and not base[0].isdigit() and base not in self._names:
                self._names.add(base)
                return base
        while True:
            n, self._next_id = self._next_id, self._next_id + 1
            name = f"{hint}_{n}" if hint else str(n)
            name = "".join(c if (c.isalnum() or c == "_") else "_" for c in name)
            if name not in self._names:
                self._names.add(name)
                return name

    # -- values ---------------------------------------------------------------

    def add_input(self, name: str, type: TensorType, *, exact: bool = False) -> Value:
        """Append a graph input named after ``name`` (exactly ``name`` with ``exact=True``)."""
        v = Value(self, self._claim(name) if exact else self.fresh_name(name), type)
        self.inputs.append(v)
        return v

    def add_constant(self, tensor: torch.Tensor, name: str | None = None, *,
                     exact: bool = False, quant: QuantType | None = None) -> Value:
        """Add a constant holding ``tensor``, named after ``name`` (exactly, with ``exact=True``);
        ``quant``: the tensor is a quantized weight's storage of that :class:`QuantType`."""
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(tensor)
        if exact and not name:
            raise IRVerifyError(f"graph {self.name}: add_constant(exact=True) needs a name")
        t = TensorType.of(tensor)
        if quant is not None:
            t = TensorType(t.dtype, t.shape, quant)  # checks the storage matches the quant type
        vname = self._claim(name) if exact else self.fresh_name(name or "c")
        v = Value(self, vname, t)
        v.const = tensor
        self.constants[v.name] = v
        return v

    def rename_values(self, values: Sequence[Value], names: Sequence[str]) -> None:
        """Give ``values`` exactly ``names`` (all at once, so they may swap names).

        A name used by any other value of the graph is an error, and then
        nothing is renamed. Constants stay keyed by their new names.
        """
        if len(values) != len(names):
            raise IRVerifyError(f"rename_values: {len(values)} values but {len(names)} names")
        if len(set(names)) != len(names):
            raise IRVerifyError(f"rename_values: duplicate names in {list(names)}")
        old = [v.name for v in values]
        self._names.difference_update(old)
        taken = [n for n in names if n in self._names]
        if taken:
            self._names.update(old)
            raise IRVerifyError(f"graph {self.name}: value name(s) "
                                f"{', '.join('%' + n for n in taken)} already in use")
        self._names.update(names)
        consts = [v for v in values if v.is_const and self.constants.get(v.name) is v]
        for v in consts:
            del self.constants[v.name]
        for v, name in zip(values, names):
            v.name = name
        for v in consts:
            self.constants[v.name] = v

    def scalar(self, value: float | int | bool, dtype: DType) -> Value:
        return self.add_constant(torch.tensor(value, dtype=dtype.torch), "c")

    def set_outputs(self, outputs: Sequence[Value]) -> None:
        self.outputs = list(outputs)
        self._notify_rewire(None)

    # -- nodes ----------------------------------------------------------------

    def create(
        self,
        op: str,
        inputs: Sequence[Value | None],
        attrs: dict[str, Any] | None = None,
        *,
        out_types: Sequence[TensorType] | None = None,
        name: str | None = None,
        meta: dict[str, Any] | None = None,
        before: Node | None = None,
        after: Node | None = None,
    ) -> Node:
        """Create a node, infer its output types (unless given) and insert it.

        Without ``before``/``after`` it goes at the current insertion point
        (the end of the graph unless ``inserting_before/after`` is active).
        """
        from transfuse.ir.ops import get_op

        node = Node(self, op, attrs or {})
        opdef = get_op(op)
        node.attrs = opdef.normalize_attrs(node.attrs, op)
        for v in inputs:
            if v is not None and v.graph is not self:
                raise IRVerifyError(f"{op}: input %{v.name} belongs to another graph")
        node.inputs = tuple(inputs)
        for i, v in enumerate(node.inputs):
            if v is not None:
                v.uses.append((node, i))
        if meta:
            node.meta.update(meta)
        if out_types is None:
            out_types = opdef.infer_types(node)
        outs = []
        for i, t in enumerate(out_types):
            hint = name if len(out_types) == 1 else f"{name or op}_{i}" if name else None
            v = Value(self, self.fresh_name(hint), t)
            v.producer, v.index = node, i
            outs.append(v)
        node.outputs = tuple(outs)
        if before is not None:
            self.nodes.insert_before(before, node)
        elif after is not None:
            self.nodes.insert_after(after, node)
        else:
            where, anchor = self._insert_point
            if where == "before" and anchor is not None:
                self.nodes.insert_before(anchor, node)
            elif where == "after" and anchor is not None:
                self.nodes.insert_after(anchor, node)
                self._insert_point = ("after", node)
            else:
                self.nodes.append(node)
        for listener in self.listeners:
            listener.on_create(node)
        return node

    def op(self, op: str, *inputs: Value | None, name: str | None = None, **attrs: Any) -> Value:
        """Builder shorthand: create a single-output node and return its value."""
        return self.create(op, inputs, attrs, name=name).output

    class _InsertCtx:
        def __init__(self, graph: Graph, where: str, anchor: Node | None):
            self.graph, self.where, self.anchor = graph, where, anchor

        def __enter__(self):
            self.saved = self.graph._insert_point
            self.graph._insert_point = (self.where, self.anchor)
            return self

        def __exit__(self, *exc):
            self.graph._insert_point = self.saved

    def inserting_before(self, node: Node) -> Graph._InsertCtx:
        return Graph._InsertCtx(self, "before", node)

    def inserting_after(self, node: Node) -> Graph._InsertCtx:
        return Graph._InsertCtx(self, "after", node)

    def set_input(self, node: Node, index: int, value: Value | None) -> None:
        old = node.inputs[index]
        if old is not None:
            old.uses.remove((node, index))
        ins = list(node.inputs)
        ins[index] = value
        node.inputs = tuple(ins)
        if value is not None:
            value.uses.append((node, index))
        self._notify_rewire(node)

    def _notify_rewire(self, node: Node | None) -> None:
        for listener in self.listeners:
            hook = getattr(listener, "on_rewire", None)
            if hook is not None:
                hook(node)

    def replace_all_uses(self, old: Value, new: Value) -> int:
        """Point every use of ``old`` (graph outputs included) at ``new``."""
        if old is new:
            return 0
        count = 0
        for node, i in list(old.uses):
            self.set_input(node, i, new)
            count += 1
        for j, o in enumerate(self.outputs):
            if o is old:
                self.outputs[j] = new
                count += 1
                self._notify_rewire(None)
        return count

    def erase(self, node: Node) -> None:
        """Remove a node whose outputs are unused."""
        for v in node.outputs:
            if v.uses or any(o is v for o in self.outputs):
                users = ", ".join(repr(n) for n, _ in v.uses[:3])
                raise IRVerifyError(f"cannot erase {node!r}: output %{v.name} is still used by {users or 'graph outputs'}")
        for i, v in enumerate(node.inputs):
            if v is not None:
                v.uses.remove((node, i))
        self.nodes.remove(node)
        for listener in self.listeners:
            listener.on_erase(node)

    def remove_unused_constants(self) -> int:
        used = {id(o) for o in self.outputs}
        dead = [n for n, v in self.constants.items() if not v.uses and id(v) not in used]
        for n in dead:
            del self.constants[n]
        return len(dead)

    def move_before(self, node: Node, anchor: Node) -> None:
        self.nodes.remove(node)
        node._erased = False
        self.nodes.insert_before(anchor, node)

    # -- queries --------------------------------------------------------------

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def op_histogram(self) -> Counter:
        return Counter(n.op for n in self.nodes)

    def find(self, op: str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.constants.values()
        for n in self.nodes:
            yield from n.outputs

    def symbols(self) -> set[str]:
        from transfuse.ir.types import free_symbols

        names: set[str] = set()
        for v in self.inputs:
            names |= free_symbols(v.type.shape)
        return names

    def __str__(self) -> str:
        from transfuse.ir.printer import print_graph

        return print_graph(self)

    # -- copies and exports ---------------------------------------------------

    def restore(self, snapshot: Graph) -> None:
        """Make this graph (the same object) equal to ``snapshot``, which stays usable.

        Used to roll a failed pass back: the contents of a fresh clone of
        ``snapshot`` move into ``self`` and every value and node points back
        at it. Listeners stay, value names used before stay reserved (so
        names handed out later never collide with ones a caller still holds),
        and the insertion point goes back to the end.
        """
        fresh = snapshot.clone()
        for v in fresh.values():
            v.graph = self
        for n in fresh.nodes:
            n.graph = self
        fresh.nodes._root.graph = self
        self.name = fresh.name
        self.inputs = fresh.inputs
        self.outputs = fresh.outputs
        self.constants = fresh.constants
        self.nodes = fresh.nodes
        self.meta = fresh.meta
        self._names |= fresh._names
        self._next_id = max(self._next_id, fresh._next_id)
        self._insert_point = ("end", None)

    def clone(self, share_constants: bool = True) -> Graph:
        """A structurally identical graph; constant tensors are shared unless asked."""
        g = Graph(self.name)
        g.meta = dict(self.meta)
        vmap: dict[int, Value] = {}

        def copy_value(v: Value) -> Value:
            nv = Value(g, v.name, v.type)
            g._names.add(v.name)
            vmap[id(v)] = nv
            return nv

        for v in self.inputs:
            g.inputs.append(copy_value(v))
        for name, v in self.constants.items():
            nv = copy_value(v)
            nv.const = v.const if share_constants else v.const.clone()
            g.constants[name] = nv
        for n in self.nodes:
            nn = Node(g, n.op, n.attrs)
            nn.meta = dict(n.meta)
            nn.inputs = tuple(None if v is None else vmap[id(v)] for v in n.inputs)
            for i, v in enumerate(nn.inputs):
                if v is not None:
                    v.uses.append((nn, i))
            outs = []
            for v in n.outputs:
                nv = copy_value(v)
                nv.producer, nv.index = nn, v.index
                outs.append(nv)
            nn.outputs = tuple(outs)
            g.nodes.append(nn)
        g.outputs = [vmap[id(v)] for v in self.outputs]
        g._next_id = self._next_id
        return g

    def to_networkx(self):
        """A networkx DiGraph: one vertex per node/input/constant, edges along data flow."""
        import networkx as nx

        dg = nx.DiGraph(name=self.name)
        for v in self.inputs:
            dg.add_node(f"input:{v.name}", kind="input", type=str(v.type))
        for v in self.constants.values():
            dg.add_node(f"const:{v.name}", kind="const", type=str(v.type))
        ids: dict[int, str] = {}
        for i, n in enumerate(self.nodes):
            key = f"node:{i}:{n.op}"
            ids[id(n)] = key
            dg.add_node(key, kind="node", op=n.op, attrs=dict(n.attrs), source=n.source,
                        outputs=[v.name for v in n.outputs])
        for n in self.nodes:
            for idx, v in enumerate(n.inputs):
                if v is None:
                    continue
                if v.producer is not None:
                    src = ids[id(v.producer)]
                elif v.is_const:
                    src = f"const:{v.name}"
                else:
                    src = f"input:{v.name}"
                dg.add_edge(src, ids[id(n)], value=v.name, index=idx)
        for j, v in enumerate(self.outputs):
            dg.add_node(f"output:{j}", kind="output", type=str(v.type))
            src = ids[id(v.producer)] if v.producer is not None else (
                f"const:{v.name}" if v.is_const else f"input:{v.name}")
            dg.add_edge(src, f"output:{j}", value=v.name, index=0)
        return dg
