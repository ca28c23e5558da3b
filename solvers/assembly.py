"""Assembly program: choose one block per stage under budgets, as an integer program.

Provenance.
    DeRy (Deep Model Reassembly, NeurIPS 2022, §3.3 Eqs. 8-11) states reassembly as an integer
    program: binary matrices X (block -> equivalence set) and Y (block -> stage), one block per
    set and per stage, ``|M| <= C_param`` and ``FLOPs(M) <= C_FLOPs``, maximising the target
    performance replaced by a NASWOT score. Their code (``simlarity/zeroshot_reassembly.py``) has
    no solver at all: a shuffled greedy replacement over 10-20 trials that builds every candidate
    model to count its params/FLOPs (``research/dery.md`` §4). Since a block can only fill the
    slot of its own stage, X and Y collapse to "pick one of the k-th blocks for each stage k".

What we do.
    An exact program over a layered DAG (stages x candidates): binary ``x[k, b]`` picks block b
    for stage k, ``y[k, b, b']`` marks the consecutive pair (b at k, b' at k+1) so that stitch
    costs and stitch compatibility enter linearly. Params and MACs are additive (blocks +
    stitches), so both budgets are linear rows. The objective is a decomposable surrogate
    (per-block quality + per-pair compatibility); the top-N distinct chains are enumerated with
    no-good cuts so that an expensive, non-decomposable proxy can re-rank them afterwards
    (``research/dery.md`` §9.4). Users add their own linear constraints through small methods or
    directly on the ``pulp.LpProblem``.

Formulation (K stages, candidates ``C_k``, allowed pairs ``A_k``)::

    max  sum_k,b qw*quality[k,b]*x[k,b] + sum_k,(b,b') sw*compat[k,b,b']*y[k,b,b'] - pp*params
    s.t. sum_b x[k,b] = 1                                  for every stage k
         sum_b' y[k,b,b'] = x[k,b]                         for every k < K-1, b in C_k
         sum_b  y[k,b,b'] = x[k+1,b']                      for every k < K-1, b' in C_k+1
         sum params(blocks) + sum stitch_params * y <= max_params   (optional)
         sum macs(blocks)   + sum stitch_macs   * y <= max_macs     (optional)
         x binary, 0 <= y <= 1

The two "flow" equalities aggregate the usual ``y <= x[k,b]``, ``y <= x[k+1,b']``,
``y >= x[k,b] + x[k+1,b'] - 1`` linearisation: they imply the two upper bounds, and their LP
relaxation is tighter (it is the path polytope of the layered DAG). For integral x they also force
y to be integral (at stage pair k only the row of the chosen b is non-zero and it must equal the
0/1 column vector x[k+1]), so y is declared continuous and the branch and bound only branches on
the sum_k |C_k| x variables.

Infeasible budgets are diagnosed with shortest-path DPs over the chain (exact and instant), so the
error names the smallest achievable params and MACs instead of a solver status.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import numpy as np
import pulp

from solvers.chains import (
    Candidate,
    Chain,
    StagePairs,
    amount_text,
    brute_force,
    check_budget,
    finite_number,
    human_number,
    make_chain,
    min_cost_chain,
    top_chains_dp,
    validate_instance,
)
from solvers.errors import InfeasibleError, SolverError
from solvers.native_output import stdout_to_stderr

__all__ = [
    "AssemblyProgram",
    "Candidate",
    "Chain",
    "StagePairs",
    "brute_force",
    "min_cost_chain",
    "solve_assembly",
    "top_chains_dp",
]

# Relative tolerance when re-checking a solver's chain against a float budget (latency tables).
_FLOAT_BUDGET_RTOL = 1e-9


# --------------------------------------------------------------------------- the program


class AssemblyProgram:
    """The assembly integer program, built eagerly so that users can extend it before solving.

    Reachable for custom work: ``problem`` (the ``pulp.LpProblem``), ``x`` (dict
    ``(stage, block_id) -> LpVariable``, binary), ``y`` (dict ``(stage, id_k, id_k+1) ->
    LpVariable``, continuous in [0, 1] but integral whenever x is), ``total_params`` and
    ``total_macs`` (pulp expressions, blocks + stitches), and ``x_of(...)``.

    Example::

        prog = AssemblyProgram(stages, pairs, max_params=30_000_000, max_macs=5_000_000_000)
        prog.forbid_model("vit_small")
        prog.max_blocks_from_model("resnet50", 2)
        prog.add_budget(latency_ms_per_block, limit=5.0, name="latency_ms")
        prog.add_constraint(lambda p: p.x[0, "r50.0"] + p.x[1, "swin.1"] <= 1)
        chains = prog.solve(top=5)

    Args:
        stages: Candidates per stage (stage k may be filled by any of ``stages[k]``).
        pairs: ``len(stages) - 1`` :class:`StagePairs`, stage k to k+1.
        max_params: Optional budget on total params, blocks plus stitches.
        max_macs: Optional budget on total MACs, blocks plus stitches.
        quality_weight: Weight of the summed block quality in the objective.
        stitch_weight: Weight of the summed stitch compatibility in the objective.
        param_penalty: Subtracted from the objective per parameter (blocks + stitches). Default 0.
            A small value breaks ties towards smaller chains; keep ``param_penalty * max chain
            params`` well below the smallest objective difference you care about (e.g. 1e-3 /
            max_params), or it trades quality for size.
        name: Name of the pulp problem.
    """

    def __init__(
        self,
        stages: Sequence[Sequence[Candidate]],
        pairs: Sequence[StagePairs],
        *,
        max_params: int | None = None,
        max_macs: int | None = None,
        quality_weight: float = 1.0,
        stitch_weight: float = 1.0,
        param_penalty: float = 0.0,
        name: str = "assembly",
    ) -> None:
        self.stages = [list(s) for s in stages]
        self.pairs = list(pairs)
        # Every number is checked before it reaches pulp: a NaN coefficient makes CBC fail with a
        # traceback and HiGHS report no solution, so the error must name the number instead.
        validate_instance(self.stages, self.pairs, (quality_weight, stitch_weight, param_penalty))
        check_budget("max_params", max_params)
        check_budget("max_macs", max_macs)
        self.max_params = max_params
        self.max_macs = max_macs
        self.weights = (float(quality_weight), float(stitch_weight), float(param_penalty))
        self.models = sorted({c.model for s in self.stages for c in s})
        # id -> [(stage, index)]: an id may be offered at several stages.
        self._where: dict[Hashable, list[tuple[int, int]]] = {}
        for k, s in enumerate(self.stages):
            for i, c in enumerate(s):
                self._where.setdefault(c.id, []).append((k, i))
        # Per-candidate masks the DP diagnosis can honour (forbid / single-stage require).
        self._masks = [np.ones(len(s), dtype=bool) for s in self.stages]
        self._custom: list[str] = []  # descriptions of constraints the DP cannot see
        self._budgets: list[tuple[str, list[np.ndarray], list[np.ndarray], float]] = []
        self._n_rows = 0
        self._build()

    # ----------------------------------------------------------------- construction

    def _build(self) -> None:
        qw, sw, pp = self.weights
        prob = pulp.LpProblem(self._name_safe("assembly"), pulp.LpMaximize)
        self._xv = [
            [prob.add_variable(f"x_{k}_{i}", cat=pulp.LpBinary) for i in range(len(s))]
            for k, s in enumerate(self.stages)
        ]
        self._yv: list[dict[tuple[int, int], pulp.LpVariable]] = []
        for k, pr in enumerate(self.pairs):
            ii, jj = np.nonzero(pr.allowed)
            self._yv.append(
                {(int(i), int(j)): prob.add_variable(f"y_{k}_{i}_{j}", 0, 1) for i, j in zip(ii, jj, strict=True)}
            )
        self.x = {(k, c.id): self._xv[k][i] for k, s in enumerate(self.stages) for i, c in enumerate(s)}
        self.y = {
            (k, self.stages[k][i].id, self.stages[k + 1][j].id): v
            for k, d in enumerate(self._yv)
            for (i, j), v in d.items()
        }

        for k, xs in enumerate(self._xv):
            prob += pulp.LpAffineExpression([(v, 1) for v in xs]) == 1, f"one_block_stage_{k}"
        for k, d in enumerate(self._yv):
            out: dict[int, list] = {i: [] for i in range(len(self.stages[k]))}
            inc: dict[int, list] = {j: [] for j in range(len(self.stages[k + 1]))}
            for (i, j), v in d.items():
                out[i].append((v, 1))
                inc[j].append((v, 1))
            for i, terms in out.items():
                prob += pulp.LpAffineExpression(terms + [(self._xv[k][i], -1)]) == 0, f"flow_out_{k}_{i}"
            for j, terms in inc.items():
                prob += pulp.LpAffineExpression(terms + [(self._xv[k + 1][j], -1)]) == 0, f"flow_in_{k}_{j}"

        self.total_params = self._linear(lambda c: c.params, [pr.params for pr in self.pairs])
        self.total_macs = self._linear(lambda c: c.macs, [pr.macs for pr in self.pairs])
        if self.max_params is not None:
            prob += self.total_params <= self.max_params, "budget_params"
        if self.max_macs is not None:
            prob += self.total_macs <= self.max_macs, "budget_macs"

        obj = self._linear(lambda c: qw * c.quality, [sw * pr.compatibility for pr in self.pairs])
        if pp:
            obj = obj - pp * self.total_params
        prob += obj
        self.problem = prob
        self._objective = prob.objective
        self._base_rows = len(prob.constraints())

    @staticmethod
    def _name_safe(name: str) -> str:
        return "".join(ch if ch.isalnum() else "_" for ch in name)

    def _linear(self, node: Callable[[Candidate], float], edge: list[np.ndarray]) -> pulp.LpAffineExpression:
        terms = [(self._xv[k][i], node(c)) for k, s in enumerate(self.stages) for i, c in enumerate(s)]
        for k, d in enumerate(self._yv):
            terms += [(v, edge[k][i, j]) for (i, j), v in d.items() if edge[k][i, j] != 0]
        return pulp.LpAffineExpression([(v, float(c)) for v, c in terms if c != 0])

    def _locate(self, block: Hashable, stage: int | None) -> list[tuple[int, int]]:
        spots = [(k, i) for k, i in self._where.get(block, []) if stage is None or k == stage]
        if not spots:
            where = "" if stage is None else f" at stage {stage}"
            raise SolverError(f"no candidate block {block!r}{where}")
        return spots

    def _model_spots(self, model: str) -> list[tuple[int, int]]:
        if model not in self.models:
            raise SolverError(f"no candidate block comes from model {model!r} (models: {', '.join(self.models)})")
        return [(k, i) for k, s in enumerate(self.stages) for i, c in enumerate(s) if c.model == model]

    def _add(self, constraint: pulp.LpConstraint, prefix: str) -> None:
        self._n_rows += 1
        self.problem += constraint, f"{self._name_safe(prefix)}_{self._n_rows}"

    def x_of(self, block: Hashable = None, *, model: str | None = None, stage: int | None = None) -> list:
        """The x variables of one block id and/or one model, optionally at one stage."""
        if block is not None:
            spots = self._locate(block, stage)
        elif model is not None:
            spots = [(k, i) for k, i in self._model_spots(model) if stage is None or k == stage]
        else:
            spots = [(k, i) for k, s in enumerate(self.stages) for i in range(len(s)) if stage in (None, k)]
        if block is not None and model is not None:
            spots = [(k, i) for k, i in spots if self.stages[k][i].model == model]
        return [self._xv[k][i] for k, i in spots]

    # ----------------------------------------------------------------- custom constraints

    def forbid(self, block: Hashable, *, stage: int | None = None) -> None:
        """Never use ``block`` (at ``stage``, or at any stage where it is offered)."""
        for k, i in self._locate(block, stage):
            self._add(self._xv[k][i] == 0, f"forbid_{k}_{i}")
            self._masks[k][i] = False

    def forbid_model(self, model: str) -> None:
        """Use no block of ``model``."""
        for k, i in self._model_spots(model):
            self._add(self._xv[k][i] == 0, f"forbid_model_{k}_{i}")
            self._masks[k][i] = False

    def require(self, block: Hashable, *, stage: int | None = None) -> None:
        """Use ``block`` (at ``stage``; with several stages offering it, at one of them at least)."""
        spots = self._locate(block, stage)
        self._add(pulp.lpSum(self._xv[k][i] for k, i in spots) >= 1, f"require_{block}")
        if len(spots) == 1:
            k, i = spots[0]
            keep = np.zeros_like(self._masks[k])
            keep[i] = True
            self._masks[k] &= keep
        else:
            self._custom.append(f"require({block!r})")

    def require_model(self, model: str, at_least: int = 1) -> None:
        """Use at least ``at_least`` blocks of ``model``."""
        self._add(pulp.lpSum(self.x_of(model=model)) >= at_least, f"require_model_{model}")
        self._custom.append(f"require_model({model!r}, {at_least})")

    def max_blocks_from_model(self, model: str, n: int) -> None:
        """Use at most ``n`` blocks of ``model``."""
        self._add(pulp.lpSum(self.x_of(model=model)) <= n, f"max_from_{model}")
        self._custom.append(f"max_blocks_from_model({model!r}, {n})")

    def add_budget(
        self,
        table: dict[Hashable, float],
        limit: float,
        name: str = "latency",
        *,
        stitch: Sequence[np.ndarray] | None = None,
        default: float | None = None,
    ) -> None:
        """Add an additive budget: ``sum table[block] (+ stitch costs) <= limit``.

        Args:
            table: Cost per block id (e.g. measured latency in ms).
            limit: Upper bound on the chain's total.
            name: Name, reported in ``Chain.budgets`` and error messages.
            stitch: Optional ``(n_k, n_{k+1})`` cost array per stage pair for the stitch layers.
            default: Cost of a block missing from ``table``; None makes a missing block an error,
                since a silently free block would defeat the budget.

        Raises:
            SolverError: A block without a cost (and no ``default``), mis-shaped ``stitch`` arrays,
                or a non-finite cost or ``limit`` (the message names the budget and the block).
        """
        if not finite_number(limit):
            raise SolverError(f"budget {name!r}: limit must be a finite number, got {limit!r}")
        node = []
        for k, s in enumerate(self.stages):
            row = []
            for c in s:
                if c.id in table:
                    cost = table[c.id]
                elif default is not None:
                    cost = default
                else:
                    raise SolverError(f"budget {name!r}: no cost for block {c.id!r} (stage {k}); pass default=")
                if not finite_number(cost):
                    raise SolverError(
                        f"budget {name!r}: cost of block {c.id!r} (model {c.model!r}, stage {k}) is {cost!r}: "
                        "costs must be finite"
                    )
                row.append(float(cost))
            node.append(np.array(row))
        edges = (
            [np.zeros(pr.params.shape) for pr in self.pairs]
            if stitch is None
            else [np.asarray(a, dtype=np.float64) for a in stitch]
        )
        if len(edges) != len(self.pairs) or any(
            e.shape != p.params.shape for e, p in zip(edges, self.pairs, strict=True)
        ):
            raise SolverError(f"budget {name!r}: stitch costs must be one array per stage pair, shaped like pairs")
        for k, (e, pr) in enumerate(zip(edges, self.pairs, strict=True)):
            bad = np.argwhere(pr.allowed & ~np.isfinite(e))
            if bad.size:
                i, j = (int(v) for v in bad[0])
                raise SolverError(
                    f"budget {name!r}: stitch cost {self.stages[k][i].id!r} -> {self.stages[k + 1][j].id!r} "
                    f"(stage {k}) is {e[i, j]}: costs must be finite"
                )
            edges[k] = np.where(pr.allowed, e, 0.0)  # disallowed pairs have no variable
        expr = self._linear(lambda c: 0.0, edges)
        expr += pulp.LpAffineExpression(
            [(self._xv[k][i], node[k][i]) for k in range(len(node)) for i in range(len(node[k])) if node[k][i]]
        )
        self._add(expr <= limit, f"budget_{name}")
        self._budgets.append((name, node, edges, float(limit)))
        self._custom.append(f"add_budget({name!r}, limit={limit:g})")

    def add_constraint(self, fn: Callable[[AssemblyProgram], Any], name: str | None = None) -> None:
        """Add anything else: ``fn(program)`` returns a pulp constraint, a list of them, or None.

        ``fn`` builds its constraint from ``program.x``, ``program.y``, ``program.x_of(...)``,
        ``program.total_params`` / ``total_macs``; returning None means it added its rows to
        ``program.problem`` itself (or called the methods above).
        """
        label = name or getattr(fn, "__name__", "constraint")
        try:
            result = fn(self)
        except pulp.PulpError as e:  # e.g. pulp refusing a NaN/inf coefficient or right-hand side
            raise SolverError(f"add_constraint({label}): {str(e).strip().splitlines()[0]}") from e
        if result is None:
            self._custom.append(f"add_constraint({label})")
            return
        items = (
            [result]
            if isinstance(result, pulp.LpConstraint)
            else list(result)
            if isinstance(result, Iterable)
            else [result]
        )
        for c in items:
            if not isinstance(c, pulp.LpConstraint):
                raise SolverError(
                    f"add_constraint({label}): fn must return pulp constraints (e.g. `p.x[0, 'a'] <= 0`), "
                    f"got {type(c).__name__}"
                )
            self._add(c, f"user_{label}")
        self._custom.append(f"add_constraint({label})")

    # ----------------------------------------------------------------- solving

    def _solver(self, solver: str, time_limit: float | None, threads: int | None, gap: float):
        opts = dict(msg=0, timeLimit=time_limit, gapRel=gap, threads=threads)
        if solver == "cbc":
            if hasattr(pulp, "PULP_CBC_CMD"):
                # PuLP 3.x warns that the bundled CBC goes away in 4.0; we pin <4, so it is noise.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    s = pulp.PULP_CBC_CMD(**opts)
                if s.available():
                    return s
            s = pulp.COIN_CMD(**opts)
            if s.available():
                return s
            raise SolverError("CBC is not available (PuLP>=4 no longer bundles it: pip install 'pulp[cbc]')")
        if solver == "highs":
            s = pulp.HiGHS(**opts)
            if not s.available():
                raise SolverError("solver='highs' needs highspy: pip install 'surgery[highs]' (or highspy)")
            return s
        raise SolverError(f"unknown solver {solver!r}: use 'cbc' or 'highs'")

    def _read_indices(self) -> tuple[int, ...]:
        # argmax rather than == 1: solvers return 0.9999999-style values for binaries.
        return tuple(int(np.argmax([v.varValue or 0.0 for v in xs])) for xs in self._xv)

    def _budget_totals(self, idx: Sequence[int]) -> dict[str, float]:
        out = {}
        for name, node, edges, _ in self._budgets:
            tot = sum(node[k][i] for k, i in enumerate(idx))
            tot += sum(edges[k][idx[k], idx[k + 1]] for k in range(len(idx) - 1))
            out[name] = float(tot)
        return out

    def _fits(self, chain: Chain) -> bool:
        """Exact re-check: a solver's feasibility tolerance must not admit a chain over budget."""
        if self.max_params is not None and chain.params > self.max_params:
            return False
        if self.max_macs is not None and chain.macs > self.max_macs:
            return False
        for name, _, _, limit in self._budgets:
            if chain.budgets[name] > limit + _FLOAT_BUDGET_RTOL * max(1.0, abs(limit)):
                return False
        return all(self._masks[k][i] for k, i in enumerate(chain.indices))

    def _custom_all(self) -> list[str]:
        """Constraints the DP cannot see, including rows written straight into ``problem``."""
        extra = len(self.problem.constraints()) - self._base_rows - self._n_rows
        return self._custom + (["constraints added to program.problem directly"] if extra else [])

    def _unconstrained(self) -> bool:
        return (
            self.max_params is None
            and self.max_macs is None
            and not self._custom_all()
            and all(m.all() for m in self._masks)
            and self.problem.objective is self._objective  # a user may have replaced it
        )

    def solve(
        self,
        top: int = 5,
        solver: str = "cbc",
        time_limit: float | None = None,
        *,
        threads: int | None = None,
        gap: float = 0.0,
    ) -> list[Chain]:
        """Solve for the ``top`` best distinct chains.

        After each solve a no-good cut ``sum_k x[k, b_k] <= K - 1`` removes the chain just found,
        and the program is solved again. The cuts go on a copy of ``problem``, so ``solve`` can be
        called again. Without budgets or constraints an exact k-best DP answers instead.

        Args:
            top: Number of distinct chains wanted (fewer come back if fewer exist).
            solver: ``"cbc"`` (PuLP's bundled CBC) or ``"highs"`` (needs highspy).
            time_limit: Wall-clock seconds for all ``top`` solves together; chains found before it
                runs out are returned, the last one marked ``"feasible"`` if not proven optimal.
            threads: Solver threads (solver default when None).
            gap: Relative MIP gap at which the solver may stop; 0 proves optimality.

        Returns:
            Chains, best first.

        Raises:
            InfeasibleError: No chain satisfies the budgets and constraints; the message states
                the smallest achievable params and MACs.
            SolverError: Unknown or unavailable solver, or no chain found within ``time_limit``.
        """
        if top < 1:
            raise SolverError(f"top must be >= 1, got {top}")
        backend = self._solver(solver, None, threads, gap)  # fail early on an unavailable solver
        self._check_finite_rows()
        self._check_budgets_dp()
        if self._unconstrained():
            qw, sw, pp = self.weights
            return top_chains_dp(self.stages, self.pairs, top, quality_weight=qw, stitch_weight=sw, param_penalty=pp)

        work = self.problem.copy()
        chains: list[Chain] = []
        start = time.monotonic()
        n_cuts = 0
        while len(chains) < top:
            if time_limit is not None:
                left = time_limit - (time.monotonic() - start)
                if left <= 0:
                    break
                backend = self._solver(solver, max(left, 0.01), threads, gap)
            with stdout_to_stderr():  # HiGHS prints a banner to fd 1 whatever msg= says
                work.solve(backend)
            sol = work.sol_status
            if sol in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
                idx = self._read_indices()
                status = "optimal" if sol == pulp.LpSolutionOptimal else "feasible"
                chain = make_chain(self.stages, self.pairs, idx, self.weights, status, self._budget_totals(idx))
                if self._fits(chain):
                    chains.append(chain)
                n_cuts += 1
                x_chosen = [self._xv[k][i] for k, i in enumerate(idx)]
                work += pulp.lpSum(x_chosen) <= len(idx) - 1, f"nogood_{n_cuts}"
                if status == "feasible":
                    break  # the time limit is spent
                continue
            if sol == pulp.LpSolutionInfeasible or (
                sol == pulp.LpSolutionNoSolutionFound and pulp.LpStatus[work.status] == "Infeasible"
            ):
                if not chains and n_cuts == 0:
                    raise self._diagnose(solver)
                break  # fewer than `top` chains exist
            if not chains:
                raise SolverError(
                    f"{solver} found no chain (status {pulp.LpStatus[work.status]}"
                    + (f", time_limit={time_limit:g}s" if time_limit is not None else "")
                    + ")"
                )
            break
        if not chains and n_cuts:
            raise self._diagnose(solver)
        chains.sort(key=lambda c: (-c.objective, c.indices))
        return chains

    # ----------------------------------------------------------------- infeasibility

    def _smallest(self) -> tuple[int | None, int | None]:
        p = min_cost_chain(self.stages, self.pairs, "params", masks=self._masks)
        m = min_cost_chain(self.stages, self.pairs, "macs", masks=self._masks)
        return (None if p is None else p[0]), (None if m is None else m[0])

    def _infeasible(self, msg: str, min_params: int | None, min_macs: int | None) -> InfeasibleError:
        err = InfeasibleError(msg)
        err.min_params = min_params  # machine-readable copies of the numbers in the message
        err.min_macs = min_macs
        return err

    def _check_finite_rows(self) -> None:
        """Refuse a non-finite coefficient anywhere in ``problem`` (rows a user wrote directly included).

        pulp accepts NaN/inf coefficients in expressions built from ``(variable, value)`` lists, and
        CBC then fails with a traceback while HiGHS reports no chain; the checks at construction
        cover our own rows, this one catches everything else.
        """
        where = {v.name: (k, c) for k, s in enumerate(self.stages) for v, c in zip(self._xv[k], s, strict=True)}

        def check(expr, row: str) -> None:
            for var, coef in expr.items():
                if not finite_number(coef):
                    spot = where.get(var.name)
                    block = f" (block {spot[1].id!r} of model {spot[1].model!r}, stage {spot[0]})" if spot else ""
                    raise SolverError(f"{row} has coefficient {coef} on {var.name}{block}: coefficients must be finite")

        if self.problem.objective is not None:
            check(self.problem.objective, "the objective")
        for row in self.problem.constraints():
            check(row, f"constraint {row.name!r}")

    def _check_budgets_dp(self) -> None:
        min_p, min_m = self._smallest()
        if min_p is None:
            raise self._infeasible(
                "no chain exists: the forbid/require constraints and the allowed stitch pairs leave "
                "no path through the stages",
                None,
                None,
            )
        over_p = self.max_params is not None and min_p > self.max_params
        over_m = self.max_macs is not None and min_m > self.max_macs
        mp, mm = amount_text(min_p, "params"), amount_text(min_m, "MACs")
        if over_p and over_m:
            msg = (
                f"no chain fits max_params={human_number(self.max_params)} and max_macs={human_number(self.max_macs)}: "
                f"the smallest chain needs {mp} and the cheapest {mm}"
            )
        elif over_p:
            msg = (
                f"no chain fits max_params={human_number(self.max_params)}: the smallest chain needs {mp} "
                f"(MACs: {mm} smallest)"
            )
        elif over_m:
            msg = (
                f"no chain fits max_macs={human_number(self.max_macs)}: the smallest chain needs {mm} "
                f"(params: {mp} smallest)"
            )
        else:
            return
        raise self._infeasible(msg, min_p, min_m)

    def _diagnose(self, solver: str) -> InfeasibleError:
        """Explain an infeasible program whose budgets each fit the DP minimum on their own."""
        min_p, min_m = self._smallest()
        budgets = ", ".join(
            f"{n}={human_number(v)}"
            for n, v in (("max_params", self.max_params), ("max_macs", self.max_macs))
            if v is not None
        )
        sizes = f"the smallest chain needs {amount_text(min_p, 'params')} and {amount_text(min_m, 'MACs')}"
        custom = self._custom_all()
        joint = self.max_params is not None and self.max_macs is not None
        if custom and joint:
            # Tell "the budgets clash" from "the custom constraints clash" by solving without them.
            plain = AssemblyProgram(self.stages, self.pairs, max_params=self.max_params, max_macs=self.max_macs)
            for k, m in enumerate(self._masks):
                for i in np.flatnonzero(~m):
                    plain.forbid(self.stages[k][i].id, stage=k)
            try:
                plain.solve(top=1, solver=solver)
                joint = False
            except InfeasibleError:
                pass
        if joint:
            return self._infeasible(
                f"no chain fits {budgets} together: {sizes} on their own, but no one chain meets both",
                min_p,
                min_m,
            )
        return self._infeasible(
            f"no chain satisfies {'; '.join(custom) or 'the constraints'}"
            + (f" within {budgets}" if budgets else "")
            + f" ({sizes} without them)",
            min_p,
            min_m,
        )


def solve_assembly(
    stages: Sequence[Sequence[Candidate]],
    pairs: Sequence[StagePairs],
    *,
    max_params: int | None = None,
    max_macs: int | None = None,
    quality_weight: float = 1.0,
    stitch_weight: float = 1.0,
    param_penalty: float = 0.0,
    constraints: Iterable[Callable[[AssemblyProgram], Any]] = (),
    top: int = 5,
    solver: str = "cbc",
    time_limit: float | None = None,
) -> list[Chain]:
    """Build an :class:`AssemblyProgram`, apply ``constraints``, and solve it.

    Each item of ``constraints`` goes through :meth:`AssemblyProgram.add_constraint`, so it may
    return pulp constraints or call the program's methods, e.g.
    ``lambda p: p.forbid_model("vit_small")``.

    Returns:
        Up to ``top`` chains, best first (see :meth:`AssemblyProgram.solve`).
    """
    prog = AssemblyProgram(
        stages,
        pairs,
        max_params=max_params,
        max_macs=max_macs,
        quality_weight=quality_weight,
        stitch_weight=stitch_weight,
        param_penalty=param_penalty,
    )
    for fn in constraints:
        prog.add_constraint(fn)
    return prog.solve(top=top, solver=solver, time_limit=time_limit)
