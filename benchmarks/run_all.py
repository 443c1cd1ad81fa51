#!/usr/bin/env python
"""Run the standard benchmark matrix and keep the results in benchmarks/results/.

    python benchmarks/run_all.py                 # the standard matrix below
    python benchmarks/run_all.py --warmup 2      # more warm-up calls (default 1)

Matrix (../shared/BENCHMARKING.md, CPU part): gpt2-small, llama-small, bert-base;
batch 1; sequence 16 and 128; one thread; every contestant (eager, torch.compile,
ORT on the dynamo export, ORT after its transformers optimizer, transfuse at
every target and O1/O2); 10 interleaved rounds per case.

Writes ``benchmarks/results/<machine>-<YYYY-MM-DD>.json`` and ``.png``, where
<machine> is a short slug of the CPU model (no hostname). A second run on the
same machine and day replaces that day's files.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from rich.console import Console

from transfuse.bench.console import run_and_report
from transfuse.bench.harness import Settings
from transfuse.bench.machine import machine_slug

MODELS = ["gpt2-small", "llama-small", "bert-base"]
SEQS = [16, 128]
BATCHES = [1]
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default=",".join(MODELS), help="override the model list")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)

    settings = Settings(models=[m for m in args.models.split(",") if m], seqs=SEQS,
                        batches=BATCHES, threads=args.threads, rounds=args.rounds,
                        warmup=args.warmup)
    stem = f"{machine_slug()}-{datetime.date.today().isoformat()}"
    console = Console() if sys.stdout.isatty() else Console(width=160)
    run_and_report(settings, args.out / f"{stem}.json", args.out / f"{stem}.png", console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
