"""Resumable benchmark runs, shared by the benchmarks whose runs are `surgery` run folders.

Each job writes one run folder holding a manifest with ``"complete": true`` once done; a finished run
is skipped, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def _complete(path: Path) -> dict | None:
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    return manifest if manifest.get("complete") else None


def run_all(one_run: Callable, jobs: Sequence[tuple], manifest_of: Callable[[tuple], Path], workers: int,
            skip: bool = False) -> dict[tuple, dict]:
    """Run the unfinished ``jobs`` (``one_run(*job)``, ``workers`` processes at once, one thread each),
    then return ``{job: manifest}`` of every finished one. ``skip``: only collect."""
    from surgery.executor import run_jobs

    if not skip:
        started = time.time()
        run_jobs(one_run, list(jobs), backend="process" if workers > 1 else "serial", workers=workers,
                 done=lambda i: _complete(manifest_of(jobs[i])) is not None)
        print(f"runs done in {time.time() - started:.0f} s", flush=True)
    return {job: m for job in jobs if (m := _complete(manifest_of(job))) is not None}
