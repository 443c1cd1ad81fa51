"""Matrix products: ``matmul`` (batched, broadcasting) and ``linear``.

Glossary: M rows of the left operand, K the contracted dim, N output columns.
``linear(x, w, b)`` = ``x @ w.T + b`` with ``w`` of shape [N, K] (torch layout), optionally
followed by an ``activation`` folded in by ``recognize.fold-linear-epilogue``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transfuse.errors import IRVerifyError
from transfuse.ir.opdef import Attr, default_bytes, register
from transfuse.ir.opdefs._util import in_type, result_dtype
from transfuse.ir.types import TensorType, broadcast_shapes, dim_str, dims_equal


def _infer_matmul(node):
    a, b = in_type(node, 0), in_type(node, 1)
    if a.rank == 0 or b.rank == 0:
        raise IRVerifyError(f"matmul: operands must have rank >= 1, got {a} and {b}")
    ash = a.shape if a.rank > 1 else (1,) + a.shape
    bsh = b.shape if b.rank > 1 else b.shape + (1,)
    if not dims_equal(ash[-1], bsh[-2]):
        raise IRVerifyError(f"matmul: contracted dims differ: {a} @ {b} "
                            f"({dim_str(ash[-1])} vs {dim_str(bsh[-2])})")
    batch = broadcast_shapes(ash[:-2], bsh[:-2])
    shape = list(batch) + [ash[-2], bsh[-1]]
    if a.rank == 1:
        shape.pop(-2)
    if b.rank == 1:
        shape.pop(-1)
    return [TensorType(result_dtype(a, b), shape)]


def _cost_matmul(node):
    a = in_type(node, 0)
    k = a.shape[-1]
    return 2 * node.outputs[0].type.numel() * k, default_bytes(node)


@register("matmul", ["a", "b"], infer=_infer_matmul, cost=_cost_matmul)
def matmul(xs, attrs, env):
    return torch.matmul(xs[0], xs[1])


def _infer_linear(node):
    x, w = in_type(node, 0), in_type(node, 1)
    if w.rank != 2:
        raise IRVerifyError(f"linear: weight must be 2-D [N, K], got {w}")
    if x.rank < 1 or not dims_equal(x.shape[-1], w.shape[1]):
        raise IRVerifyError(f"linear: input {x} does not match weight {w} (last dim vs K)")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = in_type(node, 2)
        if b.rank != 1 or not dims_equal(b.shape[0], w.shape[0]):
            raise IRVerifyError(f"linear: bias {b} does not match weight {w}")
    return [TensorType(result_dtype(x, w), x.shape[:-1] + (w.shape[0],))]


def _cost_linear(node):
    x, w = in_type(node, 0), in_type(node, 1)
    return 2 * x.numel() * w.shape[0], default_bytes(node)


#: activations a ``linear`` may apply to its result (its ``activation`` attribute)
LINEAR_ACTIVATIONS = {
    "gelu": lambda y: F.gelu(y),
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
    "relu": torch.relu,
}


#: values of linear's ``gemm`` attribute
LINEAR_GEMMS = ("torch", "blas")


def _verify_linear(node):
    if node.attrs["gemm"] not in LINEAR_GEMMS:
        return f"linear: gemm must be one of {list(LINEAR_GEMMS)}, got {node.attrs['gemm']!r}"
    act = node.attrs["activation"]
    if act is not None and act not in LINEAR_ACTIVATIONS:
        return (f"linear: activation must be one of {sorted(LINEAR_ACTIVATIONS)} or none, "
                f"got {act!r}")
    return None


@register("linear", ["x", "weight", "bias?"],
          {"activation": Attr("str?", None), "gemm": Attr("str", "torch")},
          infer=_infer_linear, verify=_verify_linear, cost=_cost_linear)
def linear(xs, attrs, env):
    """x @ weight.T + bias, then ``activation`` (none, gelu, gelu_tanh, silu, relu).

    ``gemm`` picks the CPU GEMM library the python backend calls ("torch": torch's own,
    "blas": numpy's OpenBLAS, see ``codegen/blas.py``); it never changes the math, so the
    reference implementation ignores it.
    """
    bias = xs[2] if len(xs) > 2 else None
    y = F.linear(xs[0], xs[1], bias)
    act = attrs["activation"]
    return y if act is None else LINEAR_ACTIVATIONS[act](y)
