"""``surgery align``: stage modules, truncated meta model, what each --train mode touches, distillation,
label-free stitch fitting, reload, resume, refusals, and the CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli

import surgery
from surgery.errors import SurgeryError

SIZE = 32


@pytest.fixture(scope="module")
def align_ws(tmp_path_factory) -> Path:
    """test_resnet and test_vit at 32 px, dissected at random init, digits similarity, 3 stages."""
    from surgery.equivalence import run_partition
    from surgery.library import dissect_zoo
    from surgery.similarity import compute_similarity
    from surgery.workspace import Workspace
    from zoo.entries import ZooEntry

    ws = tmp_path_factory.mktemp("align") / "ws"
    torch.manual_seed(0)
    entries = [ZooEntry(name="test_resnet", random_init=True, model_kwargs={"num_classes": 10}),
               ZooEntry(name="test_vit", random_init=True, model_kwargs={"num_classes": 10, "depth": 6})]
    status = dissect_zoo(entries, Workspace(ws), input_size=SIZE)
    assert all(s.status == "ok" for s in status), status
    compute_similarity(ws, "digits", samples=32, batch_size=32, seed=0)
    run_partition(ws, 3, eps=1.0, restarts=2, seed=0, plots=False, relax_eps=True)
    return ws


def _stitched(ws: Path, out: Path, **kw) -> Path:
    """A reassembled folder whose first junction is a ResNet -> ViT stitch."""
    from surgery.reassembly import reassemble

    def constrain(p):
        p.require("test_resnet", stage=0)
        p.require("test_vit", stage=1)

    res = reassemble(ws, data="digits", top=1, target_samples=64, proxy="params", seed=0, constraints=[constrain],
                     out_dir=out, **{"unlabeled": 128, **kw})
    assert "stitch" in res.ranked[0].model.roles
    return out


@pytest.fixture(scope="module")
def chain_dir(align_ws, tmp_path_factory) -> Path:
    return _stitched(align_ws, tmp_path_factory.mktemp("chain") / "m")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------- engine


def test_stage_modules_chained_are_the_chain(chain_dir):
    from surgery.training.align import stage_modules

    model = surgery.load(chain_dir)
    modules = stage_modules(model)
    assert len(modules) == len(model.recipe["stages"]) == 3
    assert [type(m[0]).__name__ for m in modules] and model.roles[1] == "stitch" and modules[0][1] is model.parts[1]
    assert modules[-1][-1] is model.head
    x = _x()
    with torch.no_grad():
        z = x
        for m in modules:
            z = m(z)
        assert torch.equal(z, model(x))


def test_module_parameters_per_train_mode(chain_dir):
    from surgery.training.align import module_parameters, stage_modules

    model = surgery.load(chain_dir)
    first = stage_modules(model)[0]  # resnet block + stitch
    stitch_ids = {id(p) for p in first[1].parameters()}
    params, scale = module_parameters(first, "stitches")
    assert {id(p) for p in params} == stitch_ids and not scale
    params, _ = module_parameters(first, "norms")
    norm_ids = {id(p) for m in first[0].modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert norm_ids and {id(p) for p in params} == stitch_ids | norm_ids
    params, scale = module_parameters(first, "blocks", block_lr_scale=0.25)
    assert len(params) == len(list(first.parameters()))
    assert {id(p) for p in scale} == {id(p) for p in first[0].parameters()} and set(scale.values()) == {0.25}
    last = stage_modules(model)[-1]
    params, _ = module_parameters(last, "blocks")
    assert params and not ({id(p) for p in params} & {id(p) for p in model.head.parameters()})
    with pytest.raises(SurgeryError, match="unknown train mode"):
        module_parameters(first, "everything")


def test_truncated_meta_keeps_interfaces_and_fits_a_head(chain_dir):
    from surgery.assembled import StagePlan
    from surgery.count import count_macs
    from surgery.training.align import stage_modules, truncated_meta, truncated_stage

    model = surgery.load(chain_dir)
    stages = [StagePlan.from_dict(s) for s in model.recipe["stages"]]
    modules = stage_modules(model)
    x = _x(8)
    with torch.no_grad():
        z = x
        for k, (plan, module) in enumerate(zip(stages, modules, strict=True)):
            block, info = truncated_stage(plan, module[0], last=k == len(stages) - 1)
            assert 1 <= info["kept"] <= info["sub_blocks"]
            native = module[0](z)
            short = block(z)
            assert short.shape == native.shape  # same interface
            if info["kept"] == info["sub_blocks"]:
                assert torch.allclose(short, native, atol=1e-5)  # nothing dropped: the block itself
            else:  # fewer sub-blocks run
                assert count_macs(block, z[:1]) < count_macs(module[0], z[:1])
            z = module(z)
    infos = [truncated_stage(p, m[0], last=k == len(stages) - 1)[1]
             for k, (p, m) in enumerate(zip(stages, modules, strict=True))]
    assert any(i["kept"] < i["sub_blocks"] for i in infos)  # transformer blocks after the first are dropped
    batches = [(x, torch.arange(8) % 10)]
    meta, infos = truncated_meta(model, stages, batches)
    assert len(meta.parts) == 3 and not any(p.requires_grad for p in meta.parameters())
    assert meta(x).shape == (8, 10)
    # the meta model is separate: the chain's weights are not shared
    assert not ({p.data_ptr() for p in meta.parameters()} & {p.data_ptr() for p in model.parameters()})


# ---------------------------------------------------------------------------------------- distillation


def test_kd_loss_matches_a_float64_reference():
    from surgery.training.distill import kd_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for temp in (1.0, 3.0):
        ps, pt = F.softmax(s.double() / temp, -1), F.softmax(t.double() / temp, -1)
        ref = (pt * (pt.log() - ps.log())).sum(-1).mean() * temp ** 2
        assert torch.allclose(kd_loss(s, t, temp).double(), ref, atol=1e-6)
    assert kd_loss(s, s).abs() < 1e-6
    with pytest.raises(SurgeryError):
        kd_loss(s, t[:, :4])


def test_distillation_task_mixes_ce_and_kd_as_specified():
    from surgery.training.distill import distillation_task, kd_loss

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        ce, kd = F.cross_entropy(student(x), y), kd_loss(student(x), teacher(x), 2.0)
    out = distillation_task(teacher, alpha=0.5, temperature=2.0)(student, x, y)
    assert torch.allclose(out["loss"], 0.5 * ce + 0.5 * kd) and torch.allclose(out["kd"], kd)
    assert torch.allclose(distillation_task(teacher, alpha=0.0)(student, x, y)["loss"], ce)
    assert torch.allclose(distillation_task(teacher, alpha=1.0, temperature=2.0)(student, x, y)["loss"], kd)
    out["loss"].backward()
    assert student.weight.grad is not None and teacher.weight.grad is None  # the teacher stays frozen
    with pytest.raises(SurgeryError, match="alpha"):
        distillation_task(teacher, alpha=1.5)


def test_input_converter_renormalises_and_resizes():
    from surgery.training.distill import InputConverter

    img = torch.rand(2, 3, 16, 16)
    m1, s1, m2, s2 = [0.5] * 3, [0.25] * 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    conv = InputConverter((3, 16, 16), m1, s1, (3, 8, 8), m2, s2)
    x_in = (img - torch.tensor(m1)[:, None, None]) / torch.tensor(s1)[:, None, None]
    small = F.interpolate(img, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    want = (small - torch.tensor(m2)[:, None, None]) / torch.tensor(s2)[:, None, None]
    assert torch.allclose(conv(x_in), want, atol=1e-5)
    assert InputConverter((3, 8, 8), m1, s1, (3, 8, 8), m1, s1).identity
    with pytest.raises(SurgeryError, match="channels"):
        InputConverter((1, 8, 8), m1, s1, (3, 8, 8), m1, s1)


# ---------------------------------------------------------------------------------------- label-free stitches


def test_unlabelled_stitch_fit_uses_no_labels(align_ws):
    from surgery.equivalence import read_partition
    from surgery.reassembly import build_chain, load_sources
    from surgery.workspace import Workspace

    ws = Workspace(align_ws)
    part = read_partition(ws)
    src = load_sources(ws, part, "digits:train_per_class=3", 0, 30, with_quality=False, unlabeled=200)
    assert src.stitch_inputs is not None and len(next(iter(src.stitch_inputs.values()))) == 200
    chain = [src.plans[0]["test_resnet"], src.plans[1]["test_vit"], src.plans[2]["test_vit"]]
    shuffled = src.labels[torch.randperm(len(src.labels), generator=torch.Generator().manual_seed(3))]
    a = build_chain(src.models, src.dissections, chain, src.inputs, src.labels, 10, stitch_inputs=src.stitch_inputs)
    b = build_chain(src.models, src.dissections, chain, src.inputs, shuffled, 10, stitch_inputs=src.stitch_inputs)
    sa, sb = a.parts[1].state_dict(), b.parts[1].state_dict()
    assert sa and all(torch.equal(sa[k], sb[k]) for k in sa)  # the stitch never saw a label
    assert not torch.equal(a.head.fc.weight, b.head.fc.weight)  # the head did
    # with labelled images only, the stitch is fitted on fewer images and comes out different
    c = build_chain(src.models, src.dissections, chain, src.inputs, src.labels, 10)
    assert not torch.equal(c.parts[1].state_dict()["proj.weight"], sa["proj.weight"])


def test_unlabeled_split_is_the_train_pool_before_the_label_cap():
    from zoo.data import load_splits

    few = load_splits("digits:train_per_class=5", seed=2, unlabeled=True)
    full = load_splits("digits", seed=2)
    assert len(few["train"]) == 50 and len(few["unlabeled"]) == len(full["train"])
    pool = set(few["unlabeled"].sample_ids.tolist())
    assert set(few["train"].sample_ids.tolist()) <= pool and pool == set(full["train"].sample_ids.tolist())


# ---------------------------------------------------------------------------------------- the run


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("mode", ["stitches", "norms"])
def test_align_touches_only_what_train_names(chain_dir, tmp_path, mode):
    from surgery.training.align_run import align

    folder = _copy(chain_dir, tmp_path / "m")
    before = _params(surgery.load(folder))
    manifest = align(folder, "digits", epochs=(2, 0), train=mode, batch_size=32, quiet=True)
    assert manifest["complete"] and manifest["phases"]["mt_0"]["trained_params"] > 0
    after_model = surgery.load(folder)
    after = _params(after_model)
    roles = {}
    for i, (part, role) in enumerate(zip(after_model.parts, after_model.roles, strict=True)):
        for name, mod in part.named_modules():
            for pname, _ in mod.named_parameters(recurse=False):
                roles[f"parts.{i}.{name + '.' if name else ''}{pname}"] = (role, mod)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for key in before:
        role, mod = roles.get(key, ("head", None))
        trainable = role == "stitch" or (
            mode == "norms" and isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)))
        if not trainable:
            assert key not in changed, key  # bit-identical
    assert any(roles.get(k, ("head",))[0] == "stitch" for k in changed)
    assert not any(roles.get(k, ("head",))[0] == "head" for k in changed)  # the head waits for the fine-tuning
    if mode == "norms":
        assert any(roles.get(k, ("head",))[0] == "block" for k in changed)


def test_nothing_trained_nothing_recalibrated(chain_dir, tmp_path):
    from surgery.training.align_run import align

    folder = _copy(chain_dir, tmp_path / "m")
    m = align(folder, "digits", epochs=(0, 1), train="blocks", batch_size=32, quiet=True)
    assert m["phases"]["assemble"]["norm_layers_recalibrated"] == 0
    assert all(m["phases"][f"mt_{k}"]["skipped"] == "MT epochs 0" for k in range(3))
    assert "skipped (MT epochs 0)" in (folder / "README.md").read_text()


def test_aligned_folder_reloads_to_identical_outputs_and_records_steps(chain_dir, tmp_path):
    from surgery.assembled import read_recipe, rebuild
    from surgery.training.align_run import align
    from surgery.workspace import load_tensors

    folder = _copy(chain_dir, tmp_path / "m")
    manifest = align(folder, "digits", epochs=(1, 1), train="blocks", batch_size=32, quiet=True)
    recipe = read_recipe(folder)
    assert recipe["align"]["spec"]["train"] == "blocks" and "ft" in recipe["align"]["phases"]
    card = (folder / "README.md").read_text()
    assert "## Alignment" in card and "MT: stage 0" in card and "Held-out test top-1" in card
    model = rebuild(recipe)
    model.load_state_dict(load_tensors(folder / "align" / "ft" / "model.safetensors"))
    x = _x()
    with torch.no_grad():
        assert torch.equal(surgery.load(folder)(x), model.eval()(x))
    assert 0 <= manifest["phases"]["final"]["test_acc"] <= 1
    again = align(folder, "digits", epochs=(1, 1), train="blocks", batch_size=32, quiet=True)  # finished: no-op
    assert again["phases"]["final"] == manifest["phases"]["final"]


def test_killed_and_resumed_align_equals_an_uninterrupted_one(chain_dir, tmp_path, monkeypatch):
    import surgery.training.align_run as A
    from surgery.workspace import load_tensors

    kw = dict(epochs=(1, 2), train="stitches", batch_size=32, quiet=True)
    whole = _copy(chain_dir, tmp_path / "whole")
    A.align(whole, "digits", **kw)
    broken = _copy(chain_dir, tmp_path / "broken")
    real = A._train

    def dies_in_ft(run, name, *args, **kwargs):
        if name == "ft":
            raise KeyboardInterrupt
        return real(run, name, *args, **kwargs)

    monkeypatch.setattr(A, "_train", dies_in_ft)
    with pytest.raises(KeyboardInterrupt):
        A.align(broken, "digits", **kw)
    assert load_tensors(broken / "model.safetensors").keys() == load_tensors(whole / "model.safetensors").keys()
    start = load_tensors(broken / "align" / "start.safetensors")
    assert all(torch.equal(start[k], v) for k, v in load_tensors(broken / "model.safetensors").items())  # untouched
    monkeypatch.setattr(A, "_train", real)
    A.align(broken, "digits", **kw)
    a, b = load_tensors(whole / "model.safetensors"), load_tensors(broken / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_align_with_a_teacher_logs_the_kd_term(chain_dir, align_ws, tmp_path):
    from surgery.training.align_run import align

    folder = _copy(chain_dir, tmp_path / "m")
    manifest = align(folder, "digits", epochs=(1, 1), teacher="test_vit", kd_unlabeled=16, batch_size=32, quiet=True)
    assert "test_vit" in manifest["teacher"] and manifest["spec"]["kd_unlabeled"] == 16
    history = json.loads((folder / "align" / "ft" / "result.json").read_text())["history"]
    assert all(math.isfinite(h["train_kd"]) for h in history)
    # a model folder teaches too (here the aligned one teaching a fresh copy)
    other = _copy(chain_dir, tmp_path / "other")
    again = align(other, "digits", epochs=(1, 1), teacher=str(folder), batch_size=32, quiet=True)
    assert again["teacher"] == f"model folder {folder}"


def test_unlabelled_distillation_draws_extra_images_and_ignores_them_for_ce():
    from surgery.training.distill import distillation_task, kd_loss

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x, y, pool = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), torch.randn(50, 4)
    task = distillation_task(teacher, alpha=0.5, unlabeled=pool, unlabeled_batch=7)
    torch.manual_seed(3)
    out = task(student, x, y)
    torch.manual_seed(3)
    idx = torch.randint(50, (7,))
    both = torch.cat([x, pool[idx]])
    with torch.no_grad():
        want = 0.5 * F.cross_entropy(student(x), y) + 0.5 * kd_loss(student(both), teacher(both))
    assert out["output"].shape == (5, 3) and torch.allclose(out["loss"], want)


def test_align_refusals_leave_the_folder_untouched(chain_dir, tmp_path):
    from surgery.training.align_run import align

    folder = _copy(chain_dir, tmp_path / "m")
    snapshot = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(SurgeryError, match="neither a model folder nor a model of the workspace"):
        align(folder, "digits", epochs=(1, 0), teacher="resnet999", quiet=True)
    with pytest.raises(SurgeryError, match="classes"):
        align(folder, "fashion-mnist:classes=0-4", epochs=(1, 0), quiet=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == snapshot
    broken = _copy(chain_dir, tmp_path / "no-weights")
    (broken / "model.safetensors").unlink()
    with pytest.raises(SurgeryError):
        align(broken, "digits", epochs=(1, 0), quiet=True)
    assert not (broken / "align").exists()  # nothing written before the weights were read
    align(folder, "digits", epochs=(1, 0), alpha=0.9, batch_size=32, quiet=True)  # alpha without a teacher: no effect
    done = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert align(folder, "digits", epochs=(1, 0), batch_size=32, quiet=True)["complete"]  # so the same run
    with pytest.raises(SurgeryError, match="aligned with other options"):
        align(folder, "digits", epochs=(1, 0), train="norms", batch_size=32, quiet=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == done


def test_cli_reassemble_align_evaluate(align_ws, tmp_path):
    folder = _stitched(align_ws, tmp_path / "m")
    for args, msg in ((["--epochs", "0,0"], "--epochs must be MT,FT"), (["--train", "all"], "--train must be"),
                      (["--teacher", "nope"], "neither a model folder")):
        bad = run_cli("align", str(folder), "--data", "digits", *args, check=False)
        assert bad.returncode == 2 and msg in bad.stderr and "Traceback" not in bad.stderr
    res = run_cli("align", str(folder), "--data", "digits", "--epochs", "1,1", "--batch-size", "32", "--json")
    manifest = res.json()
    assert manifest["complete"] and manifest["phases"]["mt_0"]["trained_params"] > 0
    ev = run_cli("evaluate", str(folder), "--data", "digits", "--json").json()
    assert abs(ev["top1"] - manifest["phases"]["final"]["test_acc"]) < 1e-9
    table = run_cli("align", str(folder), "--data", "digits", "--epochs", "1,1", "--batch-size", "32")
    assert "already aligned" in table.stderr and "test top-1" in table.stdout
    # the whole path through the CLI: reassemble (stitches on unlabelled images), align, evaluate
    cli_dir = tmp_path / "cli"
    run_cli("reassemble", str(align_ws), "--data", "digits", "--top", "2", "--unlabeled", "64", "--proxy", "params",
            "--out", str(cli_dir), "--json")
    assert json.loads((cli_dir / "config.json").read_text())["stitch_images"] == 64
    run_cli("align", str(cli_dir), "--data", "digits", "--epochs", "0,1", "--batch-size", "32", "--json")
    assert run_cli("evaluate", str(cli_dir), "--data", "digits", "--json").json()["top1"] >= 0
    not_chain = run_cli("align", str(tmp_path), "--data", "digits", check=False)
    assert not_chain.returncode == 2 and "Traceback" not in not_chain.stderr
