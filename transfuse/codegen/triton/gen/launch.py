"""Launching a generated kernel on torch tensors: :func:`run` and :func:`launch_config`.

``run(kernel, inputs, out=None, env=None)`` checks the inputs against the kernel's IR types
(a bad one raises :class:`~transfuse.errors.LoweringError` naming it), binds the symbolic
dims (from ``env``, else from the inputs' shapes), allocates the outputs (or checks ``out=``,
which tests poison with NaN), evaluates the int arguments, picks the launch configuration
and launches. Inputs that are not contiguous are copied (the kernel indexes contiguous
tensors; a host that passes views pays for the copy here).

Configuration (:func:`launch_config`), specialised on power-of-two buckets at most, never on
exact lengths:

- pointwise: ``BLOCK = min(1024, next_pow2(numel))``, one program per BLOCK elements;
- row: rows of ``N <= max_block`` (default :data:`~.space.MAX_ROW_BLOCK`, 4096) are held
  whole: ``BLOCK = next_pow2(N)``, ``SINGLE``, ROWS rows a program (a tile of ~2048
  elements, at most 32 rows, at most next_pow2(M)); longer rows are looped in
  ``LOOP_BLOCK`` chunks, one row a program;
- ``IDX64`` when a tensor has 2**31 elements or more (offsets in int64).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import triton

from transfuse.codegen.triton.gen.emit import GeneratedKernel
from transfuse.codegen.triton.gen.space import MAX_ROW_BLOCK
from transfuse.errors import LoweringError
from transfuse.ir.types import Dim, DType, eval_dim

#: the most elements a pointwise program takes
POINTWISE_BLOCK = 1024
#: the chunk a looped row kernel walks a row in
LOOP_BLOCK = 2048
#: the elements a row kernel's tile aims at when rows are short
ROW_TILE = 2048
#: the most rows a row program takes
MAX_ROWS = 32

POINTER_SIG = {DType.f16: "*fp16", DType.bf16: "*bf16", DType.f32: "*fp32", DType.f64: "*fp64",
        DType.i64: "*i64", DType.i32: "*i32", DType.i16: "*i16", DType.i8: "*i8",
        DType.u8: "*u8", DType.bool: "*i1"}


@functools.lru_cache(maxsize=4096)
def _eval(dims: tuple[Dim, ...], env: tuple[tuple[str, int], ...]) -> tuple[int, ...]:
    values = dict(env)
    return tuple(eval_dim(d, values) for d in dims)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def launch_config(kernel: GeneratedKernel, env: Mapping[str, int],
                  max_block: int | None = None) -> dict[str, Any]:
    """``{"grid", "constexprs", "num_warps", "work"}`` of ``kernel`` at the symbols ``env``."""
    key = tuple(sorted(env.items()))
    if kernel.kind == "pointwise":
        (numel,) = _eval((kernel.numel,), key)
        block = min(POINTWISE_BLOCK, _pow2(numel))
        return {"grid": (triton.cdiv(numel, block),), "work": numel,
                "constexprs": {"BLOCK": block, "IDX64": numel >= 2**31},
                "num_warps": max(1, min(4, block // 256))}
    m, n = _eval((kernel.rows, kernel.row_len), key)
    big = m * n >= 2**31
    limit = MAX_ROW_BLOCK if max_block is None else max_block
    block = _pow2(n)
    if block <= limit:
        rows = max(1, min(MAX_ROWS, ROW_TILE // block, _pow2(m)))
        return {"grid": (triton.cdiv(m, rows),), "work": m * n,
                "constexprs": {"ROWS": rows, "BLOCK": block, "SINGLE": True, "IDX64": big},
                "num_warps": max(1, min(8, rows * block // 512))}
    block = min(LOOP_BLOCK, 1 << (limit.bit_length() - 1))
    return {"grid": (m,), "work": m * n,
            "constexprs": {"ROWS": 1, "BLOCK": block, "SINGLE": False, "IDX64": big},
            "num_warps": max(1, min(8, block // 256))}


def _fail(kernel: GeneratedKernel, what: str, t: Any, expected: str) -> LoweringError:
    got = (f"shape {tuple(t.shape)} dtype {t.dtype} on {t.device}"
           if isinstance(t, torch.Tensor) else repr(t)[:80])
    return LoweringError(f"triton gen kernel {kernel.name}: {what} has {got}; expected {expected}")


def bind(kernel: GeneratedKernel, inputs: Sequence[Any],
         env: Mapping[str, int] | None = None) -> dict[str, int]:
    """The symbols' values: ``env``, completed from the inputs' dims that are one symbol."""
    out = dict(env or {})
    for i, (t, want) in enumerate(zip(inputs, kernel.input_types)):
        if not isinstance(t, torch.Tensor) or t.dim() != len(want.shape):
            continue
        for d, actual in zip(want.shape, t.shape):
            if not isinstance(d, int) and d.is_Symbol:
                prev = out.setdefault(d.name, int(actual))
                if prev != actual:
                    raise _fail(kernel, f"input {i} (%{kernel.input_names[i]}: {want})", t,
                                f"{d.name}={prev} as elsewhere")
    missing = [s for s in kernel.symbols if s not in out]
    if missing:
        raise LoweringError(f"triton gen kernel {kernel.name}: no value for the symbolic "
                            f"dim(s) {missing}; pass env={{...}}")
    return out


def run(kernel: GeneratedKernel, inputs: Sequence[torch.Tensor],
        out: Sequence[torch.Tensor] | None = None, *, env: Mapping[str, int] | None = None,
        max_block: int | None = None) -> list[torch.Tensor]:
    """Run ``kernel`` on ``inputs`` (in ``kernel.input_names`` order); returns its outputs
    (``out`` when given: contiguous tensors of the output types). ``env``: the symbolic
    dims' values (else read from the inputs); ``max_block``: the longest row held in
    registers (tests lower it to exercise the looped variant)."""
    if len(inputs) != len(kernel.input_types):
        raise LoweringError(f"triton gen kernel {kernel.name} takes {len(kernel.input_types)} "
                            f"inputs ({', '.join('%' + n for n in kernel.input_names)}), "
                            f"got {len(inputs)}")
    values = bind(kernel, inputs, env)
    key = tuple(sorted(values.items()))
    device = None
    tensors = []
    for i, (t, want) in enumerate(zip(inputs, kernel.input_types)):
        shape = _eval(tuple(want.shape), key)
        what = f"input {i} (%{kernel.input_names[i]}: {want})"
        if not isinstance(t, torch.Tensor) or t.dtype != want.dtype.torch or \
                tuple(t.shape) != shape:
            raise _fail(kernel, what, t, f"shape {shape} dtype {want.dtype.torch}")
        device = t.device if device is None else device
        if t.device != device:
            raise _fail(kernel, what, t, f"a tensor on {device} (where input 0 is)")
        tensors.append(t if t.is_contiguous() else t.contiguous())
    shapes = [_eval(tuple(t.shape), key) for t in kernel.output_types]
    if out is None:
        dev = device if device is not None else torch.device(
            "cpu" if _interpreting() else "cuda")
        outs = [torch.empty(s, dtype=t.dtype.torch, device=dev)
                for s, t in zip(shapes, kernel.output_types)]
    else:
        outs = list(out)
        if len(outs) != len(kernel.output_types):
            raise LoweringError(f"triton gen kernel {kernel.name} writes "
                                f"{len(kernel.output_types)} outputs, got {len(outs)} in out=")
        for j, (o, s, t) in enumerate(zip(outs, shapes, kernel.output_types)):
            if not isinstance(o, torch.Tensor) or o.dtype != t.dtype.torch or \
                    tuple(o.shape) != s or not o.is_contiguous() or \
                    (device is not None and o.device != device):
                raise _fail(kernel, f"out[{j}] (%{kernel.output_names[j]}: {t})", o,
                            f"a contiguous tensor of shape {s} dtype {t.dtype.torch}"
                            f"{'' if device is None else f' on {device}'}")
    cfg = launch_config(kernel, values, max_block)
    if cfg["work"] == 0:
        return outs
    ints = _eval(tuple(d for _, d in kernel.int_args), key)
    consts = dict(cfg["constexprs"])
    if any(t.numel() >= 2**31 for t in tensors + outs):
        consts["IDX64"] = True
    kernel.jit()[cfg["grid"]](*tensors, *outs, *ints, **consts, num_warps=cfg["num_warps"])
    return outs


def _interpreting() -> bool:
    from transfuse.codegen.triton.env import interpreting

    return interpreting()


def compile_spec(kernel: GeneratedKernel, env: Mapping[str, int],
                 max_block: int | None = None):
    """A :class:`~transfuse.codegen.triton.kernels.spec.KernelSpec` of ``kernel`` launched at
    the symbols ``env``, for the compile check (the module is importable by name once
    :meth:`GeneratedKernel.jit` has written it to the cache directory)."""
    from transfuse.codegen.triton.gen.cache import load_module, module_name
    from transfuse.codegen.triton.kernels.spec import KernelSpec

    load_module(kernel.source)
    cfg = launch_config(kernel, env, max_block)
    ints = _eval(tuple(d for _, d in kernel.int_args), tuple(sorted(env.items())))
    sig = {f"in{i}": POINTER_SIG[t.dtype] for i, t in enumerate(kernel.input_types)}
    sig.update({f"out{j}": POINTER_SIG[t.dtype] for j, t in enumerate(kernel.output_types)})
    sig.update({name: "i64" if v >= 2**31 else "i32"
                for (name, _), v in zip(kernel.int_args, ints)})
    sig.update({c: "constexpr" for c in cfg["constexprs"]})
    tag = ",".join(f"{k}={v}" for k, v in cfg["constexprs"].items())
    return KernelSpec(f"{module_name(kernel.source)}:{kernel.name}", f"{kernel.name}[{tag}]",
                      sig, dict(cfg["constexprs"]), num_warps=cfg["num_warps"], num_stages=1)


__all__ = ["run", "launch_config", "bind", "compile_spec", "POINTWISE_BLOCK", "LOOP_BLOCK"]
