"""Triton source for one fusion group (:func:`emit_group`).

Two kernel shapes, chosen by the group's space (:mod:`.partition`):

- **pointwise**: a 1-D blocked kernel over the flattened output; program ``pid`` computes
  elements ``pid*BLOCK .. +BLOCK``. An input broadcast into a member's shape is indexed from
  the flat offset by the runs of dims it has or lacks: ``((offs // inner) % size) * stride``
  per run it has (``offs`` itself for a full input, ``offs % 16`` for a bias [16], one
  scalar load for a one-element input). Static sizes are written in; symbolic ones are
  kernel arguments (``s_seq``, or ``d0`` for an expression) computed by the host from the
  symbols' values, so one compiled kernel serves every length.
- **row**: M rows of N; a program takes ROWS rows (ROWS x BLOCK tile, BLOCK the power of two
  >= N) when ``SINGLE`` (the row in registers: loads, every op and every reduction once),
  else walks the row in BLOCK chunks, one pass per level of reductions (a pass accumulates
  the reductions whose inputs are known, ``acc = acc + where(mask, v, 0)`` / maximum, then
  ``tl.sum``/``tl.max`` along the row) and a last pass that writes the vector outputs;
  vector values are recomputed from the inputs in each pass that needs them, row scalars
  ([ROWS, 1]: reductions, ops on them, inputs constant along the row) once.

Numerics: fp32 compute (f64 stays f64, integers and bools their own type), loads upcast,
f16/bf16 values rounded after each op as torch does, stores cast to the output dtype.

The source names no IR value (the kernel of layer 3 is the kernel of layer 7, byte for byte,
and compiles once); the function is named ``<label>_<hash>``: what it fuses and the first hex
digits of the sha256 of its body. :class:`GeneratedKernel` carries the source, the argument
list (input / output types, the int arguments as IR dims) and the IR nodes it covers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from transfuse.codegen.triton.gen.ops import (
    COMPUTE,
    HELPERS,
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
from transfuse.ir.types import (
    Dim,
    DType,
    TensorType,
    dim_product,
    dim_str,
    dims_equal,
    free_symbols,
)

_PLACEHOLDER = "KERNEL_NAME"
#: role order: uniform (one value), per row, per element
_RANK = {"u": 0, "r": 1, "v": 2}


@dataclasses.dataclass(frozen=True)
class GeneratedKernel:
    """One generated kernel: its source and what a host needs to launch it.

    The kernel's arguments, in order: ``in0..`` (pointers to the group's inputs, types
    ``input_types``), ``out0..`` (``output_types``, contiguous), then ``int_args`` (name, IR
    dim: the host evaluates each from the symbols' values), then the constexprs (pointwise:
    ``BLOCK, IDX64``; row: ``ROWS, BLOCK, SINGLE, IDX64``). ``numel``: elements of the work
    (pointwise); ``rows`` / ``row_len``: M and N (row). ``nodes``: the IR lines it covers.
    """

    name: str
    label: str
    kind: str
    source: str
    input_types: tuple[TensorType, ...]
    output_types: tuple[TensorType, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    int_args: tuple[tuple[str, Dim], ...]
    numel: Dim
    rows: Dim | None
    row_len: Dim | None
    nodes: tuple[str, ...]
    bytes_saved: Dim

    @property
    def key(self) -> str:
        """sha256 of the source: the disk cache's key."""
        return hashlib.sha256(self.source.encode()).hexdigest()

    @property
    def symbols(self) -> tuple[str, ...]:
        """The symbolic dims the launch depends on, sorted."""
        names: set[str] = set()
        for t in self.input_types + self.output_types:
            names |= free_symbols(t.shape)
        return tuple(sorted(names))

    def jit(self):
        """The ``@triton.jit`` function (compiled from the disk cache once per process)."""
        from transfuse.codegen.triton.gen.cache import load_kernel

        return load_kernel(self.source, self.name)

    def __repr__(self) -> str:
        return f"<GeneratedKernel {self.name} ({self.kind}, {len(self.nodes)} nodes)>"


@dataclasses.dataclass(eq=False)
class _KV:
    """One value in the kernel: a load, an op or a reduction."""

    name: str
    dtype: DType
    role: str  # u / r / v (pointwise kernels: u / v)
    level: int
    code: str = ""  # the statement's right-hand side (ops, loads)
    deps: list[_KV] = dataclasses.field(default_factory=list)
    comment: str = ""
    reduce: tuple[str, Any, bool] | None = None  # (sum|max|min, identity, mean) of deps[0]


class _Emitter(ExprContext):
    def __init__(self, group: Group):
        self.g = group
        self.space = group.space
        self.row = group.space.kind == "row"
        self.memo: dict[int, Any] = {}
        self.kvs: list[_KV] = []
        self.val: dict[int, _KV] = {}
        self.loads: dict[tuple[int, str], _KV] = {}
        self.in_index = {id(v): i for i, v in enumerate(group.inputs)}
        self.ints: dict[str, tuple[str, Dim]] = {}
        self.helpers: list[str] = []
        self.node: Node | None = None
        self.deps: list[_KV] = []

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

    def new(self, prefix: str, dtype: DType, role: str, level: int, **kw: Any) -> _KV:
        kv = _KV(f"{prefix}{len(self.kvs)}", dtype, role, level, **kw)
        self.kvs.append(kv)
        return kv

    def new_op(self, code: str, deps: list[_KV], dtype: DType, comment: str) -> _KV:
        if dtype in ROUNDED:
            code = f"({code}).to({ROUNDED[dtype]}).to(tl.float32)"
        role = max((d.role for d in deps), key=_RANK.__getitem__, default="u")
        level = max((d.level for d in deps), default=0)
        return self.new("v", dtype, role, level, code=code, deps=list(deps), comment=comment)

    def new_reduce(self, kind: str, identity: float, mean: bool, src: _KV, dtype: DType,
                   comment: str) -> _KV:
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
             shape: Sequence[Dim] | None = None) -> _KV:
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

    def new_load(self, v: Value, i: int, idx: str | None, mask: str, role: str) -> _KV:
        if idx is None:
            code = f"tl.load(in{i})"
        else:
            code = f"tl.load(in{i} + {_paren(idx)}, mask={mask}, other=0)"
        if COMPUTE[v.dtype] != _POINTER[v.dtype]:
            code += f".to({COMPUTE[v.dtype]})"
        return self.new("x", v.dtype, "u" if idx is None else role, 0, code=code,
                        comment=f"in{i} {v.type}")

    def operand(self, node: Node, i: int) -> _KV | str:
        """Operand ``i`` of ``node``: its kernel value, or a literal's text (in its dtype)."""
        v = node.inputs[i]
        lit = literal_value(v, self.memo)
        if lit is not None:
            return format_literal(lit, v.dtype)
        if v.producer is not None and id(v) in self.val:
            return self.val[id(v)]
        out = node.outputs[0]
        if node.op in REDUCTIONS or node.op in ("softmax", "log_softmax"):
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

    def value_of(self, node: Node, i: int) -> _KV:
        op = self.operand(node, i)
        if isinstance(op, str):  # a reduction of a literal: a uniform value
            return self.new("v", node.inputs[i].dtype, "u", 0,
                            code=f"tl.full([], {op}, {COMPUTE[node.inputs[i].dtype]})",
                            comment="literal")
        return op

    def softmax(self, node: Node) -> _KV:
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

    # -- statements -----------------------------------------------------------------------

    def stmt(self, kv: _KV, single: bool) -> str:
        if kv.reduce is None:
            return f"{kv.name} = {kv.code}  # {kv.comment}"
        kind, ident, mean = kv.reduce
        src = kv.deps[0]
        lit = format_literal(ident, DType.f32)
        body = f"tl.{kind}(tl.where(mask, {src.name}, {lit}), axis=1)[:, None]"
        if mean:
            body = f"{body} / {self.dim(self.space.row_len)}"
        return f"{kv.name} = {body}  # {kv.comment}"

    def acc_init(self, kv: _KV) -> str:
        kind, ident, _ = kv.reduce
        ctype = COMPUTE[kv.dtype] if kv.dtype == DType.f64 else "tl.float32"
        ident = format_literal(ident, DType.f32)
        return f"acc_{kv.name} = tl.full([ROWS, BLOCK], {ident}, {ctype})"

    def acc_update(self, kv: _KV) -> str:
        kind, ident, _ = kv.reduce
        v = f"tl.where(mask, {kv.deps[0].name}, {format_literal(ident, DType.f32)})"
        if kind == "sum":
            return f"acc_{kv.name} = acc_{kv.name} + {v}"
        fn = "tl.maximum" if kind == "max" else "tl.minimum"
        return f"acc_{kv.name} = {fn}(acc_{kv.name}, {v}, propagate_nan=tl.PropagateNan.ALL)"

    def acc_final(self, kv: _KV) -> str:
        kind, _, mean = kv.reduce
        body = f"tl.{kind}(acc_{kv.name}, axis=1)[:, None]"
        if mean:
            body = f"{body} / {self.dim(self.space.row_len)}"
        return f"{kv.name} = {body}  # {kv.comment}"

    def store(self, j: int, v: Value) -> str:
        kv = self.val[id(v)]
        if not self.row:
            idx, mask, shape = "offs", "mask", "[BLOCK]"
            need = "v"
        elif self.role(v) == "vec":
            idx = f"rows * {self.dim(self.space.row_len)} + cols"
            mask, shape, need = "mask", "[ROWS, BLOCK]", "v"
        else:
            idx, mask, shape, need = "rows", "rmask", "[ROWS, 1]", "r"
        val = kv.name
        if _RANK[kv.role] < _RANK[need]:
            val = f"tl.broadcast_to({val}, {shape})"
        return f"tl.store(out{j} + {_paren(idx)}, {val}.to(out{j}.dtype.element_ty), mask={mask})"

    @staticmethod
    def closure(targets: Sequence[_KV], roles: str) -> set[int]:
        """ids of the values ``targets`` need whose role is in ``roles`` (targets included)."""
        need: set[int] = set()
        stack = list(targets)
        while stack:
            kv = stack.pop()
            if id(kv) in need or kv.role not in roles:
                continue
            need.add(id(kv))
            if kv.reduce is None:
                stack.extend(kv.deps)
        return need

    # -- the kernel -----------------------------------------------------------------------

    def build(self) -> GeneratedKernel:
        g = self.g
        for node in g.nodes:
            self.emit_node(node)
        body = self.pointwise_body() if not self.row else self.row_body()
        ints = list(self.ints.values())
        ins = [f"in{i}" for i in range(len(g.inputs))]
        outs = [f"out{j}" for j in range(len(g.outputs))]
        consts = ["BLOCK"] if not self.row else ["ROWS", "BLOCK", "SINGLE"]
        consts.append("IDX64")
        sig = []
        if ins:
            sig.append("    " + ", ".join(ins) + ",  # " +
                       ", ".join(str(v.type) for v in g.inputs))
        sig.append("    " + ", ".join(outs) + ",  # " + ", ".join(str(v.type) for v in g.outputs))
        if ints:
            sig.append("    " + ", ".join(n for n, _ in ints) + ",  # " +
                       ", ".join(dim_str(d) for _, d in ints))
        sig.append("    " + ", ".join(f"{c}: tl.constexpr" for c in consts) + ",")
        helpers = "".join(HELPERS[h] + "\n" for h in self.helpers)
        work = (f"{len(self.g.outputs)} output(s) over {_shape(self.space.shape)}" if not self.row
                else f"{dim_str(self.space.rows)} rows of {dim_str(self.space.row_len)}")
        doc = (f'"""Generated by transfuse.codegen.triton.gen: {g.label}, a {g.kind} kernel.\n\n'
               f"Work: {work}.\nOps: {', '.join(g.ops)}.\n"
               f"Inputs: {', '.join(str(v.type) for v in g.inputs) or 'none'}.\n"
               f"Outputs: {', '.join(str(v.type) for v in g.outputs)}.\n"
               '"""\n')
        text = (doc + "\nfrom transfuse.codegen.triton import env  # noqa: F401  (the mode first)\n"
                "import triton\nimport triton.language as tl\n\n" + helpers +
                f"\n@triton.jit\ndef {_PLACEHOLDER}(\n" + "\n".join(sig) + "\n):\n" +
                "\n".join(body) + "\n")
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        name = f"{g.label}_{digest}"
        space = self.space
        return GeneratedKernel(
            name=name, label=g.label, kind=g.kind, source=text.replace(_PLACEHOLDER, name),
            input_types=tuple(v.type for v in g.inputs),
            output_types=tuple(v.type for v in g.outputs),
            input_names=tuple(v.name for v in g.inputs),
            output_names=tuple(v.name for v in g.outputs),
            int_args=tuple(ints), numel=space.numel, rows=space.rows, row_len=space.row_len,
            nodes=tuple(_node_line(n) for n in g.nodes), bytes_saved=g.bytes_saved)

    def pointwise_body(self) -> list[str]:
        lines = ["    pid = tl.program_id(0)", "    if IDX64:", "        pid = pid.to(tl.int64)",
                 "    offs = pid * BLOCK + tl.arange(0, BLOCK)",
                 f"    mask = offs < {self.dim(self.space.numel)}"]
        lines += ["    " + self.stmt(kv, True) for kv in self.kvs]
        lines += ["    " + self.store(j, v) for j, v in enumerate(self.g.outputs)]
        return lines

    def row_body(self) -> list[str]:
        n = self.dim(self.space.row_len)
        outs = list(enumerate(self.g.outputs))
        vec_outs = [(j, v) for j, v in outs if self.role(v) == "vec"]
        row_outs = [(j, v) for j, v in outs if self.role(v) != "vec"]
        lines = ["    pid = tl.program_id(0)", "    if IDX64:", "        pid = pid.to(tl.int64)",
                 "    rows = pid * ROWS + tl.arange(0, ROWS)[:, None]",
                 f"    rmask = rows < {self.dim(self.space.rows)}",
                 "    if SINGLE:",
                 "        # -- the whole row in registers --",
                 "        cols = tl.arange(0, BLOCK)[None, :]",
                 f"        cmask = cols < {n}",
                 "        mask = rmask & cmask"]
        lines += ["        " + self.stmt(kv, True) for kv in self.kvs]
        lines += ["        " + self.store(j, v) for j, v in outs]
        lines += ["    else:"]
        # -- looped: row values by level, a pass per level of reductions, then the writes --
        levels = max((kv.level for kv in self.kvs), default=0)
        done: set[int] = set()

        def scalars(level: int) -> list[str]:
            out = []
            for kv in self.kvs:
                if kv.role != "v" and kv.level == level and kv.reduce is None \
                        and id(kv) not in done:
                    out.append("        " + self.stmt(kv, False))
                    done.add(id(kv))
            for j, v in row_outs:
                if self.val[id(v)].level == level:
                    out.append("        " + self.store(j, v))
            return out

        def loop(targets: Sequence[_KV], tail: list[str], head: list[str]) -> list[str]:
            need = self.closure(targets, "v")
            out = ["        " + h for h in head]
            out += [f"        for start in range(0, {n}, BLOCK):",
                    "            cols = start + tl.arange(0, BLOCK)[None, :]",
                    f"            cmask = cols < {n}",
                    "            mask = rmask & cmask"]
            out += ["            " + self.stmt(kv, False) for kv in self.kvs
                    if id(kv) in need and kv.reduce is None]
            out += ["            " + t for t in tail]
            return out

        lines += scalars(0)
        for level in range(1, levels + 1):
            reds = [kv for kv in self.kvs if kv.reduce is not None and kv.level == level]
            if reds:
                srcs = [kv.deps[0] for kv in reds]
                lines += [f"        # -- pass {level}: {', '.join(kv.comment for kv in reds)} --"]
                lines += loop(srcs, [self.acc_update(kv) for kv in reds],
                              [self.acc_init(kv) for kv in reds])
                lines += ["        " + self.acc_final(kv) for kv in reds]
                done.update(id(kv) for kv in reds)
            lines += scalars(level)
        if vec_outs:
            lines += ["        # -- the writes --"]
            lines += loop([self.val[id(v)] for _, v in vec_outs],
                          [self.store(j, v) for j, v in vec_outs], [])
        return lines


_POINTER = {DType.f16: "tl.float16", DType.bf16: "tl.bfloat16", DType.f32: "tl.float32",
            DType.f64: "tl.float64", DType.i64: "tl.int64", DType.i32: "tl.int32",
            DType.i16: "tl.int16", DType.i8: "tl.int8", DType.u8: "tl.uint8",
            DType.bool: "tl.int1"}


def _paren(expr: str) -> str:
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


def _shape(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join(dim_str(d) for d in shape) + "]"


def _node_line(node: Node) -> str:
    outs = ", ".join(f"%{v.name}: {v.type}" for v in node.outputs)
    ins = ", ".join("_" if v is None else f"%{v.name}" for v in node.inputs)
    return f"{outs} = {node.op}({ins})"


def emit_group(group: Group) -> GeneratedKernel:
    """The Triton kernel of ``group`` (see the module docstring)."""
    return _Emitter(group).build()


__all__ = ["GeneratedKernel", "emit_group"]
