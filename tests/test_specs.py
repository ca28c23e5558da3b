"""Tensor specs are right or say "other": checked against the tensors that cross each cut.

Three oracles, none of them the spec inference itself:

* shape consistency: every spec agrees with the tensor at its cut (run at batch 2): maps have their
  channels and grid on the right dims, tokens ``C == last dim`` and ``prefix + prod(grid) == N``; a grid
  has the input's aspect ratio and ``stride == H // grid[0]``; pooled features have ``channels`` dims;
* resolution: the same architecture built at a second ``img_size`` has the same layout, channels and
  prefix tokens at every cut, and its grids grow (what changes with the resolution is the grid, never
  the channels: NesT's blockified ``(B, T, N, C)`` read as NCHW had ``T`` "channels");
* raster order: Hiera's own ``reroll`` says which token cuts are in raster order; only those may be
  ``NLC`` with a grid.

The fast tests use timm ``test_*`` models and small configs of the named families; the slow one
walks many real families at their default sizes.
"""

from __future__ import annotations

import pytest
import timm
import torch

from surgery.dissection import dissect
from surgery.features import pool_tensor
from surgery.spec import TensorSpec

_CACHE: dict[tuple, tuple] = {}


def dissected(arch: str, img: int | None = None, **kwargs):
    """(model, dissection, {cut name: tensor at batch 2}) of a random-init timm model, cached per module."""
    key = (arch, img, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        torch.manual_seed(0)
        if img is not None:
            kwargs["img_size"] = img
        model = timm.create_model(arch, pretrained=False, **kwargs).eval()
        size = (3, img, img) if img is not None else tuple(model.pretrained_cfg["input_size"])
        d = dissect(model, size, name=arch)
        names = [c.name for c in d.cut_points]
        blocks = d.split(names)
        tensors, x = {}, torch.randn(2, *size)
        with torch.no_grad():
            for name, block in zip(names, blocks, strict=False):
                x = block(x)
                tensors[name] = x
        _CACHE[key] = (model, d, tensors)
    return _CACHE[key]


def spec_problems(spec: TensorSpec, x: torch.Tensor, hw: tuple[int, int]) -> list[str]:
    """Ways in which ``spec`` misdescribes ``x`` (a batch of 2) for an ``hw`` input; empty when right."""
    out = [f"self-inconsistent: {p}" for p in spec.problems()]
    if spec.parts:  # two tensors cross (CrossViT, TNT, NASNet): a tuple, described as 'other', never stitched
        if not isinstance(x, tuple) or len(x) != spec.tensors:
            out.append(f"two-tensor spec {spec.parts} but the cut carries {type(x).__name__}")
        elif tuple(x[0].shape[1:]) != tuple(spec.shape[1:]):
            out.append(f"first tensor {tuple(x[0].shape)} is not the spec's shape {spec.shape} at batch 2")
        if spec.known:
            out.append("a two-tensor interface must not be offered for stitching")
        return out
    s = tuple(x.shape)
    if spec.layout in ("NCHW", "NHWC", "NLC", "NC") and (s[0] != 2 or s[1:] != tuple(spec.shape[1:])):
        out.append(f"tensor {s} is not the spec's shape {spec.shape} at batch 2")
    if spec.layout == "NCHW" and (s[1] != spec.channels or s[2:] != spec.grid):
        out.append(f"NCHW {s} vs channels {spec.channels} grid {spec.grid}")
    if spec.layout == "NHWC" and (s[3] != spec.channels or s[1:3] != spec.grid):
        out.append(f"NHWC {s} vs channels {spec.channels} grid {spec.grid}")
    if spec.layout == "NLC":
        if s[2] != spec.channels:
            out.append(f"NLC {s}: width {s[2]} != channels {spec.channels}")
        if spec.grid is not None and spec.prefix_tokens + spec.grid[0] * spec.grid[1] != s[1]:
            out.append(f"NLC {s}: {spec.prefix_tokens} prefix + grid {spec.grid} != {s[1]} tokens")
    if spec.grid is not None:
        (gh, gw), (h, w) = spec.grid, hw
        if 2 * abs(gh * w - gw * h) >= h + w or spec.stride != h // gh:
            out.append(f"grid {spec.grid} / stride {spec.stride} do not fit a {hw} input")
    if spec.channels and s[0] == 2:
        pooled = pool_tensor(x, spec.layout, spec.prefix_tokens, channels=spec.channels)
        if tuple(pooled.shape) != (2, spec.channels):
            out.append(f"pooled features {tuple(pooled.shape)} are not (2, {spec.channels})")
    return out


def check_specs(arch: str, img: int | None = None, **kwargs) -> None:
    _, d, tensors = dissected(arch, img, **kwargs)
    hw = d.input_size[1:]
    bad = {c.name: (c.spec, spec_problems(c.spec, tensors[c.name], hw)) for c in d.cut_points}
    bad = {k: v for k, v in bad.items() if v[1]}
    assert not bad, f"{arch}: {bad}"


def check_resolution(arch: str, img_a: int, img_b: int, **kwargs) -> None:
    """Same cuts at two input sizes: same layout, channels and prefix; larger grids at the larger size."""
    _, da, _ = dissected(arch, img_a, **kwargs)
    _, db, _ = dissected(arch, img_b, **kwargs)
    specs_b = {c.name: c.spec for c in db.cut_points}
    common = [c for c in da.cut_points if c.name in specs_b]
    assert len(common) >= len(da.cut_points) // 2
    for c in common:
        a, b = c.spec, specs_b[c.name]
        assert (a.layout, a.channels, a.prefix_tokens) == (b.layout, b.channels, b.prefix_tokens), (c.name, a, b)
        assert (a.grid is None) == (b.grid is None), (c.name, a, b)
        if a.grid is not None and a.grid != (1, 1):
            assert b.grid[0] > a.grid[0] and b.grid[1] > a.grid[1], (c.name, a, b)


FAST = [
    ("test_resnet", {}), ("test_vit", {}), ("test_vit3", {}), ("test_convnext", {}), ("test_efficientnet", {}),
    ("test_coatnet", {}), ("test_maxvit", {}),
    ("deit_tiny_distilled_patch16_224", {"depth": 2}),
    ("pit_ti_224", {"depth": (1, 1, 1)}),
    ("hiera_tiny_224", {"stages": (1, 1, 1, 1)}),
    ("cait_xxs24_224", {"depth": 2, "depth_token_only": 1}),
    ("vit_dwee_patch16_reg1_gap_256", {"depth": 2}),
]


@pytest.mark.parametrize("arch,kwargs", FAST, ids=[a for a, _ in FAST])
def test_specs_describe_their_tensors(arch, kwargs):
    check_specs(arch, **kwargs)


NEST_WIDTHS = (32, 64, 128)


def _small_nest(img: int):
    from timm.models.nest import Nest

    return Nest(img_size=img, embed_dims=NEST_WIDTHS, num_heads=(1, 2, 4), depths=(1, 1, 1)).eval()


def test_nest_blockified_tensors_are_not_maps():
    """NesT's (B, T, N, C) cuts: the number of blocks T follows the resolution, so it is no channel dim."""
    specs = {}
    for img in (224, 448):
        torch.manual_seed(0)
        model = _small_nest(img)
        d = dissect(model, (3, img, img), name="nest")
        names = [c.name for c in d.cut_points]
        x = torch.randn(2, 3, img, img)
        with torch.no_grad():
            for c, block in zip(d.cut_points, d.split(names), strict=False):
                x = block(x)
                assert not spec_problems(c.spec, x, (img, img)), (c.name, c.spec, spec_problems(c.spec, x, (img, img)))
        specs[img] = {c.name: c.spec for c in d.cut_points}
    for name, a in specs[224].items():
        b = specs[448][name]
        assert (a.layout, a.channels) == (b.layout, b.channels), (name, a, b)
        if len(a.shape) == 4:  # maps and blocks of tokens: features are the model's own widths
            assert a.channels in NEST_WIDTHS, (name, a)
    blocked = [s for s in specs[224].values()  # (B, T, N, C): neither dims 1-2 nor 2-3 a square grid
               if len(s.shape) == 4 and s.shape[1] != s.shape[2] and s.shape[2] != s.shape[3]]
    assert blocked and all(s.layout == "other" and s.grid is not None for s in blocked)


def test_pit_tokens_have_their_grid_and_class_token():
    """PiT's first stage: 1 class token + 27 x 27 patch tokens (a 16-wide, stride-8 conv at 224 px)."""
    model, d, tensors = dissected("pit_ti_224", depth=(1, 1, 1))
    maps = {c.spec.grid for c in d.cut_points if c.spec.layout == "NCHW"}
    tokens = [c.spec for c in d.cut_points if c.spec.layout == "NLC"]
    assert tokens
    for spec in tokens:
        assert spec.prefix_tokens == model.cls_token.shape[1]
        if spec.shape[1] > spec.prefix_tokens:  # patch tokens follow: their grid is known
            assert spec.grid is not None, spec
    assert {s.grid for s in tokens if s.channels == model.patch_embed.conv.out_channels} & maps


def test_distilled_deit_has_two_prefix_tokens():
    model, d, _ = dissected("deit_tiny_distilled_patch16_224", depth=2)
    grid = tuple(model.patch_embed.grid_size)
    with_prefix = [c.spec for c in d.cut_points if c.spec.layout == "NLC" and c.spec.prefix_tokens]
    assert with_prefix and all(s.prefix_tokens == 2 and s.grid == grid for s in with_prefix)


def test_hiera_tokens_are_nlc_only_where_in_raster_order():
    """Hiera's own reroll gives the spatial map at each stage end; a raster NLC claim must agree with it."""
    model, d, tensors = dissected("hiera_tiny_224", stages=(1, 1, 1, 1))
    outputs = {}
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, y, i=i: outputs.__setitem__(i, y))
             for i in model.stage_ends]
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        model(x)
        for h in hooks:
            h.remove()
        names = [c.name for c in d.cut_points]
        cut_out = {}
        for c, block in zip(d.cut_points, d.split(names), strict=False):
            x = block(x)
            cut_out[c.name] = (c.spec, x)
    checked = 0
    for i, y in outputs.items():
        match = [(spec, t) for spec, t in cut_out.values() if t.shape == y.shape and torch.equal(t, y)]
        spatial = model.reroll(y, i)  # (B, H, W, C) in raster order
        for spec, t in match:
            checked += 1
            raster = torch.equal(t.reshape(spatial.shape), spatial)
            if spec.layout == "NLC" and spec.grid is not None:
                assert raster, (i, spec)
            if not raster:
                assert spec.layout == "other", (i, spec)
    assert checked >= 2


def test_pooled_unknown_tensors_keep_their_feature_dim():
    x = torch.randn(3, 4, 10, 7)  # blockified (B, T, N, C)
    assert pool_tensor(x, "other", channels=7).shape == (3, 7)
    torch.testing.assert_close(pool_tensor(x, "other", channels=7), x.mean(dim=(1, 2)))
    assert pool_tensor(x, "other", channels=4).shape == (3, 4)  # channels first


SLOW = ["deit_tiny_distilled_patch16_224", "vit_small_patch14_reg4_dinov2", "vit_dwee_patch16_reg1_gap_256",
        "pit_ti_224", "pit_ti_distilled_224", "nest_tiny", "cait_xxs24_224", "xcit_nano_12_p16_224", "volo_d1_224",
        "convit_tiny", "levit_128s", "hiera_tiny_224", "mobilevit_xxs", "efficientformer_l1", "tnt_s_patch16_224",
        "swin_tiny_patch4_window7_224", "pvt_v2_b0", "twins_svt_small", "mixer_s32_224", "coat_lite_tiny",
        "mvitv2_small_cls", "beit_base_patch16_224", "tiny_vit_5m_224", "gcvit_xxtiny"]
# families that take img_size: the resolution oracle at 224 and 288 (a multiple of every patch size)
RESIZE = ["deit_tiny_distilled_patch16_224", "pit_ti_224", "cait_xxs24_224", "convit_tiny", "levit_128s",
          "swin_tiny_patch4_window7_224", "mixer_s32_224", "tnt_s_patch16_224", "volo_d1_224"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", SLOW)
def test_real_families_specs_describe_their_tensors(arch):
    check_specs(arch)
    if arch in RESIZE:
        check_resolution(arch, 224, 288)
    _CACHE.clear()  # real models are large: keep one at a time
