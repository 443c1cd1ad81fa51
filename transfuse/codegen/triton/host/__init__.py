"""The triton target's host side: generated Python that launches the kernels.

- :mod:`.registry`: the host lowering registry (``Lowerings("triton")``) and its context;
- :mod:`.lowerings`: GEMMs, attention, cached attention, rotary, quantized GEMMs;
- :mod:`.calls`: the functions the host code calls (``_t_*``);
- :mod:`.generator`: the host module's source;
- :mod:`.program`: build, memory plan per bucket, poisoning, the runnable program;
- :mod:`.cuda_graphs`: capture / replay of small generation steps on a GPU.
"""

from transfuse.codegen.triton import env  # noqa: F401  (first: fixes the interpreter mode)
from transfuse.codegen.triton.host import lowerings  # noqa: F401  (fills the registry)
from transfuse.codegen.triton.host.program import KernelInfo, TritonProgram, build_program
from transfuse.codegen.triton.host.registry import LOWERINGS

__all__ = ["LOWERINGS", "TritonProgram", "KernelInfo", "build_program"]
