"""The python backend: a graph becomes readable Python source over torch.

``generate_python(graph)`` writes one module per graph::

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

Ops are written by the emitters in :mod:`transfuse.codegen.python_ops`. A node
whose op has no emitter, or whose emitter refuses it, calls the op's reference
implementation through ``_ref`` — counted in ``program.reference_ops`` and
logged, so code generation never fails on coverage.

Safety: the source is ours, built from the graph; no text from the graph
reaches it except as ``repr()`` literals, sanitised identifiers and comments
stripped of line breaks. It is compiled with ``compile()`` into a fresh
namespace and registered with :mod:`linecache` so tracebacks show its lines.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import keyword
import linecache
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
import torch.nn.functional as F

from transfuse.codegen.blas import gemm_linear, kmajor, stored_kmajor
from transfuse.codegen.cpu_attention import causal_attention
from transfuse.codegen.native import ops as native_ops
from transfuse.errors import LoweringError
from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.opdefs.misc import call_fallback
from transfuse.ir.ops import get_op
from transfuse.ir.types import Dim

from transfuse.codegen.python_ops import (  # isort: skip
    EmitContext, attn_position_mask, get_emitter, literal,
)

logger = logging.getLogger(__name__)

#: names the generated code itself uses; values and symbols never take them
_RESERVED = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | {
    "torch", "F", "forward", "call_fallback", "float", "int", "max", "min", "bool", "range",
    "tuple", "list", "len", "print", "self", "_gemm_linear",
    "_causal_attention", "_swiglu", "_rms_norm", "_add_rms_norm", "_rotary",
} | {n for n in dir(builtins) if not n.startswith("_")}


def _assert(xs: Sequence[torch.Tensor], message: str) -> None:
    """The ``assert`` op: every input must be all-true."""
    for x in xs:
        if not bool(torch.all(x)):
            raise AssertionError(message or "assertion in captured graph failed")


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
        while name in self.used or name in _RESERVED:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def _comment_text(text: str) -> str:
    """A comment body with nothing that could end the comment line."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


class _DimPrinter:
    """Sympy dims as Python integer expressions (``floor(seq/2)`` -> ``seq // 2``)."""

    def __init__(self, symbol_name: Callable[[str], str]):
        self.symbol_name = symbol_name

    def __call__(self, d: Dim) -> str:
        text, _ = self.expr(d)
        return text

    def expr(self, d: Any) -> tuple[str, bool]:
        """(text, is_atom)."""
        if isinstance(d, int):
            return str(d), d >= 0
        e = sympy.sympify(d)
        if e.is_Integer:
            return str(int(e)), int(e) >= 0
        if e.is_Symbol:
            return self.symbol_name(e.name), True
        num, den = sympy.fraction(sympy.together(e))
        if den != 1 and not isinstance(e, (sympy.floor, sympy.ceiling)):
            # an integer-valued expression with rational coefficients: exact floor division
            return f"{self.atom(num)} // {self.atom(den)}", False
        if isinstance(e, sympy.floor):
            return self._div(e.args[0], ceil=False)
        if isinstance(e, sympy.ceiling):
            return self._div(e.args[0], ceil=True)
        if isinstance(e, sympy.Add):
            terms = sorted(e.args, key=lambda t: (t.is_number, sympy.default_sort_key(t)))
            out = self.atom_or_mul(terms[0])
            for t in terms[1:]:
                if t.could_extract_minus_sign():
                    out += f" - {self.atom_or_mul(-t)}"
                else:
                    out += f" + {self.atom_or_mul(t)}"
            return out, False
        if isinstance(e, sympy.Mul):
            coeff, rest = e.as_coeff_Mul()
            factors = sympy.Mul.make_args(rest)
            text = "*".join(self.atom(f) for f in factors)
            if coeff == -1:
                return f"-{text}", False
            if coeff != 1:
                text = f"{self.atom(coeff)}*{text}"
            return text, False
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) > 0:
            return f"{self.atom(e.base)}**{int(e.exp)}", False
        if isinstance(e, sympy.Mod):
            return f"{self.atom(e.args[0])} % {self.atom(e.args[1])}", False
        if isinstance(e, (sympy.Max, sympy.Min)):
            fn = "max" if isinstance(e, sympy.Max) else "min"
            return f"{fn}({', '.join(self(a) for a in e.args)})", True
        raise LoweringError(f"python backend: cannot write dimension {e} as Python")

    def _div(self, arg: Any, ceil: bool) -> tuple[str, bool]:
        num, den = sympy.fraction(sympy.together(arg))
        if den == 1:
            return self.expr(num)
        if ceil:
            return f"-(-{self.atom(num)} // {self.atom(den)})", False
        return f"{self.atom(num)} // {self.atom(den)}", False

    def atom(self, d: Any) -> str:
        text, is_atom = self.expr(d)
        return text if is_atom else f"({text})"

    def atom_or_mul(self, d: Any) -> str:
        text, is_atom = self.expr(d)
        if is_atom or isinstance(d, sympy.Mul) and not text.startswith("-"):
            return text
        return f"({text})"


# -- the generator -----------------------------------------------------------------------------


class _Generator(EmitContext):
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
        self.dim_printer = _DimPrinter(self._symbol)
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

    def _symbol(self, sym: str) -> str:
        if sym not in self.symbol_sources:
            raise LoweringError(
                f"python backend: symbolic dim {sym!r} is not the size of any input dim of graph "
                f"{self.graph.name}, so generated code cannot bind it")
        self.used_symbols[sym] = None
        return self.symbol_names[sym]

    # -- generation ------------------------------------------------------------------------

    def run(self) -> str:
        g = self.graph
        for v in g.inputs:  # symbols are read from the first input dim that is exactly them
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

        last_use = self._last_uses()
        outputs = self.output_ids = {id(v) for v in g.outputs}
        body: list[tuple[str, str]] = []  # (statement, description)
        for idx, node in enumerate(g.nodes):
            stmt = self._statement(node)
            dead = [self.value_names[i] for i in last_use.get(idx, ()) if i not in outputs]
            if dead:
                stmt += f"; del {', '.join(dead)}"
            desc = self._node_desc(node)
            comment = _comment_text(node.source) if node.source else ""
            if node.meta.get("origin"):
                comment += f" <- {_comment_text(node.meta['origin'])}"
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

    def _statement(self, node: Node) -> str:
        get_op(node.op)  # unknown ops are an error here, not at run time
        em = get_emitter(node.op)
        reason = "no python emitter for this op" if em is None else em.refuses(node)
        if reason is None:
            expr = em.emit(self, node)
            self.emitted[node.op] += 1
            if node.op == "torch_fallback":
                self.fallback_targets[node.attrs["target"]] += 1
        else:
            expr = self._reference_call(node, reason)
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
            f"# transfuse python backend: graph {_comment_text(g.name)} "
            f"({len(g)} nodes, {self.reference_count} through reference implementations)",
            "# Generated from the graph, for reading; regenerate rather than edit.",
        ]
        for op, reason in sorted(self.reference_ops.items()):
            lines.append(f"# reference implementation for {op}: {_comment_text(reason)}")
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
        for stmt in prologue:
            lines.append(f"        {stmt}")
        for stmt, desc in body:
            lines.append(f"        {stmt}")
            self.line_info[len(lines)] = desc
        lines += [f"        {ret}", "", "    return forward", ""]
        return "\n".join(lines)


# -- the program ----------------------------------------------------------------------------------


def _make_ref(table: list[tuple[Callable, dict, int]]) -> Callable:
    def _ref(op: str, index: int, inputs: list, env: dict) -> Any:
        impl, attrs, n_out = table[index]
        out = impl(inputs, attrs, env)
        if n_out == 1 and isinstance(out, (tuple, list)):
            return out[0]
        return out

    return _ref


class PythonProgram:
    """Generated Python for one graph: ``program(flat_inputs) -> list`` of the graph outputs.

    Attributes: ``source`` (the module text), ``device`` (of the bound constants),
    ``reference_ops`` (op -> why it runs through its reference implementation),
    ``reference_count``, ``emitted`` (op histogram of emitted statements),
    ``fallback_targets`` (aten ops of ``torch_fallback`` nodes), ``inference_mode``,
    ``kmajor_weights`` (constants stored K-major for ``gemm="blas"`` linears).
    """

    def __init__(self, source: str, filename: str, code: Any, constants: dict[str, torch.Tensor],
                 const_names: dict[str, str], device: torch.device | None,
                 refs: list, line_info: dict[int, str], *, reference_ops: dict[str, str],
                 reference_count: int, emitted: Counter, fallback_targets: Counter,
                 inference_mode: bool = True, kmajor_weights: Sequence[str] = ()):
        self.source = source
        self.filename = filename
        self._code = code
        self._const_names = const_names  # python name -> graph constant name
        self.constants = constants  # graph constant name -> tensor (bound ones only)
        self.device = device
        self._refs = refs
        self._line_info = line_info
        self.reference_ops = reference_ops
        self.reference_count = reference_count
        self.emitted = emitted
        self.fallback_targets = fallback_targets
        self.kmajor_weights = list(kmajor_weights)
        self.inference_mode = inference_mode
        self._forward = self._bind()

    def _bind(self) -> Callable:
        namespace: dict[str, Any] = {"torch": torch, "F": F, "call_fallback": call_fallback,
                                     "_assert": _assert, "_gemm_linear": gemm_linear,
                                     "_causal_attention": causal_attention,
                                     "_swiglu": native_ops.swiglu,
                                     "_rms_norm": native_ops.rms_norm,
                                     "_add_rms_norm": native_ops.add_rms_norm,
                                     "_rotary": native_ops.rotary,
                                     "__name__": "transfuse_generated"}
        exec(self._code, namespace)  # noqa: S102 - our own generated source, see module docstring
        dev = self.device if self.device is not None else torch.device("cpu")
        attn_mask = functools.lru_cache(maxsize=8)(attn_position_mask)  # small: ALiBi masks are H*S*T
        return namespace["_bind"](self.constants, dev, _make_ref(self._refs), attn_mask)

    def __call__(self, flat_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        try:
            if self.inference_mode:
                with torch.inference_mode():
                    return self._forward(*flat_inputs)
            return self._forward(*flat_inputs)
        except Exception as e:
            self._annotate(e)
            raise

    def _annotate(self, e: BaseException) -> None:
        """Name the generated line and the IR node a failure came from."""
        tb = e.__traceback__
        lineno = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == self.filename:
                lineno = tb.tb_lineno
            tb = tb.tb_next
        if lineno is None or not hasattr(e, "add_note"):
            return
        line = self.source.splitlines()[lineno - 1].strip()
        e.add_note(f"in generated code ({self.filename}) line {lineno}: {line}\n"
                   f"  IR node: {self._line_info.get(lineno, '?')}")

    def to(self, device: str | torch.device) -> PythonProgram:
        """Move the bound constants to ``device`` (in place; returns self)."""
        device = torch.device(device)
        self.constants = {k: t.to(device) for k, t in self.constants.items()}
        self.device = device
        self._forward = self._bind()
        return self

    def __repr__(self) -> str:
        return (f"PythonProgram({self.filename}, {len(self.source.splitlines())} lines, "
                f"device={self.device}, reference_ops={sorted(self.reference_ops)})")


def generate_python(graph: Graph, device: str | torch.device | None = None, *,
                    inference_mode: bool = True) -> PythonProgram:
    """Generate, compile and bind Python source for ``graph``.

    ``device``: move the constants there (the graph's own tensors are left untouched);
    by default they stay where they are. Calls run under ``torch.inference_mode()``
    unless ``inference_mode=False``.
    """
    gen = _Generator(graph)
    source = gen.run()
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    filename = f"<transfuse-python-{_comment_text(graph.name)}-{digest}>"
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as e:  # a backend bug: show where
        raise LoweringError(f"python backend produced invalid source at line {e.lineno}: "
                            f"{e.msg}\n  {e.text}") from e
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    constants = {cname: graph.constants[cname].const for cname in gen.const_names.values()}
    dev = torch.device(device) if device is not None else None
    kmajor_names = _kmajor_weights(graph, constants, dev)
    if dev is not None:
        constants = {k: t.to(dev) for k, t in constants.items()}
    elif constants:
        dev = next(iter(constants.values())).device
    if gen.reference_ops:
        logger.info("python backend: %d node(s) of graph %s run through reference "
                    "implementations: %s", gen.reference_count, graph.name,
                    ", ".join(f"{op} ({why})" for op, why in sorted(gen.reference_ops.items())))
    return PythonProgram(source, filename, code, constants, gen.const_names, dev, gen.refs,
                         gen.line_info, reference_ops=gen.reference_ops,
                         reference_count=gen.reference_count, emitted=gen.emitted,
                         fallback_targets=gen.fallback_targets, inference_mode=inference_mode,
                         kmajor_weights=kmajor_names)


def _kmajor_weights(graph: Graph, constants: dict[str, torch.Tensor],
                    device: torch.device | None) -> list[str]:
    """Store the weights of ``gemm="blas"`` linears K-major (codegen/blas.py), in place in
    ``constants``; returns their names.

    Only a weight whose every use is the weight of a blas linear, on the CPU in float32;
    the tensor keeps its [N, K] values (a transposed view of the new storage), so the
    graph's constant can share it (``CompiledModel`` points it here: one copy).
    """
    if device is not None and device.type != "cpu":
        return []
    names = []
    for cname, v in graph.constants.items():
        t = constants.get(cname)
        if (t is not None and t.dim() == 2 and t.dtype == torch.float32
                and t.device.type == "cpu" and stored_kmajor(v)):
            constants[cname] = kmajor(t)
            names.append(cname)
    return names


__all__ = ["generate_python", "PythonProgram"]
