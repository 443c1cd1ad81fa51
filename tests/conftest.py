"""Shared test setup: deterministic seeds, single-threaded torch, GPU marker skipping."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch


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
