"""The RSS sampler sees a big allocation made and freed inside one call."""

from __future__ import annotations

import pytest
import torch

from transfuse.bench.memory import Footprint, RssSampler, peak_call_mb, rss_available, rss_bytes

pytestmark = pytest.mark.skipif(not rss_available(), reason="needs /proc/self/statm (Linux)")

MB = 1024 * 1024


def _burst(n_mb: int):
    def fn():
        x = torch.ones(n_mb * MB // 4)  # touched, so resident
        x += 1
        import time

        time.sleep(0.01)  # give the sampler a few ticks
        del x

    return fn


def test_sampler_sees_a_big_temporary_allocation():
    with RssSampler() as s:
        _burst(200)()
    assert s.samples >= 3
    assert s.peak_delta_bytes >= 150 * MB


def test_peak_call_mb_of_a_small_and_a_big_call():
    assert peak_call_mb(lambda: None) < 20
    assert peak_call_mb(_burst(200)) >= 150


def test_footprint_counts_what_a_build_keeps():
    kept = []
    with Footprint() as fp:
        kept.append(torch.ones(100 * MB // 4))
    assert fp.mb is not None and fp.mb >= 80
    assert rss_bytes() > 0
