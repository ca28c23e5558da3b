"""End to end through the CLI: dissect -> similarity -> partition -> reassemble -> finetune -> evaluate -> load,
and the honest baseline (best single model within the budget) beside it.

A tiny zoo of timm ``test_*`` models is trained for a few steps on digits in a session fixture (so
the blocks are not random), saved as safetensors and described by a zoo file, the way a user's own
checkpoints would be. Each command runs as a user would run it, into a temporary folder, and the
test asserts on what it writes.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
import yaml
from helpers import run_cli

import surgery
from surgery.assembled import read_recipe
from surgery.count import count_macs, count_params
from zoo.data import load_split, make_loader, make_transform
from zoo.entries import save_weights

ZOO = ["test_resnet", "test_vit", "test_convnext"]


@pytest.fixture(scope="session")
def trained_zoo(tmp_path_factory):
    """Three tiny timm models trained for a few steps on digits, registered in a zoo file."""
    folder = tmp_path_factory.mktemp("zoo")
    data = load_split("digits", "train", seed=0)
    entries = []
    for i, name in enumerate(ZOO):
        torch.manual_seed(i)
        model = timm.create_model(name, pretrained=False, num_classes=10)
        cfg = timm.data.resolve_data_config({}, model=model)
        loader = make_loader(data, 64, shuffle=True, seed=i,
                             transform=make_transform(cfg["input_size"], cfg["mean"], cfg["std"]))
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        model.train()
        for step, (x, y) in enumerate(loader):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 5:
                break
        model.eval()
        save_weights(model, folder / f"{name}.safetensors")
        entries.append({"name": name, "weights": f"{name}.safetensors", "model_kwargs": {"num_classes": 10}})
    path = folder / "zoo.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


def test_cli_chain(trained_zoo, tmp_path):
    ws = tmp_path / "ws"
    res = run_cli("dissect", "--zoo", str(trained_zoo), "--out", str(ws), "--json")
    assert {m["status"] for m in res.json()["models"]} == {"ok"}

    res = run_cli("similarity", str(ws), "--data", "digits", "--samples", "240", "--batch-size", "60", "--json")
    sim = res.json()
    assert sim["samples"] == 240 and set(sim["models"]) == set(ZOO)
    assert (ws / "similarity" / "cka.safetensors").exists()

    # the default balance: 0.2, relaxed per model where a model cannot meet it (resnet at K = 3)
    res = run_cli("partition", str(ws), "--stages", "3", "--json")
    part = res.json()
    assert len(part["sets"]) == 3 and all(len(s["members"]) == len(ZOO) for s in part["sets"])
    assert (ws / "partition" / "stages.png").exists()
    assert len(list((ws / "partition").glob("cka_*.png"))) == 3
    for m in part["models"].values():  # the balance limit each model is held to holds
        assert m["eps_used"] >= 0.2 and m["eps_relaxed"] == (m["eps_used"] > 0.2)
        assert max(b["macs"] for b in m["stage_blocks"]) <= (1 + m["eps_used"]) * m["total_macs"] / 3 + 1

    index = json.loads((ws / "workspace.json").read_text())
    budget = sorted(m["macs"] for m in index["models"].values())[1] / 1e9
    model_dir = tmp_path / "model"
    res = run_cli("reassemble", str(ws), "--max-gflops", f"{budget:.6f}", "--data", "digits", "--top", "3",
                  "--out", str(model_dir), "--json")
    ranked = res.json()["ranked"]
    assert ranked and all(r["macs"] <= budget * 1e9 for r in ranked)
    assert res.json()["proxy"] == "linear"  # the default, by the transfer benchmark's measurement
    single = res.json()["best_single"]  # listed next to the chosen chain, same budget and proxy
    fitting = [z for z in res.json()["zoo"] if z["macs"] <= budget * 1e9]
    assert single["fits"] and single["macs"] <= budget * 1e9
    assert single["proxy"] == max(z["proxy"] for z in fitting)
    for name in ("config.json", "model.safetensors", "README.md", "pareto.png"):
        assert (model_dir / name).exists(), name

    # the saved model reloads without the zoo's checkpoints, counts what was budgeted, exports
    recipe = read_recipe(model_dir)
    model = surgery.load(model_dir)
    x = torch.randn(2, *recipe["input_size"])
    assert count_params(model) == ranked[0]["params"]
    assert abs(count_macs(model, x[:1]) - ranked[0]["macs"]) <= 0.01 * ranked[0]["macs"]
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), model(x), atol=1e-5)

    res = run_cli("finetune", str(model_dir), "--data", "digits", "--epochs", "1", "--json")
    ft = res.json()
    assert 0.0 <= ft["test_top1"] <= 1.0 and len(ft["history"]) == 1
    res = run_cli("evaluate", str(model_dir), "--data", "digits", "--json")
    ev = res.json()
    assert ev["n"] > 0 and ev["params"] == ranked[0]["params"]
    assert ev["top1"] == pytest.approx(ft["test_top1"], abs=1e-6)

    # the honest baseline under the same budget: the single model reassemble listed, as a model folder
    single_dir = tmp_path / "single"
    res = run_cli("baseline", str(ws), "--data", "digits", "--max-gflops", f"{budget:.6f}", "--out", str(single_dir),
                  "--json")
    base = res.json()
    assert base["best"]["model"] == single["model"] and base["best"]["proxy"] == pytest.approx(single["proxy"])
    assert base["best"]["macs"] <= budget * 1e9
    ft = run_cli("finetune", str(single_dir), "--data", "digits", "--epochs", "1", "--json").json()
    assert 0.0 <= ft["test_top1"] <= 1.0
    assert count_params(surgery.load(single_dir)) == base["best"]["params"]


def test_infeasible_budget_is_one_line(trained_zoo, tmp_path):
    ws = tmp_path / "ws"
    run_cli("dissect", "--zoo", str(trained_zoo), "--out", str(ws), "--json")
    run_cli("similarity", str(ws), "--data", "digits", "--samples", "120", "--batch-size", "60", "--json")
    run_cli("partition", str(ws), "--stages", "2", "--eps", "1.0", "--no-plots", "--json")
    res = run_cli("reassemble", str(ws), "--max-gflops", "0.000001", "--data", "digits", "--out",
                  str(tmp_path / "m"), check=False)
    assert res.returncode == 2
    assert "smallest" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "m").exists()
