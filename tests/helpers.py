"""Helpers shared by the tests (importable as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]

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
    proc = subprocess.run([sys.executable, "-m", "surgery", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    result = CliResult(proc)
    if check and proc.returncode != 0:
        raise AssertionError(f"surgery {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return result


class CrashingData(Dataset):
    """Raises after ``crash_after`` item reads, like a process killed mid-epoch."""

    def __init__(self, base: Dataset, crash_after: int | None):
        self.base, self.crash_after, self.reads = base, crash_after, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        if self.crash_after is not None and self.reads > self.crash_after:
            raise RuntimeError("simulated crash")
        return self.base[i]
