"""Growth operators: repeated blocks found generically, AutoProg's depth map, function-preserving growth."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.training.growth import depth_map, find_block_groups, grow_depth, grown_parameters, zero_residual

# (timm name, kwargs, input side, expected (container, start, length) groups)
CASES = [
    ("test_vit", {}, 160, [("blocks", 0, 6)]),
    ("test_convnext", {}, 64, [("stages.1.blocks", 0, 2), ("stages.2.blocks", 0, 4), ("stages.3.blocks", 0, 2)]),
    ("resnet18", {"layers": (3, 3, 3, 3), "channels": (8, 16, 32, 64)}, 64,
     [("layer1", 1, 2), ("layer2", 1, 2), ("layer3", 1, 2), ("layer4", 1, 2)]),
    ("pvt_v2_b0", {"depths": (2, 2, 1, 1)}, 64, [("stages.0.blocks", 0, 2), ("stages.1.blocks", 0, 2)]),
    ("swin_tiny_patch4_window7_224", {"depths": (2, 2, 2, 2), "embed_dim": 24, "num_heads": (1, 2, 2, 4),
                                      "img_size": 64, "window_size": 4}, 64,
     [("layers.0.blocks", 0, 2), ("layers.1.blocks", 0, 2), ("layers.2.blocks", 0, 2), ("layers.3.blocks", 0, 2)]),
]


def _trained_like(model: nn.Module) -> nn.Module:
    """Non-trivial norm statistics and affine terms, as after training (zero-init biases would hide bugs)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("name,kwargs,size,expected", CASES, ids=[c[0] for c in CASES])
def test_zero_initialised_growth_preserves_the_function(name, kwargs, size, expected):
    torch.manual_seed(0)
    model = _trained_like(timm.create_model(name, num_classes=10, **kwargs))
    x = torch.randn(2, 3, size, size)
    groups = find_block_groups(model, x)
    assert [(g.container, g.start, g.length) for g in groups] == expected
    before = model(x)
    params = sum(p.numel() for p in model.parameters())
    expected_params = params
    for g in groups:
        new = g.length * 2
        expected_params = grown_parameters(expected_params, g, new)
        plan = grow_depth(model, g, new, init="zero")
        assert [src for _, src, _ in plan] == depth_map(g.length, new)
    assert sum(p.numel() for p in model.parameters()) == expected_params > params
    assert torch.allclose(model.eval()(x), before, atol=1e-5)  # grown, same outputs
    regrouped = find_block_groups(model, x)
    assert [g.length for g in regrouped] == [2 * g.length for g in groups]


def test_copy_growth_keeps_the_original_modules_and_adds_copies():
    model = timm.create_model("test_vit", num_classes=10).eval()
    x = torch.randn(1, 3, 160, 160)
    (group,) = find_block_groups(model, x)
    originals = list(model.blocks)
    plan = grow_depth(model, group, 9, init="copy")
    assert len(model.blocks) == 9
    assert [src for _, src, _ in plan] == [0, 1, 2, 3, 3, 4, 4, 5, 5]
    kept = [model.blocks[k] for k, _, new in plan if not new]
    assert kept == originals  # the same modules: their parameters (and optimizer state) carry over
    for k, src, new in plan:
        if new:
            assert model.blocks[k] is not originals[src]
            assert all(torch.equal(a, b) for a, b in zip(model.blocks[k].parameters(), originals[src].parameters(),
                                                         strict=True))


def test_depth_maps():
    assert depth_map(10, 14) == [0, 1, 2, 3, 4, 5, 6, 6, 7, 7, 8, 8, 9, 9]  # AutoProg: the last blocks doubled
    assert depth_map(7, 14) == [i // 2 for i in range(14)]
    assert depth_map(2, 7) == [0, 0, 0, 1, 1, 1, 1]
    assert depth_map(3, 7, "stack") == [0, 1, 2, 0, 1, 2, 0]
    assert depth_map(4, 4) == [0, 1, 2, 3]
    with pytest.raises(SurgeryError, match="only grow"):
        depth_map(4, 3)
    with pytest.raises(SurgeryError, match="unknown growth mode"):
        depth_map(2, 4, "shuffle")


def test_random_growth_and_refusals():
    model = timm.create_model("test_vit", num_classes=10).eval()
    x = torch.randn(1, 3, 160, 160)
    (group,) = find_block_groups(model, x)
    plan = grow_depth(model, group, 7, init="random")
    k, src, _ = next(p for p in plan if p[2])
    assert not torch.equal(model.blocks[k].attn.qkv.weight, model.blocks[k - 1].attn.qkv.weight)
    with pytest.raises(SurgeryError, match="no longer has"):
        grow_depth(model, group, 8)  # the group describes the model before growth
    with pytest.raises(SurgeryError, match="no known residual branch"):
        zero_residual(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert find_block_groups(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)), torch.randn(2, 4)) == []


def test_mogrow_copies_the_ema_into_inherited_and_duplicated_blocks():
    from surgery.training.growth import mogrow, renamed_parameters

    model = timm.create_model("test_vit", num_classes=10).eval()
    x = torch.randn(1, 3, 160, 160)
    ema = {k: v + 0.5 for k, v in model.state_dict().items()}  # an EMA that differs from the live weights
    (group,) = find_block_groups(model, x)
    plan = grow_depth(model, group, 9, init="copy")
    renames = renamed_parameters(group, plan)
    mogrow(model, ema, renames)
    for k, src, _ in plan:
        for name, value in model.blocks[k].state_dict().items():
            assert torch.equal(value, ema[f"blocks.{src}.{name}"]), (k, name)
    assert torch.equal(model.head.weight, ema["head.weight"])  # outside the run: the same names
    with pytest.raises(SurgeryError, match="no EMA value"):
        mogrow(model, {k: v for k, v in ema.items() if not k.startswith("head.")}, renames)


def test_optimizer_moments_follow_the_parameters_they_belong_to():
    from surgery.training.growth import carry_optimizer_state, renamed_parameters

    model = timm.create_model("resnet18", num_classes=10, layers=(1, 3, 1, 1), channels=(8, 16, 32, 64))
    x = torch.randn(2, 3, 64, 64)
    old_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(x).square().mean().backward()
    old_opt.step()
    old_names = {id(p): n for n, p in model.named_parameters()}
    before = {n: {k: v.clone() for k, v in old_opt.state[p].items()} for n, p in model.named_parameters()}
    (group,) = [g for g in find_block_groups(model, x) if g.container == "layer2"]
    assert (group.start, group.length) == (1, 2)
    plan = grow_depth(model, group, 4, init="copy")  # layer2: [b0, b1, b1', b2, b2']
    new_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    renames = renamed_parameters(group, plan)
    carried = carry_optimizer_state(old_opt, old_names, model, renames, new_opt)
    assert carried == sum(1 for _ in model.parameters())
    for name, param in model.named_parameters():
        src = name
        for new_prefix, old_prefix in renames.items():
            if name.startswith(new_prefix):
                src = old_prefix + name[len(new_prefix):]
                break
        assert torch.equal(new_opt.state[param]["exp_avg"], before[src]["exp_avg"]), name
        assert torch.equal(new_opt.state[param]["exp_avg_sq"], before[src]["exp_avg_sq"]), name
    assert renames["layer2.3."] == "layer2.2." and renames["layer2.2."] == "layer2.1."  # copies map to sources
    new_opt.step()  # the carried state has the right shapes


def test_resolution_growth_resamples_position_embeddings():
    from surgery.training.growth import set_resolution

    vit = timm.create_model("test_vit", num_classes=10).eval()
    set_resolution(vit, 96)
    assert vit(torch.randn(2, 3, 96, 96)).shape == (2, 10)
    assert vit.pos_embed.shape[1] == 1 + (96 // 16) ** 2
    set_resolution(vit, 160)
    assert vit(torch.randn(1, 3, 160, 160)).shape == (1, 10)
    with pytest.raises(SurgeryError, match="not a multiple of the patch size"):
        set_resolution(vit, 100)
    cnn = timm.create_model("test_convnext", num_classes=10).eval()
    set_resolution(cnn, 48)  # convolutions take any size
    assert cnn(torch.randn(1, 3, 48, 48)).shape == (1, 10)
    # CaiT has a fixed position embedding and no set_input_size: its own size is fine, another is refused
    cait = timm.create_model("cait_xxs24_224", img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=2).eval()
    set_resolution(cait, 32)
    assert cait(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    with pytest.raises(SurgeryError, match="cannot grow"):
        set_resolution(cait, 16)


def test_manual_schedule_ramps_depth_resolution_and_drop_path():
    from surgery.training.growth import manual_schedule

    stages = manual_schedule(100, 4, [12], 224, depth_start=0.5, resolution_start=0.6, multiple=16, drop_path=0.1)
    assert [s.depths for s in stages] == [(6,), (8,), (10,), (12,)]  # DeiT-12: 6/8/10/12, as AutoProg
    assert [s.resolution for s in stages] == [128, 160, 192, 224]  # multiples of the patch, full at the end
    assert [s.first_epoch for s in stages] == [0, 25, 50, 75] and sum(s.epochs for s in stages) == 100
    assert stages[0].drop_path == 0 and stages[-1].drop_path == pytest.approx(0.1)
    one = manual_schedule(5, 1, [4, 2], 32)
    assert one[0].depths == (4, 2) and one[0].resolution == 32
    with pytest.raises(SurgeryError, match="at least 4 epochs"):
        manual_schedule(3, 4, [12], 224)


def test_autoprog_choice_trades_loss_against_time():
    from surgery.training.growth import autoprog_choice

    # loss falling as a power of time with exponent -0.5: w = 0.5, L * T^0.5 is flat -> ties broken by noise;
    # make the biggest candidate clearly better than the law predicts: it wins
    times = [1.0, 2.0, 4.0]
    losses = [1.0, 2.0 ** -0.5, 4.0 ** -0.5 * 0.8]
    pick, fit = autoprog_choice(list(zip(losses, times, strict=True)))
    assert pick == 2 and 0.4 < fit["w"] < 0.8
    # the weight is the fitted slope: a candidate wins by lying below the loss-time trend
    cands = [(1.0, 1.0), (0.99, 2.0), (0.985, 4.0)]
    pick, fit = autoprog_choice(cands)
    assert fit["w"] == pytest.approx(-fit["b"]) and fit["w"] < 0.05
    scores = [loss * t ** fit["w"] for loss, t in cands]
    assert pick == scores.index(min(scores))
    # a loss that grows with time (b > 0): w = 0, the lowest loss wins
    pick, fit = autoprog_choice([(0.9, 1.0), (1.2, 2.0), (1.5, 3.0)])
    assert fit["w"] == 0 and pick == 0
    assert autoprog_choice([(0.5, 0.1)])[0] == 0
    with pytest.raises(SurgeryError, match="positive"):
        autoprog_choice([(0.0, 1.0), (1.0, 2.0)])
