"""Reassembly: the step behind ``surgery reassemble`` and ``surgery.reassemble``.

1. Missing earlier steps run first (similarity on a default probe set, partition with K stages).
2. The assembly program (:mod:`solvers.assembly`) picks one block per equivalence set under the
   parameter and MAC budgets. Every number it sees is plain data computed here once: block params
   and MACs from the library (the last stage counted with the new head instead of the old
   classifier), stitch params and MACs from the junction specs, and stitch compatibility = CKA of
   the donor's output with the receiver's native input on the probe set. Block quality is the
   source model's transferability to the target data (LogME of its pre-logits features, min-max
   scaled over the zoo) when target data is given, else 0.
3. The top-N chains are built: blocks cut from the pretrained models (stems and pooling kept),
   stitches fitted by ridge least squares on target images (donor output -> receiver's native
   input), a new head fitted in closed form; then re-ranked by a training-free proxy.
4. The best one is written as a model folder (:mod:`surgery.assembled`), with a Pareto picture.

This replaces DeRy's shuffled greedy search, re-drawn random stitches and random new stems
(research/dery.md §4-6).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from solvers.assembly import AssemblyProgram, Candidate, StagePairs
from surgery.assembled import (
    ReassembledModel,
    StagePlan,
    build_parts,
    headless,
    needs_token_context,
    save,
)
from surgery.count import count_macs, count_params
from surgery.equivalence import read_partition, run_partition
from surgery.errors import WorkspaceError
from surgery.library import load_model_entry
from surgery.proxy import logme, score_candidate
from surgery.similarity import compute_similarity, cut_similarity, read_similarity
from surgery.spec import TensorSpec
from surgery.stitch import fit_linear_head, fit_stitch, make_head, stitch_cost
from surgery.workspace import Workspace

DEFAULT_PROBE = "fashion-mnist"
# Native activations kept across the chains of one reassembly run (see build_chain).
ACTIVATION_CACHE_BYTES = 2 << 30


@dataclass
class Ranked:
    """One candidate chain after building and scoring."""

    chain: Any  # solvers.assembly.Chain
    stages: list[StagePlan]
    params: int
    macs: int
    proxy: float
    objective: float
    model: ReassembledModel | None = None
    stage_costs: list[tuple[int, int]] = field(default_factory=list)  # (params, macs) per stage, stitch excluded

    def summary(self) -> dict[str, Any]:
        return {"models": [s.model for s in self.stages], "blocks": [[s.start, s.end] for s in self.stages],
                "stage_costs": [list(c) for c in self.stage_costs],
                "params": self.params, "macs": self.macs, "proxy": self.proxy, "objective": self.objective}


@dataclass
class ReassembleResult:
    """What :func:`reassemble` returns: the ranked candidates and the built best model."""

    ranked: list[Ranked]
    model: ReassembledModel
    out_dir: Path | None
    timings: dict[str, float] = field(default_factory=dict)
    zoo_points: list[dict[str, Any]] = field(default_factory=list)


def _announce(msg: str, log: Callable[[str], None] | None) -> None:
    if log:
        log(msg)


def _target_batches(data: str, seed: int, samples: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from zoo.data import load_split

    ds = load_split(data, "train", seed=seed)
    n = len(ds.labels)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(samples, n)]
    images = ds.gather(idx, size=None if ds.images is not None else (224, 224))
    return images, ds.labels[idx], list(ds.classes)


def _transform(manifest: dict[str, Any]):
    from zoo.data import make_transform

    cfg = manifest.get("data_config", {})
    return make_transform(tuple(manifest["settings"]["input_size"]), cfg.get("mean"), cfg.get("std"))


@torch.inference_mode()
def _activation(model: nn.Module, d, node: str | None, x: torch.Tensor) -> torch.Tensor:
    """The (unpooled) output of cut ``node`` of a model (``None``: the model input)."""
    if node is None:
        return x
    return d.split([node])[0](x)


def _classifier_cost(model: nn.Module, input_size, num_classes: int) -> tuple[int, int, int, int]:
    """(old classifier params, old classifier MACs, new head params, new head MACs) at batch 1."""
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    old_p = count_params(clf) if isinstance(clf, nn.Module) else 0
    # the pre-logits width after reset_classifier(0): timm's head_hidden_size when a pre-logits layer exists
    feats = (getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
             or getattr(clf, "in_features", 0))
    old_m = int(getattr(clf, "in_features", 0) * getattr(clf, "out_features", 0)) if isinstance(clf, nn.Linear) else 0
    new_p = int(feats * num_classes + num_classes)
    new_m = int(feats * num_classes)
    return old_p, old_m, new_p, new_m


@dataclass
class Sources:
    """Everything reassembly needs from the workspace, loaded once: models, cuts, target images."""

    names: list[str]
    manifests: dict[str, dict[str, Any]]
    models: dict[str, nn.Module]
    dissections: dict[str, Any]
    plans: list[dict[str, StagePlan]]  # per stage: model name -> its block of that equivalence set
    labels: torch.Tensor
    classes: list[str]
    inputs: dict[str, torch.Tensor]  # target images transformed for each model
    quality: dict[str, float]


def load_sources(ws: Workspace, part: dict[str, Any], target: str, seed: int, target_samples: int, *,
                 with_quality: bool = True, names: list[str] | None = None) -> Sources:
    """Load the partition's source models (real weights) once, with their stage plans and target inputs."""
    from surgery.dissection import dissect

    names = names or list(part["models"])
    images, labels, classes = _target_batches(target, seed, target_samples)
    models, dissections, manifests = {}, {}, {}
    for n in names:
        _, manifest, model = load_model_entry(ws, n)
        manifests[n] = manifest
        models[n] = model
        dissections[n] = dissect(model, tuple(manifest["settings"]["input_size"]), name=n,
                                 granularity=manifest["settings"]["granularity"])
    inputs = {n: _transform(manifests[n])(images) for n in names}
    plans = []
    for k in range(part["stages"]):
        by_model = {}
        for member in part["sets"][k]["members"]:
            n = member["model"]
            if n not in manifests:
                continue
            settings = manifests[n]["settings"]
            by_model[n] = StagePlan(n, manifests[n]["entry"], member["start"], member["end"],
                                    tuple(settings["input_size"]), settings["granularity"],
                                    TensorSpec.from_dict(member["in_spec"]), TensorSpec.from_dict(member["out_spec"]))
        plans.append(by_model)
    # block quality: transferability of each source model to the target (LogME of pre-logits features)
    quality = {n: 0.0 for n in names}
    if with_quality:
        raw = {}
        for n in names:
            with torch.inference_mode():
                feats = headless(models[n])(inputs[n])
            raw[n] = logme(feats.flatten(1), labels)
        lo, hi = min(raw.values()), max(raw.values())
        quality = {n: (raw[n] - lo) / (hi - lo) if hi > lo else 0.0 for n in names}
    return Sources(names, manifests, models, dissections, plans, labels, classes, inputs, quality)


def single_model(workdir: str | Path, name: str, data: str, *, seed: int = 0, target_samples: int = 256,
                 proxy: str = "logme", out_dir: str | Path | None = None) -> Ranked:
    """One zoo model with a new head for ``data``, built like a reassembled chain (the honest baseline).

    It goes through the same code as a reassembled model (its K stage blocks chained, no stitches,
    head fitted in closed form), so both are saved, loaded and fine-tuned the same way.
    """
    ws = Workspace(workdir).require()
    part = read_partition(ws)
    if name not in part["models"]:
        raise WorkspaceError(f"{name!r} is not in the partition of {ws.root}")
    src = load_sources(ws, part, data, seed, target_samples, with_quality=False, names=[name])
    chain = [src.plans[k][name] for k in range(part["stages"])]
    model = build_chain(src.models, src.dissections, chain, src.inputs, src.labels, len(src.classes))
    x = src.inputs[name]
    score = score_candidate(model, [x], src.labels, proxy=proxy, feature_fn=lambda m, xb: m.forward_features(xb))
    size = src.manifests[name]["settings"]["input_size"]
    ranked = Ranked(None, chain, count_params(model), count_macs(model, torch.zeros(1, *size)), float(score),
                    0.0, model)
    if out_dir is not None:
        save_ranked(ranked, ws, Path(out_dir), data, src.classes, None, None, proxy, seed)
    return ranked


def reassemble(
    workdir: str | Path,
    *,
    max_gflops: float | None = None,
    max_params_m: float | None = None,
    data: str | None = None,
    stages: int = 4,
    top: int = 5,
    proxy: str = "logme",
    probe: str | None = None,
    target_samples: int = 256,
    seed: int = 0,
    solver: str = "cbc",
    constraints: list[Callable[[AssemblyProgram], Any]] | None = None,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> ReassembleResult:
    """Pick, stitch, rank and save a reassembled model under budgets.

    Args:
        workdir: workspace with a dissected zoo (``surgery dissect``).
        max_gflops: MAC budget in GMACs (1 FLOP = 1 MAC), blocks + stitches + head.
        max_params_m: parameter budget in millions.
        data: target data (e.g. ``digits``); used for stitch fitting, head, quality and proxy. Without
            it the probe data stands in and the head keeps the probe's classes.
        stages: K, used when the workspace has no partition yet.
        top: number of chains solved for and re-ranked.
        proxy: ``logme`` | ``linear`` | ``naswot`` | ``params``.
        probe: probe data for a missing similarity step (default ``fashion-mnist``, else ``digits``).
        target_samples: target images for fitting stitches/head and the proxy.
        seed: seed of every random draw.
        solver: ``cbc`` or ``highs``.
        constraints: extra constraints, each ``fn(program)`` (see :class:`solvers.assembly.AssemblyProgram`).
        out_dir: where to write the model folder (``None``: do not write).
        log: one-line announcements (steps run, choices).

    Returns:
        A :class:`ReassembleResult`.
    """
    ws = Workspace(workdir).require()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if not (ws.root / "similarity" / "similarity.json").exists():
        probe = probe or _default_probe()
        _announce(f"no similarity yet: computing it on {probe} (500 images)", log)
        compute_similarity(ws.root, probe, samples=500, seed=seed)
    sim = read_similarity(ws)
    try:
        part = read_partition(ws)
    except WorkspaceError:
        _announce(f"no partition yet: cutting every model into {stages} stages", log)
        part = run_partition(ws.root, stages, seed=seed, relax_eps=True)
        if part["eps"] > 0.2:
            _announce(f"balance limit relaxed to eps={part['eps']:.2f} so that every model can be cut", log)
    timings["prepare"] = time.perf_counter() - t0

    target = data or sim["settings"]["data"]
    t0 = time.perf_counter()
    src = load_sources(ws, part, target, seed, target_samples, with_quality=data is not None)
    names, models, dissections, manifests = src.names, src.models, src.dissections, src.manifests
    inputs, labels, classes, quality, plans = src.inputs, src.labels, src.classes, src.quality, src.plans
    num_classes = len(classes)
    timings["load_sources"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    # candidates per stage and pair data
    K = part["stages"]
    stage_cands: list[list[Candidate]] = []
    for k in range(K):
        cands = []
        for member in part["sets"][k]["members"]:
            n = member["model"]
            params, macs = member["params"], member["macs"]
            if k == K - 1:  # the old classifier goes, the new head comes
                op, om, np_, nm = _classifier_cost(models[n], manifests[n]["settings"]["input_size"], num_classes)
                params, macs = params - op + np_, macs - om + nm
            cands.append(Candidate(id=n, model=n, params=int(params), macs=int(macs), quality=quality[n] / K))
        stage_cands.append(cands)
    pairs: list[StagePairs] = []
    for k in range(K - 1):
        a_list, b_list = stage_cands[k], stage_cands[k + 1]
        P = np.zeros((len(a_list), len(b_list)))
        M = np.zeros_like(P)
        C = np.zeros_like(P)
        allowed = np.ones_like(P, dtype=bool)
        for i, a in enumerate(a_list):
            for j, b in enumerate(b_list):
                if a.model == b.model:
                    C[i, j] = 1.0  # a model's own consecutive blocks: native, no stitch
                    continue
                pa, pb = plans[k][a.model], plans[k + 1][b.model]
                try:
                    p, m = stitch_cost(pa.out_spec, pb.in_spec, token_context=needs_token_context(
                        pa.out_spec, pb.in_spec), project=True)
                except Exception:  # noqa: BLE001 - an impossible junction is simply not allowed
                    allowed[i, j] = False
                    continue
                P[i, j], M[i, j] = p, m
                C[i, j] = cut_similarity(sim, (a.model, pa.end), (b.model, pb.start))
        C = np.nan_to_num(C, nan=0.0)
        pairs.append(StagePairs(P, M, C, allowed))
    program = AssemblyProgram(stage_cands, pairs,
                              max_params=int(max_params_m * 1e6) if max_params_m is not None else None,
                              max_macs=int(max_gflops * 1e9) if max_gflops is not None else None,
                              param_penalty=1e-12)
    for fn in constraints or []:
        program.add_constraint(fn)
    chains = program.solve(top=top, solver=solver)
    timings["solve"] = time.perf_counter() - t0
    _announce(f"solver: {len(chains)} chain(s) within budget", log)

    # build, fit and score each chain
    t_fit = t_proxy = 0.0
    ranked: list[Ranked] = []
    activations: dict[tuple[str, str | None], torch.Tensor] = {}
    for chain in chains:
        t1 = time.perf_counter()
        chain_plans = [plans[k][bid] for k, bid in enumerate(chain.blocks)]
        model = build_chain(models, dissections, chain_plans, inputs, labels, num_classes, activations)
        t_fit += time.perf_counter() - t1
        t1 = time.perf_counter()
        first = chain_plans[0].model
        x = inputs[first]
        score = score_candidate(model, [x], labels, proxy=proxy,
                                feature_fn=lambda m, xb: m.forward_features(xb))
        t_proxy += time.perf_counter() - t1
        size = manifests[first]["settings"]["input_size"]
        costs = [(cand.params, cand.macs) for k, bid in enumerate(chain.blocks)
                 for cand in stage_cands[k] if cand.id == bid]
        ranked.append(Ranked(chain, chain_plans, count_params(model),
                             count_macs(model, torch.zeros(1, *size)), float(score), chain.objective, model, costs))
    timings["stitch_fit"] = t_fit
    timings["proxy"] = t_proxy
    ranked.sort(key=lambda r: r.proxy, reverse=True)
    best = ranked[0]

    zoo_points = []
    for n in names:
        with torch.inference_mode():
            feats = headless(models[n])(inputs[n])
        zoo_points.append({"model": n, "macs": manifests[n]["macs"], "params": manifests[n]["params"],
                           "proxy": float(_proxy_on_features(proxy, feats, labels, models[n]))})
    result = ReassembleResult(ranked, best.model, Path(out_dir) if out_dir else None, timings, zoo_points)
    if out_dir is not None:
        save_ranked(best, ws, Path(out_dir), target, classes, max_gflops, max_params_m, proxy, seed)
        write_pareto(result, Path(out_dir) / "pareto.png", proxy)
    return result


def _proxy_on_features(proxy: str, feats: torch.Tensor, labels: torch.Tensor, model: nn.Module) -> float:
    from surgery.proxy import linear_probe_accuracy

    if proxy == "linear":
        return linear_probe_accuracy(feats.flatten(1), labels)
    if proxy == "params":
        return -float(count_params(model))
    return logme(feats.flatten(1), labels)


def _default_probe() -> str:
    from zoo.errors import DataError

    try:
        from zoo.data import load_split

        load_split(DEFAULT_PROBE, "train")
        return DEFAULT_PROBE
    except DataError:
        return "digits"


def build_chain(models: dict[str, nn.Module], dissections: dict[str, Any], chain: list[StagePlan],
                inputs: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int,
                activations: dict[tuple[str, str | None], torch.Tensor] | None = None) -> ReassembledModel:
    """Build a chain from pretrained blocks, fit its stitches (ridge) and its head (closed form).

    ``activations`` caches native cut-point activations across the chains of one run, so a junction
    shared by several top-N chains runs its models' prefixes once (up to :data:`ACTIVATION_CACHE_BYTES`).
    """
    activations = {} if activations is None else activations

    def native(model_name: str, node: str | None) -> torch.Tensor:
        key = (model_name, node)
        if key in activations:
            return activations[key]
        out = _activation(models[model_name], dissections[model_name], node, inputs[model_name])
        # early cut points of 224 px models are hundreds of MiB at 256 images: stop caching at a cap
        held = sum(t.numel() * t.element_size() for t in activations.values())
        if held + out.numel() * out.element_size() <= ACTIVATION_CACHE_BYTES:
            activations[key] = out
        return out

    project = []
    for k in range(1, len(chain)):
        same = chain[k - 1].model == chain[k].model and chain[k - 1].end == chain[k].start
        project.append(None if same else True)
    parts, roles, feature_spec = build_parts(models, chain, project)
    # fit stitches on native activations: donor output and receiver input on the same images
    stitches = iter([p for p, r in zip(parts, roles, strict=True) if r == "stitch"])
    for k in range(1, len(chain)):
        if project[k - 1] is None:
            continue
        prev, cur = chain[k - 1], chain[k]
        fit_stitch(next(stitches), native(prev.model, prev.end), native(cur.model, cur.start))
    head = make_head(feature_spec, num_classes)
    model = ReassembledModel(parts, roles, head).eval()
    with torch.inference_mode():
        feats = model.forward_features(inputs[chain[0].model])
    fit_linear_head(head, feats, labels)
    return model.eval()


def save_ranked(best: Ranked, ws: Workspace, out_dir: Path, target: str, classes: list[str],
                max_gflops, max_params_m, proxy: str, seed: int) -> Path:
    """Save a built chain as a model folder: recipe, weights and model card."""
    first = best.stages[0]
    manifest = ws.read_dissection(first.model)
    cfg = manifest.get("data_config", {})
    project = []
    for k in range(1, len(best.stages)):
        same = best.stages[k - 1].model == best.stages[k].model and best.stages[k - 1].end == best.stages[k].start
        project.append(None if same else True)
    recipe = {
        "num_classes": len(classes),
        "classes": [str(c) for c in classes],
        "input_size": list(first.input_size),
        "mean": list(cfg.get("mean") or (0.485, 0.456, 0.406)),
        "std": list(cfg.get("std") or (0.229, 0.224, 0.225)),
        "stages": [s.to_dict() for s in best.stages],
        "stitch_project": project,
        "params": best.params,
        "macs": best.macs,
        "budget": {"max_gflops": max_gflops, "max_params_m": max_params_m},
        "target": target,
        "proxy": {"name": proxy, "score": best.proxy},
        "seed": seed,
        "workspace": str(ws.root),
    }
    rows = "\n".join(f"| {k} | {s.model} | {s.start or '(input)'} → {s.end or '(pre-logits)'} |"
                     for k, s in enumerate(best.stages))
    card = (f"# Reassembled model\n\nBuilt by `surgery reassemble` from {len(set(s.model for s in best.stages))} "
            f"source model(s) of the workspace `{ws.root}` for the target `{target}` ({len(classes)} classes).\n\n"
            f"| stage | source model | block |\n|---|---|---|\n{rows}\n\n"
            f"- parameters: {best.params / 1e6:.3f} M (counted on the model)\n"
            f"- GFLOPs (GMACs, batch 1, input {'x'.join(map(str, first.input_size))}): {best.macs / 1e9:.4f}\n"
            f"- budget: max GFLOPs {max_gflops}, max params (M) {max_params_m}\n"
            f"- proxy ({proxy}): {best.proxy:.4f}\n\n"
            "Load with `surgery.load(folder)`; all weights are in `model.safetensors`.\n")
    return save(best.model, out_dir, recipe, card)


def write_pareto(result: ReassembleResult, path: Path, proxy: str) -> None:
    """Proxy score against GFLOPs of the top candidates and of the zoo's own models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r.macs / 1e9 for r in result.ranked], [r.proxy for r in result.ranked], label="reassembled (top-N)",
               color="tab:red")
    ax.scatter([result.ranked[0].macs / 1e9], [result.ranked[0].proxy], s=120, facecolors="none",
               edgecolors="black", label="chosen")
    ax.scatter([z["macs"] / 1e9 for z in result.zoo_points], [z["proxy"] for z in result.zoo_points],
               label="zoo models", color="tab:blue", marker="s")
    for z in result.zoo_points:
        ax.annotate(z["model"], (z["macs"] / 1e9, z["proxy"]), fontsize=7)
    ax.set_xlabel("GFLOPs (GMACs)")
    ax.set_ylabel(f"proxy: {proxy}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
