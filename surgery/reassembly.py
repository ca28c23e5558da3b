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
   Next to it, the best single zoo model within the same budget (:mod:`surgery.baseline`, scored
   on the already loaded models) is reported: the honest baseline a chain has to beat.

The default proxy is the linear probe, by measurement (:data:`surgery.baseline.DEFAULT_PROXY`).

This replaces DeRy's shuffled greedy search, re-drawn random stitches and random new stems
(research/dery.md §4-6).
"""

from __future__ import annotations

import math
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
    cut_segment,
    headless,
    save,
)
from surgery.baseline import DEFAULT_PROXY, budget_infeasible, score_loaded
from surgery.count import count_params
from surgery.equivalence import partition_exists, partition_path, read_partition, run_partition
from surgery.errors import InfeasibleError, SurgeryError, WorkspaceError
from surgery.library import load_model_entry
from surgery.proxy import logme, score_candidate
from surgery.similarity import compute_similarity, cut_similarity, read_similarity
from surgery.spec import TensorSpec
from surgery.stitch import fit_linear_head, fit_stitch, make_head, stitch_cost
from surgery.token_context import needs_token_context, token_context_from_timm
from surgery.tracing import one_line
from surgery.workspace import Workspace

DEFAULT_PROBE = "fashion-mnist"
# Stitches are fitted on up to this many unlabelled target training images (labels never read): least
# squares needs no labels, so a few-label target still gets well-fitted stitches. Capped because every
# source model runs its prefix over them once (in batches of STITCH_BATCH).
DEFAULT_UNLABELED = 1024
STITCH_BATCH = 256
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
    best_single: Any = None  # surgery.baseline.SingleScore within the same budget, or None when none fits
    # chains the solver picked that could not be built or scored: models, blocks and a one-line reason
    skipped: list[dict[str, Any]] = field(default_factory=list)


class ReassemblyError(SurgeryError):
    """No candidate chain could be built (each one's reason is in the message's first line)."""


def junction_cost(receiver: nn.Module, out_spec: TensorSpec, in_spec: TensorSpec) -> tuple[int, int]:
    """``(params, MACs)`` of the stitch :func:`surgery.assembled.build_parts` makes between two models.

    The receiver's token context (when it needs one) is read from its model exactly as the stitch
    will be built, so a junction is priced if and only if it can be built.

    Raises:
        SurgeryError: the stitch cannot be built (unknown specs, no token context for the receiver, ...).
    """
    ctx = token_context_from_timm(receiver, in_spec) if needs_token_context(out_spec, in_spec) else False
    return stitch_cost(out_spec, in_spec, token_context=ctx, project=True)


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


def _unlabeled_images(data: str, seed: int, samples: int) -> torch.Tensor:
    """Up to ``samples`` training images of ``data`` before any few-label cap, without their labels."""
    from zoo.data import load_split

    ds = load_split(data, "unlabeled", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randperm(len(ds.labels), generator=g)[: min(samples, len(ds.labels))]
    return ds.gather(idx, size=None if ds.images is not None else (224, 224))


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
    # dissections of the headless copies (pre-logits output), by model: they cut every block of a chain
    cuts: dict[str, Any] = field(default_factory=dict)
    # pre-logits features of each model on its inputs, ``(N, D)`` (only when quality was computed)
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    # native activations at the stage boundaries, captured by the quality forward pass (see build_chain)
    activations: dict[tuple[str, str | None], torch.Tensor] = field(default_factory=dict)
    # unlabelled target images transformed for each model, the stitches' least-squares data (None: ``inputs``)
    stitch_inputs: dict[str, torch.Tensor] | None = None


def load_sources(ws: Workspace, part: dict[str, Any], target: str, seed: int, target_samples: int, *,
                 with_quality: bool = True, names: list[str] | None = None, unlabeled: int = 0) -> Sources:
    """Load the partition's source models (real weights) once, with their stage plans and target inputs.

    Each model is traced and probed once (:func:`_headless_cut`); with ``with_quality`` one forward pass
    per model gives both its pre-logits features (``features``, for LogME) and its activations at the
    partition's cut nodes (``activations``, for the stitches and the head), up to
    :data:`ACTIVATION_CACHE_BYTES`. ``unlabeled > 0``: the stitches are fitted on up to that many
    unlabelled training images instead (``stitch_inputs``).
    """
    names = names or list(part["models"])
    images, labels, classes = _target_batches(target, seed, target_samples)
    unlabeled_images = _unlabeled_images(target, seed, unlabeled) if unlabeled > 0 else None
    models, dissections, manifests, cuts = {}, {}, {}, {}
    split_blocks: dict[str, list[nn.Module] | None] = {}  # headless blocks at the stage cuts, for one forward
    # each model's cut nodes in graph order: the ends of its stage blocks but the last
    bounds = {n: [b["end"] for b in part["models"][n]["stage_blocks"][:-1]] for n in names}
    for n in names:
        _, manifest, model = load_model_entry(ws, n)
        manifests[n] = manifest
        models[n] = model
        cuts[n], dissections[n], split_blocks[n] = _headless_cut(model, manifest, n, bounds[n])
        if cuts[n] is None:
            del cuts[n]
    inputs = {n: _transform(manifests[n])(images) for n in names}
    stitch_inputs = ({n: _transform(manifests[n])(unlabeled_images) for n in names}
                     if unlabeled_images is not None else None)
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
    features: dict[str, torch.Tensor] = {}
    activations: dict[tuple[str, str | None], torch.Tensor] = {}
    if with_quality:
        raw = {}
        for n in names:
            if n in cuts:
                features[n] = _forward_capturing(split_blocks[n], n, bounds[n], inputs[n], activations)
            else:
                with torch.inference_mode():
                    features[n] = headless(models[n])(inputs[n])
            raw[n] = logme(features[n].flatten(1), labels)
        # A model whose LogME is NaN (constant features, e.g. dead weights) keeps NaN: reassemble
        # leaves it out. It must not enter the min-max scaling, where it would poison every model.
        finite = [v for v in raw.values() if math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
        quality = {n: ((raw[n] - lo) / (hi - lo) if hi > lo else 0.0) if math.isfinite(raw[n]) else math.nan
                   for n in names}
    return Sources(names, manifests, models, dissections, plans, labels, classes, inputs, quality, cuts, features,
                   activations, stitch_inputs)


def _headless_cut(model: nn.Module, manifest: dict[str, Any], name: str, nodes: list[str]
                  ) -> tuple[Any, Any, list[nn.Module] | None]:
    """(dissection of the headless copy or ``None``, a dissection that cuts at ``nodes``, the headless copy's
    blocks cut at ``nodes`` or ``None``), one trace each.

    The headless copy (classifier removed, output = pre-logits features) is what the last block of a
    chain is cut from; its graph before the classifier is the model's own, so the same dissection cuts
    the other blocks and runs the prefixes for the stitches. Were a cut node missing from it (a graph
    that the classifier's removal renamed), the model itself is dissected instead and the chains' blocks
    are cut the plain way (:func:`surgery.assembled.cut_segment`).
    """
    from surgery.dissection import dissect

    size, granularity = tuple(manifest["settings"]["input_size"]), manifest["settings"]["granularity"]
    d = dissect(headless(model), size, name=name, granularity=granularity)
    try:
        blocks = d.split(nodes)
    except SurgeryError:
        return None, dissect(model, size, name=name, granularity=granularity), None
    return d, d, blocks


@torch.inference_mode()
def _forward_capturing(blocks: list[nn.Module], name: str, nodes: list[str], x: torch.Tensor,
                       activations: dict[tuple[str, str | None], torch.Tensor]) -> torch.Tensor:
    """Run a headless dissection's blocks cut at ``nodes`` (graph order) on ``x``: the pre-logits features.

    Each cut node's output is stored in ``activations`` under ``(name, node)`` while the total stays within
    :data:`ACTIVATION_CACHE_BYTES`. The chained blocks run the traced graph, the same operations as the
    model, so features and activations equal what ``headless(model)(x)`` and a prefix block give.
    """
    for node, block in zip([*nodes, None], blocks, strict=True):
        x = block(x)
        if node is not None:
            _cache_put(activations, (name, node), x)
    return x


def _nbytes(value: torch.Tensor | list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in (value if isinstance(value, list) else [value]))


def _cache_put(activations: dict[tuple[str, str | None], Any], key: tuple[str, str | None],
               value: torch.Tensor | list[torch.Tensor]) -> None:
    """Keep ``value`` unless the cache would exceed :data:`ACTIVATION_CACHE_BYTES` (early 224 px maps are large)."""
    held = sum(_nbytes(t) for t in activations.values())
    if held + _nbytes(value) <= ACTIVATION_CACHE_BYTES:
        activations[key] = value


def _settings_text(settings: Any) -> str:
    if not isinstance(settings, dict):
        return repr(settings)
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def _check_partition_against(ws: Workspace, part: dict[str, Any], sim: dict[str, Any],
                             log: Callable[[str], None] | None) -> None:
    """Say when the partition was made from another similarity than the workspace's current one.

    A partition made before the similarity was recomputed (other probe data or settings) is stale:
    it is still used, with a note naming both settings. When it names a model or cut point that the
    current similarity lacks it cannot be used at all (one-line :class:`WorkspaceError`).
    """
    made_from, now = part.get("similarity"), sim.get("settings")
    if made_from != now:
        _announce(f"note: the partition is stale: {partition_path(ws).name} was made from the similarity on "
                  f"[{_settings_text(made_from)}] but the similarity is now on [{_settings_text(now)}]; "
                  f"re-run 'surgery partition {ws.root}' to update it", log)
    for n, m in part["models"].items():
        nodes = set(sim["nodes"].get(n, ()))
        used = {b[key] for b in m.get("stage_blocks", ()) for key in ("start", "end")} - {None}
        if n not in sim["nodes"] or not used <= nodes:
            raise WorkspaceError(
                f"{partition_path(ws)} does not match the similarity ({n} or its cut points are not in it): "
                f"delete it or re-run 'surgery partition {ws.root}'")


def single_model(workdir: str | Path, name: str, data: str, *, seed: int = 0, target_samples: int = 256,
                 proxy: str = DEFAULT_PROXY, out_dir: str | Path | None = None) -> Ranked:
    """One zoo model with a new head for ``data``: :func:`surgery.baseline.baseline` with ``model=name``.

    Kept here for existing callers; returns the built :class:`Ranked` (its ``.model`` the network).
    """
    from surgery.baseline import baseline

    return baseline(workdir, name, data=data, seed=seed, target_samples=target_samples, proxy=proxy,
                    out_dir=out_dir).best


def reassemble(
    workdir: str | Path,
    *,
    max_gflops: float | None = None,
    max_params_m: float | None = None,
    data: str | None = None,
    stages: int = 4,
    top: int = 5,
    proxy: str = DEFAULT_PROXY,
    probe: str | None = None,
    target_samples: int = 256,
    unlabeled: int = DEFAULT_UNLABELED,
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
        proxy: ``linear`` (default: the best predictor of fine-tuned accuracy in the transfer
            benchmark, see :data:`surgery.baseline.DEFAULT_PROXY`) | ``logme`` | ``naswot`` | ``params``.
        probe: probe data for a missing similarity step (default ``fashion-mnist``, else ``digits``).
        target_samples: labelled target images for the head, the block quality and the proxy (and the
            stitches when ``unlabeled`` is 0).
        unlabeled: the stitches' least squares use up to this many training images of the target with
            their labels ignored (all of them before a ``train_per_class`` cap: a few-label target still
            gets well-fitted stitches); 0 fits them on the ``target_samples`` labelled images.
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
    # Only a MISSING step runs here: a file that exists but cannot be read is reported (one line) and
    # left for the user, never silently replaced.
    sim_path = ws.root / "similarity" / "similarity.json"
    if not (sim_path.exists() or sim_path.is_symlink()):
        probe = probe or _default_probe()
        _announce(f"no similarity yet: computing it on {probe} (500 images)", log)
        compute_similarity(ws.root, probe, samples=500, seed=seed)
    sim = read_similarity(ws)
    if partition_exists(ws):
        part = read_partition(ws)
        _check_partition_against(ws, part, sim, log)
    else:
        _announce(f"no partition yet: cutting every model into {stages} stages", log)
        part = run_partition(ws.root, stages, seed=seed)
        for n, m in part["models"].items():
            if m["eps_relaxed"]:
                _announce(f"balance limit relaxed for {n}: eps={m['eps_used']:.3f} ({part['eps']:g} cannot be met)",
                          log)
    timings["prepare"] = time.perf_counter() - t0

    target = data or sim["settings"]["data"]
    t0 = time.perf_counter()
    if unlabeled < 0:
        raise SurgeryError(f"unlabeled must be >= 0, got {unlabeled}")
    src = load_sources(ws, part, target, seed, target_samples, with_quality=data is not None, unlabeled=unlabeled)
    names, models, dissections, manifests = src.names, src.models, src.dissections, src.manifests
    inputs, labels, classes, quality, plans = src.inputs, src.labels, src.classes, src.quality, src.plans
    num_classes = len(classes)
    timings["load_sources"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    # candidates per stage and pair data
    K = part["stages"]
    dead = [n for n in names if not math.isfinite(quality[n])]
    if dead and len(dead) == len(names):
        raise SurgeryError(f"no source model has a finite block quality (LogME) on {target}: "
                           f"{', '.join(dead)} give constant or non-finite features")
    for n in dead:
        _announce(f"{n} left out: its block quality (LogME on {target}) is {quality[n]} "
                  "(constant or non-finite features, e.g. dead weights)", log)
    stage_cands: list[list[Candidate]] = []
    for k in range(K):
        cands = []
        for member in part["sets"][k]["members"]:
            n = member["model"]
            if n in dead:
                continue
            params, macs = member["params"], member["macs"]
            if k == K - 1:  # the old classifier goes, the new head comes
                op, om, np_, nm = _classifier_cost(models[n], manifests[n]["settings"]["input_size"], num_classes)
                params, macs = params - op + np_, macs - om + nm
            cands.append(Candidate(id=n, model=n, params=int(params), macs=int(macs), quality=quality[n] / K))
        stage_cands.append(cands)
    pairs: list[StagePairs] = []
    refused: list[str] = []
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
                    p, m = junction_cost(models[b.model], pa.out_spec, pb.in_spec)
                except SurgeryError as exc:  # a junction make_stitch would refuse is not offered
                    refused.append(f"{a.model} -> {b.model} at stage {k + 1}: {one_line(exc)}")
                    allowed[i, j] = False
                    continue
                P[i, j], M[i, j] = p, m
                C[i, j] = cut_similarity(sim, (a.model, pa.end), (b.model, pb.start))
        C = np.nan_to_num(C, nan=0.0)
        pairs.append(StagePairs(P, M, C, allowed))
    if refused:
        _announce(f"{len(refused)} junction(s) cannot be stitched and are not offered, e.g. {refused[0]}", log)
    program = AssemblyProgram(stage_cands, pairs,
                              # floats, not int(): a NaN/inf budget must reach the program's one-line check
                              max_params=max_params_m * 1e6 if max_params_m is not None else None,
                              max_macs=max_gflops * 1e9 if max_gflops is not None else None,
                              param_penalty=1e-12)
    for fn in constraints or []:
        program.add_constraint(fn)
    try:
        chains = program.solve(top=top, solver=solver)
    except InfeasibleError as exc:  # say it in the units of the budgets given: GFLOPs and M params
        raise budget_infeasible(exc, max_gflops, max_params_m) from exc
    timings["solve"] = time.perf_counter() - t0
    _announce(f"solver: {len(chains)} chain(s) within budget", log)

    # build, fit and score each chain
    t_fit = t_proxy = t_count = 0.0
    ranked: list[Ranked] = []
    activations = dict(src.activations)  # the boundary activations the quality pass already computed
    stitch_acts = activations if src.stitch_inputs is None else {}  # native activations on the stitch images
    skipped: list[dict[str, Any]] = []
    for chain in chains:
        t1 = time.perf_counter()
        chain_plans = [plans[k][bid] for k, bid in enumerate(chain.blocks)]
        first = chain_plans[0].model
        try:
            model, feats = _build_chain(models, dissections, chain_plans, inputs, labels, num_classes, activations,
                                        cuts=src.cuts, features=src.features, stitch_inputs=src.stitch_inputs,
                                        stitch_activations=stitch_acts)
            t_fit += time.perf_counter() - t1
            t1 = time.perf_counter()
            # the head was fitted on forward_features of these very images: the feature proxies reuse them
            # (the same eval-mode, no-grad forward pass would give the same tensor)
            score = score_candidate(model, [inputs[first]], labels, proxy=proxy,
                                    feature_fn=lambda m, xb, f=feats: f)
        except Exception as exc:  # noqa: BLE001 - one chain that cannot be built must not end the run
            note = one_line(exc)
            skipped.append({"models": [s.model for s in chain_plans],
                            "blocks": [[s.start, s.end] for s in chain_plans], "reason": note})
            _announce(f"chain {' > '.join(s.model for s in chain_plans)} skipped: {note}", log)
            continue
        t_proxy += time.perf_counter() - t1
        t1 = time.perf_counter()
        costs = [(cand.params, cand.macs) for k, bid in enumerate(chain.blocks)
                 for cand in stage_cands[k] if cand.id == bid]
        # MACs from the stored numbers the program summed (block MACs of the dissection, new head for the
        # old classifier, stitch_cost formulas): they equal count_macs of the built model (tested), without
        # a counted forward pass per candidate
        ranked.append(Ranked(chain, chain_plans, count_params(model), int(chain.macs), float(score),
                             chain.objective, model, costs))
        t_count += time.perf_counter() - t1
    timings["stitch_fit"] = t_fit
    timings["proxy"] = t_proxy
    timings["count"] = t_count
    if not ranked:
        raise ReassemblyError(f"none of the {len(chains)} chain(s) within budget could be built; first: "
                              f"{' > '.join(skipped[0]['models'])}: {skipped[0]['reason']}")
    rank_by_proxy(ranked)
    best = ranked[0]

    # every zoo model with a new head, on the models already loaded: the Pareto picture's zoo points
    # and the best single model within the same budget (what 'surgery baseline' would write)
    t0 = time.perf_counter()
    singles = score_loaded(names, models, manifests, inputs, labels, num_classes, proxy,
                           max_params=max_params_m * 1e6 if max_params_m is not None else None,
                           max_macs=max_gflops * 1e9 if max_gflops is not None else None,
                           features=src.features)
    zoo_points = [{"model": z.model, "macs": z.macs, "params": z.params, "proxy": z.proxy} for z in singles]
    best_single = singles[0] if singles and singles[0].fits else None
    timings["zoo_points"] = time.perf_counter() - t0
    result = ReassembleResult(ranked, best.model, Path(out_dir) if out_dir else None, timings, zoo_points,
                              best_single, skipped)
    if out_dir is not None:
        t0 = time.perf_counter()
        save_ranked(best, ws, Path(out_dir), target, classes, max_gflops, max_params_m, proxy, seed,
                    stitch_images=(len(next(iter(src.stitch_inputs.values()))) if src.stitch_inputs
                                   else len(labels)))
        write_pareto(result, Path(out_dir) / "pareto.png", proxy)
        timings["save"] = time.perf_counter() - t0
    return result


def rank_by_proxy(ranked: list[Ranked]) -> None:
    """Sort in place, best proxy first; a NaN proxy (e.g. LogME of constant features) ranks last."""
    ranked.sort(key=lambda r: (not math.isnan(r.proxy), r.proxy), reverse=True)


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
                activations: dict[tuple[str, str | None], torch.Tensor] | None = None, *,
                cuts: dict[str, Any] | None = None, stitch_inputs: dict[str, torch.Tensor] | None = None
                ) -> ReassembledModel:
    """Build a chain from pretrained blocks, fit its stitches (ridge) and its head (closed form).

    ``activations`` caches native cut-point activations across the chains of one run, so a junction
    shared by several top-N chains runs its models' prefixes once (up to :data:`ACTIVATION_CACHE_BYTES`).
    ``cuts`` maps a model name to the dissection of its headless copy (:attr:`Sources.cuts`); blocks of
    those models are cut from it instead of re-dissecting the model for every stage of every chain.
    ``stitch_inputs``: other (unlabelled) images per model to fit the stitches on; the labels are
    only ever used for the head.
    """
    return _build_chain(models, dissections, chain, inputs, labels, num_classes, activations, cuts=cuts,
                        stitch_inputs=stitch_inputs)[0]


def _cutter(models: dict[str, nn.Module], cuts: dict[str, Any]):
    """``cut(plan, last)`` for :func:`surgery.assembled.build_parts`: split a held headless dissection."""
    def cut(plan: StagePlan, last: bool) -> tuple[nn.Module, TensorSpec]:
        d = cuts.get(plan.model)
        if d is None:
            return cut_segment(models[plan.model], plan, last=last)
        # as cut_segment: the last block runs to the headless model's output (pre-logits features)
        blocks = d.split([c for c in (plan.start, None if last else plan.end) if c is not None])
        return (blocks[1] if plan.start is not None else blocks[0]), (d.output_spec if last else plan.out_spec)
    return cut


def _build_chain(models: dict[str, nn.Module], dissections: dict[str, Any], chain: list[StagePlan],
                 inputs: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int,
                 activations: dict[tuple[str, str | None], torch.Tensor] | None = None, *,
                 cuts: dict[str, Any] | None = None, features: dict[str, torch.Tensor] | None = None,
                 stitch_inputs: dict[str, torch.Tensor] | None = None,
                 stitch_activations: dict[tuple[str, str | None], Any] | None = None,
                 ) -> tuple[ReassembledModel, torch.Tensor]:
    """:func:`build_chain`, also returning the ``(N, D)`` features the head was fitted on.

    ``features``: pre-logits features of whole source models on their inputs (:attr:`Sources.features`).
    ``stitch_activations``: the cache of native activations on ``stitch_inputs`` (same role as
    ``activations`` for ``inputs``).
    """
    activations = {} if activations is None else activations
    if stitch_inputs is None:
        stitch_inputs, stitch_activations = inputs, activations
    elif stitch_activations is None:
        stitch_activations = {}

    def native(model_name: str, node: str | None) -> torch.Tensor | list[torch.Tensor]:
        key = (model_name, node)
        if key in stitch_activations:
            return stitch_activations[key]
        x = stitch_inputs[model_name]
        out = [_activation(models[model_name], dissections[model_name], node, x[i:i + STITCH_BATCH])
               for i in range(0, x.shape[0], STITCH_BATCH)]
        out = out[0] if len(out) == 1 else out
        _cache_put(stitch_activations, key, out)
        return out

    project = []
    for k in range(1, len(chain)):
        same = chain[k - 1].model == chain[k].model and chain[k - 1].end == chain[k].start
        project.append(None if same else True)
    parts, roles, feature_spec = build_parts(models, chain, project, cut=_cutter(models, cuts) if cuts else None)
    # fit stitches on native activations: donor output and receiver input on the same images
    stitches = iter([p for p, r in zip(parts, roles, strict=True) if r == "stitch"])
    for k in range(1, len(chain)):
        if project[k - 1] is None:
            continue
        prev, cur = chain[k - 1], chain[k]
        fit_stitch(next(stitches), native(prev.model, prev.end), native(cur.model, cur.start))
    head = make_head(feature_spec, num_classes)
    model = ReassembledModel(parts, roles, head).eval()
    # forward_features of the target images, resumed after the chain's first-model blocks when their
    # output is already held (the same blocks on the same images: the same tensor, without the work)
    first = chain[0].model
    x, start = inputs[first], 0
    own = 0  # stages 0..own are consecutive blocks of the first model (no stitch among them)
    while own + 1 < len(chain) and project[own] is None:
        own += 1
    for k in range(own, -1, -1):
        held = (features or {}).get(first) if chain[k].end is None else activations.get((first, chain[k].end))
        if held is not None:
            x, start = held, k + 1  # the parts before stage k+1 are the blocks of stages 0..k
            break
    with torch.inference_mode():
        for part in model.parts[start:]:
            x = part(x)
    fit_linear_head(head, x, labels)
    return model.eval(), x


def _budget_text(max_gflops: float | None, max_params_m: float | None) -> str:
    """The budget in words for a model card ('none' rather than 'None' for an absent limit)."""
    parts = ([f"at most {max_gflops:g} GFLOPs"] if max_gflops is not None else []) + (
        [f"at most {max_params_m:g} M params"] if max_params_m is not None else [])
    return ", ".join(parts) or "none"


def save_ranked(best: Ranked, ws: Workspace, out_dir: Path, target: str, classes: list[str],
                max_gflops, max_params_m, proxy: str, seed: int, kind: str = "reassembled",
                stitch_images: int | None = None) -> Path:
    """Save a built chain as a model folder: recipe, weights and model card.

    ``kind`` is ``reassembled`` or ``single`` (one zoo model with a new head, ``surgery baseline``);
    both load with :func:`surgery.load`.
    """
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
        "kind": kind,
    }
    if stitch_images is not None:
        recipe["stitch_images"] = stitch_images  # images the stitches' least squares saw (labels unused)
    rows = "\n".join(f"| {k} | {s.model} | {s.start or '(input)'} → {s.end or '(pre-logits)'} |"
                     for k, s in enumerate(best.stages))
    made = (f"# Single zoo model with a new head\n\nBuilt by `surgery baseline` from `{first.model}`"
            if kind == "single" else
            f"# Reassembled model\n\nBuilt by `surgery reassemble` from {len(set(s.model for s in best.stages))} "
            "source model(s)")
    card = (f"{made} of the workspace `{ws.root}` for the target `{target}` ({len(classes)} classes).\n\n"
            f"| stage | source model | block |\n|---|---|---|\n{rows}\n\n"
            f"- parameters: {best.params / 1e6:.3f} M (counted on the model)\n"
            f"- GFLOPs (GMACs, batch 1, input {'x'.join(map(str, first.input_size))}): {best.macs / 1e9:.4f}\n"
            f"- budget: {_budget_text(max_gflops, max_params_m)}\n"
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
               label="zoo models (new head)", color="tab:blue", marker="s")
    for z in result.zoo_points:
        ax.annotate(z["model"], (z["macs"] / 1e9, z["proxy"]), fontsize=7)
    ax.set_xlabel("GFLOPs (GMACs)")
    ax.set_ylabel(f"proxy: {proxy}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
