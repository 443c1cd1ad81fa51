"""The ONNX frontend: an ONNX model (path, bytes or ``onnx.ModelProto``) -> IR :class:`Graph`.

    captured = capture_onnx("model.onnx", dynamic={"seq": (1, 1024)})
    captured.graph, captured.signature, captured.example_inputs

How it works:

1. Load without external data (a corrupt or truncated protobuf is a
   :class:`CaptureError`); check the IR version and the default-domain opset
   (:data:`IR_VERSIONS`, :data:`OPSETS`; anything else is an
   :class:`UnsupportedOpError` with the versions); inline model-local functions.
2. Check the graph: every input a node reads is a graph input, an initializer or
   another node's output; outputs are defined once; no cycle (nodes are put in
   topological order). Then every op is looked up in ``frontend/onnx_ops/`` (one file per
   op family): all the unknown ones are reported at once, with their node names.
3. ONNX shape inference (``strict_mode``, ``data_prop``) validates the model; its
   result cross-checks every converted value (element type, rank, static dims).
4. Graph inputs become IR inputs; their ``dim_param`` names become our symbols
   (sanitised to identifiers; a dynamic dim without a name gets ``<input>_<axis>``);
   ``dynamic={"name": (lo, hi)}`` gives their ranges. Initializers become constants,
   their external data read safely by ``onnx_external.py``.
5. Nodes are converted in order by their ``onnx_ops`` entries. Shape computations
   (Shape -> Gather -> Concat -> Reshape, ...) are evaluated at capture on
   :class:`~transfuse.frontend.onnx_ops.Known` values, vectors of ints and symbolic
   dims, so they end up as IR attrs (``reshape {shape=[batch, seq, 12, 64]}``); a shape
   that cannot be determined is a :class:`CaptureError` naming the node.
6. Dead nodes are removed, the graph verified. The signature takes the graph inputs
   by their ONNX names (positionally in graph order, or as keywords) and returns one
   tensor, or a dict of output name -> tensor when the model has several outputs.

Every IR node carries ``meta["onnx_node"]`` (the ONNX node name) and, for models
from ``torch.onnx.export``, ``meta["source"]`` (the module path) and ``meta["loc"]``.
"""

from __future__ import annotations

import heapq
import keyword
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import torch

from transfuse.errors import CaptureError, TransfuseError, UnsupportedOpError
from transfuse.frontend import onnx_ops
from transfuse.frontend.dynamic import UNBOUNDED, parse_entry
from transfuse.frontend.onnx_external import (
    DEFAULT_MAX_EXTERNAL_BYTES,
    Budget,
    check_dims,
    dtype_of,
    from_numpy,
    tensor_from_proto,
)
from transfuse.frontend.onnx_ops import Known, Missing, OnnxNode, node_label
from transfuse.frontend.torch_export import Captured
from transfuse.ir.graph import Graph, Value
from transfuse.ir.ops import get_op
from transfuse.ir.signature import InputSpec, Signature
from transfuse.ir.types import DType, TensorType, dim_str, sym
from transfuse.ir.verify import verify

log = logging.getLogger(__name__)

#: default-domain opsets the converters are written for (inclusive)
OPSETS = (13, 23)
#: model IR versions accepted (opset 13 came with IR 7, opset 23 with IR 11)
IR_VERSIONS = (7, 11)
#: the size symbolic dims get in the example inputs (clipped to the symbol's range)
EXAMPLE_SIZE = 8


def capture_onnx(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    *,
    dynamic: Mapping[str, Any] | None = None,
    max_external_bytes: int = DEFAULT_MAX_EXTERNAL_BYTES,
    base_dir: str | os.PathLike | None = None,
    static_inputs: Mapping[str, Any] | None = None,
) -> Captured:
    """Capture an ONNX model into an IR graph.

    Args:
        model: a path to a ``.onnx`` file, its bytes, or an ``onnx.ModelProto``.
        dynamic: ranges of the model's symbolic dims, ``{"seq": (1, 1024)}`` (names as in
            the model's ``dim_param``; default range ``[1, unbounded]``).
        max_external_bytes: cap on the external data read for the weights.
        base_dir: where external data lives for a model given as bytes or a proto
            (default: the model file's directory; none for bytes/protos).
        static_inputs: graph inputs fixed at capture, ``{name: tensor or array}``: they become
            constants (like TensorRT's shape tensors), so an input that carries a shape,
            axes or repeats can feed the ops that need them known. The compiled model
            no longer takes them.

    Raises :class:`CaptureError` (unreadable model, bad graph, shapes that cannot be
    determined), :class:`UnsupportedOpError` (IR/opset version, unknown ops) and
    :class:`~transfuse.errors.ArtifactError` (unsafe or broken external data).
    """
    proto, where_dir, label = _load(model)
    if base_dir is not None:
        where_dir = os.fspath(base_dir)
    _check_versions(proto, label)
    if len(proto.functions):
        proto = _inline(proto, label)
    nodes = _ordered_nodes(proto.graph, label)
    opsets = _opsets(proto)
    _check_ops(nodes, opsets, label)
    inferred = _infer(proto, label)
    cx = _Converter(proto, nodes, opsets, inferred, where_dir, Budget(max_external_bytes))
    cx.bind_inputs(dynamic, static_inputs)
    graph = cx.run()
    symbols = cx.symbol_ranges
    inputs = [InputSpec(name, v.type) for name, v in zip(cx.input_names, graph.inputs)]
    outs = [o.name for o in proto.graph.output]
    if len(outs) == 1:
        tree = {"kind": "tensor", "index": 0}
    else:
        tree = {"kind": "dict", "keys": outs,
                "items": [{"kind": "tensor", "index": i} for i in range(len(outs))]}
    signature = Signature(inputs, symbols, tree, len(graph.outputs))
    examples = example_inputs(graph, cx.input_names, symbols)
    log.debug("captured %s: %d nodes, symbols %s", label, len(graph), symbols)
    return Captured(graph, signature, examples)


# -- loading and checks ---------------------------------------------------------------------


def _load(model: Any) -> tuple[onnx.ModelProto, str | None, str]:
    """(proto without external data, the directory external data lives in, a label)."""
    if isinstance(model, onnx.ModelProto):
        proto, where, label = model, None, f"ONNX model {model.graph.name or '<unnamed>'!r}"
    elif isinstance(model, (bytes, bytearray, memoryview)):
        proto = _parse(bytes(model), "the ONNX model bytes")
        where, label = None, "ONNX model (bytes)"
    elif isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise CaptureError(f"no such ONNX file: {path!r}")
        with open(path, "rb") as f:
            proto = _parse(f.read(), repr(path))
        where, label = os.path.dirname(os.path.abspath(path)), f"ONNX model {path!r}"
    else:
        raise CaptureError(f"capture_onnx takes a path, bytes or an onnx.ModelProto, got "
                           f"{type(model).__name__}")
    if not proto.HasField("graph"):
        raise CaptureError(f"{label} has no graph; is it an ONNX model?")
    if not len(proto.opset_import):
        raise CaptureError(f"{label} declares no opset_import; is it an ONNX model?")
    return proto, where, label


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise CaptureError(f"cannot parse {what} as an ONNX model: the protobuf is truncated or "
                           f"corrupt ({type(e).__name__}: {e})") from None
    return proto


def _opsets(proto: onnx.ModelProto) -> dict[str, int]:
    return {(o.domain if o.domain != "ai.onnx" else ""): o.version for o in proto.opset_import}


def _check_versions(proto: onnx.ModelProto, label: str) -> None:
    lo, hi = IR_VERSIONS
    if not lo <= proto.ir_version <= hi:
        raise UnsupportedOpError(
            f"{label} has IR version {proto.ir_version}; transfuse reads IR versions {lo} to "
            f"{hi} (ONNX opsets {OPSETS[0]} to {OPSETS[1]}). Re-export or convert the model "
            "(onnx.version_converter) to a version in that range")
    opset = _opsets(proto).get("")
    if opset is None:
        if any(n.domain in ("", "ai.onnx") for n in proto.graph.node):
            raise CaptureError(f"{label} uses default-domain ops but imports no default opset")
        return
    if not OPSETS[0] <= opset <= OPSETS[1]:
        raise UnsupportedOpError(
            f"{label} uses opset {opset} of the default ONNX domain; transfuse supports opsets "
            f"{OPSETS[0]} to {OPSETS[1]} (IR version {proto.ir_version}). Re-export with an "
            f"opset in that range (e.g. torch.onnx.export(..., opset_version=18)) or convert it "
            "with onnx.version_converter")


def _inline(proto: onnx.ModelProto, label: str) -> onnx.ModelProto:
    try:
        import onnx.inliner

        return onnx.inliner.inline_local_functions(proto)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"{label}: cannot inline its local functions: {e}") from None


def _ordered_nodes(g: onnx.GraphProto, label: str) -> list[tuple[int, onnx.NodeProto]]:
    """The nodes in topological order (stable), after checking every name is defined once."""
    if len(g.sparse_initializer):
        raise CaptureError(f"{label} has sparse initializers "
                           f"({', '.join(s.values.name for s in g.sparse_initializer)}); "
                           "transfuse does not read them")
    defined: dict[str, str] = {}
    for name in [i.name for i in g.initializer] + [i.name for i in g.input]:
        defined.setdefault(name, "graph input")
    producer: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            if not o:
                continue
            if o in producer or o in defined:
                first = node_label(g.node[producer[o]], producer[o]) if o in producer \
                    else "a graph input or initializer"
                raise CaptureError(f"{label}: value {o!r} is defined twice, by {first} and "
                                   f"by {node_label(n, i)}; ONNX values are assigned once")
            producer[o] = i
    for i, n in enumerate(g.node):
        for x in n.input:
            if x and x not in defined and x not in producer:
                raise CaptureError(
                    f"{label}: {node_label(n, i)} reads {x!r}, which is no graph input, no "
                    "initializer (a missing initializer?) and no node's output")
    for o in g.output:
        if o.name not in defined and o.name not in producer:
            raise CaptureError(f"{label}: graph output {o.name!r} is produced by no node and is "
                               "no input or initializer")
    deps = [{producer[x] for x in n.input if x in producer} for n in g.node]
    users: dict[int, list[int]] = {}
    for i, ds in enumerate(deps):
        for d in ds:
            users.setdefault(d, []).append(i)
    missing = [len(ds) for ds in deps]
    ready = [i for i, m in enumerate(missing) if m == 0]
    order: list[int] = []
    heapq.heapify(ready)
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, ()):
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(g.node):
        cycle = _find_cycle(deps, set(range(len(g.node))) - set(order))
        names = " -> ".join(node_label(g.node[i], i) for i in cycle)
        raise CaptureError(f"{label}: the graph has a cycle ({names}); ONNX graphs are acyclic")
    return [(i, g.node[i]) for i in order]


def _find_cycle(deps: list[set[int]], stuck: set[int]) -> list[int]:
    start = min(stuck)
    path, seen, cur = [], {}, start
    while cur not in seen:
        seen[cur] = len(path)
        path.append(cur)
        cur = min(d for d in deps[cur] if d in stuck)
    return path[seen[cur]:] + [cur]


def _check_ops(nodes: list[tuple[int, onnx.NodeProto]], opsets: dict[str, int],
               label: str) -> None:
    unknown: dict[str, list[str]] = {}
    for i, n in nodes:
        domain = "" if n.domain == "ai.onnx" else n.domain
        if onnx_ops.lookup(domain, n.op_type) is None:
            key = f"{domain}.{n.op_type}" if domain else n.op_type
            unknown.setdefault(key, []).append(n.name or f"#{i}")
    if unknown:
        parts = []
        for op, names in sorted(unknown.items()):
            shown = ", ".join(names[:5]) + (f", +{len(names) - 5} more" if len(names) > 5 else "")
            parts.append(f"{op} (nodes {shown})")
        raise UnsupportedOpError(
            f"{label} uses {len(unknown)} op type(s) transfuse does not know: "
            f"{'; '.join(parts)}. Supported: {', '.join(onnx_ops.supported_ops())}")


def _infer(proto: onnx.ModelProto, label: str) -> dict[str, tuple[int, list | None]]:
    """ONNX shape inference: value name -> (elem_type, dims or None); dims are int, str or None."""
    try:
        out = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True,
                                                data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        raise CaptureError(f"{label}: ONNX shape inference rejects the model: {e}") from None
    except ValueError as e:  # e.g. a proto over 2 GB: skip the cross-check
        log.info("%s: ONNX shape inference skipped: %s", label, e)
        return {}
    types: dict[str, tuple[int, list | None]] = {}
    for vi in list(out.graph.value_info) + list(out.graph.output):
        t = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if t is None or not t.elem_type:
            continue
        dims = None
        if t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else
                    (d.dim_param or None) for d in t.shape.dim]
        types[vi.name] = (t.elem_type, dims)
    return types


# -- symbols ----------------------------------------------------------------------------------


def symbol_name(raw: str, taken: set[str]) -> str:
    """A dim_param as an identifier (``batch size`` -> ``batch_size``), unique among ``taken``."""
    name = re.sub(r"\W", "_", raw.strip()) or "dim"
    if name[0].isdigit():
        name = "d_" + name
    if keyword.iskeyword(name) or name.startswith("_"):
        name = "d" + name if name.startswith("_") else name + "_"
    base, k = name, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


# -- conversion -------------------------------------------------------------------------------


class _Converter:
    """Walks the ONNX nodes in order and builds the IR graph through the ``onnx_ops`` table."""

    def __init__(self, proto: onnx.ModelProto, nodes, opsets: dict[str, int],
                 inferred: dict, base_dir: str | None, budget: Budget):
        self.proto = proto
        self.nodes = nodes
        self.opsets = opsets
        self.inferred = inferred
        self.base_dir = base_dir
        self.budget = budget
        self.graph = Graph(proto.graph.name and re.sub(r"\W", "_", proto.graph.name) or "main")
        if not self.graph.name.isidentifier():
            self.graph.name = "main"
        self.env: dict[str, Any] = {}
        self.input_names: list[str] = []
        self.symbol_ranges: dict[str, tuple[int, int]] = {}
        self.param_of: dict[str, str] = {}  # model dim_param -> our symbol name
        self.current: OnnxNode | None = None
        self.meta: dict[str, str] = {}
        self._consts: dict[tuple, Value] = {}
        self._by_content: dict[tuple, list[Value]] = {}
        self.cache: dict[tuple, Any] = {}  # converters memoise per-value work here
        self.readers = Counter(x for _, n in nodes for x in n.input if x)
        self.readers.update(o.name for o in proto.graph.output)

    # -- inputs and constants -----------------------------------------------------------------

    def bind_inputs(self, dynamic: Mapping[str, Any] | None,
                    static: Mapping[str, Any] | None = None) -> None:
        g = self.proto.graph
        inits = {t.name for t in g.initializer}
        for t in g.initializer:
            self.env[t.name] = self.add_weight(tensor_from_proto(t, self.base_dir, self.budget),
                                               t.name)
        static = dict(static or {})
        names = [vi.name for vi in g.input if vi.name not in inits]
        unknown = sorted(set(static) - set(names))
        if unknown:
            raise CaptureError(f"static_inputs names {unknown}, which are not graph inputs "
                               f"(inputs: {names})")
        for vi in g.input:
            if vi.name in static:
                self.env[vi.name] = self._static_input(vi, static[vi.name])
                inits.add(vi.name)
        taken: set[str] = set()
        pending: list[tuple[str, TensorType]] = []
        for vi in g.input:
            if vi.name in inits:
                continue  # an initializer listed as an input (IR < 4 style): a constant
            if not vi.type.HasField("tensor_type"):
                raise CaptureError(f"graph input {vi.name!r} is not a tensor "
                                   f"({vi.type.WhichOneof('value')}); transfuse takes tensors")
            tt = vi.type.tensor_type
            dtype = dtype_of(tt.elem_type, f"graph input {vi.name!r}")
            if not tt.HasField("shape"):
                raise CaptureError(f"graph input {vi.name!r} has no shape (its rank is unknown); "
                                   "give the model's inputs a shape")
            dims: list = []
            for axis, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value"):
                    dims.append(check_dims([d.dim_value], f"graph input {vi.name!r}")[0])
                    continue
                raw = d.dim_param or f"{vi.name}_{axis}"
                if raw not in self.param_of:
                    self.param_of[raw] = symbol_name(raw, taken)
                    taken.add(self.param_of[raw])
                dims.append(sym(self.param_of[raw]))
            pending.append((vi.name, TensorType(dtype, dims)))
        self.symbol_ranges = self._ranges(dynamic)
        for name, t in pending:
            self.env[name] = self.graph.add_input(name, t)
            self.input_names.append(name)

    def _static_input(self, vi: onnx.ValueInfoProto, value: Any) -> Any:
        t = value if isinstance(value, torch.Tensor) else from_numpy(np.asarray(value))
        want = dtype_of(vi.type.tensor_type.elem_type, f"graph input {vi.name!r}")
        if t.dtype != want.torch:
            raise CaptureError(f"static input {vi.name!r} has dtype {t.dtype}, the model says "
                               f"{want}")
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in vi.type.tensor_type.shape.dim]
        if None not in dims and len(dims) != t.dim() and math.prod(dims) == t.numel():
            t = t.reshape(dims)  # e.g. a one-element array for a 0-d input
        if len(dims) != t.dim() or any(d is not None and d != n for d, n in zip(dims, t.shape)):
            raise CaptureError(f"static input {vi.name!r} has shape {list(t.shape)}, the model "
                               f"says {['?' if d is None else d for d in dims]}")
        return onnx_ops.tensor_result(self, t.contiguous(), vi.name)

    def _ranges(self, dynamic: Mapping[str, Any] | None) -> dict[str, tuple[int, int]]:
        ranges = {s: (1, UNBOUNDED) for s in self.param_of.values()}
        if dynamic is None:
            return ranges
        if not isinstance(dynamic, Mapping):
            raise CaptureError(f"dynamic must be a dict like {{'seq': (1, 1024)}}, got "
                               f"{type(dynamic).__name__}")
        for name, entry in dynamic.items():
            ours = self.param_of.get(name, name if name in ranges else None)
            if ours is None:
                known = ", ".join(repr(p) for p in self.param_of) or "none"
                raise CaptureError(f"dynamic dim {name!r} is not a symbolic dim of the model "
                                   f"(its dims: {known})")
            lo, hi, explicit = parse_entry(name, entry)
            if explicit is not None:
                raise CaptureError(f"dynamic dim {name!r}: an ONNX model names its own dims; "
                                   "give just the range, e.g. {'seq': (1, 1024)}")
            ranges[ours] = (lo, hi)
        return ranges

    def add_weight(self, tensor: torch.Tensor, hint: str) -> Value:
        """A graph constant; one that holds the same data as an earlier one shares its value
        (exporters store tied weights twice, once transposed)."""
        key = (tensor.dtype, tuple(tensor.shape), _fingerprint(tensor))
        for v in self._by_content.get(key, ()):
            if torch.equal(v.const, tensor):
                return v
        v = self.graph.add_constant(tensor, hint)
        self._by_content.setdefault(key, []).append(v)
        return v

    def const(self, value: Any, dtype: DType) -> Value:
        """A shared 0-d constant (one per value and dtype)."""
        key = (repr(value), dtype)
        if key not in self._consts:
            self._consts[key] = self.graph.add_constant(torch.tensor(value, dtype=dtype.torch),
                                                        "c")
        return self._consts[key]

    # -- driver -------------------------------------------------------------------------------

    def run(self) -> Graph:
        for index, n in self.nodes:
            node = OnnxNode(n, index, self.opsets.get("" if n.domain == "ai.onnx" else n.domain,
                                                      1), self)
            self.current = node
            self.meta = _node_meta(n)
            fn = onnx_ops.lookup(node.domain, node.op_type)
            try:
                outs = fn(self, node)
            except TransfuseError:
                raise
            except Exception as e:  # noqa: BLE001 - a converter crash names the node
                raise CaptureError(f"frontend bug converting {self.where()}: "
                                   f"{type(e).__name__}: {e}") from e
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            for k, name in enumerate(n.output):
                if not name:
                    continue
                val = outs[k] if k < len(outs) else None
                if val is None:
                    val = Missing(f"output {k} of {self.where()} is not supported")
                self._check(name, val)
                self.env[name] = val
        outputs = [self.output_value(o.name) for o in self.proto.graph.output]
        self.graph.set_outputs(outputs)
        self._dead_code()
        self.graph.remove_unused_constants()
        try:
            verify(self.graph)
        except TransfuseError as e:
            raise CaptureError(f"frontend bug: the captured graph does not verify: {e}") from e
        return self.graph

    def output_value(self, name: str) -> Value:
        self.current = None
        v = self.env[name]
        if isinstance(v, Missing):
            raise CaptureError(f"graph output {name!r}: {v.reason}")
        return self.value(v)

    def _check(self, name: str, val: Any) -> None:
        """Compare a converted value with ONNX shape inference (element type, rank, static dims)."""
        got = self.inferred.get(name)
        if got is None or isinstance(val, Missing):
            return
        elem, dims = got
        if isinstance(val, Known):
            dtype, shape = val.dtype, val.shape
        else:
            dtype, shape = val.dtype, val.shape
        try:
            want = dtype_of(elem, f"value {name!r}")
        except CaptureError:
            return
        bad = want != dtype
        if dims is not None:
            bad = bad or len(dims) != len(shape) or any(
                isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(dims, shape))
        if bad:
            theirs = f"{want.value}[{', '.join('?' if d is None else str(d) for d in dims or [])}]"
            ours = f"{dtype.value}[{', '.join(dim_str(d) for d in shape)}]"
            raise CaptureError(f"frontend bug: {self.where()} gives {name!r} the type {ours}, "
                               f"but ONNX shape inference says {theirs}")

    def _dead_code(self) -> None:
        outputs = {id(v) for v in self.graph.outputs}
        for node in reversed(self.graph.nodes):
            if get_op(node.op).pure and not any(v.uses or id(v) in outputs for v in node.outputs):
                self.graph.erase(node)

    # -- helpers for the onnx_ops converters --------------------------------------------------

    def where(self) -> str:
        return self.current.label if self.current is not None else "the graph outputs"

    def op_name(self) -> str:
        return self.current.op_type if self.current is not None else "output"

    def fail(self, msg: str) -> CaptureError:
        return CaptureError(f"{self.where()}: {msg}")

    def unsupported(self, msg: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.where()}: {msg}")

    def single_use(self, name: str) -> bool:
        """Whether ONNX value ``name`` is read once (by the current node) and is no output."""
        return self.readers[name] == 1

    def lookup(self, name: str) -> Any:
        if not name:
            return None
        v = self.env[name]
        if isinstance(v, Missing):
            raise CaptureError(f"{self.where()} reads {name!r}: {v.reason}")
        return v

    def value(self, x: Any) -> Value:
        """``x`` as an IR value (a Known becomes a constant, or shape arithmetic)."""
        if isinstance(x, Value):
            return x
        if isinstance(x, Known):
            return onnx_ops.materialize(self, x)
        raise self.fail(f"expected a tensor, got {x!r}")

    def emit(self, op: str, inputs, attrs: dict | None = None, out_types=None) -> Any:
        """Create an IR node carrying the current node's provenance; its value(s)."""
        try:
            node = self.graph.create(op, list(inputs), attrs or {}, meta=dict(self.meta),
                                     out_types=out_types)
        except TransfuseError as e:
            raise CaptureError(f"{self.where()}: cannot express it as IR {op}: {e}") from e
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def op(self, op: str, *inputs: Value | None, **attrs) -> Value:
        return self.emit(op, inputs, attrs)


def _fingerprint(t: torch.Tensor) -> bytes:
    """A cheap content key: up to 64 evenly spaced elements."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return b""
    step = max(1, flat.numel() // 64)
    sample = flat[::step][:64]
    if sample.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        sample = sample.view(torch.uint8 if sample.element_size() == 1 else torch.int16)
    return sample.contiguous().numpy().tobytes()


_SCOPES = "pkg.torch.onnx.name_scopes"
_STACK = "pkg.torch.onnx.stack_trace"
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _node_meta(n: onnx.NodeProto) -> dict[str, str]:
    """Provenance: the ONNX node name, and the module path and user line ``torch.onnx.export``
    recorded (``pkg.torch.onnx.name_scopes``, ``pkg.torch.onnx.stack_trace``)."""
    meta = {"onnx_node": n.name, "source": "", "loc": ""}
    props = {p.key: p.value for p in n.metadata_props}
    scopes = props.get(_SCOPES)
    if scopes:
        parts = re.findall(r"'([^']*)'", scopes)
        if len(parts) >= 2:
            meta["source"] = parts[-2]
    elif n.name.startswith("/") and n.name.count("/") >= 2:  # TorchScript exporter names
        meta["source"] = ".".join(p for p in n.name.split("/")[1:-1] if p)
    frames = _FRAME.findall(props.get(_STACK, ""))
    if frames:
        meta["loc"] = f"{os.path.basename(frames[-1][0])}:{frames[-1][1]}"
    return meta


# -- example inputs ---------------------------------------------------------------------------


def example_inputs(graph: Graph, names: list[str], ranges: Mapping[str, tuple[int, int]],
                   seed: int = 0) -> list[torch.Tensor]:
    """Deterministic inputs of the graph's input types: symbolic dims set to
    :data:`EXAMPLE_SIZE` (clipped to their range); floats normal, ints in [0, 100),
    ``*mask*`` inputs all ones, ``*position*`` inputs counting along their last dim."""
    env = {s: min(max(EXAMPLE_SIZE, lo), hi) for s, (lo, hi) in ranges.items()}
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, v in zip(names, graph.inputs):
        shape = v.type.concrete(env)
        dtype = v.dtype
        lname = name.lower()
        if "mask" in lname:
            t = torch.ones(shape, dtype=dtype.torch)
        elif "position" in lname and not dtype.is_float and len(shape) >= 1:
            t = torch.arange(shape[-1], dtype=dtype.torch).expand(shape).contiguous()
        elif dtype == DType.bool:
            t = torch.rand(shape, generator=g) < 0.5
        elif dtype.is_float:
            t = torch.randn(shape, generator=g).to(dtype.torch)
        else:
            t = torch.randint(0, 100, shape, generator=g).to(dtype.torch)
        out.append(t)
    return out


__all__ = ["capture_onnx", "example_inputs", "symbol_name", "node_label", "OPSETS",
           "IR_VERSIONS", "EXAMPLE_SIZE"]
