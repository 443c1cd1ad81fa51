"""The ``triton`` target (issue 14): generated Triton kernels and a hand-written kernel family.

``env`` fixes where kernels run (a CUDA GPU, else Triton's interpreter on the CPU) and must
be imported before any kernel module; ``kernels/`` holds the hand-written kernels (each file
a document: docstring, kernel, wrapper, reference check, benchmark entry, shipped configs);
``compile_check`` compiles every shipped config for sm_80 / sm_90 without a GPU.
"""

from transfuse.codegen.triton import env  # noqa: F401  (first: fixes the interpreter mode)
