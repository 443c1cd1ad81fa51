"""Running a TensorRT engine on torch CUDA tensors (needs TensorRT: see ``available.py``).

:class:`EngineProgram` deserializes an engine (``trt.Runtime.deserialize_cuda_engine``), makes
one execution context, and per call: picks the optimization profile whose ranges hold the input
shapes, sets each input's shape (``set_input_shape``), binds inputs and freshly allocated torch
outputs by address (``set_tensor_address``) and enqueues the engine on torch's current CUDA
stream (``execute_async_v3``). The outputs are ordered on that stream like any torch kernel's.

Written against TensorRT 10's documented Python API; it cannot run on a machine without
TensorRT and a GPU, and nothing here was run on one yet. :func:`build_engine` builds in-process
with the same code the exported ``build_engine.py`` runs (``build_template.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from transfuse.codegen.tensorrt import build_template
from transfuse.codegen.tensorrt.available import tensorrt_unavailable
from transfuse.codegen.tensorrt.profiles import select_profile
from transfuse.errors import ExecutionError, LoweringError

#: TensorRT DataType member name -> torch dtype (the types an engine's IO may have)
TRT_TO_TORCH = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
    "INT8": torch.int8, "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64,
    "BOOL": torch.bool, "FP8": torch.float8_e4m3fn,
}


def _trt():
    reason = tensorrt_unavailable()
    if reason is not None:
        raise LoweringError(f"the TensorRT engine cannot run here: {reason}")
    import tensorrt as trt

    return trt


def build_engine(onnx_path: str | Path, profiles: Mapping[str, Any], *,
                 workspace_bytes: int | None = None, version_compatible: bool = False) -> bytes:
    """A serialized engine of the ONNX file with ``profiles`` (profiles.json's document)."""
    trt = _trt()
    try:
        return build_template.build_serialized(trt, onnx_path, profiles,
                                               workspace_bytes=workspace_bytes,
                                               version_compatible=version_compatible)
    except RuntimeError as e:
        raise LoweringError(str(e)) from None


class EngineProgram:
    """``program(flat_inputs) -> list`` of outputs, by a TensorRT engine on ``device``."""

    runner = "tensorrt"

    def __init__(self, plan: bytes, profiles: Mapping[str, Any], input_names: Sequence[str],
                 output_names: Sequence[str], *, device: str | torch.device | None = None,
                 host_code_allowed: bool = False, what: str = "the engine"):
        trt = _trt()
        self.device = torch.device(device if device is not None else "cuda")
        if self.device.type != "cuda":
            raise LoweringError(f"a TensorRT engine runs on a CUDA device, not {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.profiles = profiles
        self.what = what
        self._logger = build_template.make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        # a version-compatible plan carries TensorRT's lean runtime (host code): trusted plans only
        self._runtime.engine_host_code_allowed = bool(host_code_allowed)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise LoweringError(f"TensorRT could not deserialize {what} (built by another "
                                "TensorRT version or for another GPU? rebuild it)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = {n: self.engine.get_tensor_mode(n) for n in names}
        engine_inputs = {n for n in names if mode[n] == trt.TensorIOMode.INPUT}
        engine_outputs = [n for n in names if mode[n] == trt.TensorIOMode.OUTPUT]
        if list(output_names) != engine_outputs and set(output_names) != set(engine_outputs):
            raise LoweringError(f"{what} has outputs {engine_outputs}, the model {output_names}")
        unknown = engine_inputs - set(input_names)
        if unknown:
            raise LoweringError(f"{what} has inputs {sorted(unknown)} the model does not have")
        self.input_names = list(input_names)
        self.engine_inputs = engine_inputs  # the parser drops inputs nothing reads
        self.output_names = list(output_names)
        self.out_dtypes = {}
        for n in self.output_names:
            dt = self.engine.get_tensor_dtype(n)
            if dt.name not in TRT_TO_TORCH:
                raise LoweringError(f"{what}: output {n!r} has TensorRT type {dt.name}, which "
                                    "has no torch dtype")
            self.out_dtypes[n] = TRT_TO_TORCH[dt.name]
        self.context = self.engine.create_execution_context()
        self._profile = 0

    def __call__(self, flat_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        shapes = {n: tuple(t.shape) for n, t in zip(self.input_names, flat_inputs)
                  if n in self.engine_inputs}
        index = select_profile(self.profiles, shapes)
        if index is None:
            raise ExecutionError(f"input shapes {shapes} are outside every optimization profile "
                                 f"of {self.what}")
        stream = torch.cuda.current_stream(self.device)
        if index != self._profile:
            self.context.set_optimization_profile_async(index, stream.cuda_stream)
            self._profile = index
        keep = []
        for name, t in zip(self.input_names, flat_inputs):
            if name not in self.engine_inputs:
                continue
            t = t.to(self.device).contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ExecutionError(f"TensorRT refused shape {tuple(t.shape)} for input "
                                     f"{name!r} of {self.what}")
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ExecutionError(f"{self.what}: output {name!r} has unresolved shape {shape}")
            out = torch.empty(shape, dtype=self.out_dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExecutionError(f"TensorRT failed to run {self.what} (inputs {shapes})")
        for t in keep:  # the engine reads them on the stream: keep their memory until then
            t.record_stream(stream)
        return outs

    @property
    def runs(self) -> str:
        return f"TensorRT engine {self.what} on {self.device}"

    @property
    def source(self) -> str:
        return (f"# TensorRT engine ({self.what}); inputs {self.input_names}, outputs "
                f"{self.output_names}, {len(self.profiles['profiles'])} optimization profile(s)\n")

    def lowering_notes(self) -> list[str]:
        return [f"runs {self.what} with TensorRT on {self.device}"]

    def __repr__(self) -> str:
        return f"EngineProgram({self.what}, device={self.device})"


def engine_info(path: str | Path) -> dict[str, Any]:
    """model.engine.json next to an engine (how build_engine.py built it), or {}."""
    info = Path(path).with_name(Path(path).name + ".json")
    try:
        return json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


__all__ = ["EngineProgram", "build_engine", "engine_info", "TRT_TO_TORCH"]
