"""Non-finite numbers entering a solver (issue 9): each gets a one-line SolverError naming it, the
same on every path (CBC, HiGHS, the exact DPs, brute force), never a pulp traceback or a NaN chain
ranked first. End to end, a zoo with one all-zero-weight model reassembles without that model."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import numpy as np
import pulp
import pytest
import timm
import torch
import yaml
from helpers import run_cli

from solvers.assembly import AssemblyProgram, Candidate, StagePairs, brute_force, min_cost_chain, top_chains_dp
from solvers.errors import SolverError
from solvers.partition import best_cuts_for_model
from surgery.reassembly import Ranked, rank_by_proxy
from zoo.entries import save_weights

HAVE_HIGHS = importlib.util.find_spec("highspy") is not None and pulp.HiGHS(msg=0).available()


def zoo(n_stages: int = 3, n_models: int = 3):
    """A small instance: every model offers one block per stage, all pairs allowed."""
    rng = np.random.default_rng(0)
    stages = [
        [Candidate(f"m{m}.{k}", f"m{m}", int(rng.integers(1, 50)), int(rng.integers(1, 50)), float(rng.random()))
         for m in range(n_models)]
        for k in range(n_stages)
    ]
    pairs = [StagePairs(rng.integers(0, 9, (n_models, n_models)), rng.integers(0, 9, (n_models, n_models)),
                        rng.random((n_models, n_models))) for _ in range(n_stages - 1)]
    return stages, pairs


def with_block(stages, k: int, i: int, **changes):
    out = [list(s) for s in stages]
    out[k][i] = dataclasses.replace(out[k][i], **changes)
    return out


def solve_ilp(solver: str):
    def run(stages, pairs, **kw):
        # A budget keeps the program off its exact-DP shortcut, so the solver itself runs.
        prog = AssemblyProgram(stages, pairs, max_params=kw.pop("max_params", 10**9), **kw)
        return prog.solve(top=2, solver=solver)
    return run


HIGHS = pytest.mark.skipif(not HAVE_HIGHS, reason="highspy (optional dependency) not installed")
OBJECTIVE_PATHS = [
    pytest.param(solve_ilp("cbc"), id="cbc"),
    pytest.param(solve_ilp("highs"), id="highs", marks=HIGHS),
    pytest.param(lambda s, p, **kw: AssemblyProgram(s, p, **kw).solve(top=2), id="program-dp"),
    pytest.param(lambda s, p, **kw: top_chains_dp(s, p, 2, **kw), id="top_chains_dp"),
    pytest.param(lambda s, p, **kw: brute_force(s, p, **kw), id="brute_force"),
]
# min_cost_chain (the budget diagnosis) reads the same instance but has no objective weights.
PATHS = [*OBJECTIVE_PATHS, pytest.param(lambda s, p: min_cost_chain(s, p, "params"), id="min_cost_chain")]


def assert_one_line(err: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("field", "value", "label"), [
    ("quality", math.nan, "block quality"), ("quality", math.inf, "block quality"),
    ("quality", -math.inf, "block quality"), ("params", math.nan, "params"), ("macs", math.inf, "MACs"),
])
def test_non_finite_block_number_is_named_on_every_path(path, field, value, label):
    stages, pairs = zoo()
    bad = with_block(stages, 1, 2, **{field: value})
    with pytest.raises(SolverError) as err:
        path(bad, pairs)
    assert_one_line(err, label, "'m2.1'", "'m2'", "stage 1")


@pytest.mark.parametrize("path", PATHS)
def test_non_finite_compatibility_is_named_on_every_path(path):
    stages, pairs = zoo()
    pairs[0].compatibility[1, 2] = math.nan  # StagePairs is mutable: checked again at solve time
    with pytest.raises(SolverError) as err:
        path(stages, pairs)
    assert_one_line(err, "stitch compatibility", "'m1.0'", "'m2.1'")


@pytest.mark.parametrize("name", ["params", "macs", "compatibility"])
def test_stage_pairs_refuse_non_finite_numbers_on_allowed_pairs_only(name):
    arrays = {"params": np.ones((2, 2)), "macs": np.ones((2, 2)), "compatibility": np.zeros((2, 2))}
    arrays[name][0, 1] = math.inf if name != "compatibility" else math.nan
    with pytest.raises(SolverError) as err:
        StagePairs(**arrays)
    assert_one_line(err, f"StagePairs.{name}", "(0, 1)")
    # The same number on a disallowed pair is never read and must not become an arbitrary integer.
    pr = StagePairs(**arrays, allowed=np.array([[True, False], [True, True]]))
    assert np.all(np.isfinite(pr.params)) and np.all(pr.params >= 0) and np.all(np.isfinite(pr.compatibility))


@pytest.mark.parametrize("path", OBJECTIVE_PATHS)
@pytest.mark.parametrize("weight", ["quality_weight", "stitch_weight", "param_penalty"])
def test_non_finite_weight_is_refused(path, weight):
    stages, pairs = zoo()
    with pytest.raises(SolverError) as err:
        path(stages, pairs, **{weight: math.nan})
    assert_one_line(err, weight)


@pytest.mark.parametrize("budget", ["max_params", "max_macs"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_budget_is_refused_by_program_and_brute_force(budget, value):
    stages, pairs = zoo()
    for run in (lambda: AssemblyProgram(stages, pairs, **{budget: value}), lambda: brute_force(stages, pairs,
                **{budget: value})):
        with pytest.raises(SolverError) as err:
            run()
        assert_one_line(err, budget, str(value))


def test_latency_table_numbers_are_checked():
    stages, pairs = zoo()
    table = {c.id: 1.0 for s in stages for c in s}
    prog = AssemblyProgram(stages, pairs)
    with pytest.raises(SolverError) as err:
        prog.add_budget({**table, "m0.2": math.nan}, 5.0, "latency_ms")
    assert_one_line(err, "'latency_ms'", "'m0.2'", "stage 2")
    with pytest.raises(SolverError) as err:
        prog.add_budget(table, math.nan, "latency_ms")
    assert_one_line(err, "'latency_ms'", "limit")
    with pytest.raises(SolverError) as err:
        prog.add_budget({}, 5.0, "latency_ms", default=math.inf)
    assert_one_line(err, "'latency_ms'", "inf")
    stitch = [np.zeros((3, 3)) for _ in pairs]
    stitch[1][2, 0] = math.nan
    with pytest.raises(SolverError) as err:
        prog.add_budget(table, 5.0, "latency_ms", stitch=stitch)
    assert_one_line(err, "'latency_ms'", "'m2.1'", "'m0.2'")


@pytest.mark.parametrize("solver", ["cbc", pytest.param("highs", marks=HIGHS)])
def test_custom_rows_with_non_finite_coefficients_are_refused(solver):
    stages, pairs = zoo()
    prog = AssemblyProgram(stages, pairs)
    # pulp itself refuses `nan * x`; a row built from (variable, value) pairs slips through to CBC.
    prog.add_constraint(lambda p: pulp.LpAffineExpression([(p.x[0, "m1.0"], math.nan)]) <= 1, name="nan_row")
    with pytest.raises(SolverError) as err:
        prog.solve(top=1, solver=solver)
    assert_one_line(err, "nan", "'m1.0'")
    prog = AssemblyProgram(stages, pairs)
    with pytest.raises(SolverError) as err:
        prog.add_constraint(lambda p: p.x[0, "m1.0"] * math.inf <= 1, name="inf_row")
    assert_one_line(err, "inf_row")


def test_partition_refuses_plus_inf_scores():
    scores = np.zeros((1, 4))
    scores[0, 2] = math.inf
    with pytest.raises(SolverError, match=r"\+inf"):
        best_cuts_for_model(scores, [1.0, 2.0, 3.0, 4.0], 5.0, eps=1.0)


def test_nan_proxy_ranks_last():
    ranked = [Ranked(None, [], 0, 0, p, 0.0) for p in (math.nan, -3.0, 1.0, math.nan, -math.inf)]
    rank_by_proxy(ranked)
    proxies = [r.proxy for r in ranked]
    assert proxies[:3] == [1.0, -3.0, -math.inf] and all(math.isnan(p) for p in proxies[3:])


# ---------------------------------------------------------------- end to end: a dead model in the zoo


@pytest.fixture(scope="module")
def zoo_with_dead_model(tmp_path_factory):
    """Three random-init tiny timm models, test_convnext with every weight zero, dissected,
    compared and partitioned as a user would."""
    folder = tmp_path_factory.mktemp("deadzoo")
    entries = []
    for i, name in enumerate(["test_resnet", "test_vit", "test_convnext"]):
        torch.manual_seed(i)
        model = timm.create_model(name, pretrained=False, num_classes=10).eval()
        if name == "test_convnext":
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
        save_weights(model, folder / f"{name}.safetensors")
        entries.append({"name": name, "weights": f"{name}.safetensors", "model_kwargs": {"num_classes": 10}})
    (folder / "zoo.yaml").write_text(yaml.safe_dump(entries))
    ws = folder / "ws"
    run_cli("dissect", "--zoo", str(folder / "zoo.yaml"), "--out", str(ws), "--json")
    run_cli("similarity", str(ws), "--data", "digits", "--samples", "120", "--batch-size", "60", "--json")
    run_cli("partition", str(ws), "--stages", "2", "--eps", "1.0", "--no-plots", "--json")
    return ws


@pytest.mark.slow
def test_reassemble_with_a_dead_model_leaves_it_out(zoo_with_dead_model, tmp_path):
    # Its LogME is NaN (constant features); before the fix CBC ended in a 53-line PuLP traceback.
    res = run_cli("reassemble", str(zoo_with_dead_model), "--max-gflops", "1", "--data", "digits",
                  "--out", str(tmp_path / "m"), "--json", check=False)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "test_convnext left out" in res.stderr
    assert "test_convnext" not in (tmp_path / "m" / "config.json").read_text()
    # the dead model's NaN scores reach --json as null, never as the non-JSON word NaN
    out = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"--json printed {c}"))
    assert out["ranked"]


@pytest.mark.slow
@pytest.mark.parametrize("budget", [("--max-gflops", "nan"), ("--max-params", "inf")])
def test_non_finite_cli_budget_is_one_line_exit_2(zoo_with_dead_model, tmp_path, budget):
    res = run_cli("reassemble", str(zoo_with_dead_model), *budget, "--data", "digits", "--out",
                  str(tmp_path / "m"), check=False)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "must be a positive number" in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.startswith("error")]) == 1
