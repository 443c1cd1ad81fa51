"""End-to-end accuracy of a quantized graph against its float original.

``compare_logits(before, after, batches)`` runs both graphs with the reference interpreter
on each batch and compares their first outputs: the cosine of the two vectors at each
position (any model); when the output is logits [..., V] of an LM head:

- KL(float || quantized) of the softmax over V, averaged over positions (nats);
- top-1 agreement: how often the argmax over V is the same;
- perplexity of next-token prediction, float and quantized, when the first graph input is
  token ids [B, S] and the logits are [B, S, V] with S > 1 (position s predicts id s + 1).

Everything is accumulated in float64, in chunks of positions (logits of real vocabularies
are large). Glossary: B batch, S sequence, V vocabulary, P = B * S positions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from transfuse.ir.graph import Graph
from transfuse.ir.interpret import interpret
from transfuse.passes.quant.calibrate import progress_bar

#: positions compared at once
CHUNK = 256


@dataclasses.dataclass
class EndToEnd:
    cosine: float  # mean over positions of the cosine of the two outputs' last-dim vectors
    tokens: int
    kl: float | None = None
    top1: float | None = None
    ppl_float: float | None = None
    ppl_quant: float | None = None


def compare_logits(before: Graph, after: Graph, batches: Sequence[Sequence[torch.Tensor]], *,
                   logits: bool = True, progress: bool = True) -> EndToEnd | str:
    """The comparison, or why the first outputs cannot be compared. With ``logits=False``
    (the first output is not made by an LM head: an encoder's hidden states) only the cosine
    is measured."""
    kl_sum = agree = positions = cos_sum = 0.0
    nll_f = nll_q = 0.0
    predicted = 0
    ppl_ok = logits
    for batch in progress_bar(batches, "quantize: evaluating", progress, "batch"):
        a = interpret(before, batch)[0].detach()
        b = interpret(after, batch)[0].detach()
        if not a.dtype.is_floating_point or a.dim() < 1 or a.shape[-1] < 2:
            return f"the first output {a.dtype} {list(a.shape)} is not a float [..., D] tensor"
        if a.shape != b.shape:
            return f"output shapes differ: {list(a.shape)} vs {list(b.shape)}"
        v = a.shape[-1]
        ids = batch[0] if batch else None
        targets = None
        if ppl_ok and isinstance(ids, torch.Tensor) and not ids.dtype.is_floating_point and \
                ids.dim() == 2 and a.dim() == 3 and tuple(a.shape[:2]) == tuple(ids.shape) and \
                ids.shape[1] > 1 and int(ids.max()) < v and int(ids.min()) >= 0:
            # position s predicts token s + 1; the last position predicts nothing
            targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], 1).reshape(-1)
        else:
            ppl_ok = False
        fa, fb = a.reshape(-1, v), b.reshape(-1, v)
        for lo in range(0, fa.shape[0], CHUNK):
            ca, cb = fa[lo:lo + CHUNK].double(), fb[lo:lo + CHUNK].double()
            cos_sum += float(torch.nn.functional.cosine_similarity(ca, cb, dim=-1).sum())
            positions += ca.shape[0]
            if not logits:
                continue
            lp = torch.log_softmax(ca, -1)
            lq = torch.log_softmax(cb, -1)
            kl_sum += float((lp.exp() * (lp - lq)).sum())
            agree += float((lp.argmax(-1) == lq.argmax(-1)).sum())
            if targets is not None:
                t = targets[lo:lo + CHUNK]
                keep = t >= 0
                idx = t[keep].unsqueeze(1)
                nll_f -= float(lp[keep].gather(1, idx).sum())
                nll_q -= float(lq[keep].gather(1, idx).sum())
                predicted += int(keep.sum())
    if positions == 0:
        return "no positions to compare"
    out = EndToEnd(cos_sum / positions, int(positions))
    if logits:
        out.kl, out.top1 = kl_sum / positions, agree / positions
    if ppl_ok and predicted:
        out.ppl_float = math.exp(nll_f / predicted)
        out.ppl_quant = math.exp(nll_q / predicted)
    return out


__all__ = ["EndToEnd", "compare_logits"]
