"""``einsum`` as IR ops, for both frontends (aten ``einsum``/``outer``, ONNX ``Einsum``).

The equation is parsed first (:func:`parse_einsum`, pure: it raises before any node is made),
then the operands are contracted pairwise, left to right (:func:`emit_einsum`). Each pair
becomes the spelling the rest of the compiler already knows:

- letters only one operand has and nothing later needs are summed out first (``reduce_sum``);
- no contracted letter: a broadcast ``mul`` (``i,j->ij`` is ``a[:, None] * b[None, :]``, the
  rotary-frequency outer product);
- a 2-D constant with one contracted and one free letter: ``linear`` (``bsd,od->bso`` is
  ``nn.Linear``; a ``do`` weight is permuted to ``od`` once);
- otherwise ``matmul`` of ``permute(a, batch + free_a + contracted)`` and
  ``permute(b, batch + contracted + free_b)``, reshaped only where several letters share a
  side. ``bhqd,bhkd->bhqk`` is exactly ``matmul(q, permute(k, [0, 1, 3, 2]))``, the form the
  attention passes match for ``q @ k.transpose(-2, -1)``; ``bhqk,bhkd->bhqd`` is
  ``matmul(p, v)`` with no extra node;
- a final ``permute`` to the output order (none when already in order).

Refused (:class:`~transfuse.errors.UnsupportedOpError`, the caller keeps a fallback or names
the node): a letter repeated within one operand (diagonals, traces) and a letter whose sizes
differ between operands (broadcasting). A malformed equation is a
:class:`~transfuse.errors.CaptureError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transfuse.errors import CaptureError, UnsupportedOpError
from transfuse.frontend.build import to_shape
from transfuse.ir.graph import Value
from transfuse.ir.types import dim_product, dims_equal


@dataclasses.dataclass(frozen=True)
class EinsumPlan:
    """A parsed equation: one letter string per operand, the output letters, letter sizes."""

    terms: tuple[str, ...]
    out: str
    sizes: dict[str, Any]


def parse_einsum(equation: str, operands: list[Value]) -> EinsumPlan:
    """Check ``equation`` against the operands; ellipses become spare upper-case letters."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        raise CaptureError(f"einsum {eq!r} names {len(terms)} operands, got {len(operands)}")
    spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)
    ell: list[str] | None = None
    expanded = []
    for term, v in zip(terms, operands):
        if "..." in term:
            n = v.type.rank - (len(term) - 3)
            if ell is None:
                ell = [next(spare) for _ in range(max(n, 0))]
            if n != len(ell):
                raise UnsupportedOpError(f"einsum {eq!r}: ellipses of different ranks")
            term = term.replace("...", "".join(ell))
        if len(term) != v.type.rank or not term.isalpha():
            raise CaptureError(
                f"einsum {eq!r}: term {term!r} does not match an operand of rank {v.type.rank}"
            )
        if len(set(term)) != len(term):
            raise UnsupportedOpError(
                f"einsum {eq!r}: a letter repeats within one operand (diagonals are not supported)"
            )
        expanded.append(term)
    if arrow:
        out = out.replace("...", "".join(ell or []))
    else:
        counts = {c: sum(t.count(c) for t in expanded) for c in "".join(expanded)}
        free = sorted(c for c, n in counts.items() if n == 1 and c not in (ell or []))
        out = "".join(ell or []) + "".join(free)
    if len(set(out)) != len(out) or any(c not in "".join(expanded) for c in out):
        raise CaptureError(f"einsum {eq!r}: bad output letters {out!r}")
    sizes: dict[str, Any] = {}
    for term, v in zip(expanded, operands):
        for c, d in zip(term, v.shape):
            if c in sizes and not dims_equal(sizes[c], d):
                raise UnsupportedOpError(
                    f"einsum {eq!r}: letter {c!r} has sizes {sizes[c]} and {d} "
                    "(broadcasting between operands is not supported)"
                )
            sizes.setdefault(c, d)
    return EinsumPlan(tuple(expanded), out, sizes)


def emit_einsum(cx, plan: EinsumPlan, operands: list[Value]) -> Value:
    """The einsum of ``operands`` as IR nodes made through ``cx.op`` (see the module doc)."""
    items = list(zip(plan.terms, operands))
    term, v = items[0]
    later = "".join(plan.terms[1:]) + plan.out
    term, v = _sum_out(cx, term, v, later)
    for i in range(1, len(items)):
        tb, b = items[i]
        keep = "".join(plan.terms[i + 1 :]) + plan.out
        tb, b = _sum_out(cx, tb, b, term + keep)
        term, v = _pair(cx, plan, term, v, tb, b, keep)
    return permute_to(cx, v, term, plan.out)


def permute_to(cx, v: Value, have: str, want: str) -> Value:
    """``v`` (axes named by the letters ``have``) with its axes in the order ``want``."""
    perm = [have.index(c) for c in want]
    return v if perm == list(range(len(perm))) else cx.op("permute", v, perm=perm)


def _sum_out(cx, term: str, v: Value, needed: str) -> tuple[str, Value]:
    axes = [k for k, c in enumerate(term) if c not in needed]
    if not axes:
        return term, v
    kept = "".join(c for c in term if c in needed)
    return kept, cx.op("reduce_sum", v, axes=axes, keepdim=False)


def _pair(cx, plan: EinsumPlan, ta: str, a: Value, tb: str, b: Value, keep: str):
    """Contract two operands; the letters of the result and its value."""
    size = plan.sizes
    if _is_weight(a, ta, tb, keep) and not _is_weight(b, tb, ta, keep):
        ta, a, tb, b = tb, b, ta, a  # the constant weight on the right
    batch = [c for c in ta if c in tb and c in keep]
    contract = [c for c in ta if c in tb and c not in keep]
    afree = [c for c in ta if c not in tb]
    bfree = [c for c in tb if c not in ta]
    if not contract:  # an outer product over the free letters: broadcast multiply
        a2 = permute_to(cx, a, ta, "".join(batch + afree))
        b2 = permute_to(cx, b, tb, "".join(batch + bfree))
        bd = [size[c] for c in batch]
        a2 = to_shape(cx, a2, bd + [size[c] for c in afree] + [1] * len(bfree))
        b2 = to_shape(cx, b2, bd + [1] * len(afree) + [size[c] for c in bfree])
        return "".join(batch + afree + bfree), cx.op("mul", a2, b2)
    if _is_weight(b, tb, ta, keep):
        w = permute_to(cx, b, tb, "".join(bfree + contract))  # [N, K]
        x = permute_to(cx, a, ta, "".join(afree + contract))
        return "".join(afree + bfree), cx.op("linear", x, w, None)
    a2 = permute_to(cx, a, ta, "".join(batch + afree + contract))
    b2 = permute_to(cx, b, tb, "".join(batch + contract + bfree))
    bd = [size[c] for c in batch]
    k = dim_product([size[c] for c in contract])
    n = dim_product([size[c] for c in bfree])
    free_a = [size[c] for c in afree]
    # with no batch letters matmul broadcasts a's leading free dims over a 2-D b: no reshape
    lead = free_a if not batch and afree else bd + [dim_product(free_a)]
    y = cx.op("matmul", to_shape(cx, a2, lead + [k]), to_shape(cx, b2, bd + [k, n]))
    y = to_shape(cx, y, bd + free_a + [size[c] for c in bfree])
    return "".join(batch + afree + bfree), y


def _is_weight(w: Value, tw: str, tx: str, keep: str) -> bool:
    """``w`` is a 2-D constant with one letter contracted against ``tx`` and one kept, and
    ``tx`` has a free letter of its own: ``x @ w`` is a ``linear``."""
    if not (w.is_const and w.type.rank == 2):
        return False
    contracted = [c for c in tw if c in tx and c not in keep]
    shared = [c for c in tw if c in tx]
    return len(contracted) == 1 and shared == contracted and any(c not in tw for c in tx)


__all__ = ["EinsumPlan", "parse_einsum", "emit_einsum", "permute_to"]
