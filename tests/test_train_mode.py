"""Blocks in train mode behave like their source model in train mode (issue 9, "Tracing").

The graph is traced once in eval mode; without care, code reading ``self.training`` is frozen in its eval
branch and the blocks lose stochastic depth, attention dropout and head dropout in ``train()``. Each case
below dissects a small random-init model with those regularisers switched on and checks, in train mode,
that chained blocks give exactly the model's output for the same random seed (same random ops in the
same order), that two seeds give different outputs, and that eval mode still reproduces the model.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from surgery.cuts import group_runs
from surgery.dissection import dissect
from surgery.tracing import follow_mode, reads_training, trace_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these models are tiny: on a shared machine, extra intra-op threads only add contention
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# small configs of the families the training methods fine-tune; each dissects in about a second
TIMM_CASES = {
    # the case: stochastic depth only (timm DropPath inside each transformer block)
    "vit_drop_path": ("vit_tiny_patch16_224", dict(drop_path_rate=0.5), 32),
    # attention dropout baked as dropout_p=0. when traced in eval, and head dropout
    "vit_all_dropouts": ("vit_tiny_patch16_224", dict(drop_path_rate=0.3, attn_drop_rate=0.3, proj_drop_rate=0.2,
                                                      drop_rate=0.5), 32),
    # root-level F.dropout in forward_head, and nothing else stochastic
    "resnet_head_dropout": ("test_resnet", dict(drop_rate=0.5), 64),
    "resnet_drop_path": ("test_resnet", dict(drop_rate=0.3, drop_path_rate=0.3), 64),
    "efficientnet": ("test_efficientnet", dict(drop_rate=0.3, drop_path_rate=0.3), 64),
    # layer scale starts at 1e-6, which would hide what drop path does to the residual branches
    "convnext": ("test_convnext", dict(drop_rate=0.3, drop_path_rate=0.3, ls_init_value=1.0), 64),
}
VIT_SMALL = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)


def _timm_model(arch: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    extra = VIT_SMALL if arch.startswith("vit") else {}
    return timm.create_model(arch, pretrained=False, num_classes=10, **extra, **kwargs).eval()


def _set_mode(model: nn.Module, blocks, train: bool) -> None:
    model.train(train)
    for block in blocks:
        block.train(train)


def _run(fn, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return fn(x)


def _assert_train_mode_matches(model: nn.Module, size: int, batch: int = 4) -> None:
    d = dissect(model, (3, size, size), name=type(model).__name__)
    assert len(d.blocks) >= 3
    x = torch.randn(batch, 3, size, size)
    _set_mode(model, d.blocks, True)
    expected = _run(model, x, seed=1)
    got = _run(d.run_blocks, x, seed=1)
    torch.testing.assert_close(got, expected)
    # stochastic: another seed gives another output (the model's own, and the chain's)
    other = _run(d.run_blocks, x, seed=2)
    assert not torch.allclose(other, got, atol=1e-4)
    torch.testing.assert_close(other, _run(model, x, seed=2))
    _set_mode(model, d.blocks, False)
    with torch.no_grad():
        torch.testing.assert_close(d.run_blocks(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(_run(d.run_blocks, x, 1), _run(d.run_blocks, x, 2))  # eval: deterministic


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_blocks_follow_train_mode(case):
    arch, kwargs, size = TIMM_CASES[case]
    _assert_train_mode_matches(_timm_model(arch, kwargs), size)


def test_torchvision_stochastic_depth():
    # torchvision's EfficientNet class with a three-stage MBConv setting (efficientnet_b0 is slow on CPU)
    from torchvision.models.efficientnet import MBConvConfig

    setting = [MBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(4, 3, 2, 16, 24, 2), MBConvConfig(4, 5, 2, 24, 32, 2)]
    torch.manual_seed(0)
    model = torchvision.models.EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.5, num_classes=10).eval()
    _assert_train_mode_matches(model, 32)


@pytest.mark.slow
def test_torchvision_efficientnet_b0():
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(weights=None, stochastic_depth_prob=0.5, num_classes=10).eval()
    _assert_train_mode_matches(model, 32)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["swin_t", "convnext_tiny"])
def test_torchvision_transformer_and_convnext(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, torchvision.ops.StochasticDepth):
            m.p = 0.5
        if hasattr(m, "attention_dropout"):  # swin_t's ShiftedWindowAttention passes training=self.training
            m.attention_dropout = 0.3
        if hasattr(m, "layer_scale"):  # 1e-6 at init would hide what stochastic depth does
            nn.init.constant_(m.layer_scale, 1.0)
    _assert_train_mode_matches(model, 64, batch=2)


def test_leaves_keep_cut_points():
    # DropPath and Attention become leaves; the cut after every transformer block stays
    model = _timm_model(*TIMM_CASES["vit_all_dropouts"][:2])
    d = dissect(model, (3, 32, 32), name="vit")
    assert len(d.blocks) == len(model.blocks) + 2


def test_dissect_leaves_model_modes_alone():
    model = _timm_model(*TIMM_CASES["vit_all_dropouts"][:2]).train()
    d = dissect(model, (3, 32, 32), name="vit")
    assert all(m.training for m in model.modules())  # a shared leaf flipped to eval would drop its dropout
    assert all(b.training for b in d.blocks)  # blocks start in the model's mode
    model.eval()
    d = dissect(model, (3, 32, 32), name="vit", verify=True)
    assert not any(m.training for m in model.modules()) and not any(b.training for b in d.blocks)


# --- the two rules, on hand-written modules ---------------------------------------------------------

class _NoiseHelper(nn.Module):
    def forward(self, x):
        return x + self._noise(x)

    def _noise(self, x):  # the mode is read in a helper, not in forward
        return torch.randn_like(x) if self.training else torch.zeros_like(x)


class _CopiesFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fc.train(self.training)

    def reset(self):
        self.fc.train(self.training)  # only passes the flag on: behaviour does not depend on it

    def forward(self, x):
        return self.fc(x)


class _SubclassedNorm(nn.BatchNorm1d):  # outside torch.nn: fx would inline it with training=False
    pass


class _RootDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _CopiesFlag(), nn.Linear(4, 4)

    def forward(self, x):
        x = F.dropout(self.a(x), p=0.5, training=self.training)
        x = torch.dropout(x, 0.25, self.training)
        return self.b(F.dropout(x, p=0.1, training=True))  # always on: left as it is


def test_reads_training():
    assert reads_training(_NoiseHelper)
    assert reads_training(_SubclassedNorm)
    assert not reads_training(_CopiesFlag)
    assert not reads_training(nn.Linear) and not reads_training(nn.Sequential)


def test_root_dropout_is_rewritten_into_modules():
    model = _RootDropout().eval()
    gm = trace_model(model, "root_dropout")
    drops = [m for m in gm.modules() if isinstance(m, nn.Dropout)]
    assert sorted(m.p for m in drops) == [0.25, 0.5]
    assert not follow_mode(gm)  # already rewritten: nothing left to do
    x = torch.randn(8, 4)
    model.train()
    gm.train()
    torch.testing.assert_close(_run(gm, x, 3), _run(model, x, 3))
    model.eval()
    gm.eval()
    torch.testing.assert_close(_run(gm, x, 3), _run(model, x, 3))  # the literal training=True dropout stays on


def test_whole_module_leaf_starts_its_own_run():
    # LeViT's attention downsample, a leaf for its train-mode behaviour, is one node right after the cut
    # that ends the previous stage; traced through it had inner nodes, so the two cuts were two places
    is_compute = [True] * 6
    assert group_runs([2, 3], is_compute) == [[2, 3]]
    assert group_runs([2, 3], is_compute, starts_run=[False, False, False, True, False, False]) == [[2], [3]]
