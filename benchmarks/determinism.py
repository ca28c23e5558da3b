"""Benchmark: are mini-zoo weights bit-reproducible, and what changes them? (``benchmarks/results/determinism.md``)

Measures, for one :data:`zoo.mini.MINI_ZOO` spec trained on a seeded subset of its source task:

1. ``train``: the SHA-256 of the trained weights (first 12 hex digits of a hash over every
   state-dict key and tensor), validation top-1 (1,000 seeded val images) and test top-1 (the full
   held-out test split), with the intra-op thread count, the CPU kernels ATen dispatches to
   (``torch.backends.cpu.get_cpu_capability()``), the ``ONEDNN_MAX_CPU_ISA`` cap on oneDNN's
   convolution kernels, ``PYTHONHASHSEED``, loader workers, torch/timm versions, wall and CPU seconds.
   Same sha = bit-identical weights. The weights are saved to ``OUT/weights/SPEC-TAG.safetensors``.
2. ``finetune``: those weights given a new 10-class head and fine-tuned on ``digits`` with the
   demo's recipe (:func:`surgery.training.finetune.finetune_model_dir` as :mod:`surgery.demo` calls it: 6 epochs,
   batch 64, AdamW lr 1e-3, seed 0, 10% of train held out for validation), then the number of
   correctly classified test images (359 in the digits test split). This is what a different
   sha costs downstream: does the demo's headline number move?
3. ``speed``: training-step throughput (images/s, best of ``--reps``, a fixed random batch of 128,
   AdamW, channels-last) at 1 and 2 intra-op threads, interleaved so both see the same machine load.
   :data:`zoo.mini.MINI_THREADS` pins the count because it changes the weights; this says what
   each count costs.

``report`` writes ``benchmarks/results/determinism.md`` from the JSONL files: one table per kind
and, per (spec, train images, seed), which tags ended with the same weights.

What the train step does is exactly what the throwaway script of the original investigation did
(so the imported numbers stay comparable): ``surgery.minizoo._plan`` for the normalisation,
``zoo.data.load_splits(spec.data, seed=spec.seed)``, ``surgery.minizoo._subset`` of the train split
(``--train-samples``) and of val (1,000), ``make_transform`` with the spec's mean/std/interpolation,
a shuffled loader seeded by the spec seed with ``drop_last=True``, ``torch.manual_seed(seed)`` then
``timm.create_model`` and a zeroed head, ``surgery.training.train`` with ``spec.train_config(epochs=1)``
and ``surgery.training.evaluate`` on the test split. It differs from ``surgery.minizoo.build_mini_zoo``
in the val subset (1,000 vs 2,000 images; val only reports, it does not steer training) and in not
pinning threads (``--threads`` sets them). ``--seed`` replaces the spec's seed everywhere it is used.

Run (``B=".venv/bin/python benchmarks/determinism.py"``; every command appends one JSON line)::

    # thread count: two 1-thread runs (repeatability) against one 2-thread run
    OMP_NUM_THREADS=1 $B train --tag full_t1a --threads 1
    OMP_NUM_THREADS=1 $B train --tag full_t1b --threads 1
    $B train --tag full_t2 --threads 2
    # CPU kernels: emulate a CPU without AVX-512 (both caps; then each alone, on 4,096 images)
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $B train --tag full_avx2 --threads 1
    ATEN_CPU_CAPABILITY=avx2 $B train --tag aten_avx2 --threads 1 --train-samples 4096
    ONEDNN_MAX_CPU_ISA=AVX2 $B train --tag onednn_avx2 --threads 1 --train-samples 4096
    # seeds (the spec's own seed is 3 for regnetx-fm04)
    $B train --tag full_seed10 --threads 1 --seed 10
    $B train --tag full_seed11 --threads 1 --seed 11
    # things that must NOT change the weights: Python's hash seed, loader worker processes
    PYTHONHASHSEED=1 $B train --tag hs1 --threads 1 --train-samples 4096
    PYTHONHASHSEED=2 $B train --tag hs2 --threads 1 --train-samples 4096
    $B train --tag w2 --threads 1 --train-samples 4096 --workers 2
    # another family
    $B train --spec resnet10t-fm04 --tag r_t1 --threads 1
    $B train --spec resnet10t-fm04 --tag r_t2 --threads 2
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $B train --spec resnet10t-fm04 --tag r_avx2 --threads 1
    # downstream: the demo's fine-tuning on digits, from the weights above
    $B finetune --weights full_t1a --tag ft_t1a --threads 1
    $B finetune --weights full_t1a --tag ft_t2 --threads 2
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $B finetune --weights full_t1a --tag ft_avx2 --threads 1
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $B finetune --weights full_avx2 --tag ft_avx2chain --threads 1
    $B finetune --weights full_t2 --tag ft_t2chain --threads 2
    $B finetune --weights full_t1a --tag ft_seed1 --threads 1 --seed 1
    $B finetune --weights full_t1a --tag ft_seed2 --threads 1 --seed 2
    # throughput, 1 vs 2 threads, then the report
    $B speed --reps 5 --steps 20
    $B report

    # smoke run (a minute): tiny training set, results in a scratch folder
    OMP_NUM_THREADS=1 $B train --train-samples 512 --threads 1 --tag tiny --out /tmp/det
    OMP_NUM_THREADS=1 $B finetune --weights tiny --tag ft_tiny --threads 1 --out /tmp/det
    $B report --out /tmp/det --report-file /tmp/det/determinism.md

Cost (2-core machine shared with other jobs): a full ``train`` (24,000 images, one epoch) 25-75 s
wall, a ``finetune`` 20-40 s; a 2-thread run on a busy 2-core machine can be many times slower
than a 1-thread one. Run one experiment at a time: neighbours change the wall times, never the sha.

Output: ``--out`` (default ``benchmarks/results/determinism/``) gets ``train.jsonl``,
``finetune.jsonl``, ``speed.jsonl`` (appended) and ``weights/`` (not for committing; a
``.gitignore`` there keeps it out). ``--report`` after any command, or the ``report`` command,
rewrites ``--report-file`` (default ``benchmarks/results/determinism.md``).

``import-h6`` converts the JSONL of the original investigation (``/tmp/h6/results.jsonl``,
``/tmp/h6/ft.jsonl``) into these files; rows are marked ``"source": "h6"``. Those files did not
record every field: ``seed`` of the first rows is the spec's seed (the script used it when no seed
was given), ``onednn_max_cpu_isa`` is read off the tag (``*avx2`` tags ran with
``ONEDNN_MAX_CPU_ISA=AVX2`` except ``aten_avx2``, which capped ATen only), torch/timm versions are
unknown; such fields are listed in each row's ``inferred``.

Provenance: written for this project; it turns the throwaway scripts of the determinism
investigation (``exp.py``, ``ft.py``, ``speed.py``) into one committed script with the same
computations, reusing the toolkit's own data, mini-zoo and training functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "determinism"
DEFAULT_REPORT = ROOT / "benchmarks" / "results" / "determinism.md"
FILES = {"train": "train.jsonl", "finetune": "finetune.jsonl", "speed": "speed.jsonl"}
VAL_SAMPLES = 1_000  # as in the original script (build_mini_zoo uses 2,000)
EVAL_BATCH = 512
FT_TARGET = "digits"  # surgery.demo.TARGET
FT_EPOCHS, FT_BATCH, FT_LR, FT_VAL_FRACTION = 6, 64, 1e-3, 0.1  # the demo's recipe (surgery.demo / finetune)


# ---------------------------------------------------------------------------- helpers


def _numerics() -> dict[str, Any]:
    from surgery.minizoo import numerics

    info = numerics()
    return {
        "threads": info["threads"], "cpu_capability": info["cpu_capability"],
        "onednn_max_cpu_isa": info["onednn_max_cpu_isa"],
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
        "pythonhashseed": os.environ.get("PYTHONHASHSEED"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": info["torch"], "timm": info["timm"], "cpu": info["cpu"], "device": info["device"],
    }


def _stamp() -> dict[str, Any]:
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_average": load,
            "source": "benchmarks/determinism.py"}


def _append(out: Path, kind: str, row: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / FILES[kind], "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def _read(out: Path, kind: str) -> list[dict[str, Any]]:
    path = out / FILES[kind]
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _weights_path(out: Path, spec_name: str, tag: str) -> Path:
    return out / "weights" / f"{spec_name}-{tag}.safetensors"


def _spec(name: str, seed: int | None):
    from zoo.mini import mini_spec

    spec = mini_spec(name)
    return spec if seed is None else dataclasses.replace(spec, seed=seed)


# ---------------------------------------------------------------------------- 1. train


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    import timm

    from surgery.minizoo import _plan, _subset
    from surgery.training.loop import TrainConfig, evaluate, train
    from zoo.data import load_splits, make_loader, make_transform
    from zoo.entries import save_weights

    spec = _spec(args.spec, args.seed)
    tag = args.tag or f"t{args.threads}-s{spec.seed}-n{args.train_samples}"
    norm = _plan(spec, args.out / "weights", False)["norm"]  # structure only: nothing is written there
    splits = load_splits(spec.data, seed=spec.seed)
    train_ds = _subset(splits["train"], args.train_samples, spec.seed)
    val_ds = _subset(splits["val"], VAL_SAMPLES, spec.seed)
    test_ds = splits["test"]
    tf = make_transform((3, 32, 32), norm["mean"], norm["std"], norm["interpolation"])
    train_loader = make_loader(train_ds, spec.batch_size, shuffle=True, seed=spec.seed, transform=tf,
                               drop_last=True, num_workers=args.workers)
    val_loader = make_loader(val_ds, EVAL_BATCH, transform=tf)
    test_loader = make_loader(test_ds, EVAL_BATCH, transform=tf)
    config = TrainConfig(**spec.train_config(epochs=1, log_every=0, num_workers=args.workers))

    torch.manual_seed(spec.seed)
    model = timm.create_model(spec.arch, pretrained=False, **spec.model_kwargs)
    if spec.zero_head:
        for p in model.get_classifier().parameters():
            torch.nn.init.zeros_(p)
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(model, train_loader, val_loader, config=config, quiet=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    test = evaluate(model, test_loader)

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = hashlib.sha256()
    for k, v in state.items():  # keys and bytes, as the original script
        digest.update(k.encode())
        digest.update(v.numpy().tobytes())
    path = _weights_path(args.out, spec.name, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, path)  # safetensors: the weights are data, never unpickled
    row = {"kind": "train", "tag": tag, "spec": spec.name, "n_train": len(train_ds), "seed": spec.seed,
           "workers": args.workers, **_numerics(), "sha": digest.hexdigest()[:12],
           "val": result.history[-1]["val_acc"], "test": test["top1"], "n_test": test["n"],
           "num_classes": spec.num_classes, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), **_stamp()}
    _append(args.out, "train", row)
    return row


# ---------------------------------------------------------------------------- 2. fine-tune


def run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    import timm

    from surgery.minizoo import _plan
    from surgery.training.loop import TrainConfig, evaluate, train
    from zoo.data import load_splits, make_loader, make_transform
    from zoo.entries import load_weights

    spec = _spec(args.spec, None)
    weights = Path(args.weights)
    if not weights.is_file():
        weights = _weights_path(args.out, spec.name, args.weights)
    if not weights.is_file():
        sys.exit(f"no weights {args.weights!r}: neither a file nor {weights} (run `train --tag {args.weights}`)")
    seed = args.seed
    tag = args.tag or f"ft-{Path(args.weights).stem}-t{args.threads}-s{seed}"
    norm = _plan(spec, args.out / "weights", False)["norm"]
    model = timm.create_model(spec.arch, pretrained=False, **spec.model_kwargs)
    load_weights(model, weights)  # safetensors (or a .pt read with weights_only=True), never unpickled
    torch.manual_seed(seed)
    model.reset_classifier(10)
    splits = load_splits(FT_TARGET, seed=seed, val_fraction=FT_VAL_FRACTION)
    tf = make_transform((3, 32, 32), norm["mean"], norm["std"])  # as surgery.training.finetune: the default resize
    train_loader = make_loader(splits["train"], FT_BATCH, shuffle=True, seed=seed, transform=tf)
    val_loader = make_loader(splits["val"], FT_BATCH, transform=tf)
    test_loader = make_loader(splits["test"], FT_BATCH, transform=tf)
    t0 = time.perf_counter()
    config = TrainConfig(epochs=args.epochs, batch_size=FT_BATCH, lr=FT_LR, seed=seed, log_every=0)
    result = train(model, train_loader, val_loader, config, quiet=True)
    ev = evaluate(model, test_loader)
    digest = hashlib.sha256()
    for v in model.state_dict().values():  # bytes only, as the original script
        digest.update(v.detach().contiguous().numpy().tobytes())
    row = {"kind": "finetune", "tag": tag, "spec": spec.name, "zoo_weights": args.weights, "target": FT_TARGET,
           "epochs": args.epochs, "seed": seed, **_numerics(), "sha": digest.hexdigest()[:12],
           "val": result.best_val_acc, "test": ev["top1"], "n_test": ev["n"], "correct": round(ev["top1"] * ev["n"]),
           "wall_s": round(time.perf_counter() - t0, 1), **_stamp()}
    _append(args.out, "finetune", row)
    return row


# ---------------------------------------------------------------------------- 3. speed


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    import timm

    spec = _spec(args.spec, None)
    torch.manual_seed(0)
    model = timm.create_model(spec.arch, pretrained=False, **spec.model_kwargs).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.num_classes, (128,))
    before = torch.get_num_threads()
    best = {1: 0.0, 2: 0.0}
    for _ in range(args.reps):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for i in range(args.steps + 2):  # two warm-up steps
                if i == 2:
                    t0 = time.perf_counter()
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            best[threads] = max(best[threads], args.steps * 128 / (time.perf_counter() - t0))
    torch.set_num_threads(before)
    row = {"kind": "speed", "tag": args.tag or "speed", "spec": spec.name, "reps": args.reps, "steps": args.steps,
           "img_per_s_1": round(best[1]), "img_per_s_2": round(best[2]),
           "speedup_2_over_1": round(best[2] / best[1], 2),
           **_numerics(), "cores": os.cpu_count(), **_stamp()}
    row.pop("threads")
    _append(args.out, "speed", row)
    return row


# ---------------------------------------------------------------------------- import of the original JSONL


def _isa_from_tag(tag: str) -> str | None:
    return "AVX2" if "avx2" in tag and not tag.startswith("aten_") else None


def run_import(args: argparse.Namespace) -> None:
    from zoo.mini import mini_spec

    src = Path(args.source)
    done = {(r["kind"], r["tag"]) for kind in ("train", "finetune") for r in _read(args.out, kind)
            if r.get("source") == "h6"}
    common = {"aten_cpu_capability": None, "omp_num_threads": None, "torch": None, "timm": None, "cpu": None,
              "device": "cpu", "date": None, "load_average": None, "source": "h6"}
    for line in (src / "results.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if ("train", r["tag"]) in done:
            continue
        spec = mini_spec(r["spec"])
        inferred = ["onednn_max_cpu_isa"] + ([] if "seed" in r else ["seed"])
        row = {"kind": "train", "tag": r["tag"], "spec": r["spec"], "n_train": r["n_train"],
               "seed": r.get("seed", spec.seed), "workers": r["workers"], "threads": r["threads"],
               "cpu_capability": r["cap"], "onednn_max_cpu_isa": _isa_from_tag(r["tag"]),
               "pythonhashseed": r["hashseed"], "sha": r["sha"], "val": r["val"], "test": r["test"],
               "n_test": r["n_test"], "num_classes": spec.num_classes, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
               **common, "inferred": inferred}
        _append(args.out, "train", row)
    for line in (src / "ft.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if ("finetune", r["tag"]) in done:
            continue
        row = {"kind": "finetune", "tag": r["tag"], "spec": "regnetx-fm04", "zoo_weights": r["zoo_weights"],
               "target": FT_TARGET, "epochs": FT_EPOCHS, "seed": r["seed"], "threads": r["threads"],
               "cpu_capability": r["cap"], "onednn_max_cpu_isa": _isa_from_tag(r["tag"]), "pythonhashseed": None,
               "sha": r["sha"], "val": r["val"], "test": r["test"], "n_test": r["n_test"], "correct": r["correct"],
               "wall_s": r["wall_s"], **common, "inferred": ["onednn_max_cpu_isa"]}
        _append(args.out, "finetune", row)


# ---------------------------------------------------------------------------- report


def _kernels(r: dict[str, Any]) -> str:
    isa = r.get("onednn_max_cpu_isa")
    return f"ATen {r.get('cpu_capability')} / oneDNN {'<= ' + isa if isa else 'best'}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def write_report(out: Path, path: Path) -> Path:
    trains, fts, speeds = _read(out, "train"), _read(out, "finetune"), _read(out, "speed")
    shas = {(r["spec"], r["tag"]): r["sha"] for r in trains}
    lines = [
        "# Determinism of mini-zoo training",
        "",
        "Written by `benchmarks/determinism.py report` from the JSONL files in "
        f"`{os.path.relpath(out, ROOT) if out.is_relative_to(ROOT) else out}/` (commands, and what each column "
        "means, in the script's docstring). sha: first 12 hex digits of the SHA-256 of the trained weights; equal "
        "sha = bit-identical weights. Kernels: the SIMD kernel set ATen dispatches to "
        "(`torch.backends.cpu.get_cpu_capability()`, capped by `ATEN_CPU_CAPABILITY`) and the "
        "`ONEDNN_MAX_CPU_ISA` cap on oneDNN, which runs the convolutions (`best`: no cap). "
        "Rows from the original investigation (`source` h6) did not record every field: "
        "`*` marks a value inferred (see the docstring).",
        "",
        "## Training (one epoch on the source task)",
        "",
        "| tag | spec | train images | threads | kernels | seed | hash seed | workers | sha | val top-1 % "
        "| test top-1 % | test n | wall s |",
        "|---|---|---:|---:|---|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in trains:
        inf = set(r.get("inferred", []))
        star = (lambda f, _inf=inf: "*" if f in _inf else "")
        lines.append(
            f"| {r['tag']} | {r['spec']} | {r['n_train']:,} | {r['threads']} "
            f"| {_kernels(r)}{star('onednn_max_cpu_isa')} "
            f"| {r['seed']}{star('seed')} | {r.get('pythonhashseed') or '-'} | {r['workers']} | `{r['sha']}` "
            f"| {_pct(r['val'])} | {_pct(r['test'])} | {r['n_test']:,} | {r['wall_s']} |")
    chance = [r["tag"] for r in trains if abs(r["test"] - 1 / r["num_classes"]) < 1e-3]
    if chance:
        lines += ["", f"At chance accuracy (1/classes) after one epoch: {', '.join(chance)}. With so few training "
                  "steps (warm-up included) the model has not left chance yet; only their sha is informative."]
    lines += ["", "### Which runs ended with the same weights", "",
              "Per (spec, train images, seed): the tags grouped by sha.", ""]
    groups: dict[tuple, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in trains:
        groups[(r["spec"], r["n_train"], r["seed"])][r["sha"]].append(
            f"{r['tag']} ({r['threads']} thr, {_kernels(r)})")
    for (spec, n, seed), by_sha in groups.items():
        parts = "; ".join(f"`{sha}`: {', '.join(tags)}" for sha, tags in by_sha.items())
        lines.append(f"- {spec}, {n:,} images, seed {seed}: {len(by_sha)} distinct: {parts}")

    lines += [
        "",
        f"## Fine-tuning on `{FT_TARGET}` (the demo's recipe: {FT_EPOCHS} epochs, batch {FT_BATCH}, lr {FT_LR:g})",
        "",
        "| tag | from weights | their sha | threads | kernels | seed | sha | val top-1 % | test top-1 % "
        "| correct/n | wall s |",
        "|---|---|---|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in fts:
        star = "*" if "onednn_max_cpu_isa" in r.get("inferred", []) else ""
        src = shas.get((r["spec"], r["zoo_weights"]))
        lines.append(
            f"| {r['tag']} | {r['zoo_weights']} | {'`' + src + '`' if src else '-'} | {r['threads']} "
            f"| {_kernels(r)}{star} | {r['seed']} | `{r['sha']}` | {_pct(r['val'])} | {_pct(r['test'])} "
            f"| {r['correct']}/{r['n_test']} | {r['wall_s']} |")
    if fts:
        correct = [r["correct"] for r in fts]
        lines += ["", f"Correct test images over these {len(fts)} runs: {min(correct)}-{max(correct)} of "
                  f"{fts[0]['n_test']} (one image = {100 / fts[0]['n_test']:.2f} points)."]

    lines += ["", "## Training throughput, 1 vs 2 intra-op threads", ""]
    if speeds:
        lines += ["| spec | img/s, 1 thread | img/s, 2 threads | 2 over 1 | cores | load average | reps x steps "
                  "| kernels | date |", "|---|---:|---:|---:|---:|---:|---|---|---|"]
        for r in speeds:
            lines.append(f"| {r['spec']} | {r['img_per_s_1']} | {r['img_per_s_2']} | {r['speedup_2_over_1']} "
                         f"| {r['cores']} | {r['load_average']} | {r['reps']} x {r['steps']} | {_kernels(r)} "
                         f"| {r['date']} |")
    else:
        lines.append("No measurement recorded yet (`benchmarks/determinism.py speed`).")
    versions = sorted({f"torch {r['torch']}, timm {r['timm']}" for r in trains + fts + speeds if r.get("torch")})
    lines += ["", "Versions of the rows run by the script: " + ("; ".join(versions) or "none yet") + ".", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {path}")
    return path


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the JSONL files and weights")
    common.add_argument("--report", action="store_true", help="rewrite the report afterwards")
    common.add_argument("--report-file", type=Path, default=DEFAULT_REPORT)
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", parents=[common], help="train one mini-zoo spec; weights sha + val/test top-1")
    p.add_argument("--spec", default="regnetx-fm04")
    p.add_argument("--train-samples", type=int, default=24_000)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (torch.set_num_threads)")
    p.add_argument("--seed", type=int, default=None, help="replaces the spec's seed (default: the spec's)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--tag", default=None, help="row name; also names the saved weights")

    p = sub.add_parser("finetune", parents=[common], help="fine-tune trained weights on digits (demo recipe)")
    p.add_argument("--weights", required=True, help="tag of a `train` run (or a .safetensors / .pt state-dict file)")
    p.add_argument("--spec", default="regnetx-fm04", help="spec whose architecture the weights are for")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=FT_EPOCHS)
    p.add_argument("--tag", default=None)

    p = sub.add_parser("speed", parents=[common], help="training-step throughput at 1 vs 2 threads")
    p.add_argument("--spec", default="regnetx-fm04")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tag", default=None)

    p = sub.add_parser("import-h6", parents=[common], help="convert the original investigation's JSONL")
    p.add_argument("--source", default="/tmp/h6", help="folder with results.jsonl and ft.jsonl")

    sub.add_parser("report", parents=[common], help="write the Markdown report from the JSONL files")

    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    if args.command == "train":
        run_train(args)
    elif args.command == "finetune":
        run_finetune(args)
    elif args.command == "speed":
        run_speed(args)
    elif args.command == "import-h6":
        run_import(args)
    if args.command == "report" or args.report:
        write_report(args.out, args.report_file.resolve())


if __name__ == "__main__":
    main()
