"""ONNX constants and tensors of the onnxruntime backend: dtypes, initializers, numpy views.

Leaf module: the builder, the lowerings and the program all use it, it uses none of them.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from transfuse.ir.types import DType

DEFAULT_OPSET = 17
MS_DOMAIN = "com.microsoft"
#: a model above this many bytes cannot be one protobuf: its weights go to an external file
PROTOBUF_LIMIT = 2**31 - 1
#: constants with more elements than this are handed to the session by reference
EXTERNAL_MIN_NUMEL = 64

ONNX_DTYPES: dict[DType, int] = {
    DType.f64: TensorProto.DOUBLE, DType.f32: TensorProto.FLOAT, DType.f16: TensorProto.FLOAT16,
    DType.bf16: TensorProto.BFLOAT16, DType.f8e4m3: TensorProto.FLOAT8E4M3FN,
    DType.f8e5m2: TensorProto.FLOAT8E5M2, DType.i64: TensorProto.INT64,
    DType.i32: TensorProto.INT32, DType.i16: TensorProto.INT16, DType.i8: TensorProto.INT8,
    DType.u8: TensorProto.UINT8, DType.bool: TensorProto.BOOL,
}


def onnx_dtype(d: DType) -> int:
    """The ONNX element type of an IR dtype."""
    return ONNX_DTYPES[d]


# -- tensors as initializers --------------------------------------------------------------


def tensor_proto(name: str, t: torch.Tensor, *, external: bool = False) -> TensorProto:
    """An initializer for ``t``: its bytes, or (``external``) a placeholder that the session
    fills with an ``OrtValue`` view of ``t`` (``SessionOptions.add_external_initializers``)."""
    t = t.detach()
    tp = TensorProto()
    tp.name = name
    tp.data_type = onnx_dtype(DType.from_torch(t.dtype))
    tp.dims.extend(t.shape)
    if external:
        tp.data_location = TensorProto.EXTERNAL
        entry = tp.external_data.add()
        entry.key, entry.value = "location", "transfuse-session-initializer"
        return tp
    t = t.cpu().contiguous()
    if t.dtype == torch.bool:
        tp.raw_data = t.numpy().astype(np.bool_).tobytes()
    else:
        tp.raw_data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return tp


def numpy_view(t: torch.Tensor) -> np.ndarray | None:
    """A numpy array sharing ``t``'s memory (contiguous CPU), or None (no numpy dtype)."""
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        return None
    return t.detach().numpy()


def printable(text: str) -> str:
    """``text`` with every non-printable character replaced (ONNX names, summaries)."""
    return "".join(c if c.isprintable() else "_" for c in text)


__all__ = ["DEFAULT_OPSET", "MS_DOMAIN", "PROTOBUF_LIMIT", "EXTERNAL_MIN_NUMEL", "ONNX_DTYPES",
           "onnx_dtype", "tensor_proto", "numpy_view", "printable"]
