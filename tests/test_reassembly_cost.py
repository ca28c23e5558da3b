"""Reassembly cost: the fast paths of ``reassemble`` give exactly what the plain path gives.

The reference here rebuilds every ranked chain the plain way, independently of the run's caches:
each source model re-dissected, each block cut by :func:`surgery.assembled.build_parts` (its own
dissection per stage), stitches fitted on activations of freshly cut prefixes, the head fitted, the
proxy scored on a second forward pass, MACs counted on the built model. The run must agree bit for
bit: scores, MACs, parameters, outputs, the chosen chain, the saved model.
"""

from __future__ import annotations

import statistics

import pytest
import torch

import surgery
import surgery.reassembly as R
from surgery.assembled import ReassembledModel, build_parts, headless
from surgery.count import count_macs, count_params
from surgery.dissection import dissect
from surgery.equivalence import read_partition, run_partition
from surgery.library import dissect_zoo, load_model_entry
from surgery.proxy import score_candidate
from surgery.similarity import compute_similarity
from surgery.stitch import fit_linear_head, fit_stitch, make_head
from surgery.workspace import Workspace
from zoo.entries import ZooEntry

SIZE = 64
SAMPLES = 48
PROXY = "linear"
# CNNs and a ViT (grid fixed at construction, hence img_size) at a small input size
ENTRIES = [ZooEntry(name=n, random_init=True, input_size=(3, SIZE, SIZE))
           for n in ("test_resnet", "test_efficientnet", "test_convnext")]
ENTRIES.append(ZooEntry(name="test_vit", random_init=True, model_kwargs={"img_size": SIZE}))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small workspace and one reassembly on it (top 3, saved)."""
    root = tmp_path_factory.mktemp("cost")
    ws = root / "ws"
    status = dissect_zoo(ENTRIES, Workspace(ws))
    assert {s.status for s in status} == {"ok"}
    compute_similarity(ws, "digits", samples=60, batch_size=60, cache=False)
    run_partition(ws, 3, eps=1.0, plots=False)
    budget = statistics.median(s.macs for s in status) / 1e9
    out = root / "model"
    result = R.reassemble(ws, max_gflops=budget, data="digits", top=3, target_samples=SAMPLES, proxy=PROXY,
                          out_dir=out)
    return ws, out, result


def _project(stages) -> list[bool | None]:
    return [None if (a.model == b.model and a.end == b.start) else True
            for a, b in zip(stages[:-1], stages[1:], strict=True)]


def _reference(ws, stages, data: str = "digits", proxy: str = PROXY):
    """(model, proxy score, MACs, inputs of the first model) built the plain way, nothing shared."""
    images, labels, classes = R._target_batches(data, 0, SAMPLES)
    unlabeled = R._unlabeled_images(data, 0, R.DEFAULT_UNLABELED)  # the stitches' images (labels unused)
    names = sorted({s.model for s in stages})
    models, inputs, cuts, stitch_inputs = {}, {}, {}, {}
    for n in names:
        _, manifest, model = load_model_entry(Workspace(ws), n)
        models[n] = model
        inputs[n] = R._transform(manifest)(images)
        stitch_inputs[n] = R._transform(manifest)(unlabeled)
        cuts[n] = dissect(model, tuple(manifest["settings"]["input_size"]), name=n,
                          granularity=manifest["settings"]["granularity"])
    project = _project(stages)
    parts, roles, spec = build_parts(models, stages, project)
    stitches = iter([p for p, r in zip(parts, roles, strict=True) if r == "stitch"])
    with torch.inference_mode():
        for k in range(1, len(stages)):
            if project[k - 1] is None:
                continue
            prev, cur = stages[k - 1], stages[k]
            batches = [(stitch_inputs[prev.model][i:i + R.STITCH_BATCH], stitch_inputs[cur.model][i:i + R.STITCH_BATCH])
                       for i in range(0, len(unlabeled), R.STITCH_BATCH)]
            donor = [cuts[prev.model].split([prev.end])[0](a) for a, _ in batches]
            receiver = [b if cur.start is None else cuts[cur.model].split([cur.start])[0](b) for _, b in batches]
            fit_stitch(next(stitches), donor, receiver)
    head = make_head(spec, len(classes))
    model = ReassembledModel(parts, roles, head).eval()
    x = inputs[stages[0].model]
    with torch.inference_mode():
        feats = model.forward_features(x)
    fit_linear_head(head, feats, labels)
    model.eval()
    score = score_candidate(model, [x], labels, proxy=proxy, feature_fn=lambda m, xb: m.forward_features(xb))
    macs = count_macs(model, torch.zeros(1, *stages[0].input_size))
    return model, float(score), macs, x


def test_ranked_chains_scores_macs_and_outputs_match_the_plain_path(run):
    ws, _, result = run
    refs = []
    for r in result.ranked:
        model, score, macs, x = _reference(ws, r.stages)
        assert r.proxy == score
        assert r.macs == macs
        assert r.params == count_params(model)
        with torch.inference_mode():
            torch.testing.assert_close(r.model(x), model(x), rtol=0, atol=0)
        refs.append(score)
    # the chosen chain is the reference's best
    assert result.ranked[0].proxy == max(refs)
    assert [r.proxy for r in result.ranked] == sorted(refs, reverse=True)


def test_saved_model_outputs_match_the_plain_path(run):
    ws, out, result = run
    model, _, _, x = _reference(ws, result.ranked[0].stages)
    loaded = surgery.load(out)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert count_params(loaded) == result.ranked[0].params


def test_zoo_points_match_the_plain_path(run):
    ws, _, result = run
    images, labels, _ = R._target_batches("digits", 0, SAMPLES)
    for z in result.zoo_points:
        _, manifest, model = load_model_entry(Workspace(ws), z["model"])
        x = R._transform(manifest)(images)
        assert z["proxy"] == score_candidate(headless(model), [x], labels, proxy=PROXY, feature_fn=lambda m, xb: m(xb))


def test_partition_is_read(run):
    ws, _, _ = run
    assert read_partition(Workspace(ws))["stages"] == 3


def test_stored_macs_equal_counted_macs_for_cnn_and_vit_chains(run):
    ws, _, result = run
    # a second run that must use the ViT, every chain stitched to or from it
    vit = R.reassemble(ws, data="digits", top=4, target_samples=SAMPLES, proxy=PROXY,
                       constraints=[lambda p: p.require_model("test_vit")])
    ranked = result.ranked + vit.ranked
    assert any(s.model == "test_vit" for r in ranked for s in r.stages)
    assert any(r.model.roles.count("stitch") for r in ranked)
    assert any(all(s.model != "test_vit" for s in r.stages) for r in ranked)
    for r in ranked:
        size = r.stages[0].input_size
        assert r.macs == count_macs(r.model, torch.zeros(1, *size))
        assert r.params == count_params(r.model)


def test_each_source_is_traced_once_and_nothing_is_counted(run, monkeypatch):
    import surgery.count
    import surgery.dissection

    ws, _, result = run
    calls = []
    real = surgery.dissection.dissect

    def counting(model, *args, **kwargs):
        calls.append(kwargs.get("name"))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(surgery.dissection, "dissect", counting)
    monkeypatch.setattr(surgery.count, "count_macs", lambda *a, **k: pytest.fail("count_macs ran in reassemble"))
    again = R.reassemble(ws, max_gflops=result.ranked[0].macs / 1e9 * 2, data="digits", top=3,
                         target_samples=SAMPLES, proxy=PROXY)
    assert sorted(calls) == sorted(read_partition(Workspace(ws))["models"])
    assert again.ranked


def test_quality_pass_features_and_activations_equal_the_model(run):
    ws, _, _ = run
    part = read_partition(Workspace(ws))
    src = R.load_sources(Workspace(ws), part, "digits", 0, SAMPLES)
    assert set(src.features) == set(src.names) and src.activations
    for n in src.names:
        with torch.inference_mode():
            torch.testing.assert_close(src.features[n], headless(src.models[n])(src.inputs[n]), rtol=0, atol=0)
    for (n, node), act in src.activations.items():
        d = dissect(src.models[n], src.plans[0][n].input_size, name=n)
        with torch.inference_mode():
            torch.testing.assert_close(act, d.split([node])[0](src.inputs[n]), rtol=0, atol=0)
