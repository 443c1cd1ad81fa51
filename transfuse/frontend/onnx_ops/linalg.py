"""ONNX matrix products: MatMul/Gemm (a constant 2-D weight -> ``linear``), Einsum."""

from __future__ import annotations

from typing import Any

from transfuse.frontend.build import to_shape
from transfuse.frontend.onnx_ops.helpers import weight_t
from transfuse.frontend.onnx_ops.registry import onnx_op
from transfuse.ir.graph import Value
from transfuse.ir.types import dim_product, dims_equal

# -- matrix products ------------------------------------------------------------------------



@onnx_op("MatMul")
def _matmul(cx, node):
    a, b = cx.value(node.input(0)), cx.value(node.input(1))
    if b.type.rank == 2 and a.type.rank >= 1 and a.dtype == b.dtype:
        p = b.producer
        if b.is_const:
            return [cx.op("linear", a, weight_t(cx, b), None)]
        if p is not None and p.op == "permute" and p.inputs[0].is_const:  # x @ W.T
            return [cx.op("linear", a, p.inputs[0], None)]
    return [cx.op("matmul", a, b)]


@onnx_op("Gemm")
def _gemm(cx, node):
    a, b = cx.value(node.input(0)), cx.value(node.input(1))
    if a.type.rank != 2 or b.type.rank != 2:
        raise cx.fail(f"Gemm takes 2-D A and B, got {a.type} and {b.type}")
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    if node.attr("transA", 0):
        a = cx.op("permute", a, perm=[1, 0])
    c = cx.value(node.input(2)) if node.has_input(2) else None
    n = b.shape[0] if node.attr("transB", 0) else b.shape[1]
    bias = None
    if c is not None and beta == 1.0 and alpha == 1.0 and c.type.rank <= 2 and \
            c.type.rank >= 1 and dims_equal(c.shape[-1], n) and (c.type.rank == 1 or
                                                                 c.shape[0] == 1):
        bias, c = to_shape(cx, c, [n]), None
    if b.is_const:
        w = b if node.attr("transB", 0) else weight_t(cx, b)
        y = cx.op("linear", a, w, bias)
    else:
        bt = cx.op("permute", b, perm=[1, 0]) if node.attr("transB", 0) else b
        y = cx.op("matmul", a, bt)
        if bias is not None:
            y = cx.op("add", y, bias)
    if alpha != 1.0:
        y = cx.op("mul", y, cx.const(alpha, y.dtype))
    if c is not None and beta != 0.0:
        if beta != 1.0:
            c = cx.op("mul", c, cx.const(beta, c.dtype))
        y = cx.op("add", y, c)
    return [y]


@onnx_op("Einsum")
def _einsum(cx, node):
    """Einsum of one operand (sums, transposes) or two (batched matmul: batch letters, free
    letters of each side and contracted letters -> permute, reshape, matmul, reshape,
    permute). Repeated letters in one operand (diagonals) and three or more operands are
    unsupported."""
    eq = str(node.attr("equation", "")).replace(" ", "")
    vals = [cx.value(node.input(i)) for i in range(len(node.inputs)) if node.has_input(i)]
    terms, out = _einsum_terms(cx, eq, vals)
    size: dict[str, Any] = {}
    for term, v in zip(terms, vals):
        for c, d in zip(term, v.shape):
            if c in size and not dims_equal(size[c], d):
                raise cx.unsupported(f"Einsum {eq!r}: letter {c!r} has sizes {size[c]} and {d} "
                                     "(broadcasting between operands is not supported)")
            size.setdefault(c, d)
    # letters only one operand has and the output lacks are summed out first
    reduced = []
    for i, (term, v) in enumerate(zip(terms, vals)):
        others = "".join(t for j, t in enumerate(terms) if j != i) + out
        axes = [k for k, c in enumerate(term) if c not in others]
        if axes:
            v = cx.op("reduce_sum", v, axes=axes, keepdim=False)
            term = "".join(c for k, c in enumerate(term) if k not in axes)
        reduced.append((term, v))
    if len(reduced) == 1:
        term, v = reduced[0]
        return [_permute_to(cx, v, term, out)]
    (ta, a), (tb, b) = reduced
    batch = [c for c in out if c in ta and c in tb]
    contract = [c for c in ta if c in tb and c not in out]
    afree = [c for c in ta if c not in tb]
    bfree = [c for c in tb if c not in ta]
    a2 = _permute_to(cx, a, ta, "".join(batch + afree + contract))
    b2 = _permute_to(cx, b, tb, "".join(batch + contract + bfree))
    bdims = [size[c] for c in batch]
    m = dim_product([size[c] for c in afree])
    k = dim_product([size[c] for c in contract])
    n = dim_product([size[c] for c in bfree])
    y = cx.op("matmul", to_shape(cx, a2, bdims + [m, k]), to_shape(cx, b2, bdims + [k, n]))
    y = to_shape(cx, y, bdims + [size[c] for c in afree + bfree])
    return [_permute_to(cx, y, "".join(batch + afree + bfree), out)]


def _einsum_terms(cx, eq: str, vals: list[Value]) -> tuple[list[str], str]:
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(vals):
        raise cx.fail(f"Einsum {eq!r} names {len(terms)} operands, got {len(vals)}")
    if len(vals) > 2:
        raise cx.unsupported(f"Einsum {eq!r}: {len(vals)} operands (transfuse lowers one or two)")
    spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)
    ell: list[str] | None = None
    expanded = []
    for term, v in zip(terms, vals):
        if "..." in term:
            n = v.type.rank - (len(term) - 3)
            if ell is None:
                ell = [next(spare) for _ in range(max(n, 0))]
            if n != len(ell):
                raise cx.unsupported(f"Einsum {eq!r}: ellipses of different ranks")
            term = term.replace("...", "".join(ell))
        if len(term) != v.type.rank or not term.isalpha():
            raise cx.fail(f"Einsum {eq!r}: term {term!r} does not match an operand of rank "
                          f"{v.type.rank}")
        if len(set(term)) != len(term):
            raise cx.unsupported(f"Einsum {eq!r}: a letter repeats within one operand "
                                 "(diagonals are not supported)")
        expanded.append(term)
    if arrow:
        out = out.replace("...", "".join(ell or []))
    else:
        counts = {c: sum(t.count(c) for t in expanded) for c in "".join(expanded)}
        out = "".join(ell or []) + "".join(sorted(c for c, n in counts.items()
                                                  if n == 1 and c not in (ell or [])))
    if len(set(out)) != len(out) or any(c not in "".join(expanded) for c in out):
        raise cx.fail(f"Einsum {eq!r}: bad output letters {out!r}")
    return expanded, out


def _permute_to(cx, v: Value, have: str, want: str) -> Value:
    perm = [have.index(c) for c in want]
    return v if perm == list(range(len(perm))) else cx.op("permute", v, perm=perm)
