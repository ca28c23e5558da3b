"""Shared fixtures: tiny random-init zoos written to temporary folders, and a CLI runner.

In the manner of mergekit's tests: session fixtures make small models and data themselves, nothing
is downloaded, and a helper runs a whole command into a temporary folder so tests assert on what it
writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_ZOO = ["test_resnet", "test_vit", "test_efficientnet", "test_convnext"]


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    def json(self):
        return json.loads(self.stdout)


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: int = 600) -> CliResult:
    """Run ``surgery ARGS`` in a subprocess (as a user would) and return its exit code and output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "surgery.cli", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    result = CliResult(proc)
    if check and proc.returncode != 0:
        raise AssertionError(f"surgery {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> Path:
    """A workspace with the tiny timm test models dissected at random init (built once per session)."""
    out = tmp_path_factory.mktemp("ws") / "workspace"
    run_cli("dissect", "--models", ",".join(TINY_ZOO), "--random-init", "--out", str(out), "--json")
    return out
