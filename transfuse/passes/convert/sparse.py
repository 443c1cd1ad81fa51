"""convert.sparse-attention: dense causal attention -> sliding-window or block-sparse (opt-in).

Runs only with the option ``sparse_attention``:

- ``"window:W"`` (rule ``convert/sliding-window``): each query sees the W most
  recent keys, itself included — the attention's ``window`` attribute is set
  to W (kept when it is already smaller);
- ``"block:B,local:L,global:G"`` (rule ``convert/block-sparse``): positions are
  cut in blocks of B; a query in block qb sees key blocks qb-L+1 .. qb (its L
  local blocks, its own included) and blocks 0 .. G-1 (global), always within
  causal. No new attribute: the pattern becomes an additive bias [S, T] (0 or
  -inf) built in the graph from ``arange`` over the symbolic S and T, so it
  works for any length; an existing bias is added to it. One mask serves every
  attention with the same S, T and dtype.

Before / after (block-sparse, B=4, L=2, G=1)::

    %o: f32[B, H, S, D] = attention(%q, %k, %v) {causal}

    %qpos: i64[S] = arange() {start=T-S, end=T}       # absolute query positions
    %kpos: i64[T] = arange() {end=T}
    ... block ids, local and global tests ...
    %keep: bool[S, T] = logical_or(%local, %global)
    %mask: f32[S, T] = where(%keep, %zero, %neg_inf)
    %o: f32[B, H, S, D] = attention(%q, %k, %v, %mask) {causal}

Needs: ``causal=True`` attention (near miss otherwise: a bidirectional
encoder has no "previous" keys). Changes the model's function: the error is
measured on sample inputs and reported like ``convert.mha-to-gqa``
(:mod:`.error_report`), with ``max_error=`` refusing the conversion, plus the
fraction of causal (query, key) pairs kept at the sample length.

Glossary: B block size (in the option), S query length, T key length, W window,
L local blocks, G global blocks, H heads, D head dim. Queries sit at absolute
positions T-S .. T-1 (bottom-right aligned, as the attention op's causal mask).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.interpret import bind_symbols
from transfuse.ir.types import DType, dim_str, dims_equal, eval_dim, normalize_dim
from transfuse.passes.base import Pass, PassContext
from transfuse.passes.convert.error_report import convert_on_clone, exceeds, report, sample_inputs

RULE_WINDOW = "convert/sliding-window"
RULE_BLOCK = "convert/block-sparse"


@dataclasses.dataclass(frozen=True)
class WindowPattern:
    window: int

    rule = RULE_WINDOW

    def __str__(self) -> str:
        return f"window:{self.window}"


@dataclasses.dataclass(frozen=True)
class BlockPattern:
    block: int
    local: int
    global_: int = 0

    rule = RULE_BLOCK

    def __str__(self) -> str:
        return f"block:{self.block},local:{self.local},global:{self.global_}"


def parse_pattern(spec: str) -> WindowPattern | BlockPattern:
    """``"window:W"`` or ``"block:B,local:L,global:G"`` (``global`` optional, default 0)."""
    if not isinstance(spec, str):
        raise ValueError(f"option sparse_attention={spec!r}: expected a string such as "
                         f"'window:256' or 'block:64,local:4,global:1'")
    fields: dict[str, int] = {}
    for part in spec.replace(" ", "").split(","):
        key, sep, value = part.partition(":")
        if not sep or not value.lstrip("-").isdigit():
            raise ValueError(f"option sparse_attention={spec!r}: cannot read {part!r} "
                             f"(expected name:integer)")
        fields[key] = int(value)
    if set(fields) == {"window"}:
        if fields["window"] < 1:
            raise ValueError(f"option sparse_attention={spec!r}: window must be >= 1")
        return WindowPattern(fields["window"])
    if "block" in fields and "local" in fields and set(fields) <= {"block", "local", "global"}:
        b, n_local, n_global = fields["block"], fields["local"], fields.get("global", 0)
        if b < 1 or n_local < 1 or n_global < 0:
            raise ValueError(f"option sparse_attention={spec!r}: need block >= 1, local >= 1, "
                             f"global >= 0")
        return BlockPattern(b, n_local, n_global)
    raise ValueError(f"option sparse_attention={spec!r}: expected 'window:W' or "
                     f"'block:B,local:L,global:G'")


def keep_mask(pattern: WindowPattern | BlockPattern, s: int, t: int) -> torch.Tensor:
    """Bool [S, T]: the (query, key) pairs ``pattern`` keeps within causal, in plain torch."""
    pos = torch.arange(t - s, t)[:, None]
    j = torch.arange(t)[None, :]
    causal = j <= pos
    if isinstance(pattern, WindowPattern):
        return causal & (j > pos - pattern.window)
    qb, kb = pos // pattern.block, j // pattern.block
    return causal & ((kb > qb - pattern.local) | (kb < pattern.global_))


class ConvertSparseAttention(Pass):
    """Make causal attention sliding-window or block-sparse (option ``sparse_attention``)."""

    name = "convert.sparse-attention"
    rules = (RULE_WINDOW, RULE_BLOCK)
    #: the model's function changes; the manager must not compare outputs with before
    changes_function = True

    def run(self, graph: Graph, ctx: PassContext) -> None:
        spec = ctx.option("sparse_attention")
        if spec is None:
            return
        pattern = parse_pattern(spec)
        sites = plan(graph, pattern, ctx)
        if not sites:
            return
        inputs = sample_inputs(graph, ctx)
        _, err = convert_on_clone(graph, lambda g: len(apply(g, plan(g, pattern), pattern)),
                                  inputs, "sparse")
        err.extra.update(pattern=str(pattern), layers=len(sites),
                         causal_pairs_kept=_density(graph, sites[0], pattern, inputs))
        if exceeds(ctx, pattern.rule, err):
            return
        for site, new in zip(sites, apply(graph, sites, pattern)):
            ctx.rewrite(pattern.rule, [site], new)
        report(ctx, graph, err)


def plan(graph: Graph, pattern: WindowPattern | BlockPattern,
         ctx: PassContext | None = None) -> list[Node]:
    """The attentions to convert; near misses for the others."""
    sites = []
    for node in graph.find("attention"):
        if ctx is not None:
            ctx.attempt(pattern.rule)
        if not node.attrs["causal"]:
            if ctx is not None:
                ctx.near_miss(pattern.rule, node, "attention is not causal (causal=True needed: "
                              "a bidirectional attention has no window of previous keys)")
            continue
        if isinstance(pattern, WindowPattern):
            w = node.attrs["window"]
            if w is not None and w <= pattern.window:
                continue  # already at least as narrow
        sites.append(node)
    return sites


def apply(graph: Graph, sites: list[Node], pattern: WindowPattern | BlockPattern) -> list[list[Node]]:
    """Convert ``sites``; returns the new nodes of each (the shared mask's with the first user)."""
    masks: dict[tuple, Value] = {}
    out = []
    for a in sites:
        attrs = dict(a.attrs)
        inputs = list(a.inputs)
        made: list[Node] = []
        if isinstance(pattern, WindowPattern):
            attrs["window"] = pattern.window
        else:
            q, k = a.inputs[0].type, a.inputs[1].type
            s_axis = 2 if attrs["layout"] == "bhsd" else 1
            s, t = q.shape[s_axis], k.shape[s_axis]
            key = (dim_str(s), dim_str(t), q.dtype)
            if key not in masks:
                masks[key], nodes = _build_mask(graph, pattern, s, t, q.dtype, before=a)
                made += nodes
            mask = masks[key]
            while len(inputs) < 4:
                inputs.append(None)
            if inputs[3] is not None:
                add = graph.create("add", [inputs[3], mask], before=a)
                made.append(add)
                mask = add.output
            inputs[3] = mask
        new = graph.create("attention", inputs, attrs, meta=dict(a.meta), before=a)
        graph.replace_all_uses(a.output, new.output)
        graph.erase(a)
        out.append([*made, new])
    return out


def _build_mask(graph: Graph, p: BlockPattern, s, t, dtype: DType,
                before: Node) -> tuple[Value, list[Node]]:
    """Additive [S, T] bias of ``p`` from aranges over the symbolic S and T."""
    nodes: list[Node] = []

    def op(name: str, *inputs: Value, **attrs) -> Value:
        n = graph.create(name, inputs, attrs, before=before)
        nodes.append(n)
        return n.output

    def i64(x: int) -> Value:
        return graph.scalar(x, DType.i64)

    kpos = op("arange", end=t)  # [T]
    # [S] absolute query positions (the last S of the T)
    qpos = kpos if dims_equal(s, t) else op("arange", start=normalize_dim(t - s), end=t)
    block = i64(p.block)
    kblk = op("floor_div", kpos, block)  # [T] key blocks
    qblk = kblk if qpos is kpos else op("floor_div", qpos, block)  # [S] query blocks
    qb = op("reshape", qblk, shape=[s, 1])  # [S, 1]
    kb = op("reshape", kblk, shape=[1, t])  # [1, T]
    keep = op("gt", kb, op("sub", qb, i64(p.local)))  # local: kb > qb - L  -> [S, T]
    if p.global_ > 0:
        keep = op("logical_or", keep, op("lt", kb, i64(p.global_)))  # global: kb < G
    zero = graph.scalar(0.0, dtype)
    neg_inf = graph.scalar(-math.inf, dtype)
    bias = op("where", keep, zero, neg_inf)  # [S, T]
    return bias, nodes


def _density(graph: Graph, attn: Node, pattern, inputs) -> str:
    """The fraction of causal pairs ``pattern`` keeps at the sample length, as text."""
    try:
        env = bind_symbols(graph, inputs)
        s_axis = 2 if attn.attrs["layout"] == "bhsd" else 1
        s = eval_dim(attn.inputs[0].type.shape[s_axis], env)
        t = eval_dim(attn.inputs[1].type.shape[s_axis], env)
    except Exception:  # noqa: BLE001 - a report detail, not worth failing for
        return "?"
    causal = keep_mask(WindowPattern(t), s, t).sum()
    kept = keep_mask(pattern, s, t).sum()
    return f"{float(kept / causal):.1%} at S={s}, T={t}"


__all__ = ["ConvertSparseAttention", "parse_pattern", "keep_mask", "plan", "apply",
           "WindowPattern", "BlockPattern"]
