"""``CompiledModel``: a lowered graph that is called like the original model.

A call goes ``signature.flatten_inputs`` (names, dtypes, ranks, static dims,
symbol ranges and consistency, all checked up front as :class:`InputError`)
-> the backend program on the flat graph inputs -> ``signature.build_outputs``
(the model's own tuple / dict / dataclass structure).

The compiled model owns its graph: the weights live once, in the graph's
constants, which are the same tensors the backend program bound (``to(device)``
moves both). ``save(path)`` writes an artifact (:mod:`transfuse.runtime.artifact`) and
:func:`load` reads one back.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch

from transfuse.codegen.targets import get_target
from transfuse.errors import ArtifactError, InputError, LoweringError
from transfuse.ir.graph import Graph
from transfuse.ir.signature import Signature
from transfuse.runtime import artifact


def lower(graph: Graph, backend: str = "python", device: str | torch.device | None = None):
    """Build the runnable program of ``graph`` with the target named ``backend``
    (:mod:`transfuse.codegen.targets`)."""
    return get_target(backend).build(graph, device=device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


class CompiledModel:
    """Callable like the captured model: same inputs, same output structure."""

    def __init__(self, graph: Graph, signature: Signature, pass_log: Any = None,
                 backend: str = "python", program: Any = None, meta: dict | None = None):
        _check_signature(graph, signature)
        self._graph = graph
        self._signature = signature
        self._pass_log = pass_log
        self._backend = backend
        self.meta: dict[str, Any] = dict(meta or {})
        self._program = program if program is not None else lower(graph, backend)
        bind = getattr(self._program, "bind_signature", None)
        if callable(bind):  # the tensorrt target's engine profiles need the symbol ranges
            bind(signature)
        self._share_weights()
        self._note_lowering()

    # -- calling -----------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = self._signature.flatten_inputs(args, kwargs)
        device = self.device
        if device is not None:
            for spec, t in zip(self._signature.inputs, flat):
                if not _same_device(t.device, device):
                    raise InputError(f"input {spec.name!r} is on {t.device}, but the compiled "
                                     f"model's weights are on {device}; move the input or call "
                                     f".to({str(t.device)!r})")
        return self._signature.build_outputs(self._program(flat))

    # -- properties ----------------------------------------------------------------------

    @property
    def graph(self) -> Graph:
        return self._graph

    @property
    def signature(self) -> Signature:
        return self._signature

    @property
    def pass_log(self) -> Any:
        return self._pass_log

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def program(self) -> Any:
        return self._program

    @property
    def source(self) -> str:
        """The generated source (python backend) or the backend's readable form."""
        return getattr(self._program, "source", "")

    @property
    def kernels(self) -> list:
        """The kernels the program runs, each with its name, kind, source and the IR nodes it
        covers (the triton target: ``KernelInfo``); empty for backends that do not list them."""
        return list(getattr(self._program, "kernels", []))

    @property
    def device(self) -> torch.device | None:
        """Where the weights are (None for a graph without weights)."""
        return getattr(self._program, "device", None)

    # -- moving and saving -----------------------------------------------------------------

    def to(self, device: str | torch.device) -> CompiledModel:
        """Move the weights to ``device`` (in place; returns self)."""
        if not hasattr(self._program, "to"):
            raise LoweringError(f"the {self._backend} backend cannot move to {device}")
        self._program.to(device)
        self._share_weights()
        return self

    def save(self, path: str) -> None:
        """Write an artifact directory; see :func:`transfuse.runtime.artifact.save`."""
        artifact.save(self, path)

    def export_onnx(self, path: str, *, fused: bool = True, opset: int | None = None) -> str:
        """Write the graph as a self-contained ONNX model (any backend): ORT's fused
        com.microsoft ops unless ``fused=False``; weights in ``<path>.data`` above 2 GB."""
        from transfuse.codegen.onnx import DEFAULT_OPSET, export_graph, save_model

        model = export_graph(self._graph, self._signature, fused=fused,
                             opset=opset or getattr(self._program, "opset", DEFAULT_OPSET))
        return str(save_model(model, path))

    def export_tensorrt(self, path: str, *, attention: str = "onnx", trt_version: str = "10.14",
                        opset: int = 23, profiles: Any = None, opt: Any = None) -> str:
        """Write a TensorRT export directory (any backend): ``model.onnx`` (strongly typed ONNX
        for TensorRT ``trt_version``'s parser, ``attention`` "onnx" or "decomposed"),
        ``profiles.json`` (optimization profiles from the symbol ranges; ``profiles=`` a list of
        symbol -> (min, max) or (min, opt, max), ``opt=`` symbol -> opt point), ``build_engine.py``
        (builds ``model.engine`` where TensorRT is installed), ``README.md``, and the artifact
        files, so :func:`load` reads it back (see :mod:`transfuse.codegen.tensorrt.target`)."""
        artifact.save(self, path, backend="tensorrt",
                      tensorrt={"attention": attention, "trt_version": trt_version,
                                "opset": opset, "profiles": profiles, "opt": opt})
        return str(path)

    def _note_lowering(self) -> None:
        """Add what the backend emitted (e.g. fused-op counts) to the pass log, once."""
        notes = getattr(self._program, "lowering_notes", None)
        log = self._pass_log
        if notes is None or log is None or not hasattr(log, "add"):
            return
        name = f"lower.{self._backend}"
        if any(r.name == name for r in log.records):
            return
        from transfuse.passes.log import PassRecord

        record = PassRecord(name, nodes_before=len(self._graph), nodes_after=len(self._graph),
                            notes=list(notes()))
        for op, n in sorted(getattr(self._program, "fused_counts", {}).items()):
            record.rules[f"{self._backend}/{op}"] = {"tried": n, "matched": n, "missed": 0,
                                                     "events": 0}
        log.add(record)

    def _share_weights(self) -> None:
        """Point the graph's constants at the program's (possibly moved) tensors: one copy."""
        bound = getattr(self._program, "constants", None)
        if not isinstance(bound, dict):
            return
        for name, t in bound.items():
            v = self._graph.constants.get(name)
            if v is not None and v.const is not t and v.const.shape == t.shape \
                    and v.const.dtype == t.dtype:
                v.const = t

    # -- summary -------------------------------------------------------------------------------

    def __repr__(self) -> str:
        g, sig = self._graph, self._signature
        hist = Counter(n.op for n in g.nodes)
        ops = ", ".join(f"{op}×{n}" for op, n in hist.most_common(8))
        if len(hist) > 8:
            ops += f", +{len(hist) - 8} more"
        numel = sum(v.const.numel() for v in g.constants.values())
        nbytes = sum(v.const.numel() * v.const.element_size() for v in g.constants.values())
        inputs = ", ".join(f"{s.name}: {s.type}" for s in sig.inputs)
        symbols = ", ".join(f"{k}∈[{lo}, {hi}]" for k, (lo, hi) in sig.symbols.items()) or "none"
        refs = getattr(self._program, "reference_ops", None)
        lines = [
            f"CompiledModel(backend={self._backend!r}, device={self.device}",
            f"  inputs: {inputs}",
            f"  symbols: {symbols}",
            f"  graph {g.name}: {len(g)} nodes ({ops or 'none'})",
            f"  params: {_human(numel)} ({_human(nbytes, 'B')}) in {len(g.constants)} constants",
        ]
        if refs:
            lines.append(f"  reference implementations: {', '.join(sorted(refs))}")
        if self._pass_log is not None and hasattr(self._pass_log, "records"):
            lines.append(f"  passes: {len(self._pass_log.records)} (print .pass_log)")
        return "\n".join(lines) + ")"


def load(path: str | os.PathLike, device: str | torch.device | None = None, *,
         engine: bool | None = None) -> CompiledModel:
    """Read an artifact directory back into a :class:`CompiledModel` (weights on ``device``).

    The files are checked and parsed by :func:`transfuse.runtime.artifact.read`; the program
    is regenerated with the artifact's backend (the saved source is never executed). A
    generation artifact loads here as its step; ``transfuse.load`` makes it a GenerationModel.

    A TensorRT export (``export_tensorrt``) runs its ``model.engine`` where TensorRT can, else its
    ``model.onnx`` in ONNX Runtime (``model.meta["runs"]`` says which and why); ``engine=True``
    makes that fallback an :class:`ArtifactError`, ``engine=False`` always takes it.
    """
    return from_contents(artifact.read(path, device), engine=engine, device=device)


def from_contents(contents: artifact.ArtifactContents, build: Any = None, *,
                  engine: bool | None = None, device: str | torch.device | None = None) -> Any:
    """Lower what :func:`artifact.read` checked; ``build(contents, program)`` makes the model
    (default: a :class:`CompiledModel`). A failure is an :class:`ArtifactError`.
    A backend with ``load_artifact`` (tensorrt) loads its own files from the directory."""
    try:
        meta = dict(contents.meta)
        load_artifact = getattr(get_target(contents.backend), "load_artifact", None)
        if load_artifact is not None:
            program = load_artifact(contents.root, contents.graph, engine=engine, device=device)
            meta["runs"] = getattr(program, "runs", contents.backend)
        else:
            program = lower(contents.graph, contents.backend)
        if build is not None:
            return build(contents, program)
        return CompiledModel(contents.graph, contents.signature, contents.pass_log,
                             backend=contents.backend, program=program, meta=meta)
    except LoweringError as e:
        raise ArtifactError(f"{contents.root / artifact.MANIFEST}: cannot rebuild the model: "
                            f"{e}") from None


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n}{unit}"


def _check_signature(graph: Graph, signature: Signature) -> None:
    """The signature must describe the graph's inputs and outputs exactly."""
    specs = signature.inputs
    if len(specs) != len(graph.inputs):
        raise LoweringError(f"signature has {len(specs)} inputs "
                            f"({', '.join(s.name for s in specs)}) but graph {graph.name} takes "
                            f"{len(graph.inputs)} ({', '.join(v.name for v in graph.inputs)})")
    for spec, v in zip(specs, graph.inputs):
        if spec.type != v.type:
            raise LoweringError(f"signature input {spec.name!r} is {spec.type} but graph input "
                                f"%{v.name} is {v.type}")
    if signature.num_outputs != len(graph.outputs):
        raise LoweringError(f"signature expects {signature.num_outputs} outputs but graph "
                            f"{graph.name} returns {len(graph.outputs)}")


__all__ = ["CompiledModel", "lower", "load", "from_contents"]
