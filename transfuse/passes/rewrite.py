"""The rewrite engine: rules declared as pattern + check + replace.

A rule is data (tinygrad's PatternMatcher and onnxscript's rewriter are the
models): a **pattern** written with the builder ``P``, a **check** that never
mutates and returns a reason when the rewrite is not safe, and a **replace**
that builds the new nodes with a :class:`Builder`.

Patterns (``P.any``, ``P.op``, ``P.alt``, ...) and matching live in
:mod:`transfuse.passes.pattern`; they are re-exported here, so a pass imports
everything it needs from this module.

The engine (:class:`RewritePass`) indexes rules by root op, tries them on
every node in topological order, and for each attempt records statistics in
the pass log. A match is refused when an intermediate node it would delete
has a user outside the match (the value is needed elsewhere) — the rewrite
would duplicate work or change what the other user sees. Failed attempts
that got past the root are kept as near misses with the node where matching
failed and why, which is what ``pass_log.why_not(rule)`` prints.

Two things make special passes ordinary rules:

- **per-run state**: a pass that sets ``state_factory`` gets a fresh object
  ``state_factory(ctx)`` for each run; every match and builder of that run
  carries it as ``m.state`` / ``b.state`` (e.g. what the rules saw, nodes to
  erase afterwards in ``finish``). Rules never keep state in module globals.
- **several outputs**: a rule with ``also_replaces=("sum",)`` replaces the root's
  outputs and then the captured values named there; ``replace`` returns one new
  value for each, in that order. Those values may have users outside the match
  (they are moved to the new values); the new nodes go before the first user of
  any replaced value, and every captured input must be computed before that point
  (otherwise a near miss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch

from transfuse.errors import PassError
from transfuse.ir.graph import Graph, Node, Value
from transfuse.passes.base import Pass, PassContext, erase_if_dead
from transfuse.passes.pattern import Failure, Match, P, Pattern, match

# -- rules and the pass ---------------------------------------------------------------------


class Builder:
    """Creates nodes before ``before`` (the matched root unless the rule replaces values used
    earlier) with the root's user source; remembers them for provenance."""

    def __init__(self, graph: Graph, anchor: Node, state: Any = None,
                 before: Node | None = None):
        self.graph = graph
        #: the matched root: the new nodes take its user source
        self.anchor = anchor
        self.before = before or anchor
        #: the running pass's per-run state, as on the match
        self.state = state
        self.created: list[Node] = []

    def create(self, op: str, inputs: Sequence[Value | None], attrs: dict | None = None,
               **kw: Any) -> Node:
        meta = {"source": self.anchor.source} if self.anchor.source else None
        node = self.graph.create(op, inputs, attrs or {}, before=self.before, meta=meta, **kw)
        self.created.append(node)
        return node

    def op(self, op: str, *inputs: Value | None, name: str | None = None, **attrs: Any) -> Value:
        return self.create(op, inputs, attrs, name=name).output

    def const(self, tensor: torch.Tensor, name: str | None = None) -> Value:
        return self.graph.add_constant(tensor, name)


@dataclasses.dataclass
class Rule:
    """A rewrite rule: ``pattern`` + ``check(match) -> reason | None`` + ``replace(match, b)``.

    ``replace`` returns the new value(s) for the root's outputs followed by one for each
    capture named in ``also_replaces``, or None to decline (having built nothing).
    """

    id: str
    pattern: Pattern
    replace: Callable[[Match, Builder], Value | Sequence[Value] | None]
    check: Callable[[Match], str | None] | None = None
    #: a failed match counts as a near miss only if it matched at least this many nodes
    near_miss_depth: int = 2
    #: captured values (outputs of matched nodes) that the rewrite replaces too, after the
    #: root's outputs; they may have users outside the match
    also_replaces: tuple[str, ...] = ()

    def root_ops(self) -> tuple[str, ...]:
        ops = self.pattern.root_ops()
        if not ops:
            raise ValueError(f"rule {self.id}: the pattern root must be an op")
        return ops


def _external_use(m: Match, graph: Graph, replaced: Sequence[Value]) -> str | None:
    inside = {id(n) for n in m.nodes}
    outputs = {id(v) for v in graph.outputs}
    moved = {id(v) for v in replaced}
    for n in m.nodes:
        if n is m.root:
            continue
        for v in n.outputs:
            if id(v) in moved:
                continue
            if id(v) in outputs:
                return f"intermediate %{v.name} ({n.op}) is a graph output"
            for user, _ in v.uses:
                if id(user) not in inside:
                    where = f" at {user.source}" if user.source else ""
                    return (f"intermediate %{v.name} ({n.op}) has another user: "
                            f"{user.op} %{user.outputs[0].name if user.outputs else '?'}{where}")
    return None


def match_failure(rule: Rule, m: Match | None, fail: Failure, node: Node) -> tuple[str | None, Node]:
    """(reason, where) for a failed match worth reporting, or (None, node) when the attempt
    did not get far enough to be a near miss (or matched)."""
    if m is not None or fail.depth < rule.near_miss_depth:
        return None, node
    return fail.reason, fail.node or node


def record_near_miss(ctx: PassContext, rule: Rule, node: Node, where: Node, reason: str,
                     seen: set | None) -> None:
    """Record a near miss once per (rule, node, reason) when ``seen`` is given."""
    key = (rule.id, id(node), reason)
    if seen is not None:
        if key in seen:
            return
        seen.add(key)
    ctx.near_miss(rule.id, where, reason)


def _replaced_values(rule: Rule, m: Match) -> list[Value]:
    """What the rewrite replaces: the root's outputs, then the captures in ``also_replaces``."""
    inside = {id(n) for n in m.nodes}
    extra = []
    for name in rule.also_replaces:
        v = m.get(name)
        if v is None or v.producer is None or id(v.producer) not in inside:
            raise PassError(f"rule {rule.id}: also_replaces names '{name}', which is not "
                               "an output of a matched node")
        extra.append(v)
    return [*m.root.outputs, *extra]


def _insertion_point(rule: Rule, m: Match, replaced: Sequence[Value],
                     graph: Graph) -> tuple[Node, str | None]:
    """Where the new nodes go: before the root, or before an earlier user of a value in
    ``also_replaces``; then every captured input must be computed before that point."""
    extra = replaced[len(m.root.outputs):]
    if not extra:
        return m.root, None
    pos = {id(n): i for i, n in enumerate(graph.nodes)}
    inside = {id(n) for n in m.nodes}
    first, first_of = m.root, ""
    for name, v in zip(rule.also_replaces, extra):
        for user, _ in v.uses:
            if id(user) not in inside and pos[id(user)] < pos[id(first)]:
                first, first_of = user, name
    if first is m.root:
        return first, None
    for name, v in m.values.items():
        p = v.producer
        if p is not None and id(p) not in inside and pos[id(p)] >= pos[id(first)]:
            use = f"{first.op} %{first.outputs[0].name}" if first.outputs else first.op
            return first, (f"{name} %{v.name} is computed after the {first_of}'s first use "
                           f"({use})")
    return first, None


def apply_rule(rule: Rule, node: Node, graph: Graph, ctx: PassContext,
               seen: set | None = None, state: Any = None) -> bool:
    """Try ``rule`` at ``node``; rewrite and return True on success.

    ``seen`` dedupes near misses when a pass walks the graph more than once; ``state`` is
    the running pass's per-run state, handed to the rule as ``m.state`` and ``b.state``.
    """
    ctx.attempt(rule.id)
    m, fail = match(rule.pattern, node, state)
    reason, where = match_failure(rule, m, fail, node)
    if m is None and reason is None:
        return False
    before = node
    if m is not None:
        replaced = _replaced_values(rule, m)
        reason = _external_use(m, graph, replaced)
        if reason is None and rule.check is not None:
            reason = rule.check(m)
        if reason is None:
            before, reason = _insertion_point(rule, m, replaced, graph)
    if reason:
        record_near_miss(ctx, rule, node, where, reason, seen)
        return False
    b = Builder(graph, node, state, before)
    new = rule.replace(m, b)
    if new is None:  # replace may still decline after building nothing
        if b.created:
            raise PassError(f"rule {rule.id} built nodes and then declined")
        return False
    new_values = [new] if isinstance(new, Value) else list(new)
    if len(new_values) != len(replaced):
        raise PassError(f"rule {rule.id}: replace returned {len(new_values)} values for "
                           f"{len(replaced)} replaced values ({len(node.outputs)} outputs of "
                           f"the root and {list(rule.also_replaces)})")
    for old, nv in zip(replaced, new_values):
        if old.type != nv.type:
            raise PassError(f"rule {rule.id}: replacement %{nv.name} is {nv.type}, the "
                               f"matched %{old.name} is {old.type}")
    matched = _topo_order(m.nodes)
    ctx.rewrite(rule.id, matched, b.created)
    for old, nv in zip(replaced, new_values):
        graph.replace_all_uses(old, nv)
    for n in reversed(matched):
        erase_if_dead(graph, n)
    return True


def _topo_order(nodes: Iterable[Node]) -> list[Node]:
    nodes = list(dict.fromkeys(nodes))
    pos = {id(n): i for i, n in enumerate(nodes[0].graph.nodes)} if nodes else {}
    return sorted(nodes, key=lambda n: pos.get(id(n), -1))


class RewritePass(Pass):
    """A pass made of rules. Subclasses set ``name`` and ``rule_list``.

    Rules are tried on every node in topological order, in ``rule_list``
    order; the walk repeats until nothing changes (at most ``max_rounds``).
    A pass whose rules share state across matches sets ``state_factory``: it is
    called with the pass context once per run, its result is ``m.state`` /
    ``b.state`` in every check and replace of that run, and ``finish`` gets it
    after the walk.
    """

    rule_list: Sequence[Rule] = ()
    max_rounds: int = 4
    #: makes the rules' per-run state from the pass context (None: the rules have none)
    state_factory: ClassVar[Callable[[PassContext], Any] | None] = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.rule_list:
            cls.rules = tuple(r.id for r in cls.rule_list)

    def enabled_rules(self, ctx: PassContext) -> list[Rule]:
        disabled = set(ctx.option("disable_rules", ()) or ())
        return [r for r in self.rule_list if r.id not in disabled]

    def run(self, graph: Graph, ctx: PassContext) -> None:
        index: dict[str, list[Rule]] = {}
        for rule in self.enabled_rules(ctx):
            for op in rule.root_ops():
                index.setdefault(op, []).append(rule)
        factory = type(self).state_factory
        state = factory(ctx) if factory is not None else None
        seen: set = set()
        for _ in range(self.max_rounds):
            changed = False
            for node in graph.nodes:
                if node.is_erased:
                    continue
                for rule in index.get(node.op, ()):
                    if apply_rule(rule, node, graph, ctx, seen, state):
                        changed = True
                        break
            if not changed:
                break
        self.finish(graph, ctx, state)

    def finish(self, graph: Graph, ctx: PassContext, state: Any) -> None:
        """After the walk: clean up what the rules recorded in ``state`` (nothing by default)."""


__all__ = ["P", "Pattern", "Rule", "Match", "Builder", "RewritePass", "match", "apply_rule",
           "match_failure", "record_near_miss"]
