"""The benchmark protocol (../shared/BENCHMARKING.md), one case at a time.

For every (model, batch, seq) case:

1. build the workload (model + inputs) on the device, in the dtype;
2. build every contestant, recording its compile seconds and the resident memory
   its build (and first call) leaves behind; a build that raises is recorded
   ``failed`` (or ``unsupported``) and the run goes on;
3. correctness before timing: each contestant's output is compared with the
   baseline's (eager; ORT for an ONNX file) on the same input; a wrong one is
   recorded ``wrong`` with its error and is not timed;
4. peak memory of one warm call per correct contestant;
5. interleaved timing (warm-up, then A B C A B C ... for ``rounds``): median, IQR,
   ratio = median / median(baseline).

Every contestant runs with the same thread count: ``torch.set_num_threads(n)`` and
ORT ``intra_op_num_threads=n, inter_op_num_threads=1``.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from transfuse.bench.contestants import (
    Contestant,
    StepFailed,
    Unsupported,
    baseline_name,
    default_contestants,
    select,
)
from transfuse.bench.correctness import compare, default_tolerance
from transfuse.bench.machine import machine_info
from transfuse.bench.memory import Footprint, peak_call_mb
from transfuse.bench.timing import interleaved
from transfuse.bench.workloads import DTYPES, Case, load_workload, model_kind

logger = logging.getLogger(__name__)

SCHEMA = "transfuse.bench/1"
MODES = ("prefill", "decode")
LEVELS = ("O0", "O1", "O2")
#: a reason longer than this is cut in results.json (tables cut it shorter)
MAX_REASON = 2000

#: progress hook: (description, units of work done since the last call)
ProgressFn = Callable[[str, int], None]


@dataclasses.dataclass
class Settings:
    models: list[str]
    seqs: list[int] = dataclasses.field(default_factory=lambda: [128])
    batches: list[int] = dataclasses.field(default_factory=lambda: [1])
    threads: int = 1
    rounds: int = 10
    warmup: int = 2
    levels: list[str] = dataclasses.field(default_factory=lambda: ["O1", "O2"])
    device: str = "cpu"
    dtype: str | None = None  # None: fp32 on CPU, bf16 on CUDA
    mode: str = "prefill"
    config: str | None = None  # config JSON for hf: models
    attn: str | None = None  # attn_implementation for hf: models
    family: str | None = None  # model family of an ONNX file (ORT optimizer model_type)
    contestants: list[str] | None = None  # names or prefixes; None: all

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        if self.mode == "decode":
            raise ValueError("decode mode needs a KV-cache runtime (not yet available)")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device} needs a CUDA GPU; none is available")
        if self.rounds < 1 or self.warmup < 0 or self.threads < 1:
            raise ValueError("need rounds >= 1, warmup >= 0, threads >= 1")
        if not self.models or not self.seqs or not self.batches:
            raise ValueError("need at least one model, seq and batch")
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if bad or not self.levels:
            raise ValueError(f"unknown level(s) {bad}; choose from {list(LEVELS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {list(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return DTYPES[self.dtype]
        return torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32


def _reason(e: BaseException) -> str:
    if isinstance(e, (Unsupported, StepFailed)):
        text = str(e)
    else:
        text = f"{type(e).__name__}: {e}"
    return text.strip()[:MAX_REASON]


def _entry(name: str, status: str, reason: str | None = None, **fields: Any) -> dict[str, Any]:
    base = {"contestant": name, "status": status, "reason": reason, "compile_s": None,
            "build_mb": None, "peak_mb": None, "max_rel_err": None, "max_abs_err": None,
            "tolerance": None, "median_ms": None, "iqr_ms": None, "q1_ms": None,
            "q3_ms": None, "ratio": None, "samples_ms": [], "notes": ""}
    base.update(fields)
    return base


def _build(c: Contestant, workload, case: Case):
    """Build ``c`` and call it once: (entry, runner, output), or (entry, None, None) on failure."""
    try:
        with Footprint(case.device) as fp:
            runner = c.build(workload.model, workload.inputs, case)
            with torch.inference_mode():
                out = runner.fn()
    except Unsupported as e:
        return _entry(c.name, "unsupported", _reason(e)), None, None
    except Exception as e:  # any contestant may crash; the run goes on
        logger.info("%s failed on %s", c.name, case.label, exc_info=True)
        return _entry(c.name, "failed", _reason(e)), None, None
    tol = c.tolerance if c.tolerance is not None else default_tolerance(case.dtype)
    entry = _entry(c.name, "ok", compile_s=runner.compile_s, build_mb=fp.mb, tolerance=tol,
                   notes=runner.notes)
    return entry, runner, out


def run_case(case: Case, workload, contestants: Sequence[Contestant], *, baseline: str,
             rounds: int, warmup: int, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Build, check, measure and time ``contestants`` on one workload; the case's record."""
    # what exists now outlives the case: keep it out of the gc passes the memory measurements
    # make (a full pass costs ~0.3 s once torch.compile is loaded)
    gc.freeze()
    try:
        return _run_case(case, workload, contestants, baseline=baseline, rounds=rounds,
                         warmup=warmup, progress=progress)
    finally:
        gc.unfreeze()


def _run_case(case: Case, workload, contestants: Sequence[Contestant], *, baseline: str,
              rounds: int, warmup: int, progress: ProgressFn | None) -> dict[str, Any]:
    step = progress or (lambda desc, n: None)
    order = sorted(contestants, key=lambda c: c.name != baseline)  # baseline first
    entries: dict[str, dict[str, Any]] = {}
    runners: dict[str, Callable[[], Any]] = {}
    reference = None
    for c in order:
        step(f"{case.label}: build {c.name}", 0)
        reason = c.available()
        if reason is not None:
            entries[c.name] = _entry(c.name, "unavailable", reason)
            step(f"{case.label}: {c.name} unavailable", 1)
            continue
        if c.name != baseline and reference is None:
            entries[c.name] = _entry(c.name, "failed", f"baseline {baseline} did not run")
            step(f"{case.label}: {c.name} skipped", 1)
            continue
        entry, runner, out = _build(c, workload, case)
        if runner is not None:
            if c.name == baseline:
                reference = out
                entry.update(max_rel_err=0.0, max_abs_err=0.0)
            else:
                check = compare(out, reference, entry["tolerance"])
                entry.update(max_rel_err=check.max_rel_err, max_abs_err=check.max_abs_err)
                if not check.ok:
                    entry.update(status="wrong", reason=check.describe())
            if entry["status"] == "ok":
                runners[c.name] = runner.fn
        entries[c.name] = entry
        runner = out = None  # a rejected build must not stay resident while the next is measured
        step(f"{case.label}: built {c.name}", 1)

    step(f"{case.label}: peak memory", 0)
    for name, fn in runners.items():
        entries[name]["peak_mb"] = peak_call_mb(fn, case.device)
    step(f"{case.label}: timing", 1)

    if runners:
        timings = interleaved(runners, rounds=rounds, warmup=warmup, device=case.device,
                              on_round=lambda i: step(f"{case.label}: round {i + 1}/{rounds}", 1))
    else:
        timings = {}
        step(f"{case.label}: nothing to time", rounds)
    base = timings.get(baseline)
    for name, t in timings.items():
        entries[name].update(median_ms=t.median_ms, iqr_ms=t.iqr_ms, q1_ms=t.q1_ms,
                             q3_ms=t.q3_ms, samples_ms=t.samples_ms,
                             ratio=t.median_ms / base.median_ms if base else None)
    return {"model": case.model, "batch": case.batch, "seq": case.seq, "mode": case.mode,
            "device": case.device, "dtype": str(case.dtype).removeprefix("torch."),
            "baseline": baseline, "label": case.label,
            "model_info": dataclasses.asdict(case.info) if case.info else None,
            "results": [entries[c.name] for c in order]}


def work_units(settings: Settings, n_contestants: Callable[[str], int]) -> int:
    """How many progress units :func:`run_benchmark` reports in all."""
    per_model = {m: n_contestants(m) + 1 + settings.rounds for m in settings.models}
    return sum(per_model.values()) * len(settings.seqs) * len(settings.batches)


def contestants_for(settings: Settings, model: str) -> tuple[list[Contestant], str]:
    kind = model_kind(model)
    base = baseline_name(kind)
    everyone = default_contestants(kind, settings.device, settings.levels)
    return select(everyone, settings.contestants, base), base


def run_benchmark(settings: Settings, progress: ProgressFn | None = None,
                  contestants: Callable[[str], tuple[list[Contestant], str]] | None = None,
                  ) -> dict[str, Any]:
    """Run every case of ``settings``; returns the results.json document.

    ``contestants(model) -> (contestants, baseline name)`` overrides the registry (tests).
    """
    settings.validate()
    pick = contestants or (lambda m: contestants_for(settings, m))
    step = progress or (lambda desc, n: None)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    cases: list[dict[str, Any]] = []
    try:
        for model in settings.models:
            chosen, base = pick(model)
            for batch in settings.batches:
                for seq in settings.seqs:
                    step(f"{model} b{batch} s{seq}: load", 0)
                    with Footprint(settings.device) as loaded:
                        workload = load_workload(model, batch, seq, device=settings.device,
                                                 dtype=settings.torch_dtype,
                                                 config=settings.config, attn=settings.attn,
                                                 family=settings.family)
                    with tempfile.TemporaryDirectory(prefix="transfuse-bench-") as tmp:
                        case = Case(model=model, batch=batch, seq=seq, mode=settings.mode,
                                    device=settings.device, dtype=settings.torch_dtype,
                                    threads=settings.threads, info=workload.info,
                                    dynamic=workload.dynamic, workdir=Path(tmp))
                        record = run_case(case, workload, chosen, baseline=base,
                                          rounds=settings.rounds, warmup=settings.warmup,
                                          progress=step)
                    record["model_mb"] = loaded.mb  # the model's weights and inputs, loaded
                    cases.append(record)
                    del workload
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine_info(settings.threads, settings.device),
        "settings": dataclasses.asdict(settings),
        "cases": cases,
    }
