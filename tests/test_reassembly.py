"""Reassembled chains: a model's own blocks chained need no stitch and reproduce it; saved models reload."""

from __future__ import annotations

import json

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


# ----------------------------------------------------------------------------------------------
# A run survives a chain that cannot be built; a receiver's token context is read as it is built

DEIT_DIST = {"name": "deit_dist", "arch": "deit_tiny_distilled_patch16_224", "random_init": True,
             "model_kwargs": {"img_size": 64, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 10}}


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    """test_resnet and a small distilled DeiT (2 prefix tokens), dissected, with similarity and 2 stages."""
    from surgery.equivalence import run_partition
    from surgery.library import dissect_zoo
    from surgery.similarity import compute_similarity
    from surgery.workspace import Workspace
    from zoo.entries import ZooEntry

    ws = tmp_path_factory.mktemp("reassemble") / "ws"
    entries = [ZooEntry(name="test_resnet", random_init=True, model_kwargs={"num_classes": 10}),
               ZooEntry(**DEIT_DIST)]
    status = dissect_zoo(entries, Workspace(ws), input_size=64)
    assert all(s.status == "ok" for s in status), status
    compute_similarity(ws, "digits", samples=32, batch_size=32, seed=0)
    run_partition(ws, 2, eps=1.0, restarts=2, seed=0, plots=False, relax_eps=True)
    return ws


def _reassemble(ws, **kw):
    import surgery.reassembly as R

    notes: list[str] = []
    result = R.reassemble(ws, data="digits", top=4, target_samples=32, proxy="params", seed=0, log=notes.append,
                          **kw)
    return result, notes


def test_distilled_deit_receives_its_two_prefix_tokens(small_zoo):
    result, _ = _reassemble(small_zoo)
    into_deit = [r for r in result.ranked if [s.model for s in r.stages] == ["test_resnet", "deit_dist"]]
    assert into_deit, [r.summary() for r in result.ranked]
    model = into_deit[0].model
    stitch = next(p for p, role in zip(model.parts, model.roles, strict=True) if role == "stitch")
    assert stitch.prefix_tokens.shape[1] == 2  # class + distillation token
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 64, 64))).all()


def test_a_chain_that_fails_to_build_is_skipped_with_a_note(small_zoo, monkeypatch, capsys, tmp_path):
    import surgery.assembled as A
    import surgery.cli as cli
    import surgery.reassembly as R

    real = A.make_stitch

    def flaky(out_spec, in_spec, **kwargs):  # the DeiT -> ResNet junction fails to build
        if out_spec.layout == "NLC" and in_spec.layout == "NCHW":
            raise RuntimeError("junction exploded\nsecond line")
        return real(out_spec, in_spec, **kwargs)

    monkeypatch.setattr(A, "make_stitch", flaky)
    result, notes = _reassemble(small_zoo)
    assert len(result.skipped) == 1 and result.skipped[0]["models"] == ["deit_dist", "test_resnet"]
    assert result.skipped[0]["reason"] == "RuntimeError: junction exploded"
    assert any("skipped" in n and "junction exploded" in n and "\n" not in n for n in notes)
    assert result.ranked and all([s.model for s in r.stages] != ["deit_dist", "test_resnet"] for r in result.ranked)

    # 'surgery reassemble' reports the skipped chain: in --json, and as one line in the human output
    monkeypatch.setattr(R, "reassemble", lambda *args, **kwargs: result)
    capsys.readouterr()
    cli.reassemble(small_zoo, data="digits", proxy="params", out=tmp_path / "m", as_json=True)
    assert json.loads(capsys.readouterr().out)["skipped"] == result.skipped
    cli.reassemble(small_zoo, data="digits", proxy="params", out=tmp_path / "m")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("skipped")]
    assert lines == ["skipped (could not be built): deit_dist > test_resnet: RuntimeError: junction exploded"]


def test_no_buildable_chain_is_one_user_error(small_zoo, monkeypatch):
    import surgery.reassembly as R
    from surgery.errors import SurgeryError

    def broken(*args, **kwargs):
        raise RuntimeError("cannot score")

    monkeypatch.setattr(R, "score_candidate", broken)  # no chain can be scored
    with pytest.raises(SurgeryError, match="none of the .* chain\\(s\\) .* could be built") as err:
        _reassemble(small_zoo)
    assert "\n" not in str(err.value)


def test_a_receiver_without_token_context_is_not_offered(small_zoo, monkeypatch):
    """A receiver whose token context cannot be built: its junctions never reach the solver."""
    import surgery.assembled as A
    import surgery.reassembly as R
    from surgery.stitch import StitchError

    def no_context(model, spec=None):
        raise StitchError(f"{type(model).__name__}: no token context")

    monkeypatch.setattr(A, "token_context_from_timm", no_context)
    monkeypatch.setattr(R, "token_context_from_timm", no_context, raising=False)
    result, notes = _reassemble(small_zoo)
    assert not result.skipped
    assert all([s.model for s in r.stages] != ["test_resnet", "deit_dist"] for r in result.ranked)
    assert any("not offered" in n for n in notes)


def test_model_card_budget_text():
    from surgery.reassembly import _budget_text

    assert _budget_text(None, None) == "none"
    assert _budget_text(0.0064, None) == "at most 0.0064 GFLOPs"
    assert _budget_text(2.5, 30) == "at most 2.5 GFLOPs, at most 30 M params"
