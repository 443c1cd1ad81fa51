"""codegen/python/gemm_cache.py and gemm_timing.py: the python target's GEMM timings, kept
for the process and on disk per machine fingerprint; a bad file is never an error."""

from __future__ import annotations

import json

import pytest
import torch

from transfuse.codegen.python import gemm_cache, gemm_timing
from transfuse.codegen.python.blas import blas_unavailable
from transfuse.codegen.targets import get_target


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
def test_python_target_reads_what_an_earlier_process_timed(cache_dir):
    target = get_target("python")
    w = [torch.randn(192, 64)]
    gemm_timing.forget()
    first, source = target.time_gemm(64, w, None, relayout=True)
    assert source == "" and first.torch_s > 0 and first.blas_s > 0
    assert (cache_dir / gemm_cache.FILENAME).exists()
    again, source = target.time_gemm(64, w, None, relayout=True)
    assert source == " (timed earlier in this process)" and again == first
    gemm_timing.forget()  # a new process
    cached, source = target.time_gemm(64, w, None, relayout=True)
    assert source == f" (from the timing cache {cache_dir / gemm_cache.FILENAME})"
    assert (cached.torch_s, cached.blas_s) == (first.torch_s, first.blas_s)
    # another layout or a bias is another entry; use_cache=False neither reads nor writes
    gemm_timing.forget()
    (cache_dir / gemm_cache.FILENAME).unlink()
    _, source = target.time_gemm(64, w, torch.zeros(192), relayout=False, use_cache=False)
    assert source == "" and not (cache_dir / gemm_cache.FILENAME).exists()
    gemm_timing.forget()
