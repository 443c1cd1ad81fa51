"""Shared by the recognition-pass tests: run one pass on a text graph, drop the constants the
rewrite left unused (DCE's job in a pipeline) so expected graphs list only what is used."""

from __future__ import annotations

from pass_helpers import apply

import transfuse.passes.recognize  # noqa: F401  (registers the recognition passes)


def fuse(text: str, pass_name: str, *, rtol: float = 0.0, atol: float = 0.0, options=None):
    """``apply`` (IR verify + numeric check before/after) then remove unused constants."""
    graph, rec = apply(text, pass_name, rtol=rtol, atol=atol, options=options)
    graph.remove_unused_constants()
    return graph, rec


def misses(rec, rule: str) -> list[str]:
    """The near-miss reasons ``rule`` recorded."""
    return [m.reason for m in rec.near_misses if m.rule == rule]
