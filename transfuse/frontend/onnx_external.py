"""ONNX tensors -> torch tensors: element types, inline payloads and external data, safely.

    tensor = tensor_from_proto(initializer, base_dir, budget)

Element types: the ONNX types with an IR :class:`DType` (:data:`ONNX_TO_DTYPE`); any other
(uint16/32/64, strings, complex, 4-bit and the ``FNUZ`` float8 variants) is a
:class:`CaptureError` naming the tensor.

External data (``data_location: EXTERNAL``) is resolved here, never by
``onnx.load_external_data_for_model``: the model is loaded with
``load_external_data=False`` and each tensor's ``location`` / ``offset`` / ``length``
is checked before one byte is read. A location must be a relative path inside the
model's directory: no absolute path, no drive, no ``..`` component, no symbolic link
anywhere on the way (and the file is opened with ``O_NOFOLLOW`` where the OS has it),
a regular file; ``offset + length`` must lie within the file and ``length`` must be
the tensor's size; all external bytes together stay under a cap
(:data:`DEFAULT_MAX_EXTERNAL_BYTES`, 64 GiB, configurable). Anything else is an
:class:`ArtifactError` naming the tensor and the location.

Dims must be non-negative and their product must fit in int64
(:class:`CaptureError` otherwise), and an inline payload must hold exactly that many
elements.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from transfuse.errors import ArtifactError, CaptureError
from transfuse.ir.types import DType

#: the default cap on all external data of one model together, in bytes
DEFAULT_MAX_EXTERNAL_BYTES = 64 << 30
INT64_MAX = 2**63 - 1

ONNX_TO_DTYPE: dict[int, DType] = {
    TensorProto.FLOAT: DType.f32,
    TensorProto.DOUBLE: DType.f64,
    TensorProto.FLOAT16: DType.f16,
    TensorProto.BFLOAT16: DType.bf16,
    TensorProto.FLOAT8E4M3FN: DType.f8e4m3,
    TensorProto.FLOAT8E5M2: DType.f8e5m2,
    TensorProto.INT64: DType.i64,
    TensorProto.INT32: DType.i32,
    TensorProto.INT16: DType.i16,
    TensorProto.INT8: DType.i8,
    TensorProto.UINT8: DType.u8,
    TensorProto.BOOL: DType.bool,
}
DTYPE_TO_ONNX: dict[DType, int] = {v: k for k, v in ONNX_TO_DTYPE.items()}


def type_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"type {elem_type}"


def dtype_of(elem_type: int, what: str) -> DType:
    """The IR element type of an ONNX one; :class:`CaptureError` naming ``what`` if none."""
    try:
        return ONNX_TO_DTYPE[elem_type]
    except KeyError:
        supported = ", ".join(sorted(type_name(t) for t in ONNX_TO_DTYPE))
        raise CaptureError(f"{what} has element type {type_name(elem_type)}, which transfuse "
                           f"does not support (supported: {supported})") from None


def check_dims(dims, what: str) -> list[int]:
    """Static dims as ints: each >= 0 and the product within int64."""
    out, total = [], 1
    for d in dims:
        d = int(d)
        if d < 0 or d > INT64_MAX:
            raise CaptureError(f"{what} has dim {d}: dims must be in [0, 2**63 - 1]")
        total *= d
        out.append(d)
    if total > INT64_MAX:
        raise CaptureError(f"{what} has dims {out} whose product {total} overflows int64")
    return out


class Budget:
    """How many external bytes may still be read (shared by all tensors of a model)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_EXTERNAL_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise CaptureError(f"max_external_bytes must be a non-negative int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, n: int, name: str, location: str) -> None:
        if self.used + n > self.max_bytes:
            raise ArtifactError(
                f"tensor {name!r}: external data in {location!r} would bring the model's external "
                f"data to {self.used + n} bytes, over the cap of {self.max_bytes} bytes; raise "
                "max_external_bytes if the model is really that large")
        self.used += n


def tensor_from_proto(t: TensorProto, base_dir: str | None, budget: Budget) -> torch.Tensor:
    """The torch tensor of an ONNX ``TensorProto`` (an initializer or a Constant's value)."""
    name = t.name or "<unnamed>"
    dtype = dtype_of(t.data_type, f"tensor {name!r}")
    dims = check_dims(t.dims, f"tensor {name!r}")
    numel = 1
    for d in dims:
        numel *= d
    if t.data_location == TensorProto.EXTERNAL:
        raw = _read_external(t, name, base_dir, numel * dtype.itemsize, budget)
        return _from_bytes(raw, dtype, dims)
    if t.HasField("raw_data"):
        raw = t.raw_data
        if len(raw) != numel * dtype.itemsize:
            raise CaptureError(f"tensor {name!r} of type {dtype} and dims {dims} needs "
                               f"{numel * dtype.itemsize} bytes of data, has {len(raw)}")
        return _from_bytes(bytearray(raw), dtype, dims)
    try:
        arr = numpy_helper.to_array(t)
    except Exception as e:  # noqa: BLE001 - a malformed payload is one clear error
        raise CaptureError(f"tensor {name!r}: cannot decode its payload: {e}") from None
    if arr.size != numel:
        raise CaptureError(f"tensor {name!r} has dims {dims} ({numel} elements) but its payload "
                           f"holds {arr.size}")
    return from_numpy(arr, dtype).reshape(dims)


def from_numpy(arr: np.ndarray, dtype: DType | None = None) -> torch.Tensor:
    """A numpy array (ml_dtypes bfloat16 / float8 included) as a torch tensor it owns."""
    arr = np.ascontiguousarray(arr)
    name = str(arr.dtype)
    if name == "bfloat16" or (dtype is not None and dtype == DType.bf16):
        return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
    if name.startswith("float8") or (dtype is not None and dtype in (DType.f8e4m3,
                                                                      DType.f8e5m2)):
        target = (dtype or (DType.f8e5m2 if "e5m2" in name else DType.f8e4m3)).torch
        return torch.from_numpy(arr.view(np.uint8).copy()).view(target)
    out = torch.from_numpy(arr.copy())
    if dtype is not None and out.dtype != dtype.torch:
        out = out.to(dtype.torch)
    return out


def _from_bytes(raw: bytearray, dtype: DType, dims: list[int]) -> torch.Tensor:
    if len(raw) == 0:
        return torch.empty(dims, dtype=dtype.torch)
    if dtype == DType.bool:
        return torch.frombuffer(raw, dtype=torch.uint8).to(torch.bool).reshape(dims)
    return torch.frombuffer(raw, dtype=dtype.torch).reshape(dims)


# -- external data ---------------------------------------------------------------------------


def _external_fields(t: TensorProto, name: str) -> tuple[str, int, int | None]:
    fields = {e.key: e.value for e in t.external_data}
    location = fields.get("location")
    if not location:
        raise ArtifactError(f"tensor {name!r} has external data without a 'location'")
    try:
        offset = int(fields.get("offset", "0"))
        length = int(fields["length"]) if "length" in fields else None
    except ValueError:
        raise ArtifactError(f"tensor {name!r}: external data in {location!r} has a malformed "
                            f"offset/length ({fields.get('offset')!r}, {fields.get('length')!r})") \
            from None
    if offset < 0 or (length is not None and length < 0):
        raise ArtifactError(f"tensor {name!r}: external data in {location!r} has a negative "
                            f"offset or length ({offset}, {length})")
    return location, offset, length


def resolve_location(base_dir: str, location: str, name: str) -> str:
    """The file ``location`` names inside ``base_dir``, or :class:`ArtifactError` saying why not."""
    def refuse(why: str) -> ArtifactError:
        return ArtifactError(f"tensor {name!r}: external data location {location!r} {why}; "
                             "external data must be a file inside the model's directory")

    if "\x00" in location:
        raise refuse("contains a NUL byte")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or \
            os.path.splitdrive(location)[0]:
        raise refuse("is an absolute path")
    parts = [p for p in location.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        raise refuse("names no file")
    if ".." in parts:
        raise refuse("leaves the model's directory ('..')")
    base = os.path.realpath(base_dir)
    cur = base
    for p in parts:
        cur = os.path.join(cur, p)
        if os.path.islink(cur):
            raise refuse(f"goes through the symbolic link {p!r}")
    if not os.path.exists(cur):
        raise refuse("does not exist")
    real = os.path.realpath(cur)
    if os.path.commonpath([real, base]) != base:
        raise refuse("resolves outside the model's directory")
    if not os.path.isfile(real):
        raise refuse("is not a regular file")
    return real


def _read_external(t: TensorProto, name: str, base_dir: str | None, nbytes: int,
                   budget: Budget) -> bytearray:
    location, offset, length = _external_fields(t, name)
    if base_dir is None:
        raise ArtifactError(f"tensor {name!r} keeps its data in the external file {location!r}, "
                            "but the model was not given as a path; load it from its file so "
                            "the data can be found next to it")
    if length is not None and length != nbytes:
        raise ArtifactError(f"tensor {name!r}: external data in {location!r} has length {length}, "
                            f"but its type and dims need {nbytes} bytes")
    path = resolve_location(base_dir, location, name)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ArtifactError(f"tensor {name!r}: cannot open external data {location!r}: "
                            f"{e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"tensor {name!r}: external data {location!r} is not a regular "
                                "file")
        if offset + nbytes > st.st_size:
            raise ArtifactError(f"tensor {name!r}: external data {location!r} has "
                                f"{st.st_size} bytes; offset {offset} + length {nbytes} "
                                "runs past its end")
        budget.take(nbytes, name, location)
        buf = bytearray(nbytes)
        view, done = memoryview(buf), 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done) if hasattr(os, "preadv") else \
                _pread_into(fd, view[done:], offset + done)
            if n <= 0:
                raise ArtifactError(f"tensor {name!r}: external data {location!r} ended early")
            done += n
        return buf
    finally:
        os.close(fd)


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    os.lseek(fd, offset, os.SEEK_SET)
    data = os.read(fd, len(view))
    view[: len(data)] = data
    return len(data)


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


__all__ = ["DEFAULT_MAX_EXTERNAL_BYTES", "ONNX_TO_DTYPE", "DTYPE_TO_ONNX", "Budget",
           "tensor_from_proto", "from_numpy", "resolve_location", "dtype_of", "check_dims",
           "type_name"]
