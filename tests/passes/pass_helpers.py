"""Helpers for pass tests: text graphs in, structural comparison out.

``apply(text, pass_name)`` parses a graph, runs one pass with verification on
random sample inputs and returns the graph and its record; ``assert_graph``
compares a graph with expected text up to value names (TVM-style structural
equality written as short text).
"""

from __future__ import annotations

import re

import torch

from transfuse.ir.graph import Graph
from transfuse.ir.interpret import interpret
from transfuse.ir.parser import parse_graph
from transfuse.ir.printer import print_graph
from transfuse.ir.types import DType, eval_dim
from transfuse.ir.verify import verify
from transfuse.passes.log import PassRecord
from transfuse.passes.manager import compare_outputs, run_passes

SYMBOLS = {"batch": 2, "seq": 5, "n": 3}


def sample_inputs(graph: Graph, env: dict[str, int] | None = None, seed: int = 0) -> list:
    env = {**SYMBOLS, **(env or {})}
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in graph.inputs:
        shape = [eval_dim(d, env) for d in v.type.shape]
        if v.dtype.is_float:
            out.append(torch.randn(shape, generator=gen).to(v.dtype.torch))
        elif v.dtype == DType.bool:
            out.append(torch.rand(shape, generator=gen) > 0.5)
        else:
            out.append(torch.randint(0, 4, shape, generator=gen).to(v.dtype.torch))
    return out


def apply(text: str, *passes: str, options: dict | None = None, rtol: float = 0.0,
          atol: float = 0.0) -> tuple[Graph, PassRecord]:
    """Run ``passes`` on the parsed graph with IR and numeric verification; check outputs
    (bit-exact unless a tolerance is given: fused ops may round differently)."""
    graph = parse_graph(text)
    verify(graph)
    inputs = sample_inputs(graph)
    before = interpret(graph, inputs)
    log = run_passes(graph, list(passes), verify=True, sample_inputs=inputs, options=options,
                     **({"rtol": max(rtol, 1e-4), "atol": max(atol, 1e-5)} if rtol or atol else {}))
    for r in log.records:
        assert r.status in ("changed", "unchanged"), f"{r.name} {r.status}: {r.error}"
    verify(graph)
    check = compare_outputs(before, interpret(graph, inputs), rtol=rtol, atol=atol)
    assert check.ok, check
    return graph, log.records[-1]


def canonical(graph: Graph) -> str:
    """The printed graph with values renamed in order of appearance, constants in
    order of first use (unused ones last) and comments stripped."""
    g = graph.clone()
    names: dict[int, str] = {}
    order = []

    def name(v, prefix):
        if v is not None and id(v) not in names:
            names[id(v)] = f"{prefix}{len(names)}"
            order.append(v)

    for v in g.inputs:
        name(v, "in")
    for n in g.nodes:
        for v in n.inputs:
            if v is not None and v.is_const:
                name(v, "c")
        for v in n.outputs:
            name(v, "v")
    for v in g.outputs:
        if v.is_const:
            name(v, "c")
    consts = [v for v in order if v.is_const]
    unused = sorted((v for v in g.constants.values() if id(v) not in names),
                    key=lambda v: str(v.type))
    for v in unused:
        name(v, "c")
    for v in order:
        v.name = names[id(v)]
    g.constants = {v.name: v for v in consts + unused}
    text = print_graph(g)
    return "\n".join(re.sub(r"  #.*$", "", line).rstrip() for line in text.splitlines())


def assert_graph(graph: Graph, expected: str) -> None:
    got, want = canonical(graph), canonical(parse_graph(expected))
    assert got == want, f"graph differs from expected:\n--- got\n{got}\n--- want\n{want}"
