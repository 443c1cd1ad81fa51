"""The one lowering registry every backend uses, and the ``Target`` interface.

A backend turns IR nodes into its own form one op at a time. Each op's lowering is a
function registered on the backend's :class:`Lowerings` by decorator, with an optional
capability check that says why it refuses a node (the model: pytorch/TensorRT's
converter registry)::

    LOWERINGS = Lowerings("python")

    @LOWERINGS.register("rms_norm", "layer_norm", supports=_norm_supports)
    def _norm(ctx, node): ...

    LOWERINGS.supports(node)   # None, or why: "no python lowering for op 'x'", or the check's

What a lowering function takes and returns is the backend's business (a source
expression for python, ONNX tensor names for onnxruntime); the registry only stores
and looks up. Each backend keeps its registry object in ``<backend>/registry.py`` and its
lowerings in one file per op family (mirroring ``transfuse/ir/opdefs/``); the backend's
package ``__init__`` imports every family file, so whoever imports anything of a backend
sees its registry complete, whatever the import order.

A :class:`Target` is a backend as the rest of transfuse sees it: a name, its
registry, ``build(graph, device) -> program``, and the questions passes may ask
(which kernels exist, what a GEMM costs here). ``api.py`` puts the target object in
the pass context; passes never import codegen. Targets are found by name through
:mod:`transfuse.codegen.targets`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from transfuse.errors import LoweringError
from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.types import QuantType

#: ``supports(node) -> reason | None``: why a lowering cannot take this node (None: it can)
SupportsFn = Callable[[Node], "str | None"]


@dataclasses.dataclass(frozen=True)
class Lowering:
    """One op's lowering for one backend: ``fn`` and its optional capability check."""

    op: str
    fn: Callable[..., Any]
    check: SupportsFn | None = None

    def refuses(self, node: Node) -> str | None:
        """Why this lowering cannot take ``node`` (None when it can)."""
        return self.check(node) if self.check is not None else None


class Lowerings:
    """IR op name -> :class:`Lowering`, for one target. The only registry class of codegen."""

    def __init__(self, target: str):
        self.target = target
        self._table: dict[str, Lowering] = {}

    def register(self, *ops: str, supports: SupportsFn | None = None) -> Callable:
        """Decorator: register ``fn`` as the lowering of each of ``ops``; returns ``fn``.

        ``supports(node)`` returns a reason when ``fn`` cannot express that node faithfully.
        Registering an op twice is an error (two files claiming one op).
        """
        if not ops:
            raise ValueError(f"{self.target} lowering registered for no op")

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            for op in ops:
                self.add(Lowering(op, fn, supports))
            return fn

        return deco

    def add(self, lowering: Lowering) -> None:
        """Register one :class:`Lowering` (``register`` is the decorator form)."""
        if lowering.op in self._table:
            raise ValueError(f"{self.target} lowering for {lowering.op} registered twice")
        self._table[lowering.op] = lowering

    def remove(self, op: str) -> Lowering:
        """Take ``op``'s lowering out and return it (tests put it back with :meth:`add`)."""
        try:
            return self._table.pop(op)
        except KeyError:
            raise LoweringError(f"no {self.target} lowering for op {op!r} to remove") from None

    def get(self, op: str) -> Lowering | None:
        """The lowering of ``op``, or None."""
        return self._table.get(op)

    def supports(self, node: Node) -> str | None:
        """None when ``node`` can be lowered, else why (also when its op has no lowering)."""
        low = self._table.get(node.op)
        if low is None:
            return f"no {self.target} lowering for op {node.op!r}"
        return low.refuses(node)

    def ops(self) -> frozenset[str]:
        """The ops with a lowering."""
        return frozenset(self._table)

    def __contains__(self, op: object) -> bool:
        return op in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._table))

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return f"Lowerings({self.target!r}, {len(self._table)} ops)"


class Target:
    """A backend: a name, its :class:`Lowerings`, ``build``, and what passes may ask it.

    Subclasses set ``name`` and ``lowerings`` and implement :meth:`build`. The query
    methods have conservative defaults (no choice to make, nothing to time), so a new
    target answers every question a pass may ask before it has anything to say.
    """

    name: ClassVar[str] = ""
    lowerings: ClassVar[Lowerings]

    def build(self, graph: Graph, device: Any = None) -> Any:
        """The runnable program of ``graph`` (``program(flat_inputs) -> list``)."""
        raise NotImplementedError(f"target {self.name!r} does not implement build()")

    def supports(self, node: Node) -> str | None:
        """Why this target cannot run ``node`` (None when it can)."""
        return self.lowerings.supports(node)

    # -- what passes may ask (the contract: transfuse.passes.base.TargetInfo) --------------

    #: values of ``linear``'s ``gemm`` attribute this target can run, first the default;
    #: fewer than two: there is nothing for ``layout.select-gemm`` to choose
    gemm_libraries: ClassVar[tuple[str, ...]] = ()

    def gemm_unavailable(self) -> str | None:
        """Why the non-default GEMM libraries cannot run here (None when they can)."""
        return f"target {self.name!r} has one GEMM library"

    def native_kernels_unavailable(self) -> str | None:
        """Why the target's native (C) kernels cannot run here (None when they can)."""
        return f"target {self.name!r} has no native kernels"

    def gemm_relayout_eligible(self, weight: Value) -> bool:
        """Whether graph constant ``weight`` may be stored in another layout for its GEMMs
        (every use reads it as a ``linear`` weight)."""
        return False

    def gemm_weight_relaid(self, weight: Value) -> bool:
        """Whether the built program will store graph constant ``weight`` in another layout
        (so it holds a copy of the weight the source model still has)."""
        return False

    def time_gemm(self, rows: int, weights: list, bias: Any, *, relayout: bool,
                  use_cache: bool = True) -> tuple[Any, str]:
        """(timing, where it came from) of the GEMM libraries on x [rows, K] times ``weights``
        [N, K]: an object with ``torch_s``, ``blas_s`` and ``gflops(library)``, and text for
        the pass log. Only a target with :attr:`gemm_libraries` to choose from times."""
        raise LoweringError(f"target {self.name!r} has no GEMM libraries to time")

    # -- quantization (issue 13; transfuse.passes.quant asks these) -------------------------

    #: granularities of qmatmul's dynamic activation quantization this target runs exactly,
    #: preferred first ("token": a scale per row, "tensor": one scale)
    qmatmul_act_quant: ClassVar[tuple[str, ...]] = ("token", "tensor")

    def quant_unsupported(self, qtype: QuantType, op: str) -> str | None:
        """Why this target cannot run ``op`` (``qlinear`` / ``qmatmul``) with a weight of
        ``qtype`` (None when it can)."""
        if qtype.scheme == "fp8e4m3":
            return f"target {self.name!r} has no fp8 GEMM (fp8 needs a GPU target)"
        return None

    def __repr__(self) -> str:
        return f"<target {self.name}>"


__all__ = ["Lowering", "Lowerings", "Target", "SupportsFn"]
