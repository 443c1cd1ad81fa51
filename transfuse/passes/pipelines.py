"""The optimization levels, as explicit ordered lists of pass names, and the
registry of passes by name.

Read a level top to bottom: it is exactly the order the manager runs.
``run_passes(graph, ["cleanup.eliminate-dead-code", ...])`` runs any
registered passes by name.
"""

from __future__ import annotations

from collections.abc import Sequence

from transfuse.errors import PassError
from transfuse.passes.base import Pass
from transfuse.passes.cleanup import (
    EliminateCommonSubexpressions,
    EliminateDeadCode,
    FoldConstants,
    FoldViews,
    RemoveNoops,
)

# -- registry ------------------------------------------------------------------

_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Make a pass class runnable by its name (usable as a class decorator)."""
    if not cls.name:
        raise PassError(f"pass class {cls.__name__} has no name")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls:
        raise PassError(f"pass name {cls.name!r} is taken by {other.__module__}.{other.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (RemoveNoops, FoldConstants, FoldViews, EliminateCommonSubexpressions,
             EliminateDeadCode):
    register_pass(_cls)


def pass_names() -> list[str]:
    return sorted(_REGISTRY)


def get_pass(name: str) -> Pass:
    """A fresh instance of the pass registered as ``name``."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise PassError(f"unknown pass {name!r}; registered passes: "
                        f"{', '.join(pass_names())}") from None


def resolve_passes(passes: Sequence[str | Pass | type[Pass]]) -> list[Pass]:
    """Names, Pass instances or Pass classes -> Pass instances."""
    if isinstance(passes, (str, Pass)):
        passes = [passes]
    out: list[Pass] = []
    for p in passes:
        if isinstance(p, str):
            out.append(get_pass(p))
        elif isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, type) and issubclass(p, Pass):
            out.append(p())
        else:
            raise PassError(f"expected a pass name, Pass or Pass class, got {p!r}")
    for p in out:
        if not p.name:
            raise PassError(f"pass {type(p).__name__} has no name")
    return out


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
    # O1, then (later) Transformer recognition, attention and fusion passes
    "O2": [
        *CLEANUP,
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
