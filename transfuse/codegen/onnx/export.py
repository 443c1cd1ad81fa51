"""Lowering a whole graph to ONNX: the node loop, the model, writing it to disk.

``lower_graph(graph)`` runs the planning step (``plan.py``, fused exports only) and then
every node's lowering from :data:`~transfuse.codegen.onnx.registry.LOWERINGS` through an
:class:`~transfuse.codegen.onnx.builder.OnnxBuilder`; a node nothing can lower is a
:class:`LoweringError` naming the node and the reason (ONNX has no fallback into
PyTorch). ``export_graph`` returns the self-contained model, ``save_model`` writes it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch

from transfuse.codegen.lowering import Lowerings
from transfuse.codegen.onnx.builder import OnnxBuilder
from transfuse.codegen.onnx.plan import plan
from transfuse.codegen.onnx.registry import LOWERINGS
from transfuse.codegen.onnx.tensors import DEFAULT_OPSET, PROTOBUF_LIMIT
from transfuse.errors import LoweringError
from transfuse.ir.graph import Graph, Node
from transfuse.ir.ops import get_op


def lower_nodes(b: OnnxBuilder, overrides: Lowerings | None = None) -> None:
    """Lower every node of ``b.graph`` into ``b`` (after :func:`plan` when fused).

    ``overrides``: another target's lowerings of some ops (the TensorRT flavour), used instead
    of :data:`LOWERINGS` for the ops they hold; every other op takes the standard lowering.
    """
    if b.fused:
        plan(b)
    for node in b.graph.nodes:
        get_op(node.op)  # an unknown op is an error here, not in ORT
        table = overrides if overrides is not None and node.op in overrides else LOWERINGS
        reason = table.supports(node)
        if reason is not None:
            raise LoweringError(f"onnx backend cannot lower {describe(node)}: {reason}")
        b.current = node
        try:
            outs = table.get(node.op).fn(b, node)
        except LoweringError as e:
            raise LoweringError(f"onnx backend cannot lower {describe(node)}: {e}") from None
        finally:
            b.current = None
        if node.outputs:
            outs = [outs] if isinstance(outs, str) else list(outs)
            if len(outs) != len(node.outputs):
                raise LoweringError(f"onnx lowering of {node.op} made {len(outs)} outputs "
                                    f"for {len(node.outputs)}")
            for v, name in zip(node.outputs, outs):
                if name:
                    b.bind(v, name)


def describe(node: Node) -> str:
    """``%3, %4 = op (from user.source)``: a node in messages."""
    outs = ", ".join(f"%{v.name}" for v in node.outputs)
    where = f" (from {node.source})" if node.source else ""
    return f"{outs + ' = ' if outs else ''}{node.op}{where}"


def output_names(signature: Any, count: int) -> list[str]:
    """ONNX output names from the signature's output structure (``logits``, ``output_0``...)."""
    if signature is None:
        return [f"output_{i}" for i in range(count)]
    names: dict[int, str] = {}

    def walk(tree: dict, path: list[str]) -> None:
        kind = tree.get("kind")
        if kind == "tensor":
            names.setdefault(tree["index"], "_".join(path) or "output")
        elif kind in ("tuple", "list"):
            for i, item in enumerate(tree.get("items", [])):
                walk(item, path + [str(i)] if path else [f"output_{i}"])
        elif kind in ("dict", "dataclass"):
            for key, item in zip(tree.get("keys", []), tree.get("items", [])):
                walk(item, path + [str(key)])

    walk(signature.output_tree, [])
    out, seen = [], set()
    input_names = {s.name for s in signature.inputs}
    for i in range(count):
        n = "".join(c if c.isalnum() or c in "_." else "_" for c in names.get(i, f"output_{i}"))
        while n in seen or n in input_names:
            n += "_"
        seen.add(n)
        out.append(n)
    return out


def lower_graph(graph: Graph, signature: Any = None, *, fused: bool = True,
                opset: int = DEFAULT_OPSET, external: bool = False,
                providers: Sequence[str] | None = None
                ) -> tuple[onnx.ModelProto, dict[str, torch.Tensor], OnnxBuilder]:
    builder = OnnxBuilder(graph, fused=fused, opset=opset, providers=providers)
    lower_nodes(builder)
    names = output_names(signature, len(graph.outputs))
    model, inits = builder.build(names, external=external)
    return model, inits, builder


def export_graph(graph: Graph, signature: Any = None, *, fused: bool = True,
                 opset: int = DEFAULT_OPSET, providers: Sequence[str] | None = None
                 ) -> onnx.ModelProto:
    """The graph as a self-contained ONNX model (weights inside).

    ``fused``: use ORT's com.microsoft fused ops where they match exactly; ``False`` gives
    standard ONNX ops only (any ONNX runtime). ``providers``: the execution providers the
    model is meant for (default CPU); where two exact forms exist it picks the one faster
    there (SkipLayerNormalization for CUDA, Add + LayerNormalization for the CPU EP). Every
    fused op emitted runs on the CPU EP.
    """
    model, _, _ = lower_graph(graph, signature, fused=fused, opset=opset, providers=providers)
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *,
               external_threshold: int = PROTOBUF_LIMIT) -> Path:
    """Write ``model`` to ``path``; weights go to ``<name>.data`` next to it when the model is
    larger than ``external_threshold`` bytes (protobuf cannot hold more than 2 GB)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # external data is appended to: start from nothing
    if size + 1_000_000 > external_threshold:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


__all__ = ["lower_graph", "lower_nodes", "export_graph", "save_model", "output_names", "describe"]
