"""transfuse.bench.bandwidth: the measured streaming bandwidth behind the decode floor."""

from __future__ import annotations

import math

import pytest
import torch

from transfuse.bench import bandwidth as bw

SMALL = 8 * 2**20  # fits in cache: fast, checks the bookkeeping, not the figure


def test_every_method_reports_a_positive_rate_and_threads_are_restored():
    before = torch.get_num_threads()
    result = bw.measure_bandwidth(SMALL, repeats=2, threads=1)
    assert torch.get_num_threads() == before
    assert [m.method for m in result.methods] == list(bw.METHODS)
    for m in result.methods:
        assert len(m.seconds) == 2 and all(s > 0 for s in m.seconds)
        assert m.bytes_per_pass <= SMALL and math.isfinite(m.best_gbps) and m.best_gbps > 0
    assert result.gbps == max(m.best_gbps for m in result.methods)
    record = result.as_dict()
    assert record["best_method"] == result.best.method and record["threads"] == 1
    assert set(record["methods"]) == set(bw.METHODS)


def test_counted_bytes_follow_each_method():
    result = bw.measure_bandwidth(SMALL, repeats=1, methods=("torch-sum", "torch-copy"))
    by_name = {m.method: m for m in result.methods}
    assert by_name["torch-sum"].bytes_per_pass == SMALL  # one read of the buffer
    assert by_name["torch-copy"].bytes_per_pass == SMALL  # read half + write half
    assert by_name["torch-copy"].best_gbps == pytest.approx(
        SMALL / min(by_name["torch-copy"].seconds) / 1e9)


@pytest.mark.parametrize("kwargs, match", [
    ({"methods": ("torch-sum", "memcpy")}, "memcpy"),
    ({"methods": ()}, "unknown bandwidth methods"),
    ({"repeats": 0}, "repeats"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bw.measure_bandwidth(SMALL, **kwargs)


def test_too_small_buffer_is_refused():
    with pytest.raises(ValueError, match="too small"):
        bw.measure_bandwidth(1024)


def _cache(dir_, name, level, kind, size):
    index = dir_ / name
    index.mkdir()
    (index / "level").write_text(f"{level}\n")
    (index / "type").write_text(f"{kind}\n")
    (index / "size").write_text(f"{size}\n")


def test_llc_is_the_highest_level_data_cache(tmp_path):
    _cache(tmp_path, "index0", 1, "Data", "48K")
    _cache(tmp_path, "index1", 1, "Instruction", "64K")
    _cache(tmp_path, "index2", 2, "Unified", "2048K")
    _cache(tmp_path, "index3", 3, "Unified", "32M")
    assert bw.llc_bytes(tmp_path) == 32 * 2**20


def test_llc_unknown_without_sysfs(tmp_path):
    assert bw.llc_bytes(tmp_path / "missing") is None


def test_default_buffer_is_several_llcs_within_free_memory(monkeypatch):
    monkeypatch.setattr(bw, "llc_bytes", lambda: 100 * 2**20)
    monkeypatch.setattr(bw, "_available_bytes", lambda: 64 * 2**30)
    assert bw.default_buffer_bytes() == bw.LLC_MULTIPLE * 100 * 2**20
    monkeypatch.setattr(bw, "_available_bytes", lambda: 2**30)
    assert bw.default_buffer_bytes() == int(2**30 * bw.MAX_AVAILABLE_FRACTION)
    monkeypatch.setattr(bw, "llc_bytes", lambda: None)
    monkeypatch.setattr(bw, "_available_bytes", lambda: None)
    assert bw.default_buffer_bytes() == bw.MIN_BYTES
