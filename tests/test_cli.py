"""The command line as a user meets it: outputs, resumability, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from helpers import TINY_ZOO, run_cli

import surgery
from solvers.partition import min_feasible_eps
from surgery.equivalence import _candidates
from surgery.workspace import Workspace


@pytest.fixture(scope="module")
def sim_workspace(tiny_workspace, tmp_path_factory):
    """The tiny random-init zoo with a (small) similarity, ready for 'surgery partition'."""
    from surgery.similarity import compute_similarity

    ws = tmp_path_factory.mktemp("part") / "ws"
    shutil.copytree(tiny_workspace, ws)
    compute_similarity(ws, "digits", samples=64, batch_size=32, seed=1)
    return ws


def test_help_lists_commands():
    res = run_cli("--help")
    for cmd in ("dissect", "inspect", "similarity", "partition", "reassemble", "baseline", "finetune", "evaluate",
                "zoo", "demo"):
        assert cmd in res.stdout


def test_dissect_writes_library(tiny_workspace):
    ws = Workspace(tiny_workspace)
    index = ws.read_index()
    assert set(index["models"]) == set(TINY_ZOO)
    for name in TINY_ZOO:
        manifest = ws.read_dissection(name)
        assert manifest["schema"] == "surgery.dissection/1"
        assert len(manifest["blocks"]) == len(manifest["boundaries"]) + 1
        assert sum(b["params"] for b in manifest["blocks"]) == index["models"][name]["params"]


def test_dissect_is_resumable(tiny_workspace):
    res = run_cli("dissect", "--models", ",".join(TINY_ZOO), "--random-init", "--out", str(tiny_workspace), "--json")
    statuses = {m["name"]: m["status"] for m in res.json()["models"]}
    assert set(statuses.values()) == {"cached"}


def test_failed_model_does_not_stop_the_rest(tmp_path):
    # an offline model without cached weights fails with its reason; the random-init one still runs
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("- name: test_resnet\n  random_init: true\n- name: resnet18\n")
    res = run_cli("dissect", "--zoo", str(zoo), "--out", str(tmp_path / "ws"), "--json")
    by_name = {m["name"]: m for m in res.json()["models"]}
    assert by_name["test_resnet"]["status"] == "ok"
    assert by_name["resnet18"]["status"] == "failed"
    assert "resnet18" in by_name["resnet18"]["reason"]


def test_inspect_shows_blocks(tiny_workspace):
    res = run_cli("inspect", str(tiny_workspace), "test_vit", "--json")
    manifest = res.json()
    assert manifest["entry"]["name"] == "test_vit"
    res = run_cli("inspect", str(tiny_workspace))
    assert "test_resnet" in res.stdout


def test_library_reloads_to_identical_outputs(tiny_workspace):
    import timm

    lib = surgery.load_library(tiny_workspace)
    assert set(lib.models) == set(TINY_ZOO)
    for item in lib:
        x = torch.randn(3, *item.input_size)
        with torch.no_grad():
            ref = item.model(x)
            out = item.run_blocks(x)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
        # the rebuilt weights are the dissected ones: a fresh random-init build gives the same output
        fresh = timm.create_model(item.entry.arch, pretrained=False)
        assert fresh is not None


def test_bad_input_is_one_line_exit_2(tmp_path):
    cases = [
        ("dissect", "--models", "no_such_model_xyz", "--random-init", "--out", str(tmp_path / "a")),
        ("inspect", str(tmp_path / "missing")),
        ("dissect", "--zoo", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "b")),
        ("dissect", "--granularity", "weird", "--random-init", "--models", "test_resnet"),
    ]
    for args in cases:
        res = run_cli(*args, check=False)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr
        assert len([ln for ln in res.stderr.strip().splitlines() if ln.strip()]) >= 1


def test_corrupt_workspace_is_reported(tmp_path, tiny_workspace):
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(tiny_workspace, ws)
    (ws / "workspace.json").write_text("{not json")
    res = run_cli("inspect", str(ws), check=False)
    assert res.returncode == 2
    assert "corrupt" in res.stderr
    assert "Traceback" not in res.stderr
    # nothing already written is lost: the manifests are untouched
    assert json.loads((ws / "models" / "test_resnet" / "dissection.json").read_text())["schema"]


def test_partition_default_relaxes_per_model_and_reports_it(sim_workspace):
    # at K = 3 the tiny zoo's resnet cannot be cut within eps = 0.2 (an indivisible heavy block):
    # the default holds every model to max(0.2, its smallest feasible eps) and says so
    ws = Workspace(sim_workspace)
    need = {n: min_feasible_eps(*_candidates(ws.read_dissection(n))[1:], 3) for n in TINY_ZOO}
    assert any(v > 0.2 for v in need.values()) and any(v <= 0.2 for v in need.values())
    part = run_cli("partition", str(sim_workspace), "--stages", "3", "--no-plots", "--json").json()
    assert part == json.loads((sim_workspace / "partition.json").read_text())
    assert part["eps"] == 0.2 and part["eps_strict"] is False
    for name, m in part["models"].items():
        assert m["eps_used"] == pytest.approx(max(0.2, need[name]))
        assert m["eps_relaxed"] == (need[name] > 0.2)
        cap = (1 + m["eps_used"]) * m["total_macs"] / 3
        assert max(b["macs"] for b in m["stage_blocks"]) <= cap * (1 + 1e-9)
    text = run_cli("partition", str(sim_workspace), "--stages", "3", "--no-plots").stdout
    for name in TINY_ZOO:
        line = [ln for ln in text.splitlines() if "relaxed" in ln and name in ln]
        assert bool(line) == (need[name] > 0.2), (name, text)
        if line:
            assert f"{need[name]:.3f}" in line[0]


def test_partition_explicit_eps_is_strict(sim_workspace):
    ws = Workspace(sim_workspace)
    need = max(min_feasible_eps(*_candidates(ws.read_dissection(n))[1:], 3) for n in TINY_ZOO)
    res = run_cli("partition", str(sim_workspace), "--stages", "3", "--eps", "0.2", "--no-plots", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    shown = float(re.search(r"smallest eps that works is ([0-9.]+)", res.stderr).group(1))
    assert shown == pytest.approx(need, abs=1e-3)
    # an explicit eps every model meets is used as is, for every model
    part = run_cli("partition", str(sim_workspace), "--stages", "3", "--eps", f"{need + 0.01:.3f}", "--no-plots",
                   "--json").json()
    assert part["eps_strict"] is True
    assert all(m["eps_used"] == pytest.approx(need + 0.01, abs=1e-3) for m in part["models"].values())
    assert not any(m["eps_relaxed"] for m in part["models"].values())


def test_json_output_is_strict_json():
    """``--json`` output must parse in strict JSON readers: NaN and infinities become null."""
    import math

    from surgery.workspace import json_text

    text = json_text({"proxy": float("nan"), "scores": [1.0, float("inf"), -math.inf], "n": 3, "ok": True})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}")) == {
        "proxy": None, "scores": [1.0, None, None], "n": 3, "ok": True}
