"""The onnxruntime backend: a graph becomes an ONNX model run by an ORT session.

Standard ONNX ops (opset 17 unless asked), symbolic dims as ``dim_param`` names,
constants as initializers and, with ``fused=True``, ONNX Runtime's ``com.microsoft``
fused operators where they compute exactly what the IR op does (GroupQueryAttention,
MultiHeadAttention, SkipLayerNormalization, SkipSimplifiedLayerNormalization, FastGelu,
BiasGelu, Gelu, RotaryEmbedding, QuickGelu, FusedMatMul; MatMulNBits and
DynamicQuantizeMatMul for quantized weights).

Layout (lowerings in one file per op family, mirroring ``transfuse/ir/opdefs/``):

- ``registry.py``: :data:`LOWERINGS` (the onnxruntime registry) and shared helpers;
- ``elementwise.py``, ``linalg.py``, ``misc.py``, ``reduce.py``, ``shape.py``, ``nn.py``,
  ``fused.py``, ``rotary.py``, ``attention.py``, ``generation.py``, ``quant.py`` (qlinear /
  qmatmul: MatMulNBits, DynamicQuantizeMatMul): the lowerings of each op family;
- ``tensors.py`` (dtypes, initializers), ``builder.py`` (:class:`OnnxBuilder`),
  ``plan.py`` (decisions spanning two nodes), ``export.py`` (the node loop,
  :func:`export_graph`, :func:`save_model`), ``program.py`` (:class:`OrtProgram`: the
  session), ``target.py`` (the ``onnxruntime`` :class:`~transfuse.codegen.lowering.Target`).

Importing this package imports every family file, so :data:`LOWERINGS` is complete
whichever module of the backend is imported first.

Glossary: B batch, H heads, Hkv key/value heads, S query length, T key length,
D head dim, E hidden size (H*D).
"""

from transfuse.codegen.onnx.registry import LOWERINGS

# every op family's lowerings (registration on import; the order does not matter)
from transfuse.codegen.onnx import (  # noqa: F401  isort: skip
    attention, elementwise, fused, generation, indexing, linalg, misc, nn, quant, reduce,
    rotary, shape,
)
from transfuse.codegen.onnx.builder import OnnxBuilder  # isort: skip
from transfuse.codegen.onnx.export import (  # isort: skip
    export_graph, lower_graph, output_names, save_model,
)
from transfuse.codegen.onnx.program import (  # isort: skip
    OrtProgram, generate_onnxruntime, session_options,
)
from transfuse.codegen.onnx.tensors import DEFAULT_OPSET, MS_DOMAIN  # isort: skip

__all__ = ["LOWERINGS", "export_graph", "save_model", "lower_graph", "output_names",
           "OnnxBuilder", "OrtProgram", "generate_onnxruntime", "session_options",
           "DEFAULT_OPSET", "MS_DOMAIN"]
