"""Benchmark: ``surgery similarity`` time against bare forward passes, and its peak memory.

Usage::

    .venv/bin/python benchmarks/similarity.py [--samples 2000] [--models resnet18,...]
        [--batch-size 100] [--repeats 3] [--input-size 224] [--interleave]
        [--memory-samples 2000,8000] [--memory-models M,...] [--memory-input-size S] [--no-memory]
        [--no-ratio] [--project-samples 2000] [--prototype-setup REPEATS] [--prototype-pooling REPEATS]

What it measures, on a zoo of random-init timm models dissected into a fresh workspace:

1. **Time ratio.** ``compute_similarity(..., cache=False)`` on ``--samples`` Fashion-MNIST probe
   images, total wall time (probe loading, model rebuild and tracing, feature extraction, streaming
   CKA, writing the matrix), divided by the time of the bare forward passes of the same models
   (``model(transform(batch))`` under ``torch.inference_mode()``, models built beforehand) on the
   same images, in the same batches and order (batch-major, every model per batch), with the same
   transform. The two are alternated (bare first on even repeats, similarity first on odd ones) and
   the ratio is taken per repeat; reported: median, min and max over ``--repeats``. With
   ``--interleave`` each batch's bare passes run right after the similarity run's batch instead (same
   machine load for both; see :func:`run_interleaved`), which a shared machine needs for long runs.
   Goal: <= 1.10 (``GOAL``).
   The similarity run is instrumented (timers around the probe loading, the per-model setup, the
   transform, the pooling, the extractor call, the CKA update and the final write; the cost of the
   timers themselves is a few microseconds per call), so the table shows where any overhead goes.
2. **Peak memory.** For each of ``--memory-samples`` a fresh subprocess runs ``compute_similarity``
   once and reports its max RSS (``getrusage``); the data set is loaded whole, so its own size (the
   source's IDX arrays, kept for the process's lifetime) is subtracted, and the difference between
   the sample counts shows whether memory grows with the number of probe samples.
3. **Projection and prototypes.** ``--project-samples`` projects each repeat's ratio to another sample
   count (fixed costs once, per-batch costs scaled). ``--prototype-setup`` times the extractor setup
   as now (full ``dissect``) against trace-only setup; ``--prototype-pooling`` times one batch through
   the bare models, the extractors as now and extractors that pool right after each cut point (its
   features are checked against the current extractor's). Nothing in ``surgery/`` is changed on disk.

Running it all at 224 px with 2,000 and 8,000 samples takes hours on a small shared CPU machine; the
memory runs accept a smaller zoo and resolution (``--memory-models``, ``--memory-input-size``).

Writes ``benchmarks/results/similarity.md`` (command, tables, ratio). ``--input-size`` below 224
builds ViT-style models with ``img_size`` to match (random init, so nothing is resized).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from random_zoo import dissected_workspace  # noqa: E402

import surgery.features as features_mod  # noqa: E402
import surgery.similarity as sim_mod  # noqa: E402
from surgery.cka import StreamingCKA  # noqa: E402
from surgery.workspace import Workspace  # noqa: E402
from zoo.data import BatchTransform, make_transform  # noqa: E402
from zoo.entries import ZooEntry, build_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "similarity.md"
DEFAULT_MODELS = ("resnet18,mobilenetv3_large_100,efficientnet_b0,convnext_atto,"
                  "vit_tiny_patch16_224,deit_tiny_patch16_224")
DATA = "fashion-mnist"
GOAL = 1.10  # issue 9: similarity wall time / bare forward passes, at 2,000 probe images
SEED = 0

# ------------------------------------------------------------------------------ instrumentation

TIMES: dict[str, float] = defaultdict(float)
_ACTIVE = {"on": False}


def _timed(name: str, fn):
    def wrapper(*args, **kwargs):
        if not _ACTIVE["on"]:
            return fn(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - t0

    wrapper.__name__ = getattr(fn, "__name__", name)
    wrapper.__wrapped__ = fn
    return wrapper


def install_timers() -> None:
    """Wrap the phases of ``compute_similarity`` with accumulating timers (only while active)."""
    sim_mod.probe_images = _timed("probe images", sim_mod.probe_images)
    sim_mod._ModelFeatures.__init__ = _timed("model setup (build, trace)", sim_mod._ModelFeatures.__init__)
    sim_mod._ModelFeatures.features = _timed("features (transform+forward+pool)", sim_mod._ModelFeatures.features)
    BatchTransform.__call__ = _timed("transform", BatchTransform.__call__)
    StreamingCKA.update = _timed("CKA update", StreamingCKA.update)
    StreamingCKA.compute = _timed("CKA compute", StreamingCKA.compute)
    sim_mod.save_tensors = _timed("write results", sim_mod.save_tensors)
    sim_mod.write_json = _timed("write results", sim_mod.write_json)
    # feature_extractor inserts ``surgery.features.pool_tensor`` by module lookup at build time, so the
    # extractors built while this is patched call the timed version.
    features_mod.pool_tensor = _timed("pooling", features_mod.pool_tensor)


@contextmanager
def active():
    TIMES.clear()
    _ACTIVE["on"] = True
    try:
        yield TIMES
    finally:
        _ACTIVE["on"] = False


# ------------------------------------------------------------------------------ zoo


def make_workspace(root: Path, names: list[str], size: int) -> Workspace:
    return dissected_workspace(root, names, size)


def batch_bounds(n: int, batch_size: int) -> list[int]:
    """The same batches as compute_similarity (a last batch below 4 is folded into the previous one)."""
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 4:
        bounds.pop(-2)
    return bounds


class Bare:
    """The baseline: the same models, transforms, images and batches, plain forward passes."""

    def __init__(self, ws: Workspace, samples: int, batch_size: int):
        self.images = sim_mod.probe_images(DATA, samples, SEED)
        self.bounds = batch_bounds(self.images.shape[0], batch_size)
        self.models = []
        for name in ws.model_names():
            manifest = ws.read_dissection(name)
            cfg = manifest.get("data_config", {})
            transform = make_transform(tuple(manifest["settings"]["input_size"]), cfg.get("mean"), cfg.get("std"))
            model = build_model(ZooEntry.model_validate(manifest["entry"]))
            self.models.append((model, transform))

    def run_batch(self, b: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            chunk = self.images[self.bounds[b]:self.bounds[b + 1]]
            for model, transform in self.models:
                model(transform(chunk))
        return time.perf_counter() - t0

    def run(self) -> float:
        return sum(self.run_batch(b) for b in range(len(self.bounds) - 1))


def run_similarity(ws: Workspace, samples: int, batch_size: int) -> tuple[float, dict[str, float]]:
    with active() as times:
        t0 = time.perf_counter()
        sim_mod.compute_similarity(ws.root, DATA, samples=samples, batch_size=batch_size, seed=SEED, cache=False)
        total = time.perf_counter() - t0
    return total, dict(times)


def run_interleaved(ws: Workspace, bare: Bare, samples: int, batch_size: int) -> tuple[float, float, dict]:
    """Similarity run with the bare forward passes of each batch run right after it (``on_batch``).

    On a machine shared with other jobs the load changes over minutes, so whole runs timed one after
    the other can see very different loads (a 15-minute bare run at load 11 against a similarity run
    at load 4 gave a ratio of 0.36). Interleaved per batch, both variants see the same load. The bare
    time is taken out of the similarity wall time, and the phase timers are off while it runs.
    Returns (similarity seconds, bare seconds, phases).
    """
    bare_s = [0.0]

    def on_batch(done: int, total: int) -> None:
        _ACTIVE["on"] = False
        try:
            bare_s[0] += bare.run_batch(done - 1)
        finally:
            _ACTIVE["on"] = True

    with active() as times:
        t0 = time.perf_counter()
        sim_mod.compute_similarity(ws.root, DATA, samples=samples, batch_size=batch_size, seed=SEED, cache=False,
                                   on_batch=on_batch)
        total = time.perf_counter() - t0
    return total - bare_s[0], bare_s[0], dict(times)


# ------------------------------------------------------------------------------ prototype fix


def _trace_only_dissect(model, input_size, *, name="model", granularity="block", **_):
    """What ``_ModelFeatures`` needs from ``dissect``: only the traced graph (boundaries and specs are in
    the manifest already), so no shape probes, FLOP counting, cut-point search or block pruning."""
    from types import SimpleNamespace

    from surgery.tracing import trace_model

    return SimpleNamespace(graph_module=trace_model(model, name))


def prototype_setup(ws: Workspace, repeats: int) -> list[dict[str, float]]:
    """Per-model setup of compute_similarity as is vs with trace-only setup, alternated."""
    import surgery.dissection as dissection_mod

    settings = {"data": DATA, "samples": 0, "seed": SEED, "batch_size": 100, "prefix": "exclude"}
    init = getattr(sim_mod._ModelFeatures.__init__, "__wrapped__", sim_mod._ModelFeatures.__init__)
    original = dissection_mod.dissect
    rows = []
    for r in range(repeats):
        got = {}
        for variant in (("current", "trace-only") if r % 2 == 0 else ("trace-only", "current")):
            dissection_mod.dissect = original if variant == "current" else _trace_only_dissect
            try:
                t0 = time.perf_counter()
                for name in ws.model_names():
                    obj = object.__new__(sim_mod._ModelFeatures)
                    init(obj, ws, name, settings, False, "cpu")
                got[variant] = time.perf_counter() - t0
            finally:
                dissection_mod.dissect = original
        print(f"prototype setup repeat {r}: {got}", flush=True)
        rows.append(got)
    return rows


def eager_pool_extractor(graph_module, nodes, specs, *, prefix="exclude"):
    """``feature_extractor`` with each pooling node inserted right after its cut node instead of in front of
    the output, so every full-size block output can be freed as soon as the next block has read it."""
    import copy

    from torch import fx

    graph = copy.deepcopy(graph_module.graph)
    by_name = {n.name: n for n in graph.nodes}
    output = next(n for n in graph.nodes if n.op == "output")
    pooled = []
    for name, spec in zip(nodes, specs, strict=True):
        with graph.inserting_after(by_name[name]):
            pooled.append(graph.call_function(features_mod.pool_tensor,
                                              (by_name[name], spec.layout, spec.prefix_tokens, prefix)))
    with graph.inserting_before(output):
        graph.output(tuple(pooled))
    graph.erase_node(output)
    gm = fx.GraphModule(graph_module, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm.eval()


def prototype_pooling(ws: Workspace, batch_size: int, repeats: int) -> dict[str, list[float]]:
    """One batch through every model: bare model, extractor as now, eager-pooling extractor; alternated."""
    from surgery.spec import TensorSpec
    from surgery.tracing import trace_model

    images = sim_mod.probe_images(DATA, batch_size, SEED)
    runs = []
    for name in ws.model_names():
        manifest = ws.read_dissection(name)
        cfg = manifest.get("data_config", {})
        x = make_transform(tuple(manifest["settings"]["input_size"]), cfg.get("mean"), cfg.get("std"))(images)
        model = build_model(ZooEntry.model_validate(manifest["entry"]))
        nodes = list(manifest["boundaries"])
        cut = {c["name"]: TensorSpec.from_dict(c["spec"]) for c in manifest["cut_points"]}
        specs = [cut[n] for n in nodes]
        gm = trace_model(model, name)
        now = features_mod.feature_extractor(gm, nodes, specs)
        eager = eager_pool_extractor(gm, nodes, specs)
        with torch.inference_mode():
            same = all(torch.equal(a, b) for a, b in zip(now(x[:4]), eager(x[:4]), strict=True))
        if not same:
            raise SystemExit(f"{name}: eager pooling changed the features")
        runs.append((model, now, eager, x))
    times: dict[str, list[float]] = {"bare": [], "now": [], "eager": []}
    variants = list(times)
    for r in range(repeats):
        for v in variants[r % 3:] + variants[:r % 3]:  # rotate the order
            t0 = time.perf_counter()
            with torch.inference_mode():
                for model, now, eager, x in runs:
                    {"bare": model, "now": now, "eager": eager}[v](x)
            times[v].append(time.perf_counter() - t0)
        print(f"prototype pooling repeat {r}: { {k: round(v[-1], 2) for k, v in times.items()} }", flush=True)
    return times


# ------------------------------------------------------------------------------ memory


def memory_child(args) -> None:
    """In a fresh process: load the data set, run compute_similarity once, print RSS figures as JSON."""
    from zoo.data import _fashion_mnist_source, load_split

    def rss_now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    before = rss_now()
    ds = load_split(DATA, "train", seed=SEED)
    probe_bytes = args.samples * ds.images[0].numel()
    del ds  # compute_similarity loads its own copy of the split (freed once the probe set is drawn)
    source = _fashion_mnist_source()  # the IDX arrays, cached for the process's lifetime
    pools = [p for p in (source.dev, source.test) if p is not None]
    pool_bytes = sum(p.images.nbytes + p.labels.nbytes for p in pools)
    after_data = rss_now()
    t0 = time.perf_counter()
    sim_mod.compute_similarity(args.workdir, DATA, samples=args.samples, batch_size=args.batch_size,
                               seed=SEED, cache=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"samples": args.samples, "rss_before_data": before, "rss_after_data": after_data,
                      "dataset_bytes": pool_bytes, "probe_bytes": probe_bytes,
                      "peak_rss": peak, "seconds": seconds}))


def memory_runs(args, names: list[str], size: int, counts: list[int], root: Path) -> list[dict]:
    ws = make_workspace(root / f"mem-ws-{size}", names, size)
    rows = []
    for n in counts:
        cmd = [sys.executable, __file__, "--memory-child", "--workdir", str(ws.root), "--samples", str(n),
               "--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"memory: {row}", flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ main


def mb(x: float) -> str:
    return f"{x / 2**20:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated timm names")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--memory-samples", default="2000,8000")
    ap.add_argument("--memory-models", default=None, help="default: --models")
    ap.add_argument("--memory-input-size", type=int, default=None, help="default: --input-size")
    ap.add_argument("--project-samples", type=int, default=2000,
                    help="also project the ratio to this many samples from the fixed and per-batch parts")
    ap.add_argument("--prototype-setup", type=int, default=0, metavar="REPEATS",
                    help="also time the per-model setup with the suggested trace-only fix, alternated")
    ap.add_argument("--prototype-pooling", type=int, default=0, metavar="REPEATS",
                    help="also time one batch: bare model vs extractor as now vs eager pooling, rotated")
    ap.add_argument("--interleave", action="store_true",
                    help="run each batch's bare forward passes right after its similarity batch (same load for both)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-ratio", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args)
        return

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    mem_names = [n.strip() for n in (args.memory_models or args.models).split(",") if n.strip()]
    mem_size = args.memory_input_size or args.input_size
    counts = [int(c) for c in args.memory_samples.split(",") if c.strip()]
    load0 = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="bench-similarity-"))
    rows, mem, proto, pool = [], [], [], {}

    def write_report(final: bool) -> None:
        """Write the report so far (after every repeat too, so a run cut short still leaves its figures)."""
        cmd = (f"python benchmarks/similarity.py --samples {args.samples} --models {args.models} "
               f"--batch-size {args.batch_size} --repeats {args.repeats} --input-size {args.input_size}"
               + (f" --memory-samples {args.memory_samples}" if not args.no_memory else " --no-memory")
               + (f" --memory-models {args.memory_models}" if args.memory_models else "")
               + (f" --memory-input-size {args.memory_input_size}" if args.memory_input_size else "")
               + (" --interleave" if args.interleave else "")
               + (" --no-ratio" if args.no_ratio else "")
               + (f" --prototype-setup {args.prototype_setup}" if args.prototype_setup else "")
               + (f" --prototype-pooling {args.prototype_pooling}" if args.prototype_pooling else ""))
        lines = [
            "# Similarity: time against bare forward passes, and peak memory",
            "",
            f"Command: `{cmd}`",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with another benchmark (load average "
            f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at {'end' if final else 'last report'}), "
            f"Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), CPU only. Models random init; probe data {DATA} "
            "(28x28 grey, resized per batch by each model's transform).",
            "",
        ]
        if rows:
            ratios = [r["ratio"] for r in rows]
            med = statistics.median(ratios)
            n_batches = len(batch_bounds(min(args.samples, 48000), args.batch_size)) - 1
            lines += [
                "## Time",
                "",
                f"{len(names)} models ({', '.join(names)}) at {args.input_size} px, {args.samples} probe images, "
                f"batch {args.batch_size} ({n_batches} batches), `compute_similarity(..., cache=False)` vs bare "
                "forward passes, " + ("interleaved per batch (each batch's bare passes right after its "
                                      "similarity batch, their time taken out of the similarity wall time)"
                                      if args.interleave else "alternated") + ", one ratio per repeat.",
                "",
                "| repeat | order | bare forward (s) | similarity (s) | ratio |",
                "|---|---|---|---|---|",
            ]
            for i, r in enumerate(rows):
                order = ("interleaved per batch" if args.interleave
                     else "bare, similarity" if i % 2 == 0 else "similarity, bare")
                lines.append(f"| {i} | {order} | {r['bare']:.1f} | {r['sim']:.1f} | {r['ratio']:.3f} |")
            fixed_keys = ("probe images", "model setup (build, trace)", "CKA compute", "write results")
            proj = []
            if args.project_samples and args.project_samples != args.samples:
                k = (len(batch_bounds(args.project_samples, args.batch_size)) - 1) / n_batches
                for r in rows:
                    fixed = sum(r["phases"].get(key, 0.0) for key in fixed_keys)
                    proj.append((fixed + k * (r["sim"] - fixed)) / (k * r["bare"]))
            lines += [
                "",
                f"**Ratio: median {med:.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} repeats); "
                f"goal <= {GOAL:.2f}: {'met' if med <= GOAL else 'NOT met'}.**",
                "",
                *([f"Projected to {args.project_samples} samples (same per-batch costs, the fixed costs - probe "
                   f"loading, model setup, CKA compute, writing - paid once): median {statistics.median(proj):.3f} "
                   f"(min {min(proj):.3f}, max {max(proj):.3f}).", ""] if proj else []),
                "Where the similarity run's time goes (median over repeats; nested phases are indented, "
                "`forward (rest)` = features minus transform and pooling, i.e. the traced extractor itself):",
                "",
                "| phase | seconds | share of similarity | share of bare forward |",
                "|---|---|---|---|",
            ]
            keys = sorted({k for r in rows for k in r["phases"]})
            phases = {k: statistics.median(r["phases"].get(k, 0.0) for r in rows) for k in keys}
            phases["forward (rest)"] = statistics.median(
                r["phases"].get("features (transform+forward+pool)", 0.0) - r["phases"].get("transform", 0.0)
                - r["phases"].get("pooling", 0.0) for r in rows)
            sim_med = statistics.median(r["sim"] for r in rows)
            bare_med = statistics.median(r["bare"] for r in rows)
            accounted = sum(phases.get(k, 0.0) for k in ("probe images", "model setup (build, trace)",
                                                          "features (transform+forward+pool)", "CKA update",
                                                          "CKA compute", "write results"))
            phases["other (loop, workspace reads)"] = sim_med - accounted
            order = ["probe images", "model setup (build, trace)", "features (transform+forward+pool)",
                     "  transform", "  pooling", "  forward (rest)", "CKA update", "CKA compute", "write results",
                     "other (loop, workspace reads)"]
            for label in order:
                k = label.strip()
                if k in phases:
                    v = phases[k]
                    lines.append(f"| {label.replace('  ', '&nbsp;&nbsp;')} | {v:.2f} | {100 * v / sim_med:.1f}% | "
                                 f"{100 * v / bare_med:.1f}% |")
            lines.append(f"| bare forward (transform included) | {bare_med:.2f} | | 100% |")
            lines.append("")
        if proto:
            cur = statistics.median(p["current"] for p in proto)
            new = statistics.median(p["trace-only"] for p in proto)
            lines += [
                "## Prototype: trace-only model setup",
                "",
                f"Setup of the {len(names)} feature extractors (`_ModelFeatures.__init__`: rebuild the model, then "
                "`dissect` as now, or only `trace_model`; the boundaries and specs come from the manifest either "
                f"way), alternated, {len(proto)} repeats: median {cur:.1f} s now vs {new:.1f} s trace-only "
                f"({cur - new:.1f} s saved per similarity run, x{cur / new:.1f}).",
                "",
            ]
        if pool:
            med = {k: statistics.median(v) for k, v in pool.items()}
            lines += [
                "## Prototype: pooling right after each cut point",
                "",
                f"One batch of {args.batch_size} probe images through each of the {len(names)} models at "
                f"{args.input_size} px (transform done beforehand), {len(pool['bare'])} repeats, order rotated: the "
                "bare model, the extractor as now (`surgery.features.feature_extractor`: every pooling node in "
                "front of the output, so all block outputs stay alive to the end of the forward) and the same "
                "extractor with each pooling node inserted right after its cut node (identical features, "
                "checked with `torch.equal`).",
                "",
                "| variant | median (s) | min (s) | max (s) | vs bare |",
                "|---|---|---|---|---|",
            ]
            for k, label in (("bare", "bare model"), ("now", "extractor as now"), ("eager", "eager pooling")):
                lines.append(f"| {label} | {med[k]:.2f} | {min(pool[k]):.2f} | {max(pool[k]):.2f} | "
                             f"{med[k] / med['bare']:.3f} |")
            lines.append("")
        if mem:
            lines += [
                "## Peak memory",
                "",
                f"{len(mem_names)} models ({', '.join(mem_names)}) at {mem_size} px, batch {args.batch_size}; "
                "one fresh subprocess per sample count running `compute_similarity(..., cache=False)` once; "
                "peak = max RSS (`getrusage`). The data set is loaded whole: its IDX arrays (60k train + 10k "
                "test images, kept for the process's lifetime) are subtracted; the split copies made while "
                "drawing the probe set are freed before the forward passes.",
                "",
                "| samples | peak RSS (MiB) | data set (MiB) | peak minus data set (MiB) | probe images (MiB) | "
                "RSS after imports (MiB) | run (s) |",
                "|---|---|---|---|---|---|---|",
            ]
            for m in mem:
                lines.append(f"| {m['samples']} | {mb(m['peak_rss'])} | {mb(m['dataset_bytes'])} | "
                             f"{mb(m['peak_rss'] - m['dataset_bytes'])} | {m['probe_bytes'] / 2**20:.1f} | "
                             f"{mb(m['rss_before_data'])} | {m['seconds']:.0f} |")
            if len(mem) >= 2:
                d = mem[-1]["peak_rss"] - mem[0]["peak_rss"]
                dp = mem[-1]["probe_bytes"] - mem[0]["probe_bytes"]
                lines += ["", f"Peak RSS difference {mem[-1]['samples']} vs {mem[0]['samples']} samples: "
                          f"{d / 2**20:+.1f} MiB (the probe images themselves account for {dp / 2**20:+.1f} MiB)."]
            lines.append("")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines))
        if final:
            print("\n".join(lines))

    install_timers()
    try:
        if not args.no_ratio:
            ws = make_workspace(root / "ws", names, args.input_size)
            bare = Bare(ws, args.samples, args.batch_size)
            with torch.inference_mode():  # warm-up (4 images): one-time library and thread-pool setup
                for model, transform in bare.models:
                    model(transform(bare.images[:4]))
            for r in range(args.repeats):
                order = ("bare", "sim") if r % 2 == 0 else ("sim", "bare")
                got = {}
                if args.interleave:
                    got["sim"], got["bare"], got["phases"] = run_interleaved(ws, bare, args.samples, args.batch_size)
                    order = ()
                for what in order:
                    if what == "bare":
                        got["bare"] = bare.run()
                    else:
                        got["sim"], got["phases"] = run_similarity(ws, args.samples, args.batch_size)
                got["ratio"] = got["sim"] / got["bare"]
                print(f"repeat {r}: bare {got['bare']:.1f}s similarity {got['sim']:.1f}s "
                      f"ratio {got['ratio']:.3f} phases { {k: round(v, 2) for k, v in got['phases'].items()} }",
                      flush=True)
                rows.append(got)
                write_report(final=False)
            del bare
        if args.prototype_setup:
            if args.no_ratio:
                ws = make_workspace(root / "ws", names, args.input_size)
            proto = prototype_setup(ws, args.prototype_setup)
        if args.prototype_pooling:
            if args.no_ratio and not args.prototype_setup:
                ws = make_workspace(root / "ws", names, args.input_size)
            pool = prototype_pooling(ws, args.batch_size, args.prototype_pooling)
        if not args.no_memory:
            mem = memory_runs(args, mem_names, mem_size, counts, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_report(final=True)



if __name__ == "__main__":
    main()
