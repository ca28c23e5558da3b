"""The similarity step: one pass per model gives the same CKA as pooling each cut point on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgery.cka import StreamingCKA
from surgery.features import feature_extractor, pool_tensor
from surgery.library import load_library
from surgery.similarity import compute_similarity, probe_images, read_similarity
from surgery.spec import TensorSpec
from surgery.workspace import Workspace
from zoo.data import make_transform


@pytest.fixture(scope="module")
def similarity(tiny_workspace, tmp_path_factory):
    import shutil

    ws = tmp_path_factory.mktemp("sim") / "ws"
    shutil.copytree(tiny_workspace, ws)
    result = compute_similarity(ws, "digits", samples=96, batch_size=32, seed=1)
    return ws, result


def test_matrix_is_a_cka_matrix(similarity):
    _, result = similarity
    m = result["matrix"]
    assert m.shape[0] == m.shape[1] == sum(len(v) for v in result["nodes"].values())
    assert np.allclose(m, m.T)
    assert np.allclose(np.diag(m), 1.0)


def test_one_pass_equals_per_cut_point_reference(similarity):
    """Each cut point's features, computed by running the prefix block alone, give the same matrix."""
    ws, result = similarity
    lib = load_library(ws)
    images = probe_images("digits", 96, seed=1)
    acc = StreamingCKA()
    for start in range(0, 96, 32):
        feats = []
        for name in result["models"]:
            item = lib[name]
            manifest = item.manifest
            cfg = manifest["data_config"]
            x = make_transform(tuple(manifest["settings"]["input_size"]), cfg["mean"], cfg["std"])(
                images[start:start + 32])
            specs = {c["name"]: TensorSpec.from_dict(c["spec"]) for c in manifest["cut_points"]}
            for node in result["nodes"][name]:
                with torch.no_grad():
                    out = item.dissection.split([node])[0](x)
                spec = specs[node]
                feats.append(pool_tensor(out, spec.layout, spec.prefix_tokens))
        acc.update(feats)
    assert np.allclose(acc.compute(), result["matrix"], atol=1e-6)


def test_cache_is_reused_and_gives_identical_matrix(similarity):
    ws, result = similarity
    shards = sorted((ws / "features").rglob("batch_*.safetensors"))
    assert shards
    before = {p: p.stat().st_mtime_ns for p in shards}
    again = compute_similarity(ws, "digits", samples=96, batch_size=32, seed=1)
    assert np.array_equal(again["matrix"], result["matrix"])
    assert {p: p.stat().st_mtime_ns for p in shards} == before  # read, not recomputed
    stored = read_similarity(Workspace(ws))
    assert np.array_equal(stored["matrix"], result["matrix"])


def test_extractor_drops_the_head(tiny_workspace):
    lib = load_library(tiny_workspace, ["test_vit"])
    item = lib["test_vit"]
    nodes = item.manifest["boundaries"][:2]
    specs = {c["name"]: TensorSpec.from_dict(c["spec"]) for c in item.manifest["cut_points"]}
    ext = feature_extractor(item.dissection.graph_module, nodes, [specs[n] for n in nodes])
    called = [n.name for n in ext.graph.nodes if n.op == "call_module"]
    assert not any(name.startswith("head") for name in called)
    outs = ext(torch.randn(2, *item.input_size))
    assert len(outs) == 2 and all(o.dim() == 2 and o.shape[0] == 2 for o in outs)


def test_cka_update_leaves_the_thread_setting_alone(similarity):
    """The CKA update runs on one thread (small ops); the caller's intra-op thread count is restored."""
    ws, result = similarity
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        again = compute_similarity(ws, "digits", samples=96, batch_size=32, seed=1, device="cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert np.allclose(again["matrix"], result["matrix"], atol=1e-12)
