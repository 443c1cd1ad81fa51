"""convert.mha-to-gqa: fewer key/value heads by mean-pooling their projections (opt-in).

Runs only with the option ``convert_gqa=G`` (G = 1 is multi-query attention).
Changes the model's function: the error it introduces is measured and
reported (:mod:`.error_report`), and with ``max_error=`` the conversion is
refused when the logits move further than that.

Rewrite (rule id ``convert/gqa``): for each ``attention`` whose K and V come
from a projection through ``reshape [B, T, Hkv, D]`` and ``permute [0, 2, 1, 3]``
(layout ``bhsd``; for ``bshd`` the reshape feeds attention directly), with
optionally head-wise ops in between (RoPE: per-head elementwise ops, slices
and concats along D, tables broadcast over heads), the Hkv heads are put in G
groups of Hkv/G consecutive heads and the projection rows of each group are
averaged (the "mean pooling" of Ainslie et al. 2023, *GQA: Training
Generalized Multi-Query Transformer Models from Multi-Head Checkpoints*)::

    W_k [Hkv*D, K] -> reshape [G, Hkv/G, D, K] -> mean over Hkv/G -> [G*D, K]

(bias likewise). The reshape becomes [B, T, G, D], the ops after it are
retyped, and attention gets ``kv_heads=G``. The projection is either a
``linear`` or one segment of a merged projection's ``split``
(``fusion.merge-projections``); the merged weight is rebuilt with the pooled
segments and the split sizes updated.

Before (H = 4, Hkv = 2, D = 16, G = 1)::

    %k: f32[B, T, 32] = linear(%x, %wk, _)
    %k4: f32[B, T, 2, 16] = reshape(%k) {shape=[B, T, 2, 16]}
    %kt: f32[B, 2, T, 16] = permute(%k4) {perm=[0, 2, 1, 3]}
    %o: f32[B, 4, S, 16] = attention(%q, %kt, %vt) {kv_heads=2}

After::

    %k: f32[B, T, 16] = linear(%x, %wk_gqa, _)
    %k4: f32[B, T, 1, 16] = reshape(%k) {shape=[B, T, 1, 16]}
    %kt: f32[B, 1, T, 16] = permute(%k4) {perm=[0, 2, 1, 3]}
    %o: f32[B, 4, S, 16] = attention(%q, %kt, %vt) {kv_heads=1}

Needs: constant projection weights used by nothing else; Hkv % G == 0 (near
miss otherwise); the values between projection and attention used only on
that path (a KV-cache output would change its shape: near miss).

Guarantees: the converted graph is what the error report measured; the
KV cache shrinks by 2 x layers x (Hkv - G) x D x dtype bytes per token
(reported as ``kv_bytes_saved_per_token``).

Glossary: B batch, S query length, T key length, H query heads, Hkv key/value
heads before, G key/value heads after, D head dim, K the projection's input
features.
"""

from __future__ import annotations

import dataclasses

import torch

from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.types import dims_equal
from transfuse.passes.base import Pass, PassContext
from transfuse.passes.convert.error_report import (
    convert_on_clone,
    exceeds,
    report,
    sample_inputs,
)
from transfuse.passes.fusion.logits_last import backward_region, independence_reason, retype
from transfuse.passes.fusion.merge_projections import shares_storage

RULE = "convert/gqa"


@dataclasses.dataclass
class KVChain:
    """How K or V reaches an attention: projection -> [split] -> reshape -> [permute] -> ops."""

    linear: Node
    split: Node | None  # the merged projection's split, when there is one
    index: int  # which split output (0 without a split)
    reshape: Node
    after: list[Node]  # permute and head-wise ops up to the attention input, graph order

    @property
    def heads(self) -> int:
        return self.reshape.attrs["shape"][2]

    @property
    def head_dim(self) -> int:
        return self.reshape.attrs["shape"][3]


@dataclasses.dataclass
class Site:
    """One attention to convert."""

    attention: Node
    k: KVChain
    v: KVChain


class ConvertMhaToGqa(Pass):
    """Mean-pool key/value heads into G groups (option ``convert_gqa=G``); reports the error."""

    name = "convert.mha-to-gqa"
    rules = (RULE,)
    #: the model's function changes; the manager must not compare outputs with before
    changes_function = True

    def run(self, graph: Graph, ctx: PassContext) -> None:
        groups = ctx.option("convert_gqa")
        if groups is None or groups is False:
            return
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"option convert_gqa={groups!r}: expected a number of kv heads >= 1")
        sites = plan(graph, groups, ctx)
        if not sites:
            return
        inputs = sample_inputs(graph, ctx)
        _, err = convert_on_clone(graph, lambda g: len(apply(g, plan(g, groups), groups)), inputs,
                                  "gqa")
        # per token and layer: (Hkv - G) heads fewer in the K and in the V cache
        saved = sum((s.k.heads - groups) * (s.k.head_dim + s.v.head_dim)
                    * s.attention.inputs[1].dtype.itemsize for s in sites)
        before = "/".join(str(h) for h in sorted({s.k.heads for s in sites}))
        err.extra.update(kv_heads=f"{before}->{groups}", layers=len(sites),
                         kv_bytes_saved_per_token=saved)
        if exceeds(ctx, RULE, err):
            return
        events = apply(graph, sites, groups)
        for site, new in zip(sites, events):
            matched = [site.attention, site.k.linear]
            if site.v.linear is not site.k.linear:
                matched.append(site.v.linear)
            ctx.rewrite(RULE, matched, new)
        report(ctx, graph, err)


# -- planning (never mutates) --------------------------------------------------------


def plan(graph: Graph, groups: int, ctx: PassContext | None = None) -> list[Site]:
    """The attentions that can be converted to ``groups`` kv heads; near misses for the rest."""
    sites: list[Site] = []
    used: set[int] = set()
    for node in graph.find("attention"):
        if ctx is not None:
            ctx.attempt(RULE)
        reason = None
        chains = []
        for which in (1, 2):
            chain = trace_kv(node, which)
            if isinstance(chain, str):
                reason = f"{'kv'[which - 1]}: {chain}"
                break
            chains.append(chain)
        if reason is None:
            k, v = chains
            hkv = k.heads
            if k.reshape is v.reshape:
                reason = "k and v are the same value"
            elif hkv == groups:
                continue  # already there
            elif hkv < groups:
                reason = f"already {hkv} kv heads, fewer than convert_gqa={groups}"
            elif hkv % groups:
                reason = f"{hkv} kv heads are not divisible into {groups} groups (Hkv % G != 0)"
            elif id(k.reshape) in used or id(v.reshape) in used:
                reason = "k or v also feeds another attention"
        if reason is not None:
            if ctx is not None:
                ctx.near_miss(RULE, node, reason)
            continue
        used.update((id(k.reshape), id(v.reshape)))
        sites.append(Site(node, k, v))
    return sites


def trace_kv(attn: Node, which: int) -> KVChain | str:
    """The chain that makes input ``which`` (1 = K, 2 = V) of ``attn``, or why there is none."""
    layout = attn.attrs["layout"]
    head_axis = 1 if layout == "bhsd" else 2
    end = attn.inputs[which]
    hkv = end.type.shape[head_axis]

    def dependent(v: Value) -> bool:
        return not v.is_const and v.type.rank == 4 and dims_equal(v.type.shape[head_axis], hkv)

    entries, region = backward_region(
        end, attn, lambda n: independence_reason(n, head_axis, dependent) is None, dependent)
    if len(entries) != 1:
        return (f"computed from {len(entries)} head-carrying values "
                f"({', '.join('%' + v.name for v in entries)}), not one projection")
    start = entries[0]
    stop = start.producer
    if any(u is not attn and u not in region for u in start.users) or \
            any(o is start for o in attn.graph.outputs):
        return f"%{start.name} is also used outside the path to attention"
    after = list(region)
    if layout == "bhsd":
        if stop is None or stop.op != "permute" or list(stop.attrs["perm"]) != [0, 2, 1, 3]:
            what = "an input" if stop is None else stop.op
            return (f"comes from {what} (%{start.name}), not from a reshape + permute "
                    f"[0, 2, 1, 3] of a projection")
        after.insert(0, stop)
        start = stop.inputs[0]
        if len(start.uses) != 1 or any(o is start for o in attn.graph.outputs):
            return f"%{start.name} (reshaped projection) is used elsewhere"
        stop = start.producer
    if stop is None or stop.op != "reshape" or start.type.rank != 4:
        return f"comes from {stop.op if stop else 'an input'} (%{start.name}), not a reshape " \
               f"[B, T, Hkv, D] of a projection"
    reshape = stop
    proj = reshape.inputs[0]
    shape = reshape.attrs["shape"]
    if proj.type.rank != 3 or not isinstance(shape[2], int) or not isinstance(shape[3], int) or \
            not dims_equal(proj.type.shape[2], shape[2] * shape[3]) or \
            not dims_equal(proj.type.shape[1], shape[1]):
        return f"reshape {proj.type} -> {reshape.output.type} is not [B, T, Hkv*D] -> [B, T, Hkv, D]"
    if len(proj.uses) != 1 or any(o is proj for o in attn.graph.outputs):
        return f"projection output %{proj.name} is used elsewhere"
    split, index, p = None, 0, proj.producer
    if p is not None and p.op == "split":
        axis = p.attrs["axis"] % p.inputs[0].type.rank
        if axis != p.inputs[0].type.rank - 1:
            return f"split along axis {p.attrs['axis']}, not the features"
        split, index = p, proj.index
        proj = p.inputs[0]
        if len(proj.uses) != 1 or any(o is proj for o in attn.graph.outputs):
            return f"merged projection %{proj.name} is used elsewhere"
        p = proj.producer
    if p is None or p.op != "linear":
        return f"%{proj.name} is not produced by a linear projection"
    if p.attrs.get("activation") is not None:
        return f"the projection applies {p.attrs['activation']}: pooled rows would not be a mean"
    w = p.inputs[1]
    b = p.inputs[2] if len(p.inputs) > 2 else None
    for c in (w, b):
        if c is None:
            continue
        if not c.is_const:
            return f"projection parameter %{c.name} is not a constant"
        if c.num_uses > 1 or shares_storage(c):
            return f"projection parameter %{c.name} is shared"
    return KVChain(p, split, index, reshape, after)


# -- the rewrite ---------------------------------------------------------------------


def pool_rows(t: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Mean of the rows of each group of ``heads // groups`` heads: [Hkv*D, ...] -> [G*D, ...]."""
    rest = t.shape[1:]
    x = t.double().reshape(groups, heads // groups, head_dim, *rest).mean(1)
    return x.reshape(groups * head_dim, *rest).to(t.dtype).contiguous()


def apply(graph: Graph, sites: list[Site], groups: int) -> list[list[Node]]:
    """Convert ``sites`` (planned on ``graph``); returns the new nodes of each site."""
    by_linear: dict[int, list[KVChain]] = {}
    linears: dict[int, Node] = {}
    for s in sites:
        for chain in (s.k, s.v):
            by_linear.setdefault(id(chain.linear), []).append(chain)
            linears[id(chain.linear)] = chain.linear
    new_value: dict[int, Value] = {}  # id(old reshape) -> the value its replacement reads
    new_nodes: dict[int, list[Node]] = {}  # id(old linear) -> new linear (+ split)
    for key, chains in by_linear.items():
        lin = linears[key]
        made = _rebuild_projection(graph, lin, chains, groups, new_value)
        new_nodes[key] = made
    out: list[list[Node]] = []
    for s in sites:
        made: list[Node] = [*new_nodes[id(s.k.linear)]]
        if s.v.linear is not s.k.linear:
            made += new_nodes[id(s.v.linear)]
        for chain in (s.k, s.v):
            old = chain.reshape
            shape = list(old.attrs["shape"])
            shape[2] = groups
            r = graph.create("reshape", [new_value[id(old)]], {"shape": shape}, meta=dict(old.meta),
                             before=old)
            graph.replace_all_uses(old.output, r.output)
            graph.erase(old)
            retype(chain.after)
            made.append(r)
        a = s.attention
        attn = graph.create("attention", list(a.inputs), {**a.attrs, "kv_heads": groups},
                            meta=dict(a.meta), before=a)
        graph.replace_all_uses(a.output, attn.output)
        graph.erase(a)
        made.append(attn)
        out.append(made)
    for lin in linears.values():
        split = next((c.split for c in by_linear[id(lin)] if c.split is not None), None)
        if split is not None:
            graph.erase(split)
        params = [v for v in lin.inputs[1:] if v is not None]
        graph.erase(lin)
        for c in params:
            if not c.uses and c.name in graph.constants:
                del graph.constants[c.name]
    return out


def _rebuild_projection(graph: Graph, lin: Node, chains: list[KVChain], groups: int,
                        new_value: dict[int, Value]) -> list[Node]:
    """A new linear (and split) with the rows of ``chains`` pooled; fills ``new_value``."""
    w = lin.inputs[1]
    b = lin.inputs[2] if len(lin.inputs) > 2 else None
    split = chains[0].split
    if split is None:
        segments = [(0, w.type.shape[0])]
        pooled = {0: chains[0]}
    else:
        sizes = split.attrs["sizes"]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        segments = [(s, s + n) for s, n in zip(starts, sizes)]
        pooled = {c.index: c for c in chains}

    def rebuild(t: torch.Tensor) -> torch.Tensor:
        parts = []
        for i, (lo, hi) in enumerate(segments):
            c = pooled.get(i)
            seg = t[lo:hi]
            parts.append(pool_rows(seg, c.heads, groups, c.head_dim) if c is not None else seg)
        return torch.cat(parts, dim=0).contiguous()

    w_new = graph.add_constant(rebuild(w.const), f"{w.name}_gqa")
    b_new = graph.add_constant(rebuild(b.const), f"{b.name}_gqa") if b is not None else None
    meta = dict(lin.meta)
    new_lin = graph.create("linear", [lin.inputs[0], w_new, b_new], dict(lin.attrs), meta=meta,
                           before=lin)
    if split is None:
        new_value[id(chains[0].reshape)] = new_lin.output
        return [new_lin]
    sizes = [groups * pooled[i].head_dim if i in pooled else hi - lo
             for i, (lo, hi) in enumerate(segments)]
    new_split = graph.create("split", [new_lin.output], {"axis": -1, "sizes": sizes},
                             meta=dict(split.meta), before=lin)
    for i, old in enumerate(split.outputs):
        if i in pooled:
            new_value[id(pooled[i].reshape)] = new_split.outputs[i]
        else:
            graph.replace_all_uses(old, new_split.outputs[i])
    return [new_lin, new_split]


__all__ = ["ConvertMhaToGqa", "plan", "apply", "trace_kv", "pool_rows", "KVChain", "Site"]
