"""Cleanup passes: generic simplifications every pipeline starts with.

- ``cleanup.remove-noops`` (:mod:`.remove_noops`)
- ``cleanup.fold-constants`` (:mod:`.fold_constants`)
- ``cleanup.fold-views`` (:mod:`.fold_views`)
- ``cleanup.eliminate-common-subexpressions`` (:mod:`.cse`)
- ``cleanup.eliminate-dead-code`` (:mod:`.dce`)
"""

from transfuse.passes.cleanup.cse import EliminateCommonSubexpressions
from transfuse.passes.cleanup.dce import EliminateDeadCode
from transfuse.passes.cleanup.fold_constants import FoldConstants
from transfuse.passes.cleanup.fold_views import FoldViews
from transfuse.passes.cleanup.remove_noops import RemoveNoops

__all__ = ["RemoveNoops", "FoldConstants", "FoldViews", "EliminateCommonSubexpressions",
           "EliminateDeadCode"]
