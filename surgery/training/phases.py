"""Run folders of phased training methods (``surgery incubate``, ``surgery align``): what they share.

A run is a folder with one sub-folder per phase; a phase is done when its ``result.json`` exists, so
a rerun skips it. A manifest records the spec that made the run; a rerun with another spec is refused
with a message naming the fields that differ.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from surgery.errors import SurgeryError
from surgery.workspace import read_json, write_json

RESULT = "result.json"

__all__ = ["RESULT", "phase_done", "finish_phase", "changed_fields", "parse_counts", "check_run_folder",
           "split_loaders"]


def phase_done(run: Path, name: str) -> dict[str, Any] | None:
    """The record of a finished phase, None when it has not finished."""
    path = run / name / RESULT
    return read_json(path, what=f"{name} result") if path.exists() else None


def finish_phase(run: Path, name: str, record: dict[str, Any]) -> dict[str, Any]:
    """Mark a phase finished by writing its record (atomically); returns the record.

    Under torch.distributed rank 0 writes and every rank waits for it: the next phase may read
    what this one wrote.
    """
    from surgery import distributed

    write_json(run / name / RESULT, record)
    distributed.barrier()
    return record


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"model.model_kwargs.depth": 4, ...}`` (so a message names the one field that differs)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for key, value in d.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed_fields(old: dict[str, Any], new: dict[str, Any], shown: int = 3) -> str:
    """``"field: old -> new; ..."`` for the (at most ``shown``) fields that differ, "" when none do."""
    a, b = _flatten(old), _flatten(new)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(f"{k}: {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}" for k in changed[:shown])


def check_run_folder(run: Path, manifest_name: str, schema: str, spec: BaseModel, what: str) -> dict[str, Any] | None:
    """The folder's manifest when it holds a run of the same spec, None for a new or empty folder.

    Fields added to the spec class after the run was made read as their defaults.

    Raises:
        SurgeryError: ``run`` is a file, a non-empty folder without the manifest, a manifest of another
            schema, or a run of another spec (the message names the fields that differ).
    """
    if run.exists() and not run.is_dir():
        raise SurgeryError(f"--out {run} is a file; give a new or empty folder")
    path = run / manifest_name
    if not path.exists():
        if run.exists() and any(run.iterdir()):
            raise SurgeryError(f"{run} is not empty and holds no {what} ({manifest_name} missing); "
                               "give a new or empty --out")
        return None
    manifest = read_json(path, what=f"{what} manifest")
    if not isinstance(manifest, dict) or manifest.get("schema") != schema or "spec" not in manifest:
        raise SurgeryError(f"{path} is not a {schema} manifest; give a new --out")
    try:
        old = type(spec).model_validate(manifest["spec"]).model_dump(mode="json")
    except ValidationError:
        old = manifest["spec"]
    shown = changed_fields(old, spec.model_dump(mode="json"))
    if shown:
        raise SurgeryError(f"{run} holds another {what} ({shown}); give a new --out, or the same options to resume it")
    return manifest


def parse_counts(text: str, names: Sequence[str], example: str, minimum: Sequence[int]) -> tuple[int, ...]:
    """``"3,1,1"`` -> epoch counts, one per phase name, each at least its ``minimum``.

    Raises:
        SurgeryError: anything else, in one line naming the phases and the example.
    """
    try:
        values = tuple(int(p.strip()) for p in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != len(names) or any(v < m for v, m in zip(values, minimum, strict=True)):
        lows = "; ".join(f"{n} at least {m}" for n, m in zip(names, minimum, strict=True) if m > 0)
        raise SurgeryError(f"--epochs must be {','.join(names)} epoch counts (e.g. {example}"
                           f"{'; ' + lows if lows else ''}), got {text!r}")
    return values


def split_loaders(data: str, seed: int, input_size: Sequence[int], batch_size: int, mean, std,
                  val_fraction: float = 0.1):
    """``(train, val, test)`` loaders of a data spec at ``input_size``, and the class names.

    The train loader is shuffled from ``seed`` and drops a last partial batch when there is more
    than one batch (a batch of one breaks batch norm); val and test are in order, 256 per batch.
    """
    from zoo.data import load_splits, make_loader, make_transform

    splits = load_splits(data, seed=seed, val_fraction=val_fraction)
    tf = make_transform(tuple(input_size), mean, std)
    drop_last = len(splits["train"]) > batch_size
    loaders = (make_loader(splits["train"], batch_size, shuffle=True, seed=seed, transform=tf, drop_last=drop_last),
               make_loader(splits["val"], 256, transform=tf), make_loader(splits["test"], 256, transform=tf))
    return loaders, [str(c) for c in splits["train"].classes]
