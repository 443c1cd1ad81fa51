"""``Engine``: continuous batching of many generation requests over one compiled step.

    engine = transfuse.Engine(gen, max_batch=16, max_tokens_per_step=512)
    h = engine.submit(prompt_ids, max_new_tokens=128, temperature=0.0, stop=[[13, 13]])
    for tok in h.stream(): ...            # or h.result(); h.cancel()
    engine.shutdown()                     # or `with Engine(gen) as engine:`

Glossary: B requests in a step, N tokens of a step, R rows whose logits are computed, V vocab.

One engine thread runs the loop; ``submit`` and ``cancel`` may be called from any thread (they
only touch an inbox under a lock). Each iteration:

1. take new requests and cancellations from the inbox (a cancelled request is finished at
   once and its blocks go back to the pool);
2. :class:`~transfuse.serving.scheduler.Scheduler` picks the step's items: every running decode
   its next token, prompt chunks within ``max_tokens_per_step``, admissions, preemptions;
3. one forward of the compiled step (``gen.program``) over all items' tokens flattened into
   one axis, with logits only at the rows that sample (a decode; a prompt's last token);
   ``KVCache.prepare_step`` / ``commit_step`` around it (``abort_step`` if it fails: the
   step's requests end with ``finish_reason="error"``, the engine goes on);
4. per sampling row, the next token: the plain greedy rows in one ``max`` over their logits,
   the others with their own :class:`SamplingParams` and seeded generator
   (:func:`~transfuse.runtime.sampling.sample_next`, the same code as ``gen.generate``, so a
   request's tokens do not depend on what else runs); then the stop rules (EOS ids, stop
   token sequences, stop strings through :class:`~transfuse.serving.text.TextStream`,
   ``max_new_tokens``); a finished request frees its blocks at once.

The engine owns its own :class:`KVCache` made from the gen's cache spec (``num_blocks`` may
shrink a paged pool; ``gen.generate`` keeps using ``gen.cache``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

import torch

from transfuse.errors import EngineClosedError, ExecutionError, InputError, QueueFullError
from transfuse.runtime.generation_model import make_cache
from transfuse.serving.choose import (
    append_tokens,
    choose_tokens,
    score_prompts,
    token_logprobs,
)
from transfuse.serving.options import (
    Limits,
    check_engine_options,
    check_options,
    request_generator,
)
from transfuse.serving.request import Output, Request, RequestHandle
from transfuse.serving.scheduler import Scheduled, Scheduler
from transfuse.serving.spec_step import SpecDecoding

logger = logging.getLogger(__name__)

_DEFAULT = object()  # eos_token_id not given: the model's generation config decides


class Engine:
    """Continuous batching over a compiled generation model (module docstring).

    ``gen``: a :class:`~transfuse.runtime.generation_model.GenerationModel`. ``max_batch``:
    running requests at most (None: the gen's compiled ``max_batch``; a contiguous cache has no
    more slots). ``max_tokens_per_step``: tokens per forward (>= max_batch; at most the
    gen's ``max_step_tokens``, to which a larger value is lowered). ``max_queue``:
    waiting requests before ``submit`` raises :class:`QueueFullError`. ``prefix_caching``:
    share cached prompt blocks (None: on for a paged cache). ``num_blocks``: a smaller paged
    pool than the spec's. ``tokenizer``: for text outputs and stop strings.
    """

    def __init__(self, gen: Any, max_batch: int | None = None, max_tokens_per_step: int = 512,
                 max_queue: int = 256, prefix_caching: bool | None = None,
                 speculative: Any = None, spec_tokens: int = 4, tokenizer: Any = None, *,
                 num_blocks: int | None = None):
        spec = gen.cache_spec
        paged = spec["layout"] == "paged"
        max_batch, prefix_caching = check_engine_options(
            spec, max_batch=max_batch, max_tokens_per_step=max_tokens_per_step,
            max_queue=max_queue, spec_tokens=spec_tokens, prefix_caching=prefix_caching,
            num_blocks=num_blocks)
        max_tokens_per_step = min(max_tokens_per_step, spec["max_step_tokens"])
        self._spec = SpecDecoding(speculative, spec_tokens) if speculative is not None else None
        self.gen = gen
        self.max_batch = max_batch
        self.max_tokens_per_step = max_tokens_per_step
        self.max_queue = max_queue
        self.tokenizer = tokenizer
        self.prefix_caching = prefix_caching
        self.cache = make_cache(spec, gen.device, num_blocks=num_blocks,
                                prefix_caching=prefix_caching)
        self.device = gen.device
        self._program = gen.program
        self._cache_tensors = list(self.cache.cache_inputs().values())
        self._vocab = gen.vocab_size
        self._limits = Limits(self._vocab, self.cache.max_seq_len,
                              self.cache.block_size if paged else None,
                              self.cache.num_blocks if paged else None)
        self._default_eos = gen.generation_config.get("eos_token_id")
        self._scheduler = Scheduler(self.cache, max_batch=max_batch,
                                    max_tokens_per_step=max_tokens_per_step,
                                    prefix_tokens=self.prefix_caching)
        self._ids = itertools.count()
        # two locks, never one inside the other from a caller: `_wake` guards the inbox, the
        # cancellations and the flags (submit/cancel/shutdown take only it, so a callback that
        # cancels while a handle's lock is held cannot deadlock with the engine thread);
        # `_state` guards the scheduler, the cache and the counters (the engine thread holds
        # it except during the forward and the proposer's drafting)
        self._wake = threading.Condition()
        self._state = threading.RLock()
        self._submitted = 0
        self._finished_at_submit = 0  # max_new_tokens=0: finished without the engine thread
        self._inbox: list[Request] = []  # submitted, not yet seen by the engine thread
        self._cancels: set[int] = set()
        self._live: dict[int, Request] = {}  # engine thread only: queued or running
        self._closed = False
        self._cancel_all = False
        self._failure: BaseException | None = None
        self._counts = dict.fromkeys(("finished", "cancelled", "errors", "steps",
                                      "tokens_generated", "tokens_computed"), 0)
        self._times = dict.fromkeys(("schedule_s", "propose_s", "forward_s", "sample_s"), 0.0)
        self._thread = threading.Thread(target=self._loop, name="transfuse-engine", daemon=True)
        self._thread.start()

    # -- the caller's side ------------------------------------------------------------------

    def submit(self, prompt_ids: Any, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
               seed: int | None = None, stop: Any = None, eos_token_id: Any = _DEFAULT,
               min_new_tokens: int = 0, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0, logit_bias: Any = None,
               logprobs: int | None = None, prompt_logprobs: int | None = None) -> RequestHandle:
        """Queue a request; returns its :class:`RequestHandle` at once. ``temperature`` 0 is
        greedy; ``seed`` makes sampling reproducible whatever else runs; ``stop``: token-id
        sequences (a list of ints or a list of lists) or, with a tokenizer, strings;
        ``eos_token_id`` (default: the model's; None: never stop at EOS); OpenAI's
        ``presence_penalty`` / ``frequency_penalty`` (in [-2, 2], over the generated tokens) and
        ``logit_bias`` ({token id: value in [-100, 100]}); ``logprobs``: n >= 0 puts each
        token's log-probability and the n most likely ids' (at most 20) in the outputs;
        ``prompt_logprobs``: the same for every prompt token after the first, in the first
        output (such a request computes its whole prompt: no prefix-cache hit; with
        ``max_new_tokens=0`` it only scores the prompt). Raises
        :class:`InputError` for a bad argument, :class:`QueueFullError` when ``max_queue``
        requests wait, :class:`EngineClosedError` after shutdown."""
        opts = check_options(
            prompt_ids, limits=self._limits, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop,
            eos_token_id=self._default_eos if eos_token_id is _DEFAULT else eos_token_id,
            min_new_tokens=min_new_tokens, has_tokenizer=self.tokenizer is not None,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            logit_bias=logit_bias, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        text = None
        if self.tokenizer is not None:
            from transfuse.serving.text import TextStream

            text = TextStream(self.tokenizer, opts.stop_strings)
        generator = request_generator(opts.seed, self.device)
        with self._wake:
            if self._closed or self._failure is not None:
                raise EngineClosedError("the engine is shut down and takes no new requests"
                                        if self._failure is None else
                                        f"the engine stopped after an internal error: "
                                        f"{self._failure!r}")
            queued = len(self._inbox) + len(self._scheduler.waiting)
            if queued >= self.max_queue:
                raise QueueFullError(f"the engine's queue is full: {queued} requests wait "
                                     f"(max_queue {self.max_queue}); retry later")
            rid = next(self._ids)
            handle = RequestHandle(rid, len(opts.prompt), self.cancel)
            req = Request(rid, handle, opts.prompt, max_new_tokens=opts.max_new_tokens,
                          params=opts.params, generator=generator, stop_ids=opts.stop_ids,
                          text_stream=text, logprobs=opts.logprobs,
                          prompt_logprobs=opts.prompt_logprobs)
            self._submitted += 1
            # nothing to generate: done now (unless the prompt is to be scored)
            done_now = opts.max_new_tokens == 0 and opts.prompt_logprobs is None
            if done_now:
                self._finished_at_submit += 1
            else:
                self._inbox.append(req)
                self._wake.notify()
        if done_now:
            handle.deliver(Output(rid, [], "", True, "length"), req.metrics())
        return handle

    def cancel(self, request_id: int) -> None:
        """Stop a request (any thread); its blocks go back to the pool at the next iteration
        and its handle gets a final output with ``finish_reason="cancelled"``."""
        with self._wake:
            self._cancels.add(request_id)
            self._wake.notify()

    def shutdown(self, cancel: bool = True, timeout: float = 30.0) -> None:
        """Stop taking requests; cancel the in-flight ones (``cancel=False``: let them finish,
        cancelling what is left after ``timeout`` s); join the engine thread. Afterwards every
        request has its final output and every cache block is back in the pool."""
        with self._wake:
            self._closed = True
            self._cancel_all = self._cancel_all or cancel
            self._wake.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._wake:
                self._cancel_all = True
                self._wake.notify()
            self._thread.join(timeout)
        if self._thread.is_alive():
            raise ExecutionError(f"the engine thread did not stop within {2 * timeout} s "
                                 "(a step is stuck in the model)")

    @property
    def alive(self) -> bool:
        """True while the engine thread runs (False after shutdown or a fatal error)."""
        return self._thread.is_alive()

    @property
    def closed(self) -> bool:
        """True once shutdown began (or the engine thread died): submit refuses."""
        return self._closed or self._failure is not None

    def stats(self) -> dict[str, Any]:
        """Counters and timings: requests (submitted, finished, cancelled, errors, waiting,
        running), steps, tokens generated / computed, preemptions, the pool's blocks, mean
        per-step seconds (schedule + metadata, proposing, forward, sampling + stop rules) and,
        with prefix caching, the cache's prefix statistics; with speculation, its counters."""
        with self._wake:
            submitted, early, inbox = self._submitted, self._finished_at_submit, len(self._inbox)
        with self._state:  # the engine thread changes the scheduler and cache under it
            out: dict[str, Any] = {"submitted": submitted, **self._counts}
            out["finished"] += early
            steps = max(out["steps"], 1)
            out.update({k.replace("_s", "_s_per_step"): v / steps for k, v in self._times.items()})
            out["waiting"] = len(self._scheduler.waiting) + inbox
            out["running"] = len(self._scheduler.running)
            out["preemptions"] = self._scheduler.num_preemptions
            if self.cache.paged:
                out["blocks_total"] = self.cache.num_blocks
                out["blocks_free"] = self.cache.pool.num_free
            if self.prefix_caching:
                out["prefix"] = self.cache.prefix_stats()
            if self._spec is not None:
                out["spec"] = self._spec.stats()
        return out

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(cancel=True)

    def __repr__(self) -> str:
        return (f"Engine(max_batch={self.max_batch}, max_tokens_per_step="
                f"{self.max_tokens_per_step}, {self._scheduler}, {self.cache!r})")

    # -- the engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._inbox or self._cancels or self._cancel_all
                               or self._scheduler.has_work() or self._closed):
                        self._wake.wait()
                    inbox, self._inbox = self._inbox, []
                    cancels, self._cancels = self._cancels, set()
                    cancel_all, closed = self._cancel_all, self._closed
                with self._state:
                    for req in inbox:
                        self._live[req.id] = req
                        self._scheduler.add(req)
                    for rid in (list(self._live) if cancel_all else cancels):
                        if rid in self._live:
                            self._finish(self._live[rid], "cancelled")
                    if not self._scheduler.has_work():
                        if closed:
                            return
                        continue
                self._step()
        except BaseException as exc:  # a bug: fail everything rather than hang the callers
            logger.exception("transfuse engine thread failed")
            with self._wake:
                self._failure = exc
                inbox, self._inbox = self._inbox, []
            with self._state:
                try:
                    self.cache.abort_step()  # a step left in flight holds its blocks
                except InputError:
                    pass  # none was
                for req in inbox:
                    self._live[req.id] = req
                for req in list(self._live.values()):
                    try:
                        self._finish(req, "error", f"engine failure: {exc!r}")
                    except BaseException:
                        req.handle.deliver(Output(req.id, [], "", True, "error", repr(exc)))

    def _step(self) -> None:
        """One iteration: schedule, propose, one forward, sample. The engine lock is held
        while the scheduler and the cache change (so stats() reads them whole), not during
        the forward or the proposer's drafting."""
        t0 = time.perf_counter()
        spec = self._spec
        with self._state:
            items = self._scheduler.schedule(spec.reserve if spec is not None else None)
            if not items:
                self._unschedulable()
                return
        propose_s = spec.propose(items) if spec is not None else 0.0
        ids: list[int] = []
        rows: list[int] = []
        first_row: list[int] = []  # per sampling item: its first row in the logits
        cache_items = []
        new_tokens = []
        prompt_rows = []  # (request, positions q whose logits score prompt token q + 1)
        for it in items:
            req = it.req
            start = req.num_computed
            toks = req.tokens[start:start + it.num_tokens - len(it.draft)] + it.draft
            qs = req.prompt_positions(start, len(toks))
            if qs:
                prompt_rows.append((req, qs, [len(ids) + q - start for q in qs]))
            ids.extend(toks)
            new_tokens.append(toks)
            cache_items.append((req.seq_id, len(toks)))
            if it.samples:
                first_row.append(len(rows))
                rows.extend(range(len(ids) - 1 - len(it.draft), len(ids)))
        scored = len(rows)  # the prompt rows follow the sampling rows
        for _, _, at in prompt_rows:
            rows.extend(at)
        with self._state:
            if self.prefix_caching:
                meta = self.cache.prepare_step(cache_items, tokens=new_tokens)
            else:
                meta = self.cache.prepare_step(cache_items)
        feeds = [torch.tensor([ids], dtype=torch.int64, device=self.device), meta.position_ids,
                 meta.seq_of_token, meta.seq_lens, meta.cache_table,
                 torch.tensor(rows, dtype=torch.int64, device=self.device)]
        t1 = time.perf_counter()
        try:
            logits = self._program(feeds + self._cache_tensors)[0]
            if logits.shape[0] != len(rows):
                raise ExecutionError(f"the step returned logits {list(logits.shape)}, expected "
                                     f"[{len(rows)}, vocab]")
        except Exception as exc:
            with self._state:
                self.cache.abort_step()
                logger.exception("engine step of %d requests failed", len(items))
                for it in items:
                    self._finish(it.req, "error", f"the model step failed: {exc!r}")
            return
        t2 = time.perf_counter()
        with self._state:
            self.cache.commit_step()
            for it, toks in zip(items, new_tokens):
                it.req.num_computed += len(toks)
            if prompt_rows:
                score_prompts(prompt_rows, logits[scored:])
                logits = logits[:scored]
            sampling = [it for it in items if it.samples]
            try:
                if spec is not None:
                    drafts = sum(len(it.draft) for it in sampling)
                    spec.times.add(len(ids), t2 - t1)
                    plain_s = spec.times.predict(len(ids) - drafts) if drafts else None
                    self._sample(sampling, first_row, logits, t2,
                                 step_s=propose_s + (t2 - t1), plain_s=plain_s)
                else:
                    self._sample(sampling, first_row, logits, t2)
            except Exception as exc:  # e.g. NaN logits under sampling, a tokenizer that raises
                logger.exception("choosing the next tokens of %d requests failed", len(sampling))
                for it in sampling:
                    if it.req.id in self._live:
                        self._finish(it.req, "error", f"choosing its next token failed: {exc!r}")
            t3 = time.perf_counter()
            self._counts["steps"] += 1
            self._counts["tokens_computed"] += len(ids)
            self._times["schedule_s"] += t1 - t0 - propose_s
            self._times["propose_s"] += propose_s
            self._times["forward_s"] += t2 - t1
            self._times["sample_s"] += t3 - t2

    def _sample(self, items: list[Scheduled], first_row: list[int], logits: torch.Tensor,
                now: float, step_s: float = 0.0, plain_s: float | None = None) -> None:
        """Choose, append and emit each sampling item's next token(s) (choose.py)."""
        verify = None
        if self._spec is not None:
            def verify(it: Scheduled, rows: torch.Tensor) -> list[int]:
                new = self._spec.verify(it, rows)
                self._spec.settle(it, new, self.cache, step_s + time.perf_counter() - now,
                                  plain_s)
                return new

        if any(it.req.max_new_tokens == 0 for it in items):
            for it in items:  # prompt scoring only: its prompt is done, nothing to sample
                if it.req.max_new_tokens == 0:
                    self._finish(it.req, "length", prompt_logprobs=it.req.take_prompt_logprobs())
            keep = [i for i, it in enumerate(items) if it.req.max_new_tokens]
            items, first_row = [items[i] for i in keep], [first_row[i] for i in keep]
        chosen = choose_tokens(items, first_row, logits, self._vocab, verify)
        logprobs = token_logprobs(items, first_row, logits, chosen)
        generated = 0
        for it, new, lps in zip(items, chosen, logprobs):
            req = it.req
            kept, text, reason = append_tokens(req, new)
            lps = None if lps is None else lps[:len(kept)]
            generated += len(kept)
            req.mark_output(now)
            prompt_lps = req.take_prompt_logprobs()
            if reason is None:
                req.handle.deliver(Output(req.id, kept, text, logprobs=lps,
                                          prompt_logprobs=prompt_lps))
            else:
                self._finish(req, reason, tokens=kept, text=text, logprobs=lps,
                             prompt_logprobs=prompt_lps)
        self._counts["tokens_generated"] += generated

    def _finish(self, req: Request, reason: str, error: str | None = None, *,
                tokens: list[int] | None = None, text: str = "",
                logprobs: list | None = None, prompt_logprobs: list | None = None) -> None:
        """End ``req`` (engine thread, under ``_state``): free its blocks, flush its text,
        deliver the final output."""
        self._live.pop(req.id, None)
        self._scheduler.finish(req)
        if self._spec is not None:
            self._spec.release(req)
        if req.text_stream is not None and reason in ("stop", "length"):
            text += req.text_stream.flush()
        key = {"cancelled": "cancelled", "error": "errors"}.get(reason, "finished")
        self._counts[key] += 1
        if logprobs is None and req.logprobs is not None:
            logprobs = []
        req.handle.deliver(Output(req.id, tokens or [], text, True, reason, error, logprobs,
                                  prompt_logprobs), req.metrics())

    def _unschedulable(self) -> None:
        """Work exists but no item fits: preempt the newest running request to free blocks;
        with nothing running the head of the queue can never be admitted: fail it, never spin."""
        sched = self._scheduler
        if sched.preempted_last_step:
            return  # it made room: the next step admits again
        if sched.unstick() is None and sched.waiting:
            req = sched.waiting[0]
            self._finish(req, "error", f"request {req.id} ({len(req.tokens)} tokens) cannot be "
                         f"admitted into the KV cache ({self.cache!r})")


__all__ = ["Engine"]
