"""generation.insert-kv-cache: the KV cache goes into the graph; one step serves prefill and decode.

Runs only with the option ``generation`` (a dict: ``max_seq_len``, ``max_batch``,
``kv`` = ``"contiguous"`` | ``"paged"``, ``block_size``, ``num_blocks``,
``cache_order``, ``max_step_tokens``), set by ``optimize(..., generation=...)``.
``max_step_tokens`` (default ``max_batch x max_seq_len``) bounds the tokens of one step: a
longer prefill runs in chunks (``generate()``; the serving engine's ``max_tokens_per_step``).

Needs: a causal LM captured with ``input_ids`` [1, N] and ``position_ids`` [1, N]
(N symbolic) whose attention fused into ``attention`` ops, and whose position-dependent
ops (RoPE tables, learned position embeddings) read ``position_ids``.

Rewrites (rule ``generation/cached-attention``): every ``attention(q, k, v, [bias])``
becomes ``cached_attention(q, k, v, k_cache_i, v_cache_i, pos, seq_of_token, seq_lens,
cache_table)`` with the same scale, window, kv heads, ALiBi slopes, softcap and layout.
The bias is accepted only when it is the model's own causal mask built from the
positions (``position_mask.py``: position-only and a causal band, whose window becomes
the op's); it and everything only it used are removed. Rule ``generation/logit-rows``:
the hidden state is gathered at ``logit_rows`` before the final norm and LM head
(the walk of ``fusion.compute-last-logits``), and the output becomes ``logits`` [R, V].

Graph inputs afterwards, in this order (GEN_DESIGN.md): ``input_ids`` [1, N],
``position_ids`` [1, N], ``seq_of_token`` [N], ``seq_lens`` [B], ``cache_table`` [B]
(contiguous) or [B, W] (paged), ``logit_rows`` [R], then ``k_cache_i``, ``v_cache_i`` per
layer. ``graph.meta["generation"]`` records the cache geometry for the runtime.

Refuses (near miss with the reason, then ``PassError``): a softmax over the token axis
left (attention that did not fuse; a MoE router's softmax over experts is fine), an
attention with a key-padding mask, one that is neither causal nor masked by a proven
causal band, a bias that is not position-only, no LM head, or positions computed from
the token index (an ``arange`` over N, or a constant table sliced to its first N rows,
still reaching the output) instead of ``position_ids``, or a table looked up by position
(learned position embedding, RoPE cos/sin) with fewer rows than ``max_seq_len``.

Glossary: N step tokens, B step sequences, R logit rows, V vocabulary, E hidden size,
H heads, Hkv kv heads, D head dim, W block-table width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from transfuse.errors import PassError
from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.opdefs.generation import heads_tokens
from transfuse.ir.types import DType, TensorType, dims_equal, free_symbols, sym
from transfuse.passes.base import Pass, PassContext, is_pure
from transfuse.passes.fusion.logits_last import HEAD_OPS, cut_before_head
from transfuse.passes.generation.position_mask import (
    ancestors,
    band_of,
    evaluate,
    position_only_reason,
)

RULE = "generation/cached-attention"
ROWS_RULE = "generation/logit-rows"
#: names of the step metadata inputs, in graph order after input_ids
META_INPUTS = ("position_ids", "seq_of_token", "seq_lens", "cache_table", "logit_rows")
#: symbols of the new inputs' dims
SEQS, ROWS, TABLE = "seqs", "rows", "table_blocks"
#: a position mask is evaluated as an [n, n] tensor for n = max_seq_len, at most this (the
#: proof frees intermediates and checks rows in blocks: ~2 s and ~1.7 GB at 16k, ~20 s and
#: ~5.5 GB at 32k, measured on a Llama/Mistral mask)
MAX_CHECKED_POSITIONS = 32768


def cache_geometry(options: Mapping[str, Any]) -> dict[str, Any]:
    """The checked generation options: layout, sizes and order of the caches."""
    g = dict(options)
    kv = g.get("kv", "contiguous")
    if kv not in ("contiguous", "paged"):
        raise PassError(f"generation option kv={kv!r}: expected 'contiguous' or 'paged'")
    max_len, max_batch = int(g.get("max_seq_len", 1024)), int(g.get("max_batch", 8))
    block = int(g.get("block_size", 16))
    if min(max_len, max_batch, block) < 1:
        raise PassError(f"generation options max_seq_len={max_len}, max_batch={max_batch}, "
                        f"block_size={block} must be >= 1")
    order = g.get("cache_order", "token-major")
    blocks = int(g.get("num_blocks") or max_batch * -(-max_len // block))
    step = g.get("max_step_tokens")
    if step is None:
        step = max_batch * max_len
    elif isinstance(step, bool) or not isinstance(step, int) \
            or not max_batch <= step <= max_batch * max_len:
        raise PassError(f"generation option max_step_tokens={step!r}: expected an int from "
                        f"max_batch ({max_batch}: a decode step has one token per sequence) to "
                        f"max_batch x max_seq_len ({max_batch * max_len})")
    return {"kv": kv, "max_seq_len": max_len, "max_batch": max_batch, "block_size": block,
            "num_blocks": blocks, "cache_order": order, "max_step_tokens": int(step)}


class InsertKvCache(Pass):
    """Rewrite fused attention into cached_attention over per-layer KV caches (generation)."""

    name = "generation.insert-kv-cache"
    rules = (RULE, ROWS_RULE)
    #: inputs and outputs change (caches in, logits at chosen rows out)
    changes_function = True

    def run(self, graph: Graph, ctx: PassContext) -> None:
        options = ctx.option("generation")
        if not options:
            return
        options = options if isinstance(options, Mapping) else {}
        geo = cache_geometry(options)
        if geo["max_step_tokens"] < geo["max_batch"] * geo["max_seq_len"]:
            ctx.note(f"a step takes at most {geo['max_step_tokens']} tokens (max_step_tokens, "
                     f"below max_batch x max_seq_len = {geo['max_batch'] * geo['max_seq_len']}):"
                     f" a longer prefill runs in chunks"
                     + (f"; why: {options['max_step_tokens_reason']}"
                        if options.get("max_step_tokens_reason") else ""))
        ctx.attempt(RULE)
        ids, pos = self._token_inputs(graph, ctx)
        n = ids.type.shape[1]
        attns = self._check_attentions(graph, ctx, pos, geo, n)
        head = self._find_head(graph, ctx, n)

        seqs, rows = sym(SEQS), sym(ROWS)
        i64 = DType.i64
        paged = geo["kv"] == "paged"
        sot = graph.add_input("seq_of_token", TensorType(i64, [n]), exact=True)
        lens = graph.add_input("seq_lens", TensorType(i64, [seqs]), exact=True)
        table = graph.add_input("cache_table", TensorType(
            i64, [seqs, sym(TABLE)] if paged else [seqs]), exact=True)
        logit_rows = graph.add_input("logit_rows", TensorType(i64, [rows]), exact=True)
        first = next(iter(graph.nodes), None)
        flat = graph.create("reshape", [pos], {"shape": [n]}, before=first, name="positions")
        for i, (attn, window) in enumerate(attns):
            self._replace(graph, ctx, i, attn, window, geo, [flat.output, sot, lens, table])
        self._gather_rows(graph, ctx, head, logit_rows, n)
        graph.inputs[:] = [ids, pos, sot, lens, table, logit_rows,
                           *[v for v in graph.inputs if v.name.startswith(("k_cache_",
                                                                           "v_cache_"))]]
        _remove_dead(graph)
        self._check_positions(graph, ctx, n)
        self._check_tables(graph, ctx, pos, n, geo["max_seq_len"])
        graph.meta["generation"] = {**geo, "layers": len(attns)}
        ctx.note(f"generation: {len(attns)} attention ops read/write {geo['kv']} KV caches "
                 f"({geo['cache_order']}); logits for logit_rows only")

    # -- checks ------------------------------------------------------------------

    def _refuse(self, ctx: PassContext, node: Node | None, reason: str, rule: str = RULE):
        ctx.near_miss(rule, node, reason)
        raise PassError(f"generation.insert-kv-cache: {reason}")

    def _token_inputs(self, graph: Graph, ctx: PassContext) -> tuple[Value, Value]:
        by_name = {v.name: v for v in graph.inputs}
        ids, pos = by_name.get("input_ids"), by_name.get("position_ids")
        names = [v.name for v in graph.inputs]
        if ids is None or pos is None or len(names) != 2:
            self._refuse(ctx, None, f"graph inputs {names}: a generation step is captured with "
                                    "exactly input_ids [1, N] and position_ids [1, N]")
        for v in (ids, pos):
            t = v.type
            if t.rank != 2 or t.shape[0] != 1 or isinstance(t.shape[1], int):
                self._refuse(ctx, None, f"%{v.name} {t} is not [1, N] with N dynamic")
        if not dims_equal(ids.type.shape[1], pos.type.shape[1]):
            self._refuse(ctx, None, f"input_ids {ids.type} and position_ids {pos.type} differ")
        return ids, pos

    def _check_attentions(self, graph, ctx, pos, geo, n) -> list[tuple[Node, int | None]]:
        symbol = n.name if hasattr(n, "name") else None
        for node in graph.nodes:
            if node.op in ("softmax", "log_softmax"):
                x = node.inputs[0].type
                size = x.shape[node.attrs["axis"] % max(x.rank, 1)] if x.rank else 1
                if not isinstance(size, int) and symbol in {s.name for s in size.free_symbols}:
                    # over the token axis: attention that did not fuse (a router's softmax
                    # over experts is not)
                    self._refuse(ctx, node, f"{node.op} over the tokens left at "
                                            f"{node.source or '?'}: attention did not fuse "
                                            "(see attention.fuse-sdpa's near misses)")
        attns = graph.find("attention")
        if not attns:
            self._refuse(ctx, None, "no attention op: nothing to cache")
        out = []
        bands: dict[int, tuple[int | None, str | None]] = {}
        for a in attns:
            bias = a.inputs[3] if len(a.inputs) > 3 else None
            if len(a.inputs) > 4 and a.inputs[4] is not None:
                self._refuse(ctx, a, f"attention at {a.source or '?'} has a key-padding mask")
            window, band = a.attrs["window"], None
            if bias is None:
                if not a.attrs["causal"]:
                    self._refuse(ctx, a, f"attention at {a.source or '?'} is not causal")
            else:
                if id(bias) not in bands:  # one mask usually serves every layer
                    bands[id(bias)] = self._band(bias, pos, symbol, geo["max_seq_len"])
                band, reason = bands[id(bias)]
                if reason:
                    self._refuse(ctx, a, f"attention at {a.source or '?'}: {reason}")
                if band is not None:
                    window = band if window is None else min(window, band)
            for x in a.inputs[:3]:
                _, _, tokens, _ = heads_tokens(x.type, a.attrs["layout"])
                if not dims_equal(tokens, n) or not dims_equal(x.type.shape[0], 1):
                    self._refuse(ctx, a, f"attention at {a.source or '?'}: {x.type} does not "
                                         f"run over the step's tokens (batch 1, N)")
            out.append((a, window))
        return out

    @staticmethod
    def _band(bias: Value, pos: Value, symbol: str | None,
              max_len: int) -> tuple[int | None, str | None]:
        """(window, reason) of a position mask, observed over every position the cache holds."""
        reason = position_only_reason(bias, pos)
        if reason:
            return None, reason
        if max_len > MAX_CHECKED_POSITIONS:
            return None, (f"the mask is checked by evaluating it over max_seq_len positions; "
                          f"{max_len} is over {MAX_CHECKED_POSITIONS}")
        return band_of(bias, pos, symbol, max_len)

    def _find_head(self, graph: Graph, ctx: PassContext, n) -> Node:
        if len(graph.outputs) != 1:
            self._refuse(ctx, None, f"{len(graph.outputs)} graph outputs; a causal LM step has "
                                    "one (the logits)", ROWS_RULE)
        v = graph.outputs[0]
        while v.producer is not None and v.producer.op not in HEAD_OPS:
            deps = [x for x in v.producer.inputs if x is not None and not x.is_const]
            if len(deps) != 1:
                break
            v = deps[0]
        head = v.producer
        if head is None or head.op not in HEAD_OPS or not head.inputs[1].is_const:
            self._refuse(ctx, None, "the output is not computed by an LM head (a linear, "
                                    "qlinear or qmatmul with a constant weight)", ROWS_RULE)
        t = head.output.type
        if t.rank != 3 or not dims_equal(t.shape[1], n):
            self._refuse(ctx, head, f"LM head output {t} is not [1, N, V]", ROWS_RULE)
        return head

    def _check_positions(self, graph: Graph, ctx: PassContext, n) -> None:
        """No position may come from the token index: no arange over the token axis, and no
        table cut to its first N rows (a RoPE or position table sliced by the token count);
        positions come from position_ids."""
        tokens = free_symbols([n])
        for node in graph.nodes:
            if node.op == "arange" and any(dims_equal(d, n) for d in node.output.type.shape):
                self._refuse(ctx, node, f"arange over the token axis at {node.source or '?'} "
                                        "still feeds the output: positions must come from "
                                        "position_ids")
            if (node.op == "slice" and tokens & free_symbols([node.attrs["start"],
                                                              node.attrs["end"]])
                    and not _reads_inputs(node.inputs[0])):
                self._refuse(ctx, node, f"%{node.inputs[0].name} cut by the token count at "
                                        f"{node.source or '?'} (rows 0..N-1 of a position "
                                        "table) still feeds the output: positions must come "
                                        "from position_ids")

    def _check_tables(self, graph: Graph, ctx: PassContext, pos: Value, n, max_len: int) -> None:
        """Every position the cache holds has a row in each table looked up by position (a
        learned position embedding, RoPE cos/sin tables), else the step would index past it."""
        symbol = n.name if hasattr(n, "name") else None
        for node in graph.nodes:
            lookup = _table_lookup(node)
            if lookup is None:
                continue
            table, index, axis = lookup
            rows = table.type.shape[axis] if table.type.rank else None
            if (not isinstance(rows, int) or _reads_inputs(table)
                    or (index is not pos and position_only_reason(index, pos))):
                continue  # not a table of positions
            last = torch.arange(max_len).reshape([1] * (pos.type.rank - 1) + [max_len])
            highest = int(evaluate(index, pos, last, {symbol: max_len} if symbol else {}).max())
            if highest >= rows:
                fits = rows - (highest - (max_len - 1))
                where = f" (at {node.source})" if node.source else ""
                self._refuse(ctx, node, f"%{table.name}{where} has {rows} rows "
                                        f"(one per position) but max_seq_len {max_len} would "
                                        f"read row {highest}: compile with max_seq_len <= "
                                        f"{fits}")

    # -- rewrites ----------------------------------------------------------------

    def _replace(self, graph, ctx, i, attn: Node, window, geo, meta: list[Value]) -> None:
        a = attn.attrs
        k = attn.inputs[1]
        _, hkv, _, d = heads_tokens(k.type, a["layout"])
        _, _, _, dv = heads_tokens(attn.inputs[2].type, a["layout"])
        paged = geo["kv"] == "paged"
        rows = geo["num_blocks"] if paged else geo["max_batch"]
        length = geo["block_size"] if paged else geo["max_seq_len"]
        head_major = geo["cache_order"] == "head-major"

        def cache_type(dim):
            shape = [rows, hkv, length, dim] if head_major else [rows, length, hkv, dim]
            return TensorType(k.type.dtype, shape)

        kc = graph.add_input(f"k_cache_{i}", cache_type(d), exact=True)
        vc = graph.add_input(f"v_cache_{i}", cache_type(dv), exact=True)
        attrs = {"scale": a["scale"], "window": window, "kv_heads": a["kv_heads"],
                 "alibi": a["alibi"], "softcap": a["softcap"], "layout": a["layout"],
                 "paged": paged, "block_size": geo["block_size"] if paged else None,
                 "cache_order": geo["cache_order"]}
        new = graph.create("cached_attention", [*attn.inputs[:3], kc, vc, *meta], attrs,
                           before=attn, name=attn.output.name,
                           meta={"source": attn.source} if attn.source else None)
        graph.replace_all_uses(attn.output, new.output)
        graph.erase(attn)
        ctx.rewrite(RULE, [attn], [new])

    def _gather_rows(self, graph, ctx, head: Node, logit_rows: Value, n) -> None:
        def dependent(v: Value) -> bool:
            return not v.is_const and v.type.rank == 3 and dims_equal(v.type.shape[1], n)

        def gather(h: Value, first: Node) -> Node:
            return graph.create("index", [h, logit_rows], {"axes": [1]}, before=first,
                                name="logit_rows_of",
                                meta={"source": first.source} if first.source else None)

        _, _, made = cut_before_head(head, dependent, gather)
        out = graph.outputs[0]
        rows, vocab = logit_rows.type.shape[0], out.type.shape[2]
        flat = graph.create("reshape", [out], {"shape": [rows, vocab]}, name="logits")
        graph.set_outputs([flat.output])
        if flat.output.name != "logits":
            names = {v.name for v in graph.values()}
            taken = [v for v in graph.values() if v.name == "logits"]
            spare = next(f"logits_all_{i}" for i in range(len(names) + 1)
                         if f"logits_all_{i}" not in names)
            graph.rename_values([*taken, flat.output], [spare] * len(taken) + ["logits"])
        ctx.rewrite(ROWS_RULE, [head], [*made, flat])


def _table_lookup(node: Node) -> tuple[Value, Value, int] | None:
    """(table, index, axis) of a node that picks rows of a tensor by one index tensor."""
    if node.op == "embedding":
        return node.inputs[0], node.inputs[1], 0
    if node.op == "index_select":
        return node.inputs[0], node.inputs[1], node.attrs["axis"]
    if node.op == "index" and len(node.attrs["axes"]) == 1 and len(node.inputs) == 2:
        return node.inputs[0], node.inputs[1], node.attrs["axes"][0]
    return None


def _reads_inputs(v: Value) -> bool:
    """Whether ``v`` is computed from a graph input (not from weights and shapes alone)."""
    return v.is_input or any(i is not None and i.is_input
                             for node in ancestors(v) for i in node.inputs)


def _remove_dead(graph: Graph) -> None:
    """Erase pure nodes nothing uses (the old masks), so leftovers can be checked."""
    outputs = {id(v) for v in graph.outputs}
    for node in reversed(graph.nodes):
        if is_pure(node) and not any(v.uses or id(v) in outputs for v in node.outputs):
            graph.erase(node)


__all__ = ["InsertKvCache", "cache_geometry", "META_INPUTS", "RULE", "ROWS_RULE"]
