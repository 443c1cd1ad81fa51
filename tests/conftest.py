"""Shared test setup: deterministic seeds, single-threaded torch, GPU marker skipping."""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

# before anything imports triton: fixes Triton's interpreter mode for the whole process
# (triton decorates its own tl.sum & co. at its first import; transfuse/codegen/triton/env.py)
import transfuse.codegen.triton.env  # noqa: F401, E402


def pytest_configure(config):
    torch.set_num_threads(1)
    # hermetic: the GEMM timing cache of layout.select-gemm goes to a fresh directory,
    # never the developer's ~/.cache/transfuse
    os.environ["TRANSFUSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="transfuse-test-cache-")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def make_package(tmp_path):
    """``make_package({"pkg/a.py": source, ...})`` writes the files (dedented) under a fresh
    folder and returns the package folder (the first path component): a tiny synthetic
    package for tests of checkers that read source trees."""

    def make(files: dict[str, str]) -> Path:
        for rel, text in files.items():
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        return tmp_path / next(iter(files)).split("/")[0]

    return make
