"""Shared fixtures: one cache per test session, and the tiny preset's trained models."""

from __future__ import annotations

import os

# numpy's BLAS threads fight the 2 cores for tiny matrix calls; one thread is faster here
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest

# Every test session trains into its own cache, so no test depends on what a previous run left.
_SESSION_CACHE = None


def pytest_configure(config: pytest.Config) -> None:
    global _SESSION_CACHE
    import tempfile

    if "FRACTAL_CACHE" not in os.environ or os.environ.get("FRACTAL_TEST_FRESH_CACHE", "1") == "1":
        _SESSION_CACHE = tempfile.mkdtemp(prefix="fractal-test-cache-")
        os.environ["FRACTAL_CACHE"] = _SESSION_CACHE
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    # one compute thread: tests, Ray actors and servers share 2 cores, and oversubscribed
    # intra-op threads make small models tens of times slower
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_suite():
    """The tiny preset's Suite with base, specialists and adapters trained (once per session)."""
    from model.pipeline import Suite

    suite = Suite("tiny", seed=0, progress=False)
    suite.build_all()
    return suite
