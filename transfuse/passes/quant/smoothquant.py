"""SmoothQuant: move activation outliers into the weights before W8A8 quantization (Xiao et al.
2022, arXiv:2211.10438), on plain tensors; and the checks every quantization algorithm here
runs on its tensor arguments.

Glossary: X [R, K] the input of one or more linears (several weights that read the same X —
q/k/v, gate/up — share one set of scales); W_i [N_i, K] their weights; s [K] the smoothing
scales. X Wᵀ = (X / s) (W · s)ᵀ exactly, for any positive s; the point is to pick s so that
both X / s and W · s quantize well. A few channels of X are 10-100x larger than the rest,
which wastes a per-token activation scale; the weights have no such channels. With
migration strength α:

    s_j = max|X_j|^α / max_i |W_ij|^(1-α)

α = 0.5 splits the range evenly (the paper's default for most models); α → 1 moves more of
it into the weights. The caller multiplies every weight's columns by s and folds 1/s into
the producer of X (a norm's weight, or a ``mul`` node).

Needs: per-channel max|x| over the calibration rows [K], the weights sharing that input.
Guarantees: s [K] f32, positive and finite; a channel with no activation or no weight
(max 0: nothing to migrate) gets s = 1. Bad inputs raise :class:`~transfuse.errors.PassError`.
"""

from __future__ import annotations

import math

import torch

from transfuse.errors import PassError

#: the default migration strength (the paper's α = 0.5)
DEFAULT_ALPHA = 0.5
#: both maxima are floored here before the powers, and s never goes below it
MIN_RANGE = 1e-5

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor],
                  alpha: float = DEFAULT_ALPHA, *, name: str = "weights") -> torch.Tensor:
    """Migration scales s [K]: ``max|X_j|^α / max_i |W_ij|^(1-α)`` over the concatenated
    ``weights``; ``name`` (the layers) goes into error messages."""
    where = f"smoothquant {name}"
    if (not isinstance(act_absmax, torch.Tensor) or act_absmax.dim() != 1
            or act_absmax.dtype not in FLOAT_DTYPES):
        raise PassError(f"{where}: act_absmax must be a 1-D float tensor [K] (max |x| per input "
                        f"channel), got {describe(act_absmax)}")
    if not finite(act_absmax) or bool((act_absmax < 0).any()):
        raise PassError(f"{where}: act_absmax [{act_absmax.shape[0]}] must be finite and >= 0")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise PassError(f"{where}: the migration strength alpha must be in [0, 1], got "
                        f"{alpha!r}")
    w = concat_weights(weights, act_absmax.shape[0], where)
    act = act_absmax.detach().to(torch.float32)
    wmax = w.abs().amax(dim=0)  # [K]
    s = act.clamp_min(MIN_RANGE).pow(alpha) / wmax.clamp_min(MIN_RANGE).pow(1.0 - alpha)
    s = torch.where((act == 0) | (wmax == 0), torch.ones_like(s), s)
    return s.clamp_min(MIN_RANGE)


#: the migration strengths :func:`search_alpha` tries
ALPHA_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(13))  # 0.30 .. 0.90


def search_alpha(act_absmax: torch.Tensor, weights: list[torch.Tensor], x: torch.Tensor,
                 fake_w8a8, grid: tuple[float, ...] = ALPHA_GRID, *,
                 name: str = "weights") -> tuple[torch.Tensor, dict]:
    """The migration strength that minimises the W8A8 output error of ``weights`` on the sample
    rows ``x`` [R, K] (the same rule as AWQ's scale search, with SmoothQuant's scales): for each
    α in ``grid``, ``fake_w8a8(x / s, W · s)`` (the caller's fake-quantized product: per-token
    u8 activations, int8 per-channel weights) against ``x Wᵀ``. Returns (s [K], {"alpha",
    "error", "error_by_alpha"}). α is chosen on calibration rows, never on evaluation data
    (SmolLM2-135M: the best α per layer ranges over the grid; one global α of 0.5 costs +2.1%
    perplexity, a searched α per layer much less, see the note of issue 13)."""
    w = concat_weights(weights, act_absmax.shape[0], name)
    check_float_matrix(x, "sample rows", name)
    xf = x.to(torch.float32)
    ref = xf @ w.t()
    best, errors = None, {}
    for alpha in grid:
        s = smooth_scales(act_absmax, weights, alpha, name=name)
        err = float(((fake_w8a8(xf / s, w * s) - ref) ** 2).mean())
        errors[alpha] = err
        if best is None or err < best[1]:
            best = (alpha, err, s)
    return best[2], {"alpha": best[0], "error": best[1], "error_by_alpha": errors}


def concat_weights(weights: list[torch.Tensor], k: int, where: str) -> torch.Tensor:
    """The weights that share one input of ``k`` features, checked (a non-empty list of finite
    2-D float tensors [N_i, k]) and concatenated along N as f32 [ΣN_i, k]; PassError naming
    ``where`` and the offending weight otherwise."""
    if not isinstance(weights, (list, tuple)) or not weights:
        raise PassError(f"{where}: expected a non-empty list of weights [N_i, {k}], got "
                        f"{describe(weights)}")
    for i, w in enumerate(weights):
        if (not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in FLOAT_DTYPES
                or w.shape[1] != k):
            raise PassError(f"{where}: weight {i} must be a 2-D float tensor [N, {k}] (K of the "
                            f"shared input), got {describe(w)}")
    out = torch.cat([w.detach().to(torch.float32) for w in weights])
    if not finite(out):
        bad = next(i for i, w in enumerate(weights) if not finite(w))
        raise PassError(f"{where}: weight {bad} {describe(weights[bad])} has NaN or infinite "
                        "values")
    return out


def check_float_matrix(t: object, what: str, where: str) -> tuple[int, int]:
    """(rows, columns) of ``t`` when it is a finite 2-D float tensor, else PassError naming
    ``what`` and ``where``."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in FLOAT_DTYPES:
        raise PassError(f"{where}: {what} must be a 2-D float tensor, got {describe(t)}")
    if not finite(t):
        raise PassError(f"{where}: {what} {describe(t)} has NaN or infinite values")
    return tuple(t.shape)


def finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t`` (through a float64 sum: one pass, no temporary, ~20x
    cheaper than ``isfinite(t).all()``; a float32/16 tensor cannot overflow it)."""
    return math.isfinite(float(t.sum(dtype=torch.float64)))


def describe(t: object) -> str:
    """``float32[576, 64]`` for a tensor, the type's name for anything else (for messages)."""
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
    return type(t).__name__


def positive_int(v: object) -> bool:
    """True for an int >= 1 (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def fraction(v: object, low: float, high: float) -> bool:
    """True for a finite real number in [low, high)."""
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and low <= v < high)
