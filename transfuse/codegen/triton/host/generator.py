"""The triton target's host code: one generated Python module per graph.

``HostGenerator(graph, partition, kernels, planned).run()`` writes, through the python
target's generator (names, symbols, constants as closure cells, ``del`` after last use)::

    def _bind(_c, _dev, _ref, _attn_mask, _K, _o, _rt):
        h_0_attn_w = _c['h_0_attn_w']
        _new = _rt.new

        def forward(x, ids):
            seq = ids.shape[1]
            _env = {'seq': seq}
            _a = _rt.arena(_env)                      # the memory plan's views at this env
            v3 = _t_linear(x, h_0_attn_w, h_0_attn_b, _a[0], None)   # cuBLAS
            v5, = _t_group(_K[0], [v3, w_ln], _env, [_a[1]])          # generated kernel
            v7 = _t_attention(q, k, v, None, None, _a[2], scale=None, causal=True, ...)
            ...

One statement per step of the schedule (:meth:`Partition.schedule`): a fusion group is a
``_t_group`` launch of its generated kernel (``_K[i]``), a node with a triton host lowering
(:mod:`.lowerings`) a call to a hand-written kernel or cuBLAS, any other node the python
target's emitter (views, indexing, embedding: torch), or the op's reference implementation.
Every value a kernel writes goes into ``ctx.out(v)``: its view of the arena (``_a[i]``,
planned by :mod:`transfuse.codegen.triton.memory_plan`) or, for graph outputs and values the
plan leaves out, a fresh tensor (``_new``; NaN-filled when the program poisons).
"""

from __future__ import annotations

from collections import Counter

from transfuse.codegen.python.generator import Generator, comment_text
from transfuse.codegen.python.registry import LOWERINGS as PYTHON_LOWERINGS
from transfuse.codegen.python.registry import dtype_literal
from transfuse.codegen.triton.gen import GeneratedKernel, Group, Partition
from transfuse.codegen.triton.gen.epilogue import GemmEpilogue, GemmKernel
from transfuse.codegen.triton.host.calls import HOST_CALLS
from transfuse.codegen.triton.host.registry import LOWERINGS, HostContext
from transfuse.errors import LoweringError
from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.ops import get_op

#: ops whose python emitters need the python target's prepared program (quant plans): when
#: the triton lowering refuses one, it runs through the op's reference implementation
_NO_PYTHON_FALLBACK = frozenset({"qlinear", "qmatmul"})


class HostGenerator(Generator, HostContext):
    """Writes the host module of one graph (module docstring)."""

    def __init__(self, graph: Graph, part: Partition, kernels: dict[int, GeneratedKernel],
                 planned: list[str], units: list, gemm_kernels: dict[int, GemmKernel]):
        super().__init__(graph)
        self.part = part
        self.units = units  # the schedule: groups, GEMM + epilogue pairs, nodes
        self.kernels = kernels  # group id -> its kernel
        self.gemm_kernels = gemm_kernels  # group id -> the kernel of its GEMM + epilogue pair
        self.kernel_order: list[int] = []  # group ids in _K order
        self.gemm_order: list[int] = []  # group ids in _E order
        self.planned = {name: i for i, name in enumerate(planned)}
        self.objs: list[object] = []
        #: hand-written kernel ("module:function") -> IR nodes it runs
        self.kernel_nodes: dict[str, list[str]] = {}
        #: op -> why its triton lowering refused a node (it ran through torch instead)
        self.refused: dict[str, str] = {}
        #: ops run by torch calls (python emitters) in the host, and how often
        self.torch_ops: Counter = Counter()
        #: ops the triton host lowerings ran, and how often
        self.host_ops: Counter = Counter()

    # -- HostContext ------------------------------------------------------------------------

    def out(self, v: Value) -> str:
        i = self.planned.get(v.name)
        if i is not None:
            return f"_a[{i}]"
        return f"_new({self.dims(v.type.shape)}, {dtype_literal(v.type.dtype)})"

    def obj(self, value: object) -> str:
        for i, o in enumerate(self.objs):
            if o is value or o == value:
                return f"_o[{i}]"
        self.objs.append(value)
        return f"_o[{len(self.objs) - 1}]"

    def kernel(self, name: str, node: Node) -> None:
        self.kernel_nodes.setdefault(name, []).append(self._node_desc(node))

    def helper(self, name: str) -> str:
        if name in HOST_CALLS:
            return name
        return super().helper(name)

    # -- statements ---------------------------------------------------------------------------

    def _expression(self, node: Node) -> str:
        get_op(node.op)
        low = LOWERINGS.get(node.op)
        if low is not None:
            reason = low.refuses(node)
            if reason is None:
                self.host_ops[node.op] += 1
                return low.fn(self, node)
            self.refused.setdefault(node.op, reason)
            if node.op in _NO_PYTHON_FALLBACK:
                return self._reference_call(node, f"triton: {reason}")
        if PYTHON_LOWERINGS.supports(node) is None and node.op not in _NO_PYTHON_FALLBACK:
            self.torch_ops[node.op] += 1
        return super()._expression(node)

    def _group_statement(self, g: Group) -> str:
        k = self.kernels[g.id]
        self.kernel_order.append(g.id)
        index = len(self.kernel_order) - 1
        ins = ", ".join(self.name(v) for v in g.inputs)
        outs = ", ".join(self.out(v) for v in g.outputs)
        targets = ", ".join(self._define(v) for v in g.outputs)
        if [v.name for v in g.inputs] != list(k.input_names):  # pragma: no cover - emit's contract
            raise LoweringError(f"triton host: kernel {k.name} takes "
                                f"{k.input_names}, the group reads {[v.name for v in g.inputs]}")
        return f"{targets}, = _t_group(_K[{index}], [{ins}], _env, [{outs}])"

    def _pair_statement(self, p: GemmEpilogue) -> str:
        self.kernel_order.append(p.group.id)  # the group's own kernel: the many-rows path
        self.gemm_order.append(p.group.id)
        self.host_ops["gemm+epilogue"] += 1
        node, g = p.gemm, p.group
        x, w = self.name(node.inputs[0]), self.name(node.inputs[1])
        bias = node.inputs[2] if node.op == "linear" and len(node.inputs) > 2 else None
        b = self.name(bias) if bias is not None else "None"
        ins = ", ".join(self.name(v) for i, v in enumerate(g.inputs) if i != p.y_index)
        outs = ", ".join(self.out(v) for v in g.outputs)
        targets = ", ".join(self._define(v) for v in g.outputs)
        return (f"{targets}, = _t_gemm_group(_E[{len(self.gemm_order) - 1}], {x}, {w}, {b}, "
                f"[{ins}], _env, [{outs}], _rt.epilogue_rows)")

    # -- the module ---------------------------------------------------------------------------

    def run(self) -> str:
        g = self.graph
        params = self._define_signature()
        units = self.units
        reads: list[list[Value]] = [_reads(u) for u in units]
        last: dict[int, int] = {}
        for idx, vs in enumerate(reads):
            for v in vs:
                if not v.is_const:
                    last[id(v)] = idx
        dead_at: dict[int, list[int]] = {}
        for vid, idx in last.items():
            dead_at.setdefault(idx, []).append(vid)
        self.output_ids = outputs = {id(v) for v in g.outputs}
        body: list[tuple[str, str]] = []
        for idx, unit in enumerate(units):
            if isinstance(unit, GemmEpilogue):
                stmt = self._pair_statement(unit)
                desc = f"{unit.gemm.op} + group {unit.group.id}: {unit.group.label}"
                comment = f"  # {comment_text(self.gemm_kernels[unit.group.id].name)}"
                if unit.gemm.source:
                    comment += f" ({comment_text(unit.gemm.source)})"
            elif isinstance(unit, Group):
                stmt = self._group_statement(unit)
                desc = f"group {unit.id}: {unit.label}"
                comment = f"  # {comment_text(self.kernels[unit.id].name)}"
            else:
                stmt = self._statement(unit)
                desc = self._node_desc(unit)
                comment = comment_text(unit.source) if unit.source else ""
                comment = f"  # {comment.strip()}" if comment.strip() else ""
            dead = [self.value_names[i] for i in dead_at.get(idx, ())
                    if i not in outputs and i in self.value_names]
            if dead:
                stmt += f"; del {', '.join(dead)}"
            body.extend((hoisted + comment, desc) for hoisted in self.pending)
            self.pending.clear()
            body.append((stmt + comment, desc))
        ret = ", ".join(self.name(v) for v in g.outputs)
        return self._host_module(params, body, f"return [{ret}]")

    def _host_module(self, params: list[str], body: list[tuple[str, str]], ret: str) -> str:
        g = self.graph
        lines = [
            f"# transfuse triton backend: host code of graph {comment_text(g.name)} "
            f"({len(g)} nodes; {len(self.kernel_order) + len(self.gemm_order)} generated kernels, "
            f"{sum(self.host_ops.values())} hand-written kernel / cuBLAS calls, "
            f"{sum(self.torch_ops.values())} torch ops, {self.reference_count} reference "
            "implementations)",
            "# Generated from the graph, for reading; regenerate rather than edit.",
        ]
        for op, reason in sorted(self.refused.items()):
            lines.append(f"# {op} not on its triton kernel: {comment_text(reason)}")
        for op, reason in sorted(self.reference_ops.items()):
            lines.append(f"# reference implementation for {op}: {comment_text(reason)}")
        lines += ["", "", "def _bind(_c, _dev, _ref, _attn_mask, _K, _E, _o, _rt):"]
        for py, cname in self.const_names.items():
            lines.append(f"    {py} = _c[{cname!r}]")
        lines += ["    _new = _rt.new", "", f"    def forward({', '.join(params)}):"]
        prologue = []
        if self.uses_dev and not self.const_names and g.inputs:
            prologue.append(f"_dev = {self.name(g.inputs[0])}.device")
        for sym, (v, i) in self.symbol_sources.items():
            prologue.append(f"{self.symbol_names[sym]} = {self.name(v)}.shape[{i}]")
        items = ", ".join(f"{s!r}: {self.symbol_names[s]}" for s in self.symbol_sources)
        prologue.append(f"_env = {{{items}}}")
        if self.planned:
            prologue.append("_a = _rt.arena(_env)")
        return self._finish_forward(lines, prologue, body, ret)


def _reads(unit) -> list[Value]:
    """The values a schedule unit reads (a pair: the GEMM's inputs and the group's but y)."""
    if isinstance(unit, GemmEpilogue):
        y = unit.gemm.outputs[0]
        return ([v for v in unit.gemm.inputs if v is not None]
                + [v for v in unit.group.inputs if v is not y])
    if isinstance(unit, Group):
        return list(unit.inputs)
    return [v for v in unit.inputs if v is not None]


__all__ = ["HostGenerator"]
