"""The functions generated python code calls by name: the one table of them.

Emitters write a helper call through ``ctx.helper("_swiglu")``, which checks the name
against :data:`HELPERS` and records it; the program binds exactly this table into the
namespace of the generated module, and the generator never gives a value one of
these names. ``program.native_calls`` lists the helpers used that run the C kernels of
``codegen/native`` when they are available (``Helper.native``), so nobody has to read
the generated source to know whether the native kernels matter for a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from transfuse.codegen.native import ops as native_ops
from transfuse.codegen.python import quant_kernels
from transfuse.codegen.python.blas import gemm_linear
from transfuse.codegen.python.cpu_attention import causal_attention
from transfuse.codegen.python.generation import cached_attention_step
from transfuse.codegen.python.small_linear import small_linear, small_matmul
from transfuse.ir.opdefs.misc import call_fallback


def assert_all(xs: Sequence[torch.Tensor], message: str) -> None:
    """The ``assert`` op: every input must be all-true."""
    for x in xs:
        if not bool(torch.all(x)):
            raise AssertionError(message or "assertion in captured graph failed")


@dataclasses.dataclass(frozen=True)
class Helper:
    """A function the generated code calls; ``native``: it runs a codegen/native kernel
    when the library is available (its torch path otherwise)."""

    fn: Callable[..., Any]
    native: bool = False


#: name in the generated source -> the function bound to it
HELPERS: dict[str, Helper] = {
    "call_fallback": Helper(call_fallback),
    "_assert": Helper(assert_all),
    "_gemm_linear": Helper(gemm_linear),
    "_small_linear": Helper(small_linear, native=True),
    "_small_matmul": Helper(small_matmul, native=True),
    "_causal_attention": Helper(causal_attention, native=True),
    "_cached_attention": Helper(cached_attention_step),
    "_swiglu": Helper(native_ops.swiglu, native=True),
    "_rms_norm": Helper(native_ops.rms_norm, native=True),
    "_add_rms_norm": Helper(native_ops.add_rms_norm, native=True),
    "_rotary": Helper(native_ops.rotary, native=True),
    "_qlinear": Helper(quant_kernels.quant_linear),
    "_qmatmul": Helper(quant_kernels.quant_matmul),
}

#: helpers that run the native kernels when available
NATIVE_HELPERS = frozenset(name for name, h in HELPERS.items() if h.native)


def helper_namespace() -> dict[str, Any]:
    """The helpers as the generated module's globals (besides ``torch`` and ``F``)."""
    return {name: h.fn for name, h in HELPERS.items()}


__all__ = ["HELPERS", "NATIVE_HELPERS", "Helper", "assert_all", "helper_namespace"]
