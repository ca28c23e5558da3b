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

@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> Path:
    """A workspace with the tiny timm test models dissected at random init (built once per session)."""
    out = tmp_path_factory.mktemp("ws") / "workspace"
    run_cli("dissect", "--models", ",".join(TINY_ZOO), "--random-init", "--out", str(out), "--json")
    return out
