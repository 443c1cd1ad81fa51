"""The registry of passes by name: ``register_pass`` (a class decorator),
``get_pass``, ``pass_names``, ``resolve_passes``.

Pass modules register themselves here when imported; ``pipelines.py`` imports
every pass module and lists the levels.
"""

from __future__ import annotations

from collections.abc import Sequence

from transfuse.errors import PassError
from transfuse.passes.base import Pass

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


__all__ = ["register_pass", "get_pass", "pass_names", "resolve_passes"]
