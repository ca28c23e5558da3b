"""Divide-and-Co-training: width division over timm families, the JSD loss, views, batched members,
S = 1 equals plain training, resume, and the whole command (ensemble folder, evaluate, export)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import CrashingData, run_cli
from torch.utils.data import DataLoader, TensorDataset

from surgery.errors import SurgeryError
from surgery.training import train
from surgery.training.cotrain import (
    CoTrainingTask,
    Ensemble,
    LoopedMembers,
    StackedMembers,
    co_training_views,
    jsd,
    to_ensemble,
)
from surgery.training.divide import TOLERANCE, divide, divided_regularisation, divided_weight_decay

# (timm name, model_kwargs, input side, expected family, ways): small real configs, on the meta device
FAMILY_CASES = [
    ("test_resnet", {}, 64, "resnet", 2),
    ("test_resnet", {}, 64, "resnet", 4),
    ("resnet18", {}, 64, "resnet", 2),
    ("wide_resnet50_2", {"layers": (1, 1, 1, 1)}, 64, "resnet", 4),
    ("test_vit", {}, 160, "vit", 2),
    ("test_vit", {}, 160, "vit", 4),
    ("test_convnext", {}, 64, "convnext", 4),
    ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1), "img_size": 64, "window_size": 4}, 64, "swin", 2),
    ("pvt_v2_b0", {"depths": (1, 1, 1, 1)}, 64, "pvt_v2", 2),
    ("densenet121", {"block_config": (3, 3, 3, 3)}, 64, "densenet", 4),
    ("densenet121", {"block_config": (3, 3, 3, 3)}, 64, "pruned", 2),  # even growth rates miss: pruned instead
    ("test_efficientnet", {}, 64, "pruned", 2),
    ("mobilenetv3_small_050", {}, 64, "pruned", 4),
    ("test_byobnet", {}, 64, "pruned", 2),
]


@pytest.mark.parametrize("name,kwargs,size,family,ways", FAMILY_CASES,
                         ids=[f"{c[0]}-{c[4]}" for c in FAMILY_CASES])
def test_width_solver_matches_parameters_within_tolerance(name, kwargs, size, family, ways):
    d = divide({"arch": name, "model_kwargs": kwargs}, ways, input_size=(3, size, size), num_classes=10, build=False)
    assert d.family == family
    assert abs(d.error) <= TOLERANCE
    assert abs(ways * d.member_params / d.original_params - 1) <= TOLERANCE
    assert d.member_params < d.original_params / ways * 1.1  # each member really is narrower
    if family == "pruned" and ways > 1:
        assert d.member_recipe["prune_ratio"] > 0


def test_macs_matching_and_built_members():
    d = divide("test_convnext", 2, match="macs", input_size=(3, 64, 64), num_classes=10, seed=5)
    assert abs(2 * d.member_macs / d.original_macs - 1) <= TOLERANCE
    assert len(d.members) == 2 and all(m.training for m in d.members)
    a, b = (dict(m.named_parameters()) for m in d.members)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # seeds seed, seed + 1: different inits
    x = torch.randn(3, 3, 64, 64)
    assert d.members[0].eval()(x).shape == (3, 10)
    assert divide("test_convnext", 1, input_size=(3, 64, 64), num_classes=10, build=False).member_params == \
        d.original_params


def test_regularisation_division():
    kw = divided_regularisation({"drop_rate": 0.4, "drop_path_rate": 0.2, "depth": 4}, 4)
    assert kw == {"drop_rate": 0.2, "drop_path_rate": 0.1, "depth": 4}
    assert divided_regularisation({"drop_rate": 0.4}, 4, "linear")["drop_rate"] == pytest.approx(0.1)
    assert divided_weight_decay(0.05, 2) == pytest.approx(0.05 * math.exp(-0.5))
    assert divided_weight_decay(0.05, 1) == pytest.approx(0.05)


def test_divide_refuses_bad_input():
    with pytest.raises(SurgeryError, match="ways must be"):
        divide("test_resnet", 0)
    with pytest.raises(SurgeryError, match="Torch-Pruning cannot narrow it"):
        divide("test_nfnet", 2, input_size=(3, 64, 64), build=False)
    with pytest.raises(SurgeryError, match="cannot build"):
        divide("no_such_model_xyz", 2)


def test_jsd_is_zero_for_agreeing_members_and_matches_a_float64_reference():
    z = torch.randn(1, 5, 7).expand(3, 5, 7)
    assert jsd(z).abs().item() < 1e-6
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 7, generator=g) * 4
    p = z.double().softmax(-1)
    mean = p.mean(0)
    ref = (-(mean * mean.log()).sum(-1) + (p * p.log()).sum(-1).mean(0)).mean()
    assert jsd(z).item() == pytest.approx(ref.item(), rel=1e-5)
    assert 0 < jsd(z).item() <= math.log(3)


def test_views_are_independent_crops_and_flips():
    x = torch.randn(6, 3, 16, 16)
    v = co_training_views(x, 3, padding=0)
    assert v.shape == (3, 6, 3, 16, 16)
    for s in range(3):
        for b in range(6):
            assert torch.equal(v[s, b], x[b]) or torch.equal(v[s, b], x[b].flip(-1))
    torch.manual_seed(0)
    v = co_training_views(x, 2, padding=2, flip=False)
    assert not torch.equal(v[0], v[1])  # the members' crops differ
    inner = v[:, :, :, 2:-2, 2:-2]  # every crop keeps the central region of some shift of x
    assert inner.abs().sum() > 0


def _members(ways: int = 2, size: int = 32):
    return divide("test_resnet", ways, input_size=(3, size, size), num_classes=10, seed=0).members


def test_stacked_members_equal_looped_members_outputs_gradients_and_statistics():
    members = _members()
    stacked, looped = StackedMembers(copy.deepcopy(members)).train(), LoopedMembers(copy.deepcopy(members)).train()
    x = co_training_views(torch.randn(8, 3, 32, 32), 2)
    a, b = stacked(x, per_member=True), looped(x, per_member=True)
    assert a.shape == (2, 8, 10) and torch.allclose(a, b, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    sp, sb = dict(stacked.stacked.named_parameters()), dict(stacked.stacked.named_buffers())
    for i, m in enumerate(looped.members):
        for n, p in m.named_parameters():
            assert torch.allclose(sp[n].grad[i], p.grad, rtol=1e-4, atol=1e-5), n
        for n, buf in m.named_buffers():
            assert torch.allclose(sb[n][i].to(buf.dtype), buf, atol=1e-6), n  # batch-norm statistics per member
    assert stacked.eval()(x[0]).shape == (8, 10)  # a plain batch: the ensemble's mean logits
    ens = to_ensemble(stacked, members)
    assert isinstance(ens, Ensemble)
    with torch.no_grad():
        assert torch.allclose(ens.eval()(x[0]), stacked(x[0]), atol=1e-5)
        ens.concurrent = True
        assert torch.allclose(ens(x[0]), stacked(x[0]), atol=1e-5)


def _data(n=64, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))


CFG = {"epochs": 2, "lr": 3e-3, "warmup_epochs": 0.5, "seed": 1, "log_every": 0, "label_smoothing": 0.1,
       "channels_last": False}


def test_every_member_gets_its_view_even_alone():
    seen = []

    def model(x, per_member=False):
        seen.append(tuple(x.shape))
        return torch.zeros(x.shape[0], x.shape[1], 10, requires_grad=True)

    CoTrainingTask(1)(model, torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))
    CoTrainingTask(3)(model, torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))
    assert seen == [(1, 4, 3, 16, 16), (3, 4, 3, 16, 16)]  # S = 1 trains under the members' augmentation


@pytest.mark.parametrize("kind", ["stacked", "looped"])
def test_one_member_cotraining_is_plain_training(kind):
    member = _members(1, 16)[0]
    plain = copy.deepcopy(member)
    ref = train(plain, DataLoader(_data(), batch_size=16, shuffle=True), None, CFG, quiet=True)
    wrapped = (StackedMembers if kind == "stacked" else LoopedMembers)([copy.deepcopy(member)])
    task = CoTrainingTask(1, views=False, label_smoothing=CFG["label_smoothing"])
    res = train(wrapped, DataLoader(_data(), batch_size=16, shuffle=True), None, CFG, task=task, quiet=True)
    assert [h["train_loss"] for h in res.history] == pytest.approx([h["train_loss"] for h in ref.history], rel=1e-4)
    trained = to_ensemble(wrapped, [member]).members[0]
    # Looped: the same operations, the same weights. Stacked: vmap's batched kernels differ in the last
    # bits, and Adam turns last-bit noise in a near-zero gradient into a step of up to lr (3e-3 here)
    # per step: the bound is lr times the steps (how close depends on the kernels, i.e. the threads).
    # (Running statistics then follow those weights: compared for the looped form only.)
    steps = CFG["epochs"] * len(_data()) // 16
    atol = 1e-6 if kind == "looped" else steps * CFG["lr"]
    state = trained.state_dict() if kind == "looped" else dict(trained.named_parameters())
    reference = plain.state_dict()
    for n, a in state.items():
        assert torch.allclose(a.float(), reference[n].float(), atol=atol), n
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():  # the same function either way
        assert torch.allclose(trained.eval()(x), plain.eval()(x), atol=1e-5 if kind == "looped" else 1e-3)


def test_killed_cotraining_resumes_exactly(tmp_path):
    cfg = {**CFG, "epochs": 3}

    def run(out, crash_after=None, resume=False):
        torch.manual_seed(0)
        model = StackedMembers(_members(2, 16))
        task = CoTrainingTask(2, warmup=0.5, mixup=0.2)
        loader = DataLoader(CrashingData(_data(), crash_after), batch_size=16, shuffle=True,
                            generator=torch.Generator().manual_seed(3))
        res = train(model, loader, None, cfg, out_dir=out, task=task, resume=resume, quiet=True)
        return model, res

    full, ref = run(tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "part", crash_after=64 + 20)
    resumed, res = run(tmp_path / "part", resume=True)
    for k, v in full.state_dict().items():
        assert torch.allclose(resumed.state_dict()[k].float(), v.float(), atol=1e-6), k
    assert [h["train_lambda"] for h in res.history] == pytest.approx([h["train_lambda"] for h in ref.history])
    assert res.history[0]["train_lambda"] < 0.5 == res.history[-1]["train_lambda"]  # the ramp, continued


@pytest.mark.slow
def test_cli_cotrain_evaluate_export_reload(tmp_path):
    import surgery

    out = tmp_path / "co"
    args = ["cotrain", "test_resnet", "--ways", "2", "--data", "digits", "--input-size", "32", "--epochs", "2",
            "--batch-size", "64", "--out", str(out)]
    manifest = run_cli(*args, "--json").json()
    assert manifest["complete"] and manifest["members"] in ("stacked", "looped")
    res = manifest["result"]
    assert len(res["member_top1"]) == 2 and 0 <= res["top1"] <= 1
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "ensemble" and config["ways"] == 2

    model = surgery.load(out)
    assert isinstance(model, Ensemble) and len(model.members) == 2
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), surgery.load(out)(x))  # reloads to identical outputs
    ev = run_cli("evaluate", str(out), "--data", "digits", "--json").json()
    assert ev["top1"] == pytest.approx(res["top1"]) and ev["member_top1"] == pytest.approx(res["member_top1"])
    assert ev["images_per_s_concurrent"] > 0

    run_cli("export", str(out), "--out", str(tmp_path / "m1.pt2"), "--member", "1")
    program = torch.export.load(str(tmp_path / "m1.pt2"))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model.members[1](x), atol=1e-5)

    again = run_cli(*args)
    assert "already co-trained" in again.stdout
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = run_cli(*args[:-2], "--out", str(out), "--ways", "3", check=False)
    assert other.returncode == 2 and "holds another co-training run" in other.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched
    for bad in (["--ways", "0"], ["--members", "fast"], ["--match", "flops"]):
        r = run_cli("cotrain", "test_resnet", "--data", "digits", "--out", str(tmp_path / "bad"), *bad, check=False)
        assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = run_cli("export", str(out), "--out", str(tmp_path / "x.pt2"), "--member", "5", check=False)
    assert r.returncode == 2 and "--member must be in 0..1" in r.stderr
    r = run_cli("export", str(out), "--out", str(out), check=False)  # a folder where the file goes
    assert r.returncode == 2 and "is a folder" in r.stderr
    (tmp_path / "afile").write_text("x")
    r = run_cli("cotrain", "test_resnet", "--data", "digits", "--out", str(tmp_path / "afile"), check=False)
    assert r.returncode == 2 and "is a file" in r.stderr and (tmp_path / "afile").read_text() == "x"
    r = run_cli("cotrain", "test_vit", "--data", "digits", "--input-size", "28", "--out", str(tmp_path / "v"),
                check=False)
    assert r.returncode == 2 and "cannot run at input size" in r.stderr and not (tmp_path / "v").exists()
