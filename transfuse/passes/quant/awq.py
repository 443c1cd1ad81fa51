"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv:2306.00978) — the two
searches, on plain tensors: a per-input-channel scale, and a per-group clipping ratio.

Glossary: W [N, K] a weight (N outputs, K inputs); several weights that read the same input
(q/k/v, gate/up) are searched together, concatenated along N. X [R, K] sample rows of that
input; G = K / group groups per output channel; Q(·) round-to-nearest quantization
(:func:`transfuse.ir.quant.fake_quantize`).

Scale search (:func:`awq_search_scales`). A few input channels carry most of the activation
magnitude; scaling their weight columns up before rounding (and the input down by the same
factor) gives them a finer grid where it matters. For α on the grid 0, 1/grid, ...,
(grid-1)/grid the scales are ``s = mean|x|^α``, normalised so that sqrt(max(s)·min(s)) = 1
(the geometric middle of the range at 1: columns are scaled up as much as others are scaled
down, so W·s stays in the weight's own range), and the error is the output error of the
concatenated weights on the sample rows, ||X Wᵀ - (X/s) Q(W·s)ᵀ||². α = 0 gives s = 1, plain
round-to-nearest, and the best α is kept only when strictly better: the search is never
worse than RTN on the sample rows.

Clip search (:func:`awq_search_clip`). Shrinking a group's range below its max trades
clipping the few largest weights for a finer grid for all others. Each (output channel,
group) independently takes the ratio in 1, 1 - 1/grid, ..., 1 - max_shrink whose group
contribution to the output, X_g W_gᵀ, changes least on the sample rows (again ratio 1 first,
kept unless another is strictly better). The ratios are ``clip=`` of
:func:`~transfuse.ir.quant.quant_params`.

Errors are measured through the Gram matrix XᵀX when that is cheaper than the rows
themselves (Σ_r (x_r·d)² = d XᵀX dᵀ). The caller applies the scales: W·s for every weight
of the search, 1/s folded into the producer of X; the clip search then runs on the scaled
weight and X/s.

Needs: float tensors, every weight [N_i, K] with the K of X [R, K]; an integer QuantType
with ``k == K``. Guarantees: scales [K] (f32, positive, finite), ratios [N, G] in
[1 - max_shrink, 1]; bad inputs raise :class:`~transfuse.errors.PassError` naming them.
"""

from __future__ import annotations

import math

import torch

from transfuse.errors import PassError
from transfuse.ir.quant import fake_quantize
from transfuse.ir.types import QuantType
from transfuse.passes.quant.smoothquant import (
    check_float_matrix,
    concat_weights,
    fraction,
    positive_int,
)

#: α grid points of the scale search (the paper's 20: α = 0, 0.05, ..., 0.95)
DEFAULT_GRID = 20
#: the clip search shrinks a group's range by at most this fraction (the paper's 0.5)
DEFAULT_MAX_SHRINK = 0.5
#: mean|x| of a channel is floored here before the power, so a channel no sample row used
#: does not get a zero (or, normalised, infinite) scale
MIN_ACT_MEAN = 1e-4


def awq_search_scales(weights: list[torch.Tensor], x: torch.Tensor, qtype: QuantType, *,
                      grid: int = DEFAULT_GRID, name: str = "weights"
                      ) -> tuple[torch.Tensor, dict]:
    """The per-input-channel scales s [K] that minimise the output error of the quantized
    weights on ``x`` (see the module docstring); ``name`` goes into error messages.

    Returns ``(s, {"alpha", "error", "error_rtn", "errors"})``: the chosen α, the output
    mean squared error with s and with plain RTN (α = 0), and the error of every α tried.
    """
    where = f"awq scales {name}"
    w = _check(weights, x, qtype, grid, where)
    xf = x.detach().to(torch.float32)
    out_error = _output_error(xf, w.shape[0])
    act_mean = xf.abs().mean(dim=0).clamp_min(MIN_ACT_MEAN)  # [K]

    errors = []
    best = (math.inf, 0.0, torch.ones_like(act_mean))
    for step in range(grid):
        alpha = step / grid
        s = act_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        d = fake_quantize_int(w * s, qtype).div_(s)
        err = out_error(torch.sub(w, d, out=d))  # W - Q(W·s) / s
        errors.append(err)
        if err < best[0]:
            best = (err, alpha, s)
    error, alpha, scales = best
    return scales, {"alpha": alpha, "error": error, "error_rtn": errors[0], "errors": errors}


def awq_search_clip(w: torch.Tensor, x: torch.Tensor, qtype: QuantType, *,
                    grid: int = DEFAULT_GRID, max_shrink: float = DEFAULT_MAX_SHRINK,
                    name: str = "weight") -> torch.Tensor:
    """Clip ratios [N, G] (f32, in [1 - max_shrink, 1]) for ``quant_params(w, qtype, clip=)``:
    per output channel and group, the ratio on the grid 1, 1 - 1/grid, ..., 1 - max_shrink
    that changes the group's part of the output least on ``x``."""
    where = f"awq clip {name}"
    w = _check([w], x, qtype, grid, where)
    if not fraction(max_shrink, 0.0, 1.0):
        raise PassError(f"{where}: max_shrink must be in [0, 1), got {max_shrink!r}")
    n, k = w.shape
    groups, size = qtype.groups, qtype.group
    xg = x.detach().to(torch.float32).reshape(-1, groups, size).transpose(0, 1)  # [G, R, g]
    gram = xg.transpose(1, 2) @ xg  # [G, g, g]: the group's share of XᵀX

    best_err = torch.full((n, groups), math.inf)
    best_ratio = torch.ones(n, groups)
    for step in range(math.floor(max_shrink * grid + 1e-9) + 1):  # ratio >= 1 - max_shrink
        ratio = 1.0 - step / grid
        d = fake_quantize_int(w, qtype, clip=ratio)
        d = torch.sub(w, d, out=d).reshape(n, groups, size).transpose(0, 1)
        err = ((d @ gram) * d).sum(dim=-1).t()  # [N, G]: Σ_r (x_r,g · d_n,g)²
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def fake_quantize_int(w: torch.Tensor, qtype: QuantType,
                      clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``w`` [N, K] f32 quantized to integer ``qtype`` and back
    (:func:`transfuse.ir.quant.fake_quantize`, which computes it in place)."""
    return fake_quantize(w, qtype, clip)


def _output_error(x: torch.Tensor, n: int):
    """A function D [N, K] -> mean over R rows and N outputs of (x Dᵀ)², through x or its Gram
    matrix, whichever is cheaper."""
    rows, k = x.shape
    denom = float(rows * n)
    if rows <= k:
        return lambda d: float(torch.linalg.vector_norm(x @ d.t()) ** 2) / denom
    gram = x.t() @ x
    return lambda d: float(((d @ gram) * d).sum()) / denom


def _check(weights, x, qtype, grid, where: str) -> torch.Tensor:
    """The weights concatenated along N as f32, after checking them against x and qtype."""
    rows, k = check_float_matrix(x, "the sample rows [R, K]", where)
    if rows < 1:
        raise PassError(f"{where}: no sample rows (x is [0, {k}])")
    if not isinstance(qtype, QuantType) or qtype.scheme != "int":
        raise PassError(f"{where}: AWQ searches integer quantization; qtype must be an 'int' "
                        f"QuantType, got {qtype!r}")
    if qtype.k != k:
        raise PassError(f"{where}: qtype {qtype} is for K={qtype.k}, the sample rows have K={k}")
    if not positive_int(grid):
        raise PassError(f"{where}: grid must be a positive int, got {grid!r}")
    return concat_weights(weights, k, where)
