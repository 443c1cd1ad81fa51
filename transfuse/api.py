"""``transfuse.optimize``: capture → pass pipeline → lowering → CompiledModel.

This is the only place that strings the components together (DESIGN.md §1):
a frontend never runs a pass, a pass never calls a backend.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from transfuse.codegen.targets import get_target, target_names

# Triton fixes interpreter-or-GPU mode when it is first imported, and torch.export imports it
# while capturing: decide the mode (the interpreter where there is no CUDA device) first
from transfuse.codegen.triton import env as _triton_env  # noqa: F401
from transfuse.errors import CaptureError, LoweringError, PassError, TransfuseError

#: targets a user can ask for: every backend of :data:`transfuse.codegen.targets.TARGET_MODULES`
TARGETS = target_names()


def optimize(
    model: Any,
    example_inputs: Sequence[Any] | Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic: Mapping[str, Any] | None = None,
    level: str = "O2",
    target: str = "python",
    verify: bool = False,
    sample_inputs: Sequence[torch.Tensor] | None = None,
    passes: Sequence[str] | None = None,
    options: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    logits: str = "all",
    convert_gqa: int | None = None,
    sparse_attention: str | None = None,
    max_error: float | None = None,
    generation: bool | Mapping[str, Any] | None = None,
    quantize: str | Mapping[str, Any] | None = None,
    calibration: Sequence[Any] | None = None,
    evaluation: Sequence[Any] | None = None,
    min_sqnr: float | None = None,
):
    """Compile ``model`` for ``example_inputs``; returns a :class:`CompiledModel`.

    Args:
        model: a ``torch.nn.Module`` in eval mode, or an ONNX model (a path to a ``.onnx``
            file, its bytes, or an ``onnx.ModelProto``; see ``transfuse.frontend.onnx``).
        example_inputs: positional example inputs (a tensor or a tuple of them); optional for
            an ONNX model (then deterministic inputs of its declared types are the samples).
        example_kwargs: keyword example inputs (``attention_mask=...``).
        dynamic: symbolic dims and their ranges, e.g. ``{"seq": (1, 1024)}``; ``batch`` is dim 0
            and ``seq`` dim 1 of every input by convention, other names need
            ``{"name": {"range": (lo, hi), "dims": {"input": dim}}}``. For an ONNX model the
            names are the model's own dim names and only ranges are given.
        level: ``"O0"`` (capture only), ``"O1"`` (cleanup), ``"O2"`` (everything proven safe).
        target: backend; one of :data:`TARGETS`.
        verify: check every pass numerically against the graph before it on sample inputs
            and roll back a pass that changes results beyond tolerance.
        sample_inputs: flat graph inputs for ``verify`` (default: the example inputs).
        passes: an explicit list of pass names instead of ``level``'s pipeline.
        options: pass options (see ``transfuse.passes.pipelines``).
        device: move the compiled model's weights to this device.
        logits: ``"last"`` computes the LM head for the last position only (generation
            prefill); the output's sequence dim becomes 1.
        convert_gqa: opt-in, changes the model: mean-pool K/V heads into this many groups
            (1 = MQA); the pass log reports the error it introduced.
        sparse_attention: opt-in, changes the model: ``"window:W"`` or
            ``"block:B,local:L,global:G"``; the pass log reports the error.
        max_error: refuse an opt-in conversion whose max abs output error exceeds this.
        generation: compile a causal LM for generation (``True`` or ``{"max_seq_len",
            "max_batch", "kv": "contiguous" | "paged", "block_size", ...}``): the KV cache
            goes into the graph and a ``GenerationModel`` (``generate()``, ``save()``) is
            returned; the compiled step alone is :func:`compile_generation_step`.
        quantize: opt-in, changes the model: a scheme (``"int8-weight"``, ``"int4-weight"``,
            ``"int4-gptq"``, ``"int4-awq"``, ``"w8a8"``, ``"fp8"``) or a dict with the scheme
            and its options (``transfuse.passes.quant.config``); the pass log's
            ``quant_report()`` says what it did and what it cost.
        calibration: batches the quantizer runs the model on (GPTQ, AWQ, SmoothQuant, SQNR):
            each a tensor (the first input, e.g. ``input_ids``), a tuple of inputs or a dict.
        evaluation: batches for the report's end-to-end numbers (default: calibration's;
            ``False``: not measured, e.g. when you score the model yourself).
        min_sqnr: keep layers whose output SQNR (dB) would be under this in float.
    """
    from transfuse.frontend.torch_export import capture
    from transfuse.passes.manager import run_pipeline
    from transfuse.runtime.compiled import CompiledModel

    if generation is not None and generation is not False:
        ignored = {"example_kwargs": example_kwargs, "dynamic": dynamic, "options": options,
                   "sample_inputs": sample_inputs, "convert_gqa": convert_gqa,
                   "sparse_attention": sparse_attention, "max_error": max_error,
                   "logits": None if logits == "all" else logits}
        given = sorted(k for k, v in ignored.items() if v is not None)
        if given:
            raise PassError(f"optimize(generation=...) captures input_ids/position_ids itself "
                            f"and computes logits at the rows each step asks for; it does not "
                            f"take {', '.join(given)}")
        quant = {"quantize": quantize, "calibration": calibration, "evaluation": evaluation,
                 "min_sqnr": min_sqnr}
        return _optimize_generation(model, example_inputs, generation, target=target,
                                    device=device, verify=verify, level=level, passes=passes,
                                    quant=quant)
    if target not in TARGETS:
        raise LoweringError(f"unknown target {target!r}; available targets: {', '.join(TARGETS)}")
    backend = get_target(target)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise CaptureError("example_inputs must be a tensor or a tuple/list of inputs, got "
                           f"{type(example_inputs).__name__}")
    onnx_model = _is_onnx_model(model)
    if not onnx_model and not isinstance(model, torch.nn.Module):
        raise CaptureError(f"optimize() takes a torch.nn.Module or an ONNX model (a path, bytes "
                           f"or an onnx.ModelProto), got {type(model).__name__}")

    if quantize is not None:
        _check_quantize_request(quantize, min_sqnr, level, passes)
        if onnx_model:
            from transfuse.quantization import onnx_quantized_ops

            found = onnx_quantized_ops(model)
            if found:
                raise PassError(f"quantize=: the ONNX model is quantized already (it has "
                                f"{', '.join(found)}); give it the float model")

    t0 = time.perf_counter()
    if onnx_model:
        from transfuse.frontend.onnx import capture_onnx

        captured = capture_onnx(model, dynamic=dynamic)
        if example_inputs or example_kwargs:  # the caller's examples are the samples
            captured.example_inputs = captured.signature.flatten_inputs(
                tuple(example_inputs), dict(example_kwargs or {}))
    else:
        captured = capture(model, tuple(example_inputs), dict(example_kwargs or {}), dynamic)
    capture_ms = (time.perf_counter() - t0) * 1e3

    graph = captured.graph
    samples = list(sample_inputs) if sample_inputs is not None else captured.example_inputs
    options = _pass_options(options, samples, target=backend, logits=logits,
                            convert_gqa=convert_gqa, sparse_attention=sparse_attention,
                            max_error=max_error)
    from transfuse.quantization import quant_options, signature_inputs

    options.update(quant_options(quantize, calibration, evaluation, min_sqnr,
                                 signature_inputs(captured.signature)))
    log = _run_quantized(run_pipeline, quantize, graph,
                         list(passes) if passes is not None else level, verify=verify,
                         sample_inputs=samples, options=options)

    t1 = time.perf_counter()
    try:
        program = backend.build(graph, device=device)
    except TransfuseError:
        raise
    except Exception as e:  # a backend bug must not surface as a raw torch error
        raise LoweringError(f"{target} backend failed: {type(e).__name__}: {e}") from e
    lower_ms = (time.perf_counter() - t1) * 1e3
    log.add_stage("capture", capture_ms)
    log.add_stage(f"lowering ({target})", lower_ms)
    meta = {"level": level if passes is None else "custom"}
    if getattr(program, "native_calls", ()):
        from transfuse.codegen import native

        # where the C kernels come from, or why torch's run instead (builds them if needed)
        meta["native_kernels"] = native.status()
    return CompiledModel(graph, captured.signature, log, backend=target, program=program,
                         meta=meta)


def _run_quantized(run_pipeline: Any, quantize: Any, graph: Any, level: Any, **kwargs: Any):
    """``run_pipeline``, and with ``quantize`` the guarantee that the model came out quantized:
    a failed quantization pass is an error even where ``verify=True`` rolls failed passes back
    and goes on (the user asked for a quantized model; a float one would be silently wrong),
    and a bad calibration batch surfaces as the InputError it is."""
    from transfuse.errors import InputError
    from transfuse.passes.log import FAILED

    try:
        log = run_pipeline(graph, level, **kwargs)
    except PassError as e:
        # the quantization pass checks everything before it changes anything: its own error
        # (which says so) is the one to show, not the manager's "may be partly rewritten"
        cause = e.__cause__
        if quantize is not None and isinstance(cause, (InputError, PassError)) and \
                str(e).startswith("pass quant.quantize-weights failed"):
            raise cause from None
        raise
    if quantize is not None:
        record = next((r for r in log if r.name == "quant.quantize-weights"), None)
        if record is not None and record.status == FAILED:
            raise PassError(f"quantize={quantize!r} failed, the model was not quantized: "
                            f"{record.error}")
    return log


def _check_quantize_request(quantize: Any, min_sqnr: Any, level: str, passes: Any) -> None:
    """PassError when the quantization request is invalid or its pass would not run."""
    from transfuse.passes.pipelines import PIPELINES
    from transfuse.quantization import check_quantize

    check_quantize(quantize, min_sqnr)
    names = list(passes) if passes is not None else PIPELINES.get(level, [])
    if "quant.quantize-weights" not in names:
        where = f"level {level!r}" if passes is None else "the given passes"
        raise PassError(f"quantize= needs the pass quant.quantize-weights, which {where} does "
                        "not run (use level='O2' or add it to passes=)")


def _is_onnx_model(model: Any) -> bool:
    """A path, bytes or an ``onnx.ModelProto``: what the ONNX frontend takes."""
    if isinstance(model, (str, bytes, bytearray, os.PathLike)):
        return True
    onnx = sys.modules.get("onnx")  # a ModelProto means onnx is imported already
    return onnx is not None and isinstance(model, onnx.ModelProto)


def _pass_options(options: Mapping[str, Any] | None, samples: Sequence[torch.Tensor],
                  **named: Any) -> dict[str, Any]:
    """Merge the named keyword options into the pass options, checked up front."""
    from transfuse.errors import PassError

    out = dict(options or {})
    if named["logits"] not in ("all", "last"):
        raise PassError(f"logits must be 'all' or 'last', got {named['logits']!r}")
    if named["logits"] == "last":
        out["logits"] = "last"
    g = named["convert_gqa"]
    if g is not None:
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise PassError(f"convert_gqa must be a positive number of kv heads, got {g!r}")
        out["convert_gqa"] = g
    if named["sparse_attention"] is not None:
        out["sparse_attention"] = named["sparse_attention"]
    if named["max_error"] is not None:
        out["max_error"] = float(named["max_error"])
    out.setdefault("sample_inputs", list(samples))
    # the Target object: passes read its name (ctx.target) and ask it (ctx.target_info)
    out.setdefault("target", named["target"])
    return out


# -- generation (issue 11) -------------------------------------------------------------------


def _optimize_generation(model: Any, example_inputs: Any, generation: Any, *, target: str,
                         device: Any, verify: bool, level: str, passes: Any,
                         quant: Mapping[str, Any] | None = None):
    """``optimize(generation=...)``: the compiled step and the model's generation config in a
    :class:`~transfuse.runtime.generation_model.GenerationModel`."""
    from transfuse.errors import InputError
    from transfuse.runtime.generation_model import GenerationModel

    if level != "O2" or passes is not None:
        raise PassError("generation compiles at O2 with generation.insert-kv-cache; "
                        f"level={level!r} / passes={passes!r} are not supported with it")
    if not isinstance(generation, (bool, Mapping)):
        raise InputError(f"generation must be True or a dict of options, got {generation!r}")
    ids = example_inputs[0] if isinstance(example_inputs, (tuple, list)) and example_inputs \
        else example_inputs
    step = compile_generation_step(model, ids, generation, target=target, device=device,
                                   verify=verify, **(quant or {}))
    return GenerationModel.from_step(step, getattr(model, "generation_config", None),
                                     backend=target)


def _capture_step(model: Any, ids: torch.Tensor, pos: torch.Tensor, geo: dict[str, Any],
                  asked: bool) -> tuple[Any, dict[str, Any]]:
    """Capture the step with N (tokens per step) dynamic up to ``geo["max_step_tokens"]``.

    A model that builds a position table for its own ``P`` positions and slices it by the
    step's length (MPT's ALiBi: ``table[..., max(0, P - N):]``) cannot keep N dynamic past
    P - 1 (torch specialises the slice at N = P). When that capture fails and the user did not
    ask for ``max_step_tokens``, the step is captured for N <= P - 1 instead and its prefill
    runs in chunks of that many tokens (generate(), the engine's ``max_tokens_per_step``).
    """
    from transfuse.errors import CaptureError
    from transfuse.frontend.torch_export import capture

    kwargs = {"input_ids": ids, "position_ids": pos, "use_cache": False}
    limit = geo["max_step_tokens"]
    try:
        return capture(model, (), kwargs, {"seq": (1, max(limit, 2))}), geo
    except CaptureError as first:
        positions = _max_positions(model)
        bound = positions - 1 if positions else 0
        if asked or not max(geo["max_batch"], 2) <= bound < limit:
            raise
        n = min(ids.shape[1], bound)
        kwargs.update(input_ids=ids[:, :n], position_ids=pos[:, :n])
        try:
            captured = capture(model, (), kwargs, {"seq": (1, bound)})
        except CaptureError:
            raise first from None
        why = (f"{type(model).__name__} keeps the step's token count dynamic only up to "
               f"{bound} (its {positions} positions; capture up to {limit}: "
               f"{str(first).splitlines()[0][:200]})")
    return captured, {**geo, "max_step_tokens": bound, "max_step_tokens_reason": why}


def _max_positions(model: Any) -> int | None:
    """The positions the model's config says it has (HF ``max_position_embeddings`` /
    ``n_positions``, MPT's ``max_seq_len``, the reference models' ``max_positions``), or None
    when it says nothing."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "max_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _is_causal_lm(model: Any) -> str | None:
    """Why ``model`` is not a Hugging Face causal LM with an LM head (None when it is)."""
    if not isinstance(model, torch.nn.Module):
        return f"generation takes a Hugging Face causal LM (torch.nn.Module), got " \
               f"{type(model).__name__}"
    head = getattr(model, "get_output_embeddings", None)
    if head is None or head() is None:
        return f"{type(model).__name__} has no causal LM head (get_output_embeddings() is None)"
    return None


class GenerationStep:
    """One compiled generation step (GEN_DESIGN.md): the step's tokens in, logits at rows out.

    ``step.run(input_ids=..., position_ids=..., seq_of_token=..., seq_lens=...,
    cache_table=..., logit_rows=..., k_cache_0=..., ...)`` runs the graph once (the caches
    are written in place) and returns ``logits`` [R, V]; ``step.bind(cache)`` returns the
    ``step(input_ids, meta)`` callable of ``runtime/generate.py`` over a KV cache object that
    has ``cache_inputs()`` (the ``k_cache_i``/``v_cache_i`` tensors by name), with ``meta``
    a StepMeta (``meta.inputs()`` gives the metadata by name). The program is built once:
    every prefill and decode step runs it.
    """

    def __init__(self, graph: Any, program: Any, pass_log: Any, geometry: dict[str, Any]):
        self.graph, self.program, self.pass_log = graph, program, pass_log
        self.geometry = dict(geometry)
        self.input_names = [v.name for v in graph.inputs]

    @property
    def cache_specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of every cache input, in graph order."""
        return [(v.name, tuple(int(d) for d in v.type.shape), v.type.dtype.torch)
                for v in self.graph.inputs if v.name.startswith(("k_cache_", "v_cache_"))]

    def run(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Run one step on the graph inputs given by name; returns ``logits`` [R, V]."""
        from transfuse.errors import InputError

        missing = [n for n in self.input_names if n not in inputs]
        extra = sorted(set(inputs) - set(self.input_names))
        if missing or extra:
            raise InputError(f"generation step: missing inputs {missing}, unknown {extra}; "
                             f"expected {self.input_names}")
        return self.program([inputs[n] for n in self.input_names])[0]

    def bind(self, cache: Any):
        """``step(input_ids [1, N], meta) -> logits [R, V]`` over ``cache``'s tensors."""
        def step(input_ids: torch.Tensor, meta: Any) -> torch.Tensor:
            return self.run(input_ids=input_ids, **meta.inputs(), **cache.cache_inputs())
        return step


def compile_generation_step(model: Any, example_ids: torch.Tensor,
                            generation: bool | Mapping[str, Any] = True, *,
                            target: str = "python", device: str | torch.device | None = None,
                            verify: bool = False, quantize: Any = None,
                            calibration: Sequence[Any] | None = None,
                            evaluation: Sequence[Any] | None = None,
                            min_sqnr: float | None = None) -> GenerationStep:
    """Capture a causal LM for generation and compile its step.

    The model is captured with ``input_ids`` and ``position_ids`` [1, N] (N dynamic up to
    ``max_batch × max_seq_len`` tokens per step), run through O2 with
    ``generation.insert-kv-cache`` (options: ``generation``), and lowered once. ``quantize``,
    ``calibration`` (token-id batches), ``evaluation`` and ``min_sqnr`` as in ``optimize``:
    the weights are quantized before the KV cache goes in.
    """
    from transfuse.errors import InputError
    from transfuse.passes.generation.insert_kv_cache import cache_geometry
    from transfuse.passes.manager import run_pipeline

    reason = _is_causal_lm(model)
    if reason:
        raise InputError(reason)
    if quantize is not None:
        _check_quantize_request(quantize, min_sqnr, "O2", None)
    if target not in TARGETS:
        raise LoweringError(f"unknown target {target!r}; available targets: {', '.join(TARGETS)}")
    options = {} if generation is True else dict(generation)
    if "max_seq_len" not in options:  # default: 1024, or fewer when the model has fewer positions
        options["max_seq_len"] = min(1024, _max_positions(model) or 1024)
    geo = cache_geometry(options)
    if not isinstance(example_ids, torch.Tensor) or example_ids.dim() != 2:
        raise InputError("generation: example input_ids must be an i64 [B, S] tensor")
    ids = example_ids[:1, :8].to(torch.long)
    if ids.shape[1] < 2:  # torch.export specialises a dynamic dim seen as 1
        ids = ids.repeat(1, 2)
    pos = torch.arange(ids.shape[1])[None]
    t0 = time.perf_counter()
    captured, geo = _capture_step(model, ids, pos, geo, "max_step_tokens" in options)
    max_tokens = geo["max_step_tokens"]
    capture_ms = (time.perf_counter() - t0) * 1e3
    backend = get_target(target)
    options = _pass_options({"generation": geo}, captured.example_inputs, target=backend,
                            logits="all", convert_gqa=None, sparse_attention=None,
                            max_error=None)
    from transfuse.quantization import generation_inputs, quant_options

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    options.update(quant_options(quantize, calibration, evaluation, min_sqnr,
                                 generation_inputs(max(max_tokens, 2),
                                                   vocab if isinstance(vocab, int) else None)))
    log = _run_quantized(run_pipeline, quantize, captured.graph, "O2", verify=verify,
                         sample_inputs=None, options=options)
    t1 = time.perf_counter()
    try:
        program = backend.build(captured.graph, device=device)
    except TransfuseError:
        raise
    except Exception as e:  # a backend bug must not surface as a raw torch error
        raise LoweringError(f"{target} backend failed: {type(e).__name__}: {e}") from e
    log.add_stage("capture", capture_ms)
    log.add_stage(f"lowering ({target})", (time.perf_counter() - t1) * 1e3)
    return GenerationStep(captured.graph, program, log, captured.graph.meta["generation"])
