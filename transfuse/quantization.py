"""What ``optimize(quantize=...)`` takes, checked up front and turned into pass options.

``transfuse.optimize`` (``api.py``) calls :func:`quant_options` before it runs the pipeline:

- ``quantize``: a scheme name or a dict (``transfuse.passes.quant.config.parse_quantize``
  checks it; a bad scheme or option is a :class:`~transfuse.errors.PassError` before any
  capture or change);
- ``calibration`` / ``evaluation``: batches of example inputs, each turned into the flat
  inputs of the captured graph. A batch is a tensor (the first input, e.g. ``input_ids``
  [B, S]), a tuple/list of positional inputs, or a dict of keyword inputs; a batch that does
  not fit the graph is an :class:`~transfuse.errors.InputError` naming its index and what the
  graph expects. For generation (the graph takes ``input_ids`` and ``position_ids`` [1, N]),
  a batch is token ids [B, S] or [S]; every row becomes one sequence;
- ``min_sqnr``: layers whose output SQNR (dB) is under it stay in float.

The pass (``quant.quantize-weights``) does the rest; this module only shapes its options.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from transfuse.errors import InputError, PassError

#: ops of an ONNX model that mean it is quantized already
QUANTIZED_ONNX_OPS = frozenset({
    "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "QLinearMatMul",
    "QLinearConv", "MatMulInteger", "ConvInteger", "MatMulNBits", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QAttention", "QOrderedMatMul", "GatherBlockQuantized",
    "MatMulBnb4", "QGemm",
})


def check_quantize(quantize: Any, min_sqnr: float | None) -> None:
    """PassError when ``quantize`` / ``min_sqnr`` are not valid (nothing is compiled yet)."""
    from transfuse.passes.quant.config import parse_quantize

    parse_quantize(quantize)
    if min_sqnr is not None and (isinstance(min_sqnr, bool)
                                 or not isinstance(min_sqnr, (int, float))):
        raise PassError(f"min_sqnr must be a number of dB, got {min_sqnr!r}")


def onnx_quantized_ops(model: Any) -> list[str]:
    """The quantization ops in an ONNX model (a path, bytes or ModelProto), sorted."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray)):
        proto = onnx.load_from_string(bytes(model))
    else:
        proto = onnx.load(str(model), load_external_data=False)
    found = {n.op_type for n in proto.graph.node if n.op_type in QUANTIZED_ONNX_OPS}
    for f in proto.functions:
        found |= {n.op_type for n in f.node if n.op_type in QUANTIZED_ONNX_OPS}
    return sorted(found)


def quant_options(quantize: Any, calibration: Sequence[Any] | None,
                  evaluation: Sequence[Any] | None, min_sqnr: float | None,
                  to_graph_inputs: Callable[[Any, str], list[list[torch.Tensor]]]
                  ) -> dict[str, Any]:
    """The pass options of a quantized compile (empty without ``quantize``).

    ``to_graph_inputs(batch, where)`` turns one batch into a list of flat graph-input lists
    (raising InputError that names ``where``)."""
    if quantize is None:
        for name, value in (("calibration", calibration), ("evaluation", evaluation),
                            ("min_sqnr", min_sqnr)):
            if value is not None:
                raise PassError(f"{name}= is only used with quantize=...")
        return {}
    check_quantize(quantize, min_sqnr)
    out: dict[str, Any] = {"quantize": quantize}
    if calibration is not None:
        out["calibration"] = _batches(calibration, "calibration", to_graph_inputs)
    if evaluation is False:  # not measured (the report says so)
        out["evaluation"] = False
    elif evaluation is not None:
        out["evaluation"] = _batches(evaluation, "evaluation", to_graph_inputs)
    if min_sqnr is not None:
        out["min_sqnr"] = float(min_sqnr)
    return out


def _batches(batches: Any, name: str,
             to_graph_inputs: Callable[[Any, str], list[list[torch.Tensor]]]
             ) -> list[list[Any]]:
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Sequence) or \
            isinstance(batches, (str, bytes)):
        raise InputError(f"{name} must be a list of batches (tensors, tuples or dicts of "
                         f"inputs), got {type(batches).__name__}")
    if not batches:
        raise InputError(f"{name} is empty: give at least one batch")
    out: list[list[Any]] = []
    for i, batch in enumerate(batches):
        out.extend(to_graph_inputs(batch, f"{name}[{i}]"))
    return out


def signature_inputs(signature: Any) -> Callable[[Any, str], list[list[torch.Tensor]]]:
    """``to_graph_inputs`` for a graph captured with ``signature``: one flat input list per
    batch, checked by the signature (dtype, rank, fixed dims, symbol ranges)."""
    def convert(batch: Any, where: str) -> list[list[torch.Tensor]]:
        if isinstance(batch, torch.Tensor):
            args, kwargs = (batch,), {}
        elif isinstance(batch, Mapping):
            args, kwargs = (), dict(batch)
        elif isinstance(batch, (tuple, list)):
            args, kwargs = tuple(batch), {}
        else:
            raise InputError(f"{where}: a batch is a tensor, a tuple of inputs or a dict of "
                             f"keyword inputs, got {type(batch).__name__}")
        try:
            return [signature.flatten_inputs(args, kwargs)]
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    return convert


def generation_inputs(max_tokens: int, vocab: int | None
                      ) -> Callable[[Any, str], list[list[torch.Tensor]]]:
    """``to_graph_inputs`` for a generation capture (``input_ids``, ``position_ids`` [1, N]):
    every row of a token-id batch [B, S] (or [S]) is one sequence at positions 0..S-1; ids
    must lie in ``[0, vocab)`` when the vocabulary size is known."""
    def convert(batch: Any, where: str) -> list[list[torch.Tensor]]:
        if isinstance(batch, Mapping) and "input_ids" in batch:
            batch = batch["input_ids"]
        if not isinstance(batch, torch.Tensor) or batch.dim() not in (1, 2) or \
                batch.dtype.is_floating_point or batch.dtype == torch.bool:
            got = (f"{batch.dtype} {list(batch.shape)}" if isinstance(batch, torch.Tensor)
                   else type(batch).__name__)
            raise InputError(f"{where}: expected token ids, an integer tensor [B, S] or [S], "
                             f"got {got}")
        rows = batch[None] if batch.dim() == 1 else batch
        if rows.shape[1] < 2 or rows.shape[1] > max_tokens:
            raise InputError(f"{where}: sequences of {rows.shape[1]} tokens; the compiled step "
                             f"takes 2..{max_tokens}")
        if rows.numel() and (int(rows.min()) < 0 or (vocab is not None and
                                                      int(rows.max()) >= vocab)):
            raise InputError(f"{where}: token ids must lie in [0, {vocab}), got "
                             f"{int(rows.min())}..{int(rows.max())}")
        pos = torch.arange(rows.shape[1])[None]
        return [[row[None].to(torch.long), pos] for row in rows]
    return convert


__all__ = ["quant_options", "check_quantize", "onnx_quantized_ops", "signature_inputs",
           "generation_inputs", "QUANTIZED_ONNX_OPS"]
