"""Memory-layout planning passes (how tensors are laid out for the kernels that use them)."""

from transfuse.passes.memory.pad_gemm import PadGemmColumns
from transfuse.passes.memory.select_gemm import SelectGemm

__all__ = ["PadGemmColumns", "SelectGemm"]
