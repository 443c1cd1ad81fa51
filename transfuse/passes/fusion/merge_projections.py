"""fusion.merge-projections: linears that read the same value become one wider linear.

Rewrites (rule ids):

- ``merge/qkv``: three or more ``linear`` nodes on the same input value — the
  q, k and v projections of an attention block, or q, k, v and the MLP's
  input projection of a parallel (Falcon / PaLM / GPT-J style) block whose
  attention and MLP read one shared norm output — become one ``linear`` with
  the weights concatenated along N, followed by a ``split`` on the last axis;
- ``merge/gate-up``: exactly two such linears (the gate and up projections
  of a gated MLP).

Before (K = 64)::

    %q: f32[B, S, 64] = linear(%h, %h_0_attn_q_weight, %h_0_attn_q_bias)
    %k: f32[B, S, 32] = linear(%h, %h_0_attn_k_weight, %h_0_attn_k_bias)
    %v: f32[B, S, 32] = linear(%h, %h_0_attn_v_weight, %h_0_attn_v_bias)

After::

    %qkv: f32[B, S, 128] = linear(%h, %h_0_attn_qkv_weight, %h_0_attn_qkv_bias)
    %q, %k, %v = split(%qkv) {axis=-1, sizes=[64, 32, 32]}

Needs: constant weights [N, K]. Merged together only linears that read the
*same* value, whose weights have the same K and dtype, that all have a
constant bias (same dtype) or all have none, and that apply the same folded
``activation`` (run this pass before ``recognize.fold-linear-epilogue`` folds
silu into a gate projection but not into its up projection). A weight (or bias) that is used
by anything else — tied embeddings, a weight shared between layers — is
never moved: that linear stays alone (near miss ``weight is shared``).

Option ``merge_projections`` (default: on, off for target ``onnxruntime``, where three
MatMuls ran as fast as one wide one and the merged weights would be a second copy of
the model's: gpt2-small seq 128 390 vs 393 ms, llama-small 308 vs 303 ms; -228 / -189 MB).

Guarantees: outputs equal to the unmerged graph up to fp32 GEMM rounding;
the merged node sits where the first linear was and keeps its user source
(module path); the old weights are dropped, so the weight bytes do not change
(a note records them).

Glossary: B batch, S sequence, K the shared input features, N1, N2, ... the
output features of each merged projection.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from transfuse.ir.graph import Graph, Node, Value
from transfuse.passes.base import Pass, PassContext

RULE_QKV = "merge/qkv"
RULE_GATE_UP = "merge/gate-up"


class MergeProjections(Pass):
    """Merge linears on the same input (q/k/v, gate/up, parallel blocks) into one linear + split."""

    name = "fusion.merge-projections"
    rules = (RULE_QKV, RULE_GATE_UP)

    def run(self, graph: Graph, ctx: PassContext) -> None:
        target = ctx.target
        if not ctx.option("merge_projections", target != "onnxruntime"):
            # ONNX Runtime runs three MatMuls as fast as one wide one (measured, gpt2/llama
            # small, seq 16/128: within 1.5%) and the merged weights would be a second copy
            ctx.note(f"fusion.merge-projections: off for target {target!r} (option "
                     "merge_projections): no speed gain there, and it would copy the weights")
            return
        bytes_before = constant_bytes(graph)
        order = {id(n): i for i, n in enumerate(graph.nodes)}
        for x in list(graph.values()):
            groups = self._candidate_groups(x, ctx, order)
            for group in groups:
                rule = RULE_QKV if len(group) >= 3 else RULE_GATE_UP
                ctx.attempt(rule)
                self._merge(graph, ctx, rule, group)
        bytes_after = constant_bytes(graph)
        merged = sum(ctx.record.matched(r) for r in self.rules)
        if merged:
            ctx.note(f"merge-projections: {merged} group(s) merged; weight bytes "
                     f"{bytes_before} before, {bytes_after} after")

    # -- finding groups ------------------------------------------------------

    def _candidate_groups(self, x: Value, ctx: PassContext,
                          order: dict[int, int]) -> list[list[Node]]:
        """Linears on ``x`` grouped by what can be concatenated, in graph order."""
        linears = sorted((n for n in x.users if n.op == "linear" and n.inputs[0] is x),
                         key=lambda n: order.get(id(n), 0))
        if len(linears) < 2:
            return []
        groups: dict[tuple, list[Node]] = {}
        for n in linears:
            reason = _unmergeable(n)
            if reason:
                rule = RULE_QKV if len(linears) >= 3 else RULE_GATE_UP
                ctx.near_miss(rule, n, reason)
                continue
            w, b = n.inputs[1], _bias(n)
            key = (str(w.dtype), str(w.shape[1]), None if b is None else str(b.dtype),
                   n.attrs.get("activation"))
            groups.setdefault(key, []).append(n)
        out = [g for g in groups.values() if len(g) >= 2]
        if len(groups) > 1:
            kinds = sorted(groups, key=str)
            rule = RULE_QKV if len(linears) >= 3 else RULE_GATE_UP
            first = linears[0]
            ctx.near_miss(rule, first, f"linears on %{x.name} differ in weight dtype, K, "
                          f"bias presence or activation ({len(kinds)} kinds: "
                          f"{'; '.join(_kind_str(k) for k in kinds)}); merged within each kind")
        return out

    # -- the rewrite ---------------------------------------------------------

    def _merge(self, graph: Graph, ctx: PassContext, rule: str, group: list[Node]) -> None:
        x = group[0].inputs[0]
        weights = [n.inputs[1] for n in group]
        biases = [_bias(n) for n in group]
        sizes = [w.shape[0] for w in weights]
        w_cat = torch.cat([w.const for w in weights], dim=0)
        w_new = graph.add_constant(w_cat, merged_name([w.name for w in weights], "merged_weight"))
        b_new = None
        if biases[0] is not None:
            b_cat = torch.cat([b.const for b in biases], dim=0)
            b_new = graph.add_constant(b_cat, merged_name([b.name for b in biases],
                                                          "merged_bias"))
        first = group[0]
        meta = {k: v for k, v in first.meta.items() if k in ("source", "loc")}
        fused = graph.create("linear", [x, w_new, b_new], dict(first.attrs), meta=meta,
                             before=first)
        split = graph.create("split", [fused.output], {"axis": -1, "sizes": sizes}, meta=meta,
                             before=first)
        ctx.rewrite(rule, group, [fused, split])
        for n, out in zip(group, split.outputs):
            graph.replace_all_uses(n.output, out)
            graph.erase(n)
        for c in [*weights, *(b for b in biases if b is not None)]:
            if not c.uses and c.name in graph.constants:
                del graph.constants[c.name]


# -- helpers ---------------------------------------------------------------------


def _bias(n: Node) -> Value | None:
    return n.inputs[2] if len(n.inputs) > 2 else None


def _kind_str(key: tuple) -> str:
    dtype, k, bias, act = key
    text = f"{dtype} K={k} {'bias ' + bias if bias else 'no bias'}"
    return text + (f" activation {act}" if act else "")


def _unmergeable(n: Node) -> str | None:
    """Why linear ``n`` cannot join a merged projection (None when it can)."""
    w, b = n.inputs[1], _bias(n)
    if not w.is_const:
        return f"weight %{w.name} is not a constant"
    if b is not None and not b.is_const:
        return f"bias %{b.name} is not a constant"
    for c in (w, b):
        if c is not None and (c.num_uses > 1 or shares_storage(c)):
            return f"weight is shared: %{c.name} is also used elsewhere (tied)"
    return None


def shares_storage(c: Value) -> bool:
    """True when another constant of the graph holds the same tensor storage (tied weights
    that CSE has not merged yet)."""
    ptr = c.const.untyped_storage().data_ptr()
    return any(o is not c and o.const is not None and o.const.untyped_storage().data_ptr() == ptr
               for o in c.graph.constants.values())


def constant_bytes(graph: Graph) -> int:
    """Bytes held by the graph's constants (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for v in graph.constants.values():
        ptr = v.const.untyped_storage().data_ptr()
        if ptr in seen and ptr != 0:
            continue
        seen.add(ptr)
        total += v.const.numel() * v.const.element_size()
    return total


def merged_name(names: Sequence[str], fallback: str) -> str:
    """A name for the concatenation of constants ``names``.

    ``h_0_attn_q_weight``, ``h_0_attn_k_weight``, ``h_0_attn_v_weight`` -> ``h_0_attn_qkv_weight``;
    ``mlp_gate_proj_weight``, ``mlp_up_proj_weight`` -> ``mlp_gate_up_proj_weight``; names that
    differ in more than one word -> ``<common prefix>_<fallback>``.
    """
    parts = [n.split("_") for n in names]
    prefix = os.path.commonprefix(parts)
    rest = [p[len(prefix):] for p in parts]
    suffix = os.path.commonprefix([r[::-1] for r in rest])[::-1]
    middles = [r[:len(r) - len(suffix)] for r in rest]
    if all(len(m) == 1 and m[0] for m in middles):
        words = [m[0] for m in middles]
        joined = "".join(words) if all(len(w) == 1 for w in words) else "_".join(words)
        return "_".join([*prefix, joined, *suffix])
    return "_".join([*prefix, fallback])


__all__ = ["MergeProjections", "merged_name", "constant_bytes", "shares_storage"]
