"""Benchmark: Divide-and-Co-training on Fashion-MNIST, a wide and a narrow ResNet, S = 1, 2, 4.

Usage::

    .venv/bin/python benchmarks/cotrain.py [--seeds 0 1 2] [--ways 1 2 4] [--epochs 10]
        [--train-per-class 500] [--workers 2] [--work ~/.cache/surgery/cotrain-bench] [--report-only]
        [--timing-only] [--out benchmarks/results]

What it runs (every run is ``surgery.cotrain`` itself, resumable: a finished run is skipped):

* **wide**: timm's ResNet-18 (11.2 M parameters, the size and depth class of the paper's WRN-16-8;
  timm's ResNet has four stages, so a three-stage WRN cannot be built from it) and **narrow**: the
  same family with 3 basic blocks per stage and 8 / 16 / 32 / 64 channels (0.3 M, the size class of
  the paper's ResNet-20/110). Both keep timm's ImageNet stem (7x7 stride 2 and a max-pool), so at
  32 px the stages run at 8, 4, 2 and 1 px: far cheaper than the paper's CIFAR stem, which this
  2-core machine could not train in the time available (stated, not hidden).
* S = 1 (the undivided net, trained by the same co-training loop: one member, its own views),
  2 and 4 members at equal total parameters (``surgery.divide``), the same epochs and recipe
  (AdamW lr 2e-3, weight decay 0.05, batch 128, JSD weight 0.5 warmed up over 13% of the steps,
  crop + flip views), ``--train-per-class`` Fashion-MNIST training images per class, test on all
  10,000 test images; ``--seeds`` seeds; ``--workers`` runs in parallel (1 thread each).
* Timing, in this process on a quiet machine, all threads: one training step (forward + backward of
  the co-training views, batch 128) with the members stacked under vmap against looped (the
  median of 5 after 2 warm-up steps), and inference images/s of the ensemble with members one by
  one against concurrently (threads), batch 256.

Writes ``OUT/cotrain.md`` and ``OUT/cotrain.png`` (test top-1 against S for both nets). Goals from
the issue: S = 2 at least +0.5 point over S = 1 on the wide net; S = 4 on the narrow net no better
than S = 1; batched members at least 1.5x faster than looped. A last row per net trains S = 1
without the views (plain training, no augmentation): the strongest simple alternative at this budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NETS = {
    "wide": {"arch": "resnet18", "model_kwargs": {}},
    "narrow": {"arch": "resnet18", "model_kwargs": {"layers": (3, 3, 3, 3), "channels": (8, 16, 32, 64)}},
}
SIZE = 32
DATA = "fashion-mnist"


PLAIN = "1nv"  # S = 1 without the co-training views: plain training of the undivided net, no augmentation


def run_folder(work: Path, net: str, ways: int | str, seed: int) -> Path:
    return work / f"{net}-s{ways}-seed{seed}"


def one_run(work: str, net: str, ways: int | str, seed: int, epochs: int, per_class: int) -> dict:
    """A benchmark job (module level: the process pool imports it)."""
    from surgery.training.cotrain_run import cotrain

    folder = run_folder(Path(work), net, ways, seed)
    t0 = time.time()
    manifest = cotrain(NETS[net], f"{DATA}:train_per_class={per_class}", out=folder,
                       ways=1 if ways == PLAIN else ways, views=ways != PLAIN, epochs=epochs,
                       input_size=SIZE, batch_size=128, lr=2e-3, seed=seed, quiet=True)
    print(f"[{time.strftime('%H:%M:%S')}] {net} S={ways} seed {seed}: test top-1 {manifest['result']['top1']:.4f} "
          f"({time.time() - t0:.0f} s)", flush=True)
    return manifest


def timing(net: str, ways: int) -> dict:
    import torch

    from surgery.training.cotrain import Ensemble, LoopedMembers, StackedMembers, co_training_views
    from surgery.training.divide import divide

    d = divide(NETS[net], ways, input_size=(3, SIZE, SIZE), num_classes=10)
    out = {}
    if ways > 1:
        x = torch.randn(128, 3, SIZE, SIZE)
        for name, cls in (("stacked", StackedMembers), ("looped", LoopedMembers)):
            module = cls([m for m in d.members]).train()
            times = []
            for i in range(7):
                views = co_training_views(x, ways)
                t0 = time.perf_counter()
                module(views, per_member=True).sum().backward()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            out[f"step_ms_{name}"] = statistics.median(times) * 1e3
    ens = Ensemble(d.members).eval()
    x = torch.randn(256, 3, SIZE, SIZE)
    for concurrent in (False, True):
        ens.concurrent = concurrent
        with torch.inference_mode():
            ens(x)
            t0 = time.perf_counter()
            for _ in range(5):
                ens(x)
        out["infer_ips_concurrent" if concurrent else "infer_ips_sequential"] = 5 * 256 / (time.perf_counter() - t0)
    out["params"], out["macs"] = ways * d.member_params, ways * d.member_macs
    return out


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report(args, runs: dict, times: dict) -> str:
    lines = [
        "# Divide-and-Co-training on Fashion-MNIST (`surgery cotrain`)",
        "",
        f"Command: `.venv/bin/python benchmarks/cotrain.py {' '.join(sys.argv[1:])}`",
        "",
        f"{args.train_per_class} training images per class ({10 * args.train_per_class} in all), the 10,000 test "
        f"images, {args.epochs} epochs, {SIZE} px, batch 128, AdamW lr 2e-3, JSD weight 0.5; seeds "
        f"{' '.join(map(str, args.seeds))}. Nets: `wide` = timm ResNet-18 (11.2 M, the WRN-16-8 size class); "
        "`narrow` = the same family with basic blocks (3, 3, 3, 3) x channels (8, 16, 32, 64) (0.3 M, the ResNet-20 "
        "class); both with timm's ImageNet stem. S = 1 is the undivided net in the same loop (its own crop + flip "
        "views).",
        "",
        "## Accuracy (test top-1 %, mean ± sd over seeds)",
        "",
        "| net | S | params (M) | MMACs | member widths | ensemble | members (mean) | vs S=1 | members ran |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base: dict[str, list[float]] = {}
    for net in NETS:
        for ways in [PLAIN, *args.ways]:
            ms = [runs[(net, ways, s)] for s in args.seeds if (net, ways, s) in runs]
            if not ms:
                continue
            ens = [100 * m["result"]["top1"] for m in ms]
            mem = [100 * statistics.mean(m["result"]["member_top1"]) for m in ms]
            if ways == 1:
                base[net] = ens
            label = "1, no views (plain training)" if ways == PLAIN else ways
            delta = ""
            if net in base and ways not in (1, PLAIN) and len(base[net]) == len(ens):
                diffs = [a - b for a, b in zip(ens, base[net], strict=True)]
                delta = f"{statistics.mean(diffs):+.2f} ({sum(d > 0 for d in diffs)}/{len(diffs)} seeds ahead)"
            div = ms[0]["division"]
            widths = div["recipe"]["model_kwargs"].get("channels") if ways not in (1, PLAIN) else "undivided"
            k = 1 if ways == PLAIN else ways
            lines.append(f"| {net} | {label} | {k * div['member_params'] / 1e6:.3f} | "
                         f"{k * div['member_macs'] / 1e6:.1f} | {widths} | {mean_sd(ens)} | {mean_sd(mem)} | "
                         f"{delta} | {', '.join(sorted({m['members'] for m in ms}))} |")
    lines += ["", "## Speed (this machine, quiet, all cores)", "",
              "| net | S | train step, stacked (ms) | train step, looped (ms) | stacked speed-up | "
              "inference images/s, one by one | concurrently |", "|---|---|---|---|---|---|---|"]
    for (net, ways), t in sorted(times.items()):
        st, lo = t.get("step_ms_stacked"), t.get("step_ms_looped")
        steps = f"{st:.0f} | {lo:.0f} | {lo / st:.2f}x" if st else "- | - | -"
        ips = f"{t['infer_ips_sequential']:.0f} | {t['infer_ips_concurrent']:.0f}"
        lines.append(f"| {net} | {ways} | {steps} | {ips} |")
    return "\n".join(lines) + "\n"


def plot(args, runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for net, marker in zip(NETS, "os", strict=False):
        xs, ys, es = [], [], []
        for ways in args.ways:
            acc = [100 * runs[(net, ways, s)]["result"]["top1"] for s in args.seeds if (net, ways, s) in runs]
            if acc:
                xs.append(ways)
                ys.append(statistics.mean(acc))
                es.append(statistics.stdev(acc) if len(acc) > 1 else 0)
        line = ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=net)
        plain = [100 * runs[(net, PLAIN, s)]["result"]["top1"] for s in args.seeds if (net, PLAIN, s) in runs]
        if plain:
            ax.axhline(statistics.mean(plain), ls="--", lw=1, color=line[0].get_color(),
                       label=f"{net}, S=1 without views")
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.ways, [str(w) for w in args.ways])
    ax.set_xlabel("members S (equal total parameters)")
    ax.set_ylabel("ensemble test top-1 (%)")
    ax.set_title("Divide-and-Co-training, Fashion-MNIST")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ways", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "surgery" / "cotrain-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--report-only", action="store_true", help="Tables from the finished runs only.")
    ap.add_argument("--timing-only", action="store_true", help="Only the speed table (and the report).")
    args = ap.parse_args()

    from runs import run_all

    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [(str(args.work), net, ways, seed, args.epochs, args.train_per_class)
            for net in args.nets for seed in args.seeds for ways in [*args.ways, PLAIN]]
    done = run_all(one_run, jobs, lambda job: run_folder(args.work, *job[1:4]) / "cotrain.json", args.workers,
                   skip=args.report_only or args.timing_only)
    runs = {job[1:4]: m for job, m in done.items()}
    times_path = args.work / "timing.json"
    if args.report_only and times_path.exists():
        times = {tuple(json.loads(k)): v for k, v in json.loads(times_path.read_text()).items()}
    else:
        times = {(net, ways): timing(net, ways) for net in args.nets for ways in args.ways}
        times_path.write_text(json.dumps({json.dumps(list(k)): v for k, v in times.items()}))
    args.out.mkdir(parents=True, exist_ok=True)
    text = report(args, runs, times)
    (args.out / "cotrain.md").write_text(text)
    if runs:
        plot(args, runs, args.out / "cotrain.png")
    print(text)


if __name__ == "__main__":
    main()
