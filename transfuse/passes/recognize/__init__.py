"""Recognition passes: decomposed Transformer building blocks become fused IR ops.

Each module holds one family of rules and registers its pass by name:

- ``norms.py`` — ``recognize.fuse-norms``: LayerNorm / RMSNorm math -> ``layer_norm`` /
  ``rms_norm`` (casts, weight, bias, ``1 + w``);
- ``activations.py`` — ``recognize.fuse-activations``: GELU (erf / tanh, never swapped),
  SiLU, SwiGLU, softmax (plain and max-subtracted);
- ``rotary.py`` — ``recognize.fuse-rotary``: rotate-half and interleaved RoPE -> ``rotary``;
- ``residual.py`` — ``recognize.fuse-add-norm`` (residual add + norm -> ``add_norm`` with
  the sum as a second output) and ``recognize.fold-linear-epilogue`` (bias add and
  activation -> ``linear``'s bias / ``activation``).

``RECOGNIZE`` is the order to run them in (after cleanup): norms and activations first
(swiglu must claim ``silu`` before the epilogue fold could), add_norm after the norms
exist, the epilogue last.
"""

from transfuse.passes.recognize.activations import RecognizeActivations
from transfuse.passes.recognize.norms import RecognizeNorms
from transfuse.passes.recognize.residual import FoldLinearEpilogue, FuseAddNorm
from transfuse.passes.recognize.rotary import RecognizeRotary

RECOGNIZE = [
    "recognize.fuse-norms",  # LayerNorm / RMSNorm math -> layer_norm / rms_norm
    "recognize.fuse-activations",  # gelu (erf | tanh), silu, swiglu, softmax
    "recognize.fuse-rotary",  # RoPE (rotate-half | interleaved) -> rotary
    "recognize.fuse-add-norm",  # residual add + norm -> add_norm (normed, sum)
    "recognize.fold-linear-epilogue",  # linear + bias add + activation -> one linear
]

__all__ = ["RECOGNIZE", "RecognizeNorms", "RecognizeActivations", "RecognizeRotary",
           "FuseAddNorm", "FoldLinearEpilogue"]
