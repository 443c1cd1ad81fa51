"""Patterns and matching for the rewrite engine (:mod:`transfuse.passes.rewrite`).

Patterns are data built with ``P``::

    x = P.any("x")                          # any value, captured as m["x"]
    w = P.const("w")                        # a constant value
    eps = P.scalar("eps")                   # a constant with one element; m.scalar("eps")
    P.op("add", a, b, commutative=True)     # a node; inputs are patterns (or None for "absent")
    P.op("softmax", s, attrs={"axis": -1})  # attr constraints: a value or a predicate
    P.alt(p1, p2, tags=("mul", "div"))      # alternatives; the one that matched is in m.tags
    P.maybe("cast", x)                      # an optional single-input op between patterns

Using the same capture name twice means "the same value" (``x - mean(x)``); naming two
op patterns differently lets them match the same node. :func:`match` walks a pattern
from a root node and returns a :class:`Match` (captures, matched nodes, tags, the running
pass's per-run state) or, on failure, the deepest point it reached and why (what
near misses report). Matching never mutates the graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from transfuse.ir.graph import Node, Value

# -- patterns --------------------------------------------------------------------------------


class Pattern:
    """Base class of pattern nodes."""

    def root_ops(self) -> tuple[str, ...] | None:
        """Ops a value matched by this pattern may be produced by (None = any)."""
        return None


@dataclasses.dataclass(eq=False)
class AnyPat(Pattern):
    name: str | None = None
    pred: Callable[[Value], bool | str] | None = None


@dataclasses.dataclass(eq=False)
class ConstPat(Pattern):
    name: str | None = None
    scalar: bool = False
    pred: Callable[[torch.Tensor], bool | str] | None = None


@dataclasses.dataclass(eq=False)
class OpPat(Pattern):
    ops: tuple[str, ...]
    inputs: tuple[Pattern | None, ...]
    name: str | None = None
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    commutative: bool = False
    output: int = 0

    def root_ops(self) -> tuple[str, ...]:
        return self.ops


@dataclasses.dataclass(eq=False)
class AltPat(Pattern):
    alts: tuple[Pattern, ...]
    tags: tuple[str | None, ...]

    def root_ops(self) -> tuple[str, ...] | None:
        ops: list[str] = []
        for a in self.alts:
            r = a.root_ops()
            if r is None:
                return None
            ops.extend(r)
        return tuple(dict.fromkeys(ops))


class P:
    """The pattern builder."""

    @staticmethod
    def any(name: str | None = None, pred: Callable[[Value], bool | str] | None = None) -> AnyPat:
        return AnyPat(name, pred)

    @staticmethod
    def const(name: str | None = None,
              pred: Callable[[torch.Tensor], bool | str] | None = None) -> ConstPat:
        return ConstPat(name, False, pred)

    @staticmethod
    def scalar(name: str | None = None,
               pred: Callable[[torch.Tensor], bool | str] | None = None) -> ConstPat:
        return ConstPat(name, True, pred)

    @staticmethod
    def op(op: str | Sequence[str], *inputs: Pattern | None, name: str | None = None,
           attrs: dict[str, Any] | None = None, commutative: bool = False,
           output: int = 0) -> OpPat:
        ops = (op,) if isinstance(op, str) else tuple(op)
        return OpPat(ops, tuple(inputs), name, dict(attrs or {}), commutative, output)

    @staticmethod
    def alt(*alts: Pattern, tags: Sequence[str | None] | None = None) -> AltPat:
        tags = tuple(tags) if tags is not None else (None,) * len(alts)
        if len(tags) != len(alts):
            raise ValueError("P.alt: one tag per alternative")
        return AltPat(tuple(alts), tags)

    @staticmethod
    def maybe(op: str | Sequence[str], inner: Pattern, *, tag: str | None = None,
              attrs: dict[str, Any] | None = None, name: str | None = None) -> AltPat:
        """``op(inner)`` or just ``inner`` (e.g. an optional upcast)."""
        return AltPat((P.op(op, inner, attrs=attrs, name=name), inner), (tag, None))


# -- matching --------------------------------------------------------------------------------


class Match:
    """The result of a successful match: captures, matched nodes, tags."""

    def __init__(self, root: Node, values: dict[str, Value], nodes: dict[str, Node],
                 matched: list[Node], tags: set[str], state: Any = None):
        self.root = root
        self.values = values
        self.named_nodes = nodes
        self.nodes = matched
        self.tags = tags
        #: the running pass's per-run state (``RewritePass.state_factory``), or None
        self.state = state

    def __getitem__(self, name: str) -> Value:
        return self.values[name]

    def get(self, name: str) -> Value | None:
        return self.values.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def node(self, name: str) -> Node:
        return self.named_nodes[name]

    def scalar(self, name: str) -> float:
        t = self.values[name].const
        return float(t.reshape(-1)[0])

    def __repr__(self) -> str:
        return f"<Match root={self.root!r} captures={sorted(self.values)} tags={sorted(self.tags)}>"


@dataclasses.dataclass
class _State:
    values: dict[str, Value]
    nodes: dict[str, Node]
    matched: list[Node]
    tags: set[str]

    def copy(self) -> _State:
        return _State(dict(self.values), dict(self.nodes), list(self.matched), set(self.tags))


class Failure:
    """The deepest point any attempt reached before failing (for near misses)."""

    def __init__(self):
        self.depth = -1
        self.reason = ""
        self.node: Node | None = None

    def fail(self, state: _State, reason: str, node: Node | None) -> None:
        depth = len(state.matched)
        if depth > self.depth:
            self.depth, self.reason, self.node = depth, reason, node


def _desc(v: Value) -> str:
    p = v.producer
    return f"%{v.name} ({p.op})" if p is not None else f"%{v.name}"


def _check_pred(pred, arg) -> str | None:
    if pred is None:
        return None
    ok = pred(arg)
    if ok is True:
        return None
    return ok if isinstance(ok, str) else "predicate failed"


def _match(pat: Pattern | None, value: Value | None, st: _State, fail: Failure) -> _State | None:
    if pat is None:
        if value is None:
            return st
        fail.fail(st, f"expected no input, found {_desc(value)}", value.producer)
        return None
    if value is None:
        fail.fail(st, "an input the pattern needs is absent", None)
        return None
    if isinstance(pat, AnyPat):
        return _bind(pat.name, value, st, fail, pat.pred)
    if isinstance(pat, ConstPat):
        if value.const is None:
            fail.fail(st, f"{_desc(value)} is not a constant", value.producer)
            return None
        if pat.scalar and value.const.numel() != 1:
            fail.fail(st, f"%{value.name} is a constant of {value.const.numel()} elements, "
                          "not a scalar", None)
            return None
        reason = _check_pred(pat.pred, value.const)
        if reason:
            fail.fail(st, f"%{value.name}: {reason}", None)
            return None
        return _bind(pat.name, value, st, fail, None)
    if isinstance(pat, AltPat):
        before = (fail.depth, fail.reason, fail.node)
        for alt, tag in zip(pat.alts, pat.tags):
            sub = _match(alt, value, st.copy(), fail)
            if sub is not None:
                # alternatives that failed before this one are no reason (optional ops)
                fail.depth, fail.reason, fail.node = before
                if tag:
                    sub.tags.add(tag)
                return sub
        return None
    if isinstance(pat, OpPat):
        return _match_op(pat, value, st, fail)
    raise TypeError(f"not a pattern: {pat!r}")


def _bind(name, value, st, fail, pred) -> _State | None:
    reason = _check_pred(pred, value)
    if reason:
        fail.fail(st, f"{_desc(value)}: {reason}", value.producer)
        return None
    if name is None:
        return st
    prev = st.values.get(name)
    if prev is not None and prev is not value:
        fail.fail(st, f"'{name}' must be the same value twice, got %{prev.name} and "
                      f"%{value.name}", value.producer)
        return None
    st.values[name] = value
    return st


def _attr_ok(want: Any, have: Any) -> bool:
    if callable(want):
        return bool(want(have))
    if isinstance(want, (list, tuple)) and isinstance(have, (list, tuple)):
        return tuple(want) == tuple(have)
    return want == have


def _match_op(pat: OpPat, value: Value, st: _State, fail: Failure) -> _State | None:
    node = value.producer
    if node is None:
        what = "a constant" if value.is_const else "a graph input"
        fail.fail(st, f"%{value.name} is {what}, expected {'/'.join(pat.ops)}", None)
        return None
    if node.op not in pat.ops:
        fail.fail(st, f"%{value.name} comes from {node.op}, expected {'/'.join(pat.ops)}", node)
        return None
    if value.index != pat.output:
        fail.fail(st, f"%{value.name} is output {value.index} of {node.op}, expected output "
                      f"{pat.output}", node)
        return None
    for key, want in pat.attrs.items():
        have = node.attrs.get(key)
        if not _attr_ok(want, have):
            fail.fail(st, f"{node.op} %{value.name} has {key}={have!r}"
                          + ("" if callable(want) else f", expected {want!r}"), node)
            return None
    inputs = list(node.inputs)
    while len(inputs) < len(pat.inputs):
        inputs.append(None)
    if len(inputs) > len(pat.inputs) and any(v is not None for v in inputs[len(pat.inputs):]):
        fail.fail(st, f"{node.op} %{value.name} has more inputs than the pattern", node)
        return None
    st = st.copy()
    if not any(n is node for n in st.matched):  # a diamond reaches a node twice
        st.matched.append(node)
    if pat.name:
        if st.nodes.get(pat.name, node) is not node:
            fail.fail(st, f"'{pat.name}' must be the same node twice", node)
            return None
        st.nodes[pat.name] = node
        st.values[pat.name] = value
    orders = [inputs[:len(pat.inputs)]]
    if pat.commutative and len(pat.inputs) == 2:
        orders.append([inputs[1], inputs[0]])
    for order in orders:
        cur: _State | None = st.copy()
        for sub, v in zip(pat.inputs, order):
            cur = _match(sub, v, cur, fail)
            if cur is None:
                break
        if cur is not None:
            return cur
    return None


def match(pattern: Pattern, node: Node, state: Any = None) -> tuple[Match | None, Failure]:
    """Match ``pattern`` rooted at ``node``'s output ``pattern.output``; the match carries
    ``state`` (the running pass's per-run state)."""
    fail = Failure()
    out = pattern.output if isinstance(pattern, OpPat) else 0
    if out >= len(node.outputs):
        fail.fail(_State({}, {}, [], set()), f"{node.op} has no output {out}", node)
        return None, fail
    st = _match(pattern, node.outputs[out], _State({}, {}, [], set()), fail)
    if st is None:
        return None, fail
    return Match(node, st.values, st.nodes, st.matched, st.tags, state), fail


__all__ = ["P", "Pattern", "AnyPat", "ConstPat", "OpPat", "AltPat", "Match", "Failure", "match"]
