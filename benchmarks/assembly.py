"""Benchmark: assembly-program solve time on synthetic zoos (50 models x 4 stages, pair variables).

Usage::

    .venv/bin/python benchmarks/assembly.py [--models 50] [--stages 4] [--seeds 5] [--top 5]

Writes ``benchmarks/results/assembly.md``. Each model offers one block per stage, so a stage has
``--models`` candidates and each stage pair ``models**2`` pair variables. Bigger models score
higher, so the params and MAC budgets (set below the median native model) bind. Reported: time to
build the PuLP model, time to the proven optimum (top 1), and time for the top-N chains with
no-good cuts, per solver (CBC always, HiGHS when highspy is importable).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pulp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solvers.assembly import AssemblyProgram, Candidate, StagePairs, top_chains_dp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "assembly.md"


def synthetic_zoo(seed: int, n_models: int, n_stages: int):
    """Random zoo with realistic magnitudes: 1-90M params, 0.3-20 GMACs, widths 32-1024."""
    rng = np.random.default_rng(seed)
    total_params = np.exp(rng.uniform(np.log(1e6), np.log(90e6), n_models))
    total_macs = total_params * rng.uniform(40, 250, n_models)  # MACs per param varies by family
    # Later stages hold most params, earlier ones most MACs (high resolution), as in CNNs and ViTs.
    p_split = rng.dirichlet(np.linspace(1, 4, n_stages) * 4, n_models)
    m_split = rng.dirichlet(np.linspace(4, 1, n_stages) * 4, n_models)
    base_width = rng.choice([32, 48, 64, 96, 128], n_models)
    widths = base_width[:, None] * 2 ** np.arange(n_stages)[None, :]
    stages = []
    for k in range(n_stages):
        # Bigger blocks tend to be better, so the budgets bind (the unconstrained best breaks them).
        block_params = total_params * p_split[:, k]
        q = 0.7 * np.log(block_params) / np.log(block_params.max()) + 0.3 * rng.uniform(0, 1, n_models)
        stages.append(
            [
                Candidate(
                    id=f"m{m}.s{k}",
                    model=f"m{m}",
                    params=int(total_params[m] * p_split[m, k]),
                    macs=int(total_macs[m] * m_split[m, k]),
                    quality=float(q[m]),
                )
                for m in range(n_models)
            ]
        )
    pairs = []
    for k in range(n_stages - 1):
        c_out = widths[:, k]
        c_in = widths[:, k + 1] // 2  # the next stage's input width (its previous stage's output)
        stitch_params = np.outer(c_out, c_in) + c_in[None, :]
        stitch_macs = stitch_params * (56 // 2**k) ** 2
        compat = rng.uniform(0.2, 0.9, (n_models, n_models))
        np.fill_diagonal(stitch_params, 0)
        np.fill_diagonal(stitch_macs, 0)
        np.fill_diagonal(compat, 1.0)
        pairs.append(StagePairs(stitch_params, stitch_macs, compat))
    budgets = dict(
        max_params=int(np.quantile(total_params, 0.3)),
        max_macs=int(np.quantile(total_macs, 0.3)),
    )
    return stages, pairs, budgets


def run(solver: str, seed: int, args) -> dict:
    stages, pairs, budgets = synthetic_zoo(seed, args.models, args.stages)
    # The budgets are active when the best chain without them breaks one of them.
    [free] = top_chains_dp(stages, pairs, 1)
    active = free.params > budgets["max_params"] or free.macs > budgets["max_macs"]
    t0 = time.perf_counter()
    prog = AssemblyProgram(stages, pairs, **budgets)
    t1 = time.perf_counter()
    [best] = prog.solve(top=1, solver=solver, time_limit=args.time_limit)
    t2 = time.perf_counter()
    chains = prog.solve(top=args.top, solver=solver, time_limit=args.time_limit)
    t3 = time.perf_counter()
    return dict(
        build=t1 - t0,
        top1=t2 - t1,
        topn=t3 - t2,
        status=best.status,
        objective=best.objective,
        n_chains=len(chains),
        active=active,
        binding=(best.params / budgets["max_params"], best.macs / budgets["max_macs"]),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    solvers = ["cbc"] + (["highs"] if pulp.HiGHS(msg=0).available() else [])
    n, k = args.models, args.stages
    lines = [
        "# Assembly program: solver time",
        "",
        f"Command: `python benchmarks/assembly.py --models {n} --stages {k} --seeds {args.seeds} --top {args.top}`",
        "",
        f"Zoo: {n} models x {k} stages, {n} candidates per stage, {n * k} binary x, "
        f"{(k - 1) * n * n} pair variables y; params and MAC budgets at the 30% quantile of the "
        f"native models. Seeds 0..{args.seeds - 1}. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at start: shared machine, "
        f"so times are noisy), Python {platform.python_version()}, PuLP {pulp.__version__}; "
        "solver default threads.",
        "",
        "| solver | build median (s) | top-1 median (s) | top-1 max (s) | "
        f"top-{args.top} median (s) | top-{args.top} max (s) | statuses | budgets active |",
        "|---|---|---|---|---|---|---|---|",
    ]
    objectives = {}
    for solver in solvers:
        rows = [run(solver, seed, args) for seed in range(args.seeds)]
        objectives[solver] = [round(r["objective"], 6) for r in rows]
        for seed, r in enumerate(rows):
            print(
                f"{solver} seed={seed} build={r['build']:.2f}s top1={r['top1']:.2f}s "
                f"top{args.top}={r['topn']:.2f}s status={r['status']} obj={r['objective']:.4f} "
                f"params/budget={r['binding'][0]:.2f} macs/budget={r['binding'][1]:.2f} "
                f"budgets active={r['active']}",
                flush=True,
            )
        col = lambda key, rows=rows: [r[key] for r in rows]
        statuses = ", ".join(sorted(set(col("status"))))
        lines.append(
            f"| {solver} | {statistics.median(col('build')):.2f} | {statistics.median(col('top1')):.2f} | "
            f"{max(col('top1')):.2f} | {statistics.median(col('topn')):.2f} | {max(col('topn')):.2f} | "
            f"{statuses} | {sum(col('active'))}/{len(rows)} seeds |"
        )
    if len(objectives) > 1:
        same = len({tuple(v) for v in objectives.values()}) == 1
        lines += ["", f"Same optimum from every solver on every seed: {'yes' if same else 'NO'}."]
    lines += ["", "## End to end", "", "(added later by the end-to-end pipeline.)", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
