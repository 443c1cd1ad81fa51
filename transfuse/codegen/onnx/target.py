"""The ``onnxruntime`` target: an ONNX model with ORT's fused operators, run by a session.

Unlike the python target it refuses what ONNX cannot hold (a ``torch_fallback``, a
training-mode dropout) with the reason, at lowering time. A generation graph (one with
``cached_attention``, whose KV caches are written in place) is built as a
:class:`~transfuse.codegen.onnx.generation.GenerationOrtProgram` (CPU).
"""

from __future__ import annotations

from typing import Any

from transfuse.codegen.lowering import Target
from transfuse.codegen.onnx.generation import GenerationOrtProgram
from transfuse.codegen.onnx.program import OrtProgram, generate_onnxruntime
from transfuse.codegen.onnx.registry import LOWERINGS
from transfuse.ir.graph import Graph


class OnnxRuntimeTarget(Target):
    """ONNX Runtime on the CPU (CUDA with onnxruntime-gpu): :func:`generate_onnxruntime`."""

    name = "onnxruntime"
    lowerings = LOWERINGS

    def build(self, graph: Graph, device: Any = None) -> OrtProgram | GenerationOrtProgram:
        if any(n.op == "cached_attention" for n in graph.nodes):
            return GenerationOrtProgram(graph, device=device)
        return generate_onnxruntime(graph, device=device)


#: what :func:`transfuse.codegen.targets.get_target` instantiates for ``"onnxruntime"``
TARGET_CLASS = OnnxRuntimeTarget

__all__ = ["OnnxRuntimeTarget", "TARGET_CLASS"]
