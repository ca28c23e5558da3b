"""A corrupt workspace file is reported in one line (exit 2) and never silently replaced.

Only a MISSING earlier step is computed for the user; an existing file that cannot be read stays as it
is. A corrupt cached dissection is dissected again (with a note). Atomic writes give files the mode a
plain write would (0666 & ~umask), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from surgery.workspace import Workspace, save_tensors, write_json

CORRUPT = '{"schema": "surgery.partition/1", "stages": 3, "models": {'  # a torn 3-stage partition


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_workspace) -> Path:
    """Two tiny models with a similarity (digits, 32 images) and a 2-stage partition (built once)."""
    from surgery.equivalence import run_partition
    from surgery.similarity import compute_similarity

    ws = tmp_path_factory.mktemp("integrity") / "ws"
    shutil.copytree(tiny_workspace, ws)
    index = Workspace(ws).read_index()
    index["models"] = {n: index["models"][n] for n in ("test_resnet", "test_efficientnet")}
    Workspace(ws).write_index(index)
    compute_similarity(ws, "digits", samples=32, batch_size=32, seed=0, cache=False)
    run_partition(ws, 2, eps=1.0, restarts=2, seed=0, plots=False, relax_eps=True)
    return ws


def _copy(src: Path, tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(src, ws)
    return ws


def _one_line_error(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


# -- 1. only a missing step is computed ------------------------------------------------------------
def test_reassemble_reports_a_corrupt_partition_and_keeps_it(prepared, tmp_path):
    ws = _copy(prepared, tmp_path)
    (ws / "partition.json").write_text(CORRUPT)
    res = run_cli("reassemble", str(ws), "--max-gflops", "0.002", "--data", "digits", "--out",
                  str(tmp_path / "out"), check=False)
    line = _one_line_error(res)
    assert "corrupt partition manifest" in line and "delete it or re-run 'surgery partition" in line, line
    assert "no partition yet" not in res.stdout + res.stderr
    assert (ws / "partition.json").read_text() == CORRUPT  # the user's file is untouched
    assert not (tmp_path / "out").exists()


def test_reassemble_reports_a_corrupt_similarity_and_keeps_it(prepared, tmp_path):
    ws = _copy(prepared, tmp_path)
    sim = ws / "similarity" / "similarity.json"
    sim.write_text("{not json")
    res = run_cli("reassemble", str(ws), "--max-gflops", "0.002", "--data", "digits", "--out",
                  str(tmp_path / "out"), check=False)
    assert "corrupt similarity manifest" in _one_line_error(res)
    assert "no similarity yet" not in res.stdout + res.stderr
    assert sim.read_text() == "{not json"


def test_baseline_reports_a_corrupt_partition_with_the_fix(prepared, tmp_path):
    ws = _copy(prepared, tmp_path)
    (ws / "partition.json").write_text(CORRUPT)
    res = run_cli("baseline", str(ws), "--data", "digits", "--out", str(tmp_path / "single"), check=False)
    line = _one_line_error(res)
    assert "corrupt partition manifest" in line and "delete it or re-run 'surgery partition" in line, line
    assert (ws / "partition.json").read_text() == CORRUPT


def test_stale_partition_is_named_with_both_settings(prepared, tmp_path):
    import surgery.reassembly as R

    ws = _copy(prepared, tmp_path)
    path = ws / "similarity" / "similarity.json"
    sim = json.loads(path.read_text())
    sim["settings"]["seed"] = 7  # the similarity was recomputed after the partition was made
    path.write_text(json.dumps(sim))
    before = (ws / "partition.json").read_bytes()
    notes: list[str] = []
    R.reassemble(ws, data="digits", top=1, target_samples=32, proxy="params", seed=0, log=notes.append)
    stale = [n for n in notes if "partition is stale" in n]
    assert len(stale) == 1, notes
    assert "seed=0" in stale[0] and "seed=7" in stale[0] and "re-run 'surgery partition" in stale[0]
    assert (ws / "partition.json").read_bytes() == before
    # the partition made from the current similarity gets no note
    from surgery.equivalence import read_partition
    from surgery.similarity import read_similarity

    fresh: list[str] = []
    R._check_partition_against(Workspace(prepared), read_partition(Workspace(prepared)),
                               read_similarity(Workspace(prepared)), fresh.append)
    assert fresh == []


def test_partition_naming_a_cut_point_the_similarity_lacks_is_an_error(prepared, tmp_path):
    import surgery.reassembly as R
    from surgery.errors import WorkspaceError

    ws = _copy(prepared, tmp_path)
    path = ws / "partition.json"  # made on a dissection whose cut points the similarity no longer has
    part = json.loads(path.read_text())
    part["models"]["test_efficientnet"]["stage_blocks"][0]["end"] = "gone"
    path.write_text(json.dumps(part))
    with pytest.raises(WorkspaceError, match="does not match the similarity"):
        R.reassemble(ws, data="digits", top=1, target_samples=32, proxy="params", seed=0)


# -- 2. dissect validates a cached manifest --------------------------------------------------------
def test_dissect_redissects_a_corrupt_cached_manifest(tiny_workspace, tmp_path):
    ws = _copy(tiny_workspace, tmp_path)
    manifest = Workspace(ws).dissection_path("test_vit")
    manifest.write_text('{"schema": "surgery.dissection/1", "entry": ')
    res = run_cli("dissect", "--models", "test_vit", "--random-init", "--out", str(ws), "--json")
    (status,) = res.json()["models"]
    assert status["status"] == "ok" and "corrupt dissection manifest" in status["note"], status
    assert "note: test_vit:" in res.stderr and "dissected again" in res.stderr
    assert Workspace(ws).read_dissection("test_vit")["boundaries"]  # readable again
    from surgery.library import _cached_problem

    settings = Workspace(ws).read_index()["models"]["test_vit"]["settings"]
    assert _cached_problem(Workspace(ws), "test_vit", settings) is None  # the next run reuses it


def test_dissect_redissects_a_manifest_missing_a_field(tiny_workspace, tmp_path):
    from surgery.library import dissect_zoo
    from zoo.entries import ZooEntry

    ws = Workspace(_copy(tiny_workspace, tmp_path))
    data = json.loads(ws.dissection_path("test_resnet").read_text())
    del data["blocks"]
    ws.dissection_path("test_resnet").write_text(json.dumps(data))
    notes: list[str] = []
    (status,) = dissect_zoo([ZooEntry(name="test_resnet", random_init=True)], ws, on_note=notes.append)
    assert status.status == "ok" and "lacks the field 'blocks'" in status.note
    assert len(notes) == 1 and ws.read_dissection("test_resnet")["blocks"]


# -- 3. atomic writes keep the normal file mode ----------------------------------------------------
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_get_the_plain_write_mode(tmp_path, umask_022):
    from zoo.entries import save_weights

    write_json(tmp_path / "a.json", {"x": 1})
    save_tensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)})
    save_weights(torch.nn.Linear(2, 2), tmp_path / "w.safetensors")
    for name in ("a.json", "t.safetensors", "w.safetensors"):
        assert _mode(tmp_path / name) == 0o644, name
    os.chmod(tmp_path / "a.json", 0o640)  # an existing file keeps its mode, as with a plain write
    write_json(tmp_path / "a.json", {"x": 2})
    assert _mode(tmp_path / "a.json") == 0o640
    os.umask(0o077)
    write_json(tmp_path / "b.json", {})
    assert _mode(tmp_path / "b.json") == 0o600


def test_partition_and_model_folder_get_the_plain_write_mode(prepared, tmp_path, umask_022):
    from surgery.equivalence import run_partition
    from surgery.reassembly import reassemble

    ws = _copy(prepared, tmp_path)
    (ws / "partition.json").unlink()
    run_partition(ws, 2, eps=1.0, restarts=1, seed=0, plots=False, relax_eps=True)
    assert _mode(ws / "partition.json") == 0o644
    out = tmp_path / "model"
    reassemble(ws, data="digits", top=1, target_samples=32, proxy="params", seed=0, out_dir=out)
    for name in ("config.json", "model.safetensors", "README.md"):
        assert _mode(out / name) == 0o644, name
