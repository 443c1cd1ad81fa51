"""Quantization (issue 13): linear weights to int8 / int4 / fp8, weight-only or W8A8.

- ``quant.quantize-weights`` (:mod:`.quantize`): option ``quantize="int4-awq"`` (or a dict,
  :mod:`.config`), with ``calibration=`` batches for GPTQ / AWQ / SmoothQuant; rewrites
  linears to ``qlinear`` / ``qmatmul`` and reports the error (:mod:`.report`);
- :mod:`.calibrate`: runs the float graph on the batches and collects per-layer input
  statistics; :mod:`.gptq`, :mod:`.awq`, :mod:`.smoothquant`: the algorithms on tensors;
- :mod:`.sites`, :mod:`.smooth`, :mod:`.evaluate`: finding layers, applying input scales,
  end-to-end accuracy.
"""

from transfuse.passes.quant.config import SCHEMES, LayerSpec, QuantConfig, parse_quantize
from transfuse.passes.quant.quantize import QuantizeWeights
from transfuse.passes.quant.report import LayerReport, QuantReport

__all__ = ["QuantizeWeights", "QuantConfig", "LayerSpec", "parse_quantize", "SCHEMES",
           "QuantReport", "LayerReport"]
