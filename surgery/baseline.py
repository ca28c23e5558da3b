"""The honest baseline: the best single zoo model within a budget, given a new head for the target.

The step behind ``surgery baseline`` and ``surgery.baseline``; ``surgery reassemble`` lists the same
best single model next to its chosen chain. A reassembled model has to beat this to be worth its
stitches: the README's transfer benchmark compares the two after fine-tuning with one recipe.

A single model is handled exactly like a reassembled chain: its cost counts the new head instead of
the old classifier (as the assembly program counts a chain's last stage), it is ranked by the same
training-free proxy on the same target images, and it is built by the same code
(:func:`surgery.reassembly.build_chain`: its stage blocks chained, no stitch, head fitted in closed
form) and saved as the same kind of model folder, so ``surgery finetune``/``evaluate`` and
:func:`surgery.load` take both alike.

A model's cost with the new head is known before loading its weights (its dissection manifest plus a
weightless ``meta``-device build for the classifier's shape), so models over the budget are never
loaded or built.

Provenance: DeRy (Yang et al., NeurIPS 2022) compares reassembled networks with the zoo's own models
fine-tuned on the target (research/dery.md); this is that comparison under the same budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.errors import InfeasibleError, WorkspaceError
from surgery.workspace import Workspace
from zoo.errors import ZooError

# Proxy that ranks candidates by default. Chosen by measurement, not taste: in the README's transfer
# benchmark (benchmarks/transfer.py, 3 seeds, Kendall tau-b of the proxy with fine-tuned test top-1)
# the closed-form linear probe predicted fine-tuned accuracy best, +0.59 ± 0.07, against LogME
# +0.48 ± 0.13 (NASWOT -0.02, parameter count +0.10). Re-measure when that benchmark changes.
DEFAULT_PROXY = "linear"


@dataclass
class SingleScore:
    """One zoo model given a new head: its cost and proxy score (``proxy`` is ``None`` when not scored).

    ``params`` is a parameter count and ``macs`` MACs at batch 1 (1 FLOP = 1 MAC), both with the new
    head instead of the model's classifier.
    """

    model: str
    params: int
    macs: int
    fits: bool
    proxy: float | None = None

    def summary(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BaselineResult:
    """What :func:`baseline` returns: every model considered (ranked) and the best one, built."""

    singles: list[SingleScore]  # within the budget, best proxy first; then the others, cheapest first
    best: Any  # surgery.reassembly.Ranked, with .model the built network
    proxy: str
    out_dir: Path | None = None
    budget: dict[str, float | None] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        b = self.best
        return {"out": str(self.out_dir) if self.out_dir else None, "proxy": self.proxy, "budget": self.budget,
                "best": {"model": b.stages[0].model, "params": b.params, "macs": b.macs, "proxy": b.proxy},
                "models": [s.summary() for s in self.singles]}


def cost_with_new_head(manifest: dict[str, Any], num_classes: int, model: nn.Module | None = None
                       ) -> tuple[int, int] | None:
    """(params, MACs at batch 1) of a dissected zoo model whose classifier is replaced by a new head.

    Counted as the assembly program counts a chain's last stage: the manifest's totals, less the old
    classifier, plus a linear head from the pre-logits features to ``num_classes``. Without ``model``
    the classifier's shape comes from a ``meta``-device build (no weights loaded).

    Returns:
        The pair, or ``None`` when the shape cannot be known without loading (a model from a Python
        module: pass the loaded ``model``).
    """
    from surgery.reassembly import _classifier_cost
    from zoo.entries import ZooEntry, build_model

    if model is None:
        try:
            model = build_model(ZooEntry.model_validate(manifest["entry"]), structure_only=True)
        except ZooError:
            return None
    old_p, old_m, new_p, new_m = _classifier_cost(model, manifest["settings"]["input_size"], num_classes)
    return int(manifest["params"] - old_p + new_p), int(manifest["macs"] - old_m + new_m)


def _fits(params: int, macs: int, max_params: float | None, max_macs: float | None) -> bool:
    return (max_params is None or params <= max_params) and (max_macs is None or macs <= max_macs)


def score_single(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, proxy: str, params: int,
                 features: torch.Tensor | None = None) -> float:
    """Proxy score of a zoo model with a new head, as :func:`surgery.proxy.score_candidate` scores a chain.

    The feature proxies (``linear``, ``logme``) see the model's pre-logits features, which are exactly
    the features of the built single-model chain, so nothing is built; ``params`` scores the count
    with the new head.

    Args:
        model: the zoo model (real weights; not modified).
        x: ``(N, C, H, W)`` target images transformed for this model.
        labels: ``(N,)`` target labels.
        proxy: ``linear`` | ``logme`` | ``naswot`` | ``params``.
        params: the model's parameter count with the new head.
        features: ``(N, D)`` pre-logits features of ``x`` when the caller already has them (reassembly's
            quality pass): the feature proxies use them instead of running the model again.
    """
    from surgery.assembled import headless
    from surgery.proxy import score_candidate

    if proxy == "params":
        return float(params)
    if features is not None and proxy in ("linear", "logme"):
        return float(score_candidate(model, [x], labels, proxy=proxy, feature_fn=lambda m, xb: features))
    return float(score_candidate(headless(model), [x], labels, proxy=proxy, feature_fn=lambda m, xb: m(xb)))


def score_loaded(names: list[str], models: dict[str, nn.Module], manifests: dict[str, dict[str, Any]],
                 inputs: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int, proxy: str, *,
                 max_params: float | None = None, max_macs: float | None = None,
                 features: dict[str, torch.Tensor] | None = None) -> list[SingleScore]:
    """Cost and proxy of every already-loaded model with a new head, ranked (see :func:`rank_singles`).

    For :func:`surgery.reassembly.reassemble`, which holds the source models anyway: nothing is
    re-loaded, and every model is scored (the over-budget ones too: they are the zoo's points on the
    Pareto picture). ``features``: pre-logits features already computed, by model (see :func:`score_single`).
    """
    out = []
    for n in names:
        params, macs = cost_with_new_head(manifests[n], num_classes, models[n])
        out.append(SingleScore(n, params, macs, _fits(params, macs, max_params, max_macs),
                               score_single(models[n], inputs[n], labels, proxy, params,
                                            (features or {}).get(n))))
    return rank_singles(out)


def rank_singles(singles: list[SingleScore]) -> list[SingleScore]:
    """Within the budget first, best proxy first (a NaN or missing score last); then the rest, cheapest first."""
    def key(s: SingleScore):
        good = s.proxy is not None and not math.isnan(s.proxy)
        return (not s.fits, not good, -(s.proxy if good else 0.0), s.macs, s.params)
    return sorted(singles, key=key)


def _optional_partition(ws: Workspace) -> dict[str, Any] | None:
    """The workspace's partition, ``None`` only when it has none (a corrupt one is a one-line error)."""
    from surgery.equivalence import partition_exists, read_partition

    return read_partition(ws) if partition_exists(ws) else None


def _single_plans(ws: Workspace, name: str, manifest: dict[str, Any], part: dict[str, Any] | None = None) -> list:
    """The model as a chain: its stage blocks when the workspace has a partition (``part``), else one stage."""
    from surgery.assembled import StagePlan
    from surgery.spec import TensorSpec

    settings = manifest["settings"]
    size, gran = tuple(settings["input_size"]), settings["granularity"]
    if part is not None:
        if name in part["models"]:
            return [StagePlan(name, manifest["entry"], b["start"], b["end"], size, gran,
                              TensorSpec.from_dict(b["in_spec"]), TensorSpec.from_dict(b["out_spec"]))
                    for b in part["models"][name]["stage_blocks"]]
    return [StagePlan(name, manifest["entry"], None, None, size, gran, TensorSpec.from_dict(manifest["input_spec"]),
                      TensorSpec.from_dict(manifest["output_spec"]))]


def needed_text(value: float, unit: str) -> str:
    """A smallest feasible cost in the CLI's units (``unit``: ``GFLOPs`` from MACs, ``M params``).

    At least 3 significant figures (and 4 decimals for GFLOPs, 3 for M params), rounded up so that the
    value shown, given as the budget, fits.
    """
    x = value / (1e9 if unit == "GFLOPs" else 1e6)
    if x > 0 and math.isfinite(x):
        places = max(4 if unit == "GFLOPs" else 3, 2 - math.floor(math.log10(x)))
        x = math.ceil(x * 10 ** places - 1e-9) / 10 ** places
        return f"{x:.{places}f} {unit}"
    return f"{x:g} {unit}"


def budget_text(max_macs: float | None, max_params: float | None) -> str:
    """``0.002 GFLOPs and 1 M params``: the budgets as the user gave them (``--max-gflops``, ``--max-params``)."""
    return " and ".join(([f"{max_macs / 1e9:g} GFLOPs"] if max_macs is not None else [])
                        + ([f"{max_params / 1e6:g} M params"] if max_params is not None else []))


def budget_infeasible(exc: InfeasibleError, max_gflops: float | None, max_params_m: float | None) -> InfeasibleError:
    """The assembly program's "no chain fits" error re-worded in GFLOPs and M params (else ``exc`` itself).

    The solver keeps MACs and parameter counts (its ``min_macs``/``min_params`` are carried over).
    """
    min_p, min_m = getattr(exc, "min_params", None), getattr(exc, "min_macs", None)
    if not str(exc).startswith("no chain fits") or min_p is None or min_m is None:
        return exc  # no path at all, or custom constraints: the solver's own words
    max_macs = max_gflops * 1e9 if max_gflops is not None else None
    max_params = max_params_m * 1e6 if max_params_m is not None else None
    over = []
    if max_macs is not None and min_m > max_macs:
        over.append(f"the smallest chain needs {needed_text(min_m, 'GFLOPs')}")
    if max_params is not None and min_p > max_params:
        over.append(f"the smallest chain needs {needed_text(min_p, 'M params')}")
    budget = budget_text(max_macs, max_params)
    if over:
        msg = f"no chain fits within {budget}: {'; '.join(over)}; raise --max-gflops/--max-params"
    else:
        msg = (f"no chain fits within {budget} together: the smallest chain needs {needed_text(min_m, 'GFLOPs')} "
               f"and the smallest {needed_text(min_p, 'M params')} on their own, but no one chain meets both; "
               "raise --max-gflops/--max-params")
    err = InfeasibleError(msg)
    err.min_params, err.min_macs = min_p, min_m
    return err


def _no_fit_message(singles: list[SingleScore], max_params: float | None, max_macs: float | None,
                    num_classes: int) -> str:
    parts = []
    if max_macs is not None:
        s = min(singles, key=lambda s: s.macs)
        parts.append(f"the smallest needs {needed_text(s.macs, 'GFLOPs')} ({s.model})")
    if max_params is not None:
        s = min(singles, key=lambda s: s.params)
        parts.append(f"the smallest needs {needed_text(s.params, 'M params')} ({s.model})")
    return (f"no zoo model fits within {budget_text(max_macs, max_params)} with a new {num_classes}-class head: "
            f"{'; '.join(parts)}; raise --max-gflops/--max-params")


def baseline(
    workdir: str | Path,
    model: str | None = None,
    *,
    data: str,
    max_gflops: float | None = None,
    max_params_m: float | None = None,
    proxy: str = DEFAULT_PROXY,
    seed: int = 0,
    target_samples: int = 256,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> BaselineResult:
    """The best single zoo model within a budget, with a new head for ``data`` (the honest baseline).

    Without ``model``: every dissected model whose cost with the new head fits the budgets, ranked by
    the proxy on ``target_samples`` target images; the best is built (head fitted in closed form) and
    written. With ``model``: that model, built the same way (the budgets, if given, must hold).

    Args:
        workdir: workspace with a dissected zoo (``surgery dissect``); no similarity or partition needed.
        model: one workspace model, or ``None`` for all.
        data: target data (e.g. ``digits``): the head's classes, its fitting images and the proxy's.
        max_gflops: MAC budget in GMACs (1 FLOP = 1 MAC), new head included.
        max_params_m: parameter budget in millions, new head included.
        proxy: ``linear`` (default, see :data:`DEFAULT_PROXY`) | ``logme`` | ``naswot`` | ``params``.
        seed: seed of the target image draw.
        target_samples: target images for the head and the proxy.
        out_dir: model folder to write the best one to (``None``: do not write).
        log: one-line announcements.

    Returns:
        A :class:`BaselineResult`; ``best`` is a :class:`surgery.reassembly.Ranked` with the built model.

    Raises:
        InfeasibleError: no model fits the budgets (says the smallest cost).
        WorkspaceError: unknown ``model``, or a model dissected structure-only (no weights).
        DataError: unreadable target data.
    """
    from surgery.count import count_macs, count_params
    from surgery.library import load_model_entry
    from surgery.reassembly import Ranked, _headless_cut, _target_batches, _transform, build_chain, save_ranked

    ws = Workspace(workdir).require()
    names = ws.model_names()
    if model is not None:
        if model not in names:
            raise WorkspaceError(f"{model!r} is not a model of {ws.root} (it has: {', '.join(names) or 'none'})")
        names = [model]
    if not names:
        raise WorkspaceError(f"{ws.root} holds no dissected model; run 'surgery dissect' first")
    part = _optional_partition(ws)  # read before any work: a corrupt one fails at once
    max_params = max_params_m * 1e6 if max_params_m is not None else None
    max_macs = max_gflops * 1e9 if max_gflops is not None else None
    images, labels, classes = _target_batches(data, seed, target_samples)
    num_classes = len(classes)
    manifests = {n: ws.read_dissection(n) for n in names}

    singles: list[SingleScore] = []
    best: tuple[SingleScore, nn.Module, torch.Tensor] | None = None
    for n in names:
        cost = cost_with_new_head(manifests[n], num_classes)
        if cost is not None and not _fits(*cost, max_params, max_macs):
            singles.append(SingleScore(n, *cost, fits=False))  # over budget: never loaded
            continue
        _, manifest, net = load_model_entry(ws, n)
        params, macs = cost or cost_with_new_head(manifest, num_classes, net)
        if not _fits(params, macs, max_params, max_macs):
            singles.append(SingleScore(n, params, macs, fits=False))
            continue
        x = _transform(manifest)(images)
        s = SingleScore(n, params, macs, True, score_single(net, x, labels, proxy, params))
        singles.append(s)
        if log:
            log(f"{n}: {params / 1e6:.3f} M params, {macs / 1e9:.4f} GFLOPs, {proxy} {s.proxy:.4f}")
        if best is None or rank_singles([best[0], s])[0] is s:  # ties: the earlier model stays
            best = (s, net, x)  # keep only the leader's weights in memory
    if best is None:
        raise InfeasibleError(_no_fit_message(singles, max_params, max_macs, num_classes))

    top, net, x = best
    plans = _single_plans(ws, top.model, manifests[top.model], part)
    # one trace of the leader's headless copy cuts all its stage blocks (build_chain would otherwise
    # dissect the model again for every stage); None when that graph lacks a cut node: the plain way
    headless_d, _, _ = _headless_cut(net, manifests[top.model], top.model, [p.end for p in plans[:-1]])
    built = build_chain({top.model: net}, {}, plans, {top.model: x}, labels, num_classes,
                        cuts={top.model: headless_d} if headless_d is not None else None)
    size = manifests[top.model]["settings"]["input_size"]
    ranked = Ranked(None, plans, count_params(built), count_macs(built, torch.zeros(1, *size)), float(top.proxy),
                    0.0, built)
    result = BaselineResult(rank_singles(singles), ranked, proxy, Path(out_dir) if out_dir else None,
                            {"max_gflops": max_gflops, "max_params_m": max_params_m})
    if out_dir is not None:
        save_ranked(ranked, ws, Path(out_dir), data, classes, max_gflops, max_params_m, proxy, seed, kind="single")
    return result
