"""What an attention bias means when it is a function of the token positions alone.

A Hugging Face causal LM captured with ``position_ids`` builds its attention mask
from them (packed-sequence detection: ``pos[k] <= pos[q]`` and "same packed
sequence"), so ``attention.fuse-sdpa`` cannot prove it causal and keeps it as a
bias. ``generation.insert-kv-cache`` replaces that mask by the cached op's own
position rule, which is sound only when the bias is

1. *position-only*: no graph input other than ``position_ids`` reaches it
   (weights, shapes and constants are fine), and
2. *a causal band*: evaluated on one sequence (``position_ids = 0..n-1``) it is
   exactly 0 where key j may be seen by query i (``i - W < j <= i``) and at most
   ``-1e4`` (or ``-inf``) elsewhere, for n up to the longest position the cache
   holds (so the band is fully observed).

:func:`position_only_reason` checks 1, :func:`band_of` evaluates 2 and returns the
window (``None`` for plain causal) or the reason it is not a band.

Glossary: S query positions, T key positions (S = T = n here), W window.
"""

from __future__ import annotations

import torch

from transfuse.ir.graph import Node, Value
from transfuse.ir.ops import get_op

#: a masked score is at most this (HF uses finfo.min or -inf; additive masks use -1e4..-1e9)
MASKED_AT_MOST = -1.0e4
#: query rows checked at once by band_of
ROWS = 1024


def ancestors(v: Value) -> list[Node]:
    """The nodes ``v`` is computed from, in graph order."""
    seen: set[int] = set()
    stack = [v]
    found: list[Node] = []
    while stack:
        x = stack.pop()
        n = x.producer
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        found.append(n)
        stack.extend(i for i in n.inputs if i is not None)
    order = {id(n): i for i, n in enumerate(v.graph.nodes)}
    return sorted(found, key=lambda n: order[id(n)])


def position_only_reason(bias: Value, positions: Value) -> str | None:
    """Why ``bias`` may depend on something other than ``positions`` (None: it does not)."""
    for n in ancestors(bias):
        for i in n.inputs:
            if i is not None and i.is_input and i is not positions:
                return (f"bias %{bias.name} depends on graph input %{i.name} "
                        f"(through {n.op} at {n.source or '?'}), not only on positions")
        if not get_op(n.op).pure:
            return f"bias %{bias.name} is computed by impure {n.op} ({n.source or '?'})"
    if not any(i is positions for n in ancestors(bias) for i in n.inputs):
        return f"bias %{bias.name} does not depend on the positions"
    return None


def evaluate(bias: Value, positions: Value, pos: torch.Tensor, env: dict[str, int]) -> torch.Tensor:
    """``bias`` computed by the reference ops for ``positions = pos`` (other inputs unused)."""
    vals: dict[int, torch.Tensor] = {id(positions): pos}
    nodes = ancestors(bias)
    # uses left per value: a value is dropped after its last use ([n, n] intermediates are large)
    left: dict[int, int] = {}
    for n in nodes:
        for i in n.inputs:
            if i is not None and not i.is_const:
                left[id(i)] = left.get(id(i), 0) + 1
    for n in nodes:
        xs = [None if i is None else (i.const if i.is_const else vals[id(i)]) for i in n.inputs]
        out = get_op(n.op).impl(xs, dict(n.attrs), env)
        del xs
        for i in n.inputs:
            if i is not None and not i.is_const:
                left[id(i)] -= 1
                if left[id(i)] == 0 and i is not bias:
                    vals.pop(id(i), None)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for v, t in zip(n.outputs, outs):
            if id(v) in left or v is bias:  # outputs nothing here reads are not kept
                vals[id(v)] = t
    return vals[id(bias)]


def band_of(bias: Value, positions: Value, seq_symbol: str | None,
            n: int) -> tuple[int | None, str | None]:
    """(window, None) when ``bias`` on positions 0..n-1 is a causal band, else (None, reason).

    The window is None when every earlier key is seen (plain causal, up to n).
    """
    env = {seq_symbol: n} if seq_symbol else {}
    pos = torch.arange(n).reshape([1] * (positions.type.rank - 1) + [n])
    try:
        b = evaluate(bias, positions, pos, env)
    except Exception as e:  # noqa: BLE001 - a bias the reference cannot run is no proof
        return None, f"bias %{bias.name} could not be evaluated on positions 0..{n - 1}: {e}"
    if b.dim() < 2 or any(d != 1 for d in b.shape[:-2]) or tuple(b.shape[-2:]) != (n, n):
        return None, f"bias %{bias.name} of shape {tuple(b.shape)} is not one [S, T] mask"
    b = b.reshape(n, n)
    window = int((b[-1].float() > MASKED_AT_MOST).sum())  # the last query sees the widest band
    j = torch.arange(n)[None, :]
    for lo in range(0, n, ROWS):  # in row blocks: no [n, n] temporaries beside the bias
        rows = b[lo:lo + ROWS].float()
        seen = rows > MASKED_AT_MOST
        if bool((rows.masked_fill(~seen, 0) != 0).any()):
            return None, f"bias %{bias.name} adds nonzero scores: a real bias, not a mask"
        i = torch.arange(lo, lo + rows.shape[0])[:, None]
        if bool((seen & (j > i)).any()):
            return None, f"bias %{bias.name} lets a query see a later key: not causal"
        if not bool((seen == ((j <= i) & (j > i - window))).all()):
            return None, (f"bias %{bias.name} is not a causal band (window {window}) over "
                          "positions")
    return (None if window >= n else window), None


__all__ = ["MASKED_AT_MOST", "ancestors", "position_only_reason", "evaluate", "band_of"]
