"""The ``transfuse`` command line.

    transfuse optimize --model gpt2-small [--level O2] [--seq 128] [--out DIR]
    transfuse log DIR          # print a saved pass log
    transfuse inspect DIR      # print a saved artifact's manifest and graph
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from transfuse.errors import TransfuseError


def _console():
    from rich.console import Console

    # wide enough for the pass log when output is piped (rich assumes 80 columns then)
    return Console() if sys.stdout.isatty() else Console(width=140)


def _cmd_optimize(args: argparse.Namespace) -> int:
    import torch
    from rich.table import Table

    import transfuse
    from transfuse.bench.timing import interleaved
    from transfuse.models import get_model

    console = _console()
    torch.set_num_threads(args.threads)
    model, inputs, dynamic = get_model(args.model, seq=args.seq, batch=args.batch)
    t0 = time.perf_counter()
    compiled = transfuse.optimize(model, inputs, dynamic=dynamic, level=args.level,
                                  verify=args.verify)
    compile_s = time.perf_counter() - t0
    console.print(compiled.pass_log)
    with torch.inference_mode():
        ref, out = model(*inputs), compiled(*inputs)
    err = (ref - out).abs().max().item() if isinstance(ref, torch.Tensor) else float("nan")
    timings = interleaved({"eager": lambda: model(*inputs), "transfuse": lambda: compiled(*inputs)},
                          rounds=args.rounds, warmup=2)
    table = Table(title=f"{args.model}  batch={args.batch} seq={args.seq}  threads={args.threads}")
    for col in ("contestant", "median ms", "IQR ms", "ratio to eager", "compile s", "max abs err"):
        table.add_column(col, justify="right" if col != "contestant" else "left")
    base = timings["eager"].median_ms
    table.add_row("eager", f"{base:.2f}", f"{timings['eager'].iqr_ms:.2f}", "1.00", "-", "-")
    t = timings["transfuse"]
    table.add_row(f"transfuse {args.level} (python)", f"{t.median_ms:.2f}", f"{t.iqr_ms:.2f}",
                  f"{t.median_ms / base:.2f}", f"{compile_s:.2f}", f"{err:.2e}")
    console.print(table)
    if args.out:
        compiled.save(args.out)
        console.print(f"saved to {args.out}")
    return 0


def _cmd_log(args: argparse.Namespace) -> int:
    from transfuse.runtime.artifact import read_pass_log

    log = read_pass_log(args.path)
    if args.json:
        print(json.dumps(log.to_json(), indent=2))
    elif args.why_not:
        print(log.why_not(args.why_not))
    else:
        _console().print(log)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from transfuse.runtime.artifact import load

    compiled = load(args.path)
    print(repr(compiled))
    print(compiled.graph)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transfuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    o = sub.add_parser("optimize", help="compile a built-in model, print the pass log and timings")
    o.add_argument("--model", default="gpt2-tiny", help="built-in model, e.g. gpt2-small, llama-tiny")
    o.add_argument("--level", default="O2", choices=["O0", "O1", "O2"])
    o.add_argument("--seq", type=int, default=128)
    o.add_argument("--batch", type=int, default=1)
    o.add_argument("--threads", type=int, default=1)
    o.add_argument("--rounds", type=int, default=10)
    o.add_argument("--verify", action="store_true", help="check every pass numerically")
    o.add_argument("--out", help="save the compiled model to this directory")
    o.set_defaults(fn=_cmd_optimize)

    lg = sub.add_parser("log", help="print the pass log of a saved artifact")
    lg.add_argument("path")
    lg.add_argument("--json", action="store_true")
    lg.add_argument("--why-not", dest="why_not", help="explain why a rule (id or prefix) did not fire")
    lg.set_defaults(fn=_cmd_log)

    ins = sub.add_parser("inspect", help="print a saved artifact's summary and graph")
    ins.add_argument("path")
    ins.set_defaults(fn=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except TransfuseError as e:
        print(f"transfuse: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"transfuse: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
