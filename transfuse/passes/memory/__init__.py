"""Memory-layout planning passes (how tensors are laid out for the kernels that use them)."""

from transfuse.passes.memory.pad_gemm import PadGemmColumns

__all__ = ["PadGemmColumns"]
