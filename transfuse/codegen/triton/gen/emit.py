"""Triton source for one fusion group (:func:`emit_group`).

The kernel values come from :mod:`.build` (loads, ops, reductions); this module writes them
into one of two kernel shapes, chosen by the group's space (:mod:`.space`):

- **pointwise**: a 1-D blocked kernel over the flattened output; program ``pid`` computes
  elements ``pid*BLOCK .. +BLOCK`` (``offs``); every value in order, then the stores.
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

from transfuse.codegen.triton.gen.build import RANK, KernelBuilder, KernelValue, paren
from transfuse.codegen.triton.gen.ops import COMPUTE, HELPERS, format_literal
from transfuse.codegen.triton.gen.partition import Group
from transfuse.ir.graph import Node, Value
from transfuse.ir.types import Dim, DType, TensorType, dim_str, free_symbols

_PLACEHOLDER = "KERNEL_NAME"


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


class KernelWriter:
    """Writes the statements of a built kernel into the pointwise or the row kernel."""

    def __init__(self, b: KernelBuilder):
        self.b, self.g, self.space, self.row = b, b.g, b.space, b.row
        self.kvs, self.val, self.dim, self.role = b.kvs, b.val, b.dim, b.role

    # -- statements -----------------------------------------------------------------------

    def stmt(self, kv: KernelValue, single: bool) -> str:
        if kv.reduce is None:
            return f"{kv.name} = {kv.code}  # {kv.comment}"
        kind, ident, mean = kv.reduce
        src = kv.deps[0]
        lit = format_literal(ident, DType.f32)
        body = f"tl.{kind}(tl.where(mask, {src.name}, {lit}), axis=1)[:, None]"
        if mean:
            body = f"{body} / {self.dim(self.space.row_len)}"
        return f"{kv.name} = {body}  # {kv.comment}"

    def acc_init(self, kv: KernelValue) -> str:
        kind, ident, _ = kv.reduce
        ctype = COMPUTE[kv.dtype] if kv.dtype == DType.f64 else "tl.float32"
        ident = format_literal(ident, DType.f32)
        return f"acc_{kv.name} = tl.full([ROWS, BLOCK], {ident}, {ctype})"

    def acc_update(self, kv: KernelValue) -> str:
        kind, ident, _ = kv.reduce
        v = f"tl.where(mask, {kv.deps[0].name}, {format_literal(ident, DType.f32)})"
        if kind == "sum":
            return f"acc_{kv.name} = acc_{kv.name} + {v}"
        fn = "tl.maximum" if kind == "max" else "tl.minimum"
        return f"acc_{kv.name} = {fn}(acc_{kv.name}, {v}, propagate_nan=tl.PropagateNan.ALL)"

    def acc_final(self, kv: KernelValue) -> str:
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
        if RANK[kv.role] < RANK[need]:
            val = f"tl.broadcast_to({val}, {shape})"
        return f"tl.store(out{j} + {paren(idx)}, {val}.to(out{j}.dtype.element_ty), mask={mask})"

    @staticmethod
    def closure(targets: Sequence[KernelValue], roles: str) -> set[int]:
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

    def kernel(self) -> GeneratedKernel:
        g = self.g
        body = self.pointwise_body() if not self.row else self.row_body()
        ints = list(self.b.ints.values())
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
        helpers = "".join(HELPERS[h] + "\n" for h in self.b.helpers)
        work = (f"{len(self.g.outputs)} output(s) over {_shape(self.space.shape)}" if not self.row
                else f"{dim_str(self.space.rows)} rows of {dim_str(self.space.row_len)}")
        doc = (f'"""Generated by transfuse.codegen.triton.gen: {g.label}, a {g.kind} kernel.\n\n'
               f"Work: {work}.\nOps: {', '.join(g.ops)}.\n"
               f"Inputs: {', '.join(str(v.type) for v in g.inputs) or 'none'}.\n"
               f"Outputs: {', '.join(str(v.type) for v in g.outputs)}.\n"
               '"""\n')
        text = (doc + "\nfrom transfuse.codegen.triton import env  # noqa: F401  (the mode first)\n"
                "import triton\nimport triton.language as tl\n\n" + helpers +
                f"\n{jit_decorator([n for n, _ in ints])}\ndef {_PLACEHOLDER}(\n" +
                "\n".join(sig) + "\n):\n" +
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
            nodes=tuple(node_line(n) for n in g.nodes), bytes_saved=g.bytes_saved)

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

        def loop(targets: Sequence[KernelValue], tail: list[str], head: list[str]) -> list[str]:
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


def _shape(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join(dim_str(d) for d in shape) + "]"


def node_line(node: Node) -> str:
    outs = ", ".join(f"%{v.name}: {v.type}" for v in node.outputs)
    ins = ", ".join("_" if v is None else f"%{v.name}" for v in node.inputs)
    return f"{outs} = {node.op}({ins})"


def jit_decorator(ints: Sequence[str]) -> str:
    """``@triton.jit``, telling Triton not to specialise on the values of the symbolic sizes
    (``ints``): a kernel then has one compiled variant per power-of-two bucket (its BLOCK
    constexprs), not one per divisibility class of every length."""
    if not ints:
        return "@triton.jit"
    return f"@triton.jit(do_not_specialize={list(ints)!r})"


def emit_group(group: Group) -> GeneratedKernel:
    """The Triton kernel of ``group`` (see the module docstring)."""
    return KernelWriter(KernelBuilder(group).build()).kernel()


__all__ = ["GeneratedKernel", "KernelWriter", "emit_group", "jit_decorator", "node_line"]
