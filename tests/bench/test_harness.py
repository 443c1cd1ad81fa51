"""The protocol with stand-in contestants: correctness before timing, failures recorded,
a slow contestant ranked slower, and the results.json schema."""

from __future__ import annotations

import time

import pytest
import torch

from transfuse.bench.contestants import (
    Contestant,
    Eager,
    Runner,
    Transfuse,
    Unsupported,
    default_contestants,
    select,
)
from transfuse.bench.harness import Settings, run_benchmark, run_case
from transfuse.bench.workloads import Case, Inputs, ModelInfo, Workload


class Counting(Contestant):
    """Runs the model, optionally wrong or slow, and counts its calls."""

    def __init__(self, name: str, offset: float = 0.0, sleep_s: float = 0.0,
                 tolerance: float | None = None):
        self.name, self.offset, self.sleep_s = name, offset, sleep_s
        self.tolerance = tolerance
        self.calls = 0

    def build(self, model, inputs, case):
        def fn():
            self.calls += 1
            if self.sleep_s:
                time.sleep(self.sleep_s)
            return model(*inputs.args) + self.offset

        return Runner(fn, compile_s=0.5)


class Raises(Contestant):
    name = "raises"

    def build(self, model, inputs, case):
        raise RuntimeError("boom at build")


class Refuses(Contestant):
    name = "refuses"

    def build(self, model, inputs, case):
        raise Unsupported("cannot take this model: reason given")


class Missing(Contestant):
    name = "missing"

    def available(self):
        return "library not installed"

    def build(self, model, inputs, case):  # pragma: no cover - never called
        raise AssertionError("built although unavailable")


def _workload():
    model = torch.nn.Linear(16, 16).eval()
    x = torch.randn(1, 4, 16)
    return Workload(model, Inputs((x,), {}, ("input",)), ModelInfo("linear", "torch"))


def _run(contestants, rounds=10, warmup=1):
    return run_case(Case("linear", 1, 4), _workload(), contestants, baseline="eager",
                    rounds=rounds, warmup=warmup)


def _by_name(record):
    return {e["contestant"]: e for e in record["results"]}


def test_wrong_contestant_is_caught_and_not_timed():
    wrong = Counting("wrong", offset=1.0)
    fine = Counting("fine", offset=1e-7)
    res = _by_name(_run([Eager(), wrong, fine]))
    assert res["wrong"]["status"] == "wrong"
    assert "max rel err" in res["wrong"]["reason"]
    assert res["wrong"]["median_ms"] is None and res["wrong"]["samples_ms"] == []
    assert wrong.calls == 1  # the correctness call only: no peak-memory call, no timing
    assert res["fine"]["status"] == "ok" and len(res["fine"]["samples_ms"]) == 10
    assert fine.calls == 1 + 1 + 1 + 10  # check, peak memory, warm-up, rounds


def test_declared_tolerance_is_used():
    loose = Counting("loose", offset=1e-2, tolerance=1.0)
    res = _by_name(_run([Eager(), loose], rounds=2))
    assert res["loose"]["status"] == "ok" and res["loose"]["tolerance"] == 1.0


def test_slow_contestant_is_ranked_slower():
    res = _by_name(_run([Eager(), Counting("slow", sleep_s=0.005)], rounds=5))
    assert res["slow"]["median_ms"] > res["eager"]["median_ms"] + 4
    assert res["slow"]["ratio"] > 1.0 and res["eager"]["ratio"] == 1.0


def test_build_failures_unsupported_and_unavailable_are_recorded_and_the_run_goes_on():
    res = _by_name(_run([Eager(), Raises(), Refuses(), Missing(), Counting("ok")], rounds=2))
    assert res["raises"]["status"] == "failed"
    assert res["raises"]["reason"] == "RuntimeError: boom at build"
    assert res["refuses"]["status"] == "unsupported"
    assert res["refuses"]["reason"] == "cannot take this model: reason given"
    assert res["missing"]["status"] == "unavailable"
    assert res["missing"]["reason"] == "library not installed"
    assert res["ok"]["status"] == "ok" and res["ok"]["median_ms"] is not None


def test_baseline_runs_first_and_a_failed_baseline_stops_the_others():
    record = _run([Counting("other"), Eager()], rounds=1)
    assert [e["contestant"] for e in record["results"]] == ["eager", "other"]

    class BadEager(Raises):
        name = "eager"

    res = _by_name(_run([Counting("other"), BadEager()], rounds=1))
    assert res["eager"]["status"] == "failed"
    assert res["other"]["status"] == "failed" and "baseline" in res["other"]["reason"]


def test_registry_iterates_targets_and_levels(monkeypatch):
    import transfuse.api

    monkeypatch.setattr(transfuse.api, "TARGETS", ("python", "newtarget"))
    names = [c.name for c in default_contestants("torch", levels=["O1", "O2"])]
    assert names[:4] == ["eager", "torch.compile", "ort", "ort-opt"]
    assert names[4:] == ["transfuse-python-O1", "transfuse-python-O2",
                         "transfuse-newtarget-O1", "transfuse-newtarget-O2"]
    onnx_names = [c.name for c in default_contestants("onnx", levels=["O2"])]
    assert onnx_names == ["ort", "ort-opt", "transfuse-python-O2", "transfuse-newtarget-O2"]
    assert all(isinstance(c, Transfuse) for c in default_contestants("torch")[4:])


def test_select_keeps_the_baseline_and_matches_prefixes():
    everyone = default_contestants("torch", levels=["O1", "O2"])
    names = [c.name for c in select(everyone, ["transfuse"], "eager")]
    from transfuse.api import TARGETS

    assert names == ["eager"] + [f"transfuse-{t}-{lv}" for t in TARGETS for lv in ("O1", "O2")]
    assert "transfuse-python-O2" in names
    with pytest.raises(ValueError, match="unknown contestant"):
        select(everyone, ["tvm"], "eager")


def test_decode_mode_and_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"decode mode needs a KV-cache runtime \(not yet"):
        Settings(models=["gpt2-tiny"], mode="decode").validate()
    with pytest.raises(ValueError, match="level"):
        Settings(models=["gpt2-tiny"], levels=["O9"]).validate()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            Settings(models=["gpt2-tiny"], device="cuda").validate()


def test_results_json_schema():
    settings = Settings(models=["gpt2-tiny"], seqs=[4, 8], batches=[1], rounds=4, warmup=1)
    steps = []
    doc = run_benchmark(settings, progress=lambda d, n: steps.append(n),
                        contestants=lambda m: ([Eager(), Counting("copy"), Raises()], "eager"))
    assert doc["schema"] == "transfuse.bench/1"
    assert {"created", "command", "wall_s", "machine", "settings", "cases"} <= set(doc)
    m = doc["machine"]
    assert {"cpu_model", "cpu_flags", "logical_cores", "threads", "versions", "git_commit",
            "slug"} <= set(m)
    assert m["threads"] == 1
    assert {"python", "torch", "onnx", "onnxruntime", "transformers", "transfuse"} <= \
        set(m["versions"])
    assert len(doc["cases"]) == 2
    case = doc["cases"][0]
    assert {"model", "batch", "seq", "mode", "device", "dtype", "baseline", "results",
            "model_info", "model_mb"} <= set(case)
    entry = case["results"][1]
    assert {"contestant", "status", "reason", "median_ms", "iqr_ms", "q1_ms", "q3_ms", "ratio",
            "samples_ms", "compile_s", "peak_mb", "build_mb", "max_rel_err", "max_abs_err",
            "tolerance"} <= set(entry)
    assert entry["status"] == "ok" and len(entry["samples_ms"]) == 4
    assert case["results"][2]["status"] == "failed"
    assert sum(steps) == 2 * (3 + 1 + 4)  # work_units: contestants + memory + rounds per case


def test_gpu_targets_are_unavailable_where_their_time_would_mislead():
    """Without TensorRT the tensorrt target runs its ONNX in ONNX Runtime, without a GPU the
    triton target runs in Triton's interpreter: neither time is the target's, so neither is
    timed (the reason says why)."""
    from transfuse.codegen.tensorrt.available import tensorrt_unavailable

    trt = Transfuse("tensorrt", "O2").available()
    assert (trt is None) == (tensorrt_unavailable() is None)
    if trt is not None:
        assert "TensorRT" in trt
    assert Transfuse("python", "O2").available() is None
    pytest.importorskip("triton", reason="the triton target needs triton")
    from transfuse.codegen.triton import env

    tri = Transfuse("triton", "O2").available()
    assert (tri is not None) == env.interpreting()
