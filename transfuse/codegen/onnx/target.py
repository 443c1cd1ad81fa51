"""The ``onnxruntime`` target: an ONNX model with ORT's fused operators, run by a session.

Unlike the python target it refuses what ONNX cannot hold (a ``torch_fallback``, a
training-mode dropout) with the reason, at lowering time. A generation graph (one with
``cached_attention``, whose KV caches are written in place) is built as a
:class:`~transfuse.codegen.onnx.generation.GenerationOrtProgram` (CPU).

Quantization (``quant.py``): int4/int8 weight-only layers run as MatMulNBits, W8A8 as an
exact standard-op form (per-token activations, preferred) or DynamicQuantizeMatMul (per
tensor); fp8 and groups MatMulNBits cannot split are refused with the reason
(:meth:`OnnxRuntimeTarget.quant_unsupported`).
"""

from __future__ import annotations

from typing import Any

from transfuse.codegen.lowering import Target
from transfuse.codegen.onnx.generation import GenerationOrtProgram
from transfuse.codegen.onnx.program import OrtProgram, generate_onnxruntime
from transfuse.codegen.onnx.quant import quant_refuses
from transfuse.codegen.onnx.registry import LOWERINGS
from transfuse.ir.graph import Graph
from transfuse.ir.types import QuantType


class OnnxRuntimeTarget(Target):
    """ONNX Runtime on the CPU (CUDA with onnxruntime-gpu): :func:`generate_onnxruntime`."""

    name = "onnxruntime"
    lowerings = LOWERINGS
    #: per token first (the accuracy W8A8 promises): exact in standard ops (quant.py), 0.8x the
    #: decode speed of per tensor's one DynamicQuantizeMatMul kernel (SmolLM2-135M, 1 thread:
    #: 1.93x vs 2.41x fp32), whose one scale per call costs accuracy whenever a call has more
    #: than one row (SmolLM2 perplexity on 128-token windows: +4.0% per token, +148% per tensor)
    qmatmul_act_quant = ("token", "tensor")

    def quant_unsupported(self, qtype: QuantType, op: str) -> str | None:
        """Why ``op`` (qlinear / qmatmul) on a ``qtype`` weight cannot run here: fp8 (no CPU
        GEMM), groups MatMulNBits cannot split into blocks, qmatmul weights that are not int8
        symmetric per channel."""
        return quant_refuses(qtype, op)

    def build(self, graph: Graph, device: Any = None) -> OrtProgram | GenerationOrtProgram:
        if any(n.op == "cached_attention" for n in graph.nodes):
            return GenerationOrtProgram(graph, device=device)
        return generate_onnxruntime(graph, device=device)


#: what :func:`transfuse.codegen.targets.get_target` instantiates for ``"onnxruntime"``
TARGET_CLASS = OnnxRuntimeTarget

__all__ = ["OnnxRuntimeTarget", "TARGET_CLASS"]
