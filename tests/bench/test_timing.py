"""Statistics on known samples and the interleaving order of the timer."""

from __future__ import annotations

import pytest

from transfuse.bench.timing import Timing, interleaved, quartiles


def test_quartiles_match_numpy_linear_percentiles():
    assert quartiles([1, 2, 3, 4, 5, 6, 7, 8, 9]) == (3.0, 5.0, 7.0)
    assert quartiles([4, 1, 3, 2]) == (1.75, 2.5, 3.25)  # unsorted input
    assert quartiles([7.0]) == (7.0, 7.0, 7.0)


def test_timing_median_and_iqr():
    t = Timing("x", [10.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 100.0])
    assert t.median_ms == 6.0  # the outlier 100 does not move it
    assert (t.q1_ms, t.q3_ms) == (3.5, 8.5)
    assert t.iqr_ms == 5.0
    assert Timing("y", [1.0, 2.0, 3.0]).iqr_ms == 0.0  # too few samples for quartiles


def test_interleaved_runs_rounds_in_order_after_warmup():
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "ABC"}
    rounds_seen: list[int] = []
    timings = interleaved(fns, rounds=3, warmup=2, on_round=rounds_seen.append)
    assert calls == list("AABBCC") + list("ABC") * 3
    assert rounds_seen == [0, 1, 2]
    assert {k: len(t.samples_ms) for k, t in timings.items()} == {"A": 3, "B": 3, "C": 3}


def test_interleaved_rejects_bad_counts():
    with pytest.raises(ValueError, match="rounds"):
        interleaved({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="warmup"):
        interleaved({"a": lambda: None}, warmup=-1)
