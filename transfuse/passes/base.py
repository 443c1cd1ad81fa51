"""What a pass is, and the context it reports through.

A :class:`Pass` is a small class with a stable ``name`` (``area.verb-object``),
the ids of the rules it applies (``rules``) and a docstring that says what it
rewrites, what it needs and what it guarantees. ``run(graph, ctx)`` edits the
graph in place through the Graph API and tells ``ctx`` what it did:

- ``ctx.rewrite(rule, matched, new)`` for every rewrite: records an event with
  the matched nodes' user source and stamps the new nodes' provenance;
- ``ctx.near_miss(rule, node, reason)`` when a rule almost matched (the answer
  to "why was this not rewritten?");
- ``ctx.attempt(rule)`` / ``ctx.count(rule)`` for match statistics;
- ``ctx.note(text)`` for anything else a reader of the log should know.

The manager (``passes/manager.py``) creates one :class:`PassContext` per pass
run and detects graph changes itself through ``Graph.listeners``; a pass never
has to say whether it changed something.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.ops import get_op, has_op
from transfuse.ir.types import QuantType
from transfuse.passes.log import NearMiss, NodeRef, PassRecord, RewriteEvent

#: at most this many rewrite events / near misses are kept per rule and pass run
MAX_EVENTS_PER_RULE = 200
MAX_NEAR_MISSES_PER_RULE = 50


class Pass:
    """Base class of every pass. Subclasses set ``name`` and ``rules`` and implement ``run``."""

    #: stable ``area.verb-object`` name, e.g. ``cleanup.eliminate-dead-code``
    name: ClassVar[str] = ""
    #: ids of the rules this pass applies (``area/what``), for statistics and why-not
    rules: ClassVar[tuple[str, ...]] = ()
    #: True for opt-in passes that change the model's function on purpose (and report the
    #: error they introduce); the numeric check does not roll them back
    changes_function: ClassVar[bool] = False

    def run(self, graph: Graph, ctx: PassContext) -> None:
        raise NotImplementedError(f"pass {type(self).__name__} does not implement run()")

    @property
    def summary(self) -> str:
        """The first line of the docstring."""
        doc = (type(self).__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class GemmTimingInfo(Protocol):
    """One shape timed with each GEMM library (seconds per call)."""

    torch_s: float
    blas_s: float

    def gflops(self, which: str) -> float: ...


class TargetInfo(Protocol):
    """What a pass may ask the target it compiles for; the backend answers.

    Passes never import codegen (DESIGN.md §2): ``transfuse.optimize`` puts the target object
    in the options (``target``), and :attr:`PassContext.target_info` hands it to the pass.
    Every backend implements this through ``transfuse.codegen.lowering.Target`` (whose
    defaults answer "nothing to choose"); ``tests/passes`` use fakes with fixed answers.
    """

    name: str
    #: values of ``linear``'s ``gemm`` attribute the target runs, the default first
    gemm_libraries: tuple[str, ...]

    def gemm_unavailable(self) -> str | None:
        """Why the non-default GEMM libraries cannot run here (None: they can)."""

    def native_kernels_unavailable(self) -> str | None:
        """Why the target's native kernels cannot run here (None: they can)."""

    def gemm_relayout_eligible(self, weight: Value) -> bool:
        """Whether constant ``weight`` may be stored in another layout for its GEMMs."""

    def gemm_weight_relaid(self, weight: Value) -> bool:
        """Whether the built program will store constant ``weight`` in another layout."""

    def time_gemm(self, rows: int, weights: list, bias: Any, *, relayout: bool,
                  use_cache: bool = True) -> tuple[GemmTimingInfo, str]:
        """(timing, where it came from: text for the log) of x [rows, K] times ``weights``."""

    #: granularities of qmatmul's activation quantization the target runs exactly, preferred
    #: first ("token" / "tensor")
    qmatmul_act_quant: tuple[str, ...]

    def quant_unsupported(self, qtype: QuantType, op: str) -> str | None:
        """Why the target cannot run ``op`` (qlinear / qmatmul) on a ``qtype`` weight."""


class PassContext:
    """What a running pass sees besides the graph: options and its log record."""

    def __init__(self, pass_: Pass, record: PassRecord, options: Mapping[str, Any] | None = None):
        self.pass_ = pass_
        self.record = record
        self.options: Mapping[str, Any] = options or {}
        #: set by mark_changed(): an edit the graph listeners cannot see (rare)
        self.changed = False
        for rule in pass_.rules:
            record.rule_stats(rule)

    @property
    def pass_name(self) -> str:
        return self.pass_.name

    @property
    def target(self) -> str:
        """The name of the backend the graph is compiled for (option ``target``: a name or
        a target object; ``"python"`` by default)."""
        target = self.option("target", "python")
        return target if isinstance(target, str) else target.name

    @property
    def target_info(self) -> TargetInfo | None:
        """The target object to ask (:class:`TargetInfo`), when the option ``target`` is one
        (``transfuse.optimize`` passes it); None when only a name was given."""
        target = self.option("target")
        return None if target is None or isinstance(target, str) else target

    def option(self, key: str, default: Any = None) -> Any:
        """``options[pass name][key]``, else ``options[key]``, else ``default``."""
        scoped = self.options.get(self.pass_name)
        if isinstance(scoped, Mapping) and key in scoped:
            return scoped[key]
        return self.options.get(key, default)

    # -- statistics ----------------------------------------------------------

    def attempt(self, rule: str, n: int = 1) -> None:
        """The rule was tried ``n`` more times (matched or not)."""
        self.record.rule_stats(rule)["tried"] += n

    def count(self, rule: str, n: int = 1) -> None:
        """The rule matched ``n`` more times (without recording events)."""
        self.record.rule_stats(rule)["matched"] += n

    def mark_changed(self) -> None:
        """Declare a change made without Graph methods (e.g. replacing a constant's payload)."""
        self.changed = True

    def note(self, text: str) -> None:
        """A line for the reader of the log (e.g. what a removal relies on)."""
        self.record.notes.append(text)

    # -- events --------------------------------------------------------------

    def rewrite(self, rule: str, matched: Sequence[Node], new: Sequence[Node] = ()) -> None:
        """Record one rewrite by ``rule``: ``matched`` nodes were replaced by ``new`` ones.

        Call it before erasing the matched nodes. New nodes get
        ``meta["origin"] = "<pass>/<rule>"`` and, when they have none, the
        user source of the first matched node that has one.
        """
        stats = self.record.rule_stats(rule)
        stats["matched"] += 1
        source = next((n.source for n in matched if n.source), "")
        origin = f"{self.pass_name}/{rule}"
        for n in new:
            n.meta["origin"] = origin
            if source and not n.meta.get("source"):
                n.meta["source"] = source
        if stats["events"] < MAX_EVENTS_PER_RULE:
            self.record.events.append(RewriteEvent(
                rule=rule,
                matched=[node_ref(n) for n in matched],
                new=[node_ref(n) for n in new],
            ))
        else:
            self.record.events_dropped += 1
        stats["events"] += 1

    def near_miss(self, rule: str, node: Node | None, reason: str) -> None:
        """``rule`` almost matched at ``node`` but did not, because of ``reason``."""
        stats = self.record.rule_stats(rule)
        stats["missed"] += 1
        if stats["missed"] <= MAX_NEAR_MISSES_PER_RULE:
            self.record.near_misses.append(NearMiss(
                rule=rule, node=node_ref(node) if node is not None else None, reason=reason))


def node_ref(node: Node) -> NodeRef:
    """A small, printable reference to a node that outlives it."""
    outs = ", ".join(f"%{v.name}" for v in node.outputs) or "(no outputs)"
    return NodeRef(op=node.op, outputs=outs, source=node.source)


# -- facts about ops that passes share ----------------------------------------

#: substrings of torch_fallback targets that are random or mutate their inputs
_IMPURE_FALLBACK_HINTS = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial",
                          "print", "copy_", "set_", "resize_")


def is_pure(node: Node) -> bool:
    """True when ``node`` has no effect besides its outputs and is deterministic.

    Uses ``OpDef.pure``; an op that writes an input in place (``OpDef.mutates``: a KV cache)
    is never pure; a ``torch_fallback`` is pure unless its target looks
    random or in-place (``aten::add_``, ``aten::bernoulli``...), conservatively.
    """
    if not has_op(node.op) or not get_op(node.op).pure or get_op(node.op).mutates:
        return False
    if node.op == "torch_fallback":
        target = str(node.attrs.get("target", ""))
        name = target.split("::")[-1].split(".")[0]
        if name.endswith("_") or any(h in target for h in _IMPURE_FALLBACK_HINTS):
            return False
    return True


def forward_to(graph: Graph, node: Node, value: Value) -> None:
    """Replace every use of ``node``'s single output by ``value`` and erase ``node``."""
    graph.replace_all_uses(node.output, value)
    graph.erase(node)


def erase_if_dead(graph: Graph, node: Node | None) -> bool:
    """Erase a pure ``node`` whose outputs are no longer used; True if erased."""
    if node is None or not is_pure(node):
        return False
    if any(v.num_uses for v in node.outputs):
        return False
    graph.erase(node)
    return True


__all__ = ["Pass", "PassContext", "TargetInfo", "GemmTimingInfo", "is_pure", "node_ref",
           "forward_to", "erase_if_dead"]
