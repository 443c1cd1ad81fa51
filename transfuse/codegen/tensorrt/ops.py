"""TensorRT's ONNX operator support list, as data, and the check of a model against it.

Source: ``docs/operators.md`` of onnx/onnx-tensorrt (the ONNX parser TensorRT ships) at the
TensorRT 10.15 release: "TensorRT 10.15 supports operators in the inclusive range of opset 9 to
opset 24". Each supported op is listed below with the types and the restrictions that file
gives (transcribed as data; ops the file marks "N" are in :data:`UNSUPPORTED_10_15`).

Versions (:func:`support_for`): only the 10.15 table was read. 10.14 and 11.x are taken to
parse what 10.15 parses (10.14 is the first release importing ``Attention`` natively, as the
issue states; no 11.x table was available here). Releases before 10.14 are taken as the 10.15
list without the opset-23/24 ops (``Attention``, ``RMSNormalization``, ``RotaryEmbedding``,
``TensorScatter``) and opsets 9..20 (the range the 10.0 operators.md states). Those three
readings are assumptions, said here and in :data:`SOURCES`; check the operators.md of the
release you deploy on.

Glossary: "types" are TensorRT's names (FP32, FP16, BF16, INT32, INT64, INT8, INT4, FP8, FP4,
BOOL, UINT8).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from transfuse.errors import LoweringError

#: where each version's list comes from
SOURCES = {
    "10.15": "onnx/onnx-tensorrt docs/operators.md at the TensorRT 10.15 release (read)",
    "10.14": "assumed equal to 10.15 (Attention native since 10.14 per issue 15)",
    "11": "assumed equal to 10.15 (no TensorRT 11 operators.md was available)",
    "10.0-10.13": "10.15 list minus Attention/RMSNormalization/RotaryEmbedding/TensorScatter, "
                  "opsets 9..20 (the 10.0 operators.md's range); assumed",
}

_F = "FP32, FP16, BF16"
_FI = "FP32, FP16, BF16, INT32, INT64"
_FIB = "FP32, FP16, BF16, INT32, INT64, BOOL"
_AXES = "`axes` must be an initializer"

#: op -> (types, restriction) for TensorRT 10.15 (operators.md "Y" rows)
SUPPORTED_10_15: dict[str, tuple[str, str]] = {
    "Abs": (_FI, ""), "Acos": (_F, ""), "Acosh": (_F, ""), "Add": (_FI, ""),
    "And": ("BOOL", ""), "ArgMax": (_FI, ""), "ArgMin": (_FI, ""), "Asin": (_F, ""),
    "Asinh": (_F, ""), "Atan": (_F, ""), "Atanh": (_F, ""),
    "Attention": (_F + ", INT8, FP8",
                  "Q, K, V and attn_mask 4-D; no past_key/past_value/nonpad_kv_seqlen inputs; "
                  "no present_key/present_value/qk_matmul_output outputs; qk_matmul_output_mode "
                  "and softcap unsupported; head counts taken from the 4-D shapes"),
    "AveragePool": (_F, "2-D or 3-D pooling; dilations empty or ones"),
    "BatchNormalization": (_F, ""), "BlackmanWindow": ("FP32, FP16", ""),
    "Cast": (_FI + ", UINT8, BOOL", ""), "CastLike": (_FI + ", UINT8, BOOL", ""),
    "Ceil": (_F, ""), "Celu": (_F, ""), "Clip": (_F, ""), "Concat": (_FIB, ""),
    "Constant": (_F + ", FP8, FP4, INT4, INT32, INT64, BOOL",
                 "no sparse_value / value_string / value_strings"),
    "ConstantOfShape": (_F + ", FP8, FP4, INT4, INT32, INT64, BOOL", ""),
    "Conv": (_F, ""), "ConvTranspose": (_F, ""), "Cos": (_F, ""), "Cosh": (_F, ""),
    "CumSum": (_F, "`axis` a build-time constant"),
    "DeformConv": ("FP32, FP16", "1-D or 2-D spatial input; symmetric pads"),
    "DepthToSpace": (_FI, ""),
    "DequantizeLinear": ("INT8, FP8, FP4, INT4", "`x_zero_point` must be zero"),
    "Div": (_FI, ""), "Dropout": (_F, "`is_training` an initializer, False"),
    "Einsum": (_F, ""), "Elu": (_F, ""), "Equal": (_FI, ""), "Erf": (_F, ""), "Exp": (_F, ""),
    "Expand": (_FIB, ""), "EyeLike": (_FIB, "static input dims"), "Flatten": (_FIB, ""),
    "Floor": (_F, ""), "Gather": (_FIB, ""), "GatherElements": (_FIB, ""),
    "GatherND": (_FIB, ""), "Gelu": (_F + ", INT8, INT32, INT64", ""), "Gemm": (_F, ""),
    "GlobalAveragePool": (_F, ""), "GlobalLpPool": (_F, ""), "GlobalMaxPool": (_F, ""),
    "Greater": (_FI, ""), "GreaterOrEqual": (_FI, ""),
    "GridSample": ("FP32, FP16", "4-D input"), "GroupNormalization": (_F, ""),
    "GRU": (_F, "bidirectional: same activations both ways"),
    "HammingWindow": ("FP32, FP16", ""), "HannWindow": ("FP32, FP16", ""),
    "HardSigmoid": (_F, ""), "HardSwish": (_F, ""),
    "Hardmax": (_F, "`axis` dim a build-time constant"), "Identity": (_FIB, ""),
    "If": (_FIB, "branch outputs of equal rank and different names"), "ImageScaler": (_F, ""),
    "InstanceNormalization": (_F, ""), "IsInf": (_F, ""), "IsNaN": (_FI, ""),
    "LayerNormalization": (_F, "only the first output Y"), "LeakyRelu": (_F, ""),
    "Less": (_FI, ""), "LessOrEqual": (_FI, ""), "Log": (_F, ""), "LogSoftmax": (_F, ""),
    "Loop": (_FIB, "static scan output length; loop-carried shapes fixed"), "LRN": (_F, ""),
    "LSTM": (_F, "bidirectional: same activations; input_forget 0; layout 0"),
    "LpNormalization": (_F, ""), "LpPool": (_F, "dilations empty or ones"),
    "MatMul": (_F, ""), "Max": (_FI, ""), "MaxPool": (_F, "2-D or 3-D; no Indices output"),
    "Mean": (_F + ", FP8, INT32, INT64", ""), "MeanVarianceNormalization": (_F, ""),
    "Min": (_FI, ""), "Mish": ("FP32, FP16", ""), "Mod": (_FI, ""), "Mul": (_FI, ""),
    "Neg": (_FI, ""), "NonMaxSuppression": ("FP32, FP16", ""), "NonZero": ("FP32, FP16", ""),
    "Not": ("BOOL", ""), "OneHot": (_FIB, "`depth` a build-time constant"), "Or": ("BOOL", ""),
    "Pad": (_FI, ""), "ParametricSoftplus": (_F, ""), "Pow": (_FI, ""), "PRelu": (_F, ""),
    "QuantizeLinear": (_F, "`y_zero_point` must be 0"),
    "RandomNormal": (_F, "seed ignored"), "RandomNormalLike": (_F, "seed ignored"),
    "RandomUniform": (_F, "seed ignored"), "RandomUniformLike": (_F, "seed ignored"),
    "Range": (_FI, ""), "Reciprocal": (_F, ""),
    **{r: (_FI, _AXES) for r in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                                 "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
                                 "ReduceSum", "ReduceSumSquare")},
    "Relu": (_FI, ""), "Reshape": (_FIB, ""),
    "Resize": (_F, "modes nearest/linear; listed coordinate transformation modes; no antialias"),
    "ReverseSequence": (_FIB, ""), "RMSNormalization": (_F, ""), "RNN": (_F, ""),
    "RoiAlign": ("FP32, FP16", ""),
    "RotaryEmbedding": (_F, "`position_ids` INT64"), "Round": (_F, ""),
    "STFT": ("FP32", "frame_step and window initializers; real input"), "ScaledTanh": (_F, ""),
    "Scan": (_F, ""), "Scatter": (_FI, ""), "ScatterElements": (_FI, ""),
    "ScatterND": (_FI, "reduction none only"), "Selu": (_F, ""), "Shape": (_FIB, ""),
    "Shrink": (_FI, ""), "Sigmoid": (_F, ""), "Sign": (_FI, ""), "Sin": (_F, ""),
    "Sinh": (_F, ""), "Size": (_FIB, ""), "Slice": (_FIB, ""), "Softmax": (_F, ""),
    "Softplus": (_F, ""), "Softsign": (_F, ""), "SpaceToDepth": (_FI, ""), "Split": (_FIB, ""),
    "Sqrt": (_F, ""), "Squeeze": (_FIB, "`axes` resolvable to a constant"), "Sub": (_FI, ""),
    "Sum": (_FI, ""), "Tan": (_F, ""), "Tanh": (_F, ""),
    "TensorScatter": ("FP32, FP16, BF16, INT32", "past_cache and update 4-D; axis -2"),
    "ThresholdedRelu": (_F, ""), "Tile": (_FIB, ""),
    "TopK": (_FI, "sorted 1; K < 3840"), "Transpose": (_FIB, ""), "Trilu": (_FIB, ""),
    "Unsqueeze": (_FIB, "`axes` resolvable to a constant"), "Upsample": (_F, ""),
    "Where": (_FIB, ""), "Xor": ("BOOL", ""),
}

#: ops the 10.15 operators.md marks unsupported ("N")
UNSUPPORTED_10_15 = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr",
    "BitwiseXor", "Col2Im", "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger",
    "DFT", "Det", "DynamicQuantizeLinear", "ImageDecoder", "MatMulInteger", "MaxRoiPool",
    "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional",
    "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul",
    "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss",
    "SplitToSequence", "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer",
    "Unique",
})

#: ops of opset 23/24 that releases before 10.14 are taken not to parse
_OPSET_23_OPS = frozenset({"Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter"})


@dataclass(frozen=True)
class TrtOnnxSupport:
    """What one TensorRT release's ONNX parser takes: ops (with types and restrictions),
    the opset range, and where that comes from."""

    version: str
    ops: dict[str, tuple[str, str]]
    opsets: range
    source: str


def _parse_version(trt_version: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in str(trt_version).split(".")[:2]]
    except ValueError:
        parts = []
    if not parts or parts[0] < 10:
        raise LoweringError(f"trt_version {trt_version!r}: TensorRT 10.x or 11.x expected "
                         "(e.g. '10.14')")
    return parts[0], parts[1] if len(parts) > 1 else 0


def support_for(trt_version: str) -> TrtOnnxSupport:
    """The support list of TensorRT ``trt_version`` ("10.14", "10.15", "11.0"...)."""
    major, minor = _parse_version(trt_version)
    if major == 10 and minor < 14:
        ops = {k: v for k, v in SUPPORTED_10_15.items() if k not in _OPSET_23_OPS}
        return TrtOnnxSupport(str(trt_version), ops, range(9, 21), SOURCES["10.0-10.13"])
    key = "10.15" if (major, minor) == (10, 15) else "10.14" if major == 10 else "11"
    return TrtOnnxSupport(str(trt_version), SUPPORTED_10_15, range(9, 25), SOURCES[key])


def _is_zero_initializer(name: str, inits: dict[str, onnx.TensorProto]) -> bool:
    t = inits.get(name)
    if t is None:
        return False
    arr = onnx.numpy_helper.to_array(t)
    return bool((arr.astype("float64") == 0).all())


def unsupported_ops(model: onnx.ModelProto, trt_version: str = "10.14") -> list[str]:
    """What in ``model`` TensorRT ``trt_version``'s ONNX parser does not take (sorted; empty
    when everything is on its list): ops off the list, ops of other domains as
    ``domain.Op``, an opset outside its range, and the restrictions checked on attributes and
    inputs (``Attention(softcap)``, ``Attention(past_key)``, ``DequantizeLinear(x_zero_point)``
    / ``QuantizeLinear(y_zero_point)`` when not constant zeros)."""
    sup = support_for(trt_version)
    out: set[str] = set()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version not in sup.opsets:
            out.add(f"opset {imp.version} (TensorRT {sup.version} parses "
                    f"{sup.opsets.start}..{sup.opsets.stop - 1})")
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            out.add(f"{node.domain}.{node.op_type}")
            continue
        if node.op_type not in sup.ops:
            out.add(node.op_type)
            continue
        attrs = {a.name for a in node.attribute}
        if node.op_type == "Attention":
            if "softcap" in attrs:
                out.add("Attention(softcap)")
            if len(node.input) > 4 and any(node.input[4:]):
                out.add("Attention(past_key/past_value/nonpad_kv_seqlen)")
            if len(node.output) > 1 and any(node.output[1:]):
                out.add("Attention(present/qk outputs)")
        if node.op_type in ("DequantizeLinear", "QuantizeLinear") and len(node.input) > 2 \
                and node.input[2] and not _is_zero_initializer(node.input[2], inits):
            which = "x_zero_point" if node.op_type == "DequantizeLinear" else "y_zero_point"
            out.add(f"{node.op_type}({which})")
    return sorted(out)


__all__ = ["SOURCES", "SUPPORTED_10_15", "UNSUPPORTED_10_15", "TrtOnnxSupport", "support_for",
           "unsupported_ops"]
