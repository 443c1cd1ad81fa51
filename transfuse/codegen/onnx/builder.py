"""The object every onnxruntime lowering writes through: names, initializers, dims, views.

:class:`OnnxBuilder` owns the ONNX graph being built for one IR graph: names,
initializers, dims as tensors, casts and the "views" that let an attention op take its
``[B, S, H*D]`` projections directly instead of the ``[B, H, S, D]`` permutes the IR
shows. It emits eagerly and prunes at the end (:meth:`OnnxBuilder.build`): a node whose
outputs nobody needs (a permute an attention op looked through) is dropped, so
lowerings stay local. The loop over the graph's nodes is ``export.py``'s.

Glossary: B batch, H heads, S query length, D head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx
import sympy
import torch
from onnx import helper

from transfuse.codegen.onnx.tensors import (
    DEFAULT_OPSET,
    EXTERNAL_MIN_NUMEL,
    MS_DOMAIN,
    numpy_view,
    onnx_dtype,
    printable,
    tensor_proto,
)
from transfuse.codegen.version import transfuse_version
from transfuse.errors import LoweringError
from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.types import Dim, DType, dim_str


class OnnxBuilder:
    """Builds the ONNX graph of one IR graph; the object every lowering writes through.

    Names: ``name(v)`` is the ONNX tensor of an IR value (a constant becomes an
    initializer on first use); ``bind(v, name)`` defines one; ``fresh(hint)`` makes a new
    one. ``add(op_type, inputs, ...)`` appends a node and returns its output name(s).
    Dims: ``dim(d)`` / ``shape(dims)`` give 1-D int64 tensors for static or symbolic
    dims, ``scalar_dim(d)`` a 0-d one. ``fused`` says whether com.microsoft ops may be used.
    """

    #: the opsets this builder writes (a subclass for another consumer may widen them)
    OPSETS = range(17, 22)

    def __init__(self, graph: Graph, *, fused: bool = True, opset: int = DEFAULT_OPSET,
                 providers: Sequence[str] | None = None):
        if opset not in self.OPSETS:
            raise LoweringError(f"onnx backend: opset {opset} is not supported "
                                f"({self.OPSETS.start}..{self.OPSETS.stop - 1})")
        self.graph = graph
        self.fused = fused
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, torch.Tensor] = {}
        self.names: dict[int, str] = {}
        self.used: set[str] = set()
        self.notes: list[str] = []
        self.symbol_sources: dict[str, tuple[str, int]] = {}
        self._cache: dict[Any, str] = {}
        self._derived: dict[Any, str] = {}
        #: value id -> ONNX name of its [B, S, H*D] form (the value is [B, H, S, D], "bhsd")
        self.heads_first: dict[int, str] = {}
        #: value id -> ONNX name of its [B, S, H*D] form (the value is [B, S, H, D], "bshd")
        self.split_heads: dict[int, str] = {}
        #: ids of linear nodes whose bias a following fused op adds (see plan.py)
        self.folded_bias: set[int] = set()
        #: ONNX name of a last-axis split output -> (split input, index, number of parts)
        self.split_of: dict[str, tuple[str, int, int]] = {}
        #: linear node id -> output columns actually read (see plan.py)
        self.narrowed: dict[int, int] = {}
        #: the execution providers the model is for: picks between equivalent fused forms
        self.providers = list(providers or ["CPUExecutionProvider"])
        #: SkipLayerNormalization pays off with CUDA; on ORT's CPU EP Add + LayerNormalization
        #: is ~5x faster (measured with onnxruntime 1.32)
        self.skip_layer_norm = "CUDAExecutionProvider" in self.providers
        #: linear as FusedMatMul(transB) on the torch-layout weight (no transposed copy)
        self.fused_matmul = True
        self.current: Node | None = None
        for v in graph.inputs:
            self.bind(v, self.unique(v.name))
            for i, d in enumerate(v.type.shape):
                if isinstance(d, sympy.Symbol) and d.name not in self.symbol_sources:
                    self.symbol_sources[d.name] = (self.names[id(v)], i)

    # -- names ------------------------------------------------------------------------

    def unique(self, hint: str) -> str:
        base = "".join(c if c.isprintable() else "_" for c in str(hint)) or "t"
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    def fresh(self, hint: str = "t") -> str:
        return self.unique(f"_{hint}")

    def bind(self, v: Value, name: str) -> None:
        self.names[id(v)] = name

    def name(self, v: Value | None) -> str:
        """The ONNX tensor of ``v`` ("" for a missing optional input)."""
        if v is None:
            return ""
        try:
            return self.names[id(v)]
        except KeyError:
            pass
        if v.is_const:
            name = self.unique(v.name)
            self.initializers[name] = v.const
            self.bind(v, name)
            return name
        raise LoweringError(f"onnx backend: value %{v.name} is used before it is defined")

    def input(self, node: Node, i: int, dtype: DType | None = None) -> str:
        """The ``i``-th input of ``node`` ("" if missing), cast to ``dtype`` when given."""
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is None:
            return ""
        name = self.name(v)
        return self.cast(name, v.type.dtype, dtype) if dtype is not None else name

    # -- nodes ------------------------------------------------------------------------

    def add(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, *,
            domain: str = "", hint: str | None = None, **attrs: Any) -> Any:
        """Append a node; returns its output name (one output) or list of names."""
        if isinstance(outputs, int):
            stem = hint or op_type.lower()
            outs = [self.fresh(stem) for _ in range(outputs)]
        else:
            outs = list(outputs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        node = helper.make_node(op_type, list(inputs), outs, domain=domain or None,
                                name=self.unique(f"{op_type}_{len(self.nodes)}"), **attrs)
        src = self.current.source if self.current is not None else ""
        if src:
            entry = node.metadata_props.add()
            entry.key, entry.value = "source", src
        self.nodes.append(node)
        return outs[0] if isinstance(outputs, int) and outputs == 1 else outs

    def ms(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1,
           **attrs: Any) -> Any:
        """A com.microsoft node (only when ``fused``)."""
        assert self.fused, f"{op_type}: a com.microsoft op in a standard-ops export"
        return self.add(op_type, inputs, outputs, domain=MS_DOMAIN, **attrs)

    def memo(self, key: Any, make: Any) -> str:
        """``make()`` once per ``key`` for the whole graph (e.g. one padding bias for every
        layer); later calls return the first result."""
        name = self._cache.get(key)
        if name is None:
            name = self._cache[key] = make()
        return name

    # -- constants --------------------------------------------------------------------

    def const(self, value: Any, dtype: DType, hint: str = "c") -> str:
        """A small constant initializer (deduplicated)."""
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype.torch)
        t = t.to(dtype.torch)
        values = tuple(t.flatten().tolist()) if t.numel() <= 64 else id(t)
        key = ("const", dtype, tuple(t.shape), values)
        name = self._cache.get(key)
        if name is None:
            name = self._cache[key] = self.fresh(hint)
            self.initializers[name] = t
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(torch.tensor(list(values), dtype=torch.int64), DType.i64, "ints")

    def derived(self, key: Any, make: Any, hint: str) -> str:
        """An initializer computed once from constants (a transposed weight, a rotary cache)."""
        name = self._derived.get(key)
        if name is None:
            name = self._derived[key] = self.fresh(hint)
            self.initializers[name] = make()
        return name

    # -- casts ------------------------------------------------------------------------

    def cast(self, name: str, src: DType, dst: DType | None) -> str:
        if dst is None or src == dst or not name:
            return name
        key = ("cast", name, dst)
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = self.add("Cast", [name], to=onnx_dtype(dst), hint="cast")
        return out

    # -- dims as tensors -----------------------------------------------------------------

    def dim(self, d: Dim) -> str:
        """A 1-D int64 tensor [1] holding ``d``."""
        if isinstance(d, int):
            return self.ints([d])
        e = sympy.sympify(d)
        if e.is_Integer:
            return self.ints([int(e)])
        key = ("dim", sympy.srepr(e))
        name = self._cache.get(key)
        if name is None:
            name = self._cache[key] = self._dim_expr(e)
        return name

    def scalar_dim(self, d: Dim, dtype: DType = DType.i64) -> str:
        """A 0-d tensor holding ``d`` (of ``dtype``)."""
        if isinstance(d, int) or sympy.sympify(d).is_Integer:
            return self.const(int(d), dtype, "dim")
        key = ("scalar_dim", sympy.srepr(sympy.sympify(d)), dtype)
        name = self._cache.get(key)
        if name is None:
            flat = self.add("Reshape", [self.dim(d), self.ints([])], hint="dim")
            name = self._cache[key] = self.cast(flat, DType.i64, dtype)
        return name

    def shape(self, dims: Sequence[Dim]) -> str:
        """A 1-D int64 shape tensor; constant when every dim is static."""
        if all(isinstance(d, int) for d in dims):
            return self.ints([int(d) for d in dims])
        parts, run = [], []
        for d in dims:
            if isinstance(d, int):
                run.append(d)
                continue
            if run:
                parts.append(self.ints(run))
                run = []
            parts.append(self.dim(d))
        if run:
            parts.append(self.ints(run))
        key = ("shape", tuple(parts))
        name = self._cache.get(key)
        if name is None:
            name = self._cache[key] = self.add("Concat", parts, axis=0, hint="shape")
        return name

    def reshape_target(self, dims: Sequence[Dim]) -> str:
        """A Reshape shape for ``dims``: a constant with -1 for the symbolic dim if only one."""
        symbolic = [i for i, d in enumerate(dims) if not isinstance(d, int)]
        if len(symbolic) == 1 and all(d != 0 for d in dims if isinstance(d, int)):
            return self.ints([-1 if i == symbolic[0] else int(d) for i, d in enumerate(dims)])
        return self.shape(dims)

    def _dim_expr(self, e: sympy.Expr) -> str:
        if e.is_Integer:
            return self.ints([int(e)])
        if e.is_Symbol:
            try:
                src, axis = self.symbol_sources[e.name]
            except KeyError:
                raise LoweringError(f"onnx backend: symbolic dim {e.name!r} is not the size of "
                                    f"any input dim of graph {self.graph.name}") from None
            return self.add("Shape", [src], start=axis, end=axis + 1, hint=e.name)
        num, den = sympy.fraction(sympy.together(e))
        if den != 1 and not isinstance(e, (sympy.floor, sympy.ceiling)):
            return self._floordiv(self.dim(num), self.dim(den))  # exact: integer-valued
        if isinstance(e, sympy.floor):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            return self._floordiv(self.dim(num), self.dim(den))
        if isinstance(e, sympy.ceiling):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            neg = self.add("Neg", [self.dim(num)])
            return self.add("Neg", [self._floordiv(neg, self.dim(den))])
        if isinstance(e, (sympy.Add, sympy.Mul)):
            return self._chain("Add" if isinstance(e, sympy.Add) else "Mul",
                               [self.dim(a) for a in e.args])
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) > 0:
            return self._chain("Mul", [self.dim(e.base)] * int(e.exp))
        if isinstance(e, sympy.Mod):
            return self.add("Mod", [self.dim(e.args[0]), self.dim(e.args[1])], fmod=0)
        if isinstance(e, (sympy.Max, sympy.Min)):
            return self.add("Max" if isinstance(e, sympy.Max) else "Min",
                            [self.dim(a) for a in e.args])
        raise LoweringError(f"onnx backend: cannot compute dimension {e} with ONNX ops")

    def _chain(self, op_type: str, terms: list[str]) -> str:
        out = terms[0]
        for t in terms[1:]:
            out = self.add(op_type, [out, t])
        return out

    def _floordiv(self, a: str, b: str) -> str:
        """Exact floor division of int64 tensors (b > 0): (a - a mod b) / b."""
        rem = self.add("Mod", [a, b], fmod=0)
        return self.add("Div", [self.add("Sub", [a, rem]), b])

    # -- opset-dependent forms ----------------------------------------------------------

    def reduce(self, op_type: str, x: str, axes: Sequence[int] | None, keepdims: bool) -> str:
        """Reduce* over ``axes`` (None: all); axes moved from attribute to input at opset 18."""
        if axes is None:
            return self.add(op_type, [x], keepdims=int(keepdims))
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.add(op_type, [x, self.ints(axes)], keepdims=int(keepdims))
        return self.add(op_type, [x], axes=list(axes), keepdims=int(keepdims))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.add("Unsqueeze", [x, self.ints(axes)])

    def split(self, x: str, sizes: Sequence[Dim], axis: int) -> list[str]:
        return self.add("Split", [x, self.shape(sizes)], len(sizes), axis=axis)

    def build(self, output_names: Sequence[str] | None = None, *, external: bool = False,
              name: str | None = None) -> tuple[onnx.ModelProto, dict[str, torch.Tensor]]:
        """The model (pruned to what the outputs need) and its initializer tensors by name.

        ``external``: large initializers are placeholders for the session to fill.
        """
        g = self.graph
        inputs = [self.names[id(v)] for v in g.inputs]
        produced = {o: n for n in self.nodes for o in n.output if o}
        outs: list[str] = []
        for i, v in enumerate(g.outputs):
            src = self.name(v)
            out = self.unique(output_names[i] if output_names else f"output_{i}")
            node = produced.get(src)
            if node is not None and src not in outs:
                self._rename(src, out, produced)  # the producer writes the output directly
            else:  # an input, a constant or a value returned twice: copy it
                self.add("Identity", [src], [out])
            outs.append(out)
        nodes, needed = _prune(self.nodes, outs)
        inits = {k: t for k, t in self.initializers.items() if k in needed}
        graph = helper.make_graph(
            nodes, printable(name or g.name or "main"),
            [helper.make_tensor_value_info(n, onnx_dtype(v.type.dtype), _dims(v.type.shape))
             for n, v in zip(inputs, g.inputs)],
            [helper.make_tensor_value_info(n, onnx_dtype(v.type.dtype), _dims(v.type.shape))
             for n, v in zip(outs, g.outputs)],
            initializer=[tensor_proto(k, t, external=external and t.numel() > EXTERNAL_MIN_NUMEL
                                      and numpy_view(t) is not None)
                         for k, t in inits.items()])
        opsets = [helper.make_opsetid("", self.opset)]
        if any(n.domain == MS_DOMAIN for n in nodes):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="transfuse",
                                  producer_version=transfuse_version())
        model.ir_version = min(model.ir_version, 10)  # what onnxruntime >= 1.20 reads
        return model, inits

    def _rename(self, old: str, new: str, produced: dict[str, onnx.NodeProto]) -> None:
        for n in self.nodes:
            for seq in (n.input, n.output):
                for i, x in enumerate(seq):
                    if x == old:
                        seq[i] = new
        produced[new] = produced.pop(old)
        for k, v in self.names.items():
            if v == old:
                self.names[k] = new


def _prune(nodes: list[onnx.NodeProto], outputs: Sequence[str]) -> tuple[list, set[str]]:
    """Keep the nodes the outputs depend on (in order); the set of names they read."""
    needed = set(outputs)
    kept = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output if o):
            kept.append(n)
            needed.update(i for i in n.input if i)
    kept.reverse()
    return kept, needed


def _dims(shape: Sequence[Dim]) -> list[Any]:
    return [d if isinstance(d, int) else dim_str(d) for d in shape]


__all__ = ["OnnxBuilder"]
