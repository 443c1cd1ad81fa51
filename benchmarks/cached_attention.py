"""Per-layer time of the python target's ``cached_attention`` kernel: native read vs torch path.

One call of ``cached_attention_step`` (the cache write plus the read) per layer of a decode
step: B sequences, one new token each at position T - 1 (so T visible keys), token-major
cache: ``paged`` (block 16, blocks scattered), ``contiguous`` (slots out of order: the torch
path gathers) or ``in-order`` (slots 0..B-1: the torch path reads a view, no gather). The torch path (gather of the
visible cache + masked SDPA) runs with the native read switched off in-process; both are
timed interleaved, median of ``--rounds`` rounds of ``--calls`` calls each, 1 thread.

    python benchmarks/cached_attention.py [--rounds 7] [--calls 20] [--json out.json]

Shapes: GPT-2 (12 heads x 64, MHA) and SmolLM2-135M (9 query / 3 kv heads x 64).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import transfuse.codegen.python.generation as gen_kernel
from transfuse.codegen import native

MODELS = {"gpt2": (12, 12, 64), "smollm2": (9, 3, 64)}
BLOCK = 16


def _inputs(b: int, t: int, heads: int, kv_heads: int, d: int, layout: str):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, b, d, generator=gen)
    k, v = (torch.randn(1, kv_heads, b, d, generator=gen) for _ in range(2))
    pos = torch.full((b,), t - 1)
    sot = torch.arange(b)
    lens = torch.full((b,), t)
    if layout == "paged":
        per = -(-t // BLOCK)
        perm = torch.randperm(b * per, generator=gen)
        table = perm.reshape(b, per)
        shape = (b * per, BLOCK, kv_heads, d)
    else:
        table = torch.randperm(b, generator=gen) if layout == "contiguous" else torch.arange(b)
        shape = (b, t, kv_heads, d)
    kc, vc = (torch.randn(shape, generator=gen) for _ in range(2))
    return (q, k, v, kc, vc, pos, sot, lens, table), (BLOCK if layout == "paged" else None)


def _time(args, block_size, calls: int) -> float:
    gen_kernel._LAST_PLAN.clear()
    run = lambda: gen_kernel.cached_attention_step(  # noqa: E731
        *args, None, None, None, None, "bhsd", block_size, "token-major")
    run()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--layouts", default="paged,contiguous,in-order")
    parser.add_argument("--json")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    print(f"native: {native.status()}")
    read = gen_kernel.cached_attention_read
    rows = []
    for model, (h, hkv, d) in MODELS.items():
        for layout in opts.layouts.split(","):
            for b in (1, 8, 16):
                for t in (64, 256, 1024):
                    args, bs = _inputs(b, t, h, hkv, d, layout)
                    torch_ms, native_ms = [], []
                    for _ in range(opts.rounds):
                        gen_kernel.cached_attention_read = lambda *a, **k: None
                        torch_ms.append(_time(args, bs, opts.calls))
                        gen_kernel.cached_attention_read = read
                        native_ms.append(_time(args, bs, opts.calls))
                    row = {"model": model, "layout": layout, "B": b, "T": t,
                           "torch_ms": statistics.median(torch_ms),
                           "native_ms": statistics.median(native_ms)}
                    row["ratio"] = row["native_ms"] / row["torch_ms"]
                    rows.append(row)
                    print(f"{model:8s} {layout:10s} B={b:2d} T={t:4d}  torch {row['torch_ms']:7.3f} ms"
                          f"  native {row['native_ms']:7.3f} ms  x{row['ratio']:.2f}", flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"threads": 1, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
