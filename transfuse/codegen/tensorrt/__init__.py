"""The TensorRT target: strongly typed ONNX for TensorRT's ONNX parser, optimization profiles, a
standalone engine build script and an engine runtime.

TensorRT itself is optional. Everything that needs it goes through
`transfuse.codegen.tensorrt.available.tensorrt_unavailable()`; without TensorRT the target runs the
ONNX TensorRT would parse in ONNX Runtime and says so. Importing this package imports nothing heavy.
"""

from transfuse.codegen.tensorrt.available import tensorrt_unavailable

__all__ = ["tensorrt_unavailable", "TensorRTTarget", "lower_tensorrt"]


def __getattr__(name: str):
    # Lazy: the target pulls in the ONNX backend, lower_tensorrt is helper trt-onnx's module.
    if name == "TensorRTTarget":
        from transfuse.codegen.tensorrt.target import TensorRTTarget

        return TensorRTTarget
    if name == "lower_tensorrt":
        from transfuse.codegen.tensorrt.lower import lower_tensorrt

        return lower_tensorrt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
