"""``surgery demo``: the table renders within 80 columns, and a quick run writes a coherent summary.

The quick run trains the seven mini-zoo models on a few hundred Fashion-MNIST images for one epoch
(smoke-test weights), so its accuracies say nothing; the test asserts on what the orchestration
wrote: the budget is respected by every contender, the best single model is the best by validation
accuracy, and the table names the contenders.
"""

from __future__ import annotations

import json

import pytest
from helpers import run_cli
from rich.console import Console
from test_minizoo import needs_fashion_mnist

from surgery.demo import summary_table


def _summary() -> dict:
    rows = [
        {"method": "reassembled", "models": "convnext-fm59 > resnet10t-fm04 > efficientnet-fmall",
         "params": 1_242_000, "macs": 4.9e6, "val_top1_before": 0.846, "val_top1": 0.93, "test_top1": 0.944},
        {"method": "single: efficientnet-fmall", "models": "efficientnet-fmall", "params": 775_000,
         "macs": 1.9e6, "val_top1_before": 0.797, "val_top1": 0.93, "test_top1": 0.930},
        {"method": "single: regnetx-fm04", "models": "regnetx-fm04", "params": 2_319_000,
         "macs": 4.1e6, "val_top1_before": 0.60, "val_top1": 0.85, "test_top1": 0.855},
    ]
    return {"target": "digits", "budget_gflops": 0.0064, "epochs": 6, "rows": rows,
            "best_single": "single: efficientnet-fmall"}


def test_summary_table_fits_80_columns_without_cutting_names():
    console = Console(width=80, record=True)
    console.print(summary_table(_summary()))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    for name in ("convnext-fm59", "resnet10t-fm04", "efficientnet-fmall", "reassembled", "best single"):
        assert name in text
    assert "regnetx-fm04" not in text  # only the best single model is shown
    assert "94.4" in text and "93.0" in text
    assert "smoke-test" not in text


def test_quick_summary_table_says_its_accuracies_mean_nothing():
    console = Console(width=80, record=True)
    console.print(summary_table({**_summary(), "quick": True, "epochs": 1}))
    text = console.export_text()
    assert "smoke-test" in text and "1 epoch " in text


@needs_fashion_mnist
@pytest.mark.slow
def test_quick_demo_writes_a_coherent_summary(tmp_path):
    out = tmp_path / "demo"
    summary = run_cli("demo", "--quick", "--out", str(out), "--json", "--epochs", "1", timeout=900).json()
    assert summary == json.loads((out / "demo.json").read_text())
    budget = summary["budget_gflops"] * 1e9
    rows = summary["rows"]
    assert rows[0]["method"] == "reassembled" and len(rows) >= 2
    for row in rows:
        assert row["macs"] <= budget * (1 + 1e-9), row
        assert 0.0 <= row["test_top1"] <= 1.0 and 0.0 <= row["val_top1"] <= 1.0
    singles = rows[1:]
    assert summary["best_single"] == max(singles, key=lambda r: r["val_top1"])["method"]
    assert set(summary["timings"]) == {"mini-zoo", "dissect", "similarity+partition", "reassemble", "singles",
                                       "finetune"}
    assert (out / "reassembled" / "model.safetensors").exists() and (out / "reassembled" / "finetune.json").exists()
    assert (out / "mini-zoo-quick" / "mini-zoo.yaml").exists()
