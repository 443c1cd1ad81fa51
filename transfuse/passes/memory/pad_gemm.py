"""``layout.pad-gemm-columns``: give wide GEMMs a kernel-friendly column count.

Glossary: x [..., K] times a weight [N, K] (torch's linear layout) gives [..., N].

CPU GEMM kernels work in register blocks of 8/16 columns and cache panels of
64; an LM head with N = 50257 (GPT-2's vocabulary) leaves a ragged edge that
costs ~20% of the head's time at M >= 128 on one AVX2 core (measured: 808 ->
633 ms at M = 512). This pass pads the weight (and bias) of a wide linear with
zero rows up to a multiple of ``multiple`` and slices the output back to N.

Needs: a linear whose weight is a constant [N, K] with N >= ``min_columns`` and
N % ``multiple`` != 0. Other users of the weight (a tied embedding) read the
first N rows of the padded constant through a ``slice``, a view: no copy, and
out-of-range ids still fail as before. Guarantees: the same values in the same
positions (padded columns are exact zeros and never reach an output);
one weight in memory, not two.

Options: ``pad_gemm_multiple`` (default 64), ``pad_gemm_min_columns`` (4096),
``pad_gemm=False`` to disable (the default for target ``onnxruntime``, whose GEMMs gain
nothing from it).
"""

from __future__ import annotations

import torch

from transfuse.ir.graph import Graph
from transfuse.passes.base import Pass, PassContext
from transfuse.passes.registry import register_pass

RULE = "layout/pad-gemm-columns"


@register_pass
class PadGemmColumns(Pass):
    """Pad wide linear weights to a multiple of 64 output columns; slice the result back."""

    name = "layout.pad-gemm-columns"
    rules = (RULE,)

    def run(self, graph: Graph, ctx: PassContext) -> None:
        target = ctx.target
        if ctx.option("pad_gemm", target != "onnxruntime") is False:
            if target == "onnxruntime":  # ORT's MLAS has no ragged-edge cost to pay back
                ctx.note(f"{RULE}: off for target 'onnxruntime' (option pad_gemm): a padded "
                         "copy of the weight would buy no speed there")
            return
        multiple = int(ctx.option("pad_gemm_multiple", 64))
        min_cols = int(ctx.option("pad_gemm_min_columns", 4096))
        for node in list(graph.nodes):
            if node.op != "linear":
                continue
            w = node.inputs[1]
            if w is None or not w.is_const or w.const.dim() != 2:
                continue
            n, k = w.const.shape
            if n < min_cols or n % multiple == 0:
                continue
            ctx.attempt(RULE)
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if bias is not None and not bias.is_const:
                ctx.near_miss(RULE, node, f"bias %{bias.name} is not a constant")
                continue
            padded_n = -(-n // multiple) * multiple
            self._pad(graph, ctx, node, w, bias, n, padded_n)

    def _pad(self, graph, ctx, node, w, bias, n, padded_n) -> None:
        extra = padded_n - n
        w_pad = graph.add_constant(
            torch.cat([w.const, w.const.new_zeros(extra, w.const.shape[1])]), f"{w.name}_padded")
        b_pad = None
        if bias is not None:
            b_pad = graph.add_constant(torch.cat([bias.const, bias.const.new_zeros(extra)]),
                                       f"{bias.name}_padded")
        created = []
        # other readers of the weight (a tied embedding) see its first n rows: a view
        others = [(user, i) for user, i in w.uses if user is not node]
        if others:
            rows = graph.create("slice", [w_pad], {"axis": 0, "start": 0, "end": n},
                                before=graph_first_user(graph, [u for u, _ in others]),
                                meta={"source": others[0][0].source})
            created.append(rows)
            for user, i in others:
                graph.set_input(user, i, rows.output)
        wide = graph.create("linear", [node.inputs[0], w_pad, b_pad], dict(node.attrs),
                            before=node, meta=dict(node.meta))
        cut = graph.create("slice", [wide.output], {"axis": -1, "start": 0, "end": n},
                           before=node, meta={"source": node.source})
        created += [wide, cut]
        ctx.rewrite(RULE, [node], created)
        graph.replace_all_uses(node.output, cut.output)
        graph.erase(node)
        for old in (w, bias):  # the unpadded constants are dead now: one copy in memory
            if old is not None and not old.num_uses:
                graph.constants.pop(old.name, None)
        ctx.note(f"{RULE}: %{w.name} [{n}, {w.const.shape[1]}] padded to {padded_n} columns "
                 f"(+{extra * w.const.shape[1] * w.const.element_size() / 2**20:.2f} MB)")


def graph_first_user(graph: Graph, users) -> object:
    """The earliest of ``users`` in the graph's order (the slice must come before it)."""
    wanted = {id(u) for u in users}
    for n in graph.nodes:
        if id(n) in wanted:
            return n
    raise AssertionError("users not in graph")
