"""The honest baseline (``surgery baseline``): the best single zoo model within a budget, with a new head."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from helpers import TINY_ZOO, run_cli

import surgery
import surgery.library
from surgery.assembled import headless, read_recipe
from surgery.baseline import cost_with_new_head
from surgery.count import count_params
from surgery.proxy import linear_probe_accuracy
from surgery.reassembly import _target_batches, _transform
from surgery.workspace import Workspace

DIGITS_CLASSES = 10


def _costs(ws_path) -> dict[str, tuple[int, int]]:
    ws = Workspace(ws_path)
    return {n: cost_with_new_head(ws.read_dissection(n), DIGITS_CLASSES) for n in TINY_ZOO}


def test_baseline_ranks_every_model_and_writes_the_best(tiny_workspace, tmp_path):
    from surgery.training.finetune import evaluate_model_dir

    out = tmp_path / "single"
    res = run_cli("baseline", str(tiny_workspace), "--data", "digits", "--out", str(out), "--json").json()
    models = res["models"]
    assert {m["model"] for m in models} == set(TINY_ZOO) and all(m["fits"] for m in models)
    scores = [m["proxy"] for m in models]
    assert scores == sorted(scores, reverse=True)
    assert res["best"]["model"] == models[0]["model"] and res["proxy"] == "linear"
    # the folder is an ordinary model folder: it loads, counts what was reported, evaluates
    model = surgery.load(out)
    recipe = read_recipe(out)
    assert {s["model"] for s in recipe["stages"]} == {res["best"]["model"]} and recipe["num_classes"] == 10
    assert count_params(model) == res["best"]["params"] == models[0]["params"]
    ev = evaluate_model_dir(out, "digits", split="val")
    assert ev["params"] == res["best"]["params"] and 0.0 <= ev["top1"] <= 1.0
    text = run_cli("baseline", str(tiny_workspace), "--data", "digits", "--out", str(tmp_path / "again")).stdout
    assert "best: written" in text and res["best"]["model"] in text


def test_baseline_with_budget_never_loads_models_over_it(tiny_workspace, tmp_path, monkeypatch):
    costs = _costs(tiny_workspace)
    macs = sorted(m for _, m in costs.values())
    budget = (macs[1] + macs[2]) / 2  # two models fit, two do not
    fitting = {n for n, (_, m) in costs.items() if m <= budget}
    loaded = []
    real = surgery.library.load_model_entry
    monkeypatch.setattr(surgery.library, "load_model_entry",
                        lambda ws, n, *a, **k: loaded.append(n) or real(ws, n, *a, **k))
    res = surgery.baseline(tiny_workspace, data="digits", max_gflops=budget / 1e9, out_dir=tmp_path / "s")
    assert set(loaded) == fitting  # the others' cost is known from their manifests
    by_name = {s.model: s for s in res.singles}
    for n, (p, m) in costs.items():
        assert (by_name[n].params, by_name[n].macs) == (p, m)
        assert by_name[n].fits == (n in fitting) and (by_name[n].proxy is None) == (n not in fitting)
    best = max(fitting, key=lambda n: by_name[n].proxy)
    assert res.best.stages[0].model == best and res.best.macs <= budget
    assert [s.model for s in res.singles[:2]] == sorted(fitting, key=lambda n: -by_name[n].proxy)


def test_baseline_of_one_model(tiny_workspace, tmp_path):
    out = tmp_path / "convnext"
    res = run_cli("baseline", str(tiny_workspace), "test_convnext", "--data", "digits", "--out", str(out),
                  "--json").json()
    assert [m["model"] for m in res["models"]] == ["test_convnext"] and res["best"]["model"] == "test_convnext"
    assert {s["model"] for s in read_recipe(out)["stages"]} == {"test_convnext"}


def test_baseline_bad_input_is_one_line_exit_2(tiny_workspace, tmp_path):
    cheapest = min(m for _, m in _costs(tiny_workspace).values())
    res = run_cli("baseline", str(tiny_workspace), "--data", "digits", "--max-gflops", "0.000001", "--out",
                  str(tmp_path / "none"), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "smallest" in res.stderr and f"{cheapest / 1e9:.4f}" in res.stderr
    assert not (tmp_path / "none").exists()
    for args in (("--out", str(tmp_path / "x")), ("no_such_model", "--data", "digits")):
        res = run_cli("baseline", str(tiny_workspace), *args, check=False)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr


def test_default_proxy_is_the_linear_probe(tiny_workspace):
    # measured: the linear probe predicts fine-tuned accuracy better than LogME (README transfer benchmark)
    from surgery.cli import reassemble as reassemble_cmd
    from surgery.reassembly import reassemble

    assert inspect.signature(reassemble).parameters["proxy"].default == "linear"
    assert inspect.signature(reassemble_cmd).parameters["proxy"].default == "linear"
    res = surgery.baseline(tiny_workspace, "test_vit", data="digits")
    assert res.proxy == "linear"
    ws = Workspace(tiny_workspace)
    _, manifest, model = surgery.library.load_model_entry(ws, "test_vit")
    images, labels, _ = _target_batches("digits", 0, 256)
    with torch.inference_mode():
        feats = headless(model)(_transform(manifest)(images))
    assert res.best.proxy == pytest.approx(linear_probe_accuracy(feats, labels))
    assert json.loads(json.dumps(res.summary()))["best"]["proxy"] == pytest.approx(res.best.proxy)
