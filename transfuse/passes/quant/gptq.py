"""GPTQ: a linear's weight to integer codes, one column at a time, each column's rounding
error spread over the columns not yet quantized (Frantar et al. 2022, arXiv:2210.17323).

Glossary: W [N, K] a weight in torch's linear layout (N outputs, K inputs); X [R, K] the
layer's calibration input rows; H [K, K] = 2/R · XᵀX, the Hessian of the output error
||X Wᵀ - X Ŵᵀ||² in each row of W (every row has the same one).

The algorithm (the paper's Algorithm 1, vectorised over the N rows):

1. H gets a dampening of ``damp`` times the mean of its diagonal on the diagonal (a Hessian
   from few rows is singular or nearly so). A column no calibration row ever touched
   (diag 0, "dead") gets 1 on its diagonal: it is then decoupled from every other column,
   and simply rounded to nearest.
2. U = the upper Cholesky factor of H⁻¹ (float64; everything else float32). Row j of U holds
   what quantizing column j does to the columns after it, U[j, j] its own scale.
3. Columns go left to right in blocks of ``block``: inside a block, column j is rounded with
   its group's scale and zero point, the error e = (w_j - q_j) / U[j, j] is subtracted from
   the block's later columns as e ⊗ U[j, j:]; the block's errors reach the columns after the
   block in one matrix product ("lazy batch" updates: the same result, far fewer memory
   passes).
4. ``act_order``: columns go in order of decreasing diag(H) (most active inputs first, while
   the most later columns can still absorb their error). The codes stay in storage order.

Group scales and zero points (canonical storage, ``transfuse.ir.quant``: one scale per
``group`` consecutive K of the STORED order):

- without ``act_order``: a group's scales are computed from its weights as updated so far
  when the column loop reaches the group's first column (the paper's choice; blocks are
  aligned with groups so that every column of the group has received every earlier update
  at that point — the reference code reads weights that miss the updates of the current
  block when a group starts inside one).
- with ``act_order`` (and ``static_groups``, which it needs): every group's scales are
  computed up front from the un-updated weight, as the reference implementation's
  ``static_groups`` option does; groups of the permuted order would need a per-column group
  index the canonical storage does not have.
- per channel (group == K): one set of scales from the un-updated weight.

Needs: a float weight [N, K], the calibration sum XᵀX [K, K] (float64 preferred) over
``rows`` rows, an integer :class:`~transfuse.ir.types.QuantType` with ``k == K``.
Guarantees: a :class:`~transfuse.ir.quant.QuantizedWeight` in the canonical storage (codes
in storage order, packed), and a dict of what happened (dead columns, the dampening actually
used, the GPTQ loss estimate). Bad inputs raise :class:`~transfuse.errors.PassError` naming
the argument, its shape or dtype, and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from transfuse.errors import PassError
from transfuse.ir.quant import QuantizedWeight, pack_codes, quant_params
from transfuse.ir.types import QuantType
from transfuse.passes.quant.smoothquant import (
    check_float_matrix,
    describe,
    finite,
    fraction,
    positive_int,
)

#: The paper's dampening: 1% of the mean diagonal of H added to the diagonal. It is also a
#: regulariser: the paper calibrates on 128 x 2048 rows; with a few thousand rows (R of 1-5 K)
#: GPTQ fits the calibration rows and can lose to round-to-nearest on other text. Measured on
#: SmolLM2-135M (int4 g64 act_order, output error on 1024 held-out tokens / RTN's), layer 10
#: down_proj (K 1536) with 3249 rows: damp 0.01 1.01, 0.1 0.76, 0.3 0.70; with 1024 rows 1.49,
#: 0.94, 0.81. Callers with small calibration sets should pass a larger ``damp``.
DEFAULT_DAMP = 0.01
#: The paper's lazy-batch width: columns updated together before the rest of W is touched.
DEFAULT_BLOCK = 128
#: When the Cholesky factorisation of the damped H fails (H from too few or degenerate rows),
#: the dampening is multiplied by this and the factorisation tried again ...
DAMP_GROWTH = 10.0
#: ... at most this many times (0.01 -> 0.1 -> 1 -> 10 -> 100 times the mean diagonal; at
#: 100 H is nearly a multiple of the identity, GPTQ degrades to round-to-nearest).
MAX_DAMP_RETRIES = 4


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, rows: int, qtype: QuantType, *,
                  damp: float = DEFAULT_DAMP, block: int = DEFAULT_BLOCK,
                  act_order: bool = False, static_groups: bool = True,
                  integer_zeros: bool = False, name: str = "weight") -> tuple[QuantizedWeight, dict]:
    """Quantize ``w`` [N, K] with GPTQ against the calibration Hessian.

    ``hessian`` is the sum over ``rows`` calibration rows of x xᵀ ([K, K]); the function uses
    H = 2 / rows · hessian. ``damp`` is the fraction of the mean diagonal added to the
    diagonal (raised by :data:`DAMP_GROWTH` while a Cholesky factorisation fails; the value
    used is reported). ``block`` the lazy-batch width (aligned with the groups). ``act_order``
    quantizes the columns by decreasing diag(H); it needs ``static_groups`` (scales from the
    un-updated weight) unless the weight is per channel. ``integer_zeros`` rounds the zero
    points (int8: the kernels' u8 form, see ``ir/quant.quant_params``). Without ``act_order``,
    ``static_groups`` is not used: each group's scales come from its updated weights (the
    paper's way). ``name`` (the layer) goes into error messages.

    Returns the quantized weight and ``{"dead_columns", "damp", "damp_retries", "block",
    "act_order", "static_groups", "loss", "seconds"}``; ``loss`` is the paper's estimate
    ½ Σ ((w - q) / U[j, j])² of the output error the rounding added.
    """
    n, k = _check_inputs(w, hessian, rows, qtype, damp, block, act_order, static_groups, name)
    start = time.perf_counter()
    weight = w.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float64) * (2.0 / rows)

    dead = torch.diagonal(h) == 0
    dead_idx = dead.nonzero().flatten()
    h[dead_idx, dead_idx] = 1.0  # decoupled: its rounding error goes nowhere, none comes in

    group = qtype.group
    per_channel = group == k
    static = per_channel or act_order  # scales from the un-updated weight (see the docstring)
    if static:
        scales, zeros = quant_params(weight, qtype, integer_zeros=integer_zeros)
    else:
        scales = torch.empty(n, qtype.groups, dtype=torch.float32)
        zeros = None if qtype.symmetric else torch.empty(n, qtype.groups, dtype=torch.float32)
        group_qtype = dataclasses.replace(qtype, k=group)  # one group's worth of columns

    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        weight = weight[:, perm]
        h = h[perm][:, perm]
        col_group = (perm // group).tolist()  # storage group of each quantized-order column
    else:
        perm = None
        col_group = [j // group for j in range(k)]

    u, damp_used, retries = _inverse_hessian_factor(h, damp, name)
    block = _aligned_block(block, group, k)
    maxq = float(qtype.levels - 1)
    # The column loop runs on transposed copies, [K, N] / [G, N]: a column of W is then a
    # contiguous row, and the rank-1 updates touch contiguous memory (3-4x faster).
    wt = weight.t().contiguous()  # [K, N], quantized order
    scales_t = scales.t().contiguous()  # [G, N], storage groups
    zeros_t = None if zeros is None else zeros.t().contiguous()
    fixed_zero = float(qtype.default_zero) if qtype.symmetric else None
    codes_t = torch.empty(k, n, dtype=torch.float32)
    loss = 0.0

    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wt[i1:i2]  # a view: updated in place
        u1 = u[i1:i2, i1:i2]
        err1 = torch.empty(i2 - i1, n, dtype=torch.float32)
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % group == 0:  # this group's columns are up to date here
                s_g, z_g = quant_params(wt[j:j + group].t(), group_qtype,
                                        integer_zeros=integer_zeros)
                scales_t[j // group] = s_g[:, 0]
                if zeros_t is not None:
                    zeros_t[j // group] = z_g[:, 0]
            g = col_group[j]
            s = scales_t[g]
            z = zeros_t[g] if zeros_t is not None else fixed_zero
            col = w1[i]
            q = codes_t[j]
            torch.div(col, s, out=q).add_(z).round_().clamp_(0.0, maxq)  # z may be fractional
            e = err1[i]
            torch.sub(q, z, out=e).mul_(s)  # the dequantized column ...
            torch.sub(col, e, out=e).div_(u1[i, i])  # ... its error, scaled by 1 / U[j, j]
            w1[i + 1:].addr_(u1[i, i + 1:], e, alpha=-1.0)
        loss += 0.5 * float(err1.pow(2).sum())
        if i2 < k:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1.0)

    codes = codes_t.t()
    if not static:
        scales = scales_t.t()
        zeros = None if zeros_t is None else zeros_t.t()
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    packed = pack_codes(codes.to(torch.uint8), qtype.bits)
    result = QuantizedWeight(packed, scales.contiguous(),
                             None if zeros is None else zeros.contiguous(), qtype)
    info = {"dead_columns": int(dead_idx.numel()), "damp": damp_used, "damp_retries": retries,
            "block": block, "act_order": act_order, "static_groups": static, "loss": loss,
            "seconds": time.perf_counter() - start}
    return result, info


def _inverse_hessian_factor(h: torch.Tensor, damp: float, name: str
                            ) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor U of (H + damp·mean(diag H)·I)⁻¹ = UᵀU as float32, the damp used
    and how many times it was raised.

    One factorisation instead of the usual three (Cholesky, inverse, Cholesky): with J the
    reversal permutation, J H J = L Lᵀ gives H = M Mᵀ for the upper triangular M = J L J, so
    H⁻¹ = M⁻ᵀ M⁻¹ and U = M⁻¹ = J L⁻¹ J (the same factor to rounding, ~20% faster at K=1536).
    """
    k = h.shape[0]
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(k, dtype=torch.float64)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        damped = h.flip(0, 1)  # J H J (a copy)
        damped.diagonal().add_(damp * mean_diag)  # J's reversal keeps the diagonal a diagonal
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
            if finite(upper):
                return upper.to(torch.float32), damp, attempt
        damp *= DAMP_GROWTH
    raise PassError(f"gptq {name}: the Hessian is not positive definite even with a "
                    f"dampening of {damp / DAMP_GROWTH:g} x its mean diagonal "
                    f"({MAX_DAMP_RETRIES} increases); are the calibration rows finite?")


def _aligned_block(block: int, group: int, k: int) -> int:
    """The lazy-batch width, adjusted so that every group either starts a block or lies
    inside one (then its columns are up to date when the loop reaches its first column)."""
    if group >= k:
        return min(block, k)
    if group <= block:
        return group * (block // group)
    return max(d for d in range(1, block + 1) if group % d == 0)


def _check_inputs(w, hessian, rows, qtype, damp, block, act_order, static_groups,
                  name) -> tuple[int, int]:
    where = f"gptq {name}"
    n, k = check_float_matrix(w, "the weight [N, K]", where)
    if not isinstance(qtype, QuantType) or qtype.scheme != "int":
        raise PassError(f"{where}: GPTQ makes integer codes; qtype must be an 'int' QuantType, "
                        f"got {qtype!r}")
    if qtype.k != k:
        raise PassError(f"{where}: qtype {qtype} is for K={qtype.k}, the weight is [{n}, {k}]")
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
        raise PassError(f"{where}: the Hessian must be [{k}, {k}] (K of the weight [{n}, {k}]), "
                        f"got {describe(hessian)}")
    check_float_matrix(hessian, f"the Hessian [{k}, {k}]", where)
    if not positive_int(rows):
        raise PassError(f"{where}: rows (calibration rows summed into the Hessian) must be a "
                        f"positive int, got {rows!r}")
    if not fraction(damp, 0.0, math.inf) or damp == 0:
        raise PassError(f"{where}: damp must be a positive fraction (0.01 = 1% of the mean "
                        f"diagonal), got {damp!r}")
    if not positive_int(block):
        raise PassError(f"{where}: block must be a positive int, got {block!r}")
    if act_order and not static_groups and qtype.group != k:
        raise PassError(f"{where}: act_order with group {qtype.group} needs static_groups=True "
                        "(groups of the permuted order have no canonical storage)")
    return n, k
