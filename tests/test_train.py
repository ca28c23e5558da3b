"""Tests of surgery.training (the loop) on tiny CPU models and an easy synthetic 4-class image task."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from helpers import CrashingData
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from surgery.errors import SurgeryError
from surgery.training.loop import (
    EPOCH_KEYS,
    ROLE_ATTR,
    STEP_KEYS,
    TrainConfig,
    _param_groups,
    _wants_channels_last,
    build_scheduler,
    evaluate,
    select_trainable,
    train,
)

CLASSES = 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the test machines are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_data(n: int = 256, seed: int = 0) -> TensorDataset:
    """Separable task: each class adds its own fixed pattern to Gaussian noise (3x8x8 images)."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(CLASSES, 3, 8, 8, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = patterns[y] + 0.8 * torch.randn(n, 3, 8, 8, generator=g)
    return TensorDataset(x, y)


def conv_net(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(dropout),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, CLASSES),
    )


def stitched_net(seed: int = 0) -> nn.Sequential:
    """block -> stitch -> block -> head, marked with the ``_surgery_role`` convention."""
    torch.manual_seed(seed)
    parts = {
        "block": nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        "stitch": nn.Conv2d(8, 6, 1),
        "block2": nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        "head": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES)),
    }
    for name, role in (("block", "block"), ("stitch", "stitch"), ("block2", "block"), ("head", "head")):
        setattr(parts[name], ROLE_ATTR, role)
    return nn.Sequential(*parts.values())


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=32, lr=3e-3, warmup_epochs=0.5, log_every=0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_decreases_and_beats_chance():
    data, val = make_data(256, 0), make_data(128, 1)
    model = conv_net()
    res = train(model, data, DataLoader(val, batch_size=64), cfg(epochs=4, label_smoothing=0.0), quiet=True)
    assert len(res.history) == 4
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.best_val_acc > 0.6  # chance is 0.25
    assert res.last_val_acc == res.history[-1]["val_acc"]
    assert res.checkpoint is None and res.ema_model is None


def test_freeze_blocks_keeps_blocks_and_their_bn_stats():
    model = stitched_net()
    blocks, stitch, head = model[0], model[1], model[3]
    before = {name: snapshot(m) for name, m in (("b1", model[0]), ("b2", model[2]), ("s", stitch), ("h", head))}
    train(model, make_data(128), None, cfg(freeze="blocks"), quiet=True)
    for name, m in (("b1", blocks), ("b2", model[2])):
        after = m.state_dict()
        for k, v in before[name].items():  # weights and BN running stats bit-identical
            assert torch.equal(after[k], v), (name, k)
    assert not torch.equal(stitch.weight, before["s"]["weight"])
    assert not torch.equal(head[2].weight, before["h"]["2.weight"])
    # requires_grad is restored, so a later FT run trains everything
    assert all(p.requires_grad for p in model.parameters())


def test_select_trainable_conventions():
    model = stitched_net()
    chosen = {id(p) for p in select_trainable(model, "blocks")}
    assert chosen == {id(p) for p in list(model[1].parameters()) + list(model[3].parameters())}
    with pytest.raises(SurgeryError, match="no module"):
        select_trainable(conv_net(), "blocks")

    class WithMethod(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def trainable_parameters(self, freeze):
            return self.b.parameters()

    m = WithMethod()
    assert {id(p) for p in select_trainable(m, "blocks")} == {id(p) for p in m.b.parameters()}
    # explicit override wins; its frozen remainder keeps BN in eval (incubation's frozen meta stages)
    net = conv_net()
    head_only = list(net[6].parameters())
    before = snapshot(net[1])
    train(net, make_data(64), None, cfg(epochs=1), trainable=head_only, quiet=True)
    for k, v in before.items():
        assert torch.equal(net[1].state_dict()[k], v)


@pytest.mark.parametrize("loader_kind", ["dataloader", "dataset"])
def test_resume_equals_uninterrupted(tmp_path, loader_kind):
    data, val = make_data(128, 0), DataLoader(make_data(64, 1), batch_size=64)
    config = cfg(ema=True, ema_decay=0.8, grad_clip=1.0, log_every=1)

    def source(crash_after=None):
        ds = CrashingData(data, crash_after)
        # plain DataLoader shuffles from the global RNG; a Dataset gets our own seeded generator
        return DataLoader(ds, batch_size=32, shuffle=True) if loader_kind == "dataloader" else ds

    full = conv_net(seed=0, dropout=0.3)
    ref = train(full, source(), val, config, out_dir=tmp_path / "full", quiet=True)

    crashed = conv_net(seed=0, dropout=0.3)
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies in epoch 2, after epoch 1's checkpoint
        train(crashed, source(crash_after=128 + 40), val, config, out_dir=tmp_path / "part", quiet=True)
    resumed = conv_net(seed=7, dropout=0.3)  # different init: weights must come from the checkpoint
    res = train(resumed, source(), val, config, out_dir=tmp_path / "part", resume=True, quiet=True)

    for k, v in full.state_dict().items():
        assert torch.allclose(resumed.state_dict()[k].float(), v.float(), atol=1e-6), k
    for k, v in ref.ema_model.state_dict().items():
        assert torch.allclose(res.ema_model.state_dict()[k].float(), v.float(), atol=1e-6), k
    assert [h["train_loss"] for h in res.history] == pytest.approx([h["train_loss"] for h in ref.history])
    # the crashed epoch's step lines were dropped: the log matches the uninterrupted one line for line
    lines = [json.loads(s) for s in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(s) for s in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    def key(r):
        return r["type"], r["epoch"], r["step"]

    assert [key(r) for r in lines] == [key(r) for r in ref_lines]


def test_metrics_and_checkpoint_files(tmp_path):
    model = conv_net()
    res = train(model, make_data(128), DataLoader(make_data(64, 1), batch_size=32), cfg(epochs=3, log_every=2),
                out_dir=tmp_path, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    steps = [r for r in records if r["type"] == "step"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert all(set(r) == set(EPOCH_KEYS) for r in epochs)
    assert all(set(r) == set(STEP_KEYS) for r in steps) and len(steps) == 3 * 2  # 4 steps/epoch, every 2
    assert epochs == res.history
    ckpt = tmp_path / "checkpoint"
    assert res.checkpoint == ckpt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.jsonl"]  # no tmp/old left
    weights = load_file(ckpt / "model.safetensors")
    assert set(weights) == set(model.state_dict())
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 3 and state["step"] == 12
    fresh = conv_net()
    opt = torch.optim.AdamW(_param_groups(fresh, list(fresh.parameters()), 0.05, 1e-3))
    opt.load_state_dict(state["optimizer"])  # the optimizer state round-trips through weights_only
    assert len(opt.state) == len(list(fresh.parameters()))


def test_schedule_matches_formula():
    config = TrainConfig(epochs=3, lr=1e-2, min_lr=1e-4, warmup_epochs=0.5)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=config.lr)
    sched = build_scheduler(opt, config, steps_per_epoch=10)  # 30 steps, 5 of warm-up
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    def expected(s):
        if s < 5:
            return 1e-2 * (s + 1) / 5
        return 1e-4 + (1e-2 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (s - 5) / 25))

    for s in (0, 2, 4, 5, 6, 17, 29):
        assert lrs[s] == pytest.approx(expected(s), rel=1e-9)
    assert lrs[4] == pytest.approx(1e-2) and max(lrs) == pytest.approx(1e-2)
    # warmup_steps overrides warmup_epochs
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-2)
    build_scheduler(opt2, TrainConfig(epochs=1, lr=1e-2, warmup_steps=4), steps_per_epoch=10)
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)


def test_ema_differs_evaluates_and_fallback_matches(monkeypatch):
    data, val = make_data(128), DataLoader(make_data(64, 1), batch_size=32)
    model = conv_net()
    res = train(model, data, val, cfg(ema=True, ema_decay=0.9), quiet=True)
    ema = res.ema_model
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters(), strict=True))
    ev = evaluate(ema, val)
    assert set(ev) == {"top1", "loss", "n", "images_per_s"} and ev["n"] == 64 and 0 <= ev["top1"] <= 1
    assert res.history[-1]["ema_val_acc"] == pytest.approx(ev["top1"])
    assert res.best_ema_val_acc is not None

    import timm.utils

    warm = train(conv_net(), data, val, cfg(ema=True, ema_decay=0.99, ema_warmup=True), quiet=True).ema_model
    monkeypatch.delattr(timm.utils, "ModelEmaV3")  # our own EMA must follow the same rule
    for config, reference in ((cfg(ema=True, ema_decay=0.9), ema),
                              (cfg(ema=True, ema_decay=0.99, ema_warmup=True), warm)):
        own = train(conv_net(), data, val, config, quiet=True).ema_model
        for a, b in zip(own.state_dict().values(), reference.state_dict().values(), strict=True):
            assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_plain_lines_when_not_a_terminal(capsys):
    train(conv_net(), make_data(128), DataLoader(make_data(64, 1), batch_size=64), cfg(log_every=2))
    out = capsys.readouterr().out
    assert "epoch 1/2 step 2/4 loss" in out and "epoch 2/2 train_loss" in out and "val_acc" in out
    assert "\x1b[" not in out  # no terminal control codes in a log file
    train(conv_net(), make_data(64), None, cfg(epochs=1, log_every=1), quiet=True)
    assert capsys.readouterr().out == ""


def test_timm_resnet_channels_last_checkpoint(tmp_path):
    resnet = timm.create_model("test_resnet", pretrained=False, num_classes=CLASSES)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=CLASSES, img_size=32)
    assert _wants_channels_last(resnet) and not _wants_channels_last(vit)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (32,), generator=g))
    res = train(resnet, data, DataLoader(data, batch_size=16), cfg(epochs=1, batch_size=16), out_dir=tmp_path,
                quiet=True)
    assert resnet.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert set(load_file(res.checkpoint / "model.safetensors")) == set(resnet.state_dict())


def test_fresh_run_replaces_old_run(tmp_path):
    train(conv_net(), make_data(64), None, cfg(epochs=2), out_dir=tmp_path, quiet=True)
    (tmp_path / "checkpoint.old").mkdir()  # debris of an earlier crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(conv_net(), CrashingData(make_data(64), 10), None, cfg(epochs=2), out_dir=tmp_path, quiet=True)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoint").exists()
    with pytest.raises(SurgeryError, match="nothing to resume"):
        train(conv_net(), make_data(64), None, cfg(epochs=2), out_dir=tmp_path, resume=True, quiet=True)


def test_bad_input_raises_surgery_error(tmp_path):
    with pytest.raises(SurgeryError, match="nothing to resume"):
        train(conv_net(), make_data(64), None, cfg(), out_dir=tmp_path, resume=True, quiet=True)
    with pytest.raises(SurgeryError, match="bad training config"):
        train(conv_net(), make_data(64), None, {"epochs": 0}, quiet=True)
    with pytest.raises(SurgeryError, match="bad training config"):
        train(conv_net(), make_data(64), None, {"lr": 1e-3, "min_lr": 1e-2}, quiet=True)
    with pytest.raises(SurgeryError, match="CUDA"):
        if torch.cuda.is_available():
            raise SurgeryError("CUDA present: skip the check")
        train(conv_net(), make_data(64), None, cfg(device="cuda"), quiet=True)


def test_finetune_and_evaluate_refuse_data_with_other_classes():
    """A digits model must not be fine-tuned or evaluated on another 10-class set (names differ)."""
    from surgery.errors import SurgeryError
    from surgery.training.finetune import check_classes

    recipe = {"num_classes": 10, "classes": [str(i) for i in range(10)], "target": "digits"}
    check_classes(recipe, "digits:per_class=20", [str(i) for i in range(10)])  # same classes: fine
    check_classes({"num_classes": 10}, "anything", list("abcdefghij"))  # older folders record no names
    with pytest.raises(SurgeryError, match="not the ones the model was made for"):
        check_classes(recipe, "fashion-mnist", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                                "Shirt", "Sneaker", "Bag", "Ankle boot"])
    with pytest.raises(SurgeryError, match="has 5 classes"):
        check_classes(recipe, "digits:classes=0-4", [str(i) for i in range(5)])


# ---------------------------------------------------------------------------- forward-and-loss tasks


def test_default_task_is_the_explicit_classification_task():
    from surgery.training.loop import classification_task

    a, b = conv_net(), conv_net()
    ra = train(a, make_data(), make_data(64, seed=1), cfg(), quiet=True)
    rb = train(b, make_data(), make_data(64, seed=1), cfg(), quiet=True, task=classification_task(0.1))
    assert ra.history[-1]["train_loss"] == rb.history[-1]["train_loss"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_task_with_a_frozen_teacher_and_extra_terms(tmp_path):
    """m2mKD-style distillation as a task: 0.5 CE + 0.5 KL to a frozen teacher; both terms logged."""
    teacher = conv_net(seed=5).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_before = snapshot(teacher)

    class Distill(nn.Module):
        def __init__(self):
            super().__init__()
            self.teacher = teacher

        def forward(self, model, x, y):
            logits = model(x)
            with torch.no_grad():
                target = self.teacher(x).log_softmax(-1)
            ce = nn.functional.cross_entropy(logits, y)
            kl = nn.functional.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
            return {"loss": 0.5 * ce + 0.5 * kl, "output": logits, "ce": ce, "kl": kl}

    student = conv_net()
    result = train(student, make_data(), make_data(64, seed=1), cfg(), out_dir=tmp_path, task=Distill(), quiet=True)
    last = result.history[-1]
    assert {"train_ce", "train_kl"} <= set(last) and last["train_kl"] >= 0
    assert last["train_loss"] == pytest.approx(0.5 * last["train_ce"] + 0.5 * last["train_kl"], rel=1e-5)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["train_kl"] == last["train_kl"]
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    # a task without a loss is refused in one line
    with pytest.raises(SurgeryError, match="must return a dict with a tensor 'loss'"):
        train(conv_net(), make_data(), None, cfg(epochs=1), task=lambda m, x, y: {"output": m(x)}, quiet=True)


def test_a_task_without_logits_trains_and_reports_no_accuracy():
    model = conv_net()
    result = train(model, make_data(), None, cfg(epochs=1),
                   task=lambda m, x, y: {"loss": nn.functional.cross_entropy(m(x), y)}, quiet=True)
    assert result.history[-1]["train_acc"] is None and math.isfinite(result.history[-1]["train_loss"])


def test_schedule_windows_continue_one_schedule():
    """Consecutive runs that are windows of one schedule (growth stages) get one run's learning rates."""
    data = make_data(64)
    base = {"lr": 1e-2, "min_lr": 1e-4, "warmup_epochs": 1, "log_every": 0}
    whole = train(conv_net(), data, None, cfg(**base, epochs=4), quiet=True)
    first = train(conv_net(), data, None, cfg(**base, epochs=2, schedule_epochs=4), quiet=True)
    second = train(conv_net(), data, None, cfg(**base, epochs=2, schedule_epochs=4, schedule_start_epoch=2),
                   quiet=True)
    lrs = [h["lr"] for h in first.history + second.history]
    assert lrs == pytest.approx([h["lr"] for h in whole.history])
    with pytest.raises(SurgeryError, match="run past schedule_epochs"):
        train(conv_net(), data, None, {**base, "epochs": 3, "schedule_epochs": 4, "schedule_start_epoch": 2},
              quiet=True)
