"""Cut-point similarity of a zoo: the step behind ``surgery similarity``.

For a probe set (``--data``), every model of the workspace runs once per batch through a feature
extractor that pools the outputs of all its candidate cut points (:mod:`surgery.features`); the
pooled features of all models for that batch go into one streaming all-pairs unbiased CKA
accumulator (:class:`surgery.cka.StreamingCKA`). Memory does not grow with the number of probe
samples: nothing but the current batch's features is held.

Pooled features are cached per model and batch under ``WORKDIR/features/<model>/`` (safetensors
shards keyed by the probe settings), so adding one model to a zoo does not recompute the others.

Under torchrun (``torchrun --nproc-per-node N -m surgery similarity WORKDIR ...``) rank ``r`` runs
probe batches ``r, r + W, ...`` through every model and caches those batches' features; the HSIC
accumulators are then summed over the ranks (:meth:`surgery.cka.StreamingCKA.all_reduce`), so the
matrix equals the single-process one up to the order of floating-point additions.

Outputs: ``WORKDIR/similarity/similarity.json`` (settings, models, cut-point names and their offsets
in the matrix) and ``WORKDIR/similarity/cka.safetensors`` (the P x P matrix over all cut points).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery import distributed
from surgery.cka import StreamingCKA
from surgery.errors import WorkspaceError
from surgery.features import feature_extractor
from surgery.library import load_model_entry
from surgery.spec import TensorSpec
from surgery.workspace import Workspace, load_tensors, read_json, read_manifest, save_tensors, write_json

SIMILARITY_SCHEMA = "surgery.similarity/1"


def probe_images(data: str, samples: int, seed: int) -> torch.Tensor:
    """The probe set: ``samples`` images of the data source's training split, seeded, as stored."""
    from zoo.data import load_split

    ds = load_split(data, "train", seed=seed)
    n = len(ds.labels)
    take = min(samples, n)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:take].sort().values
    # in-memory sources keep their native size (each model resizes per batch); folders of images of
    # mixed sizes are fitted once to 224x224 so they stack into one tensor
    return ds.gather(idx, size=None if ds.images is not None else (224, 224))


@contextmanager
def _one_cpu_thread(device: str) -> Iterator[None]:
    """Run the block on one intra-op thread when computing on the CPU, then restore the setting.

    The CKA update of a batch is a few thousand small ops (casts, centring, one Gram per width,
    one P x P product); with several intra-op threads each op pays a thread synchronisation that
    costs more than the op, and on a busy machine a descheduled thread makes every op wait
    (measured, 85 cut points, batch 100, 2 threads on a loaded 2-core machine: 0.25-1.5 s per
    update against 0.07 s on one thread, next to forward passes of ~10 s per batch). On one
    thread the update stays near 1% of the forward passes at any batch size that fits in memory,
    while the forward passes keep every thread.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    from surgery.minizoo import pinned_threads

    with pinned_threads(1):
        yield


class _ModelFeatures:
    """One model's extractor, transform and feature cache."""

    def __init__(self, ws: Workspace, name: str, settings: dict[str, Any], cache: bool, device):
        from surgery.tracing import trace_model
        from zoo.data import make_transform

        entry, manifest, model = load_model_entry(ws, name)
        self.name = name
        self.nodes = list(manifest["boundaries"])
        cut_specs = {c["name"]: TensorSpec.from_dict(c["spec"]) for c in manifest["cut_points"]}
        self.specs = [cut_specs[n] for n in self.nodes]
        size = tuple(manifest["settings"]["input_size"])
        cfg = manifest.get("data_config", {})
        self.transform = make_transform(size, cfg.get("mean"), cfg.get("std"))
        self.key = {**settings, "nodes": self.nodes, "input_size": list(size),
                    "weights_fingerprint": manifest.get("weights_fingerprint")}
        self.cache_dir = ws.root / "features" / ws.model_dir(name).name
        self.cache = cache
        self.cached = cache and self._cache_valid()
        self.extractor = None
        self.device = device
        if not self.cached:
            # only the traced graph is needed (the cut points are in the manifest): no re-dissection
            gm = trace_model(model, name)
            self.extractor = feature_extractor(gm, self.nodes, self.specs,
                                               prefix=settings["prefix"]).to(device)
            if cache and distributed.is_main():  # the other ranks wait (compute_similarity) before writing
                if self.cache_dir.exists():
                    shutil.rmtree(self.cache_dir)
                self.cache_dir.mkdir(parents=True)

    def _cache_valid(self) -> bool:
        meta = self.cache_dir / "meta.json"
        if not meta.exists():
            return False
        try:
            got = read_json(meta)
        except WorkspaceError:
            return False
        return got.get("key") == self.key and got.get("complete") is True

    def features(self, batch_index: int, images: torch.Tensor) -> list[torch.Tensor]:
        shard = self.cache_dir / f"batch_{batch_index:05d}.safetensors"
        if self.cached:
            t = load_tensors(shard)
            return [t[f"f{i}"] for i in range(len(self.nodes))]
        with torch.inference_mode():
            x = self.transform(images).to(self.device)
            feats = [f.float().cpu() for f in self.extractor(x)]
        if self.cache:  # each rank writes the batches it ran
            save_tensors(shard, {f"f{i}": f for i, f in enumerate(feats)}, all_ranks=True)
        return feats

    def finish(self, n_batches: int) -> None:
        if self.cache and not self.cached:
            write_json(self.cache_dir / "meta.json", {"key": self.key, "complete": True, "batches": n_batches})


def compute_similarity(
    workdir: str | Path,
    data: str = "fashion-mnist",
    *,
    samples: int = 2000,
    batch_size: int = 100,
    seed: int = 0,
    prefix: str = "exclude",
    estimator: str = "unbiased",
    cache: bool = True,
    device: str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Compute the CKA similarity of all cut points of all workspace models on a probe set.

    Args:
        workdir: a workspace with a dissected zoo.
        data: probe data source (see :mod:`zoo.data`), e.g. ``fashion-mnist`` or ``digits``.
        samples: number of probe images.
        batch_size: images per batch (the unbiased estimator needs at least 4; 64+ is better).
        seed: which probe images are drawn.
        prefix: class-token treatment when pooling tokens (see :func:`surgery.features.pool_tensor`).
        estimator: ``"unbiased"`` (default) or ``"biased"`` CKA.
        cache: keep per-model pooled features on disk for later runs.
        device: torch device (default: CUDA when present, else CPU; under torchrun ``cuda:LOCAL_RANK``).
        on_batch: progress callback ``(done, total)``, over this rank's share of the batches.

    Returns:
        The similarity manifest (also written to ``WORKDIR/similarity/``), with the matrix attached.
    """
    ws = Workspace(workdir).require()
    if batch_size < 4:
        raise WorkspaceError("--batch-size must be at least 4 for the unbiased CKA estimator")
    distributed.init_from_env()
    device = str(distributed.device_for_rank(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))))
    images = probe_images(data, samples, seed)
    settings = {"data": data, "samples": int(images.shape[0]), "seed": seed, "batch_size": batch_size,
                "prefix": prefix}
    names = ws.model_names()
    models = [_ModelFeatures(ws, n, settings, cache, device) for n in names]
    distributed.barrier()  # every rank has read the caches' state before any rank writes a batch
    # a last batch smaller than 4 cannot feed the unbiased estimator: fold it into the previous one
    bounds = list(range(0, images.shape[0], batch_size)) + [images.shape[0]]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 4:
        bounds.pop(-2)
    acc = StreamingCKA(estimator=estimator)
    n_batches = len(bounds) - 1
    mine = range(distributed.rank(), n_batches, distributed.world_size())
    for done, b in enumerate(mine, 1):
        chunk = images[bounds[b]:bounds[b + 1]]
        feats: list[torch.Tensor] = []
        for m in models:
            feats.extend(m.features(b, chunk))
        with _one_cpu_thread(device):
            acc.update(feats)
        if on_batch:
            on_batch(done, len(mine))
    acc.all_reduce()  # also waits for every rank's cached batches before rank 0 marks the caches complete
    for m in models:
        m.finish(n_batches)
    matrix = acc.compute()
    offsets, pos = {}, 0
    for m in models:
        offsets[m.name] = pos
        pos += len(m.nodes)
    manifest = {
        "schema": SIMILARITY_SCHEMA,
        "settings": {**settings, "estimator": estimator},
        "models": names,
        "nodes": {m.name: m.nodes for m in models},
        "offsets": offsets,
    }
    out = ws.root / "similarity"
    save_tensors(out / "cka.safetensors", {"cka": torch.from_numpy(np.ascontiguousarray(matrix))})
    write_json(out / "similarity.json", manifest)
    distributed.barrier()
    return {**manifest, "matrix": matrix}


def read_similarity(ws: Workspace) -> dict[str, Any]:
    """The workspace's similarity manifest with its matrix (``"matrix"``: numpy float64, P x P)."""
    path = ws.root / "similarity" / "similarity.json"
    manifest = read_manifest(path, SIMILARITY_SCHEMA, what="similarity manifest",
                             missing=f"no similarity in {ws.root}: run 'surgery similarity {ws.root}' first")
    matrix = load_tensors(ws.root / "similarity" / "cka.safetensors")["cka"].double().numpy()
    total = sum(len(v) for v in manifest["nodes"].values())
    if matrix.shape != (total, total):
        raise WorkspaceError(f"{path}: matrix shape {matrix.shape} does not match {total} cut points")
    return {**manifest, "matrix": matrix}


def cut_similarity(sim: dict[str, Any], a: tuple[str, str | None], b: tuple[str, str | None]) -> float:
    """CKA between two cut points ``(model, node)``; ``node=None`` (a model input) counts as 1."""
    if a[1] is None or b[1] is None:
        return 1.0 if a[1] is None and b[1] is None else 0.0
    ia = sim["offsets"][a[0]] + sim["nodes"][a[0]].index(a[1])
    ib = sim["offsets"][b[0]] + sim["nodes"][b[0]].index(b[1])
    return float(sim["matrix"][ia, ib])
