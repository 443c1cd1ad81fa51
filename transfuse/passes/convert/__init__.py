"""Conversions: opt-in passes that change what the model computes, each reporting its error.

- ``convert.mha-to-gqa`` (:mod:`.gqa`): option ``convert_gqa=G`` — mean-pool
  key/value heads into G groups (G = 1: multi-query attention);
- ``convert.sparse-attention`` (:mod:`.sparse`): option
  ``sparse_attention="window:W"`` or ``"block:B,local:L,global:G"``.

Both measure the error on sample inputs before committing and refuse above
``max_error=`` (:mod:`.error_report`); the measurement lands in the pass log
and in ``graph.meta["conversion_errors"]``. Their classes say
``changes_function = True``.
"""

from transfuse.passes.convert.gqa import ConvertMhaToGqa
from transfuse.passes.convert.sparse import ConvertSparseAttention

__all__ = ["ConvertMhaToGqa", "ConvertSparseAttention"]
