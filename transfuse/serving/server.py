"""The OpenAI-compatible HTTP server of ``transfuse serve``: FastAPI over an :class:`Engine`.

    app = create_app(engine, tokenizer, "my-model", max_seq_len=2048)
    run_server(app, engine, port=8000)        # serving/launch.py: until SIGTERM/SIGINT

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events
with ``"stream": true``), ``POST /v1/embeddings`` (when the engine is an
:class:`~transfuse.serving.embeddings.EmbeddingEngine`; a generation engine answers it with a
400 naming the task, and an embedding engine the two others), ``GET /v1/models``,
``GET /health`` (503 while shutting down) and ``GET /stats`` (the engine's counters). Requests are parsed and checked here
(serving/protocol.py) before anything is submitted; the engine only sees valid work.

Errors are OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
request (malformed JSON, a body that is not UTF-8, a bad or unsupported field, a prompt over
the context length: code ``context_length_exceeded``), 404 for an unknown model or route,
429 when the engine's queue is full (:class:`QueueFullError`), 503 while shutting down
(:class:`EngineClosedError`), 500 when the model step failed.

The engine runs in its own thread; a request's outputs reach the event loop through
``handle.on_output`` + ``loop.call_soon_threadsafe`` into an ``asyncio.Queue``
(:class:`OutputQueue`). A client that disconnects cancels its requests (``handle.cancel()``):
a streaming response is cancelled by Starlette when the client goes, a plain one watches for
the disconnect while it waits.

Shutdown is serving/launch.py's (``run_server``): ``ServerState.closing`` makes new requests
503 while the engine cancels what is in flight.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from transfuse.errors import EngineClosedError, InputError, QueueFullError
from transfuse.serving.protocol import (
    DEFAULT_COMPLETION_TOKENS,
    ApiError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_prompt,
    parse_request,
)

logger = logging.getLogger(__name__)

#: request bodies above this are refused (413)
MAX_BODY_BYTES = 16 * 2**20


class ServerState:
    """What the routes share: the engine, the tokenizer, the served name and limits."""

    def __init__(self, engine: Any, tokenizer: Any, model_name: str, max_seq_len: int):
        self.engine, self.tokenizer = engine, tokenizer
        self.vocab_size = len(tokenizer) if tokenizer is not None and hasattr(
            tokenizer, "__len__") else getattr(tokenizer, "vocab_size", 2**62)
        self.model_name, self.max_seq_len = model_name, max_seq_len
        self.created = int(time.time())
        self.closing = False  # set at the shutdown signal: new requests get 503

    def check_open(self) -> None:
        if self.closing or getattr(self.engine, "closed", False):
            raise ApiError(503, "the server is shutting down and takes no new requests",
                           type="service_unavailable", code="shutting_down")


def create_app(engine: Any, tokenizer: Any, model_name: str, *, max_seq_len: int) -> FastAPI:
    """The FastAPI app serving ``engine`` (module docstring) as the model ``model_name``."""
    app = FastAPI(title="transfuse serve", docs_url=None, redoc_url=None)
    state = ServerState(engine, tokenizer, model_name, max_seq_len)
    app.state.serving = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = ApiError(exc.status_code, str(exc.detail), code=None)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: the client left (nginx's code)

    @app.get("/health")
    async def health() -> dict[str, str]:
        state.check_open()
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return state.engine.stats()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": state.created,
             "owned_by": "transfuse", "max_model_len": state.max_seq_len}]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        req = parse_request(EmbeddingRequest, await json_body(request))
        _check_model(state, req.model)
        _check_task(state, "embed", "/v1/embeddings")
        state.check_open()
        return await _embed(state, req)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        req = parse_request(CompletionRequest, await json_body(request))
        _check_model(state, req.model)
        _check_task(state, "generate", "/v1/completions")
        state.check_open()
        prompts = [p if isinstance(p, list) else await asyncio.to_thread(_encode, tokenizer, p)
                   for p in req.prompts()]
        max_tokens = DEFAULT_COMPLETION_TOKENS if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not (req.echo and req.logprobs is not None):
            raise ApiError(400, "max_tokens 0 only scores the prompt: it needs echo and logprobs",
                           param="max_tokens")
        for p in prompts:
            _check_context(state, len(p), max(max_tokens, 1), "prompt")
        handles = _submit(state, prompts, req, max_tokens)
        call = Call("cmpl", "text_completion", state.model_name, handles, req, tokenizer)
        if req.echo:
            texts = [p if isinstance(p, str) else tokenizer.decode(ids)
                     for p, ids in zip(req.prompts(), prompts)]
            call.echo = [t for t in texts for _ in range(req.n or 1)]
        if req.stream:
            return _sse(call.stream_completion(request))
        return JSONResponse(await call.complete(request, chat=False))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        req = parse_request(ChatRequest, await json_body(request))
        req.check_supported()
        _check_model(state, req.model)
        _check_task(state, "generate", "/v1/chat/completions")
        state.check_open()
        text, templated = chat_prompt(tokenizer, req.messages)
        ids = await asyncio.to_thread(_encode, tokenizer, text, not templated)
        limit = req.token_limit()
        max_tokens = limit if limit is not None else max(state.max_seq_len - len(ids), 0)
        _check_context(state, len(ids), max_tokens, "messages")
        handles = _submit(state, [ids], req, max_tokens)
        call = Call("chatcmpl", "chat.completion", state.model_name, handles, req, tokenizer)
        if req.stream:
            return _sse(call.stream_chat(request))
        return JSONResponse(await call.complete(request, chat=True))

    return app


# -- request checks ------------------------------------------------------------------------------


async def json_body(request: Request) -> Any:
    """The request body as JSON: 413 if too large, 400 if not UTF-8 or not JSON."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body has {len(raw)} bytes; the limit is "
                       f"{MAX_BODY_BYTES}")
    if not raw:
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}: "
                       f"{e.reason}); send JSON encoded as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} "
                       f"column {e.colno}") from None


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves "
                       f"'{state.model_name}'", param="model", code="model_not_found")


def _check_task(state: ServerState, task: str, route: str) -> None:
    served = getattr(state.engine, "task", "generate")
    if served != task:
        what = {"generate": "generates text (/v1/completions, /v1/chat/completions)",
                "embed": "makes embeddings (/v1/embeddings)"}[served]
        raise ApiError(400, f"The model '{state.model_name}' {what}; it does not serve "
                       f"{route}", param="model", code="unsupported_task")


async def _embed(state: ServerState, req: Any) -> dict[str, Any]:
    """The ``/v1/embeddings`` response body for a checked request."""
    engine = state.engine
    if req.dimensions is not None and req.dimensions != engine.hidden_size:
        raise ApiError(400, f"dimensions {req.dimensions}: this model's embeddings have "
                       f"{engine.hidden_size} (no truncation)", param="dimensions")
    ids = [x if isinstance(x, list) else await asyncio.to_thread(_encode, state.tokenizer, x)
           for x in req.inputs()]
    for i, x in enumerate(ids):
        if len(x) > state.max_seq_len:
            raise ApiError(400, f"This model's maximum context length is {state.max_seq_len} "
                           f"tokens; input {i} has {len(x)}. Please shorten it.",
                           param="input", code="context_length_exceeded")
        if any(t >= state.vocab_size for t in x):
            raise ApiError(400, f"input {i} holds a token id outside the vocabulary "
                           f"[0, {state.vocab_size})", param="input")
    try:
        vectors = await asyncio.to_thread(engine.embed, ids)
    except EngineClosedError as e:
        raise ApiError(503, str(e), type="service_unavailable", code="shutting_down") from None
    except InputError as e:
        raise ApiError(400, str(e), param="input") from None
    data = []
    for i, v in enumerate(vectors):
        value: Any = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") \
            if req.encoding_format == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(len(x) for x in ids)
    return {"object": "list", "data": data, "model": state.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _check_context(state: ServerState, prompt_len: int, max_tokens: int, param: str) -> None:
    if prompt_len + max_tokens > state.max_seq_len or max_tokens < 1:
        raise ApiError(400, f"This model's maximum context length is {state.max_seq_len} "
                       f"tokens. However, you requested {prompt_len + max_tokens} tokens "
                       f"({prompt_len} in the prompt, {max_tokens} for the completion). "
                       "Please reduce the prompt or the completion length.",
                       param=param, code="context_length_exceeded")


def _encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _submit(state: ServerState, prompts: list[list[int]], req: Any, max_tokens: int) -> list:
    """Submit ``n`` engine requests per prompt (choice ``i * n + j``; with a seed, choice j
    samples with ``seed + j``); all or none (the others are cancelled)."""
    temperature = 1.0 if req.temperature is None else req.temperature
    handles = []
    n = req.n or 1
    try:
        for ids, j in ((ids, j) for ids in prompts for j in range(n)):
            handles.append(state.engine.submit(
                ids, max_new_tokens=max_tokens, temperature=temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                repetition_penalty=req.repetition_penalty or 1.0,
                seed=None if req.seed is None else (req.seed + j) % 2**63,
                stop=req.stop_strings() or None, min_new_tokens=req.min_tokens,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0, logit_bias=req.logit_bias,
                logprobs=req.top_logprobs_wanted(),
                prompt_logprobs=req.logprobs if getattr(req, "echo", None) else None))
    except BaseException as e:
        for h in handles:
            h.cancel()
        if isinstance(e, EngineClosedError):
            raise ApiError(503, str(e), type="service_unavailable", code="shutting_down") \
                from None
        if isinstance(e, QueueFullError):
            raise ApiError(429, str(e), type="rate_limit_error", code="queue_full") from None
        if isinstance(e, InputError):
            raise ApiError(400, str(e)) from None
        raise
    return handles


# -- outputs into the event loop -----------------------------------------------------------------


class ClientGone(Exception):
    """The client disconnected while its requests ran."""


class OutputQueue:
    """The outputs of some request handles, moved from the engine thread into this event loop:
    ``await next()`` gives ``(choice index, Output)`` in order per handle."""

    def __init__(self, handles: list[Any]):
        self.handles = handles
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.open = len(handles)  # handles not finished yet
        for i, h in enumerate(handles):
            h.on_output(functools.partial(self._push, i))

    def _push(self, index: int, out: Any) -> None:  # engine thread (or replay in this one)
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, out))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def next(self, watch: asyncio.Future | None = None) -> tuple[int, Any]:
        """The next output; with ``watch`` (a disconnect watcher), ClientGone if it fires
        first."""
        if watch is None:
            index, out = await self._queue.get()
        else:
            get = asyncio.ensure_future(self._queue.get())
            done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                raise ClientGone()
            index, out = get.result()
        if out.finished:
            self.open -= 1
        return index, out

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Call:
    """One API call's requests and the OpenAI responses made from their outputs."""

    def __init__(self, prefix: str, kind: str, model: str, handles: list[Any], req: Any,
                 tokenizer: Any = None):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.kind, self.model, self.created = kind, model, int(time.time())
        self.handles, self.req = handles, req
        self.outputs = OutputQueue(handles)
        self.usage_wanted = bool(req.stream_options and req.stream_options.include_usage)
        self.logprobs = Logprobs(tokenizer, chat=kind == "chat.completion", n=len(handles)) \
            if req.top_logprobs_wanted() is not None else None
        # completions with echo: each choice's prompt text, put before its first text
        self.echo: list[str] | None = None
        self._echoed = [False] * len(handles)

    def _logprobs(self, i: int, out: Any) -> dict[str, Any] | None:
        """The ``logprobs`` field for choice ``i``'s tokens of ``out`` (None: not asked), the
        prompt's first when echoed."""
        if self.logprobs is None:
            return None
        return self.logprobs.format(i, (out.prompt_logprobs or []) + (out.logprobs or []))

    def _echo(self, i: int) -> str:
        """Choice ``i``'s prompt text the first time it is asked for with echo, else ''."""
        if self.echo is None or self._echoed[i]:
            return ""
        self._echoed[i] = True
        return self.echo[i]

    def usage(self, completion_tokens: int) -> dict[str, int]:
        # a prompt counts once, however many choices (n) it has
        prompt = sum(h.prompt_len for h in self.handles[::self.req.n or 1])
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}

    async def complete(self, request: Request, *, chat: bool) -> dict[str, Any]:
        """Wait for every output (cancelling on disconnect); the whole response body."""
        texts = [[] for _ in self.handles]
        lps: list[list] = [[] for _ in self.handles]
        reasons: list[str | None] = [None] * len(self.handles)
        tokens = 0
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            while self.outputs.open:
                i, out = await self.outputs.next(watch)
                texts[i].append(self._echo(i) + out.text)
                lps[i].extend((out.prompt_logprobs or []) + (out.logprobs or []))
                tokens += len(out.token_ids)
                if out.finished:
                    reasons[i] = out.finish_reason
                    _raise_for(out)
        except ClientGone:
            logger.info("%s: client disconnected, cancelling", self.id)
            raise
        finally:
            watch.cancel()
            self.outputs.cancel()  # no-op for finished handles
        choices = []
        for i, (parts, reason) in enumerate(zip(texts, reasons)):
            text = "".join(parts)
            logprobs = None if self.logprobs is None else self.logprobs.format(i, lps[i])
            choice: dict[str, Any] = {"index": i, "logprobs": logprobs, "finish_reason": reason}
            choice.update({"message": {"role": "assistant", "content": text}} if chat
                          else {"text": text})
            choices.append(choice)
        return {"id": self.id, "object": self.kind, "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage(tokens)}

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> str:
        body = {"id": self.id, "object": self.kind + ("" if self.kind == "text_completion"
                                                      else ".chunk"),
                "created": self.created, "model": self.model, "choices": choices}
        if self.usage_wanted:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def _events(self, request: Request, first: Any, piece: Any) -> AsyncIterator[str]:
        """SSE events: ``first(i)`` per choice, ``piece(i, output)`` per output. Ends
        (cancelling) when the client leaves: Starlette cancels a stream then (ASGI spec < 2.4)
        and the watcher here covers servers that do not."""
        tokens = 0
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            for i in range(len(self.handles)):
                if first is not None:
                    yield self._chunk([first(i)])
            while self.outputs.open:
                try:
                    i, out = await self.outputs.next(watch)
                except ClientGone:
                    logger.info("%s: client disconnected, cancelling", self.id)
                    return
                tokens += len(out.token_ids)
                if out.finish_reason == "error":
                    yield f"data: {json.dumps(_server_error(out).body())}\n\n"
                    continue
                if out.text or out.finished or out.logprobs or out.prompt_logprobs or (
                        self.echo is not None and not self._echoed[i]):
                    yield self._chunk([piece(i, out)])
            if self.usage_wanted:
                yield self._chunk([], self.usage(tokens))
            yield "data: [DONE]\n\n"
        finally:  # also when Starlette cancels the stream because the client left
            watch.cancel()
            self.outputs.cancel()

    def stream_completion(self, request: Request) -> AsyncIterator[str]:
        return self._events(request, None, lambda i, out: {
            "index": i, "text": self._echo(i) + out.text, "logprobs": self._logprobs(i, out),
            "finish_reason": out.finish_reason})

    def stream_chat(self, request: Request) -> AsyncIterator[str]:
        def piece(i: int, out: Any) -> dict[str, Any]:
            delta = {"content": out.text} if out.text else {}
            return {"index": i, "delta": delta, "logprobs": self._logprobs(i, out),
                    "finish_reason": out.finish_reason}

        def first(i: int) -> dict[str, Any]:
            return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}

        return self._events(request, first, piece)


class Logprobs:
    """OpenAI's ``logprobs`` field from a choice's :class:`TokenLogprob` list: the legacy
    completions form (``tokens``, ``token_logprobs``, ``top_logprobs`` as {token: logprob},
    ``text_offset`` from the start of the completion, continued across stream chunks) or the
    chat form (``content``: token, logprob, UTF-8 ``bytes``, ``top_logprobs``). A token's text
    is the tokenizer's decoding of that one id (a piece of a multi-byte character decodes to
    U+FFFD, as in vLLM); without a tokenizer it is ``"token_id:<id>"``."""

    def __init__(self, tokenizer: Any, *, chat: bool, n: int):
        self.tokenizer, self.chat = tokenizer, chat
        self.offsets = [0] * n  # completions: text_offset of the next token per choice

    def text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def format(self, i: int, lps: list) -> dict[str, Any]:
        if self.chat:
            return {"content": [self._chat_entry(lp.token_id, lp.logprob, lp.top)
                                for lp in lps]}
        tokens, offsets = [], []
        for lp in lps:
            tok = self.text(lp.token_id)
            tokens.append(tok)
            offsets.append(self.offsets[i])
            self.offsets[i] += len(tok)
        tops = []
        for lp in lps:
            top: dict[str, float] = {}
            for tid, v in lp.top:
                top.setdefault(self.text(tid), v)  # most likely first: keep the first
            tops.append(top)
        tops = [None if lp.logprob is None else top for lp, top in zip(lps, tops)]
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": tops, "text_offset": offsets}

    def _chat_entry(self, token_id: int, logprob: float, top: Any) -> dict[str, Any]:
        tok = self.text(token_id)
        entry: dict[str, Any] = {"token": tok, "logprob": logprob,
                                 "bytes": list(tok.encode("utf-8"))}
        if top is not None:
            entry["top_logprobs"] = [self._chat_entry(t, v, None) for t, v in top]
        return entry


def _server_error(out: Any) -> ApiError:
    return ApiError(500, f"generation failed: {out.error}", type="server_error",
                    code="generation_failed")


def _raise_for(out: Any) -> None:
    if out.finish_reason == "error":
        raise _server_error(out)
    if out.finish_reason == "cancelled":
        raise ApiError(503, "the request was cancelled: the server is shutting down",
                       type="service_unavailable", code="shutting_down")


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["Call", "Logprobs", "OutputQueue", "ServerState", "create_app", "json_body"]
