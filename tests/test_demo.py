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

from surgery.demo import summary_table, verdict
from zoo.mini import MINI_THREADS


def _summary() -> dict:
    rows = [
        {"method": "reassembled", "models": "convnext-fm59 > resnet10t-fm04 > efficientnet-fmall",
         "params": 1_242_000, "macs": 4.9e6, "val_top1_before": 0.846, "val_top1": 0.93, "test_top1": 0.944},
        {"method": "aligned", "models": "convnext-fm59 > resnet10t-fm04 > efficientnet-fmall",
         "params": 1_242_000, "macs": 4.9e6, "val_top1_before": 0.846, "val_top1": 0.95, "test_top1": 0.961},
        {"method": "single: efficientnet-fmall", "models": "efficientnet-fmall", "params": 775_000,
         "macs": 1.9e6, "val_top1_before": 0.797, "val_top1": 0.93, "test_top1": 0.930},
        {"method": "single: regnetx-fm04", "models": "regnetx-fm04", "params": 2_319_000,
         "macs": 4.1e6, "val_top1_before": 0.60, "val_top1": 0.85, "test_top1": 0.855},
    ]
    n = 360
    return {"target": "digits", "budget_gflops": 0.0064, "epochs": 6, "rows": rows,
            "best_single": "single: efficientnet-fmall", "test_images": n, "verdict": verdict(rows[0], rows[2], n),
            "verdict_aligned": verdict(rows[1], rows[2], n, label="aligned")}


def test_summary_table_fits_80_columns_without_cutting_names():
    console = Console(width=80, record=True)
    console.print(summary_table(_summary()))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    for name in ("convnext-fm59", "resnet10t-fm04", "efficientnet-fmall", "reassembled", "aligned", "best single"):
        assert name in text
    assert "regnetx-fm04" not in text  # only the best single model is shown
    assert "94.4" in text and "93.0" in text and "96.1" in text
    assert "smoke-test" not in text
    # The verdict line: test split size and the difference in images, with its noise yardstick.
    assert "on 360 test images: +5 images" in " ".join(text.split())
    assert "within noise" in " ".join(text.split())
    assert "aligned 96.1% vs best single 93.0% on 360 test images: +11 images" in " ".join(text.split())


def test_verdict_counts_images_and_reads_them_against_binomial_noise():
    n = 360
    same = verdict({"test_top1": 300 / n}, {"test_top1": 295 / n}, n)
    assert same["test_images"] == n and same["difference_images"] == 5
    # One SE of a difference of two accuracies near 83% on 360 images is about 10 images; 2 SE about 20.
    assert 15 < same["noise_images"] < 25 and same["within_noise"]
    assert "+5 images" in same["text"] and f"{n} test images" in same["text"] and "no winner" in same["text"]
    far = verdict({"test_top1": 300 / n}, {"test_top1": 250 / n}, n)
    assert far["difference_images"] == 50 and not far["within_noise"] and "reassembly wins" in far["text"]
    worse = verdict({"test_top1": 250 / n}, {"test_top1": 300 / n}, n)
    assert worse["difference_images"] == -50 and "reassembly loses" in worse["text"]
    # More test images, less noise: the same 1.4-point gap is beyond noise on a 36,000-image split.
    big = verdict({"test_top1": 0.944}, {"test_top1": 0.930}, 100 * n)
    assert big["difference_images"] == 504 and not big["within_noise"]
    alone = verdict({"test_top1": 0.9}, None, n)
    assert alone["difference_images"] is None and "no single zoo model" in alone["text"]


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
    assert rows[0]["method"] == "reassembled" and rows[1]["method"] == "aligned" and len(rows) >= 3
    for row in rows:
        assert row["macs"] <= budget * (1 + 1e-9), row
        assert 0.0 <= row["test_top1"] <= 1.0 and 0.0 <= row["val_top1"] <= 1.0
    singles = [r for r in rows if r["method"].startswith("single: ")]
    assert summary["best_single"] == max(singles, key=lambda r: r["val_top1"])["method"]
    assert set(summary["timings"]) == {"mini-zoo", "dissect", "similarity+partition", "reassemble", "singles",
                                       "finetune"}
    assert (out / "reassembled" / "model.safetensors").exists() and (out / "reassembled" / "finetune.json").exists()
    assert (out / "mini-zoo-quick" / "mini-zoo.yaml").exists()
    assert (out / "aligned" / "align" / "align.json").exists()
    assert summary["verdict_aligned"]["text"].startswith("aligned ")
    # The verdict in images on the real test split, and what decides the numbers.
    v = summary["verdict"]
    assert v["test_images"] == summary["test_images"] > 0
    best = next(r for r in singles if r["method"] == summary["best_single"])
    assert v["difference_images"] == round(rows[0]["test_top1"] * v["test_images"]) - round(
        best["test_top1"] * v["test_images"])
    assert f"{v['test_images']} test images" in v["text"]
    assert summary["numerics"]["threads"] == MINI_THREADS
    assert set(summary["zoo_weights_sha256"]) >= {r["method"].removeprefix("single: ") for r in singles}


def test_similarity_cache_check_survives_a_corrupt_manifest(tmp_path):
    from surgery.demo import similarity_cached

    path = tmp_path / "similarity.json"
    assert not similarity_cached(path, 1000)  # missing
    path.write_text('{"settings": {"samples": 1000}')  # cut short
    assert not similarity_cached(path, 1000)
    path.write_text('[1, 2]')  # valid JSON, wrong shape
    assert not similarity_cached(path, 1000)
    path.write_text(json.dumps({"settings": {"samples": 200}}))
    assert not similarity_cached(path, 1000)
    path.write_text(json.dumps({"settings": {"samples": 1000}}))
    assert similarity_cached(path, 1000)
