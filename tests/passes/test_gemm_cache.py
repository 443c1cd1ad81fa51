"""passes/memory/gemm_cache.py: select-gemm timings kept on disk, per machine fingerprint;
a bad file is never an error."""

from __future__ import annotations

import json

import pytest
import torch
from pass_helpers import apply

from transfuse.codegen.python.blas import blas_unavailable
from transfuse.passes.memory import gemm_cache, select_gemm


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFUSE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_round_trip_and_fingerprint_separation(cache_dir, monkeypatch):
    assert gemm_cache.load("64x8x8|bias=0|kmajor=1") is None
    assert gemm_cache.store("64x8x8|bias=0|kmajor=1", 1e-3, 5e-4)
    assert gemm_cache.load("64x8x8|bias=0|kmajor=1") == (1e-3, 5e-4)
    data = json.loads((cache_dir / gemm_cache.FILENAME).read_text())
    assert list(data) == [gemm_cache.fingerprint()]
    monkeypatch.setattr(gemm_cache, "fingerprint", lambda: "another machine")
    assert gemm_cache.load("64x8x8|bias=0|kmajor=1") is None  # never another machine's


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"%s": {"k": [-1, 2]}}',
                                     '{"%s": {"k": ["a", 2]}}', '{"%s": {"k": [true, 2]}}',
                                     '{"%s": {"k": [1e999, 2]}}', '{"%s": 3}'])
def test_bad_files_and_entries_are_ignored(cache_dir, content):
    path = cache_dir / gemm_cache.FILENAME
    text = content % gemm_cache.fingerprint() if "%s" in content else content
    path.write_text(text)
    assert gemm_cache.load("k") is None
    assert gemm_cache.store("k", 2e-3, 1e-3)  # rewritten, readable again
    assert gemm_cache.load("k") == (2e-3, 1e-3)


def test_disabled_and_unwritable(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFUSE_CACHE_DIR", "")
    assert gemm_cache.cache_path() is None
    assert not gemm_cache.store("k", 1.0, 1.0) and gemm_cache.load("k") is None
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("TRANSFUSE_CACHE_DIR", str(blocker / "sub"))  # a file where a dir goes
    assert not gemm_cache.store("k", 1.0, 1.0)


@pytest.mark.skipif(blas_unavailable() is not None, reason="numpy's OpenBLAS is unavailable")
def test_select_gemm_reads_what_an_earlier_process_timed(cache_dir, monkeypatch):
    graph_text = """
graph main(%x: f32[batch, seq, 64]) {
  const %w: f32[192, 64]
  %0: f32[batch, seq, 192] = linear(%x, %w, _)
  return %0
}"""
    opts = {"sample_inputs": [torch.randn(2, 64, 64)]}
    monkeypatch.setattr(select_gemm, "_TIMINGS", {})
    _, rec = apply(graph_text, "layout.select-gemm", options=opts)
    assert (cache_dir / gemm_cache.FILENAME).exists()
    assert not any("cache" in n for n in rec.notes if "GFLOP/s" in n)
    monkeypatch.setattr(select_gemm, "_TIMINGS", {})  # a new process
    _, rec = apply(graph_text, "layout.select-gemm", options=opts)
    assert any("from the timing cache" in n for n in rec.notes), rec.notes
    monkeypatch.setattr(select_gemm, "_TIMINGS", {})
    (cache_dir / gemm_cache.FILENAME).unlink()
    _, rec = apply(graph_text, "layout.select-gemm", options={**opts,
                                                              "select_gemm_cache": False})
    assert not (cache_dir / gemm_cache.FILENAME).exists()
