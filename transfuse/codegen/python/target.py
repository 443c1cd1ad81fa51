"""The ``python`` target: generated Python over torch (and the native CPU kernels).

The reference backend: it runs anywhere torch runs and never refuses a graph (an op
without an emitter runs its reference implementation). It answers
``layout.select-gemm``'s questions: which GEMM libraries exist here, whether the native
kernels do, and what each GEMM costs on this machine (timed, cached per machine).
"""

from __future__ import annotations

from typing import Any

import torch

from transfuse.codegen import native
from transfuse.codegen.lowering import Target
from transfuse.codegen.python import gemm_timing, quant
from transfuse.codegen.python.blas import (
    GemmTiming,
    blas_unavailable,
    kmajor_eligible,
    stored_kmajor,
)
from transfuse.codegen.python.program import PythonProgram, generate_python
from transfuse.codegen.python.registry import LOWERINGS
from transfuse.ir.graph import Graph, Value
from transfuse.ir.types import QuantType


class PythonTarget(Target):
    """Generated Python source over torch ops: :func:`generate_python`."""

    name = "python"
    lowerings = LOWERINGS

    def build(self, graph: Graph, device: Any = None) -> PythonProgram:
        program = generate_python(graph, device=device)
        quant.prepare_program(program, graph)  # kernels' tensors, plans, notes (quant.py)
        return program

    def supports(self, node: Any) -> str | None:
        """Never a reason: a node without an emitter runs its op's reference implementation."""
        return None

    # -- answers to layout.select-gemm (blas.py, gemm_timing.py, codegen/native) -----------

    #: torch's GEMM (MKL in the CPU wheels) or numpy's OpenBLAS on K-major weights
    gemm_libraries = ("torch", "blas")

    def gemm_unavailable(self) -> str | None:
        return blas_unavailable()

    def native_kernels_unavailable(self) -> str | None:
        return None if native.library() is not None else native.status()

    def gemm_relayout_eligible(self, weight: Value) -> bool:
        return kmajor_eligible(weight)

    def gemm_weight_relaid(self, weight: Value) -> bool:
        return stored_kmajor(weight)

    def time_gemm(self, rows: int, weights: list[torch.Tensor], bias: torch.Tensor | None, *,
                  relayout: bool, use_cache: bool = True) -> tuple[GemmTiming, str]:
        return gemm_timing.measure(rows, weights, bias, relayout=relayout, use_cache=use_cache)

    # -- answers to quant.quantize-weights (quant.py, quant_kernels.py) -------------------

    #: both granularities run exactly (int_mm quantizes x by the reference rule)
    qmatmul_act_quant = ("token", "tensor")

    def quant_unsupported(self, qtype: QuantType, op: str) -> str | None:
        """Every integer type runs (a fast kernel where one takes it, else the reference
        dequantization); fp8 does not: the python target runs on the CPU."""
        if qtype.scheme == "fp8e4m3":
            return ("fp8 e4m3 GEMMs need a GPU target (torch._scaled_mm on sm_89+); the "
                    "python target runs them on the CPU only by dequantizing to f32")
        if op not in ("qlinear", "qmatmul"):
            return f"the python target has no quantized op {op!r}"
        return None


#: what :func:`transfuse.codegen.targets.get_target` instantiates for ``"python"``
TARGET_CLASS = PythonTarget

__all__ = ["PythonTarget", "TARGET_CLASS"]
