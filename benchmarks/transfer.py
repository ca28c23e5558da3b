"""Benchmark: does reassembly transfer better than honest alternatives? (``benchmarks/results/transfer.md``)

Measures held-out test top-1 on a target no zoo model was trained on (``digits``: scikit-learn's
8x8 digits upsampled to 32x32) after fine-tuning, for two MAC budgets and several seeds, of:

1. ``reassembled``: the chain picked by the assembly program and re-ranked by the default proxy,
   the linear probe (:func:`surgery.reassembly.reassemble` on the similarity partition; runs before
   the switch used LogME);
2. ``best single``: every zoo model that fits the budget, given a new head by
   :func:`surgery.reassembly.single_model` and fine-tuned; the one with the best VALIDATION
   accuracy is reported (its test accuracy);
3. ``scratch``: the architecture of (1) with random weights (:func:`surgery.assembled.rebuild`);
4. ``random chain``: one block per equivalence set drawn uniformly at random, rejection-sampled
   until the built chain fits the budget (stitches and head fitted like (1));
5. ``random partition``: DeRy's ablation: every model cut by :func:`solvers.partition.random_partition`
   into the same K stages (same balance limit), written as ``partition.json`` of a copy of the
   workspace, and the reassembly run on it.

All of them are fine-tuned with one recipe (:func:`surgery.training.finetune.finetune_model_dir`: AdamW,
batch 64, lr 1e-3, 1 warm-up epoch, cosine, label smoothing 0.1, ``--epochs`` epochs) on the same
train/val/test split of each seed. Seeds vary the train/val split (the test split is fixed), the
target images the stitches/heads are fitted on, the random draws and the fine-tuning. The workspace
(dissect, Fashion-MNIST similarity, partition) is computed once. Reported accuracy is the model
after the last epoch; selection (best single) uses that model's validation accuracy.

It also measures how well training-free proxies rank candidates: Kendall tau between each proxy
(``logme``, ``linear``, ``naswot``, computed on the built pretrained chains before fine-tuning) and
the fine-tuned test / val accuracy, next to the parameter-count baseline. Candidates: every
pretrained model fine-tuned in a seed (reassembled, random chains, random-partition picks, fitting
single models) plus, on the first seed, the next ``--extra-top`` chains of each budget's top-N.

The default budgets sit between consecutive zoo models' MACs (after the 2nd and the 4th smallest of
7), so that some zoo models fit and some do not. The pretrained mini-zoo must be complete
(``surgery zoo build-mini``); this script never trains it, except the quick one with ``--quick``.

Run::

    .venv/bin/python benchmarks/transfer.py --seeds 0 1 2 --epochs 5   # the published run (~40 fine-tunes)
    .venv/bin/python benchmarks/transfer.py                            # defaults: 3 seeds, 8 epochs
    .venv/bin/python benchmarks/transfer.py --resume ...               # after an interruption
    .venv/bin/python benchmarks/transfer.py --quick                    # smoke run on the quick mini-zoo

Cost: about 40 fine-tunings of ~1,300 images x epochs, two at a time (``--jobs``), one torch thread
per process (two threads on a busy 2-core machine were ~25x slower); 5 epochs took ~35 min on a
2-core machine shared with other jobs, so the default 8 epochs needs a quiet machine for ~20 min.

Writes ``--out``/transfer.md and transfer.png (default ``benchmarks/results``; with ``--quick`` a
folder under the work directory), and the raw numbers to ``WORK/transfer.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

TARGET = "digits"
PROBE = "fashion-mnist"
PROXIES = ("logme", "linear", "naswot")
METHODS = ("reassembled", "best single", "scratch", "random chain", "random partition", "aligned",
           "aligned + teacher", "best single + teacher")
TARGET_SAMPLES = 256  # reassemble()'s default: labelled images for head and proxies
UNLABELED = 1024  # reassemble()'s default: unlabelled training images the stitches are fitted on
KD_UNLABELED = 64  # unlabelled images per step in the "+ teacher" methods' distillation term
# The proxy that picks the "reassembled" chain: reassemble()'s default, the linear probe, chosen because
# this benchmark measured it as the best predictor of fine-tuned accuracy (Kendall tau-b +0.59 ± 0.07
# against LogME's +0.48 ± 0.13 over 3 seeds, README). When this benchmark changes, re-measure and let
# surgery.baseline.DEFAULT_PROXY follow the best proxy of the report's tau table.
PICK_PROXY = "linear"


def describe_target() -> str:
    """One phrase on the target data for the report."""
    from zoo.data import parse_spec

    spec = parse_spec(TARGET)
    if spec.kind == "digits":
        text = "scikit-learn digits, 10 classes, 8x8 upsampled to 32x32; no zoo model saw it"
    elif spec.kind == "fashion-mnist":
        text = (f"Fashion-MNIST, classes {','.join(spec.classes or ['all'])}; the mini-zoo was pre-trained on "
                "Fashion-MNIST classes 0-4 (fm04), 5-9 (fm59) or all (fmall), so every source saw some or all "
                "of these classes: not a clean transfer target, used for its large test split")
    else:
        text = f"{spec.kind}"
    if spec.train_per_class is not None:
        text += f"; at most {spec.train_per_class} labelled training images per class, val and test untouched"
    return text


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ setup


def zoo_file(quick: bool) -> Path:
    """The mini-zoo's zoo file; the real zoo must be complete (this script never trains it)."""
    from surgery.minizoo import README_FILE, ZOO_FILE, build_mini_zoo, default_mini_zoo_dir
    from zoo.mini import MINI_ZOO

    if quick:
        return build_mini_zoo(quick=True, quiet=True)
    folder = default_mini_zoo_dir()
    readme = folder / README_FILE
    text = readme.read_text() if readme.exists() else ""
    missing = [s.name for s in MINI_ZOO if f"| {s.name} |" not in text]
    if missing or not (folder / ZOO_FILE).exists():
        sys.exit(f"the mini-zoo in {folder} is incomplete (missing: {', '.join(missing)}); "
                 "build it first (surgery zoo build-mini)")
    return build_mini_zoo(quiet=True)  # complete: returns the cached zoo file


def zoo_fingerprint(zoo_path: Path) -> str:
    """Hash of the zoo's cards (config hashes, weight checksums): a new zoo gets a new workspace."""
    from surgery.minizoo import CARDS_FILE

    cards = zoo_path.parent / CARDS_FILE
    data = cards.read_bytes() if cards.exists() else zoo_path.read_bytes()
    try:
        parsed = json.loads(data)
        models = parsed.get("models", parsed)
        keep = {n: {k: c.get(k) for k in ("config_hash", "weights_sha256")} for n, c in models.items()
                if isinstance(c, dict)}
        data = json.dumps(keep, sort_keys=True).encode()
    except (ValueError, AttributeError):
        pass
    return hashlib.sha256(data).hexdigest()[:10]


def prepare_workspace(zoo_path: Path, root: Path, stages: int, samples: int):
    """Dissect + similarity + partition, once (cached in ``root``)."""
    from surgery.equivalence import run_partition
    from surgery.library import dissect_zoo
    from surgery.similarity import compute_similarity
    from surgery.workspace import Workspace
    from zoo.entries import resolve_zoo

    ws = Workspace(root)
    results = dissect_zoo(resolve_zoo(str(zoo_path)), ws)
    for r in results:
        if r.status == "failed":
            log(f"  dissect {r.name}: failed: {r.reason}")
    sim_path = ws.root / "similarity" / "similarity.json"
    if not sim_path.exists() or json.loads(sim_path.read_text())["settings"].get("samples") != samples:
        compute_similarity(ws.root, PROBE, samples=samples, seed=0)
    patch_nan_similarity(ws)
    part_path = ws.root / "partition.json"
    part = json.loads(part_path.read_text()) if part_path.exists() else None
    if part is None or part.get("stages") != stages:
        part = run_partition(ws.root, stages, seed=0, relax_eps=True)
    return ws, part


def patch_nan_similarity(ws) -> int:
    """Work around run_partition's refusal of NaN CKA (degenerate, near-constant cut points).

    :class:`surgery.cka` returns NaN for a representation with (numerically) zero variance, which
    badly trained models (the quick mini-zoo) have late in the network; ``run_partition`` passes
    the NaN to the solver, which raises. Reassembly already reads NaN as 0 (dissimilar), so the
    same is written into this workspace's matrix. Returns the number of entries replaced.
    """
    from surgery.workspace import load_tensors, save_tensors

    path = ws.root / "similarity" / "cka.safetensors"
    tensors = load_tensors(path)
    bad = int(torch.isnan(tensors["cka"]).sum())
    if bad:
        log(f"  similarity: {bad} NaN CKA entries (near-constant cut points) set to 0 (workaround)")
        tensors["cka"] = torch.nan_to_num(tensors["cka"], nan=0.0)
        save_tensors(path, tensors)
    return bad


def default_budgets(ws, part) -> list[float]:
    """Two GFLOPs budgets between consecutive zoo models' MACs (some models fit, some do not)."""
    macs = sorted(ws.read_index()["models"][n]["macs"] for n in part["models"])
    n = len(macs)
    picks = sorted({max(1, round(n * q)) for q in (1 / 3, 2 / 3)})
    out = []
    for i in picks:
        i = min(i, n - 1)
        out.append((macs[i - 1] + macs[i]) / 2 / 1e9)
    return out


def write_random_partition(ws, part: dict[str, Any], dest: Path, seed: int) -> dict[str, Any]:
    """A copy of the workspace whose partition.json cuts every model at random (same K and eps)."""
    from solvers.partition import random_partition
    from surgery.equivalence import PARTITION_SCHEMA, _candidates, _stage_blocks
    from surgery.workspace import write_json

    if not (dest / "workspace.json").exists():
        shutil.copytree(ws.root, dest, ignore=shutil.ignore_patterns("partition", "partition.json"),
                        dirs_exist_ok=True)
    names = list(part["models"])
    manifests = {n: ws.read_dissection(n) for n in names}
    cands, cums, totals = [], [], []
    for n in names:
        c, cum, tot = _candidates(manifests[n])
        cands.append(c)
        cums.append(cum)
        totals.append(tot)
    K = part["stages"]
    # the same balance as the CKA partition, model by model (the default relaxes it per model)
    eps = [part["models"][n].get("eps_used", part["eps"]) for n in names]
    cuts = random_partition(cums, totals, K, eps=eps, seed=seed)
    models_out = {}
    for i, n in enumerate(names):
        models_out[n] = {"cuts": [cands[i][c] for c in cuts[i]], "stage_blocks": _stage_blocks(manifests[n], cuts[i]),
                         "total_macs": int(totals[i])}
    sets = [{"stage": k, "members": [{"model": n, **models_out[n]["stage_blocks"][k]} for n in names]}
            for k in range(K)]
    manifest = {"schema": PARTITION_SCHEMA, "stages": K, "eps": part["eps"], "seed": seed, "restarts": 0,
                "objective": float("nan"), "random": True, "similarity": part.get("similarity"),
                "anchors": [], "models": models_out, "sets": sets}
    write_json(dest / "partition.json", manifest)
    return manifest


# ------------------------------------------------------------------------------------------ chains


def signature(stages) -> tuple:
    return tuple((s.model, s.start, s.end) for s in stages)


def chain_label(stages) -> str:
    return " > ".join(s.model for s in stages)


def proxy_scores(model, src, first: str) -> dict[str, float]:
    from surgery.count import count_params
    from surgery.proxy import ProxyError, score_candidate

    x = src.inputs[first]
    out = {}
    for p in PROXIES:
        try:
            out[p] = float(score_candidate(model, [x], src.labels, proxy=p,
                                           feature_fn=lambda m, xb: m.forward_features(xb)))
        except ProxyError as e:  # NASWOT finds no activation module to hook (see the report)
            log(f"    proxy {p} failed on {first}...: {e}")
            out[p] = float("nan")
    out["params"] = float(count_params(model))
    return out


def estimate_macs(src, chain, members, num_classes: int) -> int:
    """Cheap MAC estimate of a chain (blocks + stitches + new head), to reject draws before building."""
    from surgery.reassembly import _classifier_cost, junction_cost

    total = 0
    K = len(chain)
    for k, plan in enumerate(chain):
        total += members[k]["macs"]
        if k == K - 1:
            _, om, _, nm = _classifier_cost(src.models[plan.model], plan.input_size, num_classes)
            total += nm - om
        if k > 0 and not (chain[k - 1].model == plan.model and chain[k - 1].end == plan.start):
            # priced with the receiver's real token context, exactly as the stitch will be built
            _, m = junction_cost(src.models[plan.model], chain[k - 1].out_spec, plan.in_spec)
            total += m
    return int(total)


def random_chain(src, part, budget_macs: int, rng: np.random.Generator, tries: int = 5000):
    """One member per equivalence set, uniformly at random, until the built chain fits the budget."""
    from surgery.count import count_macs
    from surgery.reassembly import build_chain

    K = part["stages"]
    members = [[m for m in part["sets"][k]["members"] if m["model"] in src.plans[k]] for k in range(K)]
    num_classes = len(src.classes)
    for t in range(1, tries + 1):
        drawn = [members[k][int(rng.integers(len(members[k])))] for k in range(K)]
        chain = [src.plans[k][m["model"]] for k, m in enumerate(drawn)]
        try:
            est = estimate_macs(src, chain, drawn, num_classes)
        except Exception:  # noqa: BLE001 - an impossible junction: draw again
            continue
        if est > budget_macs * 1.02:
            continue
        try:
            model = build_chain(src.models, src.dissections, chain, src.inputs, src.labels, num_classes,
                                stitch_inputs=src.stitch_inputs)
        except Exception as e:  # noqa: BLE001
            log(f"    random chain {chain_label(chain)} failed to build ({e}); drawing again")
            continue
        macs = count_macs(model, torch.zeros(1, *chain[0].input_size))
        if macs <= budget_macs:
            return chain, model, macs, t
    return None, None, None, tries


# ------------------------------------------------------------------------------------------ run


def align_epochs(epochs: int, mt: int | None = None) -> tuple[int, int]:
    """(MT, FT) epochs of the aligned methods: the same total as everyone's fine-tuning, by default a tenth
    in MT (``mt``: that many; 0 is the ablation without incubation)."""
    mt = max(1, round(epochs / 10)) if mt is None else mt
    return mt, epochs - mt


def _finetune_job(folder: str, seed: int, epochs: int, threads: int, target: str,
                  align: dict[str, Any] | None = None) -> dict[str, Any]:
    """One fine-tuning (or with ``align``, ``surgery align`` with those options), in a worker process
    (module level so that it pickles; spawned workers do not see ``--target``'s change of the module
    global, hence the argument)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if align is not None:
        from surgery.training.align_run import align as run_align

        opts = dict(align)
        mt = opts.pop("mt", None)
        m = run_align(folder, target, epochs=align_epochs(epochs, mt), seed=seed, quiet=True, **opts)
        p = m["phases"]
        return {"val": p["final"]["val_acc"], "best_val": p["ft"]["val_acc_best"], "test": p["final"]["test_acc"],
                "assembled_val": p["assemble"]["val_acc_recalibrated"], "start_val": p["start"]["val_acc"],
                "seconds": round(time.perf_counter() - t0, 1)}
    from surgery.training.finetune import finetune_model_dir

    ft = finetune_model_dir(folder, target, epochs=epochs, seed=seed, quiet=True)
    return {"val": ft["last_val_acc"], "best_val": ft["best_val_acc"], "test": ft["test_top1"],
            "seconds": round(time.perf_counter() - t0, 1)}


class Runner:
    """Fine-tunes model folders in worker processes, once per (seed, kind, chain), while the main
    process builds the next models; :meth:`wait` collects every result."""

    def __init__(self, epochs: int, run_dir: Path, jobs: int, threads: int):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.epochs = epochs
        self.run_dir = run_dir
        self.threads = threads
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))
        self.futures: dict[str, Any] = {}
        self.folders: dict[str, Path] = {}
        self.results: dict[str, dict[str, Any]] = {}
        # finished fine-tunings of an interrupted run with the same settings (see --resume)
        self.done_path = run_dir / f"finetuned-e{epochs}.json"
        self.done: dict[str, dict[str, Any]] = (json.loads(self.done_path.read_text())
                                                if self.done_path.exists() else {})
        self.reused = 0
        self.lock = threading.Lock()

    def submit(self, key: str, folder: Path, seed: int, align: dict[str, Any] | None = None) -> str:
        if key in self.done and key not in self.futures:
            from concurrent.futures import Future

            fut = Future()
            fut.set_result(self.done[key])
            self.futures[key] = fut
            self.folders[key] = folder
            self.reused += 1
            log(f"    reusing the fine-tuning of {folder.relative_to(self.run_dir)} from an interrupted run")
        if key not in self.futures:
            self.folders[key] = folder
            fut = self.pool.submit(_finetune_job, str(folder), seed, self.epochs, self.threads, TARGET, align)
            fut.add_done_callback(lambda f, k=key: self._done(k, f))
            self.futures[key] = fut
        return key

    def _done(self, key: str, fut) -> None:
        if fut.exception() is None:
            res = fut.result()
            log(f"    fine-tuned {self.folders[key].relative_to(self.run_dir)}: val {res['val']:.4f} "
                f"test {res['test']:.4f} ({res['seconds']:.0f} s)")
            with self.lock:  # persisted at once, so an interrupted run loses no finished fine-tuning
                self.done[key] = res
                self.done_path.write_text(json.dumps(self.done, indent=1) + "\n")

    def wait(self, shutdown: bool = True) -> dict[str, dict[str, Any]]:
        for key, fut in self.futures.items():
            self.results[key] = fut.result()  # a failed fine-tuning stops the benchmark here
        if shutdown:
            self.pool.shutdown()
        return self.results

    @property
    def count(self) -> int:
        return len(self.futures)

    @property
    def finetune_seconds(self) -> float:
        return sum(r["seconds"] or 0.0 for r in self.results.values())


def recover_finetunes(run_dir: Path, epochs: int) -> None:
    """Add the fine-tunings an interrupted run finished (MODEL_DIR/finetune.json) to the results file."""
    from surgery.assembled import StagePlan

    path = run_dir / f"finetuned-e{epochs}.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    for ft in sorted(run_dir.glob("seed*/**/finetune.json")):
        summary = json.loads(ft.read_text())
        if summary.get("epochs") != epochs or summary.get("data") != TARGET:
            continue
        recipe = json.loads((ft.parent / "config.json").read_text())
        stages = [StagePlan.from_dict(d) for d in recipe["stages"]]
        kind = "scratch" if ft.parent.name == "scratch" else "pre"
        key = job_key(int(summary["seed"]), kind, stages)
        done.setdefault(key, {"val": summary["last_val_acc"], "best_val": summary["best_val_acc"],
                              "test": summary["test_top1"], "seconds": None})
    path.write_text(json.dumps(done, indent=1) + "\n")
    log(f"  {len(done)} finished fine-tunings found in {run_dir}")


def keep_copy(src: Path, dst: Path) -> None:
    """A fresh copy of a model folder (an older run's copy is replaced)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("finetune", "align", "finetune.json", "pareto.png"))


def submit_teacher_jobs(seeds_out: list[dict[str, Any]], runner: Runner, mt: int | None) -> None:
    """Second round, once the best singles are known: align the reassembled model and the best single
    model itself, each from its state before fine-tuning, with the fine-tuned best single as teacher
    (distillation on labelled and unlabelled images alike): the same extra signal for both."""
    for s in seeds_out:
        seed = s["seed"]
        for budget in sorted({r["budget"] for r in s["rows"]}):
            here = {r["method"]: r for r in s["rows"] if r["budget"] == budget}
            single = here["best single"]
            if single.get("job") is None:
                continue
            name = single["model"]
            teacher = runner.folders[single["job"]]
            opts = {"teacher": str(teacher), "kd_unlabeled": KD_UNLABELED, "mt": mt}
            base = Path(here["aligned + teacher"]["pre"]).parent
            for method, pre in (("aligned + teacher", Path(here["aligned + teacher"]["pre"])),
                                ("best single + teacher", teacher.parent / f"{name}-pre")):
                folder = base / ("aligned-teacher" if method.startswith("aligned") else f"single-teacher-{name}")
                keep_copy(pre, folder)
                stages = here["reassembled"]["chain"] if method.startswith("aligned") else name
                key = f"{seed}|teacher:{name}|mt{mt}|{method}|{stages}|{budget}"
                r = here[method]
                r["job"] = runner.submit(key, folder, seed, align=opts)
                r["teacher"] = name
                if method.startswith("best single"):
                    r.update(chain=single["chain"], params=single["params"], macs=single["macs"], model=name)


def job_key(seed: int, kind: str, stages) -> str:
    return f"{seed}|{kind}|" + ";".join(f"{m}:{a}:{b}" for m, a, b in signature(stages))


def resolve(seeds_out: list[dict[str, Any]], results: dict[str, dict[str, Any]]) -> None:
    """Fill in the fine-tuned accuracies; pick each budget's best single by validation accuracy."""
    for s in seeds_out:
        for c in s["candidates"]:
            c["result"] = results[c["job"]]
        for r in s["rows"]:
            if r["method"] == "best single":
                for f in r["fitting"]:
                    f.update(val=results[f["job"]]["val"], test=results[f["job"]]["test"])
                if r["fitting"]:
                    best = max(r["fitting"], key=lambda f: f["val"])
                    r.update(model=best["model"], chain=best["chain"], params=best["params"], macs=best["macs"],
                             job=best["job"], val=best["val"], test=best["test"])
            elif r["job"] is not None and r["job"] in results:
                r.update(val=results[r["job"]]["val"], test=results[r["job"]]["test"])


def run_seed(seed: int, ws, part, budgets: list[float], args, runner: Runner, rand_ws_root: Path,
             first_seed: bool) -> dict[str, Any]:
    from surgery.assembled import rebuild, save
    from surgery.count import count_macs, count_params
    from surgery.reassembly import Ranked, build_chain, load_sources, reassemble, save_ranked
    from surgery.training.finetune import read_recipe

    out = runner.run_dir / f"seed{seed}"
    rows: list[dict[str, Any]] = []  # one per (method, budget)
    cands: dict[tuple, dict[str, Any]] = {}  # pretrained candidates for Kendall tau, by chain signature
    t0 = time.perf_counter()
    src = load_sources(ws, part, TARGET, seed, TARGET_SAMPLES, with_quality=False, unlabeled=UNLABELED)
    log(f"  seed {seed}: sources loaded ({time.perf_counter() - t0:.0f} s)")

    def candidate(stages, model, macs, folder: Path, tag: str) -> dict[str, Any]:
        sig = signature(stages)
        if sig not in cands:
            cands[sig] = {"chain": chain_label(stages), "tags": [], "macs": int(macs), "folder": folder,
                          "proxies": proxy_scores(model, src, stages[0].model)}
        cands[sig]["tags"].append(tag)
        return cands[sig]

    # singles: every zoo model with a new head; those fitting the largest budget are fine-tuned
    singles = []
    for name in part["models"]:
        # what single_model(ws.root, name, TARGET, seed=seed, out_dir=folder) does, on the loaded sources
        folder = out / "single" / name
        chain = [src.plans[k][name] for k in range(part["stages"])]
        model = build_chain(src.models, src.dissections, chain, src.inputs, src.labels, len(src.classes))
        macs = count_macs(model, torch.zeros(1, *chain[0].input_size))
        if macs <= max(budgets) * 1e9:
            c = candidate(chain, model, macs, folder, f"single {name}")
            ranked = Ranked(None, chain, count_params(model), macs, c["proxies"]["logme"], 0.0, model)
            save_ranked(ranked, ws, folder, TARGET, src.classes, None, None, "logme", seed)
            ranked.model = None
            singles.append((name, ranked, c))
        del model
    for name, ranked, c in singles:
        keep_copy(c["folder"], out / "single" / f"{name}-pre")  # before its fine-tuning: the "+ teacher" start
        c["job"] = runner.submit(job_key(seed, "pre", ranked.stages), c["folder"], seed)

    rng = np.random.default_rng([seed, 12345])
    rand_part = write_random_partition(ws, part, rand_ws_root, seed)
    for b_i, budget in enumerate(budgets):
        bdir = out / f"budget{b_i}"
        bmacs = int(budget * 1e9)

        def row(method: str, stages, params: int, macs: int, job: str | None, budget: float = budget,
                **extra) -> None:
            rows.append({"seed": seed, "budget": budget, "method": method,
                         "chain": chain_label(stages) if stages else None, "params": params, "macs": macs,
                         "job": job, "val": None, "test": None, **extra})

        # 1. reassembled (program + proxy)
        t1 = time.perf_counter()
        res = reassemble(ws.root, max_gflops=budget, data=TARGET, top=args.top, seed=seed, proxy=PICK_PROXY,
                         target_samples=TARGET_SAMPLES, unlabeled=UNLABELED, out_dir=bdir / "reassembled")
        log(f"  seed {seed} budget {budget:.4f}: reassembled {len(res.ranked)} chain(s) "
            f"({time.perf_counter() - t1:.0f} s); pick {chain_label(res.ranked[0].stages)}")
        best = res.ranked[0]
        c = candidate(best.stages, best.model, best.macs, bdir / "reassembled", f"reassembled b{b_i}")
        # copies before its fine-tuning changes the folder: aligned now, "+ teacher" once the best single is known
        keep_copy(bdir / "reassembled", bdir / "aligned")
        keep_copy(bdir / "reassembled", bdir / "reassembled-pre")
        c["job"] = runner.submit(job_key(seed, "pre", best.stages), c["folder"], seed)
        row("reassembled", best.stages, best.params, best.macs, c["job"], proxy=best.proxy)
        ajob = runner.submit(job_key(seed, f"align{args.align_mt}", best.stages), bdir / "aligned", seed,
                             align={"mt": args.align_mt})
        row("aligned", best.stages, best.params, best.macs, ajob)
        row("aligned + teacher", best.stages, best.params, best.macs, None, pre=str(bdir / "reassembled-pre"))
        row("best single + teacher", None, 0, 0, None)
        if first_seed:  # more of the top-N, for the proxy rank correlation
            for j, r in enumerate(res.ranked[1:1 + args.extra_top], start=1):
                sig = signature(r.stages)
                if sig in cands:
                    cands[sig]["tags"].append(f"top{j + 1} b{b_i}")
                    continue
                folder = bdir / f"top{j + 1}"
                save_ranked(r, ws, folder, TARGET, src.classes, budget, None, PICK_PROXY, seed)
                c2 = candidate(r.stages, r.model, r.macs, folder, f"top{j + 1} b{b_i}")
                c2["job"] = runner.submit(job_key(seed, "pre", r.stages), folder, seed)
        for r in res.ranked:
            r.model = None
        res.model = None

        # 2. best single by validation accuracy among the models that fit this budget
        fitting = [(n, r, c) for n, r, c in singles if r.macs <= bmacs]
        # (chosen once the fine-tunings are done: see resolve())
        row("best single", None, 0, 0, None, model=None,
            fitting=[{"model": n, "job": c["job"], "params": r.params, "macs": r.macs, "chain": chain_label(r.stages)}
                     for n, r, c in fitting])

        # 3. the same architecture from scratch (random init, same recipe)
        recipe = read_recipe(bdir / "reassembled")
        torch.manual_seed(seed)
        scratch = rebuild(recipe)
        sdir = bdir / "scratch"
        save(scratch, sdir, {k: v for k, v in recipe.items() if k != "schema"},
             "# Scratch baseline\n\nThe reassembled recipe with random weights.\n")
        sjob = runner.submit(job_key(seed, "scratch", best.stages), sdir, seed)
        row("scratch", best.stages, count_params(scratch), best.macs, sjob)
        del scratch

        # 4. a random valid chain within the budget
        chain, model, macs, tries = random_chain(src, part, bmacs, rng)
        if chain is None:
            log(f"  seed {seed} budget {budget:.4f}: no random chain fits after {tries} draws")
            row("random chain", None, 0, 0, None, draws=tries)
        else:
            score = proxy_scores(model, src, chain[0].model)
            rk = Ranked(None, chain, count_params(model), macs, score["logme"], 0.0, model)
            folder = bdir / "random-chain"
            save_ranked(rk, ws, folder, TARGET, src.classes, budget, None, "logme", seed)
            c = candidate(chain, model, macs, folder, f"random b{b_i}")
            c["job"] = runner.submit(job_key(seed, "pre", chain), folder, seed)
            row("random chain", chain, rk.params, macs, c["job"], draws=tries)
            del model, rk

        # 5. DeRy's ablation: reassembly on a random partition
        t1 = time.perf_counter()
        try:
            rres = reassemble(rand_ws_root, max_gflops=budget, data=TARGET, top=args.top, seed=seed,
                              proxy=PICK_PROXY, target_samples=TARGET_SAMPLES, out_dir=bdir / "random-partition")
        except Exception as e:  # noqa: BLE001 - an infeasible random partition is a result too
            log(f"  seed {seed} budget {budget:.4f}: random-partition reassembly failed: {e}")
            row("random partition", None, 0, 0, None, error=str(e))
        else:
            rb = rres.ranked[0]
            log(f"  seed {seed} budget {budget:.4f}: random-partition pick {chain_label(rb.stages)} "
                f"({time.perf_counter() - t1:.0f} s)")
            c = candidate(rb.stages, rb.model, rb.macs, bdir / "random-partition", f"randpart b{b_i}")
            c["job"] = runner.submit(job_key(seed, "pre", rb.stages), c["folder"], seed)
            row("random partition", rb.stages, rb.params, rb.macs, c["job"], proxy=rb.proxy)
            for r in rres.ranked:
                r.model = None
            rres.model = None

    cand_list = [{k: (str(v) if k == "folder" else v) for k, v in c.items()} for c in cands.values()]
    return {"seed": seed, "rows": rows, "candidates": cand_list,
            "random_partition_cuts": {n: m["cuts"] for n, m in rand_part["models"].items()},
            "seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------------ report


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt_ms(xs: list[float], pct: bool = True) -> str:
    m, s = mean_std(xs)
    if m != m:
        return "n/a"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:+.2f} ± {s:.2f}"


def kendall_rows(seeds_out: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    from surgery.proxy import kendall_tau

    def tau(cands: list[dict[str, Any]], p: str, truth: str) -> tuple[float, int]:
        ok = [c for c in cands if not math.isnan(c["proxies"][p])]  # NaN: the proxy could not score it
        if len(ok) < 3:
            return float("nan"), len(ok)
        return kendall_tau([c["proxies"][p] for c in ok], [c["result"][truth] for c in ok]), len(ok)

    rows = []
    first = seeds_out[0]
    n_first = len(first["candidates"])
    for p in (*PROXIES, "params"):
        r = {"proxy": p}
        for truth in ("test", "val"):
            r[f"first_{truth}"], r["n_first"] = tau(first["candidates"], p, truth)
            taus = [tau(s["candidates"], p, truth)[0] for s in seeds_out]
            r[f"seeds_{truth}"] = [t for t in taus if not math.isnan(t)]
        rows.append(r)
    return rows, n_first


def observations(rows: list[dict[str, Any]], budgets: list[float], subject: str = "reassembled",
                 against: tuple[str, ...] | None = None) -> list[str]:
    lines = []
    against = against or tuple(m for m in METHODS if m != subject)
    for budget in budgets:
        by = {m: [r["test"] for r in rows if r["budget"] == budget and r["method"] == m]
              for m in (subject, *against)}
        means = {m: mean_std(v)[0] for m, v in by.items() if any(x is not None for x in v)}
        if subject not in means:
            continue
        ra, ra_s = mean_std(by[subject])
        better = [m for m in means if m != subject and means[m] >= ra]
        wins = [m for m in means if m != subject and means[m] < ra]
        seeds = sorted({r["seed"] for r in rows})
        per_seed = {}
        for m in against:
            if m not in means:
                continue
            n_win = 0
            for s in seeds:
                here = [r for r in rows if r["budget"] == budget and r["seed"] == s]
                a = [r["test"] for r in here if r["method"] == subject]
                b = [r["test"] for r in here if r["method"] == m]
                if a and b and a[0] is not None and b[0] is not None and a[0] > b[0]:
                    n_win += 1
            per_seed[m] = n_win
        head = f"- {budget:.4f} GFLOPs: {subject} {100 * ra:.1f} ± {100 * ra_s:.1f}%"
        if better:
            head += (f". {subject} does NOT win here: " + ", ".join(
                f"{m} {100 * means[m]:.1f}%" for m in sorted(better, key=lambda m: -means[m])) + " is at least as good")
        else:
            head += f". Best mean of the {len(means)} methods compared"
        if wins:
            head += "; ahead of " + ", ".join(f"{m} {100 * means[m]:.1f}%" for m in wins)
        head += f". Seeds where {subject} beats each: " + ", ".join(
            f"{m} {w}/{len(seeds)}" for m, w in per_seed.items()) + "."
        lines.append(head)
    return lines


def write_plot(rows: list[dict[str, Any]], singles: list[dict[str, Any]], budgets: list[float], path: Path,
               title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"reassembled": "tab:red", "best single": "tab:blue", "scratch": "tab:gray",
              "random chain": "tab:orange", "random partition": "tab:purple", "aligned": "tab:green",
              "aligned + teacher": "darkgreen", "best single + teacher": "navy"}
    markers = ["o", "s", "^", "D"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for s in singles:  # every fine-tuned single zoo model, each seed
        ax.scatter(s["macs"] / 1e9, 100 * s["test"], color="lightsteelblue", s=14, zorder=1)
    for name in sorted({s["name"] for s in singles}):
        pts = [s for s in singles if s["name"] == name]
        ax.annotate(name, (pts[0]["macs"] / 1e9, 100 * statistics.fmean(p["test"] for p in pts)), fontsize=6,
                    color="steelblue", xytext=(3, -8), textcoords="offset points")
    for b_i, budget in enumerate(budgets):
        ax.axvline(budget, color="black", ls=":", lw=0.8)
        for m in METHODS:
            rs = [r for r in rows if r["budget"] == budget and r["method"] == m and r["test"] is not None]
            if not rs:
                continue
            x = [r["macs"] / 1e9 for r in rs]
            y = [100 * r["test"] for r in rs]
            ax.scatter(x, y, color=colors[m], alpha=0.3, s=12, marker=markers[b_i % 4])
            ym, ys = mean_std(y)
            ax.errorbar(statistics.fmean(x), ym, yerr=ys, color=colors[m], marker=markers[b_i % 4], ms=7,
                        capsize=3, label=m if b_i == 0 else None, zorder=3)
    ax.set_xlabel("GFLOPs (GMACs, batch 1, 32x32)")
    ax.set_ylabel(f"{TARGET} test top-1 (%) after fine-tuning")
    ax.set_title(title, fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    for b_i, budget in enumerate(budgets):
        handles.append(plt.Line2D([], [], color="black", marker=markers[b_i % 4], ls="none"))
        labels.append(f"budget {budget:.4f} (dotted line)")
    handles.append(plt.Line2D([], [], color="lightsteelblue", marker="o", ls="none"))
    labels.append("single zoo models (all seeds)")
    ax.legend(handles, labels, fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(data: dict[str, Any], out: Path) -> Path:
    budgets, seeds_out = data["budgets"], data["seeds_out"]
    rows = [r for s in seeds_out for r in s["rows"]]
    lines = [
        "# Transfer benchmark: reassembled vs honest alternatives",
        "",
        f"Written by `benchmarks/transfer.py` ({data['date']}). Target `{TARGET}` ({describe_target()}), "
        f"zoo `{data['zoo']}` "
        f"({len(data['models'])} models), K = {data['stages']} stages, similarity on {data['samples']} "
        f"{PROBE} images. Seeds {data['seeds']}: each seed changes the train/val split, the "
        f"{TARGET_SAMPLES} target images (at most: the train split may be smaller) stitches/heads/proxies "
        "see, the random draws and the fine-tuning; "
        "the test split is fixed.",
        "",
        f"Recipe, identical for every model: `finetune_model_dir(epochs={data['epochs']}, batch_size=64, "
        "lr=1e-3)` (AdamW, wd 0.05, 1 warm-up epoch, cosine, label smoothing 0.1, no augmentation), "
        "full fine-tuning. Test top-1 is the model after the last epoch; the best single is chosen by that "
        "model's validation accuracy.",
        "",
        f"Stitches (reassembled, random chain, random partition) are fitted by least squares on up to {UNLABELED} "
        "training images of the target with their labels ignored (`reassemble --unlabeled`; before a "
        "`train_per_class` cap, i.e. images nobody labelled). `aligned` is `surgery align` on the reassembled "
        f"folder with the same total epochs: {align_epochs(data['epochs'], data.get('align_mt'))[0]} epoch(s) of "
        "each stage's stitches "
        "inside the truncated-donor meta model (MT), the rest end-to-end fine-tuning with the recipe above. "
        "`aligned + teacher` and `best single + teacher` start from the reassembled model and from the best "
        "single model *before* fine-tuning and run the same alignment with the fine-tuned best single as "
        f"teacher (0.5 CE + 0.5 KL, T = 1, each step's distillation term also on {KD_UNLABELED} unlabelled "
        "images): both get the same extra signal and cost the teacher's fine-tuning on top, so compare them "
        "with each other.",
        "",
        "Command:",
        "",
        "```",
        data["command"],
        "```",
        "",
        f"Wall time {data['wall_s'] / 60:.1f} min on {data['host']} ({data['fine_tunes']} fine-tunes, "
        f"{data['finetune_s'] / 60:.1f} min of fine-tuning summed over {data['jobs']} parallel workers). "
        "Plot: `transfer.png`.",
        "",
    ]
    if data.get("reused"):
        lines += [f"Resumed run (`--resume`): {data['reused']} of the fine-tunings come from an interrupted run with "
                  "the same settings (same seeds, chains and epochs; every model was rebuilt and re-scored here); "
                  "the wall time above counts this run only. " + data.get("note", ""), ""]
    lines += [
        "## Test top-1 (%), mean ± std over seeds",
        "",
        "| budget (GFLOPs) | method | test top-1 | val top-1 | params (M) | GFLOPs | chain (first seed) |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for budget in budgets:
        for m in METHODS:
            rs = [r for r in rows if r["budget"] == budget and r["method"] == m]
            ok = [r for r in rs if r["test"] is not None]
            if not ok:
                why = rs[0].get("error", "none fits") if rs else ""
                lines.append(f"| {budget:.4f} | {m} | n/a | n/a | | | {why} |")
                continue
            chain = ok[0]["chain"] or ""
            if m == "best single":
                picks = [r.get("model") for r in ok]
                chain = ", ".join(f"{p} ×{picks.count(p)}" for p in dict.fromkeys(picks))
            lines.append(
                f"| {budget:.4f} | {m} | {fmt_ms([r['test'] for r in ok])} | {fmt_ms([r['val'] for r in ok])} | "
                f"{statistics.fmean(r['params'] for r in ok) / 1e6:.3f} | "
                f"{statistics.fmean(r['macs'] for r in ok) / 1e9:.4f} | {chain} |")
    base = ("reassembled", "best single", "scratch", "random chain", "random partition")
    lines += ["", "Observations (computed from the table):", ""] + observations(rows, budgets, against=base[1:])
    lines += observations(rows, budgets, "aligned", ("reassembled", "best single"))
    lines += observations(rows, budgets, "aligned + teacher", ("best single + teacher", "best single", "aligned"))

    # singles detail
    lines += ["", "## Single zoo models (new head, same fine-tuning), test top-1 (%) per seed", "",
              "| model | GFLOPs | " + " | ".join(f"seed {s['seed']}" for s in seeds_out) + " | mean ± std |",
              "|---|---:|" + "---:|" * (len(seeds_out) + 1)]
    for name, info in data["singles_table"].items():
        lines.append(f"| {name} | {info['macs'] / 1e9:.4f} | " +
                     " | ".join(f"{100 * t:.1f}" if t is not None else "-" for t in info["tests"]) +
                     f" | {fmt_ms([t for t in info['tests'] if t is not None])} |")

    # Kendall
    krows, n_first = kendall_rows(seeds_out)
    n_per_seed = [len(s["candidates"]) for s in seeds_out]
    lines += [
        "", "## Proxy rank correlation (Kendall tau-b) with fine-tuned accuracy", "",
        f"Candidates: the pretrained models fine-tuned in a seed (reassembled picks, random chains, "
        f"random-partition picks, single zoo models within the larger budget) plus, on seed {seeds_out[0]['seed']}, "
        f"the next {data['extra_top']} chains of each budget's top-{data['top']}. Proxies are computed on the built "
        f"models (stitches and head fitted, before fine-tuning) on up to {TARGET_SAMPLES} labelled training "
        "images; `params` "
        "is the parameter-count baseline (more = better). First columns: seed "
        f"{seeds_out[0]['seed']} ({n_first} candidates); last columns: mean ± std of the per-seed tau "
        f"({', '.join(map(str, n_per_seed))} candidates).", "",
        "| proxy | tau vs test (seed 0) | tau vs val (seed 0) | tau vs test, per seed | tau vs val, per seed |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in krows:
        n_note = "" if r["n_first"] == n_first else f" ({r['n_first']} scored)"
        lines.append(f"| {r['proxy']}{n_note} | {r['first_test']:+.2f} | {r['first_val']:+.2f} | "
                     f"{fmt_ms(r['seeds_test'], pct=False)} | {fmt_ms(r['seeds_val'], pct=False)} |")
    lines += ["", f"Seed {seeds_out[0]['seed']} candidates:", "",
              "| chain | role | GFLOPs | logme | linear | naswot | params (M) | val | test |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in sorted(seeds_out[0]["candidates"], key=lambda c: -c["result"]["test"]):
        p = c["proxies"]
        lines.append(f"| {c['chain']} | {', '.join(c['tags'])} | {c['macs'] / 1e9:.4f} | {p['logme']:.3f} | "
                     f"{p['linear']:.3f} | {p['naswot']:.1f} | {p['params'] / 1e6:.3f} | "
                     f"{100 * c['result']['val']:.1f} | {100 * c['result']['test']:.1f} |")

    # raw rows
    lines += ["", "## Every run", "", "| seed | budget | method | chain | GFLOPs | val | test |",
              "|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        v = "-" if r["val"] is None else f"{100 * r['val']:.1f}"
        t = "-" if r["test"] is None else f"{100 * r['test']:.1f}"
        chain = r["chain"] if r["method"] != "best single" else f"{r.get('model')}"
        lines.append(f"| {r['seed']} | {r['budget']:.4f} | {r['method']} | {chain} | {r['macs'] / 1e9:.4f} | "
                     f"{v} | {t} |")
    lines += ["", "Random-partition cuts of the first seed (the similarity partition's are in the workspace's "
              "partition.json):", ""]
    for n, cuts in seeds_out[0]["random_partition_cuts"].items():
        lines.append(f"- {n}: {', '.join(cuts)}")
    lines += ["", "Similarity partition cuts:", ""]
    for n, cuts in data["partition_cuts"].items():
        lines.append(f"- {n}: {', '.join(cuts)}")
    path = out / "transfer.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    global TARGET  # --target: read by the helpers below (and passed explicitly to worker processes)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=None,
                    help="GFLOPs budgets (default: two, between consecutive zoo models' MACs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0 1)")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs for every model (default 8; quick 1)")
    ap.add_argument("--target", default=TARGET,
                    help="target data spec (default digits; e.g. digits:train_per_class=10 for few labels)")
    ap.add_argument("--stages", type=int, default=3, help="K equivalence sets")
    ap.add_argument("--top", type=int, default=3, help="chains solved for and re-ranked per reassembly")
    ap.add_argument("--extra-top", type=int, default=None,
                    help="further top-N chains per budget fine-tuned on the first seed for Kendall tau (default 2)")
    ap.add_argument("--samples", type=int, default=None, help="similarity probe images (default 500; quick 200)")
    ap.add_argument("--jobs", type=int, default=2, help="fine-tunings run in parallel (worker processes)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (1: on a shared 2-core machine, 2 threads are ~25x slower)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the finished fine-tunings of an interrupted run with the same settings")
    ap.add_argument("--quick", action="store_true", help="smoke run on the quick mini-zoo")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default ~/.cache/surgery/transfer-bench)")
    ap.add_argument("--out", type=Path, default=None, help="where transfer.md/png go (default benchmarks/results)")
    ap.add_argument("--align-mt", type=int, default=None,
                    help="MT epochs of the aligned methods (default a tenth of --epochs; 0: no incubation, ablation)")
    ap.add_argument("--report-only", action="store_true", help="rewrite transfer.md/png from WORK/transfer.json")
    args = ap.parse_args(argv)
    TARGET = args.target
    quick = args.quick
    args.seeds = args.seeds if args.seeds is not None else ([0, 1] if quick else [0, 1, 2])
    args.epochs = args.epochs if args.epochs is not None else (1 if quick else 8)
    args.extra_top = args.extra_top if args.extra_top is not None else (1 if quick else 2)
    args.samples = args.samples if args.samples is not None else (200 if quick else 500)
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "surgery"
    work = args.work or base / ("transfer-bench-quick" if quick else "transfer-bench")
    out = args.out or (work / "results" if quick else Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        data = json.loads((work / "transfer.json").read_text())
        rows = [r for s in data["seeds_out"] for r in s["rows"]]
        pts = [{"name": t[len("single "):], "macs": c["macs"], "test": c["result"]["test"]}
               for s in data["seeds_out"] for c in s["candidates"] for t in c["tags"] if t.startswith("single ")]
        title = f"{TARGET}: test top-1 after {data['epochs']} epochs, mean ± std over seeds {data['seeds']}"
        write_plot(rows, pts, data["budgets"], out / "transfer.png", title)
        log(f"wrote {write_report(data, out)}")
        return
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)

    log("mini-zoo")
    zoo_path = zoo_file(quick)
    fp = zoo_fingerprint(zoo_path)
    log(f"workspace (dissect, similarity on {args.samples} {PROBE} images, partition K={args.stages})")
    ws, part = prepare_workspace(zoo_path, work / f"workspace-{fp}", args.stages, args.samples)
    budgets = args.budgets or default_budgets(ws, part)
    log(f"  ready ({time.perf_counter() - t_start:.0f} s); models {list(part['models'])}; "
        f"budgets {[round(b, 5) for b in budgets]} GFLOPs")
    run_dir = work / "runs"
    if not args.resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.resume:
        recover_finetunes(run_dir, args.epochs)
    runner = Runner(args.epochs, run_dir, args.jobs, args.threads)
    seeds_out = []
    for i, seed in enumerate(args.seeds):
        log(f"seed {seed}")
        seeds_out.append(run_seed(seed, ws, part, budgets, args, runner, run_dir / f"ws-randpart-seed{seed}",
                                  first_seed=i == 0))
        log(f"seed {seed} built ({seeds_out[-1]['seconds']:.0f} s; {runner.count} fine-tunes queued)")
    log("waiting for the fine-tunings")
    resolve(seeds_out, runner.wait(shutdown=False))
    log("second round: aligned + teacher, best single + teacher (the fine-tuned best single teaches both)")
    submit_teacher_jobs(seeds_out, runner, args.align_mt)
    resolve(seeds_out, runner.wait())

    singles_table: dict[str, dict[str, Any]] = {}
    singles_pts = []
    for s_i, s in enumerate(seeds_out):
        for c in s["candidates"]:
            single = [t for t in c["tags"] if t.startswith("single ")]
            if single:
                name = single[0][len("single "):]
                info = singles_table.setdefault(name, {"macs": c["macs"], "tests": [None] * len(seeds_out)})
                info["tests"][s_i] = c["result"]["test"]
                singles_pts.append({"name": name, "macs": c["macs"], "test": c["result"]["test"]})
    singles_table = dict(sorted(singles_table.items(), key=lambda kv: kv[1]["macs"]))
    index = ws.read_index()["models"]
    cmd = ".venv/bin/python benchmarks/transfer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {
        "date": time.strftime("%Y-%m-%d"), "zoo": str(zoo_path),
        "models": {n: index[n]["macs"] for n in part["models"]},
        "stages": args.stages, "samples": args.samples, "seeds": args.seeds, "epochs": args.epochs, "top": args.top,
        "extra_top": args.extra_top, "budgets": budgets, "seeds_out": seeds_out, "command": cmd.strip(),
        "wall_s": time.perf_counter() - t_start, "fine_tunes": runner.count, "finetune_s": runner.finetune_seconds,
        "jobs": args.jobs, "reused": runner.reused, "align_mt": args.align_mt,
        "host": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                f"{torch.get_num_threads()} torch thread(s) per process",
        "singles_table": singles_table, "partition_cuts": {n: m["cuts"] for n, m in part["models"].items()},
    }
    (work / "transfer.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    title = (f"{TARGET}: test top-1 after {args.epochs} epochs, mean ± std over seeds {args.seeds}"
             + (" (QUICK smoke run)" if quick else ""))
    write_plot([r for s in seeds_out for r in s["rows"]], singles_pts, budgets, out / "transfer.png", title)
    path = write_report(data, out)
    log(f"wrote {path} and {out / 'transfer.png'} ({data['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
