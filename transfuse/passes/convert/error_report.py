"""The error a model-changing conversion introduces, measured and reported the same way by all.

Conversions (``convert.mha-to-gqa``, ``convert.sparse-attention``) change
what the model computes, so each one:

1. converts a *clone* of the graph (:func:`convert_on_clone`),
2. runs the graph before and the clone on sample inputs with the reference
   interpreter (:func:`measure`): the largest absolute error of the first
   output (the logits), the cosine similarity of the two, and top-1 agreement
   (how often the argmax over the last dim is the same),
3. refuses when ``max_error`` is given and exceeded (a near miss such as
   ``convert/gqa: error 0.31 > max_error 0.1``; the graph is not touched),
4. otherwise applies the conversion to the real graph and reports the
   measurement: a note in the pass log and a dict appended to
   ``graph.meta["conversion_errors"]`` (:func:`report`).

Sample inputs come from the option ``sample_inputs`` (the example inputs the
user gave ``optimize``); without them, random ones are made from the graph
input types (:func:`random_inputs`): floats ~N(0, 1), integers in [0, 100),
bools all True, every symbolic dim set to :data:`DEFAULT_SYMBOL_SIZE`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from transfuse.ir.graph import Graph
from transfuse.ir.interpret import interpret
from transfuse.ir.types import DType, eval_dim, free_symbols
from transfuse.passes.base import PassContext

#: the size every symbolic dim gets in random sample inputs
DEFAULT_SYMBOL_SIZE = 16
#: integer inputs (token ids) are drawn from [0, INT_HIGH)
INT_HIGH = 100


@dataclasses.dataclass
class ConversionError:
    """What a conversion did to the outputs, on sample inputs."""

    conversion: str
    max_abs: float
    cosine: float
    top1: float
    samples: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("max_abs", "cosine", "top1"):
            if not math.isfinite(d[k]):
                d[k] = str(d[k])
        return d

    def __str__(self) -> str:
        text = (f"{self.conversion}: max abs logit error {self.max_abs:.4g}, cosine "
                f"{self.cosine:.6f}, top-1 agreement {self.top1:.1%} ({self.samples} positions)")
        for k, v in self.extra.items():
            text += f", {k.replace('_', ' ')} {v}"
        return text


def random_inputs(graph: Graph, seed: int = 0) -> list[torch.Tensor]:
    """Random inputs of the graph's input types (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    env = {s: DEFAULT_SYMBOL_SIZE for v in graph.inputs for s in free_symbols(v.type.shape)}
    out = []
    for v in graph.inputs:
        shape = [eval_dim(d, env) for d in v.type.shape]
        if v.dtype.is_float:
            out.append(torch.randn(shape, generator=gen).to(v.dtype.torch))
        elif v.dtype == DType.bool:
            out.append(torch.ones(shape, dtype=torch.bool))
        else:
            out.append(torch.randint(0, INT_HIGH, shape, generator=gen).to(v.dtype.torch))
    return out


def sample_inputs(graph: Graph, ctx: PassContext) -> list[torch.Tensor]:
    """``ctx.option("sample_inputs")`` when given, else :func:`random_inputs`."""
    given = ctx.option("sample_inputs")
    if given is not None:
        return list(given)
    return random_inputs(graph)


def measure(before: Graph, after: Graph, inputs: Sequence[torch.Tensor],
            conversion: str) -> ConversionError:
    """Compare the first outputs of ``before`` and ``after`` on ``inputs``."""
    a = interpret(before, inputs)[0].detach().double()
    b = interpret(after, inputs)[0].detach().double()
    if a.shape != b.shape:
        return ConversionError(conversion, math.inf, math.nan, math.nan,
                               extra={"detail": f"shape {list(a.shape)} -> {list(b.shape)}"})
    max_abs = float((a - b).abs().max()) if a.numel() else 0.0
    na, nb = a.norm(), b.norm()
    cosine = float((a.flatten() @ b.flatten()) / (na * nb)) if na > 0 and nb > 0 else \
        (1.0 if bool((a == b).all()) else 0.0)
    if a.dim() >= 1 and a.shape[-1] > 1:
        same = a.argmax(-1) == b.argmax(-1)
        top1, samples = float(same.double().mean()), same.numel()
    else:
        top1, samples = math.nan, 0
    return ConversionError(conversion, max_abs, cosine, top1, samples)


def convert_on_clone(graph: Graph, convert: Callable[[Graph], int], inputs: Sequence[torch.Tensor],
                     conversion: str) -> tuple[int, ConversionError | None]:
    """Run ``convert`` (which returns how many sites it changed) on a clone and measure it.

    The clone shares the constants' tensors; a conversion must make new
    constants rather than edit payloads in place.
    """
    trial = graph.clone()
    changed = convert(trial)
    if not changed:
        return 0, None
    return changed, measure(graph, trial, inputs, conversion)


def exceeds(ctx: PassContext, rule: str, err: ConversionError) -> bool:
    """True (and a near miss logged) when ``err.max_abs`` is above option ``max_error``."""
    limit = ctx.option("max_error")
    if limit is None or err.max_abs <= float(limit):
        return False
    ctx.near_miss(rule, None, f"{rule}: error {err.max_abs:.3g} > max_error {float(limit):g}; "
                  f"conversion refused ({err})")
    return True


def report(ctx: PassContext, graph: Graph, err: ConversionError) -> None:
    """Record ``err`` in the pass log and ``graph.meta["conversion_errors"]``."""
    ctx.note(str(err))
    # a new list: graph clones (snapshots) share the old one
    graph.meta["conversion_errors"] = [*graph.meta.get("conversion_errors", []), err.to_json()]


__all__ = ["ConversionError", "random_inputs", "sample_inputs", "measure", "convert_on_clone",
           "exceeds", "report", "DEFAULT_SYMBOL_SIZE"]
