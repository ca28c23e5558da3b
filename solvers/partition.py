"""Partition M models into K stage-aligned equivalence sets (DeRy's "cover-set" step, done exactly).

Problem
-------
Model ``m`` has ``n_m`` candidate cut points, indexed ``0 .. n_m-1`` in depth order (the model input
sits before index 0 and the output after index ``n_m-1``). ``cum_macs[m][i]`` is the MACs from the
model input up to cut point ``i`` (nondecreasing) and ``total_macs[m]`` the whole model's MACs.
``sim[(m, m')]`` is an ``(n_m, n_m')`` matrix of similarities (CKA of pooled outputs) between cut
points of two models; only one orientation per pair is needed (``sim[(m', m)] = sim[(m, m')].T``).

A solution chooses, for every model, ``K-1`` strictly increasing cut indices
``cut[m][0] < ... < cut[m][K-2]``, splitting the model into ``K`` contiguous blocks. Equivalence
set ``k`` is the ``k``-th block of every model: one block per model per set, so stage alignment is
explicit and every set can be filled by any of its members in a reassembled chain.

Objective
---------
Boundary ``j`` (``j = 0 .. K-2``, the output of block ``j`` = the input of block ``j+1``) should be
functionally equivalent across models. Each boundary has an anchor ``(a_j, c_j)``: a model and one
of its cut points, namely the medoid of the boundary, i.e. one of the models' current ``j``-th cuts
(``c_j = cut[a_j][j]``). The score is::

    J(cut, anchors) = sum_j  sum_{m != a_j}  sim[(m, a_j)][cut[m][j], c_j]

and we maximise ``J(cut) = max over medoid anchors of J(cut, anchors)``. The boundaries are
independent given the cuts, so the best anchors are chosen per boundary: ``a_j`` is the model whose
``j``-th cut maximises the summed similarity to the other models' ``j``-th cuts. The anchor's own
term is left out (it would be a self-similarity, a constant 1), so ``sim[(m, m)]`` is never needed.

Why boundaries: DeRy scores a block pair as ``s(inputs) + s(outputs)``. With contiguous blocks,
block ``k``'s input is boundary ``k-1`` and its output boundary ``k``; the model input and output are
shared by every model and add a constant. Summing DeRy's block similarity over the ``K`` sets
therefore counts every inner boundary exactly twice: the summed block similarity is exactly twice
the summed boundary similarity plus a constant. The one liberty we take is to pick the medoid per
boundary rather than per block (a block anchor fixes both of its boundaries to the same model);
that decouples the boundaries, lets each be solved exactly, and can only raise the score.

Balance: every block of model ``m`` has MACs ``<= (1+eps_m) * total_macs[m] / K`` (``eps`` = 0.2 as
in DeRy; one value for all models, or one per model). When a model cannot meet it for any cuts (one
indivisible heavy piece), we raise :class:`~solvers.errors.InfeasibleError` naming the model and the
smallest ``eps`` that works, computed exactly by a min-max dynamic program; :func:`relaxed_eps` gives
each model ``max(eps, its smallest feasible eps)`` for callers that prefer relaxing to failing.

Method
------
* Per model, given anchors, the best cuts are an exact segmentation DP
  (:func:`best_cuts_for_model`, ``O(K n^2)`` vectorised): value of putting cut ``j`` at ``i`` =
  score of ``i`` for boundary ``j`` + best value of cut ``j-1`` at some ``i' < i`` whose block
  ``(i', i]`` fits the balance limit. The balance limit is a hard mask, not a penalty.
* Alternation (K-medoids style): all models' DPs against fixed anchors (a model that is itself
  anchor of boundary ``j`` keeps that cut pinned, so that the anchor stays a member of its set and
  ``J`` cannot decrease), then medoid update of the anchors. When that stalls, one sweep of exact
  coordinate ascent: each model in turn takes the cuts that maximise ``J`` itself with the other
  models fixed (its scores account for it possibly becoming the medoid). Both steps only accept
  strict improvements, so ``J`` increases strictly at every change and the loop terminates.
* Restarts: restart 0 starts from the most even MAC split, the others from uniformly random balanced
  partitions (:func:`random_partition`) drawn from ``numpy.random.default_rng(seed)``; the best
  ``J`` wins (ties: the earliest restart). Deterministic given ``seed``.

Provenance and differences from DeRy
------------------------------------
DeRy (Yang et al., NeurIPS 2022, §3.2) poses a tri-level cover-set problem: assign all blocks of
all models to K sets around medoid anchors, with each model's contiguous partition refined by a
Kernighan-Lin style one-layer shift at each boundary, under ``|B| < (1+eps)|M|/K``, with 200 random
restarts. Its released code (see ``research/dery.md`` §2.3 and §3) differs in ways that matter: a
typo in the block-similarity guard (``block1.model_name == block1.model_name``) zeroes every
cross-model pair at different stage indices, so every set ends up being "the k-th block of every
model"; the balance guard checks the donor's current size, so oversized blocks never shrink and
balance is not enforced (32 of 96 blocks violated it in our harness); fixing the typo without a
one-block-per-model constraint makes the clustering degenerate into lopsided sets. We keep the part
that actually works (stage-aligned sets around medoids) and make it explicit: the one-block-per-model
per set constraint is built into the representation, each model's partition is solved exactly by
DP instead of by local one-layer moves, balance is a hard constraint measured in MACs (not in node
counts), and infeasibility is reported instead of silently violated.

This module is pure numpy: it never imports torch or :mod:`surgery`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from solvers.errors import InfeasibleError, SolverError

__all__ = [
    "PartitionResult",
    "balance_ok",
    "best_cuts_for_model",
    "block_macs",
    "medoid_anchors",
    "min_feasible_eps",
    "objective",
    "partition",
    "random_partition",
    "relaxed_eps",
]

# Relative tolerance on MAC comparisons: cumulative MACs are sums of floats, and a split that is
# exactly at the limit (e.g. eps = the smallest feasible eps) must count as feasible.
_REL_TOL = 1e-9
# Strict-improvement threshold for accepting a move; stops cycling between equal-score solutions.
_IMPROVE_TOL = 1e-12


@dataclass
class PartitionResult:
    """Result of :func:`partition`.

    Attributes:
        cuts: For each model, its ``K-1`` strictly increasing cut indices (into its candidate list).
        anchors: For each boundary ``j``, the medoid ``(model, cut index)``.
        objective: ``J`` (see the module docstring) of ``cuts`` with ``anchors``.
        block_macs: For each model, the MACs of its ``K`` blocks.
        iterations: Alternation iterations of the winning restart.
        restarts: Number of restarts run.
        restart_objectives: Final objective of every restart, in order.
    """

    cuts: list[list[int]]
    anchors: list[tuple[int, int]]
    objective: float
    block_macs: list[list[float]]
    iterations: int
    restarts: int
    restart_objectives: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Balance helpers
# ----------------------------------------------------------------------------------------------


def _as_cum(
    cum_macs: Sequence[float] | np.ndarray, total_macs: float, model: int | None = None
) -> np.ndarray:
    cum = np.asarray(cum_macs, dtype=np.float64).reshape(-1)
    name = "" if model is None else f"model {model}: "
    if not np.all(np.isfinite(cum)) or not math.isfinite(float(total_macs)):
        raise SolverError(f"{name}cum_macs and total_macs must be finite")
    if total_macs < 0 or (cum.size and cum[0] < 0):
        raise SolverError(f"{name}MACs must be nonnegative")
    if np.any(np.diff(cum) < 0):
        raise SolverError(f"{name}cum_macs must be nondecreasing")
    if cum.size and cum[-1] > total_macs * (1 + _REL_TOL) + 1e-12:
        raise SolverError(f"{name}cum_macs exceeds total_macs ({cum[-1]} > {total_macs})")
    return cum


def _tol(total: float) -> float:
    return _REL_TOL * abs(total) + 1e-12


def _cap(total: float, n_stages: int, eps: float) -> float:
    return (1.0 + eps) * total / n_stages


def block_macs(cuts: Sequence[int], cum_macs: Sequence[float] | np.ndarray, total_macs: float) -> list[float]:
    """MACs of the ``len(cuts)+1`` blocks of one model.

    Args:
        cuts: Strictly increasing cut indices.
        cum_macs: Cumulative MACs at each candidate cut point.
        total_macs: The model's total MACs.

    Returns:
        One MAC count per block, in order.
    """
    cum = np.asarray(cum_macs, dtype=np.float64)
    edges = np.concatenate([[0.0], cum[np.asarray(cuts, dtype=np.int64)], [float(total_macs)]])
    return [float(x) for x in np.diff(edges)]


def balance_ok(
    cuts: Sequence[int],
    cum_macs: Sequence[float] | np.ndarray,
    total_macs: float,
    n_stages: int,
    eps: float = 0.2,
) -> bool:
    """Whether one model's cuts are valid and every block fits ``(1+eps) * total / K``.

    Args:
        cuts: The model's cut indices (must be ``K-1`` strictly increasing valid indices).
        cum_macs: Cumulative MACs at each candidate cut point.
        total_macs: The model's total MACs.
        n_stages: K.
        eps: Balance slack.

    Returns:
        True when the cuts are well formed and balanced.
    """
    cuts_a = np.asarray(cuts, dtype=np.int64).reshape(-1)
    n = len(cum_macs)
    if cuts_a.size != n_stages - 1:
        return False
    if cuts_a.size and (cuts_a[0] < 0 or cuts_a[-1] >= n or np.any(np.diff(cuts_a) <= 0)):
        return False
    blocks = np.asarray(block_macs(cuts_a, cum_macs, total_macs))
    return bool(np.all(blocks <= _cap(total_macs, n_stages, eps) + _tol(total_macs)))


def _feasibility(cum: np.ndarray, total: float, cap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks of the balance limit: first block, inner block ``(i', i]``, last block."""
    tol = _tol(total)
    first_ok = cum <= cap + tol
    last_ok = (total - cum) <= cap + tol
    idx = np.arange(cum.size)
    # inner[i, i'] : a block from cut i' to cut i (i' < i) is allowed.
    inner = (idx[None, :] < idx[:, None]) & ((cum[:, None] - cum[None, :]) <= cap + tol)
    return first_ok, inner, last_ok


def min_feasible_eps(cum_macs: Sequence[float] | np.ndarray, total_macs: float, n_stages: int) -> float:
    """Smallest ``eps`` for which one model can be cut into ``n_stages`` balanced blocks.

    Min-max segmentation DP: ``f[j][i]`` = smallest possible largest block when cut ``j`` is at
    ``i``; the answer is ``K * min_i max(f[K-2][i], total - cum[i]) / total - 1`` (clamped at 0).

    Args:
        cum_macs: Cumulative MACs at each candidate cut point.
        total_macs: The model's total MACs.
        n_stages: K.

    Returns:
        The smallest feasible eps (``inf`` when the model has fewer than ``K-1`` cut points).
    """
    cum = _as_cum(cum_macs, total_macs)
    total = float(total_macs)
    if n_stages <= 1 or total <= 0:
        return 0.0
    if cum.size < n_stages - 1:
        return math.inf
    idx = np.arange(cum.size)
    before = idx[None, :] < idx[:, None]
    f = cum.copy()
    for _ in range(n_stages - 2):
        cand = np.maximum(f[None, :], cum[:, None] - cum[None, :])
        f = np.where(before, cand, np.inf).min(axis=1)
    worst = float(np.min(np.maximum(f, total - cum)))
    return max(0.0, n_stages * worst / total - 1.0)


def relaxed_eps(
    cum_macs: Sequence[Sequence[float] | np.ndarray], total_macs: Sequence[float], n_stages: int, eps: float = 0.2
) -> list[float]:
    """Per model, ``max(eps, smallest feasible eps)``: the tightest balance each model can meet.

    A model that meets ``eps`` keeps it; one that cannot (an indivisible heavy block, e.g. a ResNet
    stem at K = 3) gets exactly its smallest feasible eps (:func:`min_feasible_eps`), which
    :func:`partition` accepts (limits are compared with a relative tolerance). ``inf`` for a model
    with fewer than ``K-1`` cut points, which :func:`partition` then reports.

    Args:
        cum_macs: Per model, cumulative MACs at its candidate cut points.
        total_macs: Per model, total MACs.
        n_stages: K.
        eps: The balance wanted (``>= 0``).

    Returns:
        One eps per model, each ``>= eps``.
    """
    return [max(float(eps), min_feasible_eps(c, t, n_stages)) for c, t in zip(cum_macs, total_macs, strict=True)]


def _eps_per_model(eps: float | Sequence[float], n_models: int) -> list[float]:
    """``eps`` as one float per model (a single value applies to every model)."""
    values = [float(eps)] * n_models if np.isscalar(eps) else [float(e) for e in eps]  # type: ignore[union-attr]
    if len(values) != n_models:
        raise SolverError(f"{len(values)} eps values for {n_models} models")
    if any(not e >= 0 for e in values):  # also rejects NaN
        raise SolverError(f"eps must be >= 0, got {eps}")
    return values


def _round_up(x: float, digits: int = 6) -> float:
    """``x`` rounded up to ``digits`` significant digits, so a printed eps is always feasible."""
    if x == 0 or not math.isfinite(x):
        return x
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(abs(x))))
    return math.ceil(x * scale - 1e-9) / scale


def _infeasible(model: int, cum: np.ndarray, total: float, n_stages: int, eps: float) -> InfeasibleError:
    if cum.size < n_stages - 1:
        err = InfeasibleError(
            f"model {model} has {cum.size} block boundaries (candidate cuts); {n_stages} stages need {n_stages - 1}"
        )
        err.min_eps = math.inf  # type: ignore[attr-defined]
        return err
    need = min_feasible_eps(cum, total, n_stages)
    shown = _round_up(need)
    err = InfeasibleError(
        f"model {model} cannot be split into {n_stages} blocks of at most (1+eps)/{n_stages} of its "
        f"MACs with eps={eps:g}; the smallest eps that works is {shown:.6g}"
    )
    err.min_eps = need  # type: ignore[attr-defined]
    err.model = model  # type: ignore[attr-defined]
    return err


# ----------------------------------------------------------------------------------------------
# Per-model exact DP
# ----------------------------------------------------------------------------------------------


def _dp(
    scores: np.ndarray, first_ok: np.ndarray, inner: np.ndarray, last_ok: np.ndarray
) -> tuple[list[int], float]:
    """Max-sum segmentation DP; returns ([], -inf) when nothing is feasible."""
    n_bound, n = scores.shape
    if n_bound == 0:
        return [], 0.0
    neg = -np.inf
    # The mask as an additive term (0 / -inf) keeps the inner step a single vectorised max.
    inner_add = np.where(inner, 0.0, neg)
    value = np.where(first_ok, scores[0], neg)
    back = np.zeros((n_bound, n), dtype=np.int64)
    for j in range(1, n_bound):
        cand = value[None, :] + inner_add  # cand[i, i'] = best prefix ending at i', then block (i', i]
        back[j] = np.argmax(cand, axis=1)
        value = cand[np.arange(n), back[j]] + scores[j]
    value = np.where(last_ok, value, neg)
    best = int(np.argmax(value))
    if not np.isfinite(value[best]):
        return [], -math.inf
    cuts = [best]
    for j in range(n_bound - 1, 0, -1):
        cuts.append(int(back[j][cuts[-1]]))
    cuts.reverse()
    return cuts, float(value[best])


def best_cuts_for_model(
    scores: np.ndarray,
    cum_macs: Sequence[float] | np.ndarray,
    total_macs: float,
    *,
    eps: float = 0.2,
    model: int = 0,
) -> tuple[list[int], float]:
    """Exact best cuts of one model for given per-boundary scores, under the balance limit.

    Maximises ``sum_j scores[j, cut[j]]`` over strictly increasing ``cut`` (``K-1`` cuts, with
    ``K = scores.shape[0] + 1``) such that every block has MACs ``<= (1+eps) * total_macs / K``.
    ``O(K n^2)`` time, vectorised per boundary. Ties go to the earliest cut points.

    Args:
        scores: ``(K-1, n)`` array; ``scores[j, i]`` = value of placing boundary ``j`` at cut ``i``.
            ``-inf`` forbids a placement (used to pin an anchor's cut).
        cum_macs: Cumulative MACs at each of the ``n`` candidate cut points (nondecreasing).
        total_macs: The model's total MACs.
        eps: Balance slack.
        model: Model index, only used in error messages.

    Returns:
        ``(cuts, value)``.

    Raises:
        InfeasibleError: No balanced split exists (message gives the smallest feasible eps), or
            every balanced split hits a ``-inf`` score.
        SolverError: Malformed input.
    """
    scores = np.asarray(scores, dtype=np.float64)
    cum = _as_cum(cum_macs, total_macs, model)
    if scores.ndim != 2 or scores.shape[1] != cum.size:
        raise SolverError(f"model {model}: scores must have shape (K-1, {cum.size}), got {scores.shape}")
    if np.any(np.isnan(scores)):
        raise SolverError(f"model {model}: scores contain NaN")
    if np.any(scores == np.inf):  # -inf forbids a placement; +inf would swamp every other score
        raise SolverError(f"model {model}: scores contain +inf")
    n_stages = scores.shape[0] + 1
    cap = _cap(float(total_macs), n_stages, eps)
    first_ok, inner, last_ok = _feasibility(cum, float(total_macs), cap)
    if n_stages == 1:
        return [], 0.0
    if cum.size < n_stages - 1:
        raise _infeasible(model, cum, float(total_macs), n_stages, eps)
    cuts, value = _dp(scores, first_ok, inner, last_ok)
    if not cuts:
        if min_feasible_eps(cum, total_macs, n_stages) > eps + _REL_TOL:
            raise _infeasible(model, cum, float(total_macs), n_stages, eps)
        raise InfeasibleError(f"model {model}: every balanced split has a forbidden (-inf) cut")
    return cuts, value


# ----------------------------------------------------------------------------------------------
# Similarity lookup, anchors, objective
# ----------------------------------------------------------------------------------------------


def _pair(sim: Mapping[tuple[int, int], np.ndarray], m: int, a: int) -> np.ndarray:
    """``sim`` between models ``m`` and ``a`` oriented ``(n_m, n_a)``."""
    if (m, a) in sim:
        return np.asarray(sim[(m, a)], dtype=np.float64)
    if (a, m) in sim:
        return np.asarray(sim[(a, m)], dtype=np.float64).T
    # DeRy silently skipped missing similarity files (the pair then scored 0); we refuse.
    raise SolverError(
        f"similarity between models {m} and {a} is missing (need sim[({m}, {a})] or its transpose)"
    )


def _boundary_values(pairs: dict[tuple[int, int], np.ndarray], cuts: np.ndarray, j: int) -> np.ndarray:
    """``vals[a]`` = summed similarity of model ``a``'s ``j``-th cut to the other models' ``j``-th cuts."""
    n_models = cuts.shape[0]
    vals = np.zeros(n_models)
    for a in range(n_models):
        ca = cuts[a, j]
        vals[a] = sum(pairs[(m, a)][cuts[m, j], ca] for m in range(n_models) if m != a)
    return vals


def _medoids(
    pairs: dict[tuple[int, int], np.ndarray], cuts: np.ndarray, prev: list[tuple[int, int]] | None = None
) -> tuple[list[tuple[int, int]], float]:
    anchors: list[tuple[int, int]] = []
    total = 0.0
    for j in range(cuts.shape[1]):
        vals = _boundary_values(pairs, cuts, j)
        a = int(np.argmax(vals))
        # Keep the previous anchor on ties so that anchors do not churn between equal medoids.
        if prev is not None:
            pa, pc = prev[j]
            if cuts[pa, j] == pc and vals[pa] >= vals[a] - _IMPROVE_TOL:
                a = pa
        anchors.append((a, int(cuts[a, j])))
        total += float(vals[a])
    return anchors, total


def _all_pairs(sim: Mapping[tuple[int, int], np.ndarray], n_models: int) -> dict[tuple[int, int], np.ndarray]:
    return {(m, a): _pair(sim, m, a) for m in range(n_models) for a in range(n_models) if m != a}


def medoid_anchors(
    cuts: Sequence[Sequence[int]], sim: Mapping[tuple[int, int], np.ndarray]
) -> list[tuple[int, int]]:
    """Best anchors for given cuts: per boundary, the medoid among all models' ``j``-th cuts.

    Args:
        cuts: Per model, its ``K-1`` cut indices.
        sim: Pairwise similarity matrices (one orientation per pair suffices).

    Returns:
        Per boundary, ``(model, cut index)``; ties go to the lowest model index.
    """
    c = np.asarray(cuts, dtype=np.int64).reshape(len(cuts), -1)
    return _medoids(_all_pairs(sim, c.shape[0]), c)[0]


def objective(
    cuts: Sequence[Sequence[int]],
    sim: Mapping[tuple[int, int], np.ndarray],
    anchors: Sequence[tuple[int, int]] | None = None,
) -> float:
    """The partition objective ``J``.

    ``J = sum_j sum_{m != a_j} sim[(m, a_j)][cuts[m][j], c_j]``. With ``anchors=None`` the anchors
    are the medoids of ``cuts`` (:func:`medoid_anchors`), which gives ``J(cuts)``, the quantity
    :func:`partition` maximises.

    Args:
        cuts: Per model, its ``K-1`` cut indices.
        sim: Pairwise similarity matrices.
        anchors: Per boundary, ``(model, cut index)``; ``None`` for the medoids.

    Returns:
        The objective value.
    """
    c = np.asarray(cuts, dtype=np.int64).reshape(len(cuts), -1)
    pairs = _all_pairs(sim, c.shape[0])
    if anchors is None:
        return _medoids(pairs, c)[1]
    if len(anchors) != c.shape[1]:
        raise SolverError(f"need {c.shape[1]} anchors, got {len(anchors)}")
    total = 0.0
    for j, (a, ca) in enumerate(anchors):
        total += sum(float(pairs[(m, a)][c[m, j], ca]) for m in range(c.shape[0]) if m != a)
    return total


# ----------------------------------------------------------------------------------------------
# Random balanced partitions
# ----------------------------------------------------------------------------------------------


def _sample_cuts(
    first_ok: np.ndarray, inner: np.ndarray, last_ok: np.ndarray, n_bound: int, rng: np.random.Generator
) -> list[int]:
    """Uniform sample among all balanced cut sequences (count by DP, then sample backwards)."""
    if n_bound == 0:
        return []
    w = inner.astype(np.float64)
    counts = [first_ok.astype(np.float64)]
    for _ in range(1, n_bound):
        nxt = w @ counts[-1]
        # Rescaling a whole layer does not change the sampling ratios and avoids overflow.
        peak = nxt.max()
        counts.append(nxt / peak if peak > 0 else nxt)
    p = counts[-1] * last_ok
    cuts = [int(rng.choice(p.size, p=p / p.sum()))]
    for j in range(n_bound - 2, -1, -1):
        p = counts[j] * w[cuts[-1]]
        cuts.append(int(rng.choice(p.size, p=p / p.sum())))
    cuts.reverse()
    return cuts


def random_partition(
    cum_macs: Sequence[Sequence[float] | np.ndarray],
    total_macs: Sequence[float],
    n_stages: int,
    *,
    eps: float | Sequence[float] = 0.2,
    seed: int | np.random.Generator = 0,
) -> list[list[int]]:
    """A uniformly random balanced partition of every model (baseline / ablation / restarts).

    Each model's cuts are drawn uniformly among all its cut sequences that satisfy the balance
    limit (not uniformly per cut, which would favour some splits).

    Args:
        cum_macs: Per model, cumulative MACs at its candidate cut points.
        total_macs: Per model, total MACs.
        n_stages: K.
        eps: Balance slack, one value for all models or one per model.
        seed: Seed or generator.

    Returns:
        Per model, ``K-1`` cut indices.

    Raises:
        InfeasibleError: A model has no balanced split.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out = []
    eps_m = _eps_per_model(eps, len(cum_macs))
    for m, (cm, tot) in enumerate(zip(cum_macs, total_macs, strict=True)):
        cum = _as_cum(cm, tot, m)
        _check_feasible(m, cum, float(tot), n_stages, eps_m[m])
        masks = _feasibility(cum, float(tot), _cap(float(tot), n_stages, eps_m[m]))
        out.append(_sample_cuts(*masks, n_stages - 1, rng))
    return out


def _check_feasible(m: int, cum: np.ndarray, total: float, n_stages: int, eps: float) -> None:
    if n_stages > 1 and (cum.size < n_stages - 1 or min_feasible_eps(cum, total, n_stages) > eps + _REL_TOL):
        raise _infeasible(m, cum, total, n_stages, eps)


# ----------------------------------------------------------------------------------------------
# The alternation
# ----------------------------------------------------------------------------------------------


class _Problem:
    def __init__(self, cum_macs, total_macs, sim, n_stages: int, eps: float | Sequence[float]):
        if n_stages < 1:
            raise SolverError(f"n_stages must be >= 1, got {n_stages}")
        if len(cum_macs) != len(total_macs):
            raise SolverError(f"{len(cum_macs)} cum_macs but {len(total_macs)} total_macs")
        if not cum_macs:
            raise SolverError("no models")
        self.k = n_stages
        self.nb = n_stages - 1
        self.eps = _eps_per_model(eps, len(cum_macs))
        self.totals = [float(t) for t in total_macs]
        self.cums = [_as_cum(c, t, m) for m, (c, t) in enumerate(zip(cum_macs, self.totals, strict=True))]
        self.n_models = len(self.cums)
        for m, (cum, tot) in enumerate(zip(self.cums, self.totals, strict=True)):
            _check_feasible(m, cum, tot, n_stages, self.eps[m])
        self.masks = [
            _feasibility(c, t, _cap(t, n_stages, e))
            for c, t, e in zip(self.cums, self.totals, self.eps, strict=True)
        ]
        self.pairs = _all_pairs(sim, self.n_models)
        for (m, a), mat in self.pairs.items():
            if mat.shape != (self.cums[m].size, self.cums[a].size):
                raise SolverError(
                    f"sim between models {m} and {a} has shape {mat.shape}, "
                    f"expected ({self.cums[m].size}, {self.cums[a].size})"
                )
            if not np.all(np.isfinite(mat)):
                raise SolverError(f"sim between models {m} and {a} has non-finite entries")

    def even_cuts(self, m: int) -> list[int]:
        # Cuts nearest to the equal-MAC targets k*total/K, via the same DP (always balanced).
        targets = np.arange(1, self.k)[:, None] * self.totals[m] / self.k
        scores = -np.abs(self.cums[m][None, :] - targets) / max(self.totals[m], 1e-300)
        return _dp(scores, *self.masks[m])[0]

    def anchor_scores(self, m: int, anchors: list[tuple[int, int]]) -> np.ndarray:
        """Scores of model m's cut points against fixed anchors (its own anchored cuts pinned)."""
        scores = np.empty((self.nb, self.cums[m].size))
        for j, (a, ca) in enumerate(anchors):
            if a == m:
                scores[j] = -np.inf
                scores[j, ca] = 0.0
            else:
                scores[j] = self.pairs[(m, a)][:, ca]
        return scores

    def response_scores(self, m: int, cuts: np.ndarray) -> np.ndarray:
        """Exact J contribution of each placement of model m's boundaries, others' cuts fixed.

        For boundary j, placing model m at c gives max over the possible medoids: another model a
        (its fixed sum over the rest plus sim(m, a)[c, cut_a]) or m itself at c.
        """
        others = [x for x in range(self.n_models) if x != m]
        scores = np.empty((self.nb, self.cums[m].size))
        for j in range(self.nb):
            own = np.zeros(self.cums[m].size)
            best = np.full(self.cums[m].size, -np.inf)
            vals = _boundary_values(self.pairs, cuts, j)
            for a in others:
                ca = cuts[a, j]
                # a's medoid value without model m's term: O(M) per model instead of O(M^2).
                rest = vals[a] - self.pairs[(m, a)][cuts[m, j], ca]
                best = np.maximum(best, rest + self.pairs[(m, a)][:, ca])
                own += self.pairs[(a, m)][cuts[a, j], :]
            scores[j] = np.maximum(best, own) if others else own
        return scores

    def improve(self, m: int, scores: np.ndarray, cur: np.ndarray) -> np.ndarray | None:
        new, value = _dp(scores, *self.masks[m])
        if value > float(scores[np.arange(self.nb), cur].sum()) + _IMPROVE_TOL * max(1.0, abs(value)):
            return np.asarray(new, dtype=np.int64)
        return None

    def run(self, init: np.ndarray, max_iter: int) -> tuple[np.ndarray, list[tuple[int, int]], float, int]:
        cuts = init.copy()
        anchors, _ = _medoids(self.pairs, cuts)
        it = 0
        while it < max_iter:
            it += 1
            changed = False
            # 1) Every model's exact DP against the fixed anchors, then the medoid update.
            for m in range(self.n_models):
                row = self.improve(m, self.anchor_scores(m, anchors), cuts[m])
                if row is not None:
                    cuts[m] = row
                    changed = True
            anchors, _ = _medoids(self.pairs, cuts, anchors)
            if changed:
                continue
            # 2) Stalled: one sweep of exact coordinate ascent on J (each model may also move a
            #    medoid, which step 1 cannot do because it pins anchors).
            for m in range(self.n_models):
                row = self.improve(m, self.response_scores(m, cuts), cuts[m])
                if row is not None:
                    cuts[m] = row
                    changed = True
            anchors, _ = _medoids(self.pairs, cuts, anchors)
            if not changed:
                break
        _, value = _medoids(self.pairs, cuts)
        return cuts, anchors, value, it


def partition(
    cum_macs: list[np.ndarray],
    total_macs: list[float],
    sim: dict[tuple[int, int], np.ndarray],
    n_stages: int,
    *,
    eps: float | Sequence[float] = 0.2,
    restarts: int = 20,
    max_iter: int = 100,
    seed: int = 0,
) -> PartitionResult:
    """Cut every model into ``n_stages`` balanced contiguous blocks with aligned, similar boundaries.

    See the module docstring for the objective and the method.

    Args:
        cum_macs: Per model, cumulative MACs at its candidate cut points (nondecreasing).
        total_macs: Per model, total MACs.
        sim: ``sim[(m, m')]``: ``(n_m, n_m')`` similarity of cut points; one orientation per
            unordered pair is enough, ``sim[(m, m)]`` is not used.
        n_stages: K, the number of blocks per model (and of equivalence sets).
        eps: Balance slack: every block has MACs ``<= (1+eps) * total / K``; one value for all
            models, or one per model (e.g. from :func:`relaxed_eps`).
        restarts: Number of starts (the first from the most even split, the rest random).
        max_iter: Iteration cap per start.
        seed: Seed of the random starts; the result is deterministic given it.

    Returns:
        A :class:`PartitionResult`.

    Raises:
        InfeasibleError: A model cannot be balanced at this eps (the message names the model and
            the smallest eps that works) or has fewer than ``K-1`` cut points.
        SolverError: Malformed input (shapes, missing similarity pairs, non-finite values).
    """
    if restarts < 1 or max_iter < 1:
        raise SolverError("restarts and max_iter must be >= 1")
    prob = _Problem(cum_macs, total_macs, sim, n_stages, eps)
    nm = prob.n_models
    if prob.nb == 0:
        return PartitionResult(
            cuts=[[] for _ in range(nm)],
            anchors=[],
            objective=0.0,
            block_macs=[[t] for t in prob.totals],
            iterations=0,
            restarts=0,
            restart_objectives=[],
        )
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, list[tuple[int, int]], float, int] | None = None
    history = []
    for r in range(restarts):
        if r == 0:
            init = np.array([prob.even_cuts(m) for m in range(nm)], dtype=np.int64)
        else:
            init = np.array([_sample_cuts(*prob.masks[m], prob.nb, rng) for m in range(nm)], dtype=np.int64)
        res = prob.run(init, max_iter)
        history.append(res[2])
        if best is None or res[2] > best[2] + _IMPROVE_TOL * max(1.0, abs(best[2])):
            best = res
    assert best is not None
    cuts, anchors, value, its = best
    cut_lists = [[int(x) for x in row] for row in cuts]
    return PartitionResult(
        cuts=cut_lists,
        anchors=[(int(a), int(c)) for a, c in anchors],
        objective=float(value),
        block_macs=[block_macs(c, prob.cums[m], prob.totals[m]) for m, c in enumerate(cut_lists)],
        iterations=its,
        restarts=restarts,
        restart_objectives=[float(h) for h in history],
    )
