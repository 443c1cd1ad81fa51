"""What ONNX Runtime's CPU kernels of the contrib attention ops accept, as data with its source.

The onnxruntime target routes an ``attention`` node to ``GroupQueryAttention`` or
``MultiHeadAttention`` only when the kernel that will run it accepts the node's shapes; a
limit the kernel checks at run time (not at session creation) would otherwise surface as a
raw ``InvalidArgument`` from the first call of a model that compiled fine.

Each entry says what the kernel requires and where that comes from: the check in ORT's
source and what was measured with the installed ORT (``tests/codegen/test_ort_limits.py``
runs the measurement again against whatever ORT is installed, so an ORT that changes a
limit fails a test instead of a user's first call).

Glossary: D query/key head size, Dv value head size.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class HeadSizeLimit:
    """A head-size rule of one contrib op's CPU kernel."""

    op: str
    multiple_of: int  # D (and Dv) must be a multiple of this
    source: str  # where the rule comes from

    def refuses(self, d: int, dv: int) -> str | None:
        """A reason when head sizes ``d`` / ``dv`` break the rule, else None."""
        for name, size in (("head size", d), ("value head size", dv)):
            if size % self.multiple_of:
                return (f"{self.op} (ORT CPU) needs a {name} that is a multiple of "
                        f"{self.multiple_of}, got {size}")
        return None


GQA_HEAD_SIZE = HeadSizeLimit(
    op="GroupQueryAttention",
    multiple_of=8,
    source="onnxruntime contrib_ops/cpu/bert/group_query_attention_helper.h: 'head_size must "
           "be a multiple of 8' (checked when the kernel runs); measured with onnxruntime "
           "1.32 CPU EP: D in {2, 4, 6, 12, 20} rejected, D in {8, 16, ..., 512} accepted",
)

MHA_HEAD_SIZE = HeadSizeLimit(
    op="MultiHeadAttention",
    multiple_of=1,
    source="measured with onnxruntime 1.32 CPU EP: D in {1, 2, 3, 4, 6, 12, 20} accepted and "
           "equal to SDPA (S == T and S != T)",
)

#: every head-size rule the onnxruntime target routes by
HEAD_SIZE_LIMITS = {lim.op: lim for lim in (GQA_HEAD_SIZE, MHA_HEAD_SIZE)}
