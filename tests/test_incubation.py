"""Module incubation (Deep Incubation, Ni et al. ICCV 2023): modules, meta model, hybrids, the phase DAG.

Invariants: K modules chained are the model; meta module k has module k's interfaces; in MT_k only
module k moves (frozen statistics included); the K modules' weights assemble the model; a killed
and resumed run equals an uninterrupted one; bad input is one line, exit 2, nothing overwritten.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from helpers import run_cli

import surgery
from surgery.dissection import dissect
from surgery.errors import SurgeryError
from surgery.training import incubation_run as run_mod
from surgery.training.incubation import (
    IncubationHybrid,
    ModuleChain,
    auto_meta,
    init_from_meta,
    load_module_states,
    meta_from_model,
    module_state,
    plan_modules,
)
from surgery.training.loop import train
from surgery.workspace import load_tensors

# Four families: plain ViT, hierarchical ViT (Swin), ResNet, ConvNeXt.
FAMILIES = {
    "test_vit": ({"img_size": 32}, (3, 32, 32)),
    "swin_tiny_patch4_window7_224": ({"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 1, 2, 2),
                                      "window_size": 2, "patch_size": 2, "img_size": 32}, (3, 32, 32)),
    "test_resnet": ({}, (3, 32, 32)),
    "test_convnext": ({}, (3, 32, 32)),
}


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=5, **FAMILIES[name][0]).eval()


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("k", [2, 4])
def test_modules_chain_to_the_model_and_meta_keeps_interfaces(name, k):
    size = FAMILIES[name][1]
    model = _model(name)
    d = dissect(model, size, name=name)
    plan = plan_modules(d, k)
    n = len(d.blocks)
    assert plan.k == k and plan.blocks[0][0] == 0 and plan.blocks[-1][1] == n
    assert plan.blocks[0][1] >= 2 and plan.blocks[-1][0] <= n - 2  # stem with module 0, head with module K-1
    assert sum(plan.macs) == d.macs and sum(plan.params) == sum(b.params for b in d.block_info)
    modules = d.split(plan.boundaries)
    x = torch.randn(3, *size)
    with torch.no_grad():
        torch.testing.assert_close(ModuleChain(modules)(x), model(x), rtol=0, atol=1e-6)

    twin = _model(name, seed=1)
    meta, meta_plan = auto_meta(dissect(twin, size, name=name), plan)
    assert sum(meta_plan.params) <= sum(plan.params)
    h = x
    with torch.no_grad():
        for i, part in enumerate(meta):
            h = part(h)
            assert tuple(h.shape[1:]) == tuple(plan.out_specs[i].shape[1:]), (i, h.shape)
        # and any mix of target and meta modules runs: every MT_k hybrid is well-formed
        for i in range(k):
            out = IncubationHybrid(meta, modules[i], i)(x)
            assert out.shape == (3, 5)
    assert not set(map(id, twin.parameters())) & set(map(id, model.parameters()))


@pytest.mark.parametrize("name", timm.list_models("test_*"))
def test_every_timm_test_family_cuts_into_modules_with_a_meta(name):
    """ByobNet, CoAtNet, ConvNeXt, EfficientNet, MambaOut, MaxViT, NFNet, ResNet, ViTs: the same code."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3).eval()
    size = model.pretrained_cfg["input_size"]  # some (CoAtNet, MaxViT) need their own size
    d = dissect(model, size, name=name)
    k = min(4, len(d.blocks) - 2)
    plan = plan_modules(d, k)
    modules = d.split(plan.boundaries)
    meta, _ = auto_meta(dissect(timm.create_model(name, num_classes=3).eval(), size, name=name), plan)
    x = torch.randn(2, *size)
    with torch.no_grad():
        assert torch.equal(ModuleChain(modules)(x), model(x))
        assert all(IncubationHybrid(meta, modules[i], i)(x).shape == (2, 3) for i in range(k))


def test_balanced_by_macs_and_too_many_modules():
    model = _model("test_convnext")
    d = dissect(model, (3, 32, 32), name="test_convnext")
    plan = plan_modules(d, 3)
    # brute force over boundaries 2..n-2: no split has a smaller largest module
    import itertools

    macs = [b.macs for b in d.block_info]
    n = len(macs)
    best = min(max(sum(macs[s:e]) for s, e in zip((0, *c), (*c, n), strict=True))
               for c in itertools.combinations(range(2, n - 1), 2))
    assert max(plan.macs) == best
    with pytest.raises(SurgeryError, match=f"at most {n - 2} modules"):
        plan_modules(d, n - 1)


def test_shallow_variant_as_meta():
    model = _model("test_vit")
    plan = plan_modules(dissect(model, (3, 32, 32), name="test_vit"), 4)
    torch.manual_seed(2)
    shallow = timm.create_model("test_vit", num_classes=5, img_size=32, depth=4).eval()
    meta, meta_plan = meta_from_model(dissect(shallow, (3, 32, 32), name="shallow"), plan, name="shallow")
    assert len(meta) == 4 and meta_plan.source == "shallow"
    assert ModuleChain(meta)(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    tiny = timm.create_model("test_vit", num_classes=5, img_size=32, depth=1).eval()
    with pytest.raises(SurgeryError, match="cannot be cut at the target's 3 module interfaces"):
        meta_from_model(dissect(tiny, (3, 32, 32), name="tiny"), plan, name="tiny")


def _batches(n=4, size=(3, 32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *size, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("k_index", [0, 1, 2])
def test_mt_trains_only_its_module_and_frozen_statistics_stay(k_index):
    model = _model("test_resnet")
    d = dissect(model, (3, 32, 32), name="test_resnet")
    plan = plan_modules(d, 3)
    modules = d.split(plan.boundaries)
    meta, _ = auto_meta(dissect(_model("test_resnet", seed=1), (3, 32, 32), name="m"), plan)
    hybrid = IncubationHybrid(meta, modules[k_index], k_index)
    frozen_before = {k: v.clone() for i, p in enumerate(hybrid.parts) if i != k_index
                     for k, v in p.state_dict().items()}
    module_before = {k: v.clone() for k, v in modules[k_index].state_dict().items()}
    assert frozen_before and any("running_mean" in k for k in frozen_before)
    train(hybrid, _batches(), None, {"epochs": 1, "lr": 1e-2, "warmup_epochs": 0, "log_every": 0},
          trainable=hybrid.trainable_parameters(), quiet=True)
    frozen_after = {k: v for i, p in enumerate(hybrid.parts) if i != k_index for k, v in p.state_dict().items()}
    for key, value in frozen_before.items():
        assert torch.equal(value, frozen_after[key]), key
    moved = [k for k, v in modules[k_index].state_dict().items() if not torch.equal(v, module_before[k])]
    assert any(k.endswith("weight") for k in moved)
    # the meta parameters are frozen for good: no gradient is ever computed for them
    out = hybrid.train()(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    assert all(p.grad is None for i, part in enumerate(hybrid.parts) if i != k_index for p in part.parameters())
    assert all(not part.training for i, part in enumerate(hybrid.parts) if i != k_index)
    assert hybrid.module.training


def test_module_states_assemble_a_fresh_model():
    model = _model("test_vit")
    d = dissect(model, (3, 32, 32), name="test_vit")
    modules = d.split(plan_modules(d, 3).boundaries)
    states = [module_state(m) for m in modules]
    fresh = _model("test_vit", seed=7)
    load_module_states(fresh, states)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(SurgeryError, match="do not make up the model"):
        load_module_states(_model("test_vit"), states[:2])


def test_init_from_meta_copies_kept_blocks_and_stacks_the_others():
    model = _model("test_vit")
    d = dissect(model, (3, 32, 32), name="test_vit")
    plan = plan_modules(d, 2)
    modules = d.split(plan.boundaries)
    twin = _model("test_vit", seed=1)
    meta, meta_plan = auto_meta(dissect(twin, (3, 32, 32), name="test_vit"), plan)
    keys = [list(b.state_dict()) for b in d.blocks]
    counts = init_from_meta(modules[0], keys, plan.blocks[0], meta[0], meta_plan.blocks[0])
    s, e = plan.blocks[0]
    assert counts == {"copied": len(meta_plan.blocks[0]), "stacked": e - s - len(meta_plan.blocks[0]), "random": 0}
    state, twin_state = modules[0].state_dict(), twin.state_dict()
    kept_plain = [i for i in meta_plan.blocks[0] if i > 0][0]  # the shape-preserving block the meta kept
    for i in range(s, e):
        src = i if i in meta_plan.blocks[0] else kept_plain
        for key, src_key in zip(keys[i], keys[src], strict=True):
            assert torch.equal(state[key], twin_state[src_key]), (i, key)


# ---------------------------------------------------------------------------- the phase DAG

RUN_KW = {"modules": 2, "epochs": (1, 2, 1), "input_size": 32, "batch_size": 128, "lr": 2e-3, "quiet": True,
          "model_kwargs": {"depth": 2}}


def _weights(path):
    return load_tensors(path)


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    full = run_mod.incubate("test_vit", "digits", out=tmp_path / "full", **RUN_KW)
    assert set(full["phases"]) == {"pt", "mt_0", "mt_1", "assemble", "ft"}

    import surgery.training.loop as loop

    real_save = loop.save_checkpoint
    calls = {"n": 0}

    def dying_save(out, model, state):
        folder = real_save(out, model, state)
        if out.name == "mt_1":
            calls["n"] += 1
            raise KeyboardInterrupt("killed after MT_1's first epoch")
        return folder

    monkeypatch.setattr(loop, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_mod.incubate("test_vit", "digits", out=tmp_path / "cut", **RUN_KW)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert calls["n"] == 1 and not (tmp_path / "cut" / "mt_1" / "result.json").exists()
    resumed = run_mod.incubate("test_vit", "digits", out=tmp_path / "cut", **RUN_KW)
    assert resumed["phases"]["mt_1"]["resumed"] is True and resumed["phases"]["mt_0"]["resumed"] is False
    a, b = _weights(tmp_path / "full" / "model.safetensors"), _weights(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for phase in ("pt", "mt_0", "mt_1", "ft"):
        assert full["phases"][phase]["val_acc"] == resumed["phases"][phase]["val_acc"], phase
    # a finished run is a no-op: every phase skipped, same manifest phases
    again = run_mod.incubate("test_vit", "digits", out=tmp_path / "full", **RUN_KW)
    assert again["phases"] == full["phases"]


def test_run_folder_of_another_model_is_refused_untouched(tmp_path):
    out = tmp_path / "run"
    run_mod.incubate("test_vit", "digits", out=out, **{**RUN_KW, "epochs": (0, 1, 0)})
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SurgeryError, match="holds another incubation run"):
        run_mod.incubate("test_resnet", "digits", out=out, **{**RUN_KW, "epochs": (0, 1, 0)})
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SurgeryError, match="holds no incubation run"):
        run_mod.incubate("test_vit", "digits", out=other, **RUN_KW)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_meta_init_run_starts_each_module_from_the_trained_meta(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    kw = {**RUN_KW, "model_kwargs": {"depth": 4}, "epochs": (2, 1, 0)}
    seen = []
    real = run_mod.init_from_meta

    def spy(module, block_keys, span, meta_module, meta_blocks):
        # called after PT's weights are loaded: the meta module given is the trained one
        trained = load_tensors(tmp_path / "meta" / "pt" / "meta.safetensors")
        k = len(seen)
        assert all(torch.equal(v, trained[f"parts.{k}.{key}"]) for key, v in meta_module.state_dict().items())
        seen.append(real(module, block_keys, span, meta_module, meta_blocks))
        return seen[-1]

    monkeypatch.setattr(run_mod, "init_from_meta", spy)
    manifest = run_mod.incubate("test_vit", "digits", out=tmp_path / "meta", init="meta", **kw)
    assert manifest["spec"]["init"] == "meta" and len(seen) == 2
    assert all(c["copied"] >= 1 and c["random"] == 0 for c in seen)
    with pytest.raises(SurgeryError, match="cannot be used with a user-given meta model"):
        run_mod.incubate("test_vit", "digits", out=tmp_path / "x", init="meta", meta={"depth": 2}, **kw)


@pytest.mark.parametrize("text", ["3,1", "a,b,c", "1,0,1", "-1,1,1", "1,1,1,1"])
def test_malformed_epochs(text):
    with pytest.raises(SurgeryError, match="--epochs must be PT,MT,FT"):
        run_mod.parse_epochs(text)


def test_cli_incubate_evaluate_reload(tmp_path):
    """The whole command as a user runs it: incubate (MT jobs in 2 processes), evaluate, reload."""
    out = tmp_path / "run"
    res = run_cli("incubate", "test_vit", "--data", "digits", "--modules", "2", "--epochs", "1,1,1", "--jobs", "2",
                  "--input-size", "32", "--batch-size", "128", "--model-kwargs", '{"depth": 4}', "--out", str(out))
    assert "meta (auto)" in res.stdout and "assembled (before fine-tuning)" in res.stdout
    manifest = json.loads((out / "incubation.json").read_text())
    assert all(manifest["phases"][p]["train_macs_x_images"] > 0 for p in ("pt", "mt_0", "mt_1", "ft"))
    assert manifest["meta"]["macs"] < manifest["target"]["macs"]
    ev = run_cli("evaluate", str(out), "--data", "digits", "--json").json()
    assert ev["top1"] == pytest.approx(manifest["phases"]["ft"]["test_acc"])
    model = surgery.load(out)
    assert type(model).__name__ == "VisionTransformer"
    again = surgery.load(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    card = (out / "README.md").read_text()
    assert "| assemble |" in card and "meta model (auto)" in card
    torch.export.export(model, (x,))
    ft = run_cli("finetune", str(out), "--data", "digits", "--epochs", "1", "--batch-size", "128", "--json").json()
    assert 0 <= ft["test_top1"] <= 1
    # the same incubate command again: every phase done, the fine-tuned weights are left alone
    tuned = (out / "model.safetensors").read_bytes()
    again = run_cli("incubate", "test_vit", "--data", "digits", "--modules", "2", "--epochs", "1,1,1", "--input-size",
                    "32", "--batch-size", "128", "--model-kwargs", '{"depth": 4}', "--out", str(out))
    assert "nothing left to do" in again.stdout and (out / "model.safetensors").read_bytes() == tuned

    bad = run_cli("incubate", "test_vit", "--data", "digits", "--modules", "9", "--input-size", "32",
                  "--model-kwargs", '{"depth": 4}', "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode == 2 and "at most 4 modules" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = run_cli("incubate", "test_vit", "--data", "digits", "--epochs", "3,x,1", "--out", str(out), check=False)
    assert bad.returncode == 2 and "--epochs must be" in bad.stderr
    bad = run_cli("incubate", "test_resnet", "--data", "digits", "--epochs", "1,1,1", "--out", str(out), check=False)
    assert bad.returncode == 2 and "holds another incubation run" in bad.stderr


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "test_resnet", "test_convnext"])
def test_cli_incubates_hierarchical_vit_resnet_and_convnext(tmp_path, name):
    kwargs = {k: v for k, v in FAMILIES[name][0].items() if k != "img_size"}
    out = tmp_path / "run"
    res = run_cli("incubate", name, "--data", "digits", "--modules", "2", "--epochs", "1,1,0", "--input-size", "32",
                  "--batch-size", "128", "--model-kwargs", json.dumps(kwargs), "--out", str(out), "--json")
    manifest = res.json()
    assert manifest["spec"]["modules"] == 2 and manifest["phases"]["assemble"]["test_acc"] >= 0
    model = surgery.load(out)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
