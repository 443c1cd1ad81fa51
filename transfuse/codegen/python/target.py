"""The ``python`` target: generated Python over torch (and the native CPU kernels).

The reference backend: it runs anywhere torch runs and never refuses a graph (an op
without an emitter runs its reference implementation).
"""

from __future__ import annotations

from typing import Any

from transfuse.codegen.lowering import Target
from transfuse.codegen.python.program import PythonProgram, generate_python
from transfuse.codegen.python.registry import LOWERINGS
from transfuse.ir.graph import Graph


class PythonTarget(Target):
    """Generated Python source over torch ops: :func:`generate_python`."""

    name = "python"
    lowerings = LOWERINGS

    def build(self, graph: Graph, device: Any = None) -> PythonProgram:
        return generate_python(graph, device=device)

    def supports(self, node: Any) -> str | None:
        """Never a reason: a node without an emitter runs its op's reference implementation."""
        return None


#: what :func:`transfuse.codegen.targets.get_target` instantiates for ``"python"``
TARGET_CLASS = PythonTarget

__all__ = ["PythonTarget", "TARGET_CLASS"]
