"""Small-M linear: the native kernel (codegen/native/gemm.c) against F.linear (MKL), per shape.

    python benchmarks/small_linear.py [--threads 1] [--rows 1,2,4,8,16,32] [--rounds 3]

For every (K, N) of GPT-2 124M and SmolLM2-135M and each row count M, the time of
``y = x[M, K] @ W[N, K]^T + b`` by ``transfuse.codegen.native.ops.linear`` and by
``F.linear`` (and of ``x @ Wt[K, N]`` against ``torch.matmul`` for the K-major layout of
GPT-2's Conv1D), interleaved round by round, best round counted. Each call takes the next of a
ring of distinct weights totalling more than the last-level cache (so every weight comes
from memory, as in a decode step), and the line ends with the memory floor: the weight
bytes at 16 GB/s.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from transfuse.codegen import native
from transfuse.codegen.native import ops

#: (K, N, layout) of GPT-2 124M (qkv, o, fc, proj, LM head) and SmolLM2-135M (qkv, o, gate/up,
#: down, head); "nk": a linear's [N, K] weight (tf_linear_f32 vs F.linear), "kn": a [K, N]
#: weight as HF GPT-2's Conv1D keeps it (tf_linear_kn_f32 vs torch.matmul)
SHAPES = [(768, 2304, "nk"), (768, 768, "nk"), (768, 3072, "nk"), (3072, 768, "nk"),
          (768, 50257, "nk"), (768, 2304, "kn"), (768, 768, "kn"), (768, 3072, "kn"),
          (3072, 768, "kn"),
          (576, 960, "nk"), (576, 576, "nk"), (576, 1536, "nk"), (1536, 576, "nk"),
          (576, 49152, "nk")]


def llc_bytes() -> int:
    """The last-level cache's size from sysfs (64 MB when unknown)."""
    caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"))
    sizes = []
    for p in caches:
        text = p.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=64 << 20)


def time_ring(fn, ring: int, min_s: float = 0.05) -> float:
    """Seconds per call of fn(i) over i cycling through the ring, at least min_s of calls."""
    calls, t0 = 0, time.perf_counter()
    while True:
        fn(calls % ring)
        calls += 1
        el = time.perf_counter() - t0
        if el > min_s and calls >= ring:
            return el / calls


def shape_cells(k: int, n: int, layout: str, rows: list[int], rounds: int,
                budget: int) -> list[str]:
    """'M{m} native/torch (ratio)' in ms for each row count, on a ring of distinct weights."""
    ring = max(2, budget // (n * k * 4))
    ws = [torch.randn(n, k) if layout == "nk" else torch.randn(k, n) for _ in range(ring)]
    b = torch.randn(n)
    cells = []
    for m in rows:
        x = torch.randn(m, k)
        if layout == "nk":
            fns = {"native": lambda i, x=x: ops.linear(x, ws[i], b),
                   "torch": lambda i, x=x: F.linear(x, ws[i], b)}
        else:
            fns = {"native": lambda i, x=x: ops.linear(x, ws[i].t()),
                   "torch": lambda i, x=x: torch.matmul(x, ws[i])}
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(rounds):  # interleaved, so drift hits both
            for name, fn in fns.items():
                best[name] = min(best[name], time_ring(fn, ring))
        a, t = best["native"] * 1e3, best["torch"] * 1e3
        cells.append(f"M{m} {a:.2f}/{t:.2f} ({a / t:.2f})")
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if native.library() is None:
        raise SystemExit(f"native kernels unavailable: {native.status()}")
    rows = [int(r) for r in args.rows.split(",")]
    budget = int(llc_bytes() * 1.5)
    print(f"threads {args.threads}, weights rotated over {budget >> 20} MB per shape; "
          "ms per call native / F.linear (ratio)")
    with torch.inference_mode():
        for k, n, layout in SHAPES:
            cells = shape_cells(k, n, layout, rows, args.rounds, budget)
            floor = n * k * 4 / 16e9 * 1e3
            print(f"{k}x{n} {layout}: " + " | ".join(cells) + f" | floor {floor:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
