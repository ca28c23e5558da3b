"""Custom constraints on the assembly program, on a synthetic 3-model x 4-stage zoo.

Pure solver (numpy + PuLP, no torch): run ``python examples/custom_constraints.py``.

Each model offers one block per stage. A block's quality and cost are made up here; in the
toolkit they come from the zoo's dissection, the block similarity and the FLOP counter. Stitching
two blocks from different models costs a projection layer; consecutive blocks of the same model
need no stitch and fit perfectly (compatibility 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from solvers.assembly import AssemblyProgram, Candidate, StagePairs  # noqa: E402
from solvers.errors import InfeasibleError  # noqa: E402

MODELS = {  # name: (width per stage, MACs per stage, quality per stage)
    "resnet50": ([256, 512, 1024, 2048], [0.7e9, 1.0e9, 1.5e9, 0.8e9], [0.60, 0.62, 0.70, 0.74]),
    "convnext_t": ([96, 192, 384, 768], [0.5e9, 0.6e9, 2.4e9, 0.6e9], [0.66, 0.70, 0.78, 0.80]),
    "swin_t": ([96, 192, 384, 768], [0.6e9, 0.7e9, 2.6e9, 0.7e9], [0.58, 0.72, 0.80, 0.83]),
}
STAGE_PARAMS = {  # params per stage
    "resnet50": [0.2e6, 1.2e6, 7.1e6, 15.0e6],
    "convnext_t": [0.3e6, 1.1e6, 11.0e6, 15.9e6],
    "swin_t": [0.3e6, 1.2e6, 12.6e6, 14.2e6],
}
N_STAGES = 4


def build_zoo():
    names = list(MODELS)
    stages = [
        [
            Candidate(
                id=f"{m}.s{k}",
                model=m,
                params=int(STAGE_PARAMS[m][k]),
                macs=int(MODELS[m][1][k]),
                quality=MODELS[m][2][k],
            )
            for m in names
        ]
        for k in range(N_STAGES)
    ]
    rng = np.random.default_rng(0)
    pairs = []
    for k in range(N_STAGES - 1):
        n = len(names)
        c_out = np.array([MODELS[m][0][k] for m in names])
        c_in = np.array([MODELS[m][0][k] for m in names])  # the next stage's input = this stage's output
        params = np.outer(c_out, c_in) + c_in[None, :]  # a 1x1 conv projection with bias
        macs = params * (56 // 2**k) ** 2  # applied at every position of the stage's grid
        compat = rng.uniform(0.4, 0.8, (n, n))  # stands in for CKA
        np.fill_diagonal(params, 0)  # same model, consecutive blocks: no stitch
        np.fill_diagonal(macs, 0)
        np.fill_diagonal(compat, 1.0)
        pairs.append(StagePairs(params, macs, compat))
    return stages, pairs


def show(title, chains):
    print(f"\n{title}")
    for c in chains:
        extra = "".join(f", {k}={v:.1f}" for k, v in c.budgets.items())
        print(
            f"  {' -> '.join(c.blocks):60s} obj={c.objective:.3f} "
            f"params={c.params / 1e6:.1f}M MACs={c.macs / 1e9:.2f}G{extra} [{c.status}]"
        )


def main():
    stages, pairs = build_zoo()
    budget = dict(max_params=32_000_000, max_macs=5_000_000_000)

    show("budgets only (top 3)", AssemblyProgram(stages, pairs, **budget).solve(top=3))

    prog = AssemblyProgram(stages, pairs, **budget)
    prog.forbid("convnext_t.s2")
    show("forbid convnext_t.s2", prog.solve(top=1))

    prog = AssemblyProgram(stages, pairs, **budget)
    prog.forbid_model("swin_t")
    prog.require("resnet50.s0")
    show("forbid_model swin_t + require resnet50.s0", prog.solve(top=1))

    prog = AssemblyProgram(stages, pairs, **budget)
    prog.max_blocks_from_model("convnext_t", 1)
    show("max_blocks_from_model convnext_t <= 1", prog.solve(top=2))

    # Measured per-block latency would go here; depthwise convs and attention are slow per MAC.
    slow = {"resnet50": 0.0, "convnext_t": 0.15, "swin_t": 0.4}
    latency_ms = {c.id: 0.1 * c.macs / 1e9 + slow[c.model] for s in stages for c in s}
    prog = AssemblyProgram(stages, pairs, **budget)
    prog.add_budget(latency_ms, limit=0.9, name="latency_ms")
    show("latency table <= 0.9 ms", prog.solve(top=2))

    # Raw constraints on the PuLP variables: the last block comes from another model than the
    # first (one row per model, returned as a list).
    prog = AssemblyProgram(stages, pairs, **budget)
    prog.add_constraint(
        lambda p: [p.x[0, f"{m}.s0"] + p.x[3, f"{m}.s3"] <= 1 for m in p.models],
        name="head_differs_from_stem",
    )
    show("raw constraint via add_constraint (stem and head from different models)", prog.solve(top=2))

    try:
        AssemblyProgram(stages, pairs, max_macs=1_000_000_000).solve()
    except InfeasibleError as err:
        print(f"\ninfeasible budget: {err}")


if __name__ == "__main__":
    main()
