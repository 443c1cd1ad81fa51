"""Issue 5 acceptance: transfuse -> ONNX Runtime against ONNX Runtime on torch's own export.

One thread, ../shared/BENCHMARKING.md protocol (every contestant checked against eager before
timing, interleaved rounds, median and IQR), through ``transfuse.bench``:

- gpt2-small, llama-small, bert-base at batch 1, seq 16 and 128: transfuse at O2 with
  ``target="onnxruntime"`` against eager, ORT on ``torch.onnx.export(..., dynamo=True)``
  ("ort", all graph optimizations) and ORT after its transformers optimizer ("ort-opt");
  per-call peak memory of each;
- gpt2-small seq 128 with ``logits="last"`` (generation prefill) against plain ORT computing
  every position's logits (checked against eager's last position).

Targets (same outputs): <= 0.95x plain ORT and <= 0.8x eager in every case; logits="last"
<= 0.75x plain ORT.

    python benchmarks/onnx_vs_ort.py [--rounds 10] [--models gpt2-small,llama-small,bert-base]

Writes benchmarks/results/onnx-vs-ort-<date>.json and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import transfuse
from transfuse.bench.contestants import OrtExport
from transfuse.bench.harness import Settings, run_benchmark
from transfuse.bench.machine import machine_info
from transfuse.bench.memory import peak_call_mb
from transfuse.bench.timing import interleaved
from transfuse.bench.workloads import Case, load_workload
from transfuse.models import get_model

TARGET = "transfuse-onnxruntime-O2"
GOALS = {"vs_ort": 0.95, "vs_eager": 0.8, "last_vs_ort": 0.75}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _fused_counts(models: list[str]) -> dict[str, dict[str, int]]:
    out = {}
    for name in models:
        model, args, dynamic = get_model(name, seq=16)
        c = transfuse.optimize(model, args, dynamic=dynamic, target="onnxruntime")
        out[name] = dict(sorted(c.program.fused_counts.items()))
    return out


def _matrix(models: list[str], rounds: int, warmup: int) -> dict:
    settings = Settings(models=models, seqs=[16, 128], batches=[1], threads=1, rounds=rounds,
                        warmup=warmup, levels=["O2"],
                        contestants=["ort", "ort-opt", "transfuse-onnxruntime"])
    return run_benchmark(settings)


def _logits_last(rounds: int, warmup: int) -> dict:
    """gpt2-small seq 128: transfuse-ORT with logits="last" against plain ORT (all logits)."""
    torch.set_num_threads(1)
    name, seq = "gpt2-small", 128
    workload = load_workload(name, 1, seq)
    model, inputs = workload.model, workload.inputs
    with tempfile.TemporaryDirectory(prefix="onnx-vs-ort-") as tmp:
        case = Case(model=name, batch=1, seq=seq, threads=1, info=workload.info,
                    dynamic=workload.dynamic, workdir=Path(tmp))
        ort = OrtExport().build(model, inputs, case)
        t0 = time.perf_counter()
        compiled = transfuse.optimize(model, inputs.args, dynamic=workload.dynamic,
                                      target="onnxruntime", logits="last")
        compile_s = time.perf_counter() - t0
        with torch.inference_mode():
            ref = model(*inputs.args)
            last = compiled(*inputs.args)
        want = ref[:, -1:]
        err = (last - want).abs().max().item()
        ort_err = (torch.from_numpy(ort.fn()[0]) - ref).abs().max().item()
        ok = torch.allclose(last, want, rtol=1e-4, atol=1e-4)
        row = {"model": name, "seq": seq, "logits": "last", "correct": ok,
               "max_abs_err_vs_eager_last": err, "ort_max_abs_err_vs_eager": ort_err,
               "compile_s": compile_s, "fused_counts": dict(compiled.program.fused_counts)}
        if not ok:
            return row
        fns = {"eager": lambda: model(*inputs.args), "ort": ort.fn,
               "transfuse-onnxruntime-O2-last": lambda: compiled(*inputs.args)}
        with torch.inference_mode():
            t = interleaved(fns, rounds=rounds, warmup=warmup)
            peaks = {k: peak_call_mb(f) for k, f in fns.items()}
    for k, v in t.items():
        row[k] = {"median_ms": v.median_ms, "iqr_ms": v.iqr_ms, "peak_mb": peaks[k]}
    row["ratio_vs_ort"] = t["transfuse-onnxruntime-O2-last"].median_ms / t["ort"].median_ms
    row["ratio_vs_eager"] = t["transfuse-onnxruntime-O2-last"].median_ms / t["eager"].median_ms
    row["meets_target"] = row["ratio_vs_ort"] <= GOALS["last_vs_ort"]
    return row


def _summary(doc: dict) -> list[dict]:
    rows = []
    for case in doc["cases"]:
        res = {e["contestant"]: e for e in case["results"]}
        ours, ort, opt, eager = (res.get(k, {}) for k in (TARGET, "ort", "ort-opt", "eager"))
        row = {"model": case["model"], "seq": case["seq"], "status": ours.get("status"),
               "eager_ms": eager.get("median_ms"), "ort_ms": ort.get("median_ms"),
               "ort_opt_ms": opt.get("median_ms"), "ort_opt_status": opt.get("status"),
               "transfuse_ms": ours.get("median_ms"), "transfuse_iqr_ms": ours.get("iqr_ms"),
               "ort_iqr_ms": ort.get("iqr_ms"),
               "peak_mb_transfuse": ours.get("peak_mb"), "peak_mb_ort": ort.get("peak_mb"),
               "build_mb_transfuse": ours.get("build_mb"), "build_mb_ort": ort.get("build_mb"),
               "max_rel_err": ours.get("max_rel_err")}
        if row["transfuse_ms"] and row["ort_ms"] and row["eager_ms"]:
            row["vs_ort"] = row["transfuse_ms"] / row["ort_ms"]
            row["vs_eager"] = row["transfuse_ms"] / row["eager_ms"]
            row["vs_ort_opt"] = (row["transfuse_ms"] / row["ort_opt_ms"]
                                 if row["ort_opt_ms"] else None)
            row["meets_vs_ort"] = row["vs_ort"] <= GOALS["vs_ort"]
            row["meets_vs_eager"] = row["vs_eager"] <= GOALS["vs_eager"]
        rows.append(row)
    return rows


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--models", default="gpt2-small,llama-small,bert-base")
    p.add_argument("--no-last", action="store_true", help="skip the logits='last' case")
    args = p.parse_args()
    models = args.models.split(",")
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_before = _load()
    counts = _fused_counts(models)
    doc = _matrix(models, args.rounds, args.warmup)
    last = None if args.no_last else _logits_last(args.rounds, args.warmup)
    summary = _summary(doc)
    result = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 1),
        "load_avg_before": load_before, "load_avg_after": _load(), "cpus": os.cpu_count(),
        "machine": machine_info(1, "cpu"), "threads": 1, "rounds": args.rounds,
        "goals": GOALS, "fused_counts": counts, "summary": summary, "logits_last": last,
        "matrix": doc,
    }
    print(f"\n1 thread, {args.rounds} interleaved rounds, median ms (load avg "
          f"{load_before} -> {result['load_avg_after']} on {os.cpu_count()} CPUs)")
    head = (f"{'model':12s} {'seq':>4s} {'eager':>8s} {'ort':>8s} {'ort-opt':>8s} "
            f"{'transfuse':>9s} {'vs ort':>7s} {'vs eager':>8s} {'peak MB t/ort':>14s}")
    print(head)
    for r in summary:
        opt = _fmt(r["ort_opt_ms"]) if r["ort_opt_status"] == "ok" else r["ort_opt_status"]
        print(f"{r['model']:12s} {r['seq']:4d} {_fmt(r['eager_ms']):>8s} {_fmt(r['ort_ms']):>8s} "
              f"{opt:>8s} "
              f"{_fmt(r['transfuse_ms']):>9s} {_fmt(r.get('vs_ort'), '.3f'):>7s} "
              f"{_fmt(r.get('vs_eager'), '.3f'):>8s} "
              f"{_fmt(r['peak_mb_transfuse'])}/{_fmt(r['peak_mb_ort']):>5s}")
    if last and "ratio_vs_ort" in last:
        ours = last["transfuse-onnxruntime-O2-last"]["median_ms"]
        print(f"gpt2-small 128 logits=last: transfuse {ours:.1f}"
              f" ms vs ort (all logits) {last['ort']['median_ms']:.1f} ms -> "
              f"{last['ratio_vs_ort']:.3f}x (target <= {GOALS['last_vs_ort']})")
    elif last:
        err = last["max_abs_err_vs_eager_last"]
        print(f"gpt2-small 128 logits=last: WRONG (max abs err {err})")
    print("fused ops:", json.dumps(counts))
    out = Path(__file__).parent / "results" / f"onnx-vs-ort-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
