"""The ``tensorrt`` target: the graph as the strongly typed ONNX TensorRT parses, run as an
engine where TensorRT is installed, and by ONNX Runtime where it is not (saying so).

``build(graph, device)``:

- TensorRT usable (:func:`tensorrt_unavailable` is None): a :class:`TensorRTProgram` that
  builds the engine in-process once it knows the symbol ranges (``bind_signature``, called by
  ``CompiledModel``: the optimization profiles come from ``dynamic=``) and runs it
  (``engine.py``);
- otherwise an :class:`OnnxFallbackProgram`: ``lower_tensorrt``'s ONNX, the very model an
  engine would be built from, run by ONNX Runtime. Its notes (pass log, ``source``) say
  "no TensorRT here: ..."; nothing claims an engine.

``load_artifact`` serves ``transfuse.load`` of an export (``CompiledModel.export_tensorrt``): it
runs ``model.engine`` when TensorRT is usable and the engine was built, else ``model.onnx`` in
ONNX Runtime with a note saying why; ``engine=True`` makes the fallback an error instead.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch

from transfuse.codegen.lowering import Target
from transfuse.codegen.onnx.registry import LOWERINGS as ONNX_LOWERINGS
from transfuse.codegen.tensorrt.available import tensorrt_unavailable
from transfuse.errors import ExecutionError, LoweringError
from transfuse.ir.graph import Graph, Node
from transfuse.ir.types import QuantType

#: lower_tensorrt's defaults, as the target uses them
DEFAULT_OPTIONS = {"attention": "onnx", "trt_version": "10.14", "opset": 23}
MODEL_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
NO_TRT = "no TensorRT here: the ONNX TensorRT would parse, run by ONNX Runtime"


def cache_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """A generation model's {cache input: written-cache output} (lower.py's metadata), or {}."""
    from transfuse.codegen.tensorrt import lower

    key = getattr(lower, "CACHE_OUTPUTS_KEY", None)
    value = next((p.value for p in model.metadata_props if p.key == key), None)
    return json.loads(value) if value else {}


def lower_model(graph: Graph, signature: Any = None, **options: Any) -> onnx.ModelProto:
    """``lower_tensorrt(graph, signature, **options)`` (helper module imported on use)."""
    from transfuse.codegen.tensorrt.lower import lower_tensorrt

    return lower_tensorrt(graph, signature, **{**DEFAULT_OPTIONS, **options})


class OnnxFallbackProgram:
    """The TensorRT ONNX run by ONNX Runtime: ``program(flat_inputs) -> list``.

    ``model``: the ModelProto or the path of an exported ``model.onnx``. ``reason``: why no
    engine runs (in :meth:`lowering_notes` and :attr:`source`).
    """

    runner = "onnxruntime"

    def __init__(self, model: onnx.ModelProto | Path, graph: Graph, *, reason: str,
                 device: str | torch.device | None = None):
        import onnxruntime as ort

        from transfuse.codegen.onnx.program import ort_providers, session_options

        self.graph = graph
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reason = reason
        if isinstance(model, (str, Path)):
            self.model_path = Path(model)
            proto = onnx.load(str(self.model_path), load_external_data=False)
            what = str(self.model_path)
            payload: Any = str(self.model_path)
        else:
            self.model_path = None
            proto, what, payload = model, f"the TensorRT ONNX of graph {graph.name}", None
        self.input_names = [i.name for i in proto.graph.input]
        self.output_names = [o.name for o in proto.graph.output]
        # a generation graph: cache input -> its written copy, an extra output (lower.py)
        self.cache_outputs = cache_outputs(proto)
        self._copy_back = [(self.input_names.index(i), self.output_names.index(o))
                           for i, o in self.cache_outputs.items()]
        self._returned = len(self.output_names) - len(self.cache_outputs)
        if len(self.input_names) != len(graph.inputs) or self._returned != len(graph.outputs):
            raise LoweringError(f"{what}: {len(self.input_names)} inputs / {self._returned} "
                                f"outputs, graph {graph.name} has {len(graph.inputs)} / "
                                f"{len(graph.outputs)}")
        self.onnx_ops: Counter = Counter(n.op_type for n in proto.graph.node)
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                          None)
        self._proto = proto if payload is None else None
        self.providers = ort_providers(self.device)
        so = session_options()
        # ORT fuses DequantizeLinear + MatMul into MatMulNBits and, by default, quantizes that
        # GEMM's activations to int8 (1.1e-2 off on tiny Llama int4); TensorRT's weight-only
        # GEMM keeps them in float, so does this: accuracy level 0 = the input's type
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        try:
            self.session = ort.InferenceSession(
                payload if payload is not None else proto.SerializeToString(),
                so, providers=self.providers)
        except Exception as e:  # ORT's refusal of the model: a lowering bug or an ORT gap
            raise LoweringError(f"onnxruntime rejected {what}: {type(e).__name__}: {e}") from e

    def __call__(self, flat_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        from transfuse.codegen.onnx.tensors import numpy_view

        feeds = {}
        for name, t in zip(self.input_names, flat_inputs):
            array = numpy_view(t.detach().cpu().contiguous())
            if array is None:
                raise LoweringError(f"tensorrt target (ONNX Runtime): input {name!r} of dtype "
                                    f"{t.dtype} has no numpy type")
            feeds[name] = array
        try:
            outs = self.session.run(self.output_names, feeds)
        except Exception as e:
            raise ExecutionError(f"onnxruntime failed running the TensorRT ONNX of graph "
                                 f"{self.graph.name!r}: {type(e).__name__}: {e}") from e
        for i, o in self._copy_back:  # the written KV caches land in the caller's cache tensors
            flat_inputs[i].copy_(torch.from_numpy(outs[o]))
        return [torch.from_numpy(o).to(self.device) for o in outs[:self._returned]]

    @property
    def runs(self) -> str:
        """What runs the model, and why not an engine."""
        return f"{NO_TRT} ({self.reason})"

    @property
    def model_proto(self) -> onnx.ModelProto:
        if self._proto is not None:
            return self._proto
        return onnx.load(str(self.model_path))

    @property
    def source(self) -> str:
        where = str(self.model_path) if self.model_path else "lowered in memory"
        ops = ", ".join(f"{k}×{v}" for k, v in self.onnx_ops.most_common())
        return (f"# transfuse tensorrt target: {NO_TRT} ({self.reason})\n"
                f"# model: {where}, opset {self.opset}; providers={self.providers}\n"
                f"inputs: {', '.join(self.input_names)}\noutputs: {', '.join(self.output_names)}\n"
                f"onnx ops: {ops}\n")

    def lowering_notes(self) -> list[str]:
        return [f"{NO_TRT} ({self.reason})",
                f"{sum(self.onnx_ops.values())} ONNX nodes (opset {self.opset}) from "
                f"{len(self.graph)} IR nodes; no engine was built"]

    def __repr__(self) -> str:
        return f"OnnxFallbackProgram({self.graph.name}, {NO_TRT}: {self.reason})"


class TensorRTProgram:
    """An engine built in-process from the graph's TensorRT ONNX (TensorRT present).

    The engine is built by :meth:`bind_signature` (the optimization profiles need the symbol
    ranges); calling before that is an error naming the missing step.
    """

    runner = "tensorrt"

    def __init__(self, graph: Graph, model: onnx.ModelProto, device: Any = None, *,
                 workspace_bytes: int | None = None):
        self.graph = graph
        self.model = model
        self.device = torch.device(device) if device is not None else torch.device("cuda")
        self.workspace_bytes = workspace_bytes
        self.engine = None
        self.build_seconds: float | None = None
        # a generation graph: cache input -> its written copy, an extra output (lower.py);
        # the engine's copy is written back into the caller's cache after each run
        self.cache_outputs = cache_outputs(model)
        names_in = [i.name for i in model.graph.input]
        names_out = [o.name for o in model.graph.output]
        self._copy_back = [(names_in.index(i), names_out.index(o))
                           for i, o in self.cache_outputs.items()]
        self._returned = len(names_out) - len(self.cache_outputs)

    def bind_signature(self, signature: Any) -> None:
        import time

        from transfuse.codegen.onnx.export import save_model
        from transfuse.codegen.tensorrt.engine import EngineProgram, build_engine
        from transfuse.codegen.tensorrt.profiles import profiles_document

        if self.engine is not None:
            return
        if self.cache_outputs:  # a generation step: ranges from its cache geometry
            from transfuse.codegen.tensorrt.profiles import generation_profiles, generation_ranges

            profiles = profiles_document(signature, symbols=generation_ranges(self.graph),
                                         profiles=generation_profiles(self.graph))
        else:
            profiles = profiles_document(signature)
        with tempfile.TemporaryDirectory(prefix="transfuse-trt-") as tmp:
            path = save_model(self.model, Path(tmp) / MODEL_FILE)
            t0 = time.perf_counter()
            plan = build_engine(path, profiles, workspace_bytes=self.workspace_bytes)
            self.build_seconds = time.perf_counter() - t0
        self.engine = EngineProgram(plan, profiles, [i.name for i in self.model.graph.input],
                                    [o.name for o in self.model.graph.output],
                                    device=self.device, what=f"the engine of graph "
                                    f"{self.graph.name}")

    def __call__(self, flat_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.engine is None:
            raise LoweringError("tensorrt target: the engine is built when the signature is "
                                "bound (CompiledModel does it; call bind_signature(signature))")
        outs = self.engine(flat_inputs)
        for i, j in self._copy_back:
            flat_inputs[i].copy_(outs[j])
        return outs[:self._returned]

    @property
    def source(self) -> str:
        return self.engine.source if self.engine is not None else "# engine not built yet\n"

    @property
    def runs(self) -> str:
        return self.engine.runs if self.engine is not None else "TensorRT (engine not built)"

    def lowering_notes(self) -> list[str]:
        if self.engine is None:
            return ["TensorRT engine not built yet (needs the signature's symbol ranges)"]
        return [f"TensorRT engine built in {self.build_seconds:.1f} s on {self.device}"]


class TensorRTTarget(Target):
    """TensorRT: strongly typed ONNX (``lower_tensorrt``), profiles, engine (see module doc)."""

    name = "tensorrt"
    lowerings = ONNX_LOWERINGS  # the TensorRT flavour overrides a few ops (supports() below)
    #: TensorRT's QuantizeLinear takes constant scales: no dynamic activation quantization
    qmatmul_act_quant = ()

    def supports(self, node: Node) -> str | None:
        from transfuse.codegen.tensorrt.lower import TRT_LOWERINGS

        if node.op in TRT_LOWERINGS:
            return TRT_LOWERINGS.supports(node)
        return self.lowerings.supports(node)

    def quant_unsupported(self, qtype: QuantType, op: str) -> str | None:
        """int4/int8 weight-only and fp8 weights run (DequantizeLinear + MatMul); W8A8
        (``qmatmul``: activations quantized at run time with a zero point) does not."""
        if op == "qmatmul":
            return ("qmatmul (W8A8): TensorRT's QuantizeLinear takes constant scales and zero "
                    "zero points; the IR's run-time activation quantization has no exact form "
                    "(use int4/int8 weight-only or fp8)")
        if qtype.scheme not in ("int", "fp8e4m3"):
            return f"{qtype.scheme} weights have no TensorRT DequantizeLinear form"
        return None

    def build(self, graph: Graph, device: Any = None) -> OnnxFallbackProgram | TensorRTProgram:
        model = lower_model(graph)
        reason = tensorrt_unavailable()
        if reason is None:
            return TensorRTProgram(graph, model, device)
        return OnnxFallbackProgram(model, graph, reason=reason, device=device)

    def load_artifact(self, root: str | Path, graph: Graph, *, engine: bool | None = None,
                      device: Any = None) -> Any:
        """The program of an exported directory: ``model.engine`` by TensorRT when it can run
        here (``engine`` None or True), else ``model.onnx`` by ONNX Runtime with the reason
        (``engine=True``: a :class:`LoweringError` instead)."""
        from transfuse.codegen.tensorrt.engine import EngineProgram, engine_info
        from transfuse.codegen.tensorrt.profiles import PROFILES_FILE, read_profiles

        root = Path(root)
        onnx_path = root / MODEL_FILE
        if not onnx_path.is_file():
            raise LoweringError(f"{root}: no {MODEL_FILE}; not a TensorRT export")
        engine_path = root / ENGINE_FILE
        reason = tensorrt_unavailable() if engine is not False else "engine=False was asked"
        if reason is None and not engine_path.is_file():
            reason = f"no {ENGINE_FILE} in {root} yet (run python {root / 'build_engine.py'})"
        if reason is None:
            proto = onnx.load(str(onnx_path), load_external_data=False)
            info = engine_info(engine_path)
            return EngineProgram(engine_path.read_bytes(), read_profiles(root / PROFILES_FILE),
                                 [i.name for i in proto.graph.input],
                                 [o.name for o in proto.graph.output],
                                 device=device if device is not None else "cuda",
                                 host_code_allowed=bool(info.get("version_compatible")),
                                 what=str(engine_path))
        if engine:
            raise LoweringError(f"the TensorRT engine was asked for but cannot run: {reason}")
        return OnnxFallbackProgram(onnx_path, graph, reason=reason, device=device)


EXPORT_README = """# TensorRT export of `{graph}` (transfuse {version})

Files:

- `model.onnx`: the model as strongly typed ONNX (opset {opset}) for TensorRT {trt_version}'s
  ONNX parser: standard ops only, explicit casts{quant}; attention as {attention}.
- `profiles.json`: the optimization profiles (min / opt / max shape of each input) from the
  compiled symbol ranges: {symbols}. Rule for opt: {opt_rule}.
- `build_engine.py`: builds `model.engine` with TensorRT (only the `tensorrt` package, >= 10, and
  a GPU are needed): strongly typed network, one optimization profile per entry above.
- `manifest.json`, `weights.safetensors`, `graph.txt`, `pass_log.json`, `code.py`: the transfuse
  artifact (hashes of every file above), so `transfuse.load()` can read this directory.

Build the engine (on the machine that will run it):

    python build_engine.py                       # -> model.engine + model.engine.json
    python build_engine.py --workspace-gb 8      # limit TensorRT's build scratch memory
    python build_engine.py --version-compatible  # an engine later TensorRT versions can run

Run it:

    import transfuse
    model = transfuse.load("path/to/this/directory")
    print(model.meta["runs"])  # the engine where TensorRT and a GPU are present, else
                               # model.onnx in ONNX Runtime, and why

Nothing in this directory was built or run with TensorRT by transfuse: `model.engine` exists only
after you run `build_engine.py`.
"""


def write_export(root: str | Path, graph: Graph, signature: Any, *,
                 attention: str = DEFAULT_OPTIONS["attention"],
                 trt_version: str = DEFAULT_OPTIONS["trt_version"],
                 opset: int = DEFAULT_OPTIONS["opset"], profiles: Any = None,
                 opt: Any = None) -> dict[str, Any]:
    """Write model.onnx, profiles.json, build_engine.py and README.md into ``root``; return
    what was written (for the artifact manifest's meta)."""
    from transfuse.codegen.onnx.export import save_model
    from transfuse.codegen.tensorrt import build_template
    from transfuse.codegen.tensorrt.profiles import (
        OPT_RULE,
        PROFILES_FILE,
        profiles_document,
        write_profiles,
    )
    from transfuse.codegen.version import transfuse_version

    root = Path(root)
    doc = profiles_document(signature, profiles=profiles, opt=opt)  # bad ranges fail first
    model = lower_model(graph, signature, attention=attention, trt_version=trt_version,
                        opset=opset)
    save_model(model, root / MODEL_FILE)
    write_profiles(doc, root / PROFILES_FILE)
    (root / "build_engine.py").write_text(Path(build_template.__file__).read_text(
        encoding="utf-8"), encoding="utf-8")
    ops = Counter(n.op_type for n in model.graph.node)
    quant = [op for op in ("DequantizeLinear", "QuantizeLinear") if op in ops]
    symbols = "; ".join(
        f"profile {i}: " + ", ".join(f"{k} {v[0]}..{v[2]} (opt {v[1]})"
                                     for k, v in p["symbols"].items())
        for i, p in enumerate(doc["profiles"])) or "none (static shapes)"
    (root / "README.md").write_text(EXPORT_README.format(
        graph=graph.name, version=transfuse_version(), opset=opset, trt_version=trt_version,
        quant=(", quantized weights as " + " / ".join(quant)) if quant else "",
        attention=("the ONNX Attention op where it is exact, else MatMul-Softmax-MatMul"
                   if attention == "onnx" else "MatMul-Softmax-MatMul"),
        symbols=symbols, opt_rule=OPT_RULE), encoding="utf-8")
    return {"attention": attention, "trt_version": trt_version, "opset": opset,
            "profiles": len(doc["profiles"]), "onnx_ops": dict(sorted(ops.items()))}


#: what :func:`transfuse.codegen.targets.get_target` instantiates for ``"tensorrt"``
TARGET_CLASS = TensorRTTarget

__all__ = ["TensorRTTarget", "TARGET_CLASS", "OnnxFallbackProgram", "TensorRTProgram",
           "lower_model", "write_export", "NO_TRT"]
