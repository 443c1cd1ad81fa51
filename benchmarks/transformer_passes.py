"""Issue 4 acceptance: the Python backend at O2 against eager, 1 thread.

gpt2 small and llama small at seq 128 and 512 (latency ratio and peak memory of one
call), plus generation prefill with ``logits="last"`` (gpt2 small, seq 128) against
eager computing all logits. Protocol: ../shared/BENCHMARKING.md (interleaved rounds,
median, IQR, correctness checked before timing).

    python benchmarks/transformer_passes.py [--rounds 10]

Writes benchmarks/results/transformer-passes-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

import transfuse
from transfuse.bench.machine import machine_info
from transfuse.bench.memory import peak_call_mb
from transfuse.bench.timing import interleaved
from transfuse.models import get_model


def _case(name: str, seq: int, rounds: int, logits: str = "all") -> dict:
    model, inputs, dynamic = get_model(name, seq=seq)
    compiled = transfuse.optimize(model, inputs, dynamic=dynamic, level="O2", logits=logits)
    with torch.inference_mode():
        ref = model(*inputs)
        out = compiled(*inputs)
    want = ref[:, -1:] if logits == "last" else ref
    err = (out - want).abs().max().item()
    ok = torch.allclose(out, want, rtol=1e-4, atol=1e-5)
    row = {"model": name, "seq": seq, "logits": logits, "max_abs_err": err, "correct": ok,
           "ops": dict(compiled.graph.op_histogram().most_common())}
    if not ok:
        return row
    t = interleaved({"eager": lambda: model(*inputs), "transfuse": lambda: compiled(*inputs)},
                    rounds=rounds, warmup=2)
    with torch.inference_mode():
        row["peak_mb_eager"] = peak_call_mb(lambda: model(*inputs))
        row["peak_mb_transfuse"] = peak_call_mb(lambda: compiled(*inputs))
    row.update({
        "eager_ms": t["eager"].median_ms, "eager_iqr_ms": t["eager"].iqr_ms,
        "transfuse_ms": t["transfuse"].median_ms, "transfuse_iqr_ms": t["transfuse"].iqr_ms,
        "ratio": t["transfuse"].median_ms / t["eager"].median_ms,
    })
    return row


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--cases", default="gpt2-small:128,gpt2-small:512,llama-small:128,"
                                      "llama-small:512,gpt2-small:128:last")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for spec in args.cases.split(","):
        name, seq, *rest = spec.split(":")
        row = _case(name, int(seq), args.rounds, rest[0] if rest else "all")
        rows.append(row)
        if "ratio" in row:
            print(f"{name:12s} seq={seq:>4s} logits={row['logits']:4s} eager {row['eager_ms']:8.1f} ms"
                  f" (IQR {row['eager_iqr_ms']:.1f})  transfuse {row['transfuse_ms']:8.1f} ms "
                  f"(IQR {row['transfuse_iqr_ms']:.1f})  ratio {row['ratio']:.2f}  peak MB "
                  f"{row['peak_mb_eager']:.0f} -> {row['peak_mb_transfuse']:.0f}  "
                  f"err {row['max_abs_err']:.1e}", flush=True)
        else:
            print(f"{name} seq={seq}: WRONG (max abs err {row['max_abs_err']:.3g}), not timed")
    out = Path(__file__).parent / "results" / f"transformer-passes-{datetime.date.today()}.json"
    out.write_text(json.dumps({"machine": machine_info(threads=1), "threads": 1,
                               "rows": rows}, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
