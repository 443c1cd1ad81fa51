"""The python backend: a graph becomes readable Python source over torch.

Layout (one file per concern; emitters in one file per op family, mirroring
``transfuse/ir/opdefs/``):

- ``registry.py``: :data:`LOWERINGS` (the python registry) and :class:`EmitContext`;
- ``elementwise.py``, ``linalg.py``, ``misc.py``, ``reduce.py``, ``shape.py``, ``nn.py``,
  ``attention.py``, ``fused.py``, ``generation.py``, ``quant.py``: the emitters of each op
  family (``quant_kernels.py``, ``quant_timing.py``: the quantized GEMMs and their timing);
- ``generator.py`` (+ ``dims.py``): graph -> source; ``helpers.py``: the functions the
  source calls by name; ``program.py``: compile, bind, call (:class:`PythonProgram`);
- ``blas.py``, ``cpu_attention.py``: CPU kernels the generated code calls (with
  ``codegen/native``); ``target.py``: the ``python`` :class:`~transfuse.codegen.lowering.Target`.

Importing this package imports every family file, so :data:`LOWERINGS` is complete
whichever module of the backend is imported first.
"""

from transfuse.codegen.python.registry import LOWERINGS

# every op family's emitters (registration on import; the order does not matter)
from transfuse.codegen.python import (  # noqa: F401  isort: skip
    attention, elementwise, fused, generation, indexing, linalg, misc, nn, quant, reduce, shape,
)
from transfuse.codegen.python.program import PythonProgram, generate_python  # isort: skip

__all__ = ["LOWERINGS", "PythonProgram", "generate_python"]
