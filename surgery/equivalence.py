"""Equivalence sets: the step behind ``surgery partition``.

Reads the block library and the cut-point similarity of a workspace, solves the partition problem
(:mod:`solvers.partition`: K contiguous blocks per model, balance limit on MACs, exact per-model
dynamic program inside an anchor alternation) and writes ``partition.json`` plus pictures: one CKA
heatmap per model pair with the chosen cuts marked, and a summary figure of the zoo's stages.

Set k holds the k-th block of every model; a stage block spans one or more library blocks.

Balance: by default each model is held to ``eps`` = 0.2 (DeRy's value) or, when it cannot be cut that
evenly (an indivisible heavy stem, e.g. resnet10t at K = 3 needs 0.77), to its own smallest feasible
eps; ``partition.json`` records per model the eps it was held to and whether it was relaxed. An eps
the user sets is strict: a model that cannot meet it is an error naming the smallest eps that works.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from solvers.errors import InfeasibleError
from solvers.partition import objective as partition_objective
from solvers.partition import partition as solve_partition
from solvers.partition import random_partition, relaxed_eps
from surgery.errors import WorkspaceError
from surgery.similarity import read_similarity
from surgery.workspace import Workspace, read_manifest, write_json

PARTITION_SCHEMA = "surgery.partition/1"
DEFAULT_EPS = 0.2  # DeRy's balance tolerance (research/dery.md)


def _candidates(manifest: dict[str, Any]) -> tuple[list[str], np.ndarray, float]:
    """A model's candidate cut points (its library boundaries) and their cumulative MACs."""
    block_macs = np.array([b["macs"] for b in manifest["blocks"]], dtype=np.float64)
    cum = np.cumsum(block_macs)[:-1]
    return list(manifest["boundaries"]), cum, float(block_macs.sum())


def _stage_blocks(manifest: dict[str, Any], cut_idx: list[int]) -> list[dict[str, Any]]:
    """Merge consecutive library blocks into the K stage blocks given the chosen boundary indices."""
    blocks = manifest["blocks"]
    edges = [0] + [i + 1 for i in cut_idx] + [len(blocks)]
    out = []
    for k in range(len(edges) - 1):
        part = blocks[edges[k]:edges[k + 1]]
        out.append({
            "stage": k,
            "start": part[0]["start"],
            "end": part[-1]["end"],
            "library_blocks": [edges[k], edges[k + 1] - 1],
            "params": int(sum(b["params"] for b in part)),
            "macs": int(sum(b["macs"] for b in part)),
            "in_spec": part[0]["in_spec"],
            "out_spec": part[-1]["out_spec"],
        })
    return out


def run_partition(
    workdir: str | Path,
    n_stages: int = 4,
    *,
    eps: float | None = None,
    restarts: int = 20,
    seed: int = 0,
    plots: bool = True,
    relax_eps: bool = False,
) -> dict[str, Any]:
    """Compute the equivalence sets of a workspace and write ``partition.json`` (and pictures).

    Args:
        workdir: workspace with a dissected zoo and its similarity (``surgery similarity``).
        n_stages: K, the number of stages (blocks per model).
        eps: balance tolerance: every stage block of a model has at most ``(1+eps)·MACs/K``.
            ``None`` (default): :data:`DEFAULT_EPS`, relaxed per model to that model's smallest
            feasible eps where 0.2 cannot be met. A number is strict (unless ``relax_eps``).
        restarts: random restarts of the alternation.
        seed: seed of the restarts.
        plots: also write the PNG pictures.
        relax_eps: relax a given ``eps`` per model too, instead of failing.

    Returns:
        The partition manifest (as written): ``eps`` (the balance asked for), ``eps_strict``, and per
        model ``eps_used`` (the balance it is held to) and ``eps_relaxed`` (``eps_used > eps``).

    Raises:
        InfeasibleError: with a strict ``eps``, a model cannot be balanced (names the model and the
            smallest eps that works).
        WorkspaceError: missing similarity, or a model with too few cut points for ``n_stages``.
    """
    ws = Workspace(workdir).require()
    sim = read_similarity(ws)
    names = [n for n in sim["models"] if n in ws.model_names()]
    if len(names) < 1:
        raise WorkspaceError(f"{ws.root}: the similarity holds no model of the library; re-run 'surgery similarity'")
    manifests = {n: ws.read_dissection(n) for n in names}
    cands, cums, totals = [], [], []
    for n in names:
        c, cum, tot = _candidates(manifests[n])
        if len(c) < n_stages - 1:
            raise WorkspaceError(
                f"{n} has {len(c)} cut points at its granularity, fewer than the {n_stages - 1} that "
                f"{n_stages} stages need; use fewer --stages or dissect with --granularity node"
            )
        cands.append(c)
        cums.append(cum)
        totals.append(tot)
    matrix = sim["matrix"]
    offsets = sim["offsets"]
    pairs: dict[tuple[int, int], np.ndarray] = {}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            ia = [offsets[a] + sim["nodes"][a].index(node) for node in cands[i]]
            ib = [offsets[b] + sim["nodes"][b].index(node) for node in cands[j]]
            # a constant cut point has no defined CKA (NaN): treat it as unrelated, as reassembly does
            pairs[(i, j)] = np.nan_to_num(matrix[np.ix_(ia, ib)], nan=0.0)
    strict = eps is not None and not relax_eps
    eps = DEFAULT_EPS if eps is None else float(eps)
    eps_used = [eps] * len(names) if strict else relaxed_eps(cums, totals, n_stages, eps)
    try:
        result = solve_partition(cums, totals, pairs, n_stages, eps=eps_used, restarts=restarts, seed=seed)
    except InfeasibleError as e:
        if getattr(e, "model", None) is None:
            raise
        need = getattr(e, "min_eps", float("nan"))
        raise InfeasibleError(
            f"{names[e.model]} cannot be cut into {n_stages} stages of at most (1+eps)/{n_stages} of its MACs "
            f"with eps={eps:g}: the smallest eps that works is {need:.3f} (use --eps {need + 0.005:.2f}, leave --eps "
            "out to relax it per model, use fewer --stages, or dissect with --granularity node)"
        ) from None
    # DeRy's own ablation: random balanced partitions scored by the same objective
    rand = [partition_objective(random_partition(cums, totals, n_stages, eps=eps_used, seed=seed + 1 + r), pairs)
            for r in range(20)]

    models_out = {}
    for i, n in enumerate(names):
        cut_idx = list(result.cuts[i])
        models_out[n] = {
            "cuts": [cands[i][c] for c in cut_idx],
            "stage_blocks": _stage_blocks(manifests[n], cut_idx),
            "total_macs": int(totals[i]),
            "eps_used": float(eps_used[i]),
            "eps_relaxed": bool(eps_used[i] > eps),
        }
    sets = []
    for k in range(n_stages):
        members = []
        for n in names:
            blk = models_out[n]["stage_blocks"][k]
            members.append({"model": n, **blk})
        sets.append({"stage": k, "members": members})
    anchors = [{"model": names[m], "node": cands[m][c]} for (m, c) in result.anchors]
    manifest = {
        "schema": PARTITION_SCHEMA,
        "stages": n_stages,
        "eps": eps,
        "eps_strict": strict,
        "seed": seed,
        "restarts": restarts,
        "objective": float(result.objective),
        "random_partition_objective": {"mean": float(np.mean(rand)), "max": float(np.max(rand))},
        "similarity": sim["settings"],
        "anchors": anchors,
        "models": models_out,
        "sets": sets,
    }
    write_json(partition_path(ws), manifest)
    if plots:
        write_partition_plots(ws, manifest, sim, cands)
    return manifest


def read_partition(ws: Workspace) -> dict[str, Any]:
    """The workspace's partition manifest (one-line error when missing, corrupt or from another schema).

    Callers that compute a missing partition must test :func:`partition_exists` first: a corrupt file
    is the user's to repair, never to be replaced silently.
    """
    manifest = read_manifest(partition_path(ws), PARTITION_SCHEMA, what="partition manifest",
                             missing=f"no partition in {ws.root}: run 'surgery partition {ws.root}' first",
                             fix=f"delete it or re-run 'surgery partition {ws.root}'")
    for key in ("stages", "models", "sets"):
        if key not in manifest:
            raise WorkspaceError(f"{partition_path(ws)} lacks the field {key!r} "
                                 f"(delete it or re-run 'surgery partition {ws.root}')")
    return manifest


def partition_path(ws: Workspace) -> Path:
    """Where the workspace's partition manifest lives."""
    return ws.root / "partition.json"


def partition_exists(ws: Workspace) -> bool:
    """Whether the workspace has a partition file (readable or not: see :func:`read_partition`)."""
    return partition_path(ws).exists() or partition_path(ws).is_symlink()


def write_partition_plots(ws: Workspace, manifest: dict[str, Any], sim: dict[str, Any],
                          cands: list[list[str]]) -> list[Path]:
    """CKA heatmaps per model pair with the chosen cuts marked, and a summary of the zoo's stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = ws.root / "partition"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(manifest["models"])
    written = []
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        ia = [sim["offsets"][a] + sim["nodes"][a].index(n) for n in cands[i]]
        ib = [sim["offsets"][b] + sim["nodes"][b].index(n) for n in cands[j]]
        m = sim["matrix"][np.ix_(ia, ib)]
        fig, ax = plt.subplots(figsize=(5, 4.5))
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        for c in manifest["models"][a]["cuts"]:
            ax.axhline(cands[i].index(c), color="red", lw=1.2)
        for c in manifest["models"][b]["cuts"]:
            ax.axvline(cands[j].index(c), color="red", lw=1.2)
        ax.set_ylabel(f"{a} cut point")
        ax.set_xlabel(f"{b} cut point")
        ax.set_title("CKA (unbiased), cuts in red", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = out_dir / f"cka_{_safe(a)}__{_safe(b)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    # summary: one bar per model, stage blocks as segments proportional to MACs
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    colors = plt.cm.tab10.colors
    for row, n in enumerate(names):
        total = max(manifest["models"][n]["total_macs"], 1)
        left = 0.0
        for blk in manifest["models"][n]["stage_blocks"]:
            w = blk["macs"] / total
            ax.barh(row, w, left=left, color=colors[blk["stage"] % 10], edgecolor="white")
            left += w
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("fraction of the model's MACs")
    ax.set_title(f"{manifest['stages']} stages (colour = equivalence set)")
    ax.invert_yaxis()
    fig.tight_layout()
    path = out_dir / "stages.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
