"""The hand-written Triton kernel family (issue 14).

Each module is a document: a docstring (what it computes, the algorithm, the layouts, what
the interpreter needs), the ``@triton.jit`` kernel(s), a wrapper taking torch tensors (it
checks its inputs and raises :class:`~transfuse.errors.LoweringError` naming the argument),
a reference in plain torch (``reference_*``), a benchmark entry (``bench_*``) and
``SHIPPED``: the :class:`~transfuse.codegen.triton.kernels.spec.KernelSpec` list of the
configurations the wrapper launches, compiled for sm_80 / sm_90 by the compile check.
"""

from transfuse.codegen.triton import env  # noqa: F401  (before any @triton.jit)
