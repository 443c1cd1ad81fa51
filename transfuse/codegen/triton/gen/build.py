"""The values a generated kernel computes, built from a fusion group's nodes.

:class:`KernelBuilder` walks the group in order and makes one :class:`KernelValue` per load,
op and reduction: what the kernel computes, not yet where (the emitter, :mod:`.emit`, writes
the statements into a pointwise or a row kernel).

Loads. An external tensor is read in the space of the member that reads it, right-aligned
and broadcast: in a pointwise kernel from the flat offset ``offs`` by runs of dims it has or
lacks (``((offs // inner) % size) * stride`` per run it has: ``offs`` for a full tensor,
``offs % 16`` for a bias [16], one scalar load for a one-element tensor); in a row kernel the
row part from ``rows`` the same way plus ``cols`` when the tensor has the row's dim (a
weight [N] is a [1, BLOCK] load, a [B, S, 1] tensor one value per row), or from the flat
position ``rows * N + cols`` for a member that is a reshape of rows. Static sizes are
written in; a symbolic one becomes an int argument (``s_seq`` for a symbol, ``d0`` for an
expression) the host computes from the symbols' values.

Row ops expand here: softmax / log_softmax into max, exp(x - max), sum; rms_norm / layer_norm /
add_norm into their statistics, as the IR reference computes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from transfuse.codegen.triton.gen.ops import (
    COMPUTE,
    HELPERS,
    POINTER,
    POINTWISE,
    REDUCTIONS,
    ROUNDED,
    ExprContext,
    format_literal,
    literal_value,
)
from transfuse.codegen.triton.gen.partition import Group
from transfuse.errors import LoweringError
from transfuse.ir.graph import Node, Value
from transfuse.ir.types import Dim, DType, dim_product, dim_str, dims_equal

#: role order: uniform (one value), per row, per element
RANK = {"u": 0, "r": 1, "v": 2}


@dataclasses.dataclass(eq=False)
class KernelValue:
    """One value in the kernel: a load (``x<k>``), an op or a reduction (``v<k>``).

    ``role``: "u" one value for the program, "r" one per row ([ROWS, 1]), "v" one per
    element; ``level``: how many reductions in a chain it depends on (the pass of a looped
    row kernel that can first compute it); ``reduce``: (sum|max|min, identity, mean) of
    ``deps[0]`` for a reduction (its statement is written by the emitter)."""

    name: str
    dtype: DType
    role: str  # u / r / v (pointwise kernels: u / v)
    level: int
    code: str = ""  # the statement's right-hand side (ops, loads)
    deps: list[KernelValue] = dataclasses.field(default_factory=list)
    comment: str = ""
    reduce: tuple[str, Any, bool] | None = None  # (sum|max|min, identity, mean) of deps[0]


class KernelBuilder(ExprContext):
    """Builds the kernel values of one group, node by node (:meth:`build`): loads of the
    external tensors where a member reads them, one value per pointwise op, reductions, the
    expansions of row ops; ``ints``: the symbolic sizes the source needs as arguments."""

    def __init__(self, group: Group):
        self.g = group
        self.space = group.space
        self.row = group.space.kind == "row"
        self.memo: dict[int, Any] = {}
        self.kvs: list[KernelValue] = []
        self.val: dict[int, KernelValue] = {}
        self.loads: dict[tuple[int, str], KernelValue] = {}
        self.in_index = {id(v): i for i, v in enumerate(group.inputs)}
        self.ints: dict[str, tuple[str, Dim]] = {}
        self.helpers: list[str] = []
        self.node: Node | None = None
        self.deps: list[KernelValue] = []

    # -- dims ----------------------------------------------------------------------------

    def dim(self, d: Dim) -> str:
        """A size as source: a literal, or the int argument that carries it."""
        if isinstance(d, int):
            return str(d)
        key = dim_str(d)
        if key not in self.ints:
            count = sum(1 for n, _ in self.ints.values() if n.startswith("d"))
            self.ints[key] = (f"s_{d.name}" if d.is_Symbol else f"d{count}", d)
        return self.ints[key][0]

    # -- values ---------------------------------------------------------------------------

    def new(self, prefix: str, dtype: DType, role: str, level: int, **kw: Any) -> KernelValue:
        kv = KernelValue(f"{prefix}{len(self.kvs)}", dtype, role, level, **kw)
        self.kvs.append(kv)
        return kv

    def new_op(self, code: str, deps: list[KernelValue], dtype: DType, comment: str) -> KernelValue:
        if dtype in ROUNDED:
            code = f"{paren(code)}.to({ROUNDED[dtype]}).to(tl.float32)"
        role = max((d.role for d in deps), key=RANK.__getitem__, default="u")
        level = max((d.level for d in deps), default=0)
        return self.new("v", dtype, role, level, code=code, deps=list(deps), comment=comment)

    def new_reduce(self, kind: str, identity: float, mean: bool, src: KernelValue, dtype: DType,
                   comment: str) -> KernelValue:
        return self.new("v", dtype, "r", src.level + 1, deps=[src], comment=comment,
                        reduce=(kind, identity, mean))

    def index(self, flat: str, space: Sequence[Dim], shape: Sequence[Dim], tail: Dim) -> str | None:
        """The offset into a contiguous tensor of ``shape`` broadcast into ``space`` (both
        right-aligned) at flat position ``flat`` of ``space``; None when it is one element.
        Runs of dims the tensor has (or lacks) are taken together; ``tail`` multiplies the
        strides (the row length when a row kernel adds the column itself)."""
        if len(shape) > len(space):
            raise LoweringError(f"triton gen: a tensor of shape {list(shape)} is read in "
                                f"a smaller space {list(space)}")
        padded = [1] * (len(space) - len(shape)) + list(shape)
        runs: list[tuple[bool, list[Dim]]] = []
        for d, s in zip(space, padded):
            if isinstance(d, int) and d == 1:
                continue
            has = not (isinstance(s, int) and s == 1)
            if runs and runs[-1][0] == has:
                runs[-1][1].append(d)
            else:
                runs.append((has, [d]))
        terms: list[str] = []
        inner: Dim = 1
        stride: Dim = tail
        for i in range(len(runs) - 1, -1, -1):
            has, dims = runs[i]
            size = dim_product(dims)
            if has:
                term = flat
                if not (isinstance(inner, int) and inner == 1):
                    term = f"({term} // {self.dim(inner)})"
                if i > 0:
                    term = f"({term} % {self.dim(size)})"
                if not (isinstance(stride, int) and stride == 1):
                    term = f"{term} * {self.dim(stride)}"
                terms.append(term)
                stride = dim_product([stride, size])
            inner = dim_product([inner, size])
        return " + ".join(reversed(terms)) if terms else None

    def load(self, v: Value, space: Sequence[Dim], role: str,
             shape: Sequence[Dim] | None = None) -> KernelValue:
        """A kernel value for the external tensor ``v`` read in the space of a member
        (``space``, its role); ``shape``: how ``v`` is viewed (a reshape's output)."""
        shape = list(v.shape if shape is None else shape)
        i = self.in_index[id(v)]
        if not self.row:
            idx, mask, kvrole = self.index("offs", space, shape, 1), "mask", "v"
        else:
            if len(shape) > len(space):
                raise LoweringError(f"triton gen: a tensor of shape {shape} is read in a "
                                    f"smaller space {list(space)}")
            padded = [1] * (len(space) - len(shape)) + shape
            col = False
            n = self.space.row_len
            if role == "vec" and dims_equal(space[-1], n):  # L + [N]: the row, then the column
                last = padded[-1]
                col = not (isinstance(last, int) and last == 1)
                rowpart = self.index("rows", space[:-1], padded[:-1], last if col else 1)
            elif role == "vec":  # a reshape of rows of N: indexed from the flat position
                flat = self.index(f"(rows * {self.dim(n)} + cols)", space, padded, 1)
                key = (i, flat or "")
                if key not in self.loads:
                    self.loads[key] = self.new_load(v, i, flat, "mask", "v")
                return self.loads[key]
            else:  # a row scalar: L + [1] or L, M elements
                rowpart = self.index("rows", space, padded, 1)
            parts = [p for p in (rowpart, "cols" if col else None) if p]
            idx = " + ".join(parts) if parts else None
            # a tensor along the row only (a weight [N]) is loaded as [1, BLOCK]
            mask = ("mask" if rowpart else "cmask") if col else "rmask"
            kvrole = "v" if col else "r"
        key = (i, idx or "")
        if key not in self.loads:
            self.loads[key] = self.new_load(v, i, idx, mask, kvrole)
        return self.loads[key]

    def new_load(self, v: Value, i: int, idx: str | None, mask: str, role: str) -> KernelValue:
        if idx is None:
            code = f"tl.load(in{i})"
        else:
            code = f"tl.load(in{i} + {paren(idx)}, mask={mask}, other=0)"
        if COMPUTE[v.dtype] != POINTER[v.dtype]:
            code += f".to({COMPUTE[v.dtype]})"
        return self.new("x", v.dtype, "u" if idx is None else role, 0, code=code,
                        comment=f"in{i} {v.type}")

    def operand(self, node: Node, i: int) -> KernelValue | str:
        """Operand ``i`` of ``node``: its kernel value, or a literal's text (in its dtype)."""
        v = node.inputs[i]
        lit = literal_value(v, self.memo)
        if lit is not None:
            return format_literal(lit, v.dtype)
        if v.producer is not None and id(v) in self.val:
            return self.val[id(v)]
        out = node.outputs[0]
        if node.op in REDUCTIONS:
            return self.load(v, v.shape, "vec")
        if node.op == "reshape":
            return self.load(v, out.shape, self.role(out), shape=out.shape)
        return self.load(v, out.shape, self.role(out))

    def role(self, v: Value) -> str:
        return self.space.role(v)

    # -- ExprContext ----------------------------------------------------------------------

    def arg(self, i: int, dtype: DType | None = None) -> str:
        node = self.node
        assert node is not None
        want = node.outputs[0].dtype if dtype is None else dtype
        v = node.inputs[i]
        op = self.operand(node, i)
        if isinstance(op, str):  # converted to the op's dtype first, as torch does
            lit = torch.tensor(literal_value(v, self.memo)).to(want.torch).item()
            return format_literal(lit, want)
        self.deps.append(op)
        if COMPUTE[op.dtype] == COMPUTE[want]:
            return op.name
        if want == DType.bool:
            return f"({op.name} != 0)"
        return f"{op.name}.to({COMPUTE[want]})"

    def literal(self, i: int) -> float | int | bool | None:
        assert self.node is not None
        return literal_value(self.node.inputs[i], self.memo)

    def helper(self, name: str) -> str:
        if name not in HELPERS:
            raise LoweringError(f"triton gen: no helper {name!r}")
        if name not in self.helpers:
            self.helpers.append(name)
        return name

    # -- nodes ----------------------------------------------------------------------------

    def emit_node(self, node: Node) -> None:
        out = node.outputs[0]
        comment = node.op + (f" {{approximate={node.attrs['approximate']}}}"
                             if node.op == "gelu" else "")
        if node.op in REDUCTIONS:
            kind, ident = REDUCTIONS[node.op]
            src = self.value_of(node, 0)
            self.val[id(out)] = self.new_reduce(kind, ident, node.op == "reduce_mean", src,
                                                out.dtype, node.op)
            if out.dtype in ROUNDED:
                kv = self.val[id(out)]
                self.val[id(out)] = self.new_op(kv.name, [kv], out.dtype, "round")
            return
        if node.op in ("softmax", "log_softmax"):
            self.val[id(out)] = self.softmax(node)
            return
        if node.op in ("rms_norm", "layer_norm", "add_norm"):
            for v, kv in zip(node.outputs, self.norm(node)):
                self.val[id(v)] = kv
            return
        if node.op in ("reshape", "expand"):
            op = self.operand(node, 0)
            if isinstance(op, str):
                raise LoweringError(f"triton gen: {node.op} of a literal is not generated")
            self.val[id(out)] = op
            return
        self.node, self.deps = node, []
        code = POINTWISE.get(node.op).fn(self, node)
        deps, self.node = self.deps, None
        self.val[id(out)] = self.new_op(code, deps, out.dtype, comment)

    def value_of(self, node: Node, i: int) -> KernelValue:
        op = self.operand(node, i)
        if isinstance(op, str):  # a reduction of a literal: a uniform value
            return self.new("v", node.inputs[i].dtype, "u", 0,
                            code=f"tl.full([], {op}, {COMPUTE[node.inputs[i].dtype]})",
                            comment="literal")
        return op

    def softmax(self, node: Node) -> KernelValue:
        """softmax / log_softmax over the row: max, exp(x - max), sum, then divide / log."""
        x = self.value_of(node, 0)
        dtype = node.outputs[0].dtype
        f32 = DType.f64 if dtype == DType.f64 else DType.f32
        xf = x.name if COMPUTE[x.dtype] == COMPUTE[f32] else f"{x.name}.to({COMPUTE[f32]})"
        m = self.new_reduce("max", -float("inf"), False, x, f32, f"{node.op}: row max")
        sh = self.new_op(f"({xf} - {m.name})", [x, m], f32, f"{node.op}: x - max")
        e = self.new_op(f"tl.exp({sh.name})", [sh], f32, f"{node.op}: exp")
        s = self.new_reduce("sum", 0.0, False, e, f32, f"{node.op}: row sum")
        if node.op == "softmax":
            return self.new_op(f"({e.name} / {s.name})", [e, s], dtype, "softmax")
        return self.new_op(f"({sh.name} - tl.log({s.name}))", [sh, s], dtype, "log_softmax")

    def norm(self, node: Node) -> list[KernelValue]:
        """rms_norm / layer_norm (/ add_norm: the sum first, rounded to its dtype) over the row,
        in fp32 as the IR references compute them; rms_norm rounds the normalised row to the
        input dtype before the weight, and ``offset + weight`` to the weight dtype."""
        op, a = node.op, node.attrs
        dtype = node.outputs[0].dtype
        f32 = DType.f64 if dtype == DType.f64 else DType.f32
        if op == "add_norm":
            self.node, self.deps = node, []
            code = f"({self.arg(0)} + {self.arg(1)})"
            deps, self.node = self.deps, None
            x = self.new_op(code, deps, dtype, "add_norm: sum")
            rms, params = a["kind"] == "rms", node.inputs[2:]
        else:
            x = self.value_of(node, 0)
            rms, params = op == "rms_norm", node.inputs[1:]
        w = self.param(node, params, 0)
        b = self.param(node, params, 1)
        eps = format_literal(a["eps"], f32)
        if rms:
            sq = self.new_op(f"({x.name} * {x.name})", [x], f32, f"{op}: x^2")
            ms = self.new_reduce("sum", 0.0, True, sq, f32, f"{op}: mean of x^2")
            r = self.new_op(f"tl.rsqrt({ms.name} + {eps})", [ms], f32, f"{op}: rstd")
            y = self.new_op(f"({x.name} * {r.name})", [x, r], x.dtype, f"{op}: normalise")
            if w is not None:
                wv = w
                if a["offset"]:
                    lit = format_literal(a["offset"], f32)
                    wv = self.new_op(f"({w.name} + {lit})", [w], w.dtype, f"{op}: offset + w")
                y = self.new_op(f"({y.name} * {wv.name})", [y, wv], dtype, f"{op}: weight")
        else:
            mu = self.new_reduce("sum", 0.0, True, x, f32, f"{op}: mean")
            c = self.new_op(f"({x.name} - {mu.name})", [x, mu], f32, f"{op}: centre")
            c2 = self.new_op(f"({c.name} * {c.name})", [c], f32, f"{op}: centred^2")
            var = self.new_reduce("sum", 0.0, True, c2, f32, f"{op}: variance")
            r = self.new_op(f"tl.rsqrt({var.name} + {eps})", [var], f32, f"{op}: rstd")
            y = self.new_op(f"({c.name} * {r.name})", [c, r], f32, f"{op}: normalise")
            for p, sym in ((w, "*"), (b, "+")):
                if p is not None:
                    y = self.new_op(f"({y.name} {sym} {p.name})", [y, p], f32,
                                    f"{op}: {'weight' if sym == '*' else 'bias'}")
        if y.dtype != dtype or y is x:
            y = self.new_op(y.name, [y], dtype, f"{op}: out")
        return [y, x] if op == "add_norm" else [y]

    def param(self, node: Node, params: Sequence[Value | None], k: int) -> KernelValue | None:
        """The weight (k=0) / bias (k=1) of a norm as a kernel value, or None."""
        if k >= len(params) or params[k] is None:
            return None
        return self.value_of(node, list(node.inputs).index(params[k]))

    def build(self) -> KernelBuilder:
        """Every member's values, in order; returns self."""
        for node in self.g.nodes:
            self.emit_node(node)
        return self


def paren(expr: str) -> str:
    """``expr`` parenthesised unless it is a name or already one parenthesised group."""
    if expr.isidentifier():
        return expr
    if expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, c in enumerate(expr):
            depth += c == "("
            depth -= c == ")"
            if depth == 0 and i < len(expr) - 1:
                break
        else:
            return expr
    return f"({expr})"


__all__ = ["KernelBuilder", "KernelValue", "RANK", "paren"]
