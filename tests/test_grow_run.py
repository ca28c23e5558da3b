"""`surgery grow`: AutoProg's supernet pieces, the staged runner, resume, the command end to end."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from helpers import run_cli

import surgery.training.loop as loop
from surgery.errors import SurgeryError
from surgery.training import grow_run
from surgery.training.autoprog import ElasticDepth, InputSize, candidates, measure_candidates
from surgery.training.growth import (
    find_block_groups,
    grow_depth,
    grown_parameters,
    renamed_parameters,
    resized_group,
    select_blocks,
    set_depths,
    set_drop_path,
)
from surgery.workspace import load_tensors

VIT = {"arch": "vit_tiny_patch16_224",
       "model_kwargs": {"patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3}}
DATA = "digits:per_class=30"


def _vit(depth=6, **extra):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", patch_size=4, embed_dim=32, depth=depth, num_heads=2,
                             img_size=16, num_classes=5, dynamic_img_size=True, **extra).eval()


def test_stage_architectures_from_the_full_model():
    model = _vit()
    x = torch.randn(2, 3, 16, 16)
    [group] = find_block_groups(model, x)
    full_params = sum(p.numel() for p in model.parameters())
    [small] = set_depths(model, [group], [3])
    assert (small.length, len(model.blocks)) == (3, 3)
    assert sum(p.numel() for p in model.parameters()) == full_params - 3 * group.params
    grow_depth(model, small, 5)
    assert sum(p.numel() for p in model.parameters()) == grown_parameters(full_params - 3 * group.params, small, 5)
    with pytest.raises(SurgeryError, match="outside"):
        set_depths(_vit(), [group], [7])
    with pytest.raises(SurgeryError, match="increasing"):
        select_blocks(_vit(), group, [2, 1])


def test_drop_path_is_ramped_over_the_blocks():
    model = _vit(drop_path_rate=0.1)
    assert set_drop_path(model, 0.3) == 10  # two per block; timm builds the first block without
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates == pytest.approx([r for r in (0.06, 0.12, 0.18, 0.24, 0.3) for _ in range(2)])
    resnet = timm.create_model("resnet18", layers=(2, 2, 2, 2), drop_path_rate=0.1)
    assert set_drop_path(resnet, 0.7) == 7  # one per block over all stages, block 0 without
    assert resnet.layer4[1].drop_path.drop_prob == pytest.approx(0.7)
    assert resnet.layer1[1].drop_path.drop_prob == pytest.approx(0.1)


def test_supernet_subnetwork_equals_the_architecture_built_directly():
    """A sub-network of the elastic supernet = its extraction = the plain architecture with its weights."""
    supernet = _vit()
    x = torch.randn(3, 3, 16, 16)
    [group] = find_block_groups(supernet, x)
    [base] = set_depths(supernet, [group], [3])
    plan = grow_depth(supernet, base, 6, init="copy")
    with torch.no_grad():  # the copies must differ from their sources for the test to mean anything
        for k, _, is_new in plan:
            if is_new:
                for p in supernet.blocks[k].parameters():
                    p.add_(0.05 * torch.randn_like(p))
    grown = resized_group(base, 6)
    elastic = ElasticDepth([grown], [3], [plan])
    active = elastic.active([4])[0]
    assert active == [0, 2, 4, 5]  # interleave 3 -> 6: copies at 1, 3, 5; depth 4 keeps the last copy
    with torch.no_grad():
        elastic.apply(supernet, [4])
        expected = supernet(x)
        elastic.apply(supernet, [3])
        assert not torch.allclose(supernet(x), expected)  # depth matters
        elastic.apply(supernet, None)
        full = supernet(x)
    assert not torch.allclose(full, expected)
    extracted = copy.deepcopy(supernet)
    select_blocks(extracted, grown, active)
    direct = _vit()
    set_depths(direct, [group], [4])
    direct.load_state_dict(extracted.state_dict())
    with torch.no_grad():
        assert torch.equal(extracted(x), expected)
        assert torch.equal(direct(x), expected)
    renames = renamed_parameters(grown, [(k, i, False) for k, i in enumerate(active)])
    assert renames["blocks.3."] == f"blocks.{active[3]}."


def test_input_size_hook_resizes_and_a_deep_copy_follows_it():
    model = _vit()
    seen = []
    model.patch_embed.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-1]))
    with InputSize(model, 8) as size:
        ema = copy.deepcopy(model)  # timm's EMA is a deep copy taken during training
        with torch.no_grad():
            model(torch.randn(2, 3, 16, 16))
            size.size = 12
            ema(torch.randn(2, 3, 16, 16))
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert seen == [8, 12, 16]


def test_candidates_and_their_measurement():
    levels = [(6,), (8,), (10,), (12,)]
    res = [16, 20, 24, 28]
    first = candidates(0, levels, res)
    assert {(c.depths[0], c.resolution) for c in first} == {(d, r) for d in (6, 10, 12) for r in (16, 24, 28)}
    later = candidates(2, levels, res, current=(1, 2))
    assert {(c.depths[0], c.resolution) for c in later} == {(d, r) for d in (8, 10, 12) for r in (24, 28)}
    fixed = candidates(0, levels, [28] * 4)  # resolution not grown: depth candidates only, once each
    assert [(c.depths[0], c.resolution) for c in fixed] == [(6, 28), (10, 28), (12, 28)]

    model = _vit(depth=4)
    [group] = find_block_groups(model, torch.randn(2, 3, 16, 16))
    [base] = set_depths(model, [group], [2])
    plan = grow_depth(model, base, 4)
    elastic = ElasticDepth([resized_group(base, 4)], [2], [plan])
    ema = copy.deepcopy(model)
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))) for _ in range(2)]
    opts = candidates(0, [(2,), (3,), (4,)], [8, 12, 16])
    ticks = iter(range(10_000))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with InputSize(model) as size, InputSize(ema, None):
        ema_hooked = copy.deepcopy(model)  # shares `size`
        table = measure_candidates(model, ema_hooked, elastic, size, opts, batches,
                                   lambda z, y: torch.nn.functional.cross_entropy(z, y), clock=lambda: next(ticks))
        again = measure_candidates(model, ema_hooked, elastic, size, opts, batches,
                                   lambda z, y: torch.nn.functional.cross_entropy(z, y))
    assert len(table) == 9 and all(t["step_s"] == 1 for t in table)  # one clock tick per timed step
    assert [t["loss"] for t in table] == [t["loss"] for t in again]  # seeded: the same losses
    assert len({round(t["loss"], 6) for t in table}) > 1
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in b.__dict__ for b in model.blocks)  # every block active again


def _grow(out, **kw):
    args = {"epochs": 4, "stages": 2, "input_size": 16, "batch_size": 32, "quiet": True, "seed": 0, **kw}
    return grow_run.grow(VIT, DATA, out=out, **args)


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, saves: int):
    real = loop.save_checkpoint
    count = {"n": 0}

    def save(*args, **kwargs):
        path = real(*args, **kwargs)
        count["n"] += 1
        if count["n"] >= saves:
            raise _Killed
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save)


def _by_loss(cands):  # AutoProg's choice without wall-clock timing: the same on every run of a test
    losses = [c[0] for c in cands]
    return losses.index(min(losses)), {"a": 0.0, "b": 0.0, "w": 0.0}


@pytest.mark.parametrize("schedule,init,kill", [("manual", "mogrow", 1), ("manual", "zero", 3), ("auto", "mogrow", 1),
                                                ("auto", "random", 2), ("auto", "copy", 4)])
def test_killed_growth_resumes_exactly(tmp_path, monkeypatch, schedule, init, kill):
    """kill -9 anywhere (mid-stage, at a stage boundary, mid-search) + the same call = the uninterrupted run."""
    monkeypatch.setattr(grow_run, "autoprog_choice", _by_loss)
    opts = {"schedule": schedule, "init": init, "epochs": 6 if schedule == "auto" else 4}
    ref = _grow(tmp_path / "ref", **opts)
    _kill_after(monkeypatch, kill)
    with pytest.raises(_Killed):
        _grow(tmp_path / "run", **opts)
    monkeypatch.undo()
    monkeypatch.setattr(grow_run, "autoprog_choice", _by_loss)
    again = _grow(tmp_path / "run", **opts)
    a, b = load_tensors(tmp_path / "ref" / "model.safetensors"), load_tensors(tmp_path / "run" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again["result"]["top1"] == ref["result"]["top1"]
    assert [s["depths"] for s in again["stages"]] == [s["depths"] for s in ref["stages"]]
    assert len(again["stages"]) == 2 and again["stages"][-1]["depths"] == [4]
    if schedule == "auto":
        assert again["stages"][0]["search"]["candidates"] and "search_epochs" in again["stages"][0]


def test_growth_carries_optimizer_state_and_ema(tmp_path, monkeypatch):
    """At the growth the new window's AdamW moments and EMA are the carried ones, not fresh."""
    seen = {}
    real = grow_run._Carry.__call__

    def spy(self, optimizer, ema):
        real(self, optimizer, ema)
        seen["moments"] = sum(1 for st in optimizer.state.values() if "exp_avg" in st)
        seen["params"] = sum(1 for _ in self.model.parameters())
        seen["ema_equal"] = all(torch.equal(ema.state_dict()[n], t) for n, t in self.ema.items())

    monkeypatch.setattr(grow_run._Carry, "__call__", spy)
    m = _grow(tmp_path / "g", init="mogrow")
    assert seen["ema_equal"] and seen["moments"] == seen["params"]  # every parameter has carried moments
    assert [s["depths"] for s in m["stages"]] == [[2], [4]] and [s["resolution"] for s in m["stages"]] == [8, 16]
    seen.clear()
    _grow(tmp_path / "reset", init="mogrow", carry_optimizer=False)
    assert seen["moments"] == 0


def test_bad_growth_input_is_refused(tmp_path):
    with pytest.raises(SurgeryError, match="no run of repeated"):
        grow_run.grow({"arch": "resnet18", "model_kwargs": {"layers": (1, 1, 1, 1)}}, DATA, out=tmp_path / "a",
                      epochs=2, stages=2, input_size=16, quiet=True)
    with pytest.raises(SurgeryError, match="more than"):
        _grow(tmp_path / "b", stages=4, epochs=4)
    with pytest.raises(SurgeryError, match="patch size"):
        _grow(tmp_path / "c", input_size=18)
    with pytest.raises(SurgeryError, match="longer than its 1 search epoch"):
        _grow(tmp_path / "d", schedule="auto", epochs=2)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_cli_grow_evaluate_and_refusals(tmp_path):
    out = tmp_path / "grown"
    args = ["grow", "vit_tiny_patch16_224", "--data", DATA, "--model-kwargs",
            json.dumps(VIT["model_kwargs"]), "--input-size", "16", "--epochs", "6", "--stages", "2",
            "--schedule", "auto", "--batch-size", "32", "--out", str(out), "--json"]
    proc = run_cli(*args)
    manifest = json.loads(proc.stdout)
    assert manifest["complete"] and manifest["stages"][0]["search"]["candidates"]
    assert (out / "README.md").read_text().startswith("# vit_tiny_patch16_224 grown")
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"
    ev = json.loads(run_cli("evaluate", str(out), "--data", DATA, "--json").stdout)
    res = manifest["result"]  # the saved weights are the EMA's when it validated better
    assert ev["top1"] == pytest.approx(res["ema_top1"] if res["saved"] == "ema" else res["top1"])
    again = run_cli(*args[:-1])
    assert "already trained" in again.stdout
    other = run_cli(*[a if a != "6" else "8" for a in args], check=False)
    assert other.returncode == 2 and "epochs" in other.stderr and "Traceback" not in other.stderr
    for bad in (["--stages", "0"], ["--schedule", "sometimes"], ["--init", "magic"]):
        proc = run_cli("grow", "vit_tiny_patch16_224", "--data", DATA, "--out", str(tmp_path / "x"), *bad,
                       check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, bad
    assert not (tmp_path / "x").exists()


def _rank_grow(out: str) -> dict:
    """One rank of a 2-process AutoProg run (module level: spawned processes import it)."""
    torch.set_num_threads(1)
    manifest = grow_run.grow(VIT, DATA, out=out, epochs=6, stages=2, input_size=16, batch_size=32, quiet=True,
                             schedule="auto")
    return {"stages": [(s["depths"], s["resolution"]) for s in manifest["stages"]],
            "state": load_tensors(f"{out}/model.safetensors")}


def test_autoprog_under_ddp_skips_blocks_and_agrees_across_ranks(tmp_path):
    """The supernet's skipped blocks leave parameters unused in a step (DDP must be told); rank 0's
    timing decides the sub-network for every rank, and the ranks end identical."""
    from surgery import distributed

    ranks = distributed.launch_local(_rank_grow, 2, (str(tmp_path / "g"),))
    assert ranks[0]["stages"] == ranks[1]["stages"] and ranks[0]["stages"][-1] == ([4], 16)
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model,size", [
    ({"arch": "resnet18", "model_kwargs": {"layers": (3, 3, 3, 3), "channels": (8, 16, 32, 64)}}, 32),
    ({"arch": "swin_tiny_patch4_window7_224", "model_kwargs": {"depths": (2, 2, 2, 2), "embed_dim": 24,
                                                                "num_heads": (1, 2, 2, 4), "window_size": 4}}, 64),
    ({"arch": "convnext_atto", "model_kwargs": {}}, 64),
], ids=["resnet", "swin", "convnext"])
def test_cnn_and_hierarchical_models_grow_to_the_full_model(tmp_path, model, size):
    import surgery

    m = grow_run.grow(model, DATA, out=tmp_path / "g", epochs=2, stages=2, input_size=size, batch_size=32,
                      quiet=True)
    first, last = (s["depths"] for s in m["stages"])
    assert all(a < b for a, b in zip(first, last, strict=True) if b > 1) and last == [g["length"] for g in m["groups"]]
    # the first stage's side is 60% of the input, rounded down to the patch (Swin: 4) or the CNN's stride (32)
    assert m["stages"][0]["resolution"] == (36 if "swin" in model["arch"] else 32)
    recipe = json.loads((tmp_path / "g" / "config.json").read_text())["entry"]["model_kwargs"]
    assert recipe["img_size"] == size if "swin" in model["arch"] else "img_size" not in recipe
    full = timm.create_model(model["arch"], **recipe)  # the full architecture, as built directly
    assert m["result"]["params"] == sum(p.numel() for p in full.parameters())
    loaded = surgery.load(tmp_path / "g")
    state = load_tensors(tmp_path / "g" / "model.safetensors")
    x = torch.randn(2, 3, size, size)
    full.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(loaded(x), full.eval()(x))


def test_patch_stride_is_the_embedding_step_not_the_patch_size():
    from surgery.training.growth import patch_stride

    with torch.device("meta"):
        pvt = timm.create_model("pvt_v2_b0")  # overlapping 7 x 7 patches every 4 px
        vit = timm.create_model("vit_tiny_patch16_224")
        cnn = timm.create_model("resnet18")
    assert (patch_stride(pvt), patch_stride(vit), patch_stride(cnn)) == (4, 16, None)
