"""The data of a reassembly instance and exact chain algorithms that need no solver.

A reassembly instance is a layered DAG: stages of :class:`Candidate` blocks, :class:`StagePairs`
saying which consecutive blocks can be stitched and at what cost, and a :class:`Chain` as the
answer. :func:`brute_force` enumerates every chain (the reference the integer program is tested
against); :func:`min_cost_chain` and :func:`top_chains_dp` are shortest-path dynamic programmes over
the DAG: the smallest achievable params/MACs that :mod:`solvers.assembly` names when a budget is
infeasible, and the top-N chains when no budget or custom constraint couples the stages.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from solvers.errors import SolverError

__all__ = ["Candidate", "StagePairs", "Chain", "brute_force", "min_cost_chain", "top_chains_dp",
           "validate_instance", "check_budget", "make_chain", "chain_totals", "chain_allowed", "human_number",
           "amount_text"]

# Candidate fields every solver path reads, with the names error messages give them.
_CANDIDATE_NUMBERS = (("quality", "block quality"), ("params", "params"), ("macs", "MACs"))


@dataclass(frozen=True)
class Candidate:
    """One block that may fill a stage.

    Attributes:
        id: Any hashable identifier, unique within its stage (may repeat across stages).
        model: Name of the source model (used by the per-model constraints).
        params: Parameter count of the block.
        macs: Multiply-accumulates of the block at its stage's input resolution.
        quality: Decomposable surrogate score of the block (higher is better).
    """

    id: Hashable
    model: str
    params: int
    macs: int
    quality: float = 0.0


@dataclass
class StagePairs:
    """Pair data between stage k (rows) and stage k+1 (columns), as dense arrays.

    The caller supplies every number, including the zero-cost pair of two blocks that are
    consecutive in the same source model.

    Attributes:
        params: ``(n_k, n_{k+1})`` integer stitch parameters.
        macs: ``(n_k, n_{k+1})`` integer stitch MACs.
        compatibility: ``(n_k, n_{k+1})`` float stitch score (e.g. CKA; higher is better).
        allowed: Optional ``(n_k, n_{k+1})`` bool mask; a disallowed pair gets no variable at all,
            which is how a caller prunes incompatible layouts or keeps only the top partners.
    """

    params: np.ndarray
    macs: np.ndarray
    compatibility: np.ndarray
    allowed: np.ndarray | None = None

    def __post_init__(self) -> None:
        # Checked as floats before the integer cast, which would turn NaN/inf into arbitrary integers.
        raw = {
            name: np.asarray(getattr(self, name), dtype=np.float64)
            for name in ("params", "macs", "compatibility")
        }
        shape = raw["params"].shape
        if len(shape) != 2 or raw["macs"].shape != shape or raw["compatibility"].shape != shape:
            raise SolverError(
                f"StagePairs arrays must share one 2-D shape, got params {raw['params'].shape}, "
                f"macs {raw['macs'].shape}, compatibility {raw['compatibility'].shape}"
            )
        if self.allowed is None:
            self.allowed = np.ones(shape, dtype=bool)
        else:
            self.allowed = np.asarray(self.allowed, dtype=bool)
            if self.allowed.shape != shape:
                raise SolverError(f"StagePairs.allowed has shape {self.allowed.shape}, expected {shape}")
        for name, a in raw.items():
            bad = np.argwhere(self.allowed & ~np.isfinite(a))
            if bad.size:
                i, j = (int(v) for v in bad[0])
                raise SolverError(
                    f"StagePairs.{name} is {a[i, j]} at allowed pair ({i}, {j}): stitch numbers must be "
                    "finite (disallow the pair instead)"
                )
            # A disallowed pair's numbers are never read; a NaN there must not reach the int cast.
            raw[name] = np.where(np.isfinite(a), a, 0.0)
        self.params = raw["params"].astype(np.int64)
        self.macs = raw["macs"].astype(np.int64)
        self.compatibility = raw["compatibility"]

    @classmethod
    def zeros(cls, n_from: int, n_to: int) -> StagePairs:
        """Free stitches with zero compatibility between every pair."""
        return cls(np.zeros((n_from, n_to)), np.zeros((n_from, n_to)), np.zeros((n_from, n_to)))

    @classmethod
    def from_dict(
        cls,
        stage_from: Sequence[Candidate],
        stage_to: Sequence[Candidate],
        table: dict[tuple[Hashable, Hashable], tuple[int, int, float]],
    ) -> StagePairs:
        """Build from ``{(id_from, id_to): (params, macs, compatibility)}``; missing pairs are disallowed."""
        row = {c.id: i for i, c in enumerate(stage_from)}
        col = {c.id: j for j, c in enumerate(stage_to)}
        shape = (len(stage_from), len(stage_to))
        p, m, c, a = np.zeros(shape), np.zeros(shape), np.zeros(shape), np.zeros(shape, dtype=bool)
        for (u, v), (sp, sm, sc) in table.items():
            if u not in row or v not in col:
                raise SolverError(f"pair ({u!r}, {v!r}) names a block that is not in these stages")
            i, j = row[u], col[v]
            p[i, j], m[i, j], c[i, j], a[i, j] = sp, sm, sc, True
        return cls(p, m, c, a)


@dataclass(frozen=True)
class Chain:
    """One assembled chain (a solution).

    Attributes:
        blocks: Block id per stage (``blocks[k]`` fills stage k).
        indices: Candidate index per stage.
        models: Source model per stage.
        objective: Objective value, recomputed exactly from the data (not the solver's float).
        params: Total params, blocks plus stitches.
        macs: Total MACs, blocks plus stitches.
        quality: Unweighted sum of block qualities.
        compatibility: Unweighted sum of stitch compatibilities.
        status: ``"optimal"`` (proven, given the earlier chains excluded), ``"feasible"`` (a time
            limit stopped the solver first), ``"dp"`` or ``"enumerated"``.
        budgets: Totals of the custom budgets (``add_budget``), by name.
    """

    blocks: tuple
    indices: tuple[int, ...]
    models: tuple[str, ...]
    objective: float
    params: int
    macs: int
    quality: float
    compatibility: float
    status: str
    budgets: dict[str, float] = field(default_factory=dict, hash=False)


def finite_number(value) -> bool:
    """Whether ``value`` converts to a finite float (NaN, infinities and non-numbers do not)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def check_budget(name: str, value: float | None) -> None:
    """Raise :class:`SolverError` unless the budget ``value`` is None (no budget) or a finite number."""
    if value is not None and not finite_number(value):
        raise SolverError(f"budget {name} must be a finite number (or None for no budget), got {value!r}")


def _check_finite(value, what: str) -> None:
    if not finite_number(value):
        raise SolverError(f"{what} is {value!r}: every number entering the solver must be finite")


def validate_instance(
    stages: Sequence[Sequence[Candidate]],
    pairs: Sequence[StagePairs],
    weights: Sequence[float] | None = None,
) -> None:
    """Check an instance before any solver path (ILP, DP, enumeration) reads it.

    Raises:
        SolverError: No stages, an empty stage, repeated block ids, mis-shaped pairs, or a
            non-finite number: a block's quality, params or MACs (the message names the block, its
            model and stage), a stitch compatibility on an allowed pair (naming both blocks), or an
            objective weight ``(quality_weight, stitch_weight, param_penalty)``.
    """
    if len(stages) == 0:
        raise SolverError("the assembly program needs at least one stage")
    if len(pairs) != len(stages) - 1:
        raise SolverError(f"{len(stages)} stages need {len(stages) - 1} StagePairs, got {len(pairs)}")
    for k, stage in enumerate(stages):
        if len(stage) == 0:
            raise SolverError(f"stage {k} has no candidate blocks")
        ids = [c.id for c in stage]
        if len(set(ids)) != len(ids):
            raise SolverError(f"stage {k} repeats a block id; ids must be unique within a stage")
        for c in stage:
            for attr, label in _CANDIDATE_NUMBERS:
                _check_finite(getattr(c, attr), f"{label} of block {c.id!r} (model {c.model!r}, stage {k})")
    for k, pr in enumerate(pairs):
        want = (len(stages[k]), len(stages[k + 1]))
        if pr.params.shape != want:
            raise SolverError(f"pairs[{k}] has shape {pr.params.shape}, expected {want}")
        # Again here: StagePairs is mutable, and only here are the blocks' names known.
        bad = np.argwhere(pr.allowed & ~np.isfinite(pr.compatibility))
        if bad.size:
            i, j = (int(v) for v in bad[0])
            a, b = stages[k][i], stages[k + 1][j]
            _check_finite(
                pr.compatibility[i, j],
                f"stitch compatibility of {a.id!r} (model {a.model!r}, stage {k}) -> {b.id!r} "
                f"(model {b.model!r}, stage {k + 1})",
            )
    for name, w in zip(("quality_weight", "stitch_weight", "param_penalty"), weights or (), strict=False):
        _check_finite(w, name)


def chain_totals(stages, pairs, idx: Sequence[int]) -> tuple[int, int, float, float]:
    """Params, MACs, summed quality and summed stitch compatibility of the chain ``idx`` (stitches included)."""
    params = sum(int(stages[k][i].params) for k, i in enumerate(idx))
    macs = sum(int(stages[k][i].macs) for k, i in enumerate(idx))
    quality = sum(float(stages[k][i].quality) for k, i in enumerate(idx))
    compat = 0.0
    for k in range(len(idx) - 1):
        i, j = idx[k], idx[k + 1]
        params += int(pairs[k].params[i, j])
        macs += int(pairs[k].macs[i, j])
        compat += float(pairs[k].compatibility[i, j])
    return params, macs, quality, compat


def make_chain(stages, pairs, idx, weights, status, budgets=None) -> Chain:
    """The :class:`Chain` for block indices ``idx`` with its objective under ``weights = (qw, sw, pp)``."""
    qw, sw, pp = weights
    params, macs, quality, compat = chain_totals(stages, pairs, idx)
    return Chain(
        blocks=tuple(stages[k][i].id for k, i in enumerate(idx)),
        indices=tuple(int(i) for i in idx),
        models=tuple(stages[k][i].model for k, i in enumerate(idx)),
        objective=qw * quality + sw * compat - pp * params,
        params=params,
        macs=macs,
        quality=quality,
        compatibility=compat,
        status=status,
        budgets=dict(budgets or {}),
    )


def chain_allowed(pairs, idx) -> bool:
    """Whether every consecutive pair of the chain ``idx`` can be stitched."""
    return all(pairs[k].allowed[idx[k], idx[k + 1]] for k in range(len(idx) - 1))


def brute_force(
    stages: Sequence[Sequence[Candidate]],
    pairs: Sequence[StagePairs],
    *,
    max_params: int | None = None,
    max_macs: int | None = None,
    quality_weight: float = 1.0,
    stitch_weight: float = 1.0,
    param_penalty: float = 0.0,
    accept: Callable[[Chain], bool] | None = None,
    top: int | None = None,
) -> list[Chain]:
    """Enumerate every chain (a reference for tests; exponential in the number of stages).

    Args:
        stages: Candidates per stage.
        pairs: Pair data per consecutive stage pair.
        max_params: Optional budget on total params (blocks + stitches).
        max_macs: Optional budget on total MACs (blocks + stitches).
        quality_weight: Weight of block quality in the objective.
        stitch_weight: Weight of stitch compatibility in the objective.
        param_penalty: Objective penalty per parameter.
        accept: Optional extra filter on a chain (stands in for custom constraints).
        top: Keep only the best ``top`` chains.

    Returns:
        Feasible chains sorted by decreasing objective (ties by candidate indices).
    """
    weights = (quality_weight, stitch_weight, param_penalty)
    validate_instance(stages, pairs, weights)
    check_budget("max_params", max_params)
    check_budget("max_macs", max_macs)
    out = []
    for idx in itertools.product(*(range(len(s)) for s in stages)):
        if not chain_allowed(pairs, idx):
            continue
        chain = make_chain(stages, pairs, idx, weights, "enumerated")
        if max_params is not None and chain.params > max_params:
            continue
        if max_macs is not None and chain.macs > max_macs:
            continue
        if accept is not None and not accept(chain):
            continue
        out.append(chain)
    out.sort(key=lambda c: (-c.objective, c.indices))
    return out if top is None else out[:top]


def min_cost_chain(
    stages: Sequence[Sequence[Candidate]],
    pairs: Sequence[StagePairs],
    cost: str = "params",
    *,
    masks: Sequence[np.ndarray] | None = None,
) -> tuple[int, tuple[int, ...]] | None:
    """Cheapest chain by params or MACs (blocks + stitches): a shortest path over the stages.

    Exact because a chain is a path in a layered DAG and both costs are additive, in
    ``O(sum_k n_k * n_{k+1})``.

    Args:
        stages: Candidates per stage.
        pairs: Pair data per consecutive stage pair.
        cost: ``"params"`` or ``"macs"``.
        masks: Optional bool array per stage; False excludes a candidate.

    Returns:
        ``(total cost, candidate indices)``, or None when no chain exists at all.
    """
    if cost not in ("params", "macs"):
        raise SolverError(f"cost must be 'params' or 'macs', got {cost!r}")
    validate_instance(stages, pairs)
    node = [np.array([getattr(c, cost) for c in s], dtype=np.float64) for s in stages]
    if masks is not None:
        node = [np.where(m, n, np.inf) for n, m in zip(node, masks, strict=True)]
    dist = node[0]
    back = []
    for k, pr in enumerate(pairs):
        edge = np.where(pr.allowed, getattr(pr, cost).astype(np.float64), np.inf)
        total = dist[:, None] + edge  # (n_k, n_k+1): best cost ending in b, then stepping to b'
        arg = np.argmin(total, axis=0)
        back.append(arg)
        dist = total[arg, np.arange(total.shape[1])] + node[k + 1]
    end = int(np.argmin(dist))
    if not np.isfinite(dist[end]):
        return None
    idx = [end]
    for arg in reversed(back):
        idx.append(int(arg[idx[-1]]))
    idx.reverse()
    # Recompute in integers: float64 sums are exact below 2**53, but the caller wants an int.
    params, macs, _, _ = chain_totals(stages, pairs, idx)
    return (params if cost == "params" else macs), tuple(idx)


def top_chains_dp(
    stages: Sequence[Sequence[Candidate]],
    pairs: Sequence[StagePairs],
    top: int = 1,
    *,
    quality_weight: float = 1.0,
    stitch_weight: float = 1.0,
    param_penalty: float = 0.0,
) -> list[Chain]:
    """Exact top-N chains without budgets: a k-best longest-path DP over the stages.

    Each node keeps its ``top`` best partial chains; any of the global top-N chains has a prefix
    that is among the top-N prefixes ending at its node, so this is exact.

    Args:
        stages: Candidates per stage.
        pairs: Pair data per consecutive stage pair.
        top: Number of chains.
        quality_weight: Weight of block quality.
        stitch_weight: Weight of stitch compatibility.
        param_penalty: Objective penalty per parameter.

    Returns:
        Up to ``top`` distinct chains, best first.
    """
    weights = (quality_weight, stitch_weight, param_penalty)
    validate_instance(stages, pairs, weights)

    def gain(c: Candidate) -> float:
        return quality_weight * c.quality - param_penalty * c.params

    best = [[(gain(c), (i,))] for i, c in enumerate(stages[0])]
    for k, pr in enumerate(pairs):
        edge = stitch_weight * pr.compatibility - param_penalty * pr.params
        nxt = []
        for j, c in enumerate(stages[k + 1]):
            options = (
                (score + edge[i, j] + gain(c), path + (j,))
                for i in np.flatnonzero(pr.allowed[:, j])
                for score, path in best[i]
            )
            nxt.append(heapq.nlargest(top, options, key=lambda t: (t[0], [-v for v in t[1]])))
        best = nxt
    final = heapq.nlargest(top, (t for lst in best for t in lst), key=lambda t: (t[0], [-v for v in t[1]]))
    chains = [make_chain(stages, pairs, path, weights, "dp") for _, path in final]
    chains.sort(key=lambda c: (-c.objective, c.indices))
    return chains


def human_number(n: float) -> str:
    """``4.1M``-style rendering of a count."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def amount_text(n: int, unit: str) -> str:
    """``4.10M params (4100000)``: readable, with the exact integer for scripts and tests."""
    return f"{human_number(n)} {unit} ({n})" if abs(n) >= 1000 else f"{n} {unit}"
