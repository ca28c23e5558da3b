"""Benchmark: module incubation against end-to-end training (``benchmarks/results/incubation.md`` + PNG).

Deep Incubation (Ni et al., ICCV 2023) claims a better model at lower cost for large models. Here, on
what this machine can run: a deep, narrow ViT (timm ``vit_tiny_patch16_224`` at patch 4, width 96,
3 heads, depth 12, 28x28 input) and a ResNet-34 (16 residual blocks, 32x32 input; a ResNet-18 has two blocks
per stage, so its automatic meta model would be the whole network) trained from scratch on a
Fashion-MNIST subset (``fashion-mnist:per_class=1200``: 10,800 train, 1,200 val, the full 10,000 test
images). Per model and seed, three runs from the same initial weights:

* ``incubation``: :func:`surgery.incubate` with K=4 modules and epochs PT:MT:FT = 3u:u:u (``--unit u``),
  the MT jobs run one after another (``--jobs 1``: the wall time is the sum of every phase);
* ``incubation-meta-init``: the same with ``init="meta"``: each module starts from the pre-trained
  automatic meta module (kept blocks copied, the others stacked copies) instead of random weights;
* ``e2e-epochs``: end-to-end training for PT+MT+FT = 5u epochs (the same epoch count);
* ``e2e-wall``: end-to-end training for the number of epochs whose measured time matches the
  incubation's total wall time (the same cost on this machine).

Every run uses the same recipe (AdamW, lr ``--lr``, batch 128, label smoothing 0.1, cosine with a
warm-up of a fifth of the run, at most one epoch; FT: no warm-up, gradient clipping 1.0 as the paper)
and reports held-out test top-1, wall seconds (training epochs, validation included) and training
MACs x images (1x forward for frozen parts without gradient, 2x for frozen parts passing gradients,
3x for trained parts). ``incubation`` also reports the assembled model's test top-1 before FT.

Run (each line appends to ``OUT/runs.jsonl``; finished runs are skipped, so the command resumes)::

    .venv/bin/python benchmarks/incubation.py run --model resnet --seeds 0 1 2 --unit 1 --threads 2
    .venv/bin/python benchmarks/incubation.py run --model vit --seeds 0 1 2 --unit 1 --threads 2
    .venv/bin/python benchmarks/incubation.py run --model resnet --seeds 0 1 2 --unit 2 --threads 2
    .venv/bin/python benchmarks/incubation.py report

Goal (the issue's): incubation at least matches end-to-end accuracy at no more than 0.5x its cost,
or beats it by 1 point at equal cost. The report says which, per model, from the mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "incubation"
DEFAULT_REPORT = ROOT / "results" / "incubation.md"
DATA = "fashion-mnist:per_class=1200"
MODELS = {
    "vit": ("vit_tiny_patch16_224", {"patch_size": 4, "embed_dim": 96, "num_heads": 3, "depth": 12}, 28),
    "resnet": ("resnet34", {}, 32),
}
METHODS = ("incubation", "incubation-meta-init", "e2e-epochs", "e2e-wall")


def _runs(out: Path) -> list[dict[str, Any]]:
    path = out / "runs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _incubation(model: str, seed: int, unit: int, args, work: Path, init: str = "random") -> dict[str, Any]:
    from surgery.training.incubation_run import incubate

    arch, kwargs, size = MODELS[model]
    t0 = time.perf_counter()
    folder = work / (f"{model}-s{seed}-u{unit}" + ("" if init == "random" else f"-{init}"))
    manifest = incubate(arch, args.data, out=folder, modules=4, epochs=(3 * unit, unit, unit), model_kwargs=kwargs,
                        input_size=size, batch_size=128, lr=args.lr, seed=seed, init=init, quiet=not args.verbose)
    phases = manifest["phases"]
    trained = [p for p in phases.values() if p and "wall_s" in p and p.get("epochs")]
    mt = [phases[k] for k in phases if k.startswith("mt_")]
    return {
        "test_acc": phases["ft"]["test_acc"], "assembled_test_acc": phases["assemble"]["test_acc"],
        "wall_s": sum(p["wall_s"] for p in trained),
        "critical_path_s": phases["pt"]["wall_s"] + max(p["wall_s"] for p in mt) + phases["ft"]["wall_s"],
        "train_macs_x_images": sum(p["train_macs_x_images"] for p in trained),
        "phase_wall_s": {k: p["wall_s"] for k, p in phases.items() if p and "wall_s" in p},
        "phase_macs_x_images": {k: p.get("train_macs_x_images") for k, p in phases.items() if p},
        "epochs": [3 * unit, unit, unit], "target_macs": manifest["target"]["macs"],
        "meta_macs": manifest["meta"]["macs"], "target_params": manifest["target"]["params"],
        "meta_params": manifest["meta"]["params"], "elapsed_s": time.perf_counter() - t0,
    }


def _e2e(model: str, seed: int, epochs: int, args) -> dict[str, Any]:
    """End-to-end training of the same target (same initial weights, data, recipe as incubation's PT/MT)."""
    from surgery.training.incubation_run import (
        IncubationSpec,
        _config,
        _create,
        _loaders,
        _splits,
        build,
        with_input_size,
    )
    from surgery.training.loop import evaluate, train

    arch, kwargs, size = MODELS[model]
    entry = with_input_size({"name": arch, "arch": arch, "model_kwargs": kwargs}, size)
    spec = IncubationSpec(model=entry, modules=4, epochs=(0, 1, 0), data=args.data, input_size=(3, size, size),
                          batch_size=128, lr=args.lr, seed=seed)
    splits = _splits(spec)
    built = build(spec, splits)  # the same target instance incubation starts from (seeded by `seed`)
    model_ = _create(spec.model, len(built.classes), seed)
    assert all(torch.equal(a, b) for a, b in zip(model_.state_dict().values(), built.target.state_dict().values(),
                                                   strict=True))
    train_loader, val_loader, test_loader = _loaders(built, splits)
    result = train(model_, train_loader, val_loader, _config(spec, "pt", epochs), quiet=not args.verbose)
    images = epochs * len(train_loader) * spec.batch_size
    return {"test_acc": evaluate(model_, test_loader)["top1"], "wall_s": sum(r["epoch_time_s"] for r in result.history),
            "epoch_s": [r["epoch_time_s"] for r in result.history], "epochs": epochs,
            "train_macs_x_images": 3 * built.target_macs * images}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    work = args.work
    for seed in args.seeds:
        key = {"model": args.model, "seed": seed, "unit": args.unit, "data": args.data, "lr": args.lr}
        done = {r["method"] for r in _runs(args.out) if all(r.get(k) == v for k, v in key.items())}
        if "incubation" not in done:
            inc = _incubation(args.model, seed, args.unit, args, work)
            _append(args.out, {**key, "method": "incubation", "threads": args.threads, **inc})
            print(f"{args.model} seed {seed} incubation: test {inc['test_acc']:.4f} "
                  f"(assembled {inc['assembled_test_acc']:.4f}) {inc['wall_s']:.0f} s", flush=True)
        inc = next(r for r in _runs(args.out) if r["method"] == "incubation" and all(r.get(k) == v
                                                                                   for k, v in key.items()))
        if "e2e-epochs" not in done:
            rec = _e2e(args.model, seed, 5 * args.unit, args)
            _append(args.out, {**key, "method": "e2e-epochs", "threads": args.threads, **rec})
            print(f"{args.model} seed {seed} e2e {rec['epochs']} epochs: test {rec['test_acc']:.4f} "
                  f"{rec['wall_s']:.0f} s", flush=True)
        e2e = next(r for r in _runs(args.out) if r["method"] == "e2e-epochs" and all(r.get(k) == v
                                                                                   for k, v in key.items()))
        if "incubation-meta-init" not in done and not args.no_meta_init:
            rec = _incubation(args.model, seed, args.unit, args, work, init="meta")
            _append(args.out, {**key, "method": "incubation-meta-init", "threads": args.threads, **rec})
            print(f"{args.model} seed {seed} incubation, modules initialised from the meta model: test "
                  f"{rec['test_acc']:.4f} (assembled {rec['assembled_test_acc']:.4f}) {rec['wall_s']:.0f} s",
                  flush=True)
        if "e2e-wall" not in done:
            per_epoch = statistics.mean(e2e["epoch_s"])
            epochs = max(1, round(inc["wall_s"] / per_epoch))
            rec = (dict(e2e, epochs_note="same as e2e-epochs") if epochs == e2e["epochs"]
                   else _e2e(args.model, seed, epochs, args))
            rec = {k: v for k, v in rec.items() if k not in key and k not in ("method", "threads")}
            _append(args.out, {**key, "method": "e2e-wall", "threads": args.threads, **rec})
            print(f"{args.model} seed {seed} e2e at equal wall ({epochs} epochs): test {rec['test_acc']:.4f} "
                  f"{rec['wall_s']:.0f} s", flush=True)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(args: argparse.Namespace) -> None:
    runs = _runs(args.out)
    lines = ["# Module incubation against end-to-end training", "",
             "Produced by `benchmarks/incubation.py` (see its docstring for the set-up and the exact commands); "
             f"data `{DATA}` (10,800 train / 1,200 val / 10,000 test images), K = 4 modules, batch 128, "
             "one machine (2 shared cores, no GPU), MT jobs run one after another. Mean and sample standard "
             "deviation over seeds; cost = wall seconds of training (validation included) and training MACs x "
             "images (backward counted as 2x forward for trained parts, 1x for frozen parts that pass "
             "gradients).", ""]
    verdicts = []
    points: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for model in MODELS:
        rows = [r for r in runs if r["model"] == model]
        if not rows:
            continue
        arch, kwargs, size = MODELS[model]
        units = sorted({r["unit"] for r in rows})
        for unit in units:
            sel = [r for r in rows if r["unit"] == unit]
            seeds = sorted({r["seed"] for r in sel})
            inc = [r for r in sel if r["method"] == "incubation"]
            if not inc:
                continue
            i0 = inc[0]
            lines += [f"## {model}: `{arch}` {json.dumps(kwargs)}, {size}x{size} input, unit {unit} "
                      f"(seeds {', '.join(map(str, seeds))})", "",
                      f"Target {i0['target_params'] / 1e6:.2f} M params, {i0['target_macs'] / 1e6:.1f} M MACs per "
                      f"image; automatic meta model {i0['meta_params'] / 1e6:.2f} M params, "
                      f"{i0['meta_macs'] / 1e6:.1f} M MACs.", "",
                      "| run | epochs | test top-1 % | before FT % | wall s | critical path s | train TMACs |",
                      "|---|---|---|---|---|---|---|"]
            stats = {}
            for method in METHODS:
                rs = [r for r in sel if r["method"] == method]
                if not rs:
                    continue
                acc = _mean_sd([100 * r["test_acc"] for r in rs])
                wall = _mean_sd([r["wall_s"] for r in rs])
                macs = statistics.mean(r["train_macs_x_images"] for r in rs) / 1e12
                stats[method] = (acc, wall, macs)
                points[(f"{model}, unit {unit}", method)] = [(r["wall_s"], 100 * r["test_acc"]) for r in rs]
                epochs = ("PT,MT,FT = " + ",".join(map(str, rs[0]["epochs"])) if method.startswith("incubation")
                          else str(sorted({r["epochs"] for r in rs})))
                before = (f"{_mean_sd([100 * r['assembled_test_acc'] for r in rs])[0]:.1f}"
                          if method.startswith("incubation") else "-")
                crit = (f"{statistics.mean(r['critical_path_s'] for r in rs):.0f}" if method.startswith("incubation")
                        else "-")
                lines.append(f"| {method} (n={len(rs)}) | {epochs} | {acc[0]:.2f} ± {acc[1]:.2f} | {before} | "
                             f"{wall[0]:.0f} | {crit} | {macs:.1f} |")
            lines.append("")
            if {"e2e-epochs", "e2e-wall"} <= set(stats):
                e_acc, e_wall, e_macs = stats["e2e-epochs"]
                w_acc, w_wall, w_macs = stats["e2e-wall"]
                for method in ("incubation", "incubation-meta-init"):
                    if method not in stats:
                        continue
                    acc, wall, macs = stats[method]
                    lines.append(f"- {method}: {acc[0] - e_acc[0]:+.2f} points against e2e-epochs at wall "
                                 f"x{wall[0] / e_wall[0]:.2f} (MACs x{macs / e_macs:.2f}); {acc[0] - w_acc[0]:+.2f} "
                                 f"points against e2e-wall at wall x{wall[0] / w_wall[0]:.2f} "
                                 f"(MACs x{macs / w_macs:.2f})")
                    cheap_match = acc[0] >= e_acc[0] and wall[0] <= 0.5 * e_wall[0]
                    equal_beat = acc[0] >= w_acc[0] + 1.0
                    verdict = ("met (matches end-to-end at <= 0.5x its wall time)" if cheap_match else
                               "met (beats end-to-end at equal wall time by >= 1 point)" if equal_beat else
                               "NOT met")
                    verdicts.append(f"- {model} (unit {unit}), {method}: goal {verdict}.")
                lines.append("")
    lines += ["## Verdict", "", "Goal: incubation at least matches end-to-end accuracy at no more than 0.5x its "
              "cost, or beats it by 1 point at equal cost.", "", *verdicts, ""]
    args.report_file.write_text("\n".join(lines))
    _plot(points, args.report_file.with_suffix(".png"))
    print(f"wrote {args.report_file} and {args.report_file.with_suffix('.png')}")


def _plot(points: dict[tuple[str, str], list[tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for m, _ in points})  # one panel per model and epoch unit
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    markers = {"incubation": "o", "incubation-meta-init": "D", "e2e-epochs": "s", "e2e-wall": "^"}
    for ax, model in zip(axes[0], models, strict=True):
        for (m, method), pts in sorted(points.items()):
            if m != model:
                continue
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, marker=markers[method], label=method, alpha=0.8)
        ax.set_title(model)
        ax.set_xlabel("training wall time (s, 2 CPU cores)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="train incubation and both end-to-end baselines for some seeds")
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--unit", type=int, default=1, help="epoch unit u: PT,MT,FT = 3u,u,u; end to end 5u")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data", default=DATA)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--no-meta-init", action="store_true", help="skip the incubation-meta-init variant")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "surgery" / "benchmarks" / "incubation",
                   help="run folders (checkpoints; outside the repository)")
    r = sub.add_parser("report", help="write the markdown report and the PNG from the recorded runs")
    r.add_argument("--out", type=Path, default=DEFAULT_OUT)
    r.add_argument("--report-file", type=Path, default=DEFAULT_REPORT)
    args = parser.parse_args(argv)
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
