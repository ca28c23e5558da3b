"""The workspace folder: where every step reads its inputs and writes its outputs.

Layout (schema ``surgery.workspace/1``)::

    WORKDIR/
      workspace.json                    index: schema, settings of the last dissect, failures
      models/<name>/dissection.json     one model's zoo entry, cut points, boundaries, block metadata
      models/<name>/weights.safetensors only when the weights cannot be rebuilt from the zoo entry
      similarity/...                    written by ``surgery similarity``
      partition.json, partition/*.png   written by ``surgery partition``

Every write is atomic (temporary file in the same folder, then ``os.replace``), so a crash or a
Ctrl-C never leaves a half-written manifest and an earlier good file is never lost. Nothing is ever
unpickled: manifests are JSON, tensors are safetensors.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from surgery.errors import WorkspaceError
from zoo.files import new_file_mode

WORKSPACE_SCHEMA = "surgery.workspace/1"
DISSECTION_SCHEMA = "surgery.dissection/1"
DEFAULT_WORKSPACE = "surgery-workspace"

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.\-]+")


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None``, recursively (dicts, lists, tuples).

    Python's ``json`` writes such floats as the bare words ``NaN``/``Infinity``, which strict JSON
    parsers (``jq``, JavaScript, ``json.loads(..., parse_constant=...)``-less tools) reject; machine
    output (``--json``, ``demo.json``) must parse anywhere, and ``null`` is JSON's "no number".
    """
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (non-finite floats become ``null``; see :func:`finite_json`)."""
    return json.dumps(finite_json(obj), indent=indent, allow_nan=False)


def model_dirname(name: str) -> str:
    """A file-system safe folder name for a model name (``vit_small.augreg`` stays readable)."""
    safe = _SAFE_NAME.sub("_", name).strip("._")
    return safe or "model"


@contextmanager
def atomic_path(path: str | os.PathLike, *, all_ranks: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    The temporary file lives in the destination folder so the final ``os.replace`` is atomic on
    POSIX. On an exception the temporary file is removed and ``path`` is left untouched. The file
    gets the mode a plain write would give it (:func:`new_file_mode`), not ``mkstemp``'s 0600.

    Under torch.distributed only rank 0 writes (:mod:`surgery.distributed`): other ranks get a
    private temporary file that is discarded, so the ranks of one command never race on a file.
    ``all_ranks=True`` is for files each rank owns (a rank's share of a feature cache).
    """
    from surgery import distributed

    path = Path(path)
    if not all_ranks and not distributed.is_main():
        with tempfile.TemporaryDirectory(prefix="surgery-rank-") as scratch:
            yield Path(scratch) / path.name
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, new_file_mode(path))
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (UTF-8), atomically; rank 0 only under torch.distributed."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "manifest") -> Any:
    """Read a JSON manifest; a missing or corrupt file raises :class:`WorkspaceError` in one line."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkspaceError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkspaceError(f"corrupt {what} {path}: {e}") from None
    except OSError as e:
        raise WorkspaceError(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_manifest(path: str | os.PathLike, schema: str, *, what: str, missing: str,
                  fix: str | None = None) -> dict[str, Any]:
    """Read a JSON manifest of a given schema; one-line :class:`WorkspaceError` when missing or foreign.

    Args:
        path: the file.
        schema: the expected ``"schema"`` field.
        what: what the file is, for messages.
        missing: the message when the file does not exist (say which command writes it).
        fix: what to do about a corrupt or foreign file, appended in parentheses (e.g. which command
            rewrites it).
    """
    path = Path(path)
    if not path.exists():
        raise WorkspaceError(missing)
    suffix = f" ({fix})" if fix else ""
    try:
        data = read_json(path, what=what)
    except WorkspaceError as e:
        raise WorkspaceError(f"{e}{suffix}") from None
    if not isinstance(data, dict) or data.get("schema") != schema:
        raise WorkspaceError(f"{path} is not a {schema} {what}{suffix}")
    return data


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None, *,
                 all_ranks: bool = False) -> None:
    """Save a dict of tensors as safetensors, atomically (contiguous CPU copies, no shared storage).

    Rank 0 only under torch.distributed unless ``all_ranks`` (see :func:`atomic_path`).
    """
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path, all_ranks=all_ranks) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict:
    """Load a safetensors file into CPU tensors; a missing/corrupt file raises :class:`WorkspaceError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise WorkspaceError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WorkspaceError(f"corrupt weights file {path}: {e}") from None


class Workspace:
    """A workspace folder. Cheap to construct; nothing is read until asked.

    Args:
        root: the folder (created on first write).
    """

    def __init__(self, root: str | os.PathLike = DEFAULT_WORKSPACE):
        self.root = Path(root)

    # -- index --------------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.root / "workspace.json"

    def exists(self) -> bool:
        """True when the folder holds a workspace index."""
        return self.index_path.exists()

    def require(self) -> Workspace:
        """Raise a one-line :class:`WorkspaceError` unless this is a valid workspace."""
        if not self.root.is_dir():
            raise WorkspaceError(
                f"no workspace at {self.root}: run 'surgery dissect --out {self.root}' first"
            )
        index = self.read_index()
        if not index.get("models"):
            raise WorkspaceError(f"workspace {self.root} holds no dissected model: run 'surgery dissect'")
        return self

    def read_index(self) -> dict[str, Any]:
        """The workspace index (an empty one when the folder is new)."""
        if not self.index_path.exists():
            return {"schema": WORKSPACE_SCHEMA, "models": {}, "failed": {}}
        index = read_json(self.index_path, what="workspace index")
        if not isinstance(index, dict) or index.get("schema") != WORKSPACE_SCHEMA:
            found = index.get("schema") if isinstance(index, dict) else type(index).__name__
            raise WorkspaceError(
                f"{self.index_path} is not a {WORKSPACE_SCHEMA} index (found {found!r})"
            )
        index.setdefault("models", {})
        index.setdefault("failed", {})
        return index

    def write_index(self, index: dict[str, Any]) -> None:
        index["schema"] = WORKSPACE_SCHEMA
        write_json(self.index_path, index)

    # -- models -------------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        return self.root / "models" / model_dirname(name)

    def dissection_path(self, name: str) -> Path:
        return self.model_dir(name) / "dissection.json"

    def weights_path(self, name: str) -> Path:
        return self.model_dir(name) / "weights.safetensors"

    def model_names(self) -> list[str]:
        """Names of the successfully dissected models, in the order they were added."""
        return list(self.read_index()["models"])

    def read_dissection(self, name: str, *, hint: bool = True) -> dict[str, Any]:
        """One model's dissection manifest, schema-checked (``hint``: the error says how to rebuild it)."""
        path = self.dissection_path(name)
        fix = f"re-run 'surgery dissect --out {self.root}' to rebuild it" if hint else ""
        try:
            data = read_json(path, what=f"dissection manifest of {name!r}")
        except WorkspaceError as e:
            raise WorkspaceError(f"{e} ({fix})" if fix else str(e)) from None
        fix = f" ({fix})" if fix else ""
        if not isinstance(data, dict) or data.get("schema") != DISSECTION_SCHEMA:
            raise WorkspaceError(f"{path} is not a {DISSECTION_SCHEMA} manifest{fix}")
        for key in ("entry", "settings", "input_size", "boundaries", "blocks"):
            if key not in data:
                raise WorkspaceError(f"{path} lacks the field {key!r}{fix}")
        return data

    def write_dissection(self, name: str, data: dict[str, Any]) -> None:
        data = {"schema": DISSECTION_SCHEMA, **data}
        write_json(self.dissection_path(name), data)

    def record_model(self, name: str, summary: dict[str, Any]) -> None:
        """Mark a model as done in the index (and clear an earlier failure)."""
        index = self.read_index()
        index["models"][name] = summary
        index["failed"].pop(name, None)
        self.write_index(index)

    def record_failure(self, name: str, reason: str) -> None:
        """Record why a model failed; an earlier successful dissection of it is kept."""
        index = self.read_index()
        if name not in index["models"]:
            index["failed"][name] = reason
            self.write_index(index)
