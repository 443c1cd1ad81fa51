"""The memory plan of the triton target's host code: intermediates share one arena.

Glossary: a *step* is one launch of the host program (one IR node, or a fusion group of
nodes that runs as one kernel); steps are numbered 0, 1, ... in execution order. A value
is *live* over the inclusive step range ``[first, last]``: from the step that writes it to
the last step that reads it. Two values live at a common step are both in memory during
it (a kernel reads its inputs while it writes its outputs), so they may not overlap.

What gets a buffer. Graph inputs, constants and graph outputs never do (the caller owns
them; an output must outlive the arena, which the next call reuses). Values that share
another value's memory form an *alias class* rooted at the value that owns the memory:

- a **view** (``reshape``, ``permute``, ``expand``, ``slice``, ``split``, ...) is its base's
  memory seen differently: no buffer, and it keeps the base live as long as it is read;
- an **in-place** result (a kernel that overwrites its input, like rotary in place) is the
  base's memory after the write: no buffer either, and nothing may read the base's old
  contents after the write (checked, :class:`~transfuse.errors.LoweringError` otherwise);
- an **external** result is allocated by someone else (a ``torch_fallback`` aten op
  returns its own tensor): no buffer, but it may alias the inputs the rule names, which
  then stay live (and escape with it when it is a graph output).

Which outputs alias what is the lowering's decision, so it comes in as a rule
(:data:`AliasRule`, default :func:`default_alias`); the host code must honour it: every
planned value is written into its arena view (a kernel's ``out=``), an alias is produced as
the rule says. A class is planned when its root is an intermediate and no member escapes
as a graph output; its buffer lives from the root's step to the last read of any member.
Inside a fusion group (a step of several nodes), a value that never leaves the step is
kernel-local (registers) and gets no buffer; a dead output of a single-node step does (the
op writes it anyway).

Placement: greedy by size with best fit, the offset calculation of Pisarchyk and Lee,
*Efficient Memory Management for Deep Neural Net Inference* (2020), as in TFLite's GPU
delegate (``memory_management/greedy_by_size``) and PyTorch's JIT memory-planning passes.
Buffers are placed largest first; each goes into the smallest aligned gap left between the
already placed buffers whose lifetimes intersect its own, or above all of them when no gap
fits. Three orders are tried (:data:`STRATEGIES`: by size with longer lifetimes first among
equal sizes, by size x lifetime, by lifetime), each followed by rounds that move the buffer
setting the peak to the front of the order, until the lower bound is reached or a work
budget runs out; the smallest arena wins. Every order ends in a name tie-break and the
budget depends on the buffer count only, so plans are deterministic. Offsets are multiples
of ``alignment`` (256 B by default: a multiple of every element size and of the 16 B that
Triton's pointer specialisation wants; the CUDA caching allocator's blocks are 512 B
aligned).

Symbolic dims: sizes are evaluated at ``dims``, which should bind every symbol to the *max*
of its declared range. A size that is a polynomial in the symbols whose nonconstant terms
have nonnegative coefficients (``seq * 64 * 4``, ``(seq - 1) * 256``) is nondecreasing in
each of them, so every buffer of a smaller run fits in its slot at the same offset, with the
same lifetimes: one arena of ``arena_bytes`` per run configuration (device, max dims) serves
every length in the range, and :func:`arena_views` cuts each run's smaller views at the
planned offsets. Sizes the planner cannot prove nondecreasing (``floor``, ``Max``, a
negative coefficient) are listed in ``MemoryPlan.unproven``; :func:`arena_views` checks
every size against its slot anyway.

Statistics (for the pass log, in bytes rounded up to ``alignment``): the planned peak
(``arena_bytes``), the sum of all planned buffers (what a program without reuse
allocates), and the lower bound (the largest total of buffers live at one step; no
placement can use less). ``lower_bound <= arena_bytes <= total_bytes`` always holds.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import sympy
import torch

from transfuse.errors import LoweringError, TransfuseError
from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.opdefs.misc import resolve_aten
from transfuse.ir.types import Dim, DType, TensorType, dim_str, eval_dim

#: the largest element size of any IR dtype; ``alignment`` must be a multiple of it
MAX_ITEMSIZE = max(d.itemsize for d in DType)


# -- aliasing rules -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Alias:
    """How one output of a node shares memory: ``kind`` and the input indices involved.

    ``view``: a view of input ``inputs[0]``; ``inplace``: input ``inputs[0]`` overwritten;
    ``external``: memory allocated outside the plan that may alias any of ``inputs``.
    """

    kind: str
    inputs: tuple[int, ...]

    KINDS = ("view", "inplace", "external")

    @classmethod
    def view(cls, index: int = 0) -> Alias:
        return cls("view", (index,))

    @classmethod
    def inplace(cls, index: int = 0) -> Alias:
        return cls("inplace", (index,))

    @classmethod
    def external(cls, *indices: int) -> Alias:
        return cls("external", tuple(indices))


#: ``rule(node, output_index) -> Alias | None`` (None: the output owns fresh memory)
AliasRule = Callable[[Node, int], "Alias | None"]

#: ops whose every output is a view of input 0 when the host code runs them through torch
VIEW_OPS = frozenset({"reshape", "permute", "expand", "slice", "split", "identity"})


def default_alias(node: Node, index: int) -> Alias | None:
    """What torch-level host code makes of ``node``'s output ``index``.

    Views: :data:`VIEW_OPS`, ``dropout`` at inference, ``index_select`` by a 0-d index (a
    ``select``), a ``cast`` to the same dtype (``Tensor.to`` returns its input). A reshape
    that has to copy (a non-contiguous input) still counts as a view: that only keeps its
    base live longer than needed, and the copy is torch's own allocation.
    ``torch_fallback``: external, aliasing every tensor input when the aten schema says a
    result may alias an argument (``transpose``, ``split``, ...). Everything else writes
    fresh memory.
    """
    op = node.op
    if op in VIEW_OPS:
        return Alias.view(0)
    if op == "dropout" and not node.attrs["train"]:
        return Alias.view(0)
    if op == "index_select" and node.inputs[1].type.rank == 0:
        return Alias.view(0)
    if op == "cast" and node.attrs["dtype"] == node.inputs[0].type.dtype:
        return Alias.view(0)
    if op == "torch_fallback":
        tensors = tuple(i for i, v in enumerate(node.inputs) if v is not None)
        try:
            returns = resolve_aten(node.attrs["target"])._schema.returns
            aliasing = any(r.alias_info is not None for r in returns)
        except TransfuseError:
            aliasing = True  # an unknown op: assume the worst
        return Alias.external(*tensors) if aliasing else Alias.external()
    return None


# -- the plan -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One planned value (the root of its alias class) and its slot in the arena."""

    name: str
    offset: int  # bytes from the arena's start, a multiple of the plan's alignment
    size: int  # bytes at the plan's dims
    first: int  # step that writes it
    last: int  # last step that reads it or any of its aliases (inclusive)
    type: TensorType  # the root's type (symbolic dims included)
    nbytes: Dim  # its size as an expression of the symbols
    aliases: tuple[str, ...] = ()  # views / in-place results living in this buffer

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclasses.dataclass
class MemoryPlan:
    """Where each intermediate lives in one arena; see the module docstring."""

    buffers: list[Buffer]  # by (first, offset)
    alignment: int
    dims: dict[str, int]  # the symbol values the sizes were evaluated at
    steps: int
    arena_bytes: int  # planned peak: the arena's size
    total_bytes: int  # sum of all buffers, each rounded up to the alignment (no reuse)
    lower_bound: int  # largest total of (aligned) buffers live at one step
    #: value name -> the planned buffer whose memory it is (its alias class's root)
    alias_of: dict[str, str] = dataclasses.field(default_factory=dict)
    #: buffers whose size the planner could not prove nondecreasing in the symbols
    unproven: tuple[str, ...] = ()
    #: the placement order that won (:data:`STRATEGIES`)
    strategy: str = "size"

    def buffer(self, name: str) -> Buffer:
        """The buffer holding value ``name`` (a planned value or one of its aliases)."""
        root = self.alias_of.get(name, name)
        for b in self.buffers:
            if b.name == root:
                return b
        raise KeyError(f"value %{name} has no buffer in this memory plan")

    def summary(self) -> str:
        """One line for the pass log: peak vs no-reuse sum vs lower bound."""
        at = ", ".join(f"{k}={v}" for k, v in sorted(self.dims.items()))
        saved = f"{self.total_bytes / self.arena_bytes:.2f}x" if self.arena_bytes else "-"
        gap = f"{self.arena_bytes / self.lower_bound:.2f}x" if self.lower_bound else "-"
        line = (f"memory plan{f' at {at}' if at else ''}: {len(self.buffers)} buffers over "
                f"{self.steps} steps; planned peak {_fmt(self.arena_bytes)} vs "
                f"{_fmt(self.total_bytes)} without reuse ({saved} less) vs lower bound "
                f"{_fmt(self.lower_bound)} (peak/bound {gap}); placement {self.strategy}")
        if self.unproven:
            line += f"; {len(self.unproven)} size(s) checked per run (not provably monotone)"
        return line

    def describe(self) -> str:
        """A table of the buffers (for comments in the generated host code)."""
        rows = [f"# {'offset':>10} {'bytes':>10}  steps      value (aliases)"]
        for b in sorted(self.buffers, key=lambda b: (b.offset, b.first)):
            alias = f" ({', '.join('%' + a for a in b.aliases)})" if b.aliases else ""
            rows.append(f"# {b.offset:>10} {b.size:>10}  {b.first:>4}-{b.last:<4}  "
                        f"%{b.name}: {b.type}{alias}")
        return "\n".join(rows)

    def verify(self) -> None:
        """Raise :class:`LoweringError` unless every invariant of the plan holds."""
        a = self.alignment
        if a < 1 or a & (a - 1) or a % MAX_ITEMSIZE:
            _bad(f"alignment {a} is not a power of two multiple of {MAX_ITEMSIZE}")
        if self.arena_bytes % a:
            _bad(f"arena of {self.arena_bytes} B is not a multiple of the alignment {a}")
        for b in self.buffers:
            if b.offset < 0 or b.offset % a:
                _bad(f"%{b.name} at offset {b.offset}: not a nonnegative multiple of {a}")
            if b.size < 0 or b.end > self.arena_bytes:
                _bad(f"%{b.name} [{b.offset}, {b.end}) is outside the arena of "
                     f"{self.arena_bytes} B")
            if not 0 <= b.first <= b.last < max(self.steps, 1):
                _bad(f"%{b.name} lives over steps {b.first}..{b.last} of {self.steps}")
        # sweep by first step, keeping the buffers still live
        live: list[Buffer] = []
        for b in sorted(self.buffers, key=lambda b: (b.first, b.name)):
            live = [x for x in live if x.last >= b.first]
            for x in live:
                if b.size and x.size and b.offset < x.end and x.offset < b.end:
                    _bad(f"%{b.name} [{b.offset}, {b.end}) steps {b.first}..{b.last} overlaps "
                         f"%{x.name} [{x.offset}, {x.end}) steps {x.first}..{x.last}")
            live.append(b)
        total = sum(_align(b.size, a) for b in self.buffers)
        if total != self.total_bytes or self.lower_bound != _lower_bound(
                ((b.size, b.first, b.last) for b in self.buffers), a):
            _bad("the statistics do not match the buffers")
        if not self.lower_bound <= self.arena_bytes <= self.total_bytes:
            _bad(f"lower bound {self.lower_bound} <= peak {self.arena_bytes} <= sum "
                 f"{self.total_bytes} does not hold")

    def allocate(self, device: str | torch.device | None = None) -> torch.Tensor:
        """A fresh arena for this plan (uninitialised uint8)."""
        return torch.empty(self.arena_bytes, dtype=torch.uint8, device=device)


# -- planning -----------------------------------------------------------------------------


def plan_memory(
    graph: Graph,
    order: Sequence[Node | Sequence[Node]] | None = None,
    *,
    alignment: int = 256,
    dims: Mapping[str, int] | None = None,
    alias: AliasRule = default_alias,
) -> MemoryPlan:
    """Plan one arena for the intermediates of ``graph`` run in ``order``.

    ``order``: the steps, each a node or a fusion group of nodes (one kernel), covering
    every node once, producers before consumers (default: the graph's node order, one node
    a step). ``dims``: every symbol in an intermediate's shape bound to the max of its
    range (``{k: hi for k, (lo, hi) in signature.symbols.items()}``). ``alias``: which outputs
    share memory (:func:`default_alias`). Raises :class:`LoweringError` on a bad order, a
    missing dim, a bad alias or an in-place write that clobbers a value still read.
    """
    if alignment < 1 or alignment & (alignment - 1) or alignment % MAX_ITEMSIZE:
        raise LoweringError(f"memory plan: alignment must be a power of two and a multiple of "
                            f"{MAX_ITEMSIZE} (the largest element size), got {alignment}")
    steps = _steps(graph, order)
    step_of = {id(n): s for s, group in enumerate(steps) for n in group}
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    outputs = {id(v) for v in graph.outputs}

    # -- alias classes: every value points at the value that owns its memory ------------
    base_of: dict[int, Value] = {}  # view / in-place value -> the input it aliases
    root_of: dict[int, Value] = {}
    kind_of: dict[int, str] = {}
    keeps: dict[int, list[Value]] = {}  # external value -> inputs it may alias
    for group in steps:
        for node in group:
            for i, v in enumerate(node.outputs):
                a = alias(node, i)
                if a is None:
                    root_of[id(v)] = v
                    continue
                _check_alias(node, i, a)
                kind_of[id(v)] = a.kind
                if a.kind == "external":
                    root_of[id(v)] = v
                    keeps[id(v)] = [node.inputs[j] for j in a.inputs]
                else:
                    base = node.inputs[a.inputs[0]]
                    base_of[id(v)] = base
                    root_of[id(v)] = root_of.get(id(base), base)

    classes: dict[int, _Class] = {}

    def cls_of(v: Value) -> _Class:
        root = root_of.get(id(v), v)
        c = classes.get(id(root))
        if c is None:
            p = root.producer
            c = classes[id(root)] = _Class(root, -1 if p is None else step_of[id(p)],
                                           -1 if p is None else position[id(p)])
            c.external = kind_of.get(id(root)) == "external"
        return c

    for group in steps:
        for node in group:
            s = step_of[id(node)]
            for v in node.inputs:
                if v is not None:
                    c = cls_of(v)
                    c.last = max(c.last, s)
            for v in node.outputs:
                c = cls_of(v)
                c.members.append(v)
                c.last = max(c.last, s)
                c.escapes |= id(v) in outputs
    for v in list(graph.inputs) + list(graph.constants.values()):
        cls_of(v).escapes |= id(v) in outputs

    _check_inplace(classes, root_of, base_of, kind_of, keeps, step_of, outputs)

    # -- external results keep what they may alias live (latest class first) ------------
    for c in sorted(classes.values(), key=lambda c: (c.first, c.position), reverse=True):
        for m in c.members:
            for v in keeps.get(id(m), ()):
                if v is None:
                    continue
                d = cls_of(v)
                d.last = max(d.last, c.last)
                d.escapes |= c.escapes

    # -- which classes get a buffer, and how big ------------------------------------------
    env = dict(dims or {})
    planned: list[tuple[_Class, int, Dim]] = []
    unproven: list[str] = []
    for c in classes.values():
        if c.first < 0 or c.escapes or c.external:
            continue
        if len(steps[c.first]) > 1 and c.last == c.first:
            continue  # never leaves its fusion group: kernel-local
        expr = c.root.type.nbytes()
        size = _eval_size(c.root, expr, env)
        if not _nondecreasing(expr):
            unproven.append(c.root.name)
        planned.append((c, size, expr))

    strategy, offsets = _best_placement(
        [(size, c.first, c.last, c.root.name) for c, size, _ in planned], alignment)
    buffers, alias_of = [], {}
    for (c, size, expr), offset in zip(planned, offsets):
        names = tuple(m.name for m in c.members if m is not c.root)
        buffers.append(Buffer(c.root.name, offset, size, c.first, c.last, c.root.type, expr,
                              names))
        alias_of.update((n, c.root.name) for n in names)
    buffers.sort(key=lambda b: (b.first, b.offset))
    lifetimes = [(b.size, b.first, b.last) for b in buffers]
    return MemoryPlan(buffers, alignment, {k: env[k] for k in sorted(env)}, len(steps),
                      arena_bytes=_align(max((b.end for b in buffers), default=0), alignment),
                      total_bytes=sum(_align(b.size, alignment) for b in buffers),
                      lower_bound=_lower_bound(lifetimes, alignment), alias_of=alias_of,
                      unproven=tuple(unproven), strategy=strategy)


class _Class:
    """An alias class while planning: the root owning the memory and its lifetime."""

    __slots__ = ("root", "first", "position", "last", "members", "escapes", "external")

    def __init__(self, root: Value, first: int, position: int):
        self.root, self.first, self.position, self.last = root, first, position, first
        self.members: list[Value] = []
        self.escapes = False  # a member is a graph output (or may be aliased by one)
        self.external = False  # the root's memory is allocated outside the plan


def _steps(graph: Graph, order: Sequence[Node | Sequence[Node]] | None) -> list[list[Node]]:
    """The steps as lists of nodes in graph order; checks coverage and dependencies."""
    nodes = list(graph.nodes)
    if order is None:
        return [[n] for n in nodes]
    position = {id(n): i for i, n in enumerate(nodes)}
    steps: list[list[Node]] = []
    step_of: dict[int, int] = {}
    for s, item in enumerate(order):
        group = [item] if isinstance(item, Node) else list(item)
        if not group:
            raise LoweringError(f"memory plan: step {s} of the order is empty")
        for n in group:
            if not isinstance(n, Node) or id(n) not in position:
                raise LoweringError(f"memory plan: step {s} holds {n!r}, not a node of graph "
                                    f"{graph.name}")
            if id(n) in step_of:
                raise LoweringError(f"memory plan: {n!r} is in step {step_of[id(n)]} and step {s}")
            step_of[id(n)] = s
        steps.append(sorted(group, key=lambda n: position[id(n)]))
    missing = [n for n in nodes if id(n) not in step_of]
    if missing:
        raise LoweringError(f"memory plan: the order leaves out {len(missing)} node(s), "
                            f"first {missing[0]!r}")
    for s, group in enumerate(steps):
        for n in group:
            for v in n.inputs:
                p = None if v is None else v.producer
                if p is not None and step_of[id(p)] > s:
                    raise LoweringError(f"memory plan: step {s} runs {n!r} before step "
                                        f"{step_of[id(p)]} produces its input %{v.name}")
    return steps


def _check_alias(node: Node, index: int, a: Alias) -> None:
    ok = isinstance(a, Alias) and a.kind in Alias.KINDS and \
        all(isinstance(j, int) and 0 <= j < len(node.inputs) and node.inputs[j] is not None
            for j in a.inputs) and (a.kind == "external" or len(a.inputs) == 1)
    if not ok:
        raise LoweringError(f"memory plan: the alias rule says output {index} of {node!r} is "
                            f"{a!r}; expected Alias.view(i) / inplace(i) with one present "
                            f"input, or external(*inputs)")


def _check_inplace(classes, root_of, base_of, kind_of, keeps, step_of, outputs) -> None:
    """An in-place write must be the last access to its base's old contents: no later read
    of a member of its class that the write does not produce (nor of an external result
    that may alias one), and none of them a graph output."""
    for c in classes.values():
        for o in c.members:
            if kind_of.get(id(o)) != "inplace":
                continue
            node, s = o.producer, step_of[id(o.producer)]
            if c.root.producer is None:
                raise LoweringError(f"memory plan: {node!r} writes %{o.name} in place over "
                                    f"{'constant' if c.root.is_const else 'graph input'} "
                                    f"%{c.root.name}")

            old = [m for m in c.members if not _derives(m, o, base_of)]
            old_ids = {id(m) for m in old}
            for e, kept in keeps.items():  # external results that may alias old contents
                if any(k is not None and id(k) in old_ids for k in kept):
                    ext = classes[id(root_of[e])]
                    old.extend(ext.members)
            for m in old:
                late = [n for n, _ in m.uses if step_of[id(n)] > s]
                if late or id(m) in outputs:
                    reader = f"read at step {step_of[id(late[0])]} by {late[0]!r}" if late \
                        else "a graph output"
                    raise LoweringError(f"memory plan: {node!r} at step {s} overwrites %{m.name} "
                                        f"in place (as %{o.name}), but %{m.name} is {reader}")


def _derives(v: Value, o: Value, base_of: Mapping[int, Value]) -> bool:
    """Whether ``v`` is ``o`` or reaches it through the chain of alias bases."""
    while v is not o and id(v) in base_of:
        v = base_of[id(v)]
    return v is o


def _eval_size(v: Value, expr: Dim, env: Mapping[str, int]) -> int:
    if isinstance(expr, int):
        return expr
    missing = sorted({s.name for s in expr.free_symbols} - set(env))
    if missing:
        raise LoweringError(f"memory plan: %{v.name}: {v.type} needs a value for "
                            f"{', '.join(missing)}; pass dims={{name: the max of its range}}")
    return eval_dim(expr, env)


def _nondecreasing(expr: Dim) -> bool:
    """True when ``expr`` is a polynomial in its symbols (all positive integers) whose
    nonconstant terms have nonnegative coefficients (``256*seq - 256`` qualifies): then it
    never grows when a symbol shrinks."""
    if isinstance(expr, int):
        return True
    try:
        poly = sympy.Poly(expr, *sorted(expr.free_symbols, key=lambda s: s.name))
    except sympy.PolynomialError:
        return False
    return all(c.is_number and (c >= 0 or not any(m)) for m, c in poly.terms())


#: orders the greedy placement starts from: largest first with longer lifetimes first among
#: equal sizes, largest size x lifetime first, longest lifetime first
STRATEGIES: dict[str, Callable[[tuple[int, int, int, str]], tuple]] = {
    "size": lambda b: (-b[0], b[1] - b[2], b[1], b[3]),
    "area": lambda b: (-b[0] * (b[2] - b[1] + 1), -b[0], b[1], b[3]),
    "lifetime": lambda b: (b[1] - b[2], -b[0], b[1], b[3]),
}

#: bound on the placement work of one plan (buffer pairs looked at over all rounds)
WORK_BUDGET = 4_000_000


def _best_placement(items: Sequence[tuple[int, int, int, str]],
                    alignment: int) -> tuple[str, list[int]]:
    """The smallest arena found for ``items`` (size, first, last, name), and how.

    From each strategy's order, greedy placement, then rounds of promotion: the buffer
    that ends highest (above the lower bound, not already first) moves to the front of the
    order and everything is placed again, so the buffers that set the peak get the pick of
    the slots. Stops at the lower bound (nothing can beat it) or when the budget of rounds
    (:data:`WORK_BUDGET` / n², at most 256, a function of n only: plans stay deterministic)
    runs out. On GPT-2 small (113 buffers) plain greedy ends 1.17x above the bound at every
    order; 68 promotions from the size order reach it (GPT-2 tiny: 8).
    """
    n = len(items)
    bound = _lower_bound((it[:3] for it in items), alignment)
    rounds = min(256, WORK_BUDGET // max(n * n, 1))
    best: tuple[int, str, list[int]] | None = None
    for name, key in STRATEGIES.items():
        order = sorted(range(n), key=lambda i: key(items[i]))
        for r in range(rounds + 1):
            offsets = _place(items, order, alignment)
            ends = [o + it[0] for o, it in zip(offsets, items)]
            peak = _align(max(ends, default=0), alignment)
            if best is None or peak < best[0]:
                best = (peak, name if r == 0 else f"{name}+{r} promotions", offsets)
            if peak <= bound:
                return best[1], best[2]
            rank = {i: k for k, i in enumerate(order)}
            high = [i for i in order[1:] if ends[i] > bound]
            if not high:
                break
            top = max(high, key=lambda i: (ends[i], rank[i]))
            order.remove(top)
            order.insert(0, top)
    return best[1], best[2]


def _place(items: Sequence[tuple[int, int, int, str]], order: Sequence[int],
           alignment: int) -> list[int]:
    """Best-fit offsets for ``items`` (size, first, last, name) placed in ``order``: each
    goes into the smallest aligned gap between the placed items live with it, else on top."""
    offsets = [0] * len(items)
    placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last), by offset
    for i in order:
        size, first, last, _ = items[i]
        best, best_gap, top = None, math.inf, 0
        for off, end, p_first, p_last in placed:
            if p_first > last or first > p_last:
                continue  # never live at the same time: may share memory
            start = _align(top, alignment)
            gap = off - start
            if size <= gap < best_gap:
                best, best_gap = start, gap
            top = max(top, end)
        offsets[i] = best if best is not None else _align(top, alignment)
        bisect.insort(placed, (offsets[i], offsets[i] + size, first, last))
    return offsets


def _lower_bound(lifetimes: Iterable[tuple[int, int, int]], alignment: int) -> int:
    """The largest total of aligned sizes live at one step, over (size, first, last)."""
    delta: dict[int, int] = {}
    for size, first, last in lifetimes:
        a = _align(size, alignment)
        delta[first] = delta.get(first, 0) + a
        delta[last + 1] = delta.get(last + 1, 0) - a
    best = live = 0
    for s in sorted(delta):
        live += delta[s]
        best = max(best, live)
    return best


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _fmt(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _bad(message: str) -> None:
    raise LoweringError(f"memory plan invalid: {message}")


# -- views into an arena ------------------------------------------------------------------


def arena_views(plan: MemoryPlan, arena: torch.Tensor,
                dims: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Each planned value as a typed, shaped, contiguous view into ``arena`` at its offset.

    ``arena``: a contiguous 1-D uint8 tensor of at least ``plan.arena_bytes`` bytes whose
    start is aligned like the offsets (up to 64 B, what torch's allocators guarantee).
    ``dims``: this run's symbol values (default: the plan's); each view then has this run's
    shape, which must fit in its slot (:class:`LoweringError` otherwise).
    """
    if arena.dtype != torch.uint8 or arena.dim() != 1 or not arena.is_contiguous():
        raise LoweringError(f"arena_views: the arena must be a contiguous 1-D uint8 tensor, got "
                            f"{arena.dtype} of shape {list(arena.shape)}")
    if arena.numel() < plan.arena_bytes:
        raise LoweringError(f"arena_views: the arena has {arena.numel()} bytes, the plan needs "
                            f"{plan.arena_bytes}")
    if arena.numel() and arena.data_ptr() % min(plan.alignment, 64):
        raise LoweringError(f"arena_views: the arena starts at {arena.data_ptr():#x}, not "
                            f"{min(plan.alignment, 64)}-byte aligned")
    env = plan.dims if dims is None else dims
    views: dict[str, torch.Tensor] = {}
    for b in plan.buffers:
        shape = b.type.concrete(env)
        nbytes = math.prod(shape) * b.type.dtype.itemsize
        if nbytes > b.size:
            at = ", ".join(f"{k}={v}" for k, v in sorted(env.items()))
            raise LoweringError(f"arena_views: %{b.name}: {b.type} is {nbytes} B at {at}, more "
                                f"than its planned {b.size} B (nbytes {dim_str(b.nbytes)}); "
                                f"plan at the max of each range")
        views[b.name] = arena.narrow(0, b.offset, nbytes).view(b.type.dtype.torch).view(shape)
    return views


__all__ = ["Alias", "AliasRule", "Buffer", "MemoryPlan", "MAX_ITEMSIZE", "VIEW_OPS",
           "arena_views", "default_alias", "plan_memory"]
