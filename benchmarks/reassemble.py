"""Benchmark: end-to-end ``surgery reassemble`` time on a real (random-init) 6-model timm zoo.

Usage::

    .venv/bin/python benchmarks/reassemble.py [--models resnet18,...] [--input-size 224]
        [--probe-samples 500] [--stages 4] [--data digits] [--top 5] [--max-gflops G]
        [--proxy linear] [--threads T] [--repeats 2] [--no-cli]

Steps, each timed: ``dissect_zoo`` of the models (random init, seeded by name) into a fresh
workspace, ``compute_similarity`` on ``--probe-samples`` Fashion-MNIST images (cache off),
``run_partition`` with K = ``--stages``; then ``--repeats`` runs of
:func:`surgery.reassembly.reassemble` on the target data (``digits``, 256 images), each writing the
model folder, whose ``.timings`` split the run into phases (what they do not cover is ``other``),
and one run of the ``surgery reassemble`` CLI in a subprocess on the same workspace (``--no-cli``
skips it).

The reference is the bare forward time of the same top-N built chains (``ranked[i].model``) on the
same target images: one inference-mode forward of the 256 images per chain, same threads, same
batch, summed over the chains. The issue's figure of merit is end-to-end time / that bare time.
The MAC budget defaults to the median native model of the zoo so it binds.

Writes the "End to end" section of ``benchmarks/results/assembly.md`` (the rest of that file
belongs to ``benchmarks/assembly.py``). ``--input-size`` below 224 builds the ViTs with
``img_size`` to match (random init, so no pretrained weights are resized).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from random_zoo import zoo_entries  # noqa: E402

from surgery.baseline import DEFAULT_PROXY  # noqa: E402
from surgery.equivalence import run_partition  # noqa: E402
from surgery.library import dissect_zoo  # noqa: E402
from surgery.reassembly import _target_batches, _transform, reassemble  # noqa: E402
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


def bare_forward(workdir: Path, result, data: str, samples: int = 256, seed: int = 0) -> float:
    """Seconds of one inference-mode forward of the target images through each ranked chain, summed.

    The images are drawn and transformed as :func:`surgery.reassembly.reassemble` does (same seed and
    count), for each chain's first model; the transform is not timed.
    """
    ws = Workspace(workdir)
    images, _, _ = _target_batches(data, seed, samples)
    total = 0.0
    for r in result.ranked:
        x = _transform(ws.read_dissection(r.stages[0].model))(images)
        model = r.model.eval()
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(x)
            total += time.perf_counter() - t0
    return total


def cli_run(workdir: Path, out: Path, args, max_gflops: float) -> float:
    """Wall seconds of ``surgery reassemble`` in a subprocess (imports, loading and saving included)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "surgery.cli", "reassemble", str(workdir), "--max-gflops", repr(max_gflops),
           "--data", args.data, "--top", str(args.top), "--proxy", args.proxy, "--out", str(out), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"surgery reassemble failed:\n{proc.stdout}\n{proc.stderr}")
    json.loads(proc.stdout)  # a complete run prints its JSON summary
    return wall


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated timm names")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--probe-samples", type=int, default=500)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--data", default="digits", help="target data")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--proxy", default=DEFAULT_PROXY)
    ap.add_argument("--max-gflops", type=float, default=None, help="default: median native model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=2, help="reassemble() runs (mean and range reported)")
    ap.add_argument("--no-cli", action="store_true", help="skip the 'surgery reassemble' subprocess run")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed after")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-reassemble-"))
    if args.workdir is None:
        workdir = tmp / "ws"
    else:
        workdir = args.workdir
        if workdir.exists():
            shutil.rmtree(workdir)
    steps: dict[str, float] = {}
    runs: list[dict[str, float]] = []
    cli_wall = None
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

        for i in range(args.repeats):
            t0 = time.perf_counter()
            result = reassemble(workdir, max_gflops=max_gflops, data=args.data, top=args.top, proxy=args.proxy,
                                out_dir=tmp / f"model{i}", log=lambda s: print("  " + s, flush=True))
            total = time.perf_counter() - t0
            t = {"load_sources": 0.0, "solve": 0.0, "stitch_fit": 0.0, "proxy": 0.0, "count": 0.0,
                 "zoo_points": 0.0, "save": 0.0}
            t.update({k: v for k, v in result.timings.items() if k != "prepare"})
            t["other"] = total - sum(result.timings.values())
            t["total"] = total
            t["bare forward"] = bare_forward(workdir, result, args.data)
            t["ratio"] = total / t["bare forward"]
            runs.append(t)
            print(f"run {i}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()), flush=True)
        if not args.no_cli:
            cli_wall = cli_run(workdir, tmp / "model-cli", args, max_gflops)
            print(f"cli {cli_wall:.1f}s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    keys = list(runs[0])
    bare = statistics.mean(r["bare forward"] for r in runs)
    best = result.ranked[0]
    cmd = (f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/reassemble.py --models {args.models} "
           f"--input-size {args.input_size} --probe-samples {args.probe_samples} --stages {args.stages} "
           f"--data {args.data} --top {args.top} --proxy {args.proxy} --repeats {args.repeats}"
           + (f" --threads {args.threads}" if args.threads else "")
           + (f" --max-gflops {args.max_gflops}" if args.max_gflops else "") + (" --no-cli" if args.no_cli else ""))
    body = [
        f"Command: `{cmd}`",
        "",
        f"Zoo: {len(names)} timm models, random init, at {args.input_size} px "
        f"({', '.join(f'{n} {gmacs[n]:.2f}' for n in names)} GMACs); budget {max_gflops:.3f} GMACs "
        f"(median native model); target `{args.data}` (256 target images), top {args.top} chains, "
        f"proxy {args.proxy}, solver CBC. Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with "
        f"other jobs (load average {load0:.1f} at start), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), CPU only.",
        "",
        "Steps before reassemble:",
        "",
        "| dissect (s) | similarity, " f"{args.probe_samples} images (s) | partition K={args.stages} (s) |",
        "|---|---|---|",
        f"| {steps['dissect']:.1f} | {steps['similarity']:.1f} | {steps['partition']:.1f} |",
        "",
        f"`reassemble(...)`, {len(runs)} run(s) writing the model folder (mean, and range when several): its "
        "`.timings`, the rest of its wall time (`other`), the total, the bare forward time of its top-N chains "
        "and the ratio total / bare forward:",
        "",
        "| " + " | ".join(k.replace("_", " ") + ("" if k == "ratio" else " (s)") for k in keys) + " |",
        "|" + "---|" * len(keys),
        "| " + " | ".join(_mean_spread([r[k] for r in runs]) for k in keys) + " |",
        "",
    ]
    if cli_wall is not None:
        body += [f"`surgery reassemble` in a subprocess on the same workspace (imports, loading, saving, the "
                 f"Pareto picture): {cli_wall:.1f} s, ratio {cli_wall / bare:.2f} to the mean bare forward time "
                 f"({bare:.2f} s).", ""]
    body += [
        "Bare forward: one inference-mode forward of the 256 target images (one batch) through each of the "
        f"{len(result.ranked)} built chains, summed, same threads. `load sources` rebuilds the source models, "
        "traces and probes each headless copy once, transforms the target images and (with target data) runs "
        "every source model once on them: the pre-logits features serve the LogME block quality and the zoo "
        "points, the activations at the stage boundaries serve the stitches. `solve` builds the candidate and "
        "pair data and runs the assembly program; `stitch fit` cuts the chains' blocks from the held "
        "dissections, fits the ridge stitches and runs each chain from its first stitch on for the head; "
        "`proxy` scores those same features; `count` sums the stored block, stitch and head MACs (no counted "
        "forward); `zoo points` scores the zoo models on the held features; `save` writes the model folder and "
        "the Pareto picture. "
        f"{len(result.ranked)} chain(s) built; best: {' -> '.join(s.model for s in best.stages)} "
        f"({best.macs / 1e9:.3f} GMACs, {best.params / 1e6:.2f} M params, proxy {best.proxy:.3f}).",
    ]
    if args.input_size != 224:
        body += ["", f"Input size {args.input_size} instead of 224: at 224 the forward passes on this "
                 "shared 2-core machine made the run too long for the time available; every step but "
                 "the assembly program and the tracing scales with the per-image MACs (about (224/S)^2)."]
    write_section(args.out, body)
    print("\n".join(body))


if __name__ == "__main__":
    main()
