"""Shared fixtures: tiny random-init zoos written to temporary folders, and a CLI runner.

In the manner of mergekit's tests: session fixtures make small models and data themselves, nothing
is downloaded, and a helper runs a whole command into a temporary folder so tests assert on what it
writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import TINY_ZOO, run_cli

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
# Under pytest-xdist (``make test`` runs one worker per core) each worker, and every command it
# starts, gets one thread: two workers with two threads each on two cores run slower than one.
_XDIST = "PYTEST_XDIST_WORKER" in os.environ
if _XDIST:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread_per_worker():
    """Restore one thread per xdist worker before each test (some test modules set two at import)."""
    if _XDIST:
        torch.set_num_threads(1)
    yield

@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> Path:
    """A workspace with the tiny timm test models dissected at random init (built once per session)."""
    out = tmp_path_factory.mktemp("ws") / "workspace"
    run_cli("dissect", "--models", ",".join(TINY_ZOO), "--random-init", "--out", str(out), "--json")
    return out
