"""The onnxruntime backend: a graph becomes an ONNX model run by an ORT session.

``export_graph(graph)`` writes one ONNX model per graph: standard ONNX ops
(opset 17 unless asked), symbolic dims as ``dim_param`` names, constants as
initializers and, with ``fused=True``, ONNX Runtime's ``com.microsoft`` fused
operators where they compute exactly what the IR op does (GroupQueryAttention,
MultiHeadAttention, SkipLayerNormalization, SkipSimplifiedLayerNormalization,
FastGelu, BiasGelu, Gelu, RotaryEmbedding, QuickGelu, FusedMatMul).

The per-op lowerings live in :mod:`transfuse.codegen.onnx_ops` (standard ops)
and :mod:`transfuse.codegen.onnx_fused` (the fused ones). They write through
:class:`OnnxBuilder`, which owns names, initializers, dims as tensors, casts and
the "views" that let an attention op take its ``[B, S, H*D]`` projections
directly instead of the ``[B, H, S, D]`` permutes the IR shows. The builder
emits eagerly and prunes at the end: a node whose outputs nobody needs (a
permute an attention op looked through) is dropped, so lowerings stay local.

``OrtProgram(graph)`` (:mod:`transfuse.codegen.onnx_program`, re-exported here) is
the runnable form: an ORT session over the model, sharing the graph's weights.

Glossary: B batch, H heads, Hkv key/value heads, S query length, T key length,
D head dim, E hidden size (H*D).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import sympy
import torch
from onnx import TensorProto, helper

from transfuse.errors import LoweringError
from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.ops import get_op
from transfuse.ir.types import Dim, DType, dim_str

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MS_DOMAIN = "com.microsoft"
#: a model above this many bytes cannot be one protobuf: its weights go to an external file
PROTOBUF_LIMIT = 2**31 - 1
#: constants with more elements than this are handed to the session by reference
_EXTERNAL_MIN_NUMEL = 64

ONNX_DTYPES: dict[DType, int] = {
    DType.f64: TensorProto.DOUBLE, DType.f32: TensorProto.FLOAT, DType.f16: TensorProto.FLOAT16,
    DType.bf16: TensorProto.BFLOAT16, DType.f8e4m3: TensorProto.FLOAT8E4M3FN,
    DType.f8e5m2: TensorProto.FLOAT8E5M2, DType.i64: TensorProto.INT64,
    DType.i32: TensorProto.INT32, DType.i16: TensorProto.INT16, DType.i8: TensorProto.INT8,
    DType.u8: TensorProto.UINT8, DType.bool: TensorProto.BOOL,
}


def onnx_dtype(d: DType) -> int:
    return ONNX_DTYPES[d]


# -- tensors as initializers --------------------------------------------------------------


def tensor_proto(name: str, t: torch.Tensor, *, external: bool = False) -> TensorProto:
    """An initializer for ``t``: its bytes, or (``external``) a placeholder that the session
    fills with an ``OrtValue`` view of ``t`` (``SessionOptions.add_external_initializers``)."""
    t = t.detach()
    tp = TensorProto()
    tp.name = name
    tp.data_type = onnx_dtype(DType.from_torch(t.dtype))
    tp.dims.extend(t.shape)
    if external:
        tp.data_location = TensorProto.EXTERNAL
        entry = tp.external_data.add()
        entry.key, entry.value = "location", "transfuse-session-initializer"
        return tp
    t = t.cpu().contiguous()
    if t.dtype == torch.bool:
        tp.raw_data = t.numpy().astype(np.bool_).tobytes()
    else:
        tp.raw_data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return tp


def _numpy_view(t: torch.Tensor) -> np.ndarray | None:
    """A numpy array sharing ``t``'s memory (contiguous CPU), or None (no numpy dtype)."""
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        return None
    return t.detach().numpy()


# -- the builder ----------------------------------------------------------------------------


class OnnxBuilder:
    """Builds the ONNX graph of one IR graph; the object every lowering writes through.

    Names: ``name(v)`` is the ONNX tensor of an IR value (a constant becomes an
    initializer on first use); ``bind(v, name)`` defines one; ``fresh(hint)`` makes a new
    one. ``add(op_type, inputs, ...)`` appends a node and returns its output name(s).
    Dims: ``dim(d)`` / ``shape(dims)`` give 1-D int64 tensors for static or symbolic
    dims, ``scalar_dim(d)`` a 0-d one. ``fused`` says whether com.microsoft ops may be used.
    """

    def __init__(self, graph: Graph, *, fused: bool = True, opset: int = DEFAULT_OPSET,
                 providers: Sequence[str] | None = None):
        if not 17 <= opset <= 21:
            raise LoweringError(f"onnx backend: opset {opset} is not supported (17..21)")
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
        #: ids of linear nodes whose bias a following fused op adds (see onnx_fused.plan)
        self.folded_bias: set[int] = set()
        #: ONNX name of a last-axis split output -> (split input, index, number of parts)
        self.split_of: dict[str, tuple[str, int, int]] = {}
        #: linear node id -> output columns actually read (see onnx_fused.plan)
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

    # -- the whole graph -------------------------------------------------------------------

    def lower_all(self) -> None:
        from transfuse.codegen.onnx_fused import plan
        from transfuse.codegen.onnx_ops import get_lowering

        if self.fused:
            plan(self)
        for node in self.graph.nodes:
            get_op(node.op)  # an unknown op is an error here, not in ORT
            low = get_lowering(node.op)
            reason = (f"no onnx lowering for op {node.op!r}" if low is None
                      else low.refuses(node))
            if reason is not None:
                raise LoweringError(f"onnx backend cannot lower {_describe(node)}: {reason}")
            self.current = node
            try:
                outs = low.lower(self, node)
            except LoweringError as e:
                raise LoweringError(f"onnx backend cannot lower {_describe(node)}: {e}") from None
            finally:
                self.current = None
            if node.outputs:
                outs = [outs] if isinstance(outs, str) else list(outs)
                if len(outs) != len(node.outputs):
                    raise LoweringError(f"onnx lowering of {node.op} made {len(outs)} outputs "
                                        f"for {len(node.outputs)}")
                for v, name in zip(node.outputs, outs):
                    if name:
                        self.bind(v, name)

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
            nodes, _safe(name or g.name or "main"),
            [helper.make_tensor_value_info(n, onnx_dtype(v.type.dtype), _dims(v.type.shape))
             for n, v in zip(inputs, g.inputs)],
            [helper.make_tensor_value_info(n, onnx_dtype(v.type.dtype), _dims(v.type.shape))
             for n, v in zip(outs, g.outputs)],
            initializer=[tensor_proto(k, t, external=external and t.numel() > _EXTERNAL_MIN_NUMEL
                                      and _numpy_view(t) is not None)
                         for k, t in inits.items()])
        opsets = [helper.make_opsetid("", self.opset)]
        if any(n.domain == MS_DOMAIN for n in nodes):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="transfuse",
                                  producer_version=_version())
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


def _safe(text: str) -> str:
    return "".join(c if c.isprintable() else "_" for c in text)


def _describe(node: Node) -> str:
    outs = ", ".join(f"%{v.name}" for v in node.outputs)
    where = f" (from {node.source})" if node.source else ""
    return f"{outs + ' = ' if outs else ''}{node.op}{where}"


def _version() -> str:
    import transfuse

    return transfuse.__version__


# -- public: export ----------------------------------------------------------------------------


def output_names(signature: Any, count: int) -> list[str]:
    """ONNX output names from the signature's output structure (``logits``, ``output_0``...)."""
    if signature is None:
        return [f"output_{i}" for i in range(count)]
    names: dict[int, str] = {}

    def walk(tree: dict, path: list[str]) -> None:
        kind = tree.get("kind")
        if kind == "tensor":
            names.setdefault(tree["index"], "_".join(path) or "output")
        elif kind in ("tuple", "list"):
            for i, item in enumerate(tree.get("items", [])):
                walk(item, path + [str(i)] if path else [f"output_{i}"])
        elif kind in ("dict", "dataclass"):
            for key, item in zip(tree.get("keys", []), tree.get("items", [])):
                walk(item, path + [str(key)])

    walk(signature.output_tree, [])
    out, seen = [], set()
    input_names = {s.name for s in signature.inputs}
    for i in range(count):
        n = "".join(c if c.isalnum() or c in "_." else "_" for c in names.get(i, f"output_{i}"))
        while n in seen or n in input_names:
            n += "_"
        seen.add(n)
        out.append(n)
    return out


def lower_graph(graph: Graph, signature: Any = None, *, fused: bool = True,
                opset: int = DEFAULT_OPSET, external: bool = False,
                providers: Sequence[str] | None = None
                ) -> tuple[onnx.ModelProto, dict[str, torch.Tensor], OnnxBuilder]:
    builder = OnnxBuilder(graph, fused=fused, opset=opset, providers=providers)
    builder.lower_all()
    names = output_names(signature, len(graph.outputs))
    model, inits = builder.build(names, external=external)
    return model, inits, builder


def export_graph(graph: Graph, signature: Any = None, *, fused: bool = True,
                 opset: int = DEFAULT_OPSET, providers: Sequence[str] | None = None
                 ) -> onnx.ModelProto:
    """The graph as a self-contained ONNX model (weights inside).

    ``fused``: use ORT's com.microsoft fused ops where they match exactly; ``False`` gives
    standard ONNX ops only (any ONNX runtime). ``providers``: the execution providers the
    model is meant for (default CPU); where two exact forms exist it picks the one faster
    there (SkipLayerNormalization for CUDA, Add + LayerNormalization for the CPU EP). Every
    fused op emitted runs on the CPU EP.
    """
    model, _, _ = lower_graph(graph, signature, fused=fused, opset=opset, providers=providers)
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *,
               external_threshold: int = PROTOBUF_LIMIT) -> Path:
    """Write ``model`` to ``path``; weights go to ``<name>.data`` next to it when the model is
    larger than ``external_threshold`` bytes (protobuf cannot hold more than 2 GB)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # external data is appended to: start from nothing
    if size + 1_000_000 > external_threshold:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


__all__ = ["export_graph", "save_model", "lower_graph", "OnnxBuilder", "OrtProgram",
           "generate_onnxruntime", "session_options", "DEFAULT_OPSET", "MS_DOMAIN"]

# the runnable program (re-exported: ``transfuse.codegen.onnx.OrtProgram`` is the API)
from transfuse.codegen.onnx_program import (  # noqa: E402
    OrtProgram,
    generate_onnxruntime,
    session_options,
)
