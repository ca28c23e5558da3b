"""Reassembled chains: a model's own blocks chained need no stitch and reproduce it; saved models reload."""

from __future__ import annotations

import pytest
import timm
import torch

import surgery
from surgery.assembled import ReassembledModel, StagePlan, build_parts, headless
from surgery.dissection import dissect
from surgery.stitch import make_head


def _plans(name: str, model, k: int = 3) -> list[StagePlan]:
    d = dissect(model, (3, 160, 160), name=name)
    b = d.boundaries
    picks = [b[len(b) // 3], b[2 * len(b) // 3]]
    starts, ends = [None, *picks], [*picks, None]
    specs = {c.name: c.spec for c in d.cut_points}
    return [StagePlan(name, {"name": name, "random_init": True}, s, e, (3, 160, 160), "block",
                      specs[s] if s else d.input_spec, specs[e] if e else d.output_spec)
            for s, e in zip(starts, ends, strict=True)]


def test_own_blocks_chained_reproduce_the_model_without_stitches():
    for name in ("test_resnet", "test_vit", "test_convnext"):
        model = timm.create_model(name, pretrained=False).eval()
        plans = _plans(name, model)
        parts, roles, spec = build_parts({name: model}, plans, [None, None])
        assert roles == ["block"] * 3  # consecutive blocks of one model: no stitch
        chain = ReassembledModel(parts, roles, make_head(spec, 10)).eval()
        x = torch.randn(3, 3, 160, 160)
        with torch.no_grad():
            assert torch.allclose(chain.forward_features(x), headless(model)(x), rtol=1e-4, atol=1e-5)


def test_stitched_chain_runs_and_saves(tmp_path):
    from surgery.assembled import load, save

    a = timm.create_model("test_resnet", pretrained=False).eval()
    b = timm.create_model("test_vit", pretrained=False).eval()
    pa, pb = _plans("test_resnet", a), _plans("test_vit", b)
    chain = [pa[0], pb[1], pb[2]]
    parts, roles, spec = build_parts({"test_resnet": a, "test_vit": b}, chain, [True, None])
    assert roles == ["block", "stitch", "block", "block"]
    model = ReassembledModel(parts, roles, make_head(spec, 7)).eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 7)
    recipe = {"num_classes": 7, "classes": [str(i) for i in range(7)], "input_size": [3, 160, 160],
              "stages": [p.to_dict() for p in chain], "stitch_project": [True, None]}
    save(model, tmp_path / "m", recipe, "# card\n")
    loaded = load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    assert isinstance(surgery.load, type(load)) or callable(surgery.load)


def test_activation_cache_is_reused_capped_and_changes_nothing(monkeypatch):
    import surgery.reassembly as R

    a = timm.create_model("test_resnet", pretrained=False).eval()
    b = timm.create_model("test_vit", pretrained=False).eval()
    models = {"test_resnet": a, "test_vit": b}
    dissections = {n: dissect(m, (3, 160, 160), name=n) for n, m in models.items()}
    pa, pb = _plans("test_resnet", a), _plans("test_vit", b)
    chain = [pa[0], pb[1], pb[2]]
    torch.manual_seed(0)
    x = torch.randn(8, 3, 160, 160)
    inputs, labels = {"test_resnet": x, "test_vit": x}, torch.arange(8) % 4

    def built(cache):
        torch.manual_seed(1)
        model = R.build_chain(models, dissections, chain, inputs, labels, 4, cache)
        with torch.no_grad():
            return model(x)

    cache: dict = {}
    first = built(cache)
    assert set(cache) == {("test_resnet", pa[0].end), ("test_vit", pb[1].start)}
    monkeypatch.setattr(R, "_activation", lambda *args: pytest.fail("a cached activation was recomputed"))
    torch.testing.assert_close(built(cache), first, rtol=0, atol=0)  # served from the cache
    monkeypatch.undo()
    monkeypatch.setattr(R, "ACTIVATION_CACHE_BYTES", 0)
    capped: dict = {}
    torch.testing.assert_close(built(capped), first, rtol=0, atol=0)
    assert capped == {}
