"""Tests for solvers.assembly: the ILP against brute-force enumeration on small random zoos."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pulp
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from solvers.assembly import (
    AssemblyProgram,
    Candidate,
    StagePairs,
    brute_force,
    min_cost_chain,
    solve_assembly,
    top_chains_dp,
)
from solvers.errors import InfeasibleError, SolverError

ROOT = Path(__file__).resolve().parents[1]
HAVE_HIGHS = importlib.util.find_spec("highspy") is not None and pulp.HiGHS(msg=0).available()
# Each example spawns a CBC process per chain, so keep the example counts small (2 shared cores).
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_zoo(seed: int, n_stages: int, n_models: int, *, prune: float = 0.0):
    """A synthetic zoo: every model offers one block per stage; same-model consecutive pairs are free."""
    rng = np.random.default_rng(seed)
    stages = [
        [
            Candidate(
                id=f"m{m}.{k}",
                model=f"m{m}",
                params=int(rng.integers(1, 100)),
                macs=int(rng.integers(1, 100)),
                quality=float(rng.random()),
            )
            for m in range(n_models)
        ]
        for k in range(n_stages)
    ]
    pairs = []
    for _ in range(n_stages - 1):
        sp = rng.integers(0, 30, (n_models, n_models))
        sm = rng.integers(0, 30, (n_models, n_models))
        comp = rng.random((n_models, n_models))
        np.fill_diagonal(sp, 0)
        np.fill_diagonal(sm, 0)
        np.fill_diagonal(comp, 1.0)
        allowed = rng.random((n_models, n_models)) >= prune
        np.fill_diagonal(allowed, True)  # the native chain of every model stays possible
        pairs.append(StagePairs(sp, sm, comp, allowed))
    return stages, pairs


def objectives(chains):
    return [round(c.objective, 6) for c in chains]


zoo_args = st.tuples(
    st.integers(0, 10_000),  # seed
    st.integers(2, 4),  # stages
    st.integers(2, 4),  # candidates per stage
    st.sampled_from([0.0, 0.3]),  # pair pruning
)


@FAST
@given(zoo_args, st.integers(60, 400), st.integers(60, 400), st.booleans())
def test_optimum_and_top_n_match_brute_force(args, max_params, max_macs, penalty):
    seed, n_stages, n_models, prune = args
    stages, pairs = make_zoo(seed, n_stages, n_models, prune=prune)
    kw = dict(max_params=max_params, max_macs=max_macs, param_penalty=1e-3 if penalty else 0.0)
    expected = brute_force(stages, pairs, top=3, **kw)
    event(f"feasible chains: {min(len(expected), 3)}")
    if not expected:
        with pytest.raises(InfeasibleError):
            solve_assembly(stages, pairs, top=3, **kw)
        return
    got = solve_assembly(stages, pairs, top=3, **kw)
    assert objectives(got) == objectives(expected)
    assert len({c.indices for c in got}) == len(got)
    assert all(a.objective >= b.objective - 1e-9 for a, b in zip(got, got[1:], strict=False))
    for c in got:  # budgets hold, stitch costs included, and the reported totals are right
        ref = brute_force(stages, pairs, accept=lambda x, c=c: x.indices == c.indices)[0]
        assert (c.params, c.macs) == (ref.params, ref.macs)
        assert c.params <= max_params and c.macs <= max_macs
        assert c.status == "optimal"


@settings(max_examples=30, deadline=None)
@given(zoo_args, st.integers(1, 6))
def test_dp_paths_match_brute_force(args, top):
    seed, n_stages, n_models, prune = args
    stages, pairs = make_zoo(seed, n_stages, n_models, prune=prune)
    assert objectives(top_chains_dp(stages, pairs, top)) == objectives(brute_force(stages, pairs, top=top))
    every = brute_force(stages, pairs)
    for cost in ("params", "macs"):
        value, idx = min_cost_chain(stages, pairs, cost)
        assert value == min(getattr(c, cost) for c in every)


def test_stitch_costs_count_in_budget():
    # Two models, two stages; mixing has the best quality but its stitch is expensive.
    stages = [
        [Candidate("a0", "a", 10, 10, 0.0), Candidate("b0", "b", 10, 10, 1.0)],
        [Candidate("a1", "a", 10, 10, 1.0), Candidate("b1", "b", 10, 10, 0.0)],
    ]
    sp = np.array([[0, 50], [50, 0]])
    pairs = [StagePairs(sp, np.zeros((2, 2)), np.zeros((2, 2)))]
    [mixed] = solve_assembly(stages, pairs, top=1, max_macs=1000)
    assert mixed.blocks == ("b0", "a1") and mixed.params == 70
    [chain] = solve_assembly(stages, pairs, top=1, max_params=69)
    assert chain.params == 20 and chain.blocks in {("a0", "a1"), ("b0", "b1")}


def test_top_n_returns_fewer_when_fewer_chains_exist():
    stages, pairs = make_zoo(1, 2, 2)
    chains = solve_assembly(stages, pairs, top=10, max_params=10_000)
    assert len(chains) == 4 and objectives(chains) == objectives(brute_force(stages, pairs))


# ----------------------------------------------------------------------------- custom constraints


@pytest.fixture
def zoo():
    return make_zoo(7, 4, 3)


def best(stages, pairs, accept=None, **kw):
    return brute_force(stages, pairs, accept=accept, top=1, **kw)[0]


def test_forbid_block(zoo):
    stages, pairs = zoo
    free = solve_assembly(stages, pairs, top=1, max_params=300)[0]
    prog = AssemblyProgram(stages, pairs, max_params=300)
    prog.forbid(free.blocks[1])
    [chain] = prog.solve(top=1)
    assert free.blocks[1] not in chain.blocks
    ref = best(stages, pairs, lambda c: free.blocks[1] not in c.blocks, max_params=300)
    assert math.isclose(chain.objective, ref.objective)


def test_forbid_model_and_require_model(zoo):
    stages, pairs = zoo
    free = solve_assembly(stages, pairs, top=1)[0]
    banned = free.models[0]
    prog = AssemblyProgram(stages, pairs)
    prog.forbid_model(banned)
    [chain] = prog.solve(top=1)
    assert banned not in chain.models
    assert math.isclose(chain.objective, best(stages, pairs, lambda c: banned not in c.models).objective)

    absent = next(m for m in ("m0", "m1", "m2") if m not in free.models)
    prog = AssemblyProgram(stages, pairs)
    prog.require_model(absent, at_least=2)
    [chain] = prog.solve(top=1)
    assert chain.models.count(absent) >= 2
    ref = best(stages, pairs, lambda c: c.models.count(absent) >= 2)
    assert math.isclose(chain.objective, ref.objective)


def test_require_block(zoo):
    stages, pairs = zoo
    free = solve_assembly(stages, pairs, top=1)[0]
    want = next(c.id for c in stages[2] if c.id != free.blocks[2])
    prog = AssemblyProgram(stages, pairs)
    prog.require(want)
    [chain] = prog.solve(top=1)
    assert chain.blocks[2] == want
    assert math.isclose(chain.objective, best(stages, pairs, lambda c: c.blocks[2] == want).objective)


def test_max_blocks_from_model(zoo):
    stages, pairs = zoo
    free = solve_assembly(stages, pairs, top=1)[0]
    model = max(set(free.models), key=free.models.count)
    n = free.models.count(model) - 1
    prog = AssemblyProgram(stages, pairs)
    prog.max_blocks_from_model(model, n)
    [chain] = prog.solve(top=1)
    assert chain.models.count(model) <= n
    ref = best(stages, pairs, lambda c: c.models.count(model) <= n)
    assert math.isclose(chain.objective, ref.objective)


def test_latency_table_budget(zoo):
    stages, pairs = zoo
    rng = np.random.default_rng(3)
    latency = {c.id: float(rng.uniform(1, 5)) for s in stages for c in s}
    free = solve_assembly(stages, pairs, top=1)[0]
    limit = sum(latency[b] for b in free.blocks) - 0.5
    prog = AssemblyProgram(stages, pairs)
    prog.add_budget(latency, limit, name="latency_ms")
    chains = prog.solve(top=3)
    assert all(c.budgets["latency_ms"] <= limit + 1e-9 for c in chains)
    ref = brute_force(stages, pairs, accept=lambda c: sum(latency[b] for b in c.blocks) <= limit, top=3)
    assert objectives(chains) == objectives(ref)
    with pytest.raises(SolverError, match="no cost for block"):
        AssemblyProgram(stages, pairs).add_budget({}, 1.0)


def test_raw_constraint(zoo):
    stages, pairs = zoo
    free = solve_assembly(stages, pairs, top=1)[0]
    a, b = free.blocks[0], free.blocks[3]
    # "not both a and b", written against the raw variables; also via the functional wrapper.
    rule = lambda p: p.x[0, a] + p.x[3, b] <= 1
    [chain] = solve_assembly(stages, pairs, top=1, constraints=[rule])
    assert not (chain.blocks[0] == a and chain.blocks[3] == b)
    ref = best(stages, pairs, lambda c: not (c.blocks[0] == a and c.blocks[3] == b))
    assert math.isclose(chain.objective, ref.objective)
    # A pair variable constraint: forbid the native stitch between stages 0 and 1 of chain.models[0].
    m = chain.models[0]
    prog = AssemblyProgram(stages, pairs)
    prog.add_constraint(lambda p: p.y[0, f"{m}.0", f"{m}.1"] == 0, name="no_native_01")
    [c2] = prog.solve(top=1)
    assert c2.blocks[:2] != (f"{m}.0", f"{m}.1")
    with pytest.raises(SolverError, match="pulp constraints"):
        prog.add_constraint(lambda p: 3)


def test_unknown_names_and_solver_are_clear_errors(zoo):
    stages, pairs = zoo
    prog = AssemblyProgram(stages, pairs)
    with pytest.raises(SolverError, match="no candidate block"):
        prog.forbid("nope")
    with pytest.raises(SolverError, match="model 'nope'"):
        prog.forbid_model("nope")
    with pytest.raises(SolverError, match="unknown solver"):
        prog.solve(solver="gurobi-please")
    with pytest.raises(SolverError, match="StagePairs"):
        AssemblyProgram(stages, pairs[:-1])


# ----------------------------------------------------------------------------- infeasible budgets


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 4), st.integers(2, 4), st.sampled_from(["params", "macs", "both"]))
def test_infeasible_budget_names_the_smallest_chain(seed, n_stages, n_models, which):
    stages, pairs = make_zoo(seed, n_stages, n_models)
    every = brute_force(stages, pairs)
    min_p, min_m = min(c.params for c in every), min(c.macs for c in every)
    kw = {}
    if which in ("params", "both"):
        kw["max_params"] = min_p - 1
    if which in ("macs", "both"):
        kw["max_macs"] = min_m - 1
    with pytest.raises(InfeasibleError) as info:
        solve_assembly(stages, pairs, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("no chain fits max_")
    assert (info.value.min_params, info.value.min_macs) == (min_p, min_m)
    assert f"{min_p} params" in msg or f"({min_p})" in msg
    assert f"{min_m} MACs" in msg or f"({min_m})" in msg


def test_infeasible_message_format_large_numbers():
    stages = [[Candidate("a", "m", 4_100_000, 2_300_000_000, 1.0)]]
    with pytest.raises(InfeasibleError, match=r"max_macs=1\.20G: the smallest chain needs 2\.30G MACs"):
        solve_assembly(stages, [], max_macs=1_200_000_000)


def test_jointly_infeasible_and_custom_infeasible():
    # Small-params chain is MAC-heavy and vice versa: each budget alone fits, both together do not.
    stages = [[Candidate("p", "a", 10, 100, 1.0), Candidate("m", "b", 100, 10, 1.0)]]
    with pytest.raises(InfeasibleError, match="together"):
        solve_assembly(stages, [], max_params=50, max_macs=50)
    prog = AssemblyProgram(stages, [], max_params=50)
    prog.max_blocks_from_model("a", 0)
    with pytest.raises(InfeasibleError, match="max_blocks_from_model"):
        prog.solve()


# ----------------------------------------------------------------------------- solvers, imports


@pytest.mark.skipif(not HAVE_HIGHS, reason="highspy not installed")
@settings(max_examples=8, deadline=None)
@given(zoo_args, st.integers(80, 300))
def test_highs_matches_cbc(args, budget):
    seed, n_stages, n_models, prune = args
    stages, pairs = make_zoo(seed, n_stages, n_models, prune=prune)
    try:
        cbc = solve_assembly(stages, pairs, max_params=budget, max_macs=budget, top=2)
    except InfeasibleError:
        with pytest.raises(InfeasibleError):
            solve_assembly(stages, pairs, max_params=budget, max_macs=budget, top=2, solver="highs")
        return
    highs = solve_assembly(stages, pairs, max_params=budget, max_macs=budget, top=2, solver="highs")
    assert objectives(highs) == objectives(cbc)


@pytest.mark.skipif(not HAVE_HIGHS, reason="highspy not installed")
def test_highs_banner_stays_off_stdout():
    # HiGHS prints a banner from C++ on first use; stdout must carry only what the caller prints
    # (surgery reassemble --json), so the banner is sent to stderr at the file-descriptor level.
    code = (
        "import sys; sys.path.insert(0, 'tests'); from test_assembly import make_zoo; "
        "from solvers.assembly import AssemblyProgram; stages, pairs = make_zoo(0, 3, 4); "
        "p = AssemblyProgram(stages, pairs, max_params=10**9); p.max_blocks_from_model(stages[0][0].model, 1); "
        "print(len(p.solve(top=2, solver='highs')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout == "2\n"


def test_import_does_not_pull_torch_or_surgery():
    code = (
        "import sys, solvers.assembly; bad = [m for m in sys.modules if m == 'torch' or m.startswith"
        "(('torch.', 'surgery'))]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_example_script_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_constraints.py")],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "forbid" in out.stdout and "latency" in out.stdout
