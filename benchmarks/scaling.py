"""Benchmark: fine-tuning and the similarity pass under ``torchrun`` at 1, 2, ... processes.

Usage::

    .venv/bin/python benchmarks/scaling.py [--procs 1,2] [--repeats 3] [--device cpu|cuda]
        [--model resnet18] [--input-size 64] [--train-images 4096] [--batch-size 128] [--epochs 2]
        [--sim-models resnet18,convnext_atto,vit_tiny_patch16_224] [--sim-input-size 64]
        [--sim-samples 1024] [--sim-batch-size 128] [--only finetune|similarity] [--out FILE]

Every measurement is the real user path: ``torchrun --standalone --nproc-per-node P -m``-style launch
of this file in worker mode, which runs :func:`surgery.training.train` (DDP, a distributed sampler,
the global batch kept) or :func:`surgery.similarity.compute_similarity` (probe batches dealt to the
ranks, HSIC accumulators all-reduced). On CPU the machine's cores are split between the processes
(``OMP_NUM_THREADS`` = cores / P), so one process with all cores is the honest baseline: on a 2-core
machine two processes can only win by overlapping work that one process runs serially, and lose the
gradient all-reduce and the start-up. On CUDA each process gets one GPU and mixed precision (the
loop's default there), which also checks the AMP and NCCL paths.

Reported per (task, P): images/s (fine-tuning: the training images of the last epoch over its
training time, from the loop's reduced epoch record; similarity: probe images over the whole call,
model set-up included) and the ratio to P = 1, as median (min-max) over ``--repeats`` repeats in
which the process counts alternate order (1, 2, 2, 1, ...), so slow drifts of a shared machine hit
both. The launch itself (torchrun, imports, group set-up) is outside the timed part and reported
separately as wall time per run.

Writes ``benchmarks/results/scaling.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = ROOT / "benchmarks" / "results" / "scaling.md"
DATA = "fashion-mnist"


# ------------------------------------------------------------------------------ workers (under torchrun)


def worker_finetune(args: argparse.Namespace) -> dict:
    import timm
    import torch

    from surgery import distributed
    from surgery.training import train
    from zoo.data import load_splits, make_loader, make_transform

    distributed.init_from_env()
    per_class = max(1, args.train_images // 10)
    splits = load_splits(f"{DATA}:train_per_class={per_class}", seed=0)
    tf = make_transform((3, args.input_size, args.input_size))
    loader = make_loader(splits["train"], args.batch_size, shuffle=True, seed=0, transform=tf, drop_last=True)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10, pretrained=False)
    res = train(model, loader, None, {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 1e-3,
                                      "warmup_epochs": 0, "log_every": 0, "device": args.device}, quiet=True)
    last = res.history[-1]
    return {"images_per_s": last["images_per_s"], "train_loss": last["train_loss"],
            "images": len(loader) * args.batch_size, "world": distributed.world_size()}


def worker_similarity(args: argparse.Namespace) -> dict:
    import torch

    from surgery import distributed
    from surgery.similarity import compute_similarity

    distributed.init_from_env()
    device = "cuda" if args.device == "cuda" else "cpu"
    t0 = time.perf_counter()
    res = compute_similarity(args.workspace, DATA, samples=args.sim_samples, batch_size=args.sim_batch_size,
                             seed=0, cache=False, device=device)
    if torch.cuda.is_available() and device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    distributed.barrier()
    return {"images_per_s": res["settings"]["samples"] / seconds, "seconds": seconds,
            "cut_points": int(res["matrix"].shape[0]), "world": distributed.world_size(),
            "matrix_sum": float(abs(res["matrix"][res["matrix"] == res["matrix"]]).sum())}


def run_worker(args: argparse.Namespace) -> None:
    from surgery import distributed

    fn = worker_finetune if args.worker == "finetune" else worker_similarity
    result = fn(args)
    if distributed.is_main():
        Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------ driver


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def launch(task: str, procs: int, args: argparse.Namespace, workspace: Path | None) -> dict:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(procs), __file__, "--worker", task,
               "--result", str(result), "--device", args.device, "--model", args.model,
               "--input-size", str(args.input_size), "--train-images", str(args.train_images),
               "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
               "--sim-samples", str(args.sim_samples), "--sim-batch-size", str(args.sim_batch_size)]
        if workspace is not None:
            cmd += ["--workspace", str(workspace)]
        threads = max(1, cores() // procs)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{task} at {procs} processes failed:\n{proc.stderr[-4000:]}")
        out = json.loads(result.read_text())
    out["wall_s"] = wall
    out["threads"] = threads
    return out


def make_workspace(root: Path, names: list[str], size: int) -> Path:
    from random_zoo import dissected_workspace

    return dissected_workspace(root, names, size).root


def summarise(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, {cores()} CPU cores"
    return f"{cores()} CPU cores, no GPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", default="1,2", help="comma-separated process counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--train-images", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sim-models", default="resnet18,convnext_atto,vit_tiny_patch16_224")
    ap.add_argument("--sim-input-size", type=int, default=64)
    ap.add_argument("--sim-samples", type=int, default=1024)
    ap.add_argument("--sim-batch-size", type=int, default=128)
    ap.add_argument("--only", choices=("finetune", "similarity"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", choices=("finetune", "similarity"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--workspace", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
        return

    procs = [int(p) for p in args.procs.split(",")]
    tasks = [t for t in ("finetune", "similarity") if args.only in (None, t)]
    started = time.time()
    rows: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        workspace = None
        if "similarity" in tasks:
            print(f"dissecting {args.sim_models} at {args.sim_input_size} px ...", flush=True)
            workspace = make_workspace(Path(tmp) / "ws", args.sim_models.split(","), args.sim_input_size)
        for r in range(args.repeats):
            order = procs if r % 2 == 0 else procs[::-1]
            for task in tasks:
                for p in order:
                    res = launch(task, p, args, workspace if task == "similarity" else None)
                    rows.setdefault((task, p), []).append(res)
                    print(f"repeat {r + 1}: {task} P={p}: {res['images_per_s']:.1f} images/s "
                          f"(run {res['wall_s']:.1f} s)", flush=True)
    lines = [
        "# Scaling under torchrun: fine-tuning and the similarity pass",
        "",
        f"Machine: {machine()}. Device: {args.device}. {args.repeats} repeats, process counts alternating order.",
        "",
        "Command: `.venv/bin/python benchmarks/scaling.py " + " ".join(sys.argv[1:]) + "`",
        "",
        f"- fine-tuning: timm `{args.model}` (random init) at {args.input_size} px, {args.train_images} Fashion-MNIST "
        f"training images, global batch {args.batch_size}, {args.epochs} epochs; images/s of the last epoch "
        "(reduced over the ranks).",
        f"- similarity: `compute_similarity(cache=False)` over {args.sim_samples} probe images in batches of "
        f"{args.sim_batch_size}, models `{args.sim_models}` (random init, {args.sim_input_size} px); images/s over the "
        "whole call.",
        "",
        "| task | processes | threads each | images/s, median (min-max) | vs 1 process, median (min-max) | "
        "run wall s |",
        "|---|---|---|---|---|---|",
    ]
    for task in tasks:
        base = rows.get((task, procs[0]))
        for p in procs:
            runs = rows[(task, p)]
            ratios = [a["images_per_s"] / b["images_per_s"] for a, b in zip(runs, base, strict=True)]
            lines.append(f"| {task} | {p} | {runs[0]['threads']} | {summarise([x['images_per_s'] for x in runs])} | "
                         f"{summarise(ratios)} | {statistics.median(x['wall_s'] for x in runs):.1f} |")
    sims = {p: [x.get("matrix_sum") for x in rows.get(("similarity", p), [])] for p in procs}
    if "similarity" in tasks:
        ref = sims[procs[0]][0]
        worst = max(abs(v - ref) for vs in sims.values() for v in vs)
        lines += ["", f"Similarity matrices agree across process counts: the sum of |CKA| differs by at most "
                      f"{worst:.2e} (of {ref:.1f})."]
    lines += ["", f"Total benchmark time {time.time() - started:.0f} s.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
