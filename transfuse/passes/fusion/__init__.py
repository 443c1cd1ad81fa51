"""Fusion passes: structural rewrites that make fewer, bigger operations.

- ``fusion.merge-projections`` (:mod:`.merge_projections`): linears on the same
  input (q/k/v, gate/up, parallel attention + MLP) -> one linear + split;
- ``fusion.compute-last-logits`` (:mod:`.logits_last`): with ``logits="last"``,
  the final norm and LM head run on the last position only (generation prefill).
"""

from transfuse.passes.fusion.logits_last import ComputeLastLogits
from transfuse.passes.fusion.merge_projections import MergeProjections

__all__ = ["MergeProjections", "ComputeLastLogits"]
