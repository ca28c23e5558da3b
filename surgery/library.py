"""The block library: dissect a zoo into a workspace, and load it back.

``dissect_zoo`` is the step behind ``surgery dissect``: for each zoo entry it builds the model once,
dissects it (:func:`surgery.dissection.dissect`), and writes the model's manifest to the workspace.
Models already dissected with the same settings are skipped, so a re-run resumes; a model that
fails is recorded with its reason and the others go on.

``load_library`` rebuilds every block from its recipe (zoo entry + cut node names) and the weights
(rebuilt from the entry, or read from the workspace's safetensors), never unpickling anything.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery.errors import USER_ERRORS, WorkspaceError
from surgery.spec import BlockInfo
from surgery.workspace import Workspace, load_tensors, save_tensors
from zoo.entries import ZooEntry, build_model, data_config


@dataclass
class ModelStatus:
    """What happened to one zoo model in a dissect run."""

    name: str
    status: str  # "ok" | "cached" | "failed"
    cut_points: int = 0
    blocks: int = 0
    params: int = 0
    macs: int = 0
    seconds: float = 0.0
    reason: str = ""
    note: str = ""  # e.g. why a cached model was dissected again

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def weights_fingerprint(model: nn.Module) -> float:
    """A cheap checksum of a model's weights (float64 sum of |w|), to detect a changed rebuild."""
    total = 0.0
    for p in model.state_dict().values():
        if p.is_floating_point() and p.device.type != "meta":
            total += float(p.detach().double().abs().sum())
    return total


def _settings(input_size: tuple[int, int, int], granularity: str, structure_only: bool) -> dict[str, Any]:
    return {"input_size": list(input_size), "granularity": granularity, "structure_only": structure_only}


def _entry_reproducible(entry: ZooEntry) -> bool:
    """Whether the weights can be rebuilt from the entry alone (else the workspace stores them)."""
    return entry.module_class is None


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else ""
    if isinstance(exc, USER_ERRORS):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _stderr_note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cached_problem(workspace: Workspace, name: str, settings: dict[str, Any]) -> str | None:
    """Why a model the index lists as done cannot be reused (``None``: it can).

    Reads the manifest with the reader every later step uses (:meth:`Workspace.read_dissection`), so a
    manifest that would fail there is never reported as cached; checks that it was written with these
    settings (a crash between the manifest and the index write leaves them apart) and that the weights
    file it names is a readable safetensors file.
    """
    path = workspace.dissection_path(name)
    if not path.exists():
        return f"its manifest {path} is missing"
    try:
        manifest = workspace.read_dissection(name, hint=False)
    except WorkspaceError as e:
        return str(e)
    if manifest.get("settings") != settings:
        return f"its manifest {path} was written with other settings ({manifest.get('settings')})"
    if manifest.get("weights"):
        from safetensors import SafetensorError, safe_open

        weights = workspace.model_dir(name) / str(manifest["weights"])
        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as e:
            return f"its weights file {weights} is missing or corrupt ({_one_line(e)})"
    return None


def dissect_zoo(
    entries: Iterable[ZooEntry],
    workspace: Workspace,
    *,
    input_size: int | None = None,
    granularity: str = "block",
    structure_only: bool = False,
    verify: bool = True,
    on_model: Callable[[str, str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> list[ModelStatus]:
    """Dissect every zoo entry into the workspace (resumable; failures do not stop the rest).

    Args:
        entries: the zoo.
        workspace: where manifests are written.
        input_size: square input resolution; ``None`` uses each model's own default (timm config).
        granularity: ``"block"`` (default), ``"stage"`` or ``"node"`` (see :func:`surgery.dissection.dissect`).
        structure_only: build on the meta device (no weights in memory; no chaining check possible).
        verify: check that the chained blocks reproduce the model on a random input.
        on_model: callback ``(name, phase)`` for progress display (phase: build, dissect, save, done).
        on_note: receives one-line notes, e.g. that a cached model's manifest was corrupt and the model
            is dissected again (default: printed to stderr). The note is also in ``ModelStatus.note``.

    Returns:
        One :class:`ModelStatus` per entry, in order.
    """
    from surgery.dissection import dissect

    index = workspace.read_index()
    results: list[ModelStatus] = []
    for entry in entries:
        notify = (lambda phase, _n=entry.name: on_model(_n, phase)) if on_model else (lambda phase: None)
        t0 = time.perf_counter()
        try:
            notify("build")
            model = build_model(entry, structure_only=structure_only)
            cfg = data_config(entry, model)
            size = tuple(cfg["input_size"])
            if input_size is not None:
                size = (size[0], int(input_size), int(input_size))
            settings = _settings(size, granularity, structure_only)
            done = index["models"].get(entry.name)
            note = ""
            if done and done.get("settings") == settings:
                problem = _cached_problem(workspace, entry.name, settings)
                if problem is None:
                    results.append(ModelStatus(entry.name, "cached", done["cut_points"], done["blocks"],
                                               done["params"], done["macs"], 0.0))
                    notify("done")
                    continue
                note = f"{problem}: dissected again"
                (on_note or _stderr_note)(f"note: {entry.name}: {note}")
            notify("dissect")
            d = dissect(model, size, name=entry.name, granularity=granularity,
                        verify=verify and not structure_only)
            notify("save")
            manifest = {
                "entry": entry.to_dict(),
                "settings": settings,
                "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                "weights": None,
                "weights_fingerprint": None if structure_only else weights_fingerprint(model),
                **d.to_dict(),
            }
            if not _entry_reproducible(entry) and not structure_only:
                save_tensors(workspace.weights_path(entry.name), model.state_dict())
                manifest["weights"] = workspace.weights_path(entry.name).name
            workspace.write_dissection(entry.name, manifest)
            status = ModelStatus(entry.name, "ok", len(d.cut_points), len(d.blocks), d.params, d.macs,
                                 time.perf_counter() - t0, note=note)
            workspace.record_model(entry.name, {**{k: v for k, v in status.to_dict().items()
                                                   if k in ("cut_points", "blocks", "params", "macs")},
                                                "settings": settings})
            index = workspace.read_index()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the zoo
            reason = _one_line(exc)
            workspace.record_failure(entry.name, reason)
            index = workspace.read_index()
            status = ModelStatus(entry.name, "failed", seconds=time.perf_counter() - t0, reason=reason)
        finally:
            notify("done")
        results.append(status)
    return results


@dataclass
class LibraryModel:
    """One model of a loaded block library."""

    name: str
    entry: ZooEntry
    manifest: dict[str, Any]
    model: nn.Module
    dissection: Any  # surgery.dissection.Dissection
    blocks: list[nn.Module] = field(default_factory=list)
    block_info: list[BlockInfo] = field(default_factory=list)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.manifest["settings"]["input_size"])

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks in order (reproduces the model)."""
        for block in self.blocks:
            x = block(x)
        return x

    def __repr__(self) -> str:  # the dataclass default would print every module of the model
        return f"LibraryModel({self.name!r}, {len(self.blocks)} blocks, input {self.input_size})"


@dataclass
class Library:
    """A block library loaded from a workspace: ``library.models[name].blocks``."""

    workspace: Workspace
    models: dict[str, LibraryModel]

    def __getitem__(self, name: str) -> LibraryModel:
        return self.models[name]

    def __iter__(self):
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)

    def __repr__(self) -> str:
        return f"Library({str(self.workspace.root)!r}, {len(self.models)} models: {', '.join(self.models)})"


def load_model_entry(workspace: Workspace, name: str, modules: dict[str, nn.Module] | None = None
                     ) -> tuple[ZooEntry, dict[str, Any], nn.Module]:
    """Rebuild one dissected model (entry + weights) from the workspace, eval mode, on CPU."""
    manifest = workspace.read_dissection(name)
    entry = ZooEntry.model_validate(manifest["entry"])
    if manifest.get("settings", {}).get("structure_only"):
        raise WorkspaceError(f"{name} was dissected structure-only (no weights); re-run dissect without it")
    if entry.module_class is not None:
        if not modules or name not in modules:
            raise WorkspaceError(
                f"{name} came from a Python nn.Module: pass it again, load_library(..., modules={{{name!r}: m}})"
            )
        model = modules[name].eval()
    else:
        model = build_model(entry)
    if manifest.get("weights"):
        state = load_tensors(workspace.model_dir(name) / manifest["weights"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WorkspaceError(f"weights of {name} do not match its architecture "
                                 f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    expected = manifest.get("weights_fingerprint")
    if expected is not None:
        got = weights_fingerprint(model)
        if not math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-6):
            raise WorkspaceError(
                f"{name}: rebuilt weights differ from the dissected ones (fingerprint {got:.6g} vs "
                f"{expected:.6g}); the checkpoint or timm version changed - re-run 'surgery dissect'"
            )
    return entry, manifest, model.eval()


def load_library(
    workdir: str | os.PathLike,
    models: Iterable[str] | None = None,
    *,
    modules: dict[str, nn.Module] | None = None,
) -> Library:
    """Load a block library from a workspace without unpickling anything.

    Each model is rebuilt from its zoo entry (and the workspace's safetensors when its weights are not
    reproducible from the entry), re-traced, and cut at the stored boundaries.

    Args:
        workdir: the workspace folder written by ``surgery dissect``.
        models: names to load (default: all dissected models).
        modules: for entries that came from a Python ``nn.Module``, the module to rebuild them from.

    Returns:
        A :class:`Library`; ``library.models[name].blocks`` reproduce the model when chained.
    """
    from surgery.dissection import dissect

    ws = Workspace(workdir).require()
    names = list(models) if models is not None else ws.model_names()
    loaded: dict[str, LibraryModel] = {}
    for name in names:
        if name not in ws.model_names():
            raise WorkspaceError(f"{name!r} is not in workspace {ws.root} (has: {', '.join(ws.model_names())})")
        entry, manifest, model = load_model_entry(ws, name, modules)
        settings = manifest["settings"]
        d = dissect(model, tuple(settings["input_size"]), name=name, granularity=settings["granularity"])
        boundaries = list(manifest["boundaries"])
        known = {c.name for c in d.cut_points}
        lost = [b for b in boundaries if b not in known]
        if lost:
            raise WorkspaceError(f"{name}: cut points {lost[:3]} no longer exist in the traced graph; "
                                 "re-run 'surgery dissect'")
        blocks = d.split(boundaries)
        infos = [BlockInfo.from_dict(b) for b in manifest["blocks"]]
        loaded[name] = LibraryModel(name, entry, manifest, model, d, blocks, infos)
    return Library(ws, loaded)
