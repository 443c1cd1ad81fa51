"""The HTTP app in this process (httpx's ASGI transport) over a real Engine: back-pressure (429),
shutting down (503) and a failing model step (500), each as an OpenAI error body."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from transfuse.serving import Engine
from transfuse.serving.loading import load_served
from transfuse.serving.server import create_app

pytestmark = pytest.mark.slow  # compiles a tiny model (~3 s)

MODEL = "gpt2-tiny"


@pytest.fixture(scope="module")
def served():
    return load_served(MODEL, max_seq_len=128, max_batch=2)


def _app(served, engine):
    return create_app(engine, served.tokenizer, served.name, max_seq_len=served.max_seq_len)


async def _post_many(app, bodies: list[dict], path="/v1/completions") -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await asyncio.gather(*(c.post(path, json=b, timeout=60) for b in bodies))


def _error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_full_queue_answers_429_and_the_others_complete(served):
    with Engine(served.gen, max_batch=1, max_queue=1, tokenizer=served.tokenizer) as engine:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 64, "temperature": 0}
        rs = asyncio.run(_post_many(_app(served, engine), [body] * 4))
        codes = sorted(r.status_code for r in rs)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        for r in rs:
            if r.status_code == 429:
                err = _error(r)
                assert (err["type"], err["code"]) == ("rate_limit_error", "queue_full")
                assert "queue is full" in err["message"]
            else:
                assert len(r.json()["choices"][0]["text"]) > 0
        stats = engine.stats()
        assert stats["blocks_free"] == stats["blocks_total"]


def test_after_shutdown_every_request_gets_503(served):
    engine = Engine(served.gen, tokenizer=served.tokenizer)
    app = _app(served, engine)
    engine.shutdown()

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return (await c.get("/health"),
                    await c.post("/v1/completions", json={"model": MODEL, "prompt": "x"}),
                    await c.get("/v1/models"))

    health, completion, models = asyncio.run(go())
    assert health.status_code == 503 and completion.status_code == 503
    assert _error(completion)["code"] == "shutting_down"
    assert models.status_code == 200  # what the server is stays readable


class BrokenStep:
    """A generation model whose compiled step raises (a backend failure mid-serving)."""

    def __init__(self, gen):
        self._gen = gen

    def __getattr__(self, name):
        return getattr(self._gen, name)

    @property
    def program(self):
        def fail(feeds):
            raise RuntimeError("kernel exploded")
        return fail


def test_failing_model_step_is_a_500_and_an_error_event_in_a_stream(served):
    with Engine(BrokenStep(served.gen), tokenizer=served.tokenizer) as engine:
        app = _app(served, engine)
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
        plain, stream = asyncio.run(_post_many(app, [body, {**body, "stream": True}]))
        assert plain.status_code == 500
        err = _error(plain)
        assert err["type"] == "server_error" and "kernel exploded" in err["message"]
        assert stream.status_code == 200  # the stream had started: the error is an event
        events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "kernel exploded" in json.loads(events[-2])["error"]["message"]
        assert engine.stats()["errors"] == 2


def test_stream_is_cancelled_on_disconnect_even_where_starlette_does_not_watch(served):
    """ASGI spec 2.4 servers: Starlette no longer listens for the disconnect of a stream; the
    app's own watcher must cancel the request (raw ASGI calls, the client leaves after the
    first event)."""
    body = json.dumps({"model": MODEL, "prompt": "go", "max_tokens": 100, "temperature": 0,
                       "stream": True}).encode()

    async def go(app):
        first_event = asyncio.Event()
        sent: list[dict] = []
        calls = 0

        async def receive():
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": body, "more_body": False}
            await first_event.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                first_event.set()

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
                 "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await asyncio.wait_for(app(scope, receive, send), 60)
        return sent

    with Engine(served.gen, tokenizer=served.tokenizer) as engine:
        sent = asyncio.run(go(_app(served, engine)))
        assert sent[0]["status"] == 200
        deadline = time.monotonic() + 30
        while engine.stats()["cancelled"] < 1:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.05)
        stats = engine.stats()
        assert stats["finished"] == 0 and stats["tokens_generated"] < 100
