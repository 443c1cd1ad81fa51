#!/usr/bin/env python
"""Every GPU measurement of the triton backend (issue 14) in one call.

    python benchmarks/gpu.py                   # a GPU: the cases below (aimed at < 8 min on H100)
    python benchmarks/gpu.py --quick           # tiny shapes (a GPU smoke run, or the CPU test)
    python benchmarks/gpu.py --sections attention,window --budget-s 300 --out DIR

Writes ``benchmarks/results/gpu-<device>-<YYYY-MM-DD>.json`` (``<device>`` from
``torch.cuda.get_device_name``, e.g. ``nvidia-h200``; ``cpu-interpreter`` without a GPU). The
file is rewritten after every case, so a run that is killed or whose section fails leaves the
figures measured so far, and the failing section's error. Sections, in order:

1. ``bandwidth``: HBM bandwidth, a device-to-device copy of ``--hbm-mb`` (read + write bytes
   / time), measured first and again after ``decode``; the higher figure is the ceiling.
2. ``attention``: forward TFLOP/s at the FlashAttention-2 paper's shapes: head dim 64 and 128,
   seq 512..16k, 16k tokens (batch = 16384 / seq), 2048 / head dim heads, causal and not, bf16.
   Contestants: ``transfuse`` (kernels/flash_attention.py), ``sdpa-flash`` and ``sdpa-cudnn``
   (``torch.nn.attention.sdpa_kernel`` with one backend), ``flex`` (``torch.compile``-d
   FlexAttention; causal through a block mask). FLOPs = 4·b·h·sq·sk·d, halved when causal.
3. ``window``: causal sliding window 4096 at seq 16k (hd 128, 16 heads, batch 1): transfuse's
   window vs FlexAttention's sliding-window block mask vs SDPA with a dense boolean mask;
   ``speedup_vs_dense_mask`` = dense-mask ms / transfuse ms. TFLOP/s count visible pairs only.
4. ``decode``: one query token per sequence over caches of 4k..32k positions (batch 8, 32 query
   / 8 kv heads, hd 128, bf16), transfuse's ``decode_attention`` paged (block 16) and contiguous
   vs SDPA over the dense cache; GB/s = K and V bytes / time, and its fraction of the HBM
   figure of section 1.
5. ``e2e``: a llama-style model from a ``LlamaConfig`` (random weights, bf16): prefill
   tokens/s (batch 8, seq 512) and decode tokens/s (batch 8, prompt 512, 64 new tokens,
   greedy, EOS disabled) for ``eager``, ``torch.compile`` (prefill: default mode; decode:
   Hugging Face ``generate`` with a static cache, which compiles the decode step itself) and
   ``transfuse-<target>`` (``transfuse.optimize(..., target=...)``; decode through
   ``optimize(generation=...)``, a paged cache).

Protocol (../shared/BENCHMARKING.md, GPU): every contestant is checked before it is timed (a
wrong one is reported ``wrong`` with its error and not timed; one that cannot run here is
``unavailable`` with the reason; one that raises is ``failed`` with the error). Attention
outputs are compared with an fp32 reference on a sample of query rows (the first and last
rows and random ones): max|a - b| / max|b| <= 3e-2 (bf16). Prefill logits are compared with
the fp32 model: at most max(3e-2, 2x eager bf16's own error). Decode tokens are compared with
eager's and reported (bf16 argmax ties make them diverge; not a gate). Timing: the median of
``triton.testing.do_bench`` (CUDA events; it clears the L2 between calls) on a GPU; decode
tokens/s from host timestamps after each step's tokens reach the host (every contestant
syncs once per step), median of ``--rounds`` after a warm-up call. ``first_call_s`` is the
first call's wall time (compiles included); ``build_s`` the build's (``transfuse.optimize``).

The issue's targets (H100/H200) are evaluated into ``targets`` with their figures: attention
>= 0.9x SDPA-flash at every hd-128 shape; window >= 5x dense-mask SDPA; prefill >= 1.0x
torch.compile; decode attention >= 70% of the HBM figure at every cache length and layout.
Without a GPU (Triton's interpreter on the CPU, ``--quick``'s tiny shapes, ``time.perf_counter``
medians) the script shows that every path runs and every check passes; no figure of such a run
says anything about GPU speed, and no target is evaluated. Contestants that need CUDA (SDPA's
flash and cuDNN backends, compiled FlexAttention, torch.compile) are ``unavailable`` there;
FlexAttention still runs eagerly (unfused) for its correctness check.

``--budget-s``: cases that would start after this many seconds are recorded ``skipped``.
Not yet run on a GPU: the GPU paths (do_bench, SDPA backends, compiled FlexAttention,
torch.compile, the static-cache decode) are written for torch 2.11 / triton 3.6 / transformers
5.17 (the GPU image) but only the interpreter paths have run.
"""

from __future__ import annotations

# first: fixes Triton's mode (GPU / interpreter) before anything imports triton
from transfuse.codegen.triton import env  # isort: skip

import argparse
import copy
import dataclasses
import datetime
import functools
import json
import math
import re
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton

from transfuse.bench.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = "transfuse.bench.gpu/1"
SECTIONS = ("bandwidth", "attention", "window", "decode", "e2e")
#: bf16 tolerance of every check: max|a - b| / max|b| (transfuse.bench.correctness)
BF16_TOL = 3e-2
DTYPE = torch.bfloat16

#: llama-style configs for the e2e section (LlamaConfig fields)
E2E_MODELS: dict[str, dict[str, int]] = {
    # hd 128 like the 1-8B llamas: 672M parameters (541M without the two embeddings)
    "llama-670m": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 12,
                   "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000},
    # about the DESIGN's llama-small: 125M parameters (76M without the embeddings)
    "llama-110m": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 32000},
    # --quick: runs under the interpreter
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256},
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """The shapes of one run (full or ``--quick``)."""

    attn_seqs: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    attn_head_dims: tuple[int, ...] = (64, 128)
    attn_tokens: int = 16384  # batch x seq
    attn_hidden: int = 2048  # heads x head dim
    check_rows: int = 64  # query rows compared with the fp32 reference
    window_seq: int = 16384
    window: int = 4096
    window_heads: int = 16
    window_head_dim: int = 128
    decode_caches: tuple[int, ...] = (4096, 8192, 16384, 32768)
    decode_batch: int = 8
    decode_heads: int = 32
    decode_kv_heads: int = 8
    decode_head_dim: int = 128
    decode_block: int = 16
    hbm_mb: int = 2048
    e2e_model: str = "llama-670m"
    e2e_batch: int = 8
    e2e_seq: int = 512
    e2e_new_tokens: int = 64
    warmup_ms: int = 10  # do_bench
    rep_ms: int = 50
    cpu_reps: int = 2  # perf_counter calls per timing without a GPU


FULL = Plan()
QUICK = Plan(attn_seqs=(32, 64), attn_head_dims=(64,), attn_tokens=128, attn_hidden=128,
             check_rows=8, window_seq=64, window=16, window_heads=2, window_head_dim=64,
             decode_caches=(32, 64), decode_batch=2, decode_heads=4, decode_kv_heads=2,
             decode_head_dim=64, hbm_mb=8, e2e_model="tiny", e2e_batch=2, e2e_seq=8,
             e2e_new_tokens=3, cpu_reps=1)


# -- helpers --------------------------------------------------------------------------------


def device_slug(gpu: bool) -> str:
    """``NVIDIA H200`` -> ``nvidia-h200``; ``cpu-interpreter`` without a GPU."""
    if not gpu:
        return "cpu-interpreter"
    name = torch.cuda.get_device_name()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "cuda"


def describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 600 else text[:600] + " ..."


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|a - b| / max|b| in fp32 on the tensors' device; inf for a shape mismatch or a
    non-finite value where the reference is finite."""
    if actual.shape != expected.shape:
        return math.inf
    a, b = actual.float(), expected.float()
    diff = (a - b).abs()
    if not bool(torch.isfinite(diff[torch.isfinite(b)]).all()):
        return math.inf
    return float(diff.max() / b.abs().max().clamp_min(1e-12))


def check_entry(err: float, tol: float) -> dict:
    return {"max_rel_err": err, "tolerance": tol, "ok": err <= tol}


class Clock:
    """Milliseconds per call: the median of ``triton.testing.do_bench`` on a GPU, else the
    median of ``cpu_reps`` perf_counter calls (the interpreter: shows the code runs)."""

    def __init__(self, gpu: bool, plan: Plan):
        self.gpu, self.plan = gpu, plan

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize()

    def ms(self, fn: Callable[[], object]) -> float:
        if self.gpu:
            try:
                return float(triton.testing.do_bench(fn, warmup=self.plan.warmup_ms,
                                                     rep=self.plan.rep_ms, return_mode="median"))
            except TypeError:  # an older do_bench without return_mode
                return float(triton.testing.do_bench(fn, warmup=self.plan.warmup_ms,
                                                     rep=self.plan.rep_ms, quantiles=[0.5])[0])
        samples = []
        for _ in range(self.plan.cpu_reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    def first_call(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0


class Unavailable(Exception):
    """A contestant that cannot run here (the message says why)."""


def measure(clock: Clock, fn: Callable[[], Any], check: Callable[[Any], dict],
            per_ms: Callable[[float], dict]) -> dict:
    """One contestant: first call (timed), check, then timing when the check passed.
    ``per_ms`` turns the milliseconds into the figures (TFLOP/s, GB/s)."""
    entry: dict[str, Any] = {}
    try:
        out, entry["first_call_s"] = clock.first_call(fn)
        entry["check"] = check(out)
        del out
        if not entry["check"]["ok"]:
            entry["status"] = "wrong"
            return entry
        ms = clock.ms(fn)
        entry.update(status="ok", ms=ms, **per_ms(ms))
    except Unavailable as e:
        entry.update(status="unavailable", reason=str(e))
    except Exception as e:  # noqa: BLE001 - a contestant's crash is a result, not the end
        msg = describe_error(e)
        if "No available kernel" in msg or "No viable backend" in msg:  # SDPA refuses it
            entry.update(status="unavailable", reason=msg)
        else:
            entry.update(status="failed", error=msg)
    return entry


# -- the run: results, partial saves, budget -------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace, plan: Plan, gpu: bool):
        self.args, self.plan, self.gpu = args, plan, gpu
        self.dev = torch.device("cuda" if gpu else "cpu")
        self.clock = Clock(gpu, plan)
        self.t0 = time.perf_counter()
        today = datetime.date.today().isoformat()
        self.path = Path(args.out) / f"gpu-{device_slug(gpu)}-{today}.json"
        self.results: dict[str, Any] = {
            "schema": SCHEMA,
            "date": today,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": self.device_info(),
            "machine": machine_info(threads=torch.get_num_threads(),
                                    device="cuda" if gpu else "cpu"),
            "settings": {"quick": bool(args.quick), "sections": list(args.sections),
                         "budget_s": args.budget_s, "rounds": args.rounds,
                         "e2e_target": args.e2e_target, "plan": dataclasses.asdict(plan)},
            "sections": {},
            "targets": {},
        }

    def device_info(self) -> dict:
        info: dict[str, Any] = {
            "slug": device_slug(self.gpu), "gpu": self.gpu, "interpreter": env.interpreting(),
            "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda,
        }
        try:
            import transformers
            info["transformers"] = transformers.__version__
        except ImportError:
            info["transformers"] = None
        if self.gpu:
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                        sms=props.multi_processor_count,
                        memory_gb=round(props.total_memory / 2**30, 1),
                        cudnn=torch.backends.cudnn.version())
        else:
            info["name"] = "cpu (Triton interpreter): no GPU figures"
        return info

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return self.args.budget_s is not None and self.elapsed() > self.args.budget_s

    def skipped(self) -> dict:
        return {"status": "skipped",
                "reason": f"over the time budget (--budget-s {self.args.budget_s})"}

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        self.results["wall_s"] = round(self.elapsed(), 2)
        self.results["targets"] = evaluate_targets(self.results["sections"], self.gpu)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.path)

    def section(self, name: str, fn: Callable[[Run, dict], None]) -> None:
        self.log(f"== {name}")
        entry: dict[str, Any] = {"status": "running"}
        self.results["sections"][name] = entry
        t0 = time.perf_counter()
        try:
            fn(self, entry)
            entry["status"] = "ok"
        except Unavailable as e:
            entry.update(status="unavailable", reason=str(e))
            self.log(f"   {name} unavailable: {e}")
        except Exception as e:  # noqa: BLE001 - the other sections still run
            entry["status"] = "failed"
            entry["error"] = describe_error(e)
            entry["traceback"] = traceback.format_exc().splitlines()[-12:]
            self.log(f"   {name} failed: {entry['error']}")
        entry["wall_s"] = round(time.perf_counter() - t0, 2)
        if self.gpu:
            torch.cuda.empty_cache()
        self.save()

    def rand(self, *shape: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator(device=self.dev).manual_seed(seed)
        return torch.randn(*shape, generator=g, device=self.dev, dtype=torch.float32).to(DTYPE)


# -- 1. HBM bandwidth -------------------------------------------------------------------------


def copy_bandwidth(run: Run) -> dict:
    """dst.copy_(src) of --hbm-mb bytes; GB/s = 2 x bytes / time (read + write)."""
    n = run.plan.hbm_mb * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=run.dev).random_(0, 255)
    dst = torch.empty_like(src)
    ms = run.clock.ms(lambda: dst.copy_(src))
    return {"bytes": n, "ms": ms, "gbps": 2 * n / (ms * 1e-3) / 1e9}


def bandwidth_section(run: Run, entry: dict) -> None:
    entry["before"] = copy_bandwidth(run)
    entry["gbps"] = entry["before"]["gbps"]
    entry["method"] = "device-to-device copy, (read + write) bytes / median time"
    run.log(f"   copy {entry['gbps']:.0f} GB/s")


def hbm_gbps(run: Run) -> float | None:
    """The HBM figure: the bandwidth section's, else the one the decode section took."""
    secs = run.results["sections"]
    return secs.get("bandwidth", {}).get("gbps") or secs.get("decode", {}).get("hbm", {}).get(
        "gbps")


# -- 2. and 3. attention forward ------------------------------------------------------------


def query_rows(sq: int, n: int, seed: int = 0) -> torch.Tensor:
    """Query rows the reference checks: the first and last n/4, n/2 random others."""
    edge = max(1, n // 4)
    g = torch.Generator().manual_seed(seed)
    rand = torch.randperm(sq, generator=g)[: max(1, n // 2)]
    rows = torch.cat([torch.arange(min(edge, sq)), torch.arange(max(0, sq - edge), sq), rand])
    return torch.unique(rows)


def reference_rows(q, k, v, rows: torch.Tensor, causal: bool, window: int | None,
                   budget_bytes: int = 2**30) -> torch.Tensor:
    """fp32 attention of query rows ``rows`` (bottom-right aligned masks): [B, H, R, Dv]."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    rows = rows.to(q.device)
    pos = rows + (sk - sq)
    j = torch.arange(sk, device=q.device)
    keep = torch.ones(len(rows), sk, dtype=torch.bool, device=q.device)
    if causal:
        keep &= j[None, :] <= pos[:, None]
    if window is not None:
        keep &= j[None, :] > pos[:, None] - window
    out = []
    step = max(1, budget_bytes // max(1, h * len(rows) * sk * 4))
    for i in range(0, b, step):
        qs = q[i:i + step, :, rows].float()
        s = qs @ k[i:i + step].float().transpose(-1, -2) / math.sqrt(d)
        s = s.masked_fill(~keep, float("-inf"))
        out.append(torch.softmax(s, dim=-1) @ v[i:i + step].float())
    return torch.cat(out)


def attention_check(ref: torch.Tensor, rows: torch.Tensor) -> Callable[[Any], dict]:
    def check(out: torch.Tensor) -> dict:
        return check_entry(rel_err(out[:, :, rows.to(out.device)], ref), BF16_TOL)
    return check


def attention_flops(b: int, h: int, sq: int, sk: int, d: int, causal: bool) -> float:
    """The FlashAttention papers' count: 4·b·h·sq·sk·d, halved when causal."""
    return 4.0 * b * h * sq * sk * d / (2.0 if causal else 1.0)


_FLEX: dict[str, Any] = {}


def flex_fn(gpu: bool):
    """FlexAttention: ``torch.compile``-d on a GPU; on the CPU the eager (unfused) function,
    only used for the correctness check."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        if gpu:
            cfg = torch._dynamo.config  # one compiled function serves every shape
            for name in ("cache_size_limit", "recompile_limit"):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), 64))
            _FLEX["fn"] = torch.compile(flex_attention)
        else:
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch")
            _FLEX["fn"] = flex_attention
    return _FLEX["fn"]


def flex_block_mask(sq: int, sk: int, causal: bool, window: int | None, device):
    from torch.nn.attention.flex_attention import create_block_mask

    if not causal and window is None:
        return None
    offset = sk - sq

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        keep = kv_idx <= pos if causal else kv_idx >= 0
        if window is not None:
            keep = keep & (kv_idx > pos - window)
        return keep

    return create_block_mask(mask_mod, None, None, sq, sk, device=device)


def flex_contestant(run: Run, q, k, v, causal: bool, window: int | None, check, per_ms):
    """The flex entry: timed on a GPU; on the CPU checked eagerly and reported unavailable."""
    sq, sk = q.shape[2], k.shape[2]
    try:
        fn = flex_fn(run.gpu)
        mask = flex_block_mask(sq, sk, causal, window, q.device)
    except Exception as e:  # noqa: BLE001
        return {"status": "unavailable", "reason": describe_error(e)}

    def call():
        return fn(q, k, v, block_mask=mask)

    if run.gpu:
        return measure(run.clock, call, check, per_ms)
    entry: dict[str, Any] = {"status": "unavailable",
                             "reason": "torch.compile(flex_attention) is measured on a CUDA "
                                       "device only; checked here eagerly (unfused), not timed"}
    try:
        entry["check"] = check(call())
    except Exception as e:  # noqa: BLE001
        entry["check"] = {"ok": False, "error": describe_error(e)}
    return entry


def sdpa_backend_fn(run: Run, backend_name: str, q, k, v, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not run.gpu:
        raise Unavailable(f"SDPA's {backend_name} backend is a CUDA kernel; no CUDA device here")
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        raise Unavailable(f"this torch ({torch.__version__}) has no SDPBackend.{backend_name}")

    def call():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return call


def attention_case(run: Run, b: int, h: int, s: int, d: int, causal: bool) -> dict:
    from transfuse.codegen.triton.kernels.flash_attention import flash_attention

    q, k, v = (run.rand(b, h, s, d, seed=i) for i in range(3))
    rows = query_rows(s, run.plan.check_rows)
    ref = reference_rows(q, k, v, rows, causal, None)
    check = attention_check(ref, rows)
    flops = attention_flops(b, h, s, s, d, causal)

    def per_ms(ms: float) -> dict:
        return {"tflops": flops / (ms * 1e-3) / 1e12}

    out = torch.empty_like(q)
    row: dict[str, Any] = {"batch": b, "heads": h, "seq": s, "head_dim": d, "causal": causal,
                           "dtype": "bfloat16", "flops": flops, "checked_rows": len(rows),
                           "contestants": {}}
    cs = row["contestants"]
    cs["transfuse"] = measure(run.clock, lambda: flash_attention(q, k, v, causal=causal, out=out),
                              check, per_ms)
    for name, backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION")):
        try:
            fn = sdpa_backend_fn(run, backend, q, k, v, causal)
        except Unavailable as e:
            cs[name] = {"status": "unavailable", "reason": str(e)}
            continue
        cs[name] = measure(run.clock, fn, check, per_ms)
    cs["flex"] = flex_contestant(run, q, k, v, causal, None, check, per_ms)
    for peer in ("sdpa-flash", "sdpa-cudnn", "flex"):  # transfuse TFLOP/s / the peer's
        row[f"ratio_vs_{peer.replace('-', '_')}"] = ratio(cs["transfuse"].get("tflops"),
                                                          cs[peer].get("tflops"))
    return row


def fmt_entry(e: dict, key: str, unit: str) -> str:
    if e.get("status") == "ok":
        return f"{e[key]:.4g} {unit}"
    return f"{e.get('status')} {e.get('reason') or e.get('error') or ''}"[:160].rstrip()


def fmt_row(cs: dict, key: str, unit: str) -> str:
    return "; ".join(f"{name} {fmt_entry(e, key, unit) if e['status'] == 'ok' else e['status']}"
                     for name, e in cs.items())


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def run_cases(run: Run, rows: list, cases: list[tuple[str, dict, Callable[[], dict]]],
              key: str, unit: str) -> None:
    """Each (label, identifying fields, case function) in turn: skipped over the budget, a
    raising case (out of memory, say) recorded as failed; the results file saved after each."""
    for label, base, case in cases:
        if run.over_budget():
            row = {**base, **run.skipped()}
        else:
            try:
                row = case()
            except Exception as e:  # noqa: BLE001 - the next case still runs
                row = {**base, "status": "failed", "error": describe_error(e)}
        rows.append(row)
        if run.gpu:
            torch.cuda.empty_cache()
        run.log(f"   {label}: {fmt_row(row.get('contestants', {}), key, unit) or row['status']}")
        run.save()


def attention_section(run: Run, entry: dict) -> None:
    p = run.plan
    entry["rows"] = []
    entry["flops"] = "4*b*h*sq*sk*d, halved when causal (FlashAttention papers)"
    cases = []
    for d in p.attn_head_dims:
        h = p.attn_hidden // d
        for s in p.attn_seqs:
            b = max(1, p.attn_tokens // s)
            for causal in (False, True):
                cases.append((f"hd{d} s{s} b{b} h{h} {'causal' if causal else 'full'}",
                              {"batch": b, "heads": h, "seq": s, "head_dim": d, "causal": causal},
                              functools.partial(attention_case, run, b, h, s, d, causal)))
    run_cases(run, entry["rows"], cases, "tflops", "TFLOP/s")


def window_section(run: Run, entry: dict) -> None:
    from transfuse.codegen.triton.kernels.flash_attention import flash_attention, visible_pairs
    from transfuse.ir.opdefs.nn import attention_mask

    p = run.plan
    b, h, s, d, w = 1, p.window_heads, p.window_seq, p.window_head_dim, p.window
    q, k, v = (run.rand(b, h, s, d, seed=10 + i) for i in range(3))
    rows = query_rows(s, p.check_rows)
    check = attention_check(reference_rows(q, k, v, rows, True, w), rows)
    pairs = visible_pairs(s, s, True, w)
    flops = 4.0 * b * h * d * pairs

    def per_ms(ms: float) -> dict:
        return {"tflops": flops / (ms * 1e-3) / 1e12}

    entry.update(batch=b, heads=h, seq=s, head_dim=d, window=w, causal=True, dtype="bfloat16",
                 flops=flops, flops_note="4*b*h*d*(visible query-key pairs)",
                 checked_rows=len(rows), contestants={})
    cs = entry["contestants"]
    out = torch.empty_like(q)
    cs["transfuse"] = measure(
        run.clock, lambda: flash_attention(q, k, v, causal=True, window=w, out=out), check, per_ms)
    run.save()
    cs["flex"] = flex_contestant(run, q, k, v, True, w, check, per_ms)
    run.save()
    cs["sdpa-dense-mask"] = not_run(run)
    if cs["sdpa-dense-mask"] is None:
        mask = attention_mask(s, s, True, w, device=q.device)  # [S, S] bool, True = attend
        cs["sdpa-dense-mask"] = measure(
            run.clock, lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), check,
            per_ms)
    entry["speedup_vs_dense_mask"] = ratio(cs["sdpa-dense-mask"].get("ms"),
                                           cs["transfuse"].get("ms"))
    entry["speedup_vs_flex"] = ratio(cs["flex"].get("ms"), cs["transfuse"].get("ms"))
    run.log(f"   seq {s} window {w}: {fmt_row(cs, 'ms', 'ms')}")


# -- 4. decode attention ----------------------------------------------------------------------


def decode_case(run: Run, t: int, paged: bool) -> dict:
    from transfuse.codegen.triton.kernels.decode_attention import decode_attention

    p = run.plan
    b, h, hkv, d, bs = p.decode_batch, p.decode_heads, p.decode_kv_heads, p.decode_head_dim, \
        p.decode_block
    q = run.rand(b, h, d, seed=20)
    if paged:
        nblk = -(-t // bs)
        g = torch.Generator().manual_seed(21)
        table = torch.randperm(b * nblk, generator=g).reshape(b, nblk).to(run.dev)
        kc, vc = (run.rand(b * nblk, bs, hkv, d, seed=22 + i) for i in range(2))
        kd, vd = (c[table].reshape(b, nblk * bs, hkv, d)[:, :t] for c in (kc, vc))
    else:
        table = None
        kc, vc = (run.rand(b, t, hkv, d, seed=22 + i) for i in range(2))
        kd, vd = kc, vc
    kd, vd = (x.transpose(1, 2).contiguous() for x in (kd, vd))  # dense [B, Hkv, T, D]
    lens = torch.full((b,), t, dtype=torch.int64, device=run.dev)
    g_ = h // hkv
    # fp32 reference on the dense cache: query head h reads kv head h // G
    qf = q.float().view(b, hkv, g_, d)
    scores = qf @ kd.float().transpose(-1, -2) / math.sqrt(d)  # [B, Hkv, G, T]
    ref = (torch.softmax(scores, dim=-1) @ vd.float()).reshape(b, h, d)
    del scores, qf
    nbytes = 2 * b * t * hkv * d * kc.element_size()
    bw = hbm_gbps(run)

    def check(o: torch.Tensor) -> dict:
        return check_entry(rel_err(o.reshape(b, h, d), ref), BF16_TOL)

    def per_ms(ms: float) -> dict:
        gbps = nbytes / (ms * 1e-3) / 1e9
        return {"gbps": gbps, "hbm_fraction": gbps / bw if bw else None}

    out = torch.empty(b, h, d, dtype=DTYPE, device=run.dev)
    row: dict[str, Any] = {"cache_len": t, "layout": "paged" if paged else "contiguous",
                           "block_size": bs if paged else None, "batch": b, "heads": h,
                           "kv_heads": hkv, "head_dim": d, "dtype": "bfloat16",
                           "bytes": nbytes, "contestants": {}}
    cs = row["contestants"]
    cs["transfuse"] = measure(
        run.clock, lambda: decode_attention(q, kc, vc, lens, table, paged=paged, out=out),
        check, per_ms)
    qd = q[:, :, None, :]
    cs["sdpa"] = measure(
        run.clock,
        lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=hkv != h)[:, :, 0],
        check, per_ms)
    row["sdpa_note"] = "SDPA reads a dense [B, Hkv, T, D] copy of the cache (its gather untimed)"
    return row


def decode_section(run: Run, entry: dict) -> None:
    entry["rows"] = rows = []
    entry["bytes"] = "K and V read: 2*B*T*Hkv*D*2"
    if hbm_gbps(run) is None:  # run without the bandwidth section: measure it here
        entry["hbm"] = copy_bandwidth(run)
    cases = [(f"{layout} T={t}", {"cache_len": t, "layout": layout},
              functools.partial(decode_case, run, t, layout == "paged"))
             for layout in ("paged", "contiguous") for t in run.plan.decode_caches]
    run_cases(run, rows, cases, "gbps", "GB/s")
    if "bandwidth" in run.results["sections"] and not run.over_budget():
        bw = run.results["sections"]["bandwidth"]
        try:
            bw["after"] = copy_bandwidth(run)
            bw["gbps"] = max(bw.get("gbps") or 0.0, bw["after"]["gbps"])
        except Exception as e:  # noqa: BLE001
            bw["after"] = {"error": describe_error(e)}
        for row in rows:  # fractions against the higher figure
            for e in row.get("contestants", {}).values():
                if e.get("gbps") and bw.get("gbps"):
                    e["hbm_fraction"] = e["gbps"] / bw["gbps"]


# -- 5. end to end ----------------------------------------------------------------------------


class StepClock:
    """A Hugging Face streamer that stamps the host time each step's tokens arrive (they are
    copied to the host, a sync): stamps[0] the prompt, stamps[1] the prefill's token, ..."""

    def __init__(self):
        self.stamps: list[float] = []
        self.tokens: list[torch.Tensor] = []

    def put(self, value):
        self.stamps.append(time.perf_counter())
        self.tokens.append(value)

    def end(self):
        pass


def build_llama(run: Run, name: str, max_positions: int):
    import transformers

    cfg = transformers.LlamaConfig(**E2E_MODELS[name], max_position_embeddings=max_positions)
    devices = [torch.cuda.current_device()] if run.gpu else []
    with torch.random.fork_rng(devices=devices), run.dev:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
    return model.eval()


def logits_of(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    from transfuse.bench.correctness import flatten_outputs

    return flatten_outputs(out)[0]


def target_reason(target: str) -> str | None:
    from transfuse.codegen.targets import target_names

    if target not in target_names():
        return (f"target {target!r} is not registered in transfuse.codegen.targets "
                f"(available: {', '.join(target_names())})")
    return None


def not_run(run: Run, *, cuda_only: str | None = None, target: str | None = None) -> dict | None:
    """The entry of a contestant that is not run here, or None: over the budget, a peer
    measured on CUDA only (``cuda_only`` says why) without a GPU, an unregistered target."""
    if run.over_budget():
        return run.skipped()
    if cuda_only and not run.gpu:
        return {"status": "unavailable", "reason": f"measured on a CUDA device only ({cuda_only})"}
    reason = target_reason(target) if target else None
    return {"status": "unavailable", "reason": reason} if reason else None


def build_timed(build: Callable[[], Any]) -> tuple[Any, dict]:
    """(what ``build`` returns or None, {"build_s"} or the failed entry)."""
    t0 = time.perf_counter()
    try:
        built = build()
    except Exception as e:  # noqa: BLE001
        return None, {"status": "failed", "error": f"build: {describe_error(e)}",
                      "build_s": time.perf_counter() - t0}
    return built, {"build_s": time.perf_counter() - t0}


def e2e_prefill(run: Run, model, ref_model, entry: dict) -> None:
    p, clock = run.plan, run.clock
    b, s = p.e2e_batch, p.e2e_seq
    g = torch.Generator(device=run.dev).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (b, s), generator=g, device=run.dev)
    model.config.use_cache = False
    with torch.no_grad():  # the tolerance comes from eager bf16's own error
        ref = ref_model(input_ids=ids).logits
        eager_err = rel_err(model(input_ids=ids).logits, ref)
    tol = max(BF16_TOL, 2 * eager_err) if math.isfinite(eager_err) else BF16_TOL
    tokens = b * s
    res: dict[str, Any] = {"batch": b, "seq": s, "tolerance_rule":
                           "max(3e-2, 2 x eager bf16's error) vs the fp32 model's logits",
                           "eager_bf16_error": eager_err, "tolerance": tol, "contestants": {}}
    entry["prefill"] = res
    cs = res["contestants"]

    def check(out) -> dict:
        return check_entry(rel_err(logits_of(out), ref), tol)

    def per_ms(ms: float) -> dict:
        return {"tokens_per_s": tokens / (ms * 1e-3)}

    def nograd(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call

    cs["eager"] = measure(clock, nograd(lambda: model(input_ids=ids)), check, per_ms)
    run.log(f"   prefill eager: {fmt_entry(cs['eager'], 'tokens_per_s', 'tokens/s')}")
    run.save()

    cs["torch.compile"] = not_run(run, cuda_only="inductor's CPU compile takes minutes")
    if cs["torch.compile"] is None:
        torch._dynamo.reset()
        compiled = torch.compile(model)
        cs["torch.compile"] = measure(clock, nograd(lambda: compiled(input_ids=ids)), check,
                                      per_ms)
    run.log(f"   prefill torch.compile: "
            f"{fmt_entry(cs['torch.compile'], 'tokens_per_s', 'tokens/s')}")
    run.save()

    target = run.args.e2e_target
    name = f"transfuse-{target}"
    cs[name] = not_run(run, target=target)
    if cs[name] is None:
        import transfuse

        ours, cs[name] = build_timed(lambda: transfuse.optimize(
            model, (), {"input_ids": ids}, target=target, device=run.dev))
        if ours is not None:
            cs[name].update(measure(clock, nograd(lambda: ours(input_ids=ids)), check, per_ms))
    run.log(f"   prefill {name}: {fmt_entry(cs[name], 'tokens_per_s', 'tokens/s')}")
    res["ratio_vs_torch_compile"] = ratio(cs[name].get("tokens_per_s"),
                                          cs["torch.compile"].get("tokens_per_s"))
    res["ratio_vs_eager"] = ratio(cs[name].get("tokens_per_s"), cs["eager"].get("tokens_per_s"))
    model.config.use_cache = True


def decode_rounds(run: Run, go: Callable[[], tuple[list[float], torch.Tensor]],
                  steps: int) -> dict:
    """Warm-up call, then --rounds calls; per call: ms per decode step from the stamps
    (first new token -> last: the prefill is left out), median over rounds."""
    entry: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        stamps, tokens = go()
        entry["first_call_s"] = time.perf_counter() - t0
        per_step = []
        for _ in range(run.args.rounds):
            stamps, tokens = go()
            if len(stamps) < 2:
                raise RuntimeError(f"only {len(stamps)} step stamps (expected {steps})")
            per_step.append((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3)
        entry.update(status="ok", ms_per_step=statistics.median(per_step),
                     ms_per_step_rounds=per_step, steps=len(stamps))
        entry["tokens"] = tokens
    except Unavailable as e:
        entry.update(status="unavailable", reason=str(e))
    except Exception as e:  # noqa: BLE001
        entry.update(status="failed", error=describe_error(e))
    return entry


def agreement(tokens: torch.Tensor, ref: torch.Tensor) -> dict:
    """Greedy tokens [B, N] vs eager's: identical sequences and the mean common prefix."""
    same = tokens.cpu() == ref.cpu()
    prefix = torch.where(same.all(dim=1), same.shape[1], (~same).int().argmax(dim=1))
    return {"identical_sequences": int(same.all(dim=1).sum()), "sequences": same.shape[0],
            "mean_common_prefix": float(prefix.float().mean()), "new_tokens": same.shape[1]}


def e2e_decode(run: Run, model, entry: dict) -> None:
    p = run.plan
    b, s, n = p.e2e_batch, p.e2e_seq, p.e2e_new_tokens
    g = torch.Generator(device=run.dev).manual_seed(2)
    prompt = torch.randint(0, model.config.vocab_size, (b, s), generator=g, device=run.dev)
    mask = torch.ones_like(prompt)
    res: dict[str, Any] = {"batch": b, "prompt": s, "new_tokens": n, "greedy": True,
                           "timing": "host stamps as each step's tokens reach the host; "
                                     "ms/step over the decode steps only", "contestants": {}}
    entry["decode"] = res
    cs = res["contestants"]

    def hf(static: bool):
        def go():
            clock = StepClock()
            kwargs = {"cache_implementation": "static"} if static else {}
            with torch.no_grad():
                model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0, streamer=clock, **kwargs)
            return clock.stamps[1:], torch.stack([t.reshape(-1) for t in clock.tokens[1:]], 1)
        return go

    cs["eager"] = decode_rounds(run, hf(False), n)
    run.log(f"   decode eager: {fmt_entry(cs['eager'], 'ms_per_step', 'ms/step')}")
    run.save()
    cs["torch.compile"] = not_run(run, cuda_only="Hugging Face compiles the static-cache "
                                                 "decode step on CUDA devices")
    if cs["torch.compile"] is None:
        torch._dynamo.reset()
        cs["torch.compile"] = decode_rounds(run, hf(True), n)
        cs["torch.compile"]["how"] = ("generate(cache_implementation='static'): transformers "
                                      "compiles the decode forward (CompileConfig defaults)")
    run.log(f"   decode torch.compile: {fmt_entry(cs['torch.compile'], 'ms_per_step', 'ms/step')}")
    run.save()

    target = run.args.e2e_target
    name = f"transfuse-{target}"
    cs[name] = not_run(run, target=target)
    if cs[name] is None:
        import transfuse

        options = {"max_seq_len": s + n, "max_batch": b, "kv": "paged", "block_size": 16}
        gen, cs[name] = build_timed(lambda: transfuse.optimize(
            model, (prompt,), target=target, generation=options, device=run.dev))
        cs[name]["generation"] = options
        if gen is not None:
            def go():
                stamps, toks = [], []
                for tok in gen.generate(prompt, max_new_tokens=n, min_new_tokens=n,
                                        do_sample=False, stream=True):
                    run.clock.sync()
                    stamps.append(time.perf_counter())
                    toks.append(torch.as_tensor(tok).reshape(-1).cpu())
                return stamps, torch.stack(toks, 1)

            cs[name].update(decode_rounds(run, go, n))
    run.log(f"   decode {name}: {fmt_entry(cs[name], 'ms_per_step', 'ms/step')}")
    ref = cs["eager"].get("tokens")
    for e in cs.values():
        tokens = e.pop("tokens", None)
        if e.get("status") == "ok":
            e["tokens_per_s"] = b / (e["ms_per_step"] * 1e-3)
            if tokens is not None and ref is not None and tokens.shape == ref.shape:
                e["agreement_with_eager"] = agreement(tokens, ref)
    res["ratio_vs_torch_compile"] = ratio(cs[name].get("tokens_per_s"),
                                          cs["torch.compile"].get("tokens_per_s"))
    res["ratio_vs_eager"] = ratio(cs[name].get("tokens_per_s"), cs["eager"].get("tokens_per_s"))


def e2e_section(run: Run, entry: dict) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"needs transformers ({e})") from e
    p = run.plan
    name = run.args.e2e_model or p.e2e_model
    ref_model = build_llama(run, name, max(2048, p.e2e_seq + p.e2e_new_tokens))
    model = copy.deepcopy(ref_model).to(DTYPE)
    n_params = sum(t.numel() for t in model.parameters())
    entry.update(model=name, config=E2E_MODELS[name], params=n_params, dtype="bfloat16",
                 attn_implementation=getattr(model.config, "_attn_implementation", None))
    run.log(f"   {name}: {n_params / 1e6:.3g}M parameters")
    e2e_prefill(run, model, ref_model, entry)
    del ref_model
    if run.gpu:
        torch.cuda.empty_cache()
    run.save()
    e2e_decode(run, model, entry)


# -- targets --------------------------------------------------------------------------------


def _target(rule: str, threshold: float, figures: dict[str, float | None],
            missing_reason: str) -> dict:
    known = {k: v for k, v in figures.items() if v is not None}
    t: dict[str, Any] = {"rule": rule, "threshold": threshold, "figures": figures}
    if not figures or len(known) < len(figures):
        gaps = sorted(k for k, v in figures.items() if v is None)
        t.update({"pass": None, "reason": missing_reason + (f" (no figure for {gaps})"
                                                            if gaps else "")})
        return t
    t["min"] = min(known.values())
    t["pass"] = t["min"] >= threshold
    return t


def evaluate_targets(sections: dict, gpu: bool) -> dict:
    """The issue's targets from the measured figures: pass true/false, or null with the reason
    (no GPU, a section or contestant that did not measure)."""
    if not gpu:
        reason = ("not a GPU run: the Triton interpreter's timings say nothing about GPU speed; "
                  "no target is evaluated")
        return {name: {"pass": None, "reason": reason} for name in
                ("attention_hd128_vs_sdpa_flash", "window_vs_dense_mask_sdpa",
                 "prefill_vs_torch_compile", "decode_attention_hbm_fraction")}
    out: dict[str, Any] = {}
    rows = sections.get("attention", {}).get("rows", [])
    figs = {f"seq{r['seq']}-{'causal' if r['causal'] else 'full'}": r.get("ratio_vs_sdpa_flash")
            for r in rows if r.get("head_dim") == 128}
    out["attention_hd128_vs_sdpa_flash"] = _target(
        "transfuse TFLOP/s / SDPA-flash TFLOP/s at every hd-128 shape (causal and not)", 0.9,
        figs, "attention section incomplete")
    win = sections.get("window", {})
    out["window_vs_dense_mask_sdpa"] = _target(
        "dense-mask SDPA ms / transfuse ms, causal window 4096 at seq 16k", 5.0,
        {"speedup": win.get("speedup_vs_dense_mask")} if win else {},
        "window section incomplete")
    pre = sections.get("e2e", {}).get("prefill", {})
    out["prefill_vs_torch_compile"] = _target(
        "transfuse tokens/s / torch.compile tokens/s, prefill bf16 batch 8 seq 512", 1.0,
        {"ratio": pre.get("ratio_vs_torch_compile")} if pre else {},
        "e2e prefill incomplete")
    drows = sections.get("decode", {}).get("rows", [])
    dfigs = {f"{r['layout']}-{r['cache_len']}":
             r.get("contestants", {}).get("transfuse", {}).get("hbm_fraction") for r in drows}
    out["decode_attention_hbm_fraction"] = _target(
        "transfuse decode-attention GB/s / measured HBM copy GB/s at every cache length and "
        "layout", 0.7, dfigs, "decode section incomplete")
    return out


# -- main -----------------------------------------------------------------------------------


def summary(run: Run) -> None:
    print("\nsummary" + ("" if run.gpu else " (interpreter: no GPU figures)"))
    for name, sec in run.results["sections"].items():
        print(f"  {name:10s} {sec.get('status')} ({sec.get('wall_s', 0):.0f} s)"
              + (f": {sec['error']}" if sec.get("error") else ""))
    for name, t in run.results["targets"].items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t.get("pass")]
        fig = f"min {t['min']:.3g}" if "min" in t else t.get("reason", "")
        print(f"  target {name}: {verdict} ({fig})")
    print(f"wrote {run.path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes (the CPU test; a smoke run)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--budget-s", type=float, default=None,
                   help="record cases that would start after this many seconds as skipped")
    p.add_argument("--rounds", type=int, default=3, help="decode rounds after the warm-up")
    p.add_argument("--e2e-target", default="triton", help="transfuse target of the e2e section")
    p.add_argument("--e2e-model", choices=sorted(E2E_MODELS), default=None,
                   help="llama config of the e2e section (default: llama-670m, --quick: tiny)")
    p.add_argument("--hbm-mb", type=int, default=None, help="bytes copied for the HBM figure")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; known: {','.join(SECTIONS)}")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = env.triton_unavailable()
    if reason:
        print(f"triton unavailable: {reason}", file=sys.stderr)
        return 2
    gpu = torch.cuda.is_available() and not env.interpreting()
    plan = QUICK if args.quick or not gpu else FULL
    if args.hbm_mb:
        plan = dataclasses.replace(plan, hbm_mb=args.hbm_mb)
    if not gpu and not args.quick:
        print("no CUDA device: running the --quick shapes under the Triton interpreter")
        args.quick = True
    run = Run(args, plan, gpu)
    run.log(f"device {run.results['device'].get('name')}; torch {torch.__version__}, triton "
            f"{triton.__version__}; sections {','.join(args.sections)}; writing {run.path}")
    run.save()
    fns = {"bandwidth": bandwidth_section, "attention": attention_section,
           "window": window_section, "decode": decode_section, "e2e": e2e_section}
    for name in SECTIONS:
        if name in args.sections:
            run.section(name, fns[name])
    run.results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    run.save()
    summary(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
