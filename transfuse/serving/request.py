"""A request's two faces: :class:`RequestHandle` (the caller's) and :class:`Request` (the engine's).

Glossary: P prompt tokens, G tokens generated so far, V vocabulary size.

The caller holds a :class:`RequestHandle`: it receives every :class:`Output` the engine thread
makes for the request (new token ids and text of one step, then one with ``finished=True``)
and offers them as a blocking token iterator (``stream()``), a final :class:`Result`
(``result()``), or callbacks (``on_output(fn)``, past outputs replayed first: the server's
bridge to its event loop). The handle is thread-safe; the engine thread is the only writer.

The engine holds a :class:`Request`: the scheduling state (the context = prompt + generated
tokens, how many of them are in the KV cache), the sampling state (params, seeded generator,
the seen-token mask for the repetition penalty), the stop rules and the timing metrics. Only
the engine thread touches it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from transfuse.errors import ExecutionError
from transfuse.runtime.sampling import SamplingParams

logger = logging.getLogger(__name__)

#: Output.finish_reason values
FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (the log-softmax of its logits,
    before temperature, filters and penalties: what OpenAI and vLLM report) and the ``top``
    most likely ids with theirs, most likely first."""

    token_id: int
    logprob: float | None  # None: a prompt's first token (nothing before it predicts it)
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Output:
    """What one step produced for one request: the new token ids (several with speculation,
    none in a final output of a cancelled/failed request) and their new text ('' without a
    tokenizer); the last output of a request has ``finished=True`` and a ``finish_reason``.
    ``logprobs``: one :class:`TokenLogprob` per token id when the request asked for them;
    ``prompt_logprobs``: one per prompt token (the first's logprob None), in the request's
    first output, when it asked for them."""

    request_id: int
    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # None | "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Result:
    """A finished request: every generated token id (an EOS or stop-sequence token that ended it
    included, as Hugging Face's generate() includes EOS), the text (stop strings excluded),
    why it ended, and ``metrics``: ``ttft_s``, ``itl_s`` (gaps between outputs), ``prompt_tokens``,
    ``cached_tokens`` (prefix-cache hit at first admission), ``preemptions``,
    ``spec_proposed``, ``spec_accepted``."""

    token_ids: list[int]
    text: str
    finish_reason: str
    metrics: dict[str, Any] = field(default_factory=dict)
    request_id: int = -1
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


class RequestHandle:
    """The caller's view of a submitted request (module docstring)."""

    def __init__(self, request_id: int, prompt_len: int, cancel: Callable[[int], None]):
        self.id = request_id
        self.prompt_len = prompt_len
        self._cancel = cancel
        self._cond = threading.Condition(threading.RLock())
        self._outputs: list[Output] = []
        self._callbacks: list[Callable[[Output], None]] = []
        self._metrics: dict[str, Any] = {}
        self._final: Output | None = None
        self._stream_waiters = 0  # threads waiting in outputs(): woken by every output

    # -- the caller's side --------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._final is not None

    @property
    def finish_reason(self) -> str | None:
        final = self._final
        return None if final is None else final.finish_reason

    def outputs(self, timeout: float | None = None) -> Iterator[Output]:
        """Every :class:`Output` of the request in order, blocking for the next one until the
        final one; ``timeout`` (seconds) bounds each wait (TimeoutError)."""
        i = 0
        while True:
            with self._cond:
                self._stream_waiters += 1
                try:
                    ok = self._cond.wait_for(lambda i=i: len(self._outputs) > i, timeout)
                finally:
                    self._stream_waiters -= 1
                if not ok:
                    raise TimeoutError(f"request {self.id}: no output within {timeout} s")
                out = self._outputs[i]
            i += 1
            yield out
            if out.finished:
                return

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """The generated token ids as they come. Ends when the request finishes; a cancelled
        request just ends; a failed one raises :class:`ExecutionError` after its tokens."""
        for out in self.outputs(timeout):
            yield from out.token_ids
            if out.finish_reason == "error":
                raise ExecutionError(f"request {self.id} failed: {out.error}")

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the end (TimeoutError after ``timeout`` s) and return the :class:`Result`;
        a failed request raises :class:`ExecutionError` naming the cause."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._final is not None, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            outputs, final, metrics = list(self._outputs), self._final, dict(self._metrics)
        if final.finish_reason == "error":
            raise ExecutionError(f"request {self.id} failed: {final.error}")
        logprobs = None if outputs[0].logprobs is None else \
            [lp for o in outputs for lp in (o.logprobs or ())]
        prompt = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None),
                      None)
        return Result([t for o in outputs for t in o.token_ids], "".join(o.text for o in outputs),
                      final.finish_reason, metrics, self.id, final.error, logprobs, prompt)

    def cancel(self) -> None:
        """Ask the engine to stop this request and free its cache blocks (no-op once finished)."""
        if self._final is None:
            self._cancel(self.id)

    def on_output(self, fn: Callable[[Output], None]) -> None:
        """Call ``fn(output)`` for every output, past ones first, in order; later ones from the
        engine thread (keep ``fn`` quick: it holds up the engine)."""
        with self._cond:
            for out in self._outputs:
                fn(out)
            self._callbacks.append(fn)

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics once finished (see :class:`Result`), else {}."""
        with self._cond:
            return dict(self._metrics)

    # -- the engine's side --------------------------------------------------------------

    def deliver(self, out: Output, metrics: dict[str, Any] | None = None) -> None:
        """Called by the engine thread only: record ``out`` (and, with the final output, the
        metrics), wake waiters, run the callbacks. A callback that raises is logged and does
        not stop the others or the engine."""
        with self._cond:
            if self._final is not None:
                return  # finished already: nothing more is delivered
            self._outputs.append(out)
            if out.finished:
                self._final = out
                self._metrics = dict(metrics or {})
            if out.finished or self._stream_waiters:  # result() waits for the final one only
                self._cond.notify_all()
            for fn in self._callbacks:
                try:
                    fn(out)
                except Exception:  # a broken callback must not break the engine
                    logger.exception("request %s: output callback %r failed", self.id, fn)

    def __repr__(self) -> str:
        state = self.finish_reason or "running"
        return f"RequestHandle(id={self.id}, prompt_len={self.prompt_len}, {state})"


class Request:
    """The engine's state of one request (module docstring). ``tokens`` is the context: the
    prompt, then each generated token; ``num_computed`` of them have K/V in the cache."""

    __slots__ = ("id", "handle", "tokens", "prompt_len", "max_new_tokens", "params",
                 "generator", "logprobs", "prompt_logprobs", "prompt_lps", "eos", "stop_ids",
                 "text_stream", "seen", "counts",
                 "seq_id",
                 "num_computed", "cached_tokens", "preemptions", "spec_proposed",
                 "spec_accepted", "submitted_s", "last_output_s", "ttft_s", "itl_s",
                 "admissions")

    def __init__(self, request_id: int, handle: RequestHandle, prompt: list[int], *,
                 max_new_tokens: int, params: SamplingParams, generator: torch.Generator,
                 stop_ids: tuple[tuple[int, ...], ...], text_stream: Any = None,
                 logprobs: int | None = None, prompt_logprobs: int | None = None):
        self.id = request_id
        self.handle = handle
        self.tokens = prompt  # P + G ids
        self.prompt_len = len(prompt)
        self.max_new_tokens = max_new_tokens
        self.params = params
        self.generator = generator
        self.logprobs = logprobs  # None: none wanted; n: the chosen token's and the top n
        self.prompt_logprobs = prompt_logprobs  # the same for the prompt's tokens
        # the prompt tokens' entries computed so far (token 0's first); None once delivered
        self.prompt_lps: list[TokenLogprob] | None = \
            None if prompt_logprobs is None else [TokenLogprob(prompt[0], None)]
        self.eos = frozenset(params.eos_token_id)
        self.stop_ids = stop_ids
        self.text_stream = text_stream
        self.seen: torch.Tensor | None = None  # bool [1, V], only with a repetition penalty
        # float [1, V] counts of the generated ids, only with a presence / frequency penalty
        self.counts: torch.Tensor | None = None
        self.seq_id: tuple[int, int] | None = None  # the KV cache sequence while admitted
        self.num_computed = 0
        self.cached_tokens = 0
        self.admissions = 0
        self.preemptions = 0
        self.spec_proposed = 0
        self.spec_accepted = 0
        self.submitted_s = time.perf_counter()
        self.last_output_s: float | None = None
        self.ttft_s: float | None = None
        self.itl_s: list[float] = []

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def owed(self) -> int:
        """Context tokens not yet in the cache (1 for a request in decode)."""
        return len(self.tokens) - self.num_computed

    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    def prompt_positions(self, start: int, count: int) -> list[int]:
        """Positions q among the ``count`` context tokens from ``start`` whose logits predict a
        prompt token whose log-probability is not known yet (q + 1 < prompt length)."""
        if self.prompt_lps is None:
            return []
        return list(range(max(start, len(self.prompt_lps) - 1),
                          min(start + count, self.prompt_len - 1)))

    def take_prompt_logprobs(self) -> list[TokenLogprob] | None:
        """The prompt's entries, once (None afterwards, or when not asked for)."""
        lps, self.prompt_lps = self.prompt_lps, None
        return lps

    def mark_output(self, now: float) -> None:
        """Record the time of an output with tokens (TTFT at the first, else an ITL gap)."""
        if self.ttft_s is None:
            self.ttft_s = now - self.submitted_s
        else:
            self.itl_s.append(now - self.last_output_s)
        self.last_output_s = now

    def metrics(self) -> dict[str, Any]:
        return {"ttft_s": self.ttft_s, "itl_s": list(self.itl_s), "prompt_tokens": self.prompt_len,
                "generated_tokens": self.num_generated, "cached_tokens": self.cached_tokens,
                "preemptions": self.preemptions, "spec_proposed": self.spec_proposed,
                "spec_accepted": self.spec_accepted}

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, prompt={self.prompt_len}, generated={self.num_generated}, "
                f"computed={self.num_computed})")


__all__ = ["Output", "Result", "RequestHandle", "Request", "TokenLogprob", "FINISH_REASONS"]
