"""A small ``onnx.backend.base.Backend`` over transfuse, for ``onnx.backend.test.BackendTest``.

``prepare(model)`` captures the model with the ONNX frontend, runs the O1 pipeline and lowers
it with a transfuse target (``python`` by default, ``onnxruntime`` for the ORT backend);
``run(inputs)`` takes and returns numpy arrays (ml_dtypes ones for bfloat16 / float8).
Node tests that feed shape arguments (axes, starts, repeats, k, split) as graph inputs are
compiled at the first ``run`` with those small integer inputs bound as constants
(``capture_onnx(static_inputs=...)``), the way a static-shape compiler binds shape tensors.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx.backend.base import Backend, BackendRep

from transfuse.errors import CaptureError
from transfuse.frontend.onnx import capture_onnx
from transfuse.frontend.onnx_external import from_numpy
from transfuse.passes.manager import run_pipeline
from transfuse.runtime.compiled import lower


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        import ml_dtypes

        kind = ml_dtypes.float8_e4m3fn if t.dtype == torch.float8_e4m3fn else \
            ml_dtypes.float8_e5m2
        return t.view(torch.uint8).numpy().view(kind)
    return t.numpy()


def _compile(model: onnx.ModelProto, target: str, static: dict | None = None):
    captured = capture_onnx(model, static_inputs=static)
    run_pipeline(captured.graph, "O1")
    return lower(captured.graph, target)


#: what the frontend says when a shape argument (axes, starts, repeats, ...) is a graph input
NEEDS_STATIC = "known at capture"


class TransfuseRep(BackendRep):
    """Runs the compiled program. A model whose shape arguments are graph inputs (the node
    tests feed ``axes``, ``starts``, ``repeats``, ``k`` ... as inputs) is compiled at the first
    ``run``, its small integer inputs bound as constants (``static_inputs``, as a static-shape
    compiler binds shape tensors), once per distinct value."""

    def __init__(self, model: onnx.ModelProto, target: str, program=None):
        self.model, self.target, self.program = model, target, program
        inits = {t.name for t in model.graph.initializer}
        self.names = [i.name for i in model.graph.input if i.name not in inits]
        self.static_names = [i.name for i in model.graph.input if i.name not in inits and
                             i.type.tensor_type.elem_type in _SHAPE_TYPES and
                             len(i.type.tensor_type.shape.dim) <= 1]
        self.compiled: dict = {}
        self.bound_static = False

    def run(self, inputs, **kwargs):
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if isinstance(inputs, dict):
            inputs = [inputs[n] for n in self.names]
        arrays = [np.asarray(x) for x in inputs]
        program, names = self.program, self.names
        if program is None:
            static = {n: a for n, a in zip(self.names, arrays) if n in self.static_names}
            key = tuple((n, a.tobytes()) for n, a in static.items())
            if key not in self.compiled:
                self.compiled[key] = _compile(self.model, self.target, static)
            program, names = self.compiled[key], [n for n in self.names if n not in static]
            self.bound_static = True
        by_name = dict(zip(self.names, arrays))
        flat = [from_numpy(by_name[n]) for n in names]
        return [to_numpy(o) for o in program(flat)]


_SHAPE_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}


def make_backend(target: str = "python") -> type[Backend]:
    class TransfuseBackend(Backend):
        """transfuse as an ONNX backend (CPU): capture -> O1 -> ``target``."""

        @classmethod
        def supports_device(cls, device: str) -> bool:
            return device == "CPU"

        @classmethod
        def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs):
            try:
                return TransfuseRep(model, target, _compile(model, target))
            except CaptureError as e:
                if NEEDS_STATIC not in str(e):
                    raise
                return TransfuseRep(model, target)

    TransfuseBackend.__name__ = f"TransfuseBackend_{target}"
    return TransfuseBackend
