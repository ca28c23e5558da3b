"""Tests of surgery.count: MACs match timm's published figures, attention is counted exactly once."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import timm
import torch

from surgery.count import count_macs, count_params

torch.set_num_threads(2)

# timm model-card GMACs at 224x224 (1 FLOP = 1 MAC), as printed (strings keep their precision)
PUBLISHED_GMACS = [
    ("resnet50", "4.1"),
    ("swin_tiny_patch4_window7_224", "4.5"),
    ("vit_small_patch16_224", "4.6"),
    ("convnext_tiny", "4.5"),
    ("efficientnet_b0", "0.4"),  # we count 0.386: within the card's rounding, 3.5% under the rounded figure
    ("mobilenetv3_large_100", "0.22"),
]


def _meta_model(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False).eval()


@pytest.mark.parametrize(("name", "gmacs"), PUBLISHED_GMACS)
def test_macs_match_published(name, gmacs):
    model = _meta_model(name)
    macs = count_macs(model, torch.randn(1, 3, 224, 224, device="meta"))
    # within 2%, or within the rounding of the printed figure (half a unit of its last digit)
    half_unit = 0.5 * 10.0 ** -len(gmacs.split(".")[1])
    assert macs / 1e9 == pytest.approx(float(gmacs), rel=0.02, abs=half_unit)


def test_cpu_attention_counted_once():
    # on CPU tensors timm's fused attention runs aten._scaled_dot_product_flash_attention_for_cpu; on
    # meta it takes the math path (bmm). Both must give the same count: counted, and counted once.
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    cpu = count_macs(model, torch.randn(1, 3, 224, 224))
    meta = count_macs(_meta_model("vit_tiny_patch16_224"), torch.randn(1, 3, 224, 224, device="meta"))
    assert cpu == meta
    # and the unfused path (explicit q @ k^T) agrees too
    for block in model.blocks:
        block.attn.fused_attn = False
    assert count_macs(model, torch.randn(1, 3, 224, 224)) == cpu
    attention = 12 * 2 * 197 * 197 * 192  # depth x (QK^T + AV) x N^2 x dim
    assert cpu > attention


def test_macs_scale_with_batch_and_params():
    model = _meta_model("resnet18")
    one = count_macs(model, torch.randn(1, 3, 224, 224, device="meta"))
    assert count_macs(model, torch.randn(4, 3, 224, 224, device="meta")) == 4 * one
    assert count_params(model) == 11_689_512


def test_shared_parameters_counted_once():
    lin = torch.nn.Linear(8, 8)
    tied = torch.nn.Sequential(lin, torch.nn.ReLU(), lin)
    assert count_params(tied) == 8 * 8 + 8


@pytest.mark.slow
def test_vit_huge_structure_only_memory():
    # a 632M-parameter model dissected on the meta device must not allocate its weights (2.5 GB)
    script = textwrap.dedent("""
        import resource, torch, timm
        from surgery.dissection import dissect
        torch.set_num_threads(1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.device("meta"):
            model = timm.create_model("vit_huge_patch14_224", pretrained=False)
        d = dissect(model, (3, 224, 224), name="vit_huge_patch14_224")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(after - before, len(d.blocks), d.params, d.macs)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    delta_kib, blocks, params, macs = (int(v) for v in out.stdout.split())
    assert delta_kib < 2 * 1024 * 1024
    assert blocks == 32 + 2
    assert params == pytest.approx(632e6, rel=0.01)
    assert macs / 1e9 == pytest.approx(167.4, rel=0.02)
