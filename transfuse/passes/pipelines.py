"""The optimization levels, as explicit ordered lists of pass names, and the
registry of passes by name.

Read a level top to bottom: it is exactly the order the manager runs.
``run_passes(graph, ["cleanup.eliminate-dead-code", ...])`` runs any
registered passes by name.
"""

from __future__ import annotations

from transfuse.errors import PassError
from transfuse.passes.attention.fuse import FuseAttention
from transfuse.passes.attention.gqa import RemoveRepeatKv
from transfuse.passes.base import Pass
from transfuse.passes.cleanup import (
    EliminateCommonSubexpressions,
    EliminateDeadCode,
    FoldConstants,
    FoldViews,
    RemoveNoops,
)
from transfuse.passes.convert import ConvertMhaToGqa, ConvertSparseAttention
from transfuse.passes.fusion import ComputeLastLogits, MergeProjections
from transfuse.passes.generation import InsertKvCache
from transfuse.passes.memory import PadGemmColumns, SelectGemm
from transfuse.passes.quant import QuantizeWeights
from transfuse.passes.recognize import (
    FoldLinearEpilogue,
    FuseAddNorm,
    RecognizeActivations,
    RecognizeNorms,
    RecognizeRotary,
)
from transfuse.passes.registry import get_pass, pass_names, register_pass, resolve_passes

for _cls in (RemoveNoops, FoldConstants, FoldViews, EliminateCommonSubexpressions,
             EliminateDeadCode, MergeProjections, ComputeLastLogits, ConvertMhaToGqa,
             ConvertSparseAttention, FuseAttention, RemoveRepeatKv, RecognizeNorms,
             RecognizeActivations, RecognizeRotary, FuseAddNorm, FoldLinearEpilogue,
             PadGemmColumns, SelectGemm, InsertKvCache, QuantizeWeights):
    register_pass(_cls)


# -- levels --------------------------------------------------------------------

CLEANUP = [
    "cleanup.remove-noops",  # eval dropout, identity, same-type cast/reshape, capture asserts
    "cleanup.fold-constants",  # static shape_of and all-constant arithmetic -> constants
    "cleanup.fold-views",  # reshape/permute/expand chains -> one view (or none)
    "cleanup.eliminate-common-subexpressions",  # compute each thing once; tied weights merged
    "cleanup.eliminate-dead-code",  # what no output needs, and unused constants
]

PIPELINES: dict[str, list[str]] = {
    # capture only: the graph as the frontend made it
    "O0": [],
    # generic cleanup; numerics bit-identical to the captured graph
    "O1": [
        *CLEANUP,
    ],
    # O1, then everything proven safe for Transformers; opt-in conversions only when asked
    "O2": [
        *CLEANUP,
        "recognize.fuse-norms",  # LayerNorm / RMSNorm math -> layer_norm / rms_norm
        "recognize.fuse-activations",  # gelu (erf | tanh), silu, swiglu, softmax
        "recognize.fuse-rotary",  # RoPE (rotate-half | interleaved) -> rotary
        "attention.fuse-sdpa",  # every spelling of attention -> one attention op, masks proven
        "attention.remove-repeat-kv",  # GQA/MQA: repeated K/V heads -> kv_heads < heads
        "recognize.fuse-add-norm",  # residual add + norm -> add_norm (normed, sum)
        "convert.mha-to-gqa",  # opt-in (convert_gqa=G): mean-pool kv heads; reports its error
        "convert.sparse-attention",  # opt-in (sparse_attention=...): window / block-sparse
        "fusion.merge-projections",  # q/k/v, gate/up, parallel blocks -> one linear + split
        "recognize.fold-linear-epilogue",  # bias add and activation -> linear (after merging)
        "fusion.compute-last-logits",  # only with logits="last": norm + LM head on one position
        "quant.quantize-weights",  # only with quantize=...: int8/int4, w8a8, fp8; reports error
        "generation.insert-kv-cache",  # only with generation=...: cached_attention, logit rows
        "layout.pad-gemm-columns",  # wide GEMMs (LM heads) padded to 64 columns, sliced back
        "layout.select-gemm",  # python target, CPU: torch vs OpenBLAS timed per GEMM shape
        "cleanup.eliminate-common-subexpressions",  # masks/casts the fusions left duplicated
        "cleanup.eliminate-dead-code",  # what the rewrites left unused
    ],
}


def get_pipeline(level: str) -> list[Pass]:
    """Fresh pass instances for optimization ``level``."""
    try:
        names = PIPELINES[level]
    except (KeyError, TypeError):
        raise PassError(f"unknown optimization level {level!r}; valid levels: "
                        f"{', '.join(PIPELINES)}") from None
    return [get_pass(n) for n in names]


__all__ = ["PIPELINES", "CLEANUP", "get_pipeline", "get_pass", "pass_names", "register_pass",
           "resolve_passes"]
