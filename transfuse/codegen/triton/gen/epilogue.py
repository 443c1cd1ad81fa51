"""GEMM + epilogue: a GEMM and the pointwise fusion group that consumes its result, generated
as one Triton kernel.

A ``linear`` (or a ``matmul`` by a constant 2-D weight: GPT-2's Conv1D) whose result y is read
only by one **pointwise** group, element for element (the group's work is y's M x N elements
and it loads y at its own flat offset), is *paired* with that group (:func:`epilogue_pairs`).
The pair's kernel (:func:`emit_gemm_epilogue`) is the GEMM template's main loop
(:func:`transfuse.codegen.triton.kernels.gemm.gemm_tile`) followed by the group's generated
statements on the [BLOCK_M, BLOCK_N] tile: the flat offset of the pointwise kernel becomes
``rm[:, None] * N + rn[None, :]``, the load of y becomes the accumulator (bias and the
linear's activation applied, rounded to y's dtype as the IR does), every other load and
store is the group's own. So bias adds, activations, casts, residual adds and any other
pointwise chain of the group fuse into the GEMM without a hand-written pattern.

The host runs the pair by rows (:data:`~transfuse.codegen.triton.kernels.gemm.EPILOGUE_ROWS`,
the kernel module's docstring says why): few rows take the fused kernel; many take cuBLAS for
the GEMM and the group's own generated kernel for the epilogue (both kernels are emitted).

Not paired (the reason is kept): y read by a row group (a norm needs the whole row of N, more
than one tile), by several groups or by the host, y a graph output, a weight that is not a
constant 2-D tensor, dtypes the template does not take, a group that reads y broadcast or
reshaped (not at its own offset).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import torch
import triton

from transfuse.codegen.triton.gen.build import KernelBuilder
from transfuse.codegen.triton.gen.emit import (
    GeneratedKernel,
    KernelWriter,
    jit_decorator,
    node_line,
)
from transfuse.codegen.triton.gen.partition import Group, Partition
from transfuse.errors import LoweringError
from transfuse.ir.graph import Node
from transfuse.ir.types import DType, TensorType, dims_equal, eval_dim

#: dtypes the GEMM template takes
GEMM_DTYPES = (DType.f16, DType.bf16, DType.f32)

_PLACEHOLDER = "KERNEL_NAME"


@dataclasses.dataclass(frozen=True)
class GemmEpilogue:
    """A paired GEMM and group: ``gemm`` (the linear / matmul node), ``group``, ``y_index``
    (where y sits in ``group.inputs``)."""

    gemm: Node
    group: Group
    y_index: int


@dataclasses.dataclass(frozen=True)
class GemmKernel:
    """The generated kernel of a :class:`GemmEpilogue` and what the host needs to launch it.

    Arguments, in order: ``x_ptr, w_ptr, b_ptr``, the group's inputs but y (``in<i>``), its
    outputs (``out<j>``), ``M, stride_xm``, the group's int arguments, then the constexprs
    ``HAS_BIAS, ACTIVATION, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, IDX64``.
    ``plain`` is the group's own kernel (the many-rows path)."""

    name: str
    source: str
    plain: GeneratedKernel
    y_index: int
    n: int
    k: int
    layout: str  # "nk" (linear) or "kn" (matmul)
    has_bias: bool
    activation: str | None
    dtype: DType
    int_args: tuple
    output_types: tuple[TensorType, ...]
    nodes: tuple[str, ...]

    def jit(self):
        from transfuse.codegen.triton.gen.cache import load_kernel

        return load_kernel(self.source, self.name)


# -- pairing --------------------------------------------------------------------------------


def gemm_problem(node: Node) -> str | None:
    """Why ``node`` cannot be the GEMM of a pair (None when it can)."""
    if node.op not in ("linear", "matmul"):
        return f"op {node.op!r} is not a GEMM"
    x, w = node.inputs[0], node.inputs[1]
    if not (w.is_const and w.type.rank == 2 and all(isinstance(d, int) for d in w.type.shape)):
        return f"the weight %{w.name} is not a constant 2-D tensor"
    if x.type.dtype not in GEMM_DTYPES or w.type.dtype != x.type.dtype:
        return f"dtypes {x.type.dtype.name} x {w.type.dtype.name}: the template takes f16/bf16/f32"
    if x.type.rank < 1:
        return "x is a scalar"
    if node.op == "matmul" and x.type.rank < 2:
        return "a matmul of a vector"
    bias = node.inputs[2] if node.op == "linear" and len(node.inputs) > 2 else None
    if bias is not None and bias.type.dtype != x.type.dtype:
        return f"bias %{bias.name} is {bias.type.dtype.name}"
    return None


def epilogue_pairs(part: Partition) -> tuple[list[GemmEpilogue], dict[Node, str]]:
    """The pairs of ``part`` and, for each GEMM left alone, why."""
    grouped = {id(n): g for g in part.groups for n in g.nodes}
    outputs = {id(v) for v in part.graph.outputs}
    pairs, why = [], {}
    for node in part.graph.nodes:
        if node.op not in ("linear", "matmul") or id(node) in grouped:
            continue
        reason = gemm_problem(node)
        y = node.outputs[0]
        groups = {id(grouped.get(id(u))): grouped.get(id(u)) for u in y.users}
        if reason is None and id(y) in outputs:
            reason = "its result is a graph output"
        if reason is None and (None in groups.values() or len(groups) != 1):
            reason = "its result is read outside one fusion group"
        if reason is None:
            g = next(iter(groups.values()))
            if g.kind != "pointwise":
                reason = (f"its result feeds a {g.kind} group ({g.label}): a row op needs the "
                          "whole row, more than one tile")
            elif not dims_equal(g.space.numel, y.type.numel()):
                reason = f"group {g.label} works over {g.space.numel} elements, not y's"
            elif any(p.gemm is not None and p.group is g for p in pairs):
                reason = f"group {g.label} already takes another GEMM"
            else:
                pairs.append(GemmEpilogue(node, g, list(g.inputs).index(y)))
                continue
        why[node] = reason
    return pairs, why


# -- the kernel -----------------------------------------------------------------------------


def emit_gemm_epilogue(pair: GemmEpilogue, plain: GeneratedKernel) -> GemmKernel:
    """The source of ``pair``'s kernel (module docstring); LoweringError when the group reads
    y other than at its own offset."""
    node, g = pair.gemm, pair.group
    b = KernelBuilder(g).build()
    y_loads = [(key, kv) for key, kv in b.loads.items() if key[0] == pair.y_index]
    if len(y_loads) != 1 or y_loads[0][0][1] != "offs":
        raise LoweringError(f"gemm epilogue: group {g.label} reads %{node.outputs[0].name} "
                            "other than at its own offset")
    y_kv = y_loads[0][1]
    y_kv.code = "y_acc"
    writer = KernelWriter(b)
    body = ["    " + writer.stmt(kv, True) for kv in b.kvs]
    body += ["    " + writer.store(j, v) for j, v in enumerate(g.outputs)]
    body = [line.replace("[BLOCK]", "[BLOCK_M, BLOCK_N]") for line in body]
    if any(re.search(r"\bBLOCK\b", line) for line in body):  # pragma: no cover - emit's contract
        raise LoweringError(f"gemm epilogue: group {g.label}'s statements use its 1-D block")
    x, wv = node.inputs[0], node.inputs[1]
    if node.op == "linear":
        n, k = wv.type.shape
        layout, stride_wn, stride_wk = "nk", k, 1
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        act = node.attrs.get("activation")
    else:
        k, n = wv.type.shape
        layout, stride_wn, stride_wk = "kn", 1, n
        bias, act = None, None
    ins = [f"in{i}" for i in range(len(g.inputs)) if i != pair.y_index]
    outs = [f"out{j}" for j in range(len(g.outputs))]
    ints = list(b.ints.values())
    consts = ["HAS_BIAS", "ACTIVATION", "UPCAST", "DOT_PRECISION", "BLOCK_M", "BLOCK_N",
              "BLOCK_K", "GROUP_M", "IDX64"]
    sig = ["    x_ptr, w_ptr, b_ptr,  # " + f"{x.type}, {wv.type}, bias"]
    if ins:
        sig.append("    " + ", ".join(ins) + ",")
    sig.append("    " + ", ".join(outs) + ",  # " + ", ".join(str(v.type) for v in g.outputs))
    sig.append("    M, stride_xm,")
    if ints:
        sig.append("    " + ", ".join(name for name, _ in ints) + ",")
    sig.append("    " + ", ".join(f"{c}: tl.constexpr" for c in consts) + ",")
    head = [
        "    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)",
        f"    acc = gemm_tile(x_ptr, w_ptr, M, N, K, stride_xm, {stride_wn}, {stride_wk}, "
        "pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION)",
        "    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
        "    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
        "    Y_T: tl.constexpr = x_ptr.dtype.element_ty",
        "    y_acc = finish_tile(acc, b_ptr, rn, rn < N, Y_T, HAS_BIAS, ACTIVATION)",
        "    if IDX64:",
        "        rm = rm.to(tl.int64)",
        "    offs = rm[:, None] * N + rn[None, :]",
        "    mask = (rm < M)[:, None] & (rn < N)[None, :]",
    ]
    helpers = "".join(_helper(h) + "\n" for h in b.helpers)
    doc = (f'"""Generated by transfuse.codegen.triton.gen.epilogue: {node.op} then {g.label}.\n\n'
           f"GEMM: {x.type} x {wv.type} ({layout}){' + bias' if bias is not None else ''}"
           f"{f' then {act}' if act else ''}; epilogue ops: {', '.join(g.ops)}.\n"
           f"Outputs: {', '.join(str(v.type) for v in g.outputs)}.\n"
           '"""\n')
    text = (doc + "\nfrom transfuse.codegen.triton import env  # noqa: F401  (the mode first)\n"
            "import triton\nimport triton.language as tl\n\n"
            "from transfuse.codegen.triton.kernels.gemm import gemm_tile\n"
            "from transfuse.codegen.triton.kernels.quant_gemm import finish_tile, tile_ids\n\n"
            f"N = tl.constexpr({n})\nK = tl.constexpr({k})\n\n" + helpers +
            f"\n{jit_decorator(['M', *(n for n, _ in ints)])}\ndef {_PLACEHOLDER}(\n" +
            "\n".join(sig) + "\n):\n" +
            "\n".join(head + body) + "\n")
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    name = f"gemm_{g.label.removeprefix('fused_')}_{digest}"
    return GemmKernel(name=name, source=text.replace(_PLACEHOLDER, name), plain=plain,
                      y_index=pair.y_index, n=n, k=k, layout=layout,
                      has_bias=bias is not None, activation=act, dtype=x.type.dtype,
                      int_args=tuple(ints), output_types=tuple(v.type for v in g.outputs),
                      nodes=(node_line(node),) + tuple(plain.nodes))


def _helper(name: str) -> str:
    from transfuse.codegen.triton.gen.ops import HELPERS

    return HELPERS[name]


# -- launching ------------------------------------------------------------------------------


def run_gemm_epilogue(kernel: GemmKernel, x: torch.Tensor, w: torch.Tensor,
                      bias: torch.Tensor | None, inputs: list, outs: list[torch.Tensor],
                      env: dict[str, int]) -> list[torch.Tensor]:
    """Launch the fused kernel: x [..., K], the constant weight, the group's other inputs
    (``inputs`` without y, in order), ``outs`` contiguous of the group's output types."""
    from transfuse.codegen.triton import env as mode
    from transfuse.codegen.triton.kernels import gemm as template
    from transfuse.codegen.triton.kernels.quant_gemm import GROUP_M, dot_precision

    x2 = x.reshape(-1, kernel.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return outs
    dtype = kernel.dtype.torch
    bm, bn, bk, warps, stages = template.pick_config(m, dtype)
    ins = [t if t.is_contiguous() else t.contiguous() for t in inputs]
    ints = [eval_dim(d, env) for _, d in kernel.int_args]
    big = m * kernel.n >= 2**31 or any(t.numel() >= 2**31 for t in ins + outs)
    grid = (triton.cdiv(m, bm) * triton.cdiv(kernel.n, bn),)
    kernel.jit()[grid](
        x2, w, bias if bias is not None else x2, *ins, *outs, m, x2.stride(0), *ints,
        HAS_BIAS=kernel.has_bias, ACTIVATION=kernel.activation or "",
        UPCAST=mode.interpreting() or dtype == torch.float32,
        DOT_PRECISION=dot_precision(dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=GROUP_M, IDX64=big, num_warps=warps, num_stages=stages)
    return outs


def gemm_compile_spec(kernel: GemmKernel, rows: int, env: dict[str, int] | None = None):
    """A :class:`~transfuse.codegen.triton.kernels.spec.KernelSpec` of ``kernel`` launched
    for ``rows`` rows at the symbols ``env``, for the GPU compile check."""
    from transfuse.codegen.triton.gen.cache import load_module, module_name
    from transfuse.codegen.triton.gen.launch import POINTER_SIG
    from transfuse.codegen.triton.kernels import gemm as template
    from transfuse.codegen.triton.kernels.quant_gemm import GROUP_M
    from transfuse.codegen.triton.kernels.spec import KernelSpec

    load_module(kernel.source)
    dtype = kernel.dtype.torch
    bm, bn, bk, warps, stages = template.pick_config(rows, dtype)
    t = POINTER_SIG[kernel.dtype]
    sig = {"x_ptr": t, "w_ptr": t, "b_ptr": t}
    ins = [ty for i, ty in enumerate(kernel.plain.input_types) if i != kernel.y_index]
    sig.update({f"in{i}": POINTER_SIG[ty.dtype] for i, ty in zip(
        [i for i in range(len(kernel.plain.input_types)) if i != kernel.y_index], ins)})
    sig.update({f"out{j}": POINTER_SIG[ty.dtype] for j, ty in enumerate(kernel.output_types)})
    sig.update({"M": "i32", "stride_xm": "i32"})
    sig.update({name: "i32" for name, _ in kernel.int_args})
    const = {"HAS_BIAS": kernel.has_bias, "ACTIVATION": kernel.activation or "",
             "UPCAST": dtype == torch.float32,
             "DOT_PRECISION": "tf32x3" if dtype == torch.float32 else "ieee",
             "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M, "IDX64": False}
    sig.update({c: "constexpr" for c in const})
    return KernelSpec(f"{module_name(kernel.source)}:{kernel.name}",
                      f"{kernel.name}[{template.regime(rows)}]", sig, const, warps, stages)


__all__ = ["GemmEpilogue", "GemmKernel", "epilogue_pairs", "emit_gemm_epilogue", "gemm_problem",
           "run_gemm_epilogue", "gemm_compile_spec", "GEMM_DTYPES"]
