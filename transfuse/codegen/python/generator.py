"""The python backend's source generator: one graph becomes one Python module.

``Generator(graph).run()`` writes::

    def _bind(_c, _dev, _ref, _attn_mask):
        h_0_attn_w = _c['h_0_attn_w']                       # constants: closure cells

        def forward(x, ids):
            seq = ids.shape[1]                                # symbols from input shapes
            v12 = F.linear(x, h_0_attn_w, None); del x        # h.0.attn
            ...
            return [v40]

        return forward

One statement per node, named after the IR value it defines, with the user's
module path as a comment; a value is deleted after its last use so peak memory
stays that of eager PyTorch. Constants are never written into the source: the
factory binds them as closure variables (no lookup per call), and ``to(device)``
rebinds moved copies without regenerating anything.

Ops are written by the emitters registered on
:data:`transfuse.codegen.python.registry.LOWERINGS`. A node whose op has no emitter,
or whose emitter refuses it, calls the op's reference implementation through ``_ref``
— counted in ``program.reference_ops`` and logged, so code generation never fails on
coverage. Functions the code calls by name come from one table (``helpers.py``).

Safety: the source is ours, built from the graph; no text from the graph
reaches it except as ``repr()`` literals, sanitised identifiers and comments
stripped of line breaks (:mod:`transfuse.codegen.python.program` compiles it).
"""

from __future__ import annotations

import builtins
import keyword
from collections import Counter
from collections.abc import Callable

import sympy

from transfuse.codegen.python.dims import DimPrinter
from transfuse.codegen.python.helpers import HELPERS
from transfuse.codegen.python.registry import LOWERINGS, EmitContext, literal
from transfuse.errors import LoweringError
from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.ops import get_op
from transfuse.ir.types import Dim

#: names the generated code itself uses; values and symbols never take them
RESERVED = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | {
    "torch", "F", "forward", "float", "int", "max", "min", "bool", "range",
    "tuple", "list", "len", "print", "self",
} | frozenset(HELPERS) | {n for n in dir(builtins) if not n.startswith("_")}


# -- names and dims ------------------------------------------------------------------------


class _Names:
    """Allocates distinct Python identifiers from IR names (``12`` -> ``v12``)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def new(self, hint: str) -> str:
        base = "".join(c if (c.isascii() and (c.isalnum() or c == "_")) else "_" for c in hint)
        if not base or not (base[0].isalpha()):
            base = "v" + base
        name, i = base, 1
        while name in self.used or name in RESERVED:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def comment_text(text: str) -> str:
    """A comment (or file name) body with nothing that could end the comment line."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


# -- the generator -----------------------------------------------------------------------------


class Generator(EmitContext):
    """Writes the module of one graph; also the :class:`EmitContext` emitters write through."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.names = _Names()
        self.value_names: dict[int, str] = {}
        self.const_names: dict[str, str] = {}  # python name -> graph constant name
        self.symbol_names: dict[str, str] = {}  # symbol -> python name
        self.symbol_sources: dict[str, tuple[Value, int]] = {}
        self.used_symbols: dict[str, None] = {}
        self.uses_dev = False
        self.refs: list[tuple[Callable, dict, int]] = []
        self.reference_ops: dict[str, str] = {}
        self.reference_count = 0
        self.emitted: Counter = Counter()
        self.fallback_targets: Counter = Counter()
        self.line_info: dict[int, str] = {}
        self.dim_printer = DimPrinter(self._symbol)
        self.helpers_used: dict[str, None] = {}  # helper names the code calls, in order
        self.hoisted: dict[str, str] = {}  # expression -> local bound before its first use
        self.pending: list[str] = []

    # -- EmitContext ---------------------------------------------------------------------

    def name(self, v: Value | None) -> str:
        if v is None:
            return "None"
        try:
            return self.value_names[id(v)]
        except KeyError:
            raise LoweringError(f"python backend: value %{v.name} is used before it is defined "
                                "(or belongs to another graph)") from None

    def dim(self, d: Dim) -> str:
        return self.dim_printer(d)

    def hoist(self, expr: str, hint: str) -> str:
        name = self.hoisted.get(expr)
        if name is None:
            name = self.hoisted[expr] = self.names.new(hint)
            self.pending.append(f"{name} = {expr}")
        return name

    def helper(self, name: str) -> str:
        if name not in HELPERS:
            raise LoweringError(f"python backend: an emitter calls {name!r}, which is not a "
                                "helper of the generated code (codegen/python/helpers.py)")
        self.helpers_used[name] = None
        return name

    def _symbol(self, sym: str) -> str:
        if sym not in self.symbol_sources:
            raise LoweringError(
                f"python backend: symbolic dim {sym!r} is not the size of any input dim of graph "
                f"{self.graph.name}, so generated code cannot bind it")
        self.used_symbols[sym] = None
        return self.symbol_names[sym]

    # -- generation ------------------------------------------------------------------------

    def _define_signature(self) -> list[str]:
        """Name the symbols (read from the first input dim that is exactly them), the inputs
        (returned: the forward's parameters) and the constants the graph reads."""
        g = self.graph
        for v in g.inputs:
            for i, d in enumerate(v.type.shape):
                if isinstance(d, sympy.Symbol) and d.name not in self.symbol_sources:
                    self.symbol_sources[d.name] = (v, i)
        for sym in self.symbol_sources:
            self.symbol_names[sym] = self.names.new(sym)
        params = [self._define(v) for v in g.inputs]
        used_consts = {id(x) for n in g.nodes for x in n.inputs if x is not None and x.is_const}
        used_consts |= {id(v) for v in g.outputs if v.is_const}
        for cname, v in g.constants.items():
            if id(v) in used_consts:
                self.const_names[self._define(v)] = cname
        return params

    def run(self) -> str:
        g = self.graph
        params = self._define_signature()

        last_use = self._last_uses()
        outputs = self.output_ids = {id(v) for v in g.outputs}
        body: list[tuple[str, str]] = []  # (statement, description)
        for idx, node in enumerate(g.nodes):
            stmt = self._statement(node)
            dead = [self.value_names[i] for i in last_use.get(idx, ()) if i not in outputs]
            if dead:
                stmt += f"; del {', '.join(dead)}"
            desc = self._node_desc(node)
            comment = comment_text(node.source) if node.source else ""
            if node.meta.get("origin"):
                comment += f" <- {comment_text(node.meta['origin'])}"
            comment = f"  # {comment.strip()}" if comment.strip() else ""
            body.extend((hoisted + comment, desc) for hoisted in self.pending)
            self.pending.clear()
            body.append((stmt + comment, desc))
        ret = ", ".join(self.name(v) for v in g.outputs)
        return self._module(params, body, f"return [{ret}]")

    def _define(self, v: Value, hint: str | None = None) -> str:
        name = self.names.new(hint or v.name)
        self.value_names[id(v)] = name
        return name

    def _last_uses(self) -> dict[int, list[int]]:
        """node index -> ids of non-constant values whose last use is that node."""
        last: dict[int, int] = {}
        for idx, node in enumerate(self.graph.nodes):
            for v in node.inputs:
                if v is not None and not v.is_const:
                    last[id(v)] = idx
        out: dict[int, list[int]] = {}
        for vid, idx in last.items():
            out.setdefault(idx, []).append(vid)
        return out

    def _node_desc(self, node: Node) -> str:
        outs = ", ".join(f"%{v.name}" for v in node.outputs)
        where = f" (from {node.source})" if node.source else ""
        return f"{outs + ' = ' if outs else ''}{node.op}{where}"

    def _expression(self, node: Node) -> str:
        """The right-hand side of ``node``'s statement: its emitter's, or the reference call."""
        get_op(node.op)  # unknown ops are an error here, not at run time
        reason = LOWERINGS.supports(node)
        if reason is None:
            expr = LOWERINGS.get(node.op).fn(self, node)
            self.emitted[node.op] += 1
            if node.op == "torch_fallback":
                self.fallback_targets[node.attrs["target"]] += 1
            return expr
        return self._reference_call(node, reason)

    def _statement(self, node: Node) -> str:
        expr = self._expression(node)
        self.uses_dev = self.uses_dev or "_dev" in expr or any("_dev" in p for p in self.pending)
        outs = node.outputs
        if not outs:
            return expr
        live = [bool(v.uses) or id(v) in self.output_ids for v in outs]
        if len(outs) == 1:
            target = self._define(outs[0])
            return f"{target} = {expr}" if live[0] else f"{target} = {expr}; del {target}"
        targets = [self._define(v) if keep else "_" for v, keep in zip(outs, live)]
        return f"{', '.join(targets)} = {expr}"

    def _reference_call(self, node: Node, reason: str) -> str:
        if node.op not in self.reference_ops:
            self.reference_ops[node.op] = reason
        self.reference_count += 1
        index = len(self.refs)
        self.refs.append((get_op(node.op).impl, dict(node.attrs), len(node.outputs)))
        ins = ", ".join(self.name(v) for v in node.inputs)
        return f"_ref({literal(node.op)}, {index}, [{ins}], _env)"

    def _module(self, params: list[str], body: list[tuple[str, str]], ret: str) -> str:
        g = self.graph
        lines = [
            f"# transfuse python backend: graph {comment_text(g.name)} "
            f"({len(g)} nodes, {self.reference_count} through reference implementations)",
            "# Generated from the graph, for reading; regenerate rather than edit.",
        ]
        for op, reason in sorted(self.reference_ops.items()):
            lines.append(f"# reference implementation for {op}: {comment_text(reason)}")
        lines += ["", "", "def _bind(_c, _dev, _ref, _attn_mask):"]
        for py, cname in self.const_names.items():
            lines.append(f"    {py} = _c[{cname!r}]")
        lines += ["", f"    def forward({', '.join(params)}):"]
        prologue = []
        if self.uses_dev and not self.const_names and g.inputs:
            prologue.append(f"_dev = {self.name(g.inputs[0])}.device")
        env_syms = list(self.symbol_sources) if self.refs else []
        for sym in self.symbol_sources:
            if sym in self.used_symbols or sym in env_syms:
                v, i = self.symbol_sources[sym]
                prologue.append(f"{self.symbol_names[sym]} = {self.name(v)}.shape[{i}]")
        if self.refs:
            items = ", ".join(f"{s!r}: {self.symbol_names[s]}" for s in env_syms)
            prologue.append(f"_env = {{{items}}}")
        return self._finish_forward(lines, prologue, body, ret)

    def _finish_forward(self, lines: list[str], prologue: list[str],
                        body: list[tuple[str, str]], ret: str) -> str:
        """The module text: ``lines`` (up to ``def forward(...):``), then the prologue, the body
        (recording which IR node each line comes from) and the return, closing ``_bind``."""
        for stmt in prologue:
            lines.append(f"        {stmt}")
        for stmt, desc in body:
            lines.append(f"        {stmt}")
            self.line_info[len(lines)] = desc
        lines += [f"        {ret}", "", "    return forward", ""]
        return "\n".join(lines)


__all__ = ["Generator", "RESERVED", "comment_text"]
