"""Benchmark: end-to-end ``surgery reassemble`` time on a real (random-init) 6-model timm zoo.

Usage::

    .venv/bin/python benchmarks/reassemble.py [--models resnet18,...] [--input-size 224]
        [--probe-samples 500] [--stages 4] [--data digits] [--top 5] [--max-gflops G]

Steps, each timed: ``dissect_zoo`` of the models (random init, seeded by name) into a fresh
workspace, ``compute_similarity`` on ``--probe-samples`` Fashion-MNIST images (cache off),
``run_partition`` with K = ``--stages``, then :func:`surgery.reassembly.reassemble` on the target
data (``digits``), whose ``.timings`` split the run into ``prepare`` (nothing left to do here),
``solve`` (load + re-trace the source models, target transform, LogME block quality, candidate and
pair data, the assembly program), ``stitch_fit`` (build the top-N chains, ridge stitches, heads)
and ``proxy`` (re-ranking). What is not in ``.timings`` (zoo points for the Pareto picture) is
reported as ``other``. The MAC budget defaults to the median native model of the zoo so it binds.

Writes the "End to end" section of ``benchmarks/results/assembly.md`` (the rest of that file
belongs to ``benchmarks/assembly.py``). ``--input-size`` below 224 builds the ViTs with
``img_size`` to match (random init, so no pretrained weights are resized).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from random_zoo import zoo_entries  # noqa: E402

from surgery.equivalence import run_partition  # noqa: E402
from surgery.library import dissect_zoo  # noqa: E402
from surgery.reassembly import reassemble  # noqa: E402
from surgery.similarity import compute_similarity  # noqa: E402
from surgery.workspace import Workspace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "assembly.md"
DEFAULT_MODELS = ("resnet18,mobilenetv3_large_100,efficientnet_b0,convnext_atto,"
                  "vit_tiny_patch16_224,deit_tiny_patch16_224")
SECTION = "## End to end"


def write_section(path: Path, body: list[str]) -> None:
    """Replace everything from the "End to end" heading on (append the heading if missing)."""
    text = path.read_text() if path.exists() else "# Assembly program: solver time\n"
    head = text.split(SECTION)[0].rstrip("\n")
    path.write_text(head + "\n\n" + "\n".join([SECTION, "", *body, ""]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated timm names")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--probe-samples", type=int, default=500)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--data", default="digits", help="target data")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--max-gflops", type=float, default=None, help="default: median native model")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed after")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    load0 = os.getloadavg()[0]
    tmp = None
    if args.workdir is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-reassemble-"))
        workdir = tmp / "ws"
    else:
        workdir = args.workdir
        if workdir.exists():
            shutil.rmtree(workdir)
    steps: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        status = dissect_zoo(zoo_entries(names, args.input_size), Workspace(workdir))
        steps["dissect"] = time.perf_counter() - t0
        failed = [f"{s.name}: {s.reason}" for s in status if s.status == "failed"]
        if failed:
            raise SystemExit(f"dissect failed: {failed}")
        gmacs = {s.name: s.macs / 1e9 for s in status}
        max_gflops = args.max_gflops or statistics.median(gmacs.values())
        print(f"dissect {steps['dissect']:.1f}s; GMACs {gmacs}; budget {max_gflops:.3f}", flush=True)

        t0 = time.perf_counter()
        compute_similarity(workdir, "fashion-mnist", samples=args.probe_samples, cache=False)
        steps["similarity"] = time.perf_counter() - t0
        print(f"similarity {steps['similarity']:.1f}s", flush=True)

        t0 = time.perf_counter()
        run_partition(workdir, args.stages, plots=False)
        steps["partition"] = time.perf_counter() - t0
        print(f"partition {steps['partition']:.1f}s", flush=True)

        t0 = time.perf_counter()
        result = reassemble(workdir, max_gflops=max_gflops, data=args.data, top=args.top,
                            out_dir=None, log=lambda s: print("  " + s, flush=True))
        total = time.perf_counter() - t0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    t = dict(result.timings)
    t["other"] = total - sum(result.timings.values())
    t["total"] = total
    best = result.ranked[0]
    cmd = (f"python benchmarks/reassemble.py --models {args.models} --input-size {args.input_size} "
           f"--probe-samples {args.probe_samples} --stages {args.stages} --data {args.data} --top {args.top}"
           + (f" --max-gflops {args.max_gflops}" if args.max_gflops else ""))
    body = [
        f"Command: `{cmd}`",
        "",
        f"Zoo: {len(names)} timm models, random init, at {args.input_size} px "
        f"({', '.join(f'{n} {gmacs[n]:.2f}' for n in names)} GMACs); budget {max_gflops:.3f} GMACs "
        f"(median native model); target `{args.data}` (256 target images), top {args.top} chains, "
        f"proxy LogME, solver CBC. Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with "
        f"another benchmark (load average {load0:.1f} at start), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU only.",
        "",
        "Steps before reassemble:",
        "",
        "| dissect (s) | similarity, " f"{args.probe_samples} images (s) | partition K={args.stages} (s) |",
        "|---|---|---|",
        f"| {steps['dissect']:.1f} | {steps['similarity']:.1f} | {steps['partition']:.1f} |",
        "",
        "`reassemble(...)` (one run; its `.timings`, then the rest of its wall time):",
        "",
        "| " + " | ".join(f"{k.replace('_', ' ')} (s)" for k in t) + " |",
        "|" + "---|" * len(t),
        "| " + " | ".join(f"{v:.1f}" for v in t.values()) + " |",
        "",
        "`load sources` rebuilds and re-traces the source models, transforms the target images and (with "
        "target data) runs every source model on them for the LogME block quality; `solve` builds the "
        "candidate and pair data and runs the assembly program; `stitch fit` runs, for each of the top "
        "chains, the donor and receiver models up to each junction and solves the ridge stitches and the "
        "head; `proxy` runs each chain once more; `other` is what `.timings` does not cover (MAC counts "
        "of the chains, the zoo points of the Pareto picture). "
        f"{len(result.ranked)} chain(s) built; best: {' -> '.join(s.model for s in best.stages)} "
        f"({best.macs / 1e9:.3f} GMACs, {best.params / 1e6:.2f} M params, proxy {best.proxy:.3f}).",
    ]
    if args.input_size != 224:
        body += ["", f"Input size {args.input_size} instead of 224: at 224 the forward passes on this "
                 "shared 2-core machine made the run too long for the time available; every step but "
                 "the assembly program scales with the per-image MACs (about (224/S)^2)."]
    write_section(args.out, body)
    print("\n".join(body))


if __name__ == "__main__":
    main()
