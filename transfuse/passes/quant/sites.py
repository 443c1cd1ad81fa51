"""The layers quantization can rewrite: linears with constant weights, found in a graph.

A :class:`Site` is one of

- ``linear(x, W[N, K] const, b?) {activation}``;
- ``matmul(x, W[K, N] const)`` (Hugging Face GPT-2's Conv1D), optionally followed by
  ``add(., b[N] const)`` as its only use: the bias is carried into the qlinear.

The LM head is the site that makes the graph's first output (through casts, slices, reshapes
and scalings by constants: a logit soft-cap), and any site whose weight an ``embedding`` /
``gather`` also reads (tied input and output embeddings).

Layer names are module paths for the report and the ``layers`` / ``keep_float`` patterns: the
node's source (``layers.0.mlp.down_proj``); a projection merged by
``fusion.merge-projections`` is named after its merged weight (``layers.0.attn.qkv_proj``).

Glossary: N output features, K input features.
"""

from __future__ import annotations

import dataclasses

import torch

from transfuse.ir.graph import Graph, Node, Value

#: ops that read rows of a weight table (a tied embedding)
GATHER_OPS = frozenset({"embedding", "gather", "index_select"})
#: ops between the LM head and the first output that keep it the head (one non-const input)
HEAD_PASS_THROUGH = frozenset({"cast", "slice", "reshape", "mul", "div", "tanh", "identity",
                               "squeeze", "unsqueeze", "contiguous"})


@dataclasses.dataclass
class Site:
    """One linear layer with a constant weight."""

    node: Node
    x: Value
    weight: Value
    bias: Value | None
    bias_add: Node | None  # matmul + add(bias): the add, folded into the qlinear
    transposed: bool  # True for matmul(x, W[K, N])
    name: str = ""
    is_head: bool = False
    makes_logits: bool = False  # the graph's first output is computed from it (the LM head)
    tied: list[Node] = dataclasses.field(default_factory=list)  # gathers reading the weight

    @property
    def out(self) -> Value:
        """The value the quantized layer replaces (the bias add's output when folded)."""
        return (self.bias_add or self.node).output

    @property
    def activation(self) -> str | None:
        return self.node.attrs.get("activation") if self.node.op == "linear" else None

    @property
    def n(self) -> int:
        return int(self.weight.type.shape[1 if self.transposed else 0])

    @property
    def k(self) -> int:
        return int(self.weight.type.shape[0 if self.transposed else 1])

    def weight_nk(self) -> torch.Tensor:
        """The weight as f32 [N, K]."""
        w = self.weight.const.to(torch.float32)
        return (w.T if self.transposed else w).contiguous()

    @property
    def source(self) -> str:
        return self.node.source


def find_sites(graph: Graph) -> tuple[list[Site], list[tuple[Node, str]]]:
    """(sites in graph order, [(node, why it is not a site)] for linears/matmuls left out)."""
    sites: list[Site] = []
    skipped: list[tuple[Node, str]] = []
    for node in graph.nodes:
        if node.op == "linear":
            x, w = node.inputs[0], node.inputs[1]
            b = node.inputs[2] if len(node.inputs) > 2 else None
            reason = _weight_reason(w) or _input_reason(x)
            if reason:
                skipped.append((node, reason))
                continue
            sites.append(Site(node, x, w, b, None, False))
        elif node.op == "matmul":
            x, w = node.inputs
            if not w.is_const or x.is_const:
                continue  # attention scores and the like: not a layer
            reason = _weight_reason(w) or _input_reason(x)
            if reason or x.type.rank < 2:
                skipped.append((node, reason or f"input {x.type} has rank 1"))
                continue
            b, add = _folded_bias(node)
            sites.append(Site(node, x, w, b, add, True))
    _mark_heads(graph, sites)
    _name(sites)
    return sites, skipped


def _weight_reason(w: Value) -> str | None:
    if not w.is_const:
        return f"weight %{w.name} is not a constant"
    if w.type.rank != 2:
        return f"weight %{w.name} {w.type} is not 2-D"
    if not w.dtype.is_float:
        return f"weight %{w.name} {w.type} is not float"
    return None


def _input_reason(x: Value) -> str | None:
    if not x.dtype.is_float:
        return f"input %{x.name} {x.type} is not float"
    return None


def _folded_bias(mm: Node) -> tuple[Value | None, Node | None]:
    """The constant [N] bias added to ``mm``'s output by its only user, if that is the case."""
    out = mm.output
    if len(out.uses) != 1 or any(o is out for o in mm.graph.outputs):
        return None, None
    add, _ = out.uses[0]
    if add.op != "add":
        return None, None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    n = mm.inputs[1].type.shape[1]
    if other is out or not other.is_const or other.type.rank != 1 or other.type.shape[0] != n \
            or other.dtype != out.dtype or add.output.type != out.type:
        return None, None
    return other, add


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _mark_heads(graph: Graph, sites: list[Site]) -> None:
    by_out = {id(s.out): s for s in sites}
    by_out.update({id(s.node.output): s for s in sites})
    if graph.outputs:
        v = graph.outputs[0]
        for _ in range(16):
            site = by_out.get(id(v))
            if site is not None:
                site.is_head = site.makes_logits = True
                break
            p = v.producer
            if p is None or p.op not in HEAD_PASS_THROUGH:
                break
            moving = [u for u in p.inputs if u is not None and not u.is_const]
            if len(moving) != 1:
                break
            v = moving[0]
    gathers = [n for n in graph.nodes if n.op in GATHER_OPS]
    for s in sites:
        ptr = _storage(s.weight.const)
        s.tied = [g for g in gathers if any(
            u is not None and u.is_const and (u is s.weight or _storage(u.const) == ptr)
            for u in g.inputs)]
        if s.tied:
            s.is_head = True


def _name(sites: list[Site]) -> None:
    seen: dict[str, int] = {}
    for s in sites:
        name = layer_name(s)
        k = seen.get(name, 0)
        seen[name] = k + 1
        s.name = name if k == 0 else f"{name}#{k + 1}"


def layer_name(site: Site) -> str:
    """The module path of ``site`` (see the module docstring)."""
    source = site.node.source
    wname = site.weight.name
    if not source:
        return wname
    origin = str(site.node.meta.get("origin", ""))
    if origin.startswith("fusion.merge-projections") and "." in source:
        parent = source.rsplit(".", 1)[0]
        prefix = parent.replace(".", "_") + "_"
        if wname.startswith(prefix):
            rest = wname[len(prefix):].removesuffix("_weight")
            if rest:
                return f"{parent}.{rest}"
    return source


__all__ = ["Site", "find_sites", "layer_name", "GATHER_OPS"]
