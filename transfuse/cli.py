"""The ``transfuse`` command line.

    transfuse optimize --model gpt2-small [--level O2] [--seq 128] [--out DIR]
                       [--quantize int4-gptq [--calibration 8]]
    transfuse bench --model gpt2-small --seq 16,128 --batch 1 [--threads 1] [--out DIR]
    transfuse log DIR          # print a saved pass log
    transfuse inspect DIR      # print a saved artifact's manifest and graph
    transfuse serve MODEL --port 8000   # OpenAI-compatible HTTP server (transfuse.serving)
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
    quant = {}
    if args.quantize:
        quant["quantize"] = _quantize_arg(args.quantize)
        if args.calibration:
            quant["calibration"] = _random_batches(inputs, args.calibration)
    t0 = time.perf_counter()
    compiled = transfuse.optimize(model, inputs, dynamic=dynamic, level=args.level,
                                  verify=args.verify, target=args.target, **quant)
    compile_s = time.perf_counter() - t0
    console.print(compiled.pass_log)
    if args.quantize:
        console.print(str(compiled.pass_log.quant_report()))
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
    table.add_row(f"transfuse {args.level} ({args.target})", f"{t.median_ms:.2f}", f"{t.iqr_ms:.2f}",
                  f"{t.median_ms / base:.2f}", f"{compile_s:.2f}", f"{err:.2e}")
    console.print(table)
    if args.target == "triton":
        from transfuse.codegen.triton import env

        if env.interpreting():
            console.print("the triton target ran in Triton's interpreter (no CUDA device): its "
                          "time says nothing about speed; the error column is what to read")
    if args.out:
        compiled.save(args.out)
        console.print(f"saved to {args.out}")
    return 0


def _quantize_arg(text: str):
    """``--quantize``: a scheme name, or a JSON object of the scheme and its options."""
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            from transfuse.errors import InputError

            raise InputError(f"--quantize: not valid JSON ({e})") from None
    return text


def _random_batches(inputs, n: int) -> list:
    """``n`` calibration batches shaped like the example ``inputs``: integer inputs (token
    ids) drawn uniformly below their example's maximum + 1, the rest copied (the built-in
    models have random weights and no tokenizer, so random tokens are as good as text)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        batch = []
        for x in inputs:
            if isinstance(x, torch.Tensor) and not x.dtype.is_floating_point and \
                    x.dtype != torch.bool:
                batch.append(torch.randint(0, int(x.max()) + 1, x.shape, generator=gen,
                                           dtype=x.dtype))
            else:
                batch.append(x)
        out.append(tuple(batch))
    return out


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _cmd_bench(args: argparse.Namespace) -> int:
    from transfuse.bench.console import run_and_report
    from transfuse.bench.harness import Settings

    settings = Settings(models=args.model, seqs=args.seq, batches=args.batch,
                        threads=args.threads, rounds=args.rounds, warmup=args.warmup,
                        levels=args.levels, device=args.device, dtype=args.dtype, mode=args.mode,
                        config=args.config, attn=args.attn, family=args.family,
                        contestants=args.contestants)
    settings.validate()  # a bad option is an error before anything is built
    out = Path(args.out)
    run_and_report(settings, out / "results.json", out / "results.png", _console())
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
    from transfuse.runtime.compiled import load

    compiled = load(args.path)
    print(repr(compiled))
    print(compiled.graph)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import torch

    from transfuse.serving import Engine
    from transfuse.serving.launch import run_server
    from transfuse.serving.loading import load_served, load_speculative, save_served
    from transfuse.serving.server import create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from transfuse.serving.embeddings import is_embedding_dir

    if is_embedding_dir(args.model):
        return _serve_embeddings(args)
    served = load_served(args.model, target=args.target, max_seq_len=args.max_seq_len,
                         max_batch=args.max_batch)
    if args.save:
        save_served(served, args.save)
        logging.getLogger("transfuse.serve").info("saved %s with its tokenizer to %s",
                                                  served.name, args.save)
    speculative = load_speculative(args.speculative, served, target=args.target)
    engine = Engine(served.gen, max_batch=served.max_batch, max_queue=args.max_queue,
                    speculative=speculative, tokenizer=served.tokenizer)
    app = create_app(engine, served.tokenizer, served.name, max_seq_len=served.max_seq_len)
    logging.getLogger("transfuse.serve").info(
        "serving %s (%s, %s target, max_seq_len %d, max_batch %d) on http://%s:%d/v1",
        served.name, served.kind, served.gen.backend, served.max_seq_len, served.max_batch,
        args.host, args.port)
    run_server(app, engine, host=args.host, port=args.port)
    return 0


def _serve_embeddings(args: argparse.Namespace) -> int:
    """``transfuse serve`` of an encoder folder: /v1/embeddings (serving/embeddings.py)."""
    import logging

    from transfuse.errors import InputError
    from transfuse.serving.embeddings import load_embedder
    from transfuse.serving.launch import run_server
    from transfuse.serving.server import create_app

    for flag, value in (("--speculative", args.speculative), ("--save", args.save)):
        if value:
            raise InputError(f"{flag} is for generation models; {args.model} is an embedding "
                             "model (served on /v1/embeddings)")
    served = load_embedder(args.model, target=args.target, max_batch=args.max_batch,
                           max_seq_len=args.max_seq_len)
    app = create_app(served.engine, served.tokenizer, served.name,
                     max_seq_len=served.max_seq_len)
    logging.getLogger("transfuse.serve").info(
        "serving embeddings of %s (%s pooling, max_seq_len %d, max_batch %d) on "
        "http://%s:%d/v1", served.name, served.engine.pooling.mode, served.max_seq_len,
        served.engine.max_batch, args.host, args.port)
    run_server(app, served.engine, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transfuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    o = sub.add_parser("optimize", help="compile a built-in model, print the pass log and timings")
    o.add_argument("--model", default="gpt2-tiny", help="built-in model, e.g. gpt2-small, llama-tiny")
    o.add_argument("--level", default="O2", choices=["O0", "O1", "O2"])
    o.add_argument("--target", default="python",
                   help="backend: python (default), onnxruntime, triton (a GPU; Triton's "
                   "interpreter without one: slow, for checking), ...")
    o.add_argument("--seq", type=int, default=128)
    o.add_argument("--batch", type=int, default=1)
    o.add_argument("--threads", type=int, default=1)
    o.add_argument("--rounds", type=int, default=10)
    o.add_argument("--verify", action="store_true", help="check every pass numerically")
    o.add_argument("--out", help="save the compiled model to this directory")
    o.add_argument("--quantize", help="quantize the weights: int8-weight, int4-weight, int4-gptq, "
                   "int4-awq, w8a8, fp8, or a JSON object of a scheme and its options "
                   "('{\"scheme\": \"int4-gptq\", \"group\": 64}'); prints the accuracy report")
    o.add_argument("--calibration", type=int, default=0, metavar="N",
                   help="with --quantize: N calibration batches of random token ids shaped like "
                        "the example input (GPTQ, AWQ and w8a8 need some)")
    o.set_defaults(fn=_cmd_optimize)

    b = sub.add_parser("bench", help="compare transfuse with eager, torch.compile and ONNX Runtime",
                       description="Build every contestant, check it against the baseline, "
                       "then time all of them interleaved (see shared/BENCHMARKING.md).")
    b.add_argument("--model", type=_str_list, default=["gpt2-tiny"],
                   help="built-in model (gpt2-small, ...), hf:gpt2|llama|bert|mistral|qwen2 "
                   "with --config, or a .onnx file; comma-separated for several")
    b.add_argument("--config", help="transformers config JSON for an hf: model")
    b.add_argument("--attn", help="attn_implementation for an hf: model (eager, sdpa)")
    b.add_argument("--family", help="model family of an ONNX file (gpt2, bert, ...): picks the "
                   "ORT optimizer's model_type")
    b.add_argument("--seq", type=_int_list, default=[128], help="sequence lengths, e.g. 16,128")
    b.add_argument("--batch", type=_int_list, default=[1], help="batch sizes, e.g. 1,8")
    b.add_argument("--threads", type=int, default=1, help="threads for every contestant")
    b.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    b.add_argument("--warmup", type=int, default=2, help="warm-up calls per contestant")
    b.add_argument("--levels", type=_str_list, default=["O1", "O2"],
                   help="transfuse levels, e.g. O1,O2")
    b.add_argument("--contestants", type=_str_list,
                   help="only these contestants (names or prefixes; the baseline always runs)")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="default: fp32 on CPU, bf16 on CUDA")
    b.add_argument("--mode", default="prefill", choices=["prefill", "decode"])
    b.add_argument("--out", default="bench-out", help="directory for results.json and results.png")
    b.set_defaults(fn=_cmd_bench)

    lg = sub.add_parser("log", help="print the pass log of a saved artifact")
    lg.add_argument("path")
    lg.add_argument("--json", action="store_true")
    lg.add_argument("--why-not", dest="why_not", help="explain why a rule (id or prefix) did not fire")
    lg.set_defaults(fn=_cmd_log)

    ins = sub.add_parser("inspect", help="print a saved artifact's summary and graph")
    ins.add_argument("path")
    ins.set_defaults(fn=_cmd_inspect)

    sv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                        description="Compile MODEL for generation and serve /v1/completions, "
                        "/v1/chat/completions, /v1/models and /health (transfuse.serving); an "
                        "encoder folder (sentence-transformers, or no causal LM) is served on "
                        "/v1/embeddings instead. SIGTERM or Ctrl-C shuts down cleanly.")
    sv.add_argument("model", help="a Hugging Face model directory, a .gguf file, a saved "
                    "transfuse generation artifact, or a preset (llama-tiny, gpt2-tiny, llama-small, gpt2-small); "
                    "or an encoder directory for embeddings")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--target", choices=["python", "onnxruntime", "triton"],
                    help="backend (default: python, or the artifact's)")
    sv.add_argument("--max-batch", dest="max_batch", type=int,
                    help="requests running at once (default 16, or the artifact's)")
    sv.add_argument("--max-seq-len", dest="max_seq_len", type=int,
                    help="prompt + completion tokens per request (default: the model's "
                    "position limit, at most 2048)")
    sv.add_argument("--max-queue", dest="max_queue", type=int, default=256,
                    help="waiting requests before new ones get 429")
    sv.add_argument("--speculative", help="prompt-lookup, or draft:MODEL2 (a smaller model "
                    "with the same tokenizer)")
    sv.add_argument("--threads", type=int, default=1, help="torch threads")
    sv.add_argument("--save", help="also save the compiled model and its tokenizer to this "
                    "directory (serve it later without compiling: transfuse serve DIR)")
    sv.set_defaults(fn=_cmd_serve)
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
