"""Reference interpreter: runs any graph node by node with the OpDef
reference implementations. Slow and simple on purpose: it is the oracle
that passes and backends are checked against."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from transfuse.errors import InputError, IRVerifyError
from transfuse.ir.graph import Graph, Node
from transfuse.ir.ops import run_reference
from transfuse.ir.types import DType


def bind_symbols(graph: Graph, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """Values of the graph's symbolic dims, read from the input shapes (checked consistent)."""
    if len(inputs) != len(graph.inputs):
        raise InputError(f"graph {graph.name} takes {len(graph.inputs)} inputs, got {len(inputs)}")
    env: dict[str, int] = {}
    for v, t in zip(graph.inputs, inputs):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"input {v.name}: expected a tensor of {v.type}, got {type(t).__name__}")
        if t.dim() != v.type.rank:
            raise InputError(f"input {v.name}: expected rank {v.type.rank} ({v.type}), got shape {tuple(t.shape)}")
        for i, (d, actual) in enumerate(zip(v.type.shape, t.shape)):
            if isinstance(d, int):
                if d != actual:
                    raise InputError(f"input {v.name}: dim {i} must be {d} ({v.type}), got {actual}")
            elif d.is_Symbol:
                prev = env.setdefault(d.name, int(actual))
                if prev != actual:
                    raise InputError(f"input {v.name}: dim {i} ({d.name}) is {actual} but {d.name}={prev} elsewhere")
    return env


def interpret(graph: Graph, inputs: Sequence[torch.Tensor], *, check_types: bool = True,
              observe: Callable[[Node, list, list], None] | None = None) -> list[torch.Tensor]:
    """Run ``graph`` on ``inputs``; returns the graph outputs as a list.

    ``observe(node, args, outs)``, when given, is called after each node with its input and
    output tensors (calibration reads the inputs of the layers it quantizes this way); it
    must not modify them."""
    env = bind_symbols(graph, inputs)
    vals: dict[int, torch.Tensor] = {id(v): t for v, t in zip(graph.inputs, inputs)}
    for c in graph.constants.values():
        vals[id(c)] = c.const
    for node in graph.nodes:
        args = [None if v is None else vals[id(v)] for v in node.inputs]
        try:
            outs = run_reference(node, args, env)
        except (InputError, IRVerifyError):
            raise
        except Exception as e:  # the reference op failed: name the node
            where = node.source or "?"
            raise IRVerifyError(f"interpreting {node!r} (from {where}) failed: {type(e).__name__}: {e}") from e
        if len(outs) != len(node.outputs):
            raise IRVerifyError(f"{node!r}: reference produced {len(outs)} outputs, expected {len(node.outputs)}")
        for v, t in zip(node.outputs, outs):
            if check_types:
                _check(v, t, env)
            vals[id(v)] = t
        if observe is not None:
            observe(node, args, outs)
    return [vals[id(v)] for v in graph.outputs]


def _check(v, t: torch.Tensor, env: Mapping[str, int]) -> None:
    want = v.type
    if DType.from_torch(t.dtype) != want.dtype or tuple(t.shape) != want.concrete(env):
        raise IRVerifyError(
            f"value %{v.name} from {v.producer!r}: declared {want} = {want.concrete(env)}, "
            f"but reference gave {DType.from_torch(t.dtype)}{list(t.shape)}"
        )
