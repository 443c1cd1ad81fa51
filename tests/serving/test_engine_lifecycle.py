"""serving/engine.py: cancellation, back-pressure, shutdown, failures, bad arguments, caches.

Every test ends with the engine's cache empty (every block back in the pool) and no engine
thread left running.
"""

from __future__ import annotations

import threading
import time

import pytest
from engine_models import VOCAB, alone, compiled, random_prompts

from transfuse.errors import EngineClosedError, ExecutionError, InputError, QueueFullError
from transfuse.serving import Engine


@pytest.fixture(scope="module")
def gen():
    return compiled("paged")


def _engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "transfuse-engine" and t.is_alive()]


def _assert_clean(engine: Engine) -> None:
    assert not engine.alive
    assert len(engine.cache) == 0
    if engine.cache.paged:
        assert engine.cache.pool.num_free == engine.cache.num_blocks


def test_cancel_running_and_waiting_frees_blocks(gen):
    prompt = random_prompts([20], seed=1)[0]
    engine = Engine(gen, max_batch=1)
    running = engine.submit(prompt, max_new_tokens=200, eos_token_id=None)
    queued = engine.submit(prompt, max_new_tokens=5)
    first = next(running.stream(timeout=30))  # it runs
    running.cancel()
    engine.cancel(queued.id)
    r = running.result(timeout=30)
    assert r.finish_reason == "cancelled" and r.token_ids[0] == first
    assert len(r.token_ids) < 200
    assert queued.result(timeout=30).finish_reason == "cancelled"
    list(running.stream())  # a cancelled stream just ends
    running.cancel()  # no-op once finished
    engine.shutdown()
    _assert_clean(engine)
    assert engine.stats()["cancelled"] == 2


def test_a_finished_request_frees_its_blocks_at_once(gen):
    long, short = random_prompts([10, 40], seed=9)
    with Engine(gen, max_batch=2, prefix_caching=False) as engine:
        h_long = engine.submit(long, max_new_tokens=200, eos_token_id=None)
        next(h_long.stream(timeout=30))
        r = engine.submit(short, max_new_tokens=3, eos_token_id=None).result(timeout=30)
        # its final output is delivered after its blocks went back: only the long one holds any
        held = engine.cache.num_blocks - engine.cache.pool.num_free
        assert not h_long.finished and len(engine.cache) == 1
        assert held <= -(-(10 + 200) // 16)
        assert r.finish_reason == "length" and engine.stats()["running"] == 1
        h_long.cancel()
    _assert_clean(engine)


def test_callbacks_may_cancel_and_stats_is_safe_while_running(gen):
    engine = Engine(gen, max_batch=4, prefix_caching=True)
    stop, errors = threading.Event(), []

    def hammer():  # stats() from another thread while the engine changes the cache
        while not stop.is_set():
            try:
                engine.stats()
            except Exception as exc:  # noqa: BLE001 - any failure fails the test
                errors.append(exc)

    poller = threading.Thread(target=hammer)
    poller.start()
    handles = [engine.submit(p, max_new_tokens=150, eos_token_id=None)
               for p in random_prompts([20, 5, 40, 9], seed=7)]
    for h in handles:
        next(h.stream(timeout=30))
        # replayed under the handle's lock while the engine thread delivers: cancel from there
        h.on_output(lambda out, h=h: h.cancel())
    results = [h.result(timeout=30) for h in handles]
    stop.set()
    poller.join()
    engine.shutdown()
    assert not errors
    assert all(r.finish_reason == "cancelled" and len(r.token_ids) < 150 for r in results)
    _assert_clean(engine)


def test_full_queue_raises_queue_full_and_engine_keeps_serving(gen):
    prompt = random_prompts([4], seed=2)[0]
    with Engine(gen, max_batch=1, max_queue=2) as engine:
        handles = [engine.submit(prompt, max_new_tokens=150, eos_token_id=None)]
        next(handles[0].stream(timeout=30))  # it runs: the batch of 1 is full
        with pytest.raises(QueueFullError, match=r"queue is full: 2 requests wait \(max_queue 2"):
            for _ in range(5):  # one runs, two wait, then the queue is full
                handles.append(engine.submit(prompt, max_new_tokens=150, eos_token_id=None))
        assert len(handles) == 3
        for h in handles:
            h.cancel()
        for h in handles:
            assert h.result(timeout=30).finish_reason in ("cancelled", "length")
        r = engine.submit(prompt, max_new_tokens=5, eos_token_id=None).result(timeout=30)
        assert r.token_ids == alone(gen, prompt, 5, eos_token_id=None)
    _assert_clean(engine)


def test_shutdown_cancels_in_flight_requests_and_leaks_nothing(gen):
    before = len(_engine_threads())
    engine = Engine(gen, max_batch=2, max_tokens_per_step=16)
    handles = [engine.submit(p, max_new_tokens=100, eos_token_id=None)
               for p in random_prompts([30, 5, 50, 8, 3], seed=3)]
    next(handles[0].stream(timeout=30))
    engine.shutdown(cancel=True, timeout=30)
    assert all(h.finished for h in handles)
    assert {h.finish_reason for h in handles} <= {"cancelled", "length"}
    assert "cancelled" in {h.finish_reason for h in handles}
    _assert_clean(engine)
    assert len(_engine_threads()) == before
    with pytest.raises(EngineClosedError, match="shut down"):
        engine.submit([1, 2, 3])
    engine.shutdown()  # twice is fine


def test_shutdown_without_cancel_finishes_every_request(gen):
    prompts = random_prompts([12, 40, 3], seed=4)
    want = [alone(gen, p, 20, eos_token_id=None) for p in prompts]
    engine = Engine(gen, max_batch=2, max_tokens_per_step=16)
    handles = [engine.submit(p, max_new_tokens=20, eos_token_id=None) for p in prompts]
    engine.shutdown(cancel=False, timeout=60)
    assert [h.result(timeout=0).token_ids for h in handles] == want
    _assert_clean(engine)


class FailingGen:
    """The tiny gen whose program raises while ``fail`` is set (a backend failure) and returns
    NaN logits while ``nan`` is set."""

    def __init__(self, gen):
        self._gen = gen
        self.fail, self.nan = threading.Event(), threading.Event()
        self.cache_spec, self.device = gen.cache_spec, gen.device
        self.vocab_size, self.generation_config = gen.vocab_size, gen.generation_config

    def program(self, inputs):
        if self.fail.is_set():
            raise RuntimeError("injected backend failure")
        out = self._gen.program(inputs)
        return [out[0] * float("nan")] if self.nan.is_set() else out


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(gen):
    bad = FailingGen(gen)
    prompt = random_prompts([6], seed=5)[0]
    with Engine(bad, max_batch=4) as engine:
        bad.fail.set()
        h = engine.submit(prompt, max_new_tokens=10)
        with pytest.raises(ExecutionError, match="injected backend failure"):
            h.result(timeout=30)
        with pytest.raises(ExecutionError, match="injected backend failure"):
            list(h.stream())
        assert h.finish_reason == "error"
        bad.fail.clear()
        r = engine.submit(prompt, max_new_tokens=10).result(timeout=30)
        assert r.token_ids == alone(gen, prompt, 10)
        assert engine.stats()["errors"] == 1
    _assert_clean(engine)


def test_a_failing_sample_fails_its_requests_and_the_engine_goes_on(gen):
    bad = FailingGen(gen)
    prompt = random_prompts([6], seed=8)[0]
    with Engine(bad, max_batch=4) as engine:
        bad.nan.set()  # multinomial refuses NaN probabilities
        h = engine.submit(prompt, max_new_tokens=10, temperature=1.0, seed=0)
        with pytest.raises(ExecutionError, match="choosing its next token failed"):
            h.result(timeout=30)
        bad.nan.clear()
        r = engine.submit(prompt, max_new_tokens=10).result(timeout=30)
        assert r.token_ids == alone(gen, prompt, 10)
    _assert_clean(engine)


def test_an_engine_bug_fails_every_request_and_closes_the_engine(gen, monkeypatch):
    from transfuse.serving.scheduler import Scheduler

    def broken(self, spec_k=None):
        raise RuntimeError("scheduler bug")

    engine = Engine(gen, max_batch=2)
    monkeypatch.setattr(Scheduler, "schedule", broken)
    h = engine.submit([1, 2, 3], max_new_tokens=5)
    with pytest.raises(ExecutionError, match="engine failure: RuntimeError\\('scheduler bug'"):
        h.result(timeout=30)
    engine.shutdown()
    assert engine.closed and not engine.alive
    with pytest.raises(EngineClosedError, match="stopped after an internal error"):
        engine.submit([1, 2, 3])
    assert len(engine.cache) == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt_ids": []}, "prompt_ids is empty"),
    ({"prompt_ids": [1, VOCAB]}, rf"prompt_ids\[1\] = {VOCAB} is outside the vocabulary"),
    ({"prompt_ids": "hello"}, "prompt_ids must be a list of token ids"),
    ({"prompt_ids": [1.5]}, r"prompt_ids\[0\] must be an int"),
    ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
    ({"prompt_ids": [1] * 200, "max_new_tokens": 57}, "257 exceeds the engine's max_seq_len 256"),
    ({"temperature": -0.5}, "temperature must be a number >= 0"),
    ({"top_p": 1.5}, "top_p must be a number in"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"stop": ["\n"]}, "stop strings need an engine with a tokenizer"),
    ({"stop": [[]]}, r"stop\[0\] must be a non-empty"),
    ({"eos_token_id": VOCAB + 3}, "eos_token_id must be token ids"),
])
def test_bad_arguments_are_input_errors(gen, kwargs, match):
    with Engine(gen) as engine:
        args = {"prompt_ids": [1, 2, 3], **kwargs}
        with pytest.raises(InputError, match=match):
            engine.submit(**args)
        assert engine.stats()["submitted"] == 0


def test_requests_larger_than_the_pool_are_refused(gen):
    with Engine(gen, num_blocks=4) as engine:  # 64 tokens of cache
        with pytest.raises(InputError, match="needs 5 cache blocks of 16 tokens; the engine's "
                                             "pool has 4 in all"):
            engine.submit([1] * 60, max_new_tokens=10)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_batch": 0}, "max_batch must be a positive int"),
    ({"max_batch": 8, "max_tokens_per_step": 4}, "max_tokens_per_step 4 must be >= max_batch 8"),
    ({"speculative": "ngram"}, "speculative='ngram'"),
    ({"speculative": object()}, "a proposer with propose_batch"),
])
def test_bad_engine_options(gen, kwargs, match):
    before = len(_engine_threads())
    with pytest.raises(InputError, match=match):
        Engine(gen, **kwargs)
    assert len(_engine_threads()) == before  # refused before the thread started


def test_contiguous_cache_engine():
    gen = compiled("contiguous", max_batch=4)
    prompts = random_prompts([5, 30, 12, 2, 44, 9], seed=6)
    want = [alone(gen, p, 12) for p in prompts]
    with pytest.raises(InputError, match="exceeds the contiguous cache's 4 slots"):
        Engine(gen, max_batch=8)
    with pytest.raises(InputError, match="prefix_caching needs a paged KV cache"):
        Engine(gen, prefix_caching=True)
    with Engine(gen, max_tokens_per_step=16) as engine:
        assert engine.max_batch == 4 and not engine.prefix_caching
        got = [h.result(timeout=60).token_ids
               for h in [engine.submit(p, max_new_tokens=12) for p in prompts]]
    assert got == want
    _assert_clean(engine)


def test_result_timeout():
    gen = compiled("paged")
    with Engine(gen, max_batch=1) as engine:
        h = engine.submit([5, 6, 7], max_new_tokens=200, eos_token_id=None)
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError, match=f"request {h.id} did not finish within"):
            h.result(timeout=0.001)
        assert time.perf_counter() - t0 < 5
