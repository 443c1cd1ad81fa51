"""The contestants: what a model is run with, each built the same way.

A contestant has a ``name``, an optional declared ``tolerance`` (else the
dtype's default applies), ``kinds`` (the workloads it takes: a torch module
and/or an ONNX file), ``available() -> reason | None`` (cheap, checked before
building) and ``build(model, inputs, case) -> Runner``: a zero-argument callable
that runs the model once on the case's inputs, plus its compile seconds
(capture + passes + lowering; for ORT export + session creation; for
torch.compile the first call).

``build`` raises :class:`Unsupported` for "this contestant cannot take this model
yet" and anything else for a failure; the harness records both and goes on.

Registry: :func:`default_contestants` lists, in order, eager, torch.compile,
ORT on the dynamo export, ORT after its transformers optimizer, and transfuse at
every target of :data:`transfuse.api.TARGETS` and every requested level. A new
target shows up here by being added to TARGETS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from transfuse.bench.workloads import Case, Inputs

logger = logging.getLogger(__name__)


class Unsupported(Exception):
    """The contestant cannot take this model (not a failure of the contestant's build)."""


class StepFailed(Exception):
    """A build step crashed; the message already names the exception type and the step."""

    @classmethod
    def wrap(cls, e: BaseException, step: str) -> StepFailed:
        return cls(f"{type(e).__name__}: {e} (in {step}{_where(e)})")


def _where(e: BaseException) -> str:
    """ " at file.py:123": the innermost frame of ``e``'s traceback."""
    tb = traceback.extract_tb(e.__traceback__)
    return f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""


@dataclasses.dataclass
class Runner:
    fn: Callable[[], Any]
    compile_s: float
    notes: str = ""


class Contestant:
    name: str = "?"
    tolerance: float | None = None
    kinds: tuple[str, ...] = ("torch",)

    def available(self) -> str | None:
        return None

    def build(self, model: Any, inputs: Inputs, case: Case) -> Runner:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<contestant {self.name}>"


def _call(model: Any, inputs: Inputs) -> Callable[[], Any]:
    args, kwargs = inputs.args, inputs.kwargs
    return lambda: model(*args, **kwargs)


class Eager(Contestant):
    """The model as written, run by PyTorch op by op: the baseline."""

    name = "eager"

    def build(self, model, inputs, case):
        return Runner(_call(model, inputs), 0.0)


class TorchCompile(Contestant):
    """``torch.compile(model)`` with inductor in its default mode; compile time is the first call."""

    name = "torch.compile"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def available(self):
        if not hasattr(torch, "compile"):
            return "this torch has no torch.compile"
        if torch.device(self.device).type == "cpu" and not any(
                shutil.which(c) for c in ("g++", "c++", "clang++")):
            return "inductor on CPU needs a C++ compiler (g++ / clang++); none on PATH"
        return None

    def build(self, model, inputs, case):
        torch._dynamo.reset()  # a clean compile: no cache entries from an earlier case
        compiled = torch.compile(model)
        fn = _call(compiled, inputs)
        t0 = time.perf_counter()
        with torch.inference_mode():
            fn()
        if torch.device(case.device).type == "cuda":
            torch.cuda.synchronize()
        return Runner(fn, time.perf_counter() - t0)


# -- ONNX Runtime ----------------------------------------------------------------------------

#: ORT transformers optimizer model_type per model family
ORT_MODEL_TYPES = {"gpt2": "gpt2", "bert": "bert", "llama": "gpt2", "mistral": "gpt2",
                   "qwen2": "gpt2"}


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_runner(session, inputs: Inputs, compile_s: float, notes: str = "") -> Runner:
    named = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
             for k, v in inputs.named().items()}
    wanted = [i.name for i in session.get_inputs()]
    if all(n in named for n in wanted):
        feeds = {n: named[n] for n in wanted}
    elif len(wanted) == len(named):  # names differ: match by position
        feeds = dict(zip(wanted, named.values()))
    else:
        raise RuntimeError(f"the ONNX model wants inputs {wanted}, we have {list(named)}")
    return Runner(lambda: session.run(None, feeds), compile_s, notes)


@contextlib.contextmanager
def _quiet():
    """Keep the exporter's and ORT optimizer's progress prints (stdout) out of the report."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        yield
    if sink.getvalue().strip():
        logger.debug("captured output:\n%s", sink.getvalue())


def _export_dynamic_shapes(model: torch.nn.Module, inputs: Inputs, case: Case):
    if case.seq < 2:
        return None
    hi = case.info.max_seq if case.info and case.info.max_seq else 4096
    seq = torch.export.Dim("seq", min=2, max=hi)
    return {name: {1: seq} for name, v in inputs.named().items()
            if isinstance(v, torch.Tensor) and v.dim() >= 2}


def onnx_export(model: Any, inputs: Inputs, case: Case) -> tuple[Path, float]:
    """The model as ONNX (``torch.onnx.export(dynamo=True)``, dynamic seq axis), once per case.

    An ONNX-file workload is its own export (0 s). The result, or the error, is
    kept in ``case.shared`` so both ORT contestants use one export.
    """
    if isinstance(model, Path):
        return model, 0.0
    memo = case.shared.get("onnx_export")
    if memo is None:
        path = Path(case.workdir) / "model.onnx"
        t0 = time.perf_counter()
        try:
            with _quiet():
                program = torch.onnx.export(
                    model, inputs.args, kwargs=inputs.kwargs or None, dynamo=True,
                    verbose=False, dynamic_shapes=_export_dynamic_shapes(model, inputs, case))
                program.save(str(path))
            memo = (path, time.perf_counter() - t0)
        except Exception as e:  # kept so the second ORT contestant reports the same failure
            memo = StepFailed.wrap(e, "torch.onnx.export(dynamo=True)")
        case.shared["onnx_export"] = memo
    if isinstance(memo, Exception):
        raise memo
    return memo


class _OrtContestant(Contestant):
    kinds = ("torch", "onnx")

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def available(self):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed"
        if torch.device(self.device).type != "cpu":
            return "the ORT contestants run on CPU only (no IOBinding path yet)"
        return None


class OrtExport(_OrtContestant):
    """ONNX Runtime (all graph optimizations) on the model exported by torch's dynamo exporter;
    on an ONNX file, ORT on that file (the baseline there)."""

    name = "ort"

    def available(self):
        reason = super().available()
        if reason is None:
            try:
                import onnxscript  # noqa: F401  (the dynamo exporter needs it)
            except ImportError:
                return "torch.onnx.export(dynamo=True) needs onnxscript"
        return reason

    def build(self, model, inputs, case):
        path, export_s = onnx_export(model, inputs, case)
        t0 = time.perf_counter()
        session = _ort_session(path, case.threads)
        return _ort_runner(session, inputs, export_s + time.perf_counter() - t0)


class OrtOptimized(OrtExport):
    """ONNX Runtime after ``onnxruntime.transformers.optimizer.optimize_model`` (its fusions for
    attention, layer norm, GELU ...), model_type chosen by family."""

    name = "ort-opt"

    def build(self, model, inputs, case):
        from onnxruntime.transformers.optimizer import optimize_model

        path, export_s = onnx_export(model, inputs, case)
        info = case.info
        family = info.family if info else None
        model_type = ORT_MODEL_TYPES.get(family or "", "bert")
        t0 = time.perf_counter()
        try:
            with _quiet():
                optimized = optimize_model(str(path), model_type=model_type,
                                           num_heads=info.num_heads if info else 0,
                                           hidden_size=info.hidden_size if info else 0)
            out = Path(case.workdir) / "model.ort-opt.onnx"
            optimized.save_model_to_file(str(out))
        except Exception as e:
            raise StepFailed.wrap(e, f"ORT optimize_model, model_type={model_type}") from e
        session = _ort_session(out, case.threads)
        fused = optimized.get_fused_operator_statistics()
        notes = f"model_type={model_type}; fused: " + (
            ", ".join(f"{k}={v}" for k, v in sorted(fused.items()) if v) or "nothing")
        return _ort_runner(session, inputs, export_s + time.perf_counter() - t0, notes)


# -- transfuse -------------------------------------------------------------------------------


class Transfuse(Contestant):
    """``transfuse.optimize`` at one target and level; compile time is the whole call."""

    kinds = ("torch", "onnx")

    def __init__(self, target: str, level: str) -> None:
        self.target, self.level = target, level
        self.name = f"transfuse-{target}-{level}"

    def available(self) -> str | None:
        if self.target == "tensorrt":
            from transfuse.codegen.tensorrt.available import tensorrt_unavailable

            why = tensorrt_unavailable()
            # without TensorRT the target runs its ONNX in ONNX Runtime: not TensorRT's time
            return None if why is None else f"no TensorRT engine can run here: {why}"
        if self.target != "triton":
            return None
        from transfuse.codegen.triton import env

        why = env.triton_unavailable()
        if why is None and env.interpreting():
            why = ("no CUDA device: the triton target runs through Triton's interpreter here "
                   "(for checking correctness; each program costs ~2 ms), so its time would "
                   "say nothing")
        return why

    def build(self, model, inputs, case):
        import transfuse
        from transfuse.errors import LoweringError, TransfuseError

        t0 = time.perf_counter()
        if isinstance(model, Path):  # an ONNX file: needs the ONNX frontend
            inputs = Inputs((), {k: torch.as_tensor(v) for k, v in inputs.kwargs.items()},
                            inputs.names)
            try:
                compiled = transfuse.optimize(str(model), (), inputs.kwargs,
                                              level=self.level, target=self.target)
            except TransfuseError as e:
                raise Unsupported(str(e)) from e
        else:
            try:
                compiled = transfuse.optimize(model, inputs.args, inputs.kwargs,
                                              dynamic=case.dynamic, level=self.level,
                                              target=self.target, device=case.device)
            except LoweringError as e:  # the target cannot express this graph: not a failure
                raise Unsupported(str(e)) from e
        compile_s = time.perf_counter() - t0
        return Runner(_call(compiled, inputs), compile_s)


def default_contestants(kind: str = "torch", device: str = "cpu",
                        levels: Sequence[str] = ("O1", "O2")) -> list[Contestant]:
    """Every contestant for a workload kind, baseline first."""
    from transfuse.api import TARGETS

    everyone: list[Contestant] = [Eager(), TorchCompile(device), OrtExport(device),
                                  OrtOptimized(device)]
    everyone += [Transfuse(target, level) for target in TARGETS for level in levels]
    return [c for c in everyone if kind in c.kinds]


def baseline_name(kind: str) -> str:
    return "ort" if kind == "onnx" else "eager"


def select(contestants: Sequence[Contestant], names: Sequence[str] | None,
           baseline: str) -> list[Contestant]:
    """Keep the baseline and those named (a name or a prefix such as ``transfuse``)."""
    if not names:
        return list(contestants)
    known = [c.name for c in contestants]
    unknown = [n for n in names if not any(k == n or k.startswith(n) for k in known)]
    if unknown:
        raise ValueError(f"unknown contestant(s) {unknown}; known: {known}")
    return [c for c in contestants
            if c.name == baseline or any(c.name == n or c.name.startswith(n) for n in names)]
