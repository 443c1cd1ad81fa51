"""The ``triton`` target: generated Triton kernels for fusion groups, a hand-written kernel
family for attention, rotary and quantized GEMMs, cuBLAS through torch for dense GEMMs, and
generated host code with a memory plan (and CUDA graphs for small generation steps on a GPU).

Kernels run on a CUDA GPU, or in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set
by :mod:`.env` when there is no GPU): the interpreter is for checking, not for speed.
"""

from __future__ import annotations

from typing import Any

from transfuse.codegen.lowering import Target
from transfuse.codegen.triton import env
from transfuse.codegen.triton.host import LOWERINGS, TritonProgram, build_program
from transfuse.ir.graph import Graph, Node
from transfuse.ir.types import QuantType


class TritonTarget(Target):
    """Host code over generated and hand-written Triton kernels (:func:`build_program`)."""

    name = "triton"
    lowerings = LOWERINGS

    def build(self, graph: Graph, device: Any = None) -> TritonProgram:
        return build_program(graph, device=device)

    def supports(self, node: Node) -> str | None:
        """Never a reason: a node without a kernel runs through torch in the host code."""
        return None

    def native_kernels_unavailable(self) -> str | None:
        return "the triton target runs Triton kernels, not the CPU's native ones"

    #: both granularities: the W8A8 kernel quantizes x by the reference rule per row or tensor
    qmatmul_act_quant = ("token", "tensor")

    def quant_unsupported(self, qtype: QuantType, op: str) -> str | None:
        """int4 / int8 / fp8 weight-only (``qlinear``, the dequant GEMM: fp8 decoded by bit
        arithmetic, so sm_80 and the interpreter run it too) and W8A8 int8 (``qmatmul``)."""
        why = env.triton_unavailable()
        if why:
            return why
        if op == "qmatmul" and qtype.scheme != "int":
            return f"the triton target's W8A8 GEMM takes int8 weights, not {qtype.scheme}"
        if op not in ("qlinear", "qmatmul"):
            return f"the triton target has no quantized op {op!r}"
        return None


#: what :func:`transfuse.codegen.targets.get_target` instantiates for ``"triton"``
TARGET_CLASS = TritonTarget

__all__ = ["TritonTarget", "TARGET_CLASS"]
