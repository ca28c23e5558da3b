"""Benchmark: progressive growth (AutoProg, MoGrow) of a DeiT-Tiny-like ViT on Fashion-MNIST.

Usage::

    .venv/bin/python benchmarks/growth.py [--seeds 0 1 2] [--epochs 12] [--per-class 200] [--workers 2]
        [--variants full copy mogrow random auto depth resolution short auto_depth depth_quarter]
        [--work ~/.cache/surgery/growth-bench]
        [--report-only] [--out benchmarks/results] [--name growth]

What it runs (every run is ``surgery.grow`` itself, resumable: a finished run is skipped):

* the model: timm's ``vit_tiny_patch16_224`` with patch 4 at 28 px (7 x 7 tokens), width 192,
  3 heads, depth 12 (DeiT-Tiny's body), ``dynamic_img_size`` (position embeddings resampled per
  resolution), random init;
* data: Fashion-MNIST, ``--per-class`` images per class in every pool (train 90% / val 10% of the
  train pool, and as many test images per class);
* the same epochs, batch 64, AdamW lr 1e-3 (warm-up + one cosine over all epochs), label smoothing
  0.1, EMA, for every variant:
  - ``full``: the full model at full resolution throughout (``stages=1``: plain training in the same loop);
  - ``copy`` / ``mogrow`` / ``random`` / ``zero``: the manual progressive schedule, 4 stages (depth
    6/8/10/12, resolution 16/20/24/28), new blocks copied from the live weights, MoGrow (from the
    EMA), re-initialised, or copied with a zeroed residual branch (function-preserving); optimizer
    moments carried;
  - ``auto``: AutoProg (MoGrow, a 1-epoch supernet search at the start of stages 1-3, counted in the
    budget, losses over 5 training batches);
  - ``depth`` / ``resolution``: the manual schedule growing one axis only (where the cost and the
    accuracy go); ``depth_quarter``: depth only from a quarter of the depth (3/6/9/12, at 28 px);
    ``auto_depth``: AutoProg searching depth only, at full resolution;
  - ``short``: the full model for 60% of the epochs (about the manual schedules' wall time: the
    equal-cost alternative).
* ``--workers`` runs at once, one thread each (the executor's setting), variants interleaved so that
  every variant meets the same load. Wall time is the training's own (epochs, search, measurements),
  not the test evaluation.

Writes ``OUT/NAME.md`` and ``OUT/NAME.png`` (test top-1 against training wall time). Goal from the
issue: at least 1.5x faster than ``full`` at no more than 0.3 points less accuracy; MoGrow's advantage
over the other initialisations shown, or its absence stated.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = {"arch": "vit_tiny_patch16_224",
         "model_kwargs": {"patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 3}}
SIZE = 28
VARIANTS = {
    "full": {"stages": 1},
    "copy": {"init": "copy"},
    "mogrow": {"init": "mogrow"},
    "random": {"init": "random"},
    "zero": {"init": "zero"},
    "auto": {"schedule": "auto", "init": "mogrow", "search_batches": 5},
    "depth": {"init": "mogrow", "resolution_start": 1.0},
    "depth_quarter": {"init": "mogrow", "resolution_start": 1.0, "depth_start": 0.25},
    "resolution": {"init": "mogrow", "depth_start": 1.0},
    "short": {"stages": 1, "epoch_fraction": 0.6},
    "auto_depth": {"schedule": "auto", "init": "mogrow", "search_batches": 5, "resolution_start": 1.0},
}
LABELS = {"full": "full model throughout", "copy": "manual, copy live weights", "mogrow": "manual, MoGrow (EMA)",
          "random": "manual, random new blocks", "zero": "manual, zero-residual copies (function-preserving)",
          "auto": "AutoProg (MoGrow)", "depth": "manual, depth only (MoGrow)",
          "resolution": "manual, resolution only",
          "depth_quarter": "manual, depth only from 1/4 (MoGrow)", "short": "full model, 60% of the epochs",
          "auto_depth": "AutoProg, depth only (MoGrow)"}


def run_folder(work: Path, variant: str, seed: int) -> Path:
    return work / f"{variant}-seed{seed}"


def one_run(work: str, variant: str, seed: int, epochs: int, per_class: int) -> dict:
    """A benchmark job (module level: the process pool imports it)."""
    from surgery.training.grow_run import grow

    t0 = time.time()
    options = {"stages": 4, **VARIANTS[variant]}
    epochs = max(1, round(epochs * options.pop("epoch_fraction", 1.0)))
    manifest = grow(MODEL, f"fashion-mnist:per_class={per_class}", out=run_folder(Path(work), variant, seed),
                    epochs=epochs, input_size=SIZE, batch_size=64, lr=1e-3, seed=seed, quiet=True, **options)
    res = manifest["result"]
    print(f"[{time.strftime('%H:%M:%S')}] {variant} seed {seed}: test top-1 {res['top1']:.4f} (EMA "
          f"{res['ema_top1']:.4f}), training {res['wall_s']:.0f} s ({time.time() - t0:.0f} s with evaluation)",
          flush=True)
    return manifest


def mean_sd(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(args, runs: dict) -> str:
    lines = [
        "# Progressive growth on Fashion-MNIST (`surgery grow`)",
        "",
        f"Command: `.venv/bin/python benchmarks/growth.py {' '.join(sys.argv[1:])}`",
        "",
        f"DeiT-Tiny-like ViT (timm `vit_tiny_patch16_224`, patch 4 at {SIZE} px, width 192, depth 12, random "
        f"init), Fashion-MNIST with {args.per_class} images per class in each pool ({9 * args.per_class} train, "
        f"{args.per_class} val, {10 * args.per_class} test images), {args.epochs} epochs for every variant (but "
        f"`short`: {max(1, round(0.6 * args.epochs))}), batch 64, "
        f"AdamW lr 1e-3, one warm-up + cosine schedule, EMA; seeds {' '.join(map(str, args.seeds))}; "
        f"{args.workers} runs at once, one thread each. Manual schedule: 4 stages, depth 6/8/10/12, resolution "
        "16/20/24/28 (the last column gives every run's stages). Speed-up and Δ are per seed against `full`, "
        "then averaged.",
        "",
        "| variant | test top-1 % | EMA test top-1 % | Δ vs full (points) | training wall (s) | speed-up | "
        "stages (depth@resolution) |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {s: runs[("full", s)] for s in args.seeds if ("full", s) in runs}
    for variant in args.variants:
        ms = {s: runs[(variant, s)] for s in args.seeds if (variant, s) in runs}
        if not ms:
            continue
        acc = [100 * m["result"]["top1"] for m in ms.values()]
        ema = [100 * m["result"]["ema_top1"] for m in ms.values()]
        wall = [m["result"]["wall_s"] for m in ms.values()]
        paired = [s for s in ms if s in base]
        delta = [100 * (ms[s]["result"]["top1"] - base[s]["result"]["top1"]) for s in paired]
        speed = [base[s]["result"]["wall_s"] / ms[s]["result"]["wall_s"] for s in paired]
        shapes = sorted({", ".join(f"{'/'.join(map(str, st['depths']))}@{st['resolution']}" for st in m["stages"])
                         for m in ms.values()})
        lines.append(f"| {LABELS[variant]} | {mean_sd(acc)} | {mean_sd(ema)} | "
                     f"{mean_sd(delta) if variant != 'full' else '-'} | {mean_sd(wall, 0)} | "
                     f"{mean_sd(speed) + 'x' if variant != 'full' else '1x'} | {'; '.join(shapes)} |")
    return "\n".join(lines) + "\n"


def plot(args, runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    markers = dict(zip(VARIANTS, "osD^vPX*hd<", strict=True))
    for variant in args.variants:
        pts = [(m["result"]["wall_s"], 100 * m["result"]["top1"]) for (v, _), m in runs.items() if v == variant]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=markers[variant], label=LABELS[variant], alpha=0.8)
    ax.set_xlabel("training wall time (s, 1 thread)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"DeiT-Tiny-like ViT on Fashion-MNIST, {args.epochs} epochs (short: 60%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+",
                    default=["full", "copy", "mogrow", "random", "auto", "depth", "resolution", "short", "auto_depth"],
                    choices=list(VARIANTS))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "surgery" / "growth-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="growth", help="Report file names: OUT/NAME.md and OUT/NAME.png.")
    ap.add_argument("--report-only", action="store_true", help="Tables from the finished runs only.")
    args = ap.parse_args()

    from runs import run_all

    args.work.mkdir(parents=True, exist_ok=True)
    # seed-major, variants interleaved: the two workers always run different variants side by side
    jobs = [(str(args.work), variant, seed, args.epochs, args.per_class)
            for seed in args.seeds for variant in args.variants]
    done = run_all(one_run, jobs, lambda job: run_folder(args.work, *job[1:3]) / "grow.json", args.workers,
                   skip=args.report_only)
    runs = {job[1:3]: m for job, m in done.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    text = report(args, runs)
    (args.out / f"{args.name}.md").write_text(text)
    if runs:
        plot(args, runs, args.out / f"{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()
