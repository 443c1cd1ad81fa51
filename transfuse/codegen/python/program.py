"""The runnable form of the python backend: generated source, compiled and bound.

``generate_python(graph)`` writes the module (:mod:`transfuse.codegen.python.generator`),
compiles it with ``compile()`` into a fresh namespace holding ``torch``, ``F`` and the
helpers of ``helpers.py`` (nothing else), registers it with :mod:`linecache` so
tracebacks show its lines, and binds the graph's constants. A failure inside a call
is annotated with the generated line and the IR node it came from.
"""

from __future__ import annotations

import functools
import hashlib
import linecache
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from transfuse.codegen.python.attention import attn_position_mask
from transfuse.codegen.python.blas import kmajor, stored_kmajor
from transfuse.codegen.python.generator import Generator, comment_text
from transfuse.codegen.python.helpers import NATIVE_HELPERS, helper_namespace
from transfuse.errors import LoweringError
from transfuse.ir.graph import Graph

logger = logging.getLogger(__name__)


def make_ref(table: list[tuple[Callable, dict, int]]) -> Callable:
    def _ref(op: str, index: int, inputs: list, env: dict) -> Any:
        impl, attrs, n_out = table[index]
        out = impl(inputs, attrs, env)
        if n_out == 1 and isinstance(out, (tuple, list)):
            return out[0]
        return out

    return _ref


class PythonProgram:
    """Generated Python for one graph: ``program(flat_inputs) -> list`` of the graph outputs.

    Attributes: ``source`` (the module text), ``device`` (of the bound constants),
    ``reference_ops`` (op -> why it runs through its reference implementation),
    ``reference_count``, ``emitted`` (op histogram of emitted statements),
    ``fallback_targets`` (aten ops of ``torch_fallback`` nodes), ``inference_mode``,
    ``kmajor_weights`` (constants stored K-major for ``gemm="blas"`` linears),
    ``native_calls`` (the helpers it calls that run codegen/native kernels when available).
    """

    def __init__(self, source: str, filename: str, code: Any, constants: dict[str, torch.Tensor],
                 const_names: dict[str, str], device: torch.device | None,
                 refs: list, line_info: dict[int, str], *, reference_ops: dict[str, str],
                 reference_count: int, emitted: Counter, fallback_targets: Counter,
                 inference_mode: bool = True, kmajor_weights: Sequence[str] = (),
                 native_calls: Sequence[str] = ()):
        self.source = source
        self.filename = filename
        self._code = code
        self._const_names = const_names  # python name -> graph constant name
        self.constants = constants  # graph constant name -> tensor (bound ones only)
        self.device = device
        self._refs = refs
        self._line_info = line_info
        self.reference_ops = reference_ops
        self.reference_count = reference_count
        self.emitted = emitted
        self.fallback_targets = fallback_targets
        self.kmajor_weights = list(kmajor_weights)
        self.native_calls = tuple(native_calls)
        self.inference_mode = inference_mode
        self._forward = self._bind()

    def _bind(self) -> Callable:
        namespace: dict[str, Any] = {"torch": torch, "F": F, **helper_namespace(),
                                     "__name__": "transfuse_generated"}
        exec(self._code, namespace)  # noqa: S102 - our own generated source, see module docstring
        dev = self.device if self.device is not None else torch.device("cpu")
        # small: ALiBi masks are H*S*T
        attn_mask = functools.lru_cache(maxsize=8)(attn_position_mask)
        return namespace["_bind"](self.constants, dev, make_ref(self._refs), attn_mask)

    def __call__(self, flat_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        try:
            if self.inference_mode:
                with torch.inference_mode():
                    return self._forward(*flat_inputs)
            return self._forward(*flat_inputs)
        except Exception as e:
            self._annotate(e)
            raise

    def _annotate(self, e: BaseException) -> None:
        annotate(e, self.filename, self.source, self._line_info, "generated code")

    def to(self, device: str | torch.device) -> PythonProgram:
        """Move the bound constants to ``device`` (in place; returns self)."""
        device = torch.device(device)
        self.constants = {k: t.to(device) for k, t in self.constants.items()}
        self.device = device
        self._forward = self._bind()
        return self

    def __repr__(self) -> str:
        return (f"PythonProgram({self.filename}, {len(self.source.splitlines())} lines, "
                f"device={self.device}, reference_ops={sorted(self.reference_ops)})")


def annotate(e: BaseException, filename: str, source: str, line_info: dict[int, str],
             what: str) -> None:
    """Name the line of generated module ``filename`` (text ``source``) a failure ``e`` came
    from, and the IR node that line runs (``line_info``), as a note on the exception."""
    tb = e.__traceback__
    lineno = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            lineno = tb.tb_lineno
        tb = tb.tb_next
    if lineno is None or not hasattr(e, "add_note"):
        return
    line = source.splitlines()[lineno - 1].strip()
    e.add_note(f"in {what} ({filename}) line {lineno}: {line}\n"
               f"  IR node: {line_info.get(lineno, '?')}")


def generate_python(graph: Graph, device: str | torch.device | None = None, *,
                    inference_mode: bool = True) -> PythonProgram:
    """Generate, compile and bind Python source for ``graph``.

    ``device``: move the constants there (the graph's own tensors are left untouched);
    by default they stay where they are. Calls run under ``torch.inference_mode()``
    unless ``inference_mode=False``.
    """
    gen = Generator(graph)
    source = gen.run()
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    filename = f"<transfuse-python-{comment_text(graph.name)}-{digest}>"
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as e:  # a backend bug: show where
        raise LoweringError(f"python backend produced invalid source at line {e.lineno}: "
                            f"{e.msg}\n  {e.text}") from e
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    constants = {cname: graph.constants[cname].const for cname in gen.const_names.values()}
    dev = torch.device(device) if device is not None else None
    kmajor_names = _kmajor_weights(graph, constants, dev)
    if dev is not None:
        constants = {k: t.to(dev) for k, t in constants.items()}
    elif constants:
        dev = next(iter(constants.values())).device
    if gen.reference_ops:
        logger.info("python backend: %d node(s) of graph %s run through reference "
                    "implementations: %s", gen.reference_count, graph.name,
                    ", ".join(f"{op} ({why})" for op, why in sorted(gen.reference_ops.items())))
    return PythonProgram(source, filename, code, constants, gen.const_names, dev, gen.refs,
                         gen.line_info, reference_ops=gen.reference_ops,
                         reference_count=gen.reference_count, emitted=gen.emitted,
                         fallback_targets=gen.fallback_targets, inference_mode=inference_mode,
                         kmajor_weights=kmajor_names,
                         native_calls=[h for h in gen.helpers_used if h in NATIVE_HELPERS])


def _kmajor_weights(graph: Graph, constants: dict[str, torch.Tensor],
                    device: torch.device | None) -> list[str]:
    """Store the weights of ``gemm="blas"`` linears K-major (``blas.py``), in place in
    ``constants``; returns their names.

    Only a weight whose every use is the weight of a blas linear, on the CPU in float32;
    the tensor keeps its [N, K] values (a transposed view of the new storage), so the
    graph's constant can share it (``CompiledModel`` points it here: one copy).
    """
    if device is not None and device.type != "cpu":
        return []
    names = []
    for cname, v in graph.constants.items():
        t = constants.get(cname)
        if (t is not None and t.dim() == 2 and t.dtype == torch.float32
                and t.device.type == "cpu" and stored_kmajor(v)):
            constants[cname] = kmajor(t)
            names.append(cname)
    return names


__all__ = ["generate_python", "PythonProgram", "annotate", "make_ref"]
