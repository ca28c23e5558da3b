"""``surgery demo`` (``make demo``): the whole pipeline on the pretrained mini-zoo, measured honestly.

1. the mini-zoo (small timm models of seven families trained here on Fashion-MNIST source tasks;
   built once, then cached);
2. dissect, similarity (Fashion-MNIST probe images), partition into K stages;
3. reassemble under a MAC budget for a target task no zoo model was trained on (scikit-learn's
   digits, upsampled to 32x32);
4. the strongest honest alternative: every single zoo model that fits the same budget, given a
   new head the same way; the best one by validation accuracy after fine-tuning;
5. both fine-tuned with the same recipe; one table: params, GFLOPs, held-out test accuracy.

Nothing here is tuned on the test split: the chain is picked by the program and a training-free
proxy, the baseline by validation accuracy.

Reproducibility: everything runs with :data:`zoo.mini.MINI_THREADS` intra-op threads whatever the
core count, and ``demo.json`` records what else decides the floats (torch version, CPU kernels,
the zoo's weight checksums; :func:`surgery.minizoo.numerics`). Same record, same numbers, bit for
bit; another CPU sums in another order and moves accuracies by a few test images, which is why the
verdict states the test split's size and the difference in images beside a binomial yardstick.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from surgery.errors import WorkspaceError
from surgery.workspace import json_text, read_json

TARGET = "digits"
PROBE = "fashion-mnist"


def similarity_cached(sim_path: Path, samples: int) -> bool:
    """Whether the demo's similarity manifest exists, reads, and was made on ``samples`` probe images.

    A missing or unreadable manifest is not an error here: the folder is the demo's own, so the step is
    simply recomputed (and the bad file replaced).
    """
    try:
        return read_json(sim_path, what="similarity manifest")["settings"].get("samples") == samples
    except (WorkspaceError, KeyError, TypeError, AttributeError):
        return False


def run_demo(out: Path, *, quick: bool = False, as_json: bool = False, console: Console | None = None,
             epochs: int | None = None, stages: int = 3, seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Run the demo into ``out`` and print (or return) the comparison table.

    Args:
        out: folder for the workspace and the models (reused: finished steps are skipped).
        quick: a tiny smoke run (quick mini-zoo, few samples, 1 epoch).
        as_json: print JSON instead of tables.
        console: where to print.
        epochs: fine-tuning epochs for both contenders (default 6, 1 with ``quick``).
        stages: K equivalence sets.
        seed: seed of every draw.
        threads: intra-op threads for the whole run (default :data:`zoo.mini.MINI_THREADS`): the
            count changes the numbers, so it follows the recipe, not the machine's cores.
    """
    from surgery.minizoo import pinned_threads
    from zoo.mini import MINI_THREADS

    threads = MINI_THREADS if threads is None else threads
    with pinned_threads(threads):
        return _run_demo(out, quick=quick, as_json=as_json, console=console, epochs=epochs, stages=stages,
                         seed=seed, threads=threads)


def _run_demo(out: Path, *, quick: bool, as_json: bool, console: Console | None, epochs: int | None, stages: int,
              seed: int, threads: int) -> dict[str, Any]:
    from surgery.equivalence import run_partition
    from surgery.library import dissect_zoo
    from surgery.minizoo import CARDS_FILE, build_mini_zoo, numerics
    from surgery.reassembly import reassemble, single_model
    from surgery.similarity import compute_similarity
    from surgery.training.align_run import align
    from surgery.training.finetune import evaluate_model_dir, finetune_model_dir
    from surgery.workspace import Workspace
    from zoo.data import load_split
    from zoo.entries import resolve_zoo

    console = console or Console()
    say = (lambda msg: None) if as_json else (lambda msg: console.print(msg, highlight=False))
    epochs = epochs if epochs is not None else (1 if quick else 6)
    out = Path(out)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        say(f"  {name}: {timings[name]:.1f} s")

    t0 = time.perf_counter()
    say("[1/6] mini-zoo (trained once, then cached)")
    zoo_path = build_mini_zoo(out / "mini-zoo-quick" if quick else None, quick=quick, quiet=as_json, threads=threads)
    step("mini-zoo", t0)

    t0 = time.perf_counter()
    say("[2/6] dissect")
    ws = Workspace(out / "workspace")
    results = dissect_zoo(resolve_zoo(str(zoo_path)), ws)
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        say(f"  {r.name}: failed: {r.reason}")
    step("dissect", t0)

    t0 = time.perf_counter()
    say(f"[3/6] similarity on {PROBE} and partition into {stages} stages")
    samples = 200 if quick else 1000
    sim_path = ws.root / "similarity" / "similarity.json"
    if not similarity_cached(sim_path, samples):
        compute_similarity(ws.root, PROBE, samples=samples, seed=seed)
    part = run_partition(ws.root, stages, seed=seed)
    step("similarity+partition", t0)

    # budget: the median zoo model's MACs, so that some zoo models fit and some do not
    macs = sorted(ws.read_index()["models"][n]["macs"] for n in part["models"])
    budget_g = macs[len(macs) // 2] / 1e9
    t0 = time.perf_counter()
    say(f"[4/6] reassemble for {TARGET} under {budget_g:.4f} GFLOPs")
    result = reassemble(ws.root, max_gflops=budget_g, data=TARGET, top=3 if quick else 5, seed=seed,
                        out_dir=out / "reassembled", log=say)
    best = result.ranked[0]
    # the aligned contender starts from the same reassembled folder, copied before fine-tuning changes it
    shutil.rmtree(out / "aligned", ignore_errors=True)
    shutil.copytree(out / "reassembled", out / "aligned", ignore=shutil.ignore_patterns("finetune*", "align"))
    step("reassemble", t0)

    t0 = time.perf_counter()
    say("[5/6] single zoo models within the same budget (new head, same recipe)")
    singles = []
    for name in part["models"]:
        folder = out / "single" / name
        ranked = single_model(ws.root, name, TARGET, seed=seed, out_dir=folder)
        if ranked.macs <= budget_g * 1e9:
            singles.append((name, folder, ranked))
    step("singles", t0)

    t0 = time.perf_counter()
    say(f"[6/6] fine-tune everything for {epochs} epochs on {TARGET}, then align the reassembled model "
        "(teacher: the best single)")
    rows = []
    contenders = [("reassembled", out / "reassembled", best)] + [(f"single: {n}", f, r) for n, f, r in singles]
    folders = {}

    def add_row(label: str, ranked, before: float, ft: dict[str, Any]) -> None:
        rows.append({"method": label, "models": " > ".join(dict.fromkeys(s.model for s in ranked.stages)),
                     "params": ranked.params, "macs": ranked.macs, "val_top1_before": before,
                     "val_top1": ft["best_val_acc"], "test_top1": ft["test_top1"]})
        say(f"  {label}: val {ft['best_val_acc']:.4f}, test {ft['test_top1']:.4f}")

    for label, folder, ranked in contenders:
        before = evaluate_model_dir(folder, TARGET, split="val", seed=seed)["top1"]
        add_row(label, ranked, before, finetune_model_dir(folder, TARGET, epochs=epochs, seed=seed, quiet=True))
        folders[label] = folder
    single_rows = [r for r in rows if r["method"].startswith("single")]
    best_single = max(single_rows, key=lambda r: r["val_top1"]) if single_rows else None
    # aligned: the reassembled model (before fine-tuning) incubated and fine-tuned for the same total epochs
    # (a tenth in MT), distilling from the fine-tuned best single model on labelled and unlabelled images
    teacher = str(folders[best_single["method"]]) if best_single else None
    before = rows[0]["val_top1_before"]  # the aligned copy holds the reassembled weights: already evaluated
    mt = max(1, round(epochs / 10))
    p = align(out / "aligned", TARGET, epochs=(mt, epochs - mt), teacher=teacher, seed=seed, quiet=True)["phases"]
    add_row("aligned", best, before, {"best_val_acc": max(p["final"]["val_acc"], p.get("ft", {}).get("val_acc_best")
                                                          or 0.0), "test_top1": p["final"]["test_acc"]})
    rows.insert(1, rows.pop())
    step("finetune", t0)
    # finetune_model_dir evaluates on this split (same spec and seed): its size turns accuracies into images.
    test_images = len(load_split(TARGET, "test", seed=seed))
    cards = json.loads((zoo_path.parent / CARDS_FILE).read_text())["models"]
    summary = {"budget_gflops": budget_g, "target": TARGET, "epochs": epochs, "stages": stages, "quick": quick,
               "rows": rows, "best_single": best_single["method"] if best_single else None,
               "test_images": test_images, "verdict": verdict(rows[0], best_single, test_images),
               "verdict_aligned": verdict(rows[1], best_single, test_images, label="aligned"),
               "aligned_teacher": best_single["method"].removeprefix("single: ") if best_single else None,
               # What decides the floats: two runs with the same record give the same table bit for bit.
               "numerics": numerics(), "zoo_weights_sha256": {n: c["weights_sha256"] for n, c in cards.items()},
               "timings": timings, "total_seconds": round(time.perf_counter() - t_start, 1)}
    (out / "demo.json").write_text(json_text(summary) + "\n")
    if as_json:
        print(json_text(summary))
        return summary
    console.print(summary_table(summary))
    console.print(f"single models within budget: {len(single_rows)}; details in {out / 'demo.json'}; "
                  f"total {summary['total_seconds']:.0f} s")
    return summary


def verdict(reassembled: dict[str, Any], best_single: dict[str, Any] | None, test_images: int,
            label: str = "reassembled") -> dict[str, Any]:
    """Reassembled vs best single on the test split, in images, against a binomial yardstick.

    The yardstick is two standard errors of a difference of two accuracies measured on ``n`` images,
    ``2 * sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n)``: the spread that sampling ``n`` test images alone
    gives. Retraining on another machine (other float summation order) or with another seed moves
    each accuracy by about that much (README), so a smaller difference is not a finding.

    Returns:
        ``{"test_images", "reassembled_top1", "best_single_top1", "difference_images", "noise_images",
        "yardstick", "within_noise", "text"}``; ``difference_images`` and ``within_noise`` are None
        without a single model in the budget. ``label`` names the contender in the text (the aligned
        model is read the same way).
    """
    n = test_images
    a = reassembled["test_top1"]
    yardstick = "2 binomial standard errors of the difference of two accuracies on the test images"
    if best_single is None:
        return {"test_images": n, "reassembled_top1": a, "best_single_top1": None, "difference_images": None,
                "noise_images": None, "yardstick": yardstick, "within_noise": None,
                "text": f"{label} {100 * a:.1f}% on {n} test images; no single zoo model fits the budget"}
    b = best_single["test_top1"]
    diff = round(a * n) - round(b * n)  # top-1 is correct / n, so these are the images each got right
    noise = 2 * math.sqrt(a * (1 - a) / n + b * (1 - b) / n) * n
    within = abs(diff) <= noise
    who = "reassembly" if label == "reassembled" else label
    reading = "no winner" if within else f"{who} {'wins' if diff > 0 else 'loses'}"
    text = (f"{label} {100 * a:.1f}% vs best single {100 * b:.1f}% on {n} test images: {diff:+d} images, "
            f"{'within' if within else 'beyond'} noise (2 binomial SE = {noise:.0f} images): {reading}")
    return {"test_images": n, "reassembled_top1": a, "best_single_top1": b, "difference_images": diff,
            "noise_images": round(noise, 1), "yardstick": yardstick, "within_noise": within, "text": text}


def summary_table(summary: dict[str, Any]) -> Table:
    """The demo's result table (reassembled vs the best single model) from a ``demo.json`` summary.

    The caption is the verdict (:func:`verdict`) when the summary has one.
    """
    rows = summary["rows"]
    notes = []
    for key in ("verdict", "verdict_aligned"):
        if summary.get(key):
            notes.append(summary[key]["text"])
    if summary.get("quick"):
        notes.append("--quick: smoke-test zoo trained on a few hundred images, accuracies mean nothing")
    table = Table(title=f"{summary['target']}: reassembled vs the best single zoo model within "
                        f"{summary['budget_gflops']:.4f} GFLOPs, all trained {summary['epochs']} "
                        f"epoch{'s' if summary['epochs'] != 1 else ''} "
                        "with one recipe (aligned: incubated, then distilled from the best single; "
                        "top-1 %)",
                  caption="\n".join(notes) or None)
    table.add_column("method", no_wrap=True)
    table.add_column("blocks from", no_wrap=True)
    for col in ("M params", "GFLOPs", "val (no FT)", "val", "test"):
        table.add_column(col, justify="right")
    shown = [rows[0]] + [r for r in rows if r["method"] == "aligned"] + [
        r for r in rows if r["method"] == summary["best_single"]]
    for r in shown:
        label = "best single" if r["method"] == summary["best_single"] else r["method"]
        # one source model per line keeps the table within 80 columns without cutting names
        table.add_row(label, r["models"].replace(" > ", " >\n"), f"{r['params'] / 1e6:.3f}", f"{r['macs'] / 1e9:.4f}",
                      f"{100 * r['val_top1_before']:.1f}", f"{100 * r['val_top1']:.1f}",
                      f"{100 * r['test_top1']:.1f}")
    return table
