"""The runnable form of the onnxruntime backend: an ORT session per graph.

``OrtProgram(graph)`` lowers the graph (``export.py``) and builds an
``InferenceSession`` tuned for speed: every graph optimization, ``intra_op_num_threads`` =
torch's thread count (or as asked), one inter-op thread, sequential execution; the CPU
execution provider, CUDA's when onnxruntime-gpu is installed and the program is moved there.

No weight is copied into the model: constants above a few elements are declared as external
initializers and handed to the session as ``OrtValue`` views of the graph's own tensors
(``SessionOptions.add_external_initializers``). A call wraps the torch inputs as ``OrtValue``
views, runs ``run_with_ort_values`` and returns ORT's outputs as torch tensors over the same
memory (``torch.from_numpy``); measured against ``session.run`` and IO binding on CPU it is as
fast, with no copies. A CUDA program binds inputs and preallocated torch outputs by pointer.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence

import onnx
import sympy
import torch
from onnx import TensorProto, helper

from transfuse.codegen.onnx.export import lower_graph
from transfuse.codegen.onnx.tensors import (
    DEFAULT_OPSET,
    MS_DOMAIN,
    numpy_view,
    printable,
    tensor_proto,
)
from transfuse.errors import ExecutionError, LoweringError
from transfuse.ir.graph import Graph
from transfuse.ir.types import eval_dim

logger = logging.getLogger(__name__)

# ORT's run errors read "... running <OpType> node. Name:'<name>' Status Message: <text>"
_ORT_NODE = re.compile(r"running (\w+) node\. Name:'([^']*)'")
_ORT_STATUS = re.compile(r"Status Message: (.*)", re.S)


def ort_providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise LoweringError("onnxruntime backend: CUDA needs onnxruntime-gpu "
                                "(CUDAExecutionProvider is not available; have "
                                f"{', '.join(available)})")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.type != "cpu":
        raise LoweringError(f"onnxruntime backend: no execution provider for {device}")
    return ["CPUExecutionProvider"]


def session_options(threads: int | None = None):
    """Settings for speed: every graph optimization, ``threads`` intra-op threads (default:
    torch's), one inter-op thread, sequential execution."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


def open_session(model: onnx.ModelProto, inits: dict, *, threads: int | None, providers: list,
                 disabled_optimizers: Sequence[str] = (), what: str):
    """An ``InferenceSession`` of ``model`` whose external initializers are ``inits`` (graph
    constant name -> tensor), handed over as ``OrtValue`` views (no copy); returns (session,
    keep): ``keep`` holds the memory the session reads and must live as long as it.
    ORT's own refusal (unsupported type, bad model) is a :class:`LoweringError` about ``what``."""
    import onnxruntime as ort

    so = session_options(threads)
    names, values, keep = [], [], []
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        tensor = inits[t.name].detach()
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            tensor = tensor.cpu().contiguous()
        array = numpy_view(tensor)
        keep.append((tensor, array))  # the session reads this memory
        names.append(t.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    if names:
        so.add_external_initializers(names, values)
    keep.append(values)
    try:
        session = ort.InferenceSession(model.SerializeToString(), so, providers=providers,
                                       disabled_optimizers=list(disabled_optimizers))
    except Exception as e:  # ORT's own errors: unsupported type, bad model
        raise LoweringError(f"onnxruntime rejected {what}: {type(e).__name__}: {e}") from e
    return session, keep


class OrtProgram:
    """An ONNX Runtime session for one graph: ``program(flat_inputs) -> list`` of outputs.

    Attributes: ``source`` (a readable summary: ONNX op histogram, fused-op counts,
    session settings), ``model_proto`` (the self-contained model), ``fused_counts``
    (com.microsoft ops emitted), ``onnx_ops`` (every ONNX op emitted), ``device``,
    ``session``, ``providers``, ``threads``.
    """

    def __init__(self, graph: Graph, *, fused: bool = True, opset: int = DEFAULT_OPSET,
                 device: str | torch.device | None = None, threads: int | None = None):
        self.graph = graph
        self.fused = fused
        self.opset = opset
        self.threads = threads if threads is not None else torch.get_num_threads()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)
        self._model, self._inits, builder = lower_graph(
            graph, fused=fused, opset=opset, external=True, providers=ort_providers(self.device))
        self._skip_layer_norm = builder.skip_layer_norm
        self.notes = list(builder.notes)
        self.onnx_ops: Counter = Counter(
            (n.op_type if n.domain != MS_DOMAIN else f"{MS_DOMAIN}.{n.op_type}")
            for n in self._model.graph.node)
        self.fused_counts: Counter = Counter(
            _fused_label(n) for n in self._model.graph.node if n.domain == MS_DOMAIN)
        self.input_names = [i.name for i in self._model.graph.input]
        self.output_names = [o.name for o in self._model.graph.output]
        self._make_session()

    # -- session -------------------------------------------------------------------------

    def _make_session(self) -> None:
        import onnxruntime as ort

        self.providers = ort_providers(self.device)
        self.session = None
        if not self.output_names:  # nothing to compute (a graph of checks only)
            return
        # ORT would re-fuse an Add + LayerNormalization we chose over its slower CPU kernel
        disabled = [] if self._skip_layer_norm else ["SkipLayerNormFusion"]
        self.session, self._keep = open_session(
            self._model, self._inits, threads=self.threads, providers=self.providers,
            disabled_optimizers=disabled, what=f"the model of graph {self.graph.name}")
        self._sess = self.session._sess
        self._ort = ort

    # -- calling -------------------------------------------------------------------------

    def __call__(self, flat_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.session is None:
            return []
        if self.device.type != "cpu":
            return self._call_bound(flat_inputs)
        feeds = {}
        for name, t in zip(self.input_names, flat_inputs):
            t = t.detach()
            if not t.is_contiguous():
                t = t.contiguous()
            array = numpy_view(t)
            if array is None:
                raise LoweringError(f"onnxruntime backend: input {name!r} of dtype {t.dtype} "
                                    "has no numpy type")
            feeds[name] = self._ort.OrtValue.ortvalue_from_numpy(array)._ortvalue
        try:
            outs = self._sess.run_with_ort_values(feeds, self.output_names, None)
        except Exception as e:  # ORT's own run errors: a kernel that rejects its inputs
            raise self._run_error(e, flat_inputs) from e
        return [torch.from_numpy(o.numpy()) for o in outs]  # zero copy: the array owns o

    def _run_error(self, e: Exception, flat_inputs: Sequence[torch.Tensor]) -> ExecutionError:
        """ORT's run error as an :class:`ExecutionError` naming the graph, the ONNX node and
        the input shapes of the call."""
        text = str(e)
        where = ""
        m = _ORT_NODE.search(text)
        if m is not None:
            where = f" in {m.group(1)} node {m.group(2)!r}"
        status = _ORT_STATUS.search(text)
        detail = status.group(1).strip() if status is not None else f"{type(e).__name__}: {text}"
        shapes = ", ".join(f"{n}={list(t.shape)}" for n, t in zip(self.input_names, flat_inputs))
        return ExecutionError(
            f"onnxruntime failed{where} while running graph {self.graph.name!r} "
            f"(inputs {shapes}): {detail}. This is a transfuse lowering bug: please report it "
            "with compiled.export_onnx(...); target='python' runs the same graph")

    def _call_bound(self, flat_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Device tensors through IO binding: inputs and preallocated outputs by pointer."""
        binding = self.session.io_binding()
        env: dict[str, int] = {}
        for name, t, v in zip(self.input_names, flat_inputs, self.graph.inputs):
            t = t.contiguous()
            for d, n in zip(v.type.shape, t.shape):
                if isinstance(d, sympy.Symbol):
                    env.setdefault(d.name, int(n))
            binding.bind_input(name, self.device.type, self.device.index or 0,
                               _np_dtype(t.dtype), list(t.shape), t.data_ptr())
        outs = []
        for name, v in zip(self.output_names, self.graph.outputs):
            shape = [eval_dim(d, env) for d in v.type.shape]
            out = torch.empty(shape, dtype=v.type.dtype.torch, device=self.device)
            binding.bind_output(name, self.device.type, self.device.index or 0,
                                _np_dtype(out.dtype), shape, out.data_ptr())
            outs.append(out)
        binding.synchronize_inputs()
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            raise self._run_error(e, flat_inputs) from e
        binding.synchronize_outputs()
        return outs

    def to(self, device: str | torch.device) -> OrtProgram:
        """Run on ``device`` (a new session; the weights stay where the graph has them)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)
        if device != self.device:
            self.device = device
            self._make_session()
        return self

    # -- reading ------------------------------------------------------------------------------

    @property
    def model_proto(self) -> onnx.ModelProto:
        """The model with its weights inside (a copy; see :func:`save_model` for > 2 GB)."""
        model = onnx.ModelProto()
        model.CopyFrom(self._model)
        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                t.CopyFrom(tensor_proto(t.name, self._inits[t.name]))
        return model

    @property
    def source(self) -> str:
        g = self._model.graph
        nbytes = sum(t.numel() * t.element_size() for t in self._inits.values())
        lines = [
            f"# transfuse onnxruntime backend: graph {printable(self.graph.name)} "
            f"({len(self.graph)} IR nodes -> {len(g.node)} ONNX nodes, opset {self.opset}, "
            f"{'fused' if self.fused else 'standard ops only'})",
            f"# session: providers={self.providers}, graph_optimization_level=ORT_ENABLE_ALL, "
            f"intra_op_num_threads={self.threads}, inter_op_num_threads=1, sequential",
            "inputs: " + ", ".join(f"{i.name}: {_type_text(i)}" for i in g.input),
            "outputs: " + ", ".join(f"{o.name}: {_type_text(o)}" for o in g.output),
            f"initializers: {len(g.initializer)} ({nbytes / 1e6:.1f} MB)",
            "fused ops: " + (", ".join(f"{k}×{v}" for k, v in sorted(self.fused_counts.items()))
                             or "none"),
            "onnx ops: " + ", ".join(f"{k}×{v}" for k, v in self.onnx_ops.most_common()),
        ]
        lines += [f"note: {n}" for n in self.notes]
        lines.append("")
        lines.append("# nodes (before ORT's own graph optimizations)")
        for n in g.node:
            src = next((p.value for p in n.metadata_props if p.key == "source"), "")
            op = n.op_type if n.domain != MS_DOMAIN else f"{MS_DOMAIN}.{n.op_type}"
            line = f"{', '.join(n.output)} = {op}({', '.join(n.input)})"
            attrs = ", ".join(f"{a.name}={_attr_text(a)}" for a in n.attribute)
            if attrs:
                line += f" {{{attrs}}}"
            if src:
                line += f"  # {printable(src)}"
            lines.append(line)
        return "\n".join(lines) + "\n"

    def lowering_notes(self) -> list[str]:
        """Lines for the pass log: what the lowering emitted."""
        fused = ", ".join(f"{k}×{v}" for k, v in sorted(self.fused_counts.items())) or "none"
        return [f"fused ops: {fused}",
                f"{sum(self.onnx_ops.values())} ONNX nodes from {len(self.graph)} IR nodes"
                ] + list(self.notes)

    def __repr__(self) -> str:
        fused = ", ".join(f"{k}×{v}" for k, v in sorted(self.fused_counts.items())) or "none"
        return (f"OrtProgram({self.graph.name}, {len(self._model.graph.node)} ONNX nodes, "
                f"device={self.device}, fused: {fused})")


def _fused_label(n: onnx.NodeProto) -> str:
    if n.op_type == "GroupQueryAttention" and any(a.name == "do_rotary" and a.i for a in
                                                   n.attribute):
        return "GroupQueryAttention(rotary)"
    return n.op_type


def _np_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype.type


def _type_text(vi: onnx.ValueInfoProto) -> str:
    t = vi.type.tensor_type
    dims = [d.dim_param if d.HasField("dim_param") else str(d.dim_value) for d in t.shape.dim]
    return f"{TensorProto.DataType.Name(t.elem_type).lower()}[{', '.join(dims)}]"


def _attr_text(a: onnx.AttributeProto) -> str:
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return repr(v.decode(errors="replace"))
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, TensorProto):
        return f"tensor({TensorProto.DataType.Name(v.data_type).lower()})"
    return repr(v)


def generate_onnxruntime(graph: Graph, device: str | torch.device | None = None, *,
                         fused: bool = True, opset: int = DEFAULT_OPSET,
                         threads: int | None = None) -> OrtProgram:
    """Lower ``graph`` to ONNX and build its ORT session (the ``onnxruntime`` target)."""
    program = OrtProgram(graph, fused=fused, opset=opset, device=device, threads=threads)
    logger.info("onnxruntime backend: graph %s -> %s", graph.name, program)
    return program


__all__ = ["OrtProgram", "generate_onnxruntime", "session_options", "ort_providers",
           "open_session"]
