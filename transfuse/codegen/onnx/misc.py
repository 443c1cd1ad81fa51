"""ONNX lowerings of ``identity``, ``dropout``, ``assert`` and ``torch_fallback``
(``transfuse/ir/opdefs/misc.py``).
"""

from __future__ import annotations

from transfuse.codegen.onnx.registry import LOWERINGS
from transfuse.errors import LoweringError
from transfuse.ir.graph import Node


@LOWERINGS.register("identity")
def _identity(b, node):
    return b.input(node, 0)


def _dropout_supports(node: Node) -> str | None:
    if node.attrs["train"]:
        return "training-mode dropout is random; an exported inference model cannot hold it"
    return None


@LOWERINGS.register("dropout", supports=_dropout_supports)
def _dropout(b, node):
    return b.input(node, 0)


@LOWERINGS.register("assert")
def _assert(b, node):
    """ONNX has no assertion op: the check is dropped (inputs are checked against the
    signature before every call) and the drop is noted in the program's summary."""
    note = f"assert dropped: {node.attrs['message'] or 'a runtime check from capture'}"
    if note not in b.notes:
        b.notes.append(note)
    return None


def _torch_fallback_supports(node: Node) -> str | None:
    return (f"torch_fallback of {node.attrs['target']} runs a PyTorch op that has no ONNX "
            "lowering; use target='python', or teach the frontend an IR op for it")


@LOWERINGS.register("torch_fallback", supports=_torch_fallback_supports)
def _torch_fallback(b, node):  # pragma: no cover - always refused
    raise LoweringError(_torch_fallback_supports(node))
