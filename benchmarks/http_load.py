"""A bounded load test of ``transfuse serve`` over HTTP (used by benchmarks/serving.py).

Starts ``python -m transfuse serve MODEL`` on a free port of 127.0.0.1 (one thread), waits for
``/health``, then sends ``requests`` OpenAI completions, ``concurrency`` at a time, with
httpx's async client; half of them streamed (server-sent events). Counts HTTP errors, requests
that never completed ("lost") and responses with the wrong token count, and reports latency
percentiles (whole request; time to first streamed chunk). Stops the server with SIGTERM and
records how it exited.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "transfuse", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--threads", "1", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 300) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout} s")


async def _one(client, url: str, model: str, i: int, rng: random.Random, stream: bool) -> dict:
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"])
                     for _ in range(rng.randint(4, 24)))
    body = {"model": model, "prompt": words, "max_tokens": rng.randint(4, 24),
            "temperature": 0.0, "stream": stream}
    t0 = time.perf_counter()
    first = None
    try:
        if stream:
            text, finished = "", False
            async with client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    return {"i": i, "error": f"HTTP {r.status_code}: {await r.aread()}"}
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if first is None:
                        first = time.perf_counter() - t0
                    if line == "data: [DONE]":
                        finished = True
                        break
                    chunk = json.loads(line[6:])
                    text += chunk["choices"][0].get("text", "")
            if not finished:
                return {"i": i, "lost": True}
        else:
            r = await client.post(url, json=body)
            if r.status_code != 200:
                return {"i": i, "error": f"HTTP {r.status_code}: {r.text[:200]}"}
            out = r.json()
            if out["usage"]["completion_tokens"] > body["max_tokens"]:
                return {"i": i, "error": "more tokens than max_tokens"}
    except Exception as exc:  # a transport error is an error of the run, counted
        return {"i": i, "error": f"{type(exc).__name__}: {exc}"}
    return {"i": i, "latency": time.perf_counter() - t0, "first": first}


async def _drive(port: int, model: str, n: int, concurrency: int, seed: int) -> list[dict]:
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def task(i: int):
            async with sem:
                return await _one(client, url, model, i, random.Random(rng.random()), i % 2 == 0)
        return await asyncio.gather(*(task(i) for i in range(n)))


def http_load(args, console, gguf: Path | None) -> dict:
    """The load test of the module docstring; ``gguf`` the model file (None: a preset)."""
    from serving import percentile

    model = str(gguf) if gguf is not None else "gpt2-tiny"
    port = free_port()
    proc = start_server(model, port, ["--max-batch", str(args.http_concurrency)])
    try:
        wait_healthy(proc, port)
        import httpx

        served = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
        t0 = time.perf_counter()
        results = asyncio.run(_drive(port, served, args.http_requests, args.http_concurrency,
                                     args.seed))
        wall = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed after 120 s"
    errors = [r for r in results if "error" in r]
    lost = [r for r in results if r.get("lost")]
    lat = [r["latency"] for r in results if "latency" in r]
    first = [r["first"] for r in results if r.get("first") is not None]
    out = {"model": model, "requests": args.http_requests, "concurrency": args.http_concurrency,
           "wall_s": wall, "errors": len(errors), "error_samples": [e["error"] for e in errors[:5]],
           "lost": len(lost), "completed": len(lat),
           "latency_ms": {q: percentile(lat, q) * 1e3 for q in (50, 90, 99)} if lat else None,
           "first_chunk_ms": {q: percentile(first, q) * 1e3 for q in (50, 99)} if first else None,
           "server_exit": code}
    console.print(f"http: {out['completed']}/{out['requests']} completed, {out['errors']} errors, "
                  f"{out['lost']} lost, p50 {out['latency_ms'] and out['latency_ms'][50]:.0f} ms,"
                  f" p99 {out['latency_ms'] and out['latency_ms'][99]:.0f} ms, exit {code}")
    return out
