"""What a shipped kernel configuration is, for the compile check and the benchmarks.

A :class:`KernelSpec` names one ``@triton.jit`` function with the argument types and
constexprs a wrapper launches it with, and its launch options (warps, stages). The compile
check (:mod:`transfuse.codegen.triton.compile_check`) compiles each one for sm_80 and sm_90
with Triton's GPU compiler (no GPU needed: PTX and cubin come out of ptxas) and reads its
registers, spills and shared memory.

``signature`` maps every parameter of the kernel, in order, to a Triton type string:
``"*fp32"`` / ``"*fp16"`` / ``"*bf16"`` / ``"*i32"`` / ``"*u8"`` ... for pointers, ``"i32"`` /
``"i64"`` / ``"fp32"`` for scalars, ``"constexpr"`` for constexprs (whose values are in
``constexprs``).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One configuration of one kernel as a wrapper launches it."""

    #: ``module:function`` of the ``@triton.jit`` function (imported in the checking process)
    kernel: str
    #: a short name for reports: ``flash_fwd[hd128 causal bf16]``
    name: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    #: the compute capabilities it is shipped for (fp8 dots need sm_89+: (89, 90))
    archs: tuple[int, ...] = (80, 90)

    def key(self) -> str:
        return f"{self.kernel}|{self.name}|w{self.num_warps}s{self.num_stages}"


__all__ = ["KernelSpec"]
