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
                "incubate", "zoo", "demo"):
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
    # a readable summary, not every module of every model
    assert len(repr(lib).splitlines()) == 1 and all(name in repr(lib) for name in TINY_ZOO)
    assert all(len(repr(item).splitlines()) == 1 for item in lib)


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


# ---- bad input: one error line, exit code 2, no traceback (parser errors need no workspace) ----

def _assert_one_error_line(res, *needles: str) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.mark.parametrize(("args", "needle"), [
    (("frobnicate",), "No such command"),
    (("reassemble", "ws", "--max-gflop", "0.002"), "--max-gflops"),
    (("reassemble", "ws", "--max-gflops", "abc"), "--max-gflops"),
    (("finetune", "m1", "--data", "digits", "--epochs", "1.5"), "--epochs"),
    (("finetune",), "Missing argument"),
    (("demo", "--epochs", "0"), "--epochs"),
    (("similarity", "wc", "--data", "digits", "--samples", "-5"), "--samples"),
    (("similarity", "wc", "--data", "digits", "--samples", "0"), "--samples"),
    (("similarity", "wc", "--data", "digits", "--batch-size", "0"), "--batch-size"),
    (("reassemble", "ws", "--top", "0"), "--top"),
    (("reassemble", "ws", "--stages", "1"), "--stages"),
    (("partition", "ws", "--stages", "0"), "--stages"),
    (("finetune", "m1", "--data", "digits", "--batch-size", "0"), "--batch-size"),
    (("dissect", "--input-size", "0", "--models", "test_resnet", "--random-init"), "--input-size"),
    (("dissect", "--input-size", "-3", "--models", "test_resnet", "--random-init"), "--input-size"),
    (("finetune", "m1", "--data", "digits", "--lr", "-1", "--epochs", "1"), "--lr"),
    (("finetune", "m1", "--data", "digits", "--lr", "nan", "--epochs", "1"), "--lr"),
    (("reassemble", "ws", "--max-gflops", "-1", "--data", "digits"), "must be a positive number"),
    (("reassemble", "ws", "--max-gflops", "nan", "--data", "digits"), "must be a positive number"),
    (("baseline", "ws", "--max-gflops", "inf", "--data", "digits"), "must be a positive number"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, args, needle):
    res = run_cli(*args, cwd=tmp_path, check=False)
    _assert_one_error_line(res, needle)
    assert not any(tmp_path.iterdir())  # rejected before anything is written


def test_bare_command_shows_help():
    res = run_cli(check=False)
    assert res.returncode in (0, 2) and "Traceback" not in res.stdout + res.stderr
    assert "reassemble" in res.stdout + res.stderr


def test_help_shows_ranges_and_defaults():
    assert "x>=4" in run_cli("similarity", "--help").stdout
    assert "default: 6" in run_cli("demo", "--help").stdout


def test_config_validation_error_is_one_line(monkeypatch, capsys):
    """A pydantic ValidationError of a config (here: from deep inside finetune) is one line naming the field."""
    import surgery.training.finetune
    from surgery.cli import main
    from surgery.training.loop import TrainConfig

    monkeypatch.setattr(surgery.training.finetune, "finetune_model_dir", lambda *a, **k: TrainConfig(weight_decay=-1))
    with pytest.raises(SystemExit) as info:
        main(["finetune", "m1", "--data", "digits"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "weight_decay" in err and len(err.strip().splitlines()) == 1


def test_python_dash_m_surgery():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "surgery", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "reassemble" in proc.stdout


def test_costs_show_significant_digits():
    from surgery.cli import fmt_g, fmt_m

    assert fmt_g(2_290_000) == "0.002290"   # not "0.002" next to "over budget" for a 0.002 budget
    assert float(fmt_g(2_000_400, up=True)) > 0.002
    assert fmt_g(3456) == "0.000003456" and fmt_m(1234) == "0.001234"
    assert fmt_g(4_123_400_000) == "4.123" and fmt_m(25_557_032) == "25.56"


def test_dissect_progress_counts_each_model_once(tiny_workspace):
    res = run_cli("dissect", "--models", "test_resnet,test_vit", "--random-init", "--out", str(tiny_workspace))
    counters = re.findall(r"\[(\d+)/(\d+)\] (\w+)", res.stderr)
    assert counters == [("1", "2", "test_resnet"), ("2", "2", "test_vit")], res.stderr


def test_inspect_tiny_blocks_are_not_zero(tiny_workspace):
    manifest = Workspace(tiny_workspace).read_dissection("test_resnet")
    text = run_cli("inspect", str(tiny_workspace), "test_resnet").stdout
    smallest = min((b for b in manifest["blocks"] if b["macs"] > 0), key=lambda b: b["macs"])
    assert smallest["macs"] / 1e9 < 0.0005 and f"{smallest['macs'] / 1e9:.6f}" in text  # not 0.000


def test_budget_errors_speak_gflops(sim_workspace, tiny_workspace, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(sim_workspace, ws)
    # no --data: the target used is said on stderr (the README's two-command session relies on the default)
    res = run_cli("reassemble", str(ws), "--max-gflops", "0.000001", "--stages", "2", "--out", str(tmp_path / "m"),
                  check=False)
    assert "no --data: the target is digits" in res.stderr
    line = _assert_one_error_line(res, "GFLOPs", "smallest")
    assert "MACs" not in line and "max_macs" not in line
    assert not (tmp_path / "m").exists()
    base = run_cli("baseline", str(tiny_workspace), "--data", "digits", "--max-gflops", "0.000001", "--out",
                   str(tmp_path / "s"), check=False)
    line = _assert_one_error_line(base, "GFLOPs", "smallest needs")
    shown = float(re.search(r"smallest needs ([0-9.]+) GFLOPs", line).group(1))
    index = Workspace(tiny_workspace).read_index()
    assert shown >= min(m["macs"] for m in index["models"].values()) / 1e9 * 0.5
    assert not (tmp_path / "s").exists()


def test_baseline_over_budget_costs_read_over_budget(tiny_workspace, tmp_path):
    import math

    costs = run_cli("baseline", str(tiny_workspace), "--data", "digits", "--proxy", "params", "--out",
                    str(tmp_path / "all"), "--json").json()["models"]
    smallest = min(m["macs"] for m in costs)
    # a budget just under a model's cost, equal to it at 3 decimals: the old display read "0.102 ... over budget"
    over = max(costs, key=lambda m: m["macs"])
    budget = math.floor(over["macs"] / 1e6) / 1e3
    assert smallest / 1e9 <= budget < over["macs"] / 1e9
    res = run_cli("baseline", str(tiny_workspace), "--data", "digits", "--max-gflops", f"{budget:.3f}", "--proxy",
                  "params", "--out", str(tmp_path / "s"))
    rows = [ln for ln in res.stdout.splitlines() if "over budget" in ln]
    assert any(over["model"] in row for row in rows), res.stdout
    for row in rows:  # columns: rank, model, params (M), GFLOPs, proxy, note
        assert float(row.split("│")[4]) > budget, row
