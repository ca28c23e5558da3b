"""Stitches: layouts, resampling, least-squares fit, cost, export, token context, head."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch.utils.flop_counter import FlopCounterMode

from surgery.errors import SurgeryError
from surgery.spec import TensorSpec
from surgery.stitch import (
    Stitch,
    StitchError,
    TokenContext,
    fit_linear_head,
    fit_stitch,
    make_head,
    make_stitch,
    stitch_cost,
    token_context_from_timm,
)


def nchw(c, h, w=None):
    w = w or h
    return TensorSpec("NCHW", c, (h, w), shape=(1, c, h, w))


def nhwc(c, h, w=None):
    w = w or h
    return TensorSpec("NHWC", c, (h, w), shape=(1, h, w, c))


def nlc(c, h, w=None, prefix=0):
    w = w or h
    return TensorSpec("NLC", c, (h, w), prefix_tokens=prefix, shape=(1, prefix + h * w, c))


def nc(c):
    return TensorSpec("NC", c, shape=(1, c))


def example(spec: TensorSpec, batch: int) -> torch.Tensor:
    return torch.randn(batch, *spec.shape[1:])


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False).eval()  # 160px, 10x10 grid, 64 wide, 1 cls


@pytest.fixture(scope="module")
def ctx(vit):
    return token_context_from_timm(vit)


def ctx_spec(vit, h=10, w=None):
    return nlc(vit.embed_dim, h, w, prefix=vit.num_prefix_tokens)


# (donor spec, receiver spec, needs the ViT token context)
CASES = {
    "nchw_to_nlc_prefix": (nchw(32, 14), None, True),  # receiver filled in from the ViT below
    "nlc_to_nchw_up": (nlc(64, 7, prefix=1), nchw(32, 14), False),
    "nhwc_to_nchw": (nhwc(48, 7), nchw(96, 7), False),
    "nchw_to_nchw_pool": (nchw(16, 8), nchw(24, 4), False),
    "nchw_to_nchw_bilinear": (nchw(16, 6), nchw(24, 4), False),
    "nchw_to_nhwc_rect": (nchw(8, 6, 4), nhwc(12, 3, 2), False),
    "nlc_to_nlc_carry_prefix": (nlc(40, 8, prefix=1), nlc(64, 4, prefix=1), False),
    "nhwc_to_nlc": (nhwc(20, 5), nlc(28, 5), False),
    "nc_to_nc": (nc(10), nc(7), False),
    # tokens of unknown grid go token for token into as many tokens (never into a map: see below)
    "nlc_no_grid_token_for_token": (TensorSpec("NLC", 16, None, prefix_tokens=1, shape=(1, 8, 16)),
                                    TensorSpec("NLC", 24, None, prefix_tokens=1, shape=(1, 8, 24)), False),
}


def build(name, vit, ctx):
    donor, receiver, needs_ctx = CASES[name]
    if needs_ctx:
        return make_stitch(donor, ctx_spec(vit), token_context=ctx)
    return make_stitch(donor, receiver)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape_matches_receiver(name, batch, vit, ctx):
    torch.manual_seed(0)
    stitch = build(name, vit, ctx)
    y = stitch(example(stitch.out_spec, batch))
    assert tuple(y.shape) == (batch, *stitch.in_spec.shape[1:])


@pytest.mark.parametrize("name", sorted(CASES))
def test_cost_matches_flop_counter_and_numel(name, vit, ctx):
    stitch = build(name, vit, ctx)
    batch = 3
    with FlopCounterMode(display=False) as counter:
        stitch(example(stitch.out_spec, batch))
    params, macs = stitch.cost(batch_size=batch)
    counted = counter.get_total_flops() / 2
    assert macs == pytest.approx(counted, rel=0.01)
    assert params == sum(p.numel() for p in stitch.parameters())
    ctx_arg = ctx if CASES[name][2] else False
    assert stitch_cost(stitch.out_spec, stitch.in_spec, token_context=ctx_arg, batch_size=batch) == (params, macs)
    if CASES[name][2]:  # the plain-data form the solver uses, without the model at hand
        assert stitch_cost(stitch.out_spec, stitch.in_spec, token_context=True, batch_size=batch) == (params, macs)


def test_projection_runs_on_the_smaller_grid():
    up = make_stitch(nchw(8, 4), nchw(16, 8))
    down = make_stitch(nchw(8, 8), nchw(16, 4))
    assert up.cost()[1] == down.cost()[1] == 16 * 8 * 16


def test_identity_stitch_is_a_noop():
    for spec in (nchw(16, 7), nlc(32, 4, prefix=1), nc(5)):
        stitch = make_stitch(spec, spec)
        x = example(spec, 2)
        assert stitch.is_identity
        assert stitch.cost(batch_size=4) == (0, 0)
        assert not list(stitch.parameters())
        assert torch.equal(stitch(x), x)
    # Same specs but different models: ask for a projection explicitly.
    assert make_stitch(nchw(16, 7), nchw(16, 7), project=True).cost()[0] == 16 * 16 + 16


def _affine(x_rows, c_out, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(x_rows.shape[1], c_out, generator=g)
    b = torch.randn(c_out, generator=g)
    return x_rows @ a + b


@pytest.mark.parametrize("layouts", ["nchw", "nlc", "nhwc_to_nlc", "nchw_pool", "nlc_up", "nlc_carry_prefix"])
def test_least_squares_recovers_a_linear_map(layouts):
    torch.manual_seed(0)
    b = 6
    if layouts == "nchw":
        donor_spec, recv_spec = nchw(8, 5), nchw(12, 5)
        d = torch.randn(b, 8, 5, 5)
        r = _affine(d.permute(0, 2, 3, 1).reshape(-1, 8), 12).reshape(b, 5, 5, 12).permute(0, 3, 1, 2)
    elif layouts == "nlc":
        donor_spec, recv_spec = nlc(8, 4), nlc(12, 4)
        d = torch.randn(b, 16, 8)
        r = _affine(d.reshape(-1, 8), 12).reshape(b, 16, 12)
    elif layouts == "nhwc_to_nlc":
        donor_spec, recv_spec = nhwc(8, 4), nlc(12, 4)
        d = torch.randn(b, 4, 4, 8)
        r = _affine(d.reshape(-1, 8), 12).reshape(b, 16, 12)
    elif layouts == "nlc_up":  # projection runs before the bilinear upsample
        donor_spec, recv_spec = nlc(8, 4), nchw(12, 8)
        d = torch.randn(b, 16, 8)
        up = torch.nn.functional.interpolate(d.transpose(1, 2).reshape(b, 8, 4, 4), size=(8, 8), mode="bilinear")
        r = _affine(up.permute(0, 2, 3, 1).reshape(-1, 8), 12).reshape(b, 8, 8, 12).permute(0, 3, 1, 2)
    elif layouts == "nlc_carry_prefix":  # the donor's class token maps onto the receiver's
        donor_spec, recv_spec = nlc(8, 4, prefix=1), nlc(12, 4, prefix=1)
        d = torch.randn(b, 17, 8)
        r = _affine(d.reshape(-1, 8), 12).reshape(b, 17, 12)
    else:  # receiver sees the donor averaged over 2x2 cells
        donor_spec, recv_spec = nchw(8, 8), nchw(12, 4)
        d = torch.randn(b, 8, 8, 8)
        pooled = torch.nn.functional.avg_pool2d(d, 2)
        r = _affine(pooled.permute(0, 2, 3, 1).reshape(-1, 8), 12).reshape(b, 4, 4, 12).permute(0, 3, 1, 2)
    stitch = make_stitch(donor_spec, recv_spec)
    fit = fit_stitch(stitch, d, r, ridge=0.0)
    with torch.no_grad():
        err = (stitch(d) - r).abs().max().item()
    assert err < 1e-4
    assert fit.r2 > 1 - 1e-8
    # The default ridge barely shrinks a well-conditioned fit.
    fit_stitch(stitch, [d[:3], d[3:]], [r[:3], r[3:]])
    with torch.no_grad():
        assert (stitch(d) - r).abs().max().item() < 0.05 * r.abs().max().item()


def test_least_squares_beats_random_init_on_noisy_data():
    torch.manual_seed(0)
    d = torch.randn(16, 8, 6, 6)
    rows = d.permute(0, 2, 3, 1).reshape(-1, 8)
    r = (_affine(rows, 12) + 0.1 * torch.randn(rows.shape[0], 12)).reshape(16, 6, 6, 12).permute(0, 3, 1, 2)
    stitch = make_stitch(nchw(8, 6), nchw(12, 6))
    with torch.no_grad():
        mse_random = torch.mean((stitch(d) - r) ** 2).item()
        fit = fit_stitch(stitch, d, r)
        mse_fit = torch.mean((stitch(d) - r) ** 2).item()
    assert mse_fit < 0.1 * mse_random
    assert fit.mse == pytest.approx(mse_fit, rel=1e-3)
    assert 0.9 < fit.r2 < 1


def test_export_matches_eager(vit, ctx):
    torch.manual_seed(0)
    for stitch in (
        make_stitch(nchw(32, 20), ctx_spec(vit), token_context=ctx),
        make_stitch(nlc(64, 7, prefix=1), nchw(32, 14)),
        make_stitch(nhwc(16, 6), nlc(24, 4)),
    ):
        x = example(stitch.out_spec, 2)
        exported = torch.export.export(stitch.eval(), (x,))
        torch.testing.assert_close(exported.module()(x), stitch(x))


def test_token_context_reads_timm(vit, ctx):
    assert isinstance(ctx, TokenContext)
    assert ctx.grid == (10, 10) and ctx.num_prefix == 1 and ctx.pos_embed_has_prefix
    torch.testing.assert_close(ctx.cls_token, vit.cls_token.detach())
    torch.testing.assert_close(ctx.pos_embed, vit.pos_embed.detach())


def test_token_context_reproduces_the_vit_embedding(vit, ctx):
    """Patch tokens through a context-only stitch equal timm's own cls-token + pos-embed step."""
    img = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        patches = vit.patch_embed(img)  # NHWC when the model has dynamic_img_size, else NLC
        donor = nhwc(64, 10) if patches.dim() == 4 else nlc(64, 10)
        stitch = make_stitch(donor, ctx_spec(vit), token_context=ctx, project=False)
        assert stitch.proj is None
        torch.testing.assert_close(stitch(patches), vit._pos_embed(patches))


def test_token_context_interpolates_pos_embed(vit, ctx):
    stitch = make_stitch(nchw(64, 5), ctx_spec(vit, 5), token_context=ctx, project=False)
    x = torch.randn(2, 64, 5, 5)
    with torch.no_grad():
        y = stitch(x)
    pos = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=[5, 5], old_size=[10, 10], num_prefix_tokens=1)
    assert y.shape == (2, 26, 64)
    assert stitch.pos_embed.shape == (1, 26, 64) and stitch.pos_embed.requires_grad
    torch.testing.assert_close(y[:, 0], (vit.cls_token[0] + vit.pos_embed[0, :1]).detach().expand(2, -1))
    torch.testing.assert_close(y[:, 1:], x.flatten(2).transpose(1, 2) + pos[:, 1:])
    # Parameters are copies: training the stitch leaves the receiver model untouched.
    assert stitch.prefix_tokens.data_ptr() != vit.cls_token.data_ptr()


def test_fit_with_token_context_sets_prefix_to_receiver_mean(vit, ctx):
    torch.manual_seed(0)
    stitch = make_stitch(nchw(16, 10), ctx_spec(vit), token_context=ctx)
    d = torch.randn(4, 16, 10, 10)
    r = torch.randn(4, 101, 64)
    fit_stitch(stitch, d, r)
    with torch.no_grad():
        y = stitch(d)
    torch.testing.assert_close(y[:, 0], r[:, 0].mean(0).expand(4, -1), atol=1e-5, rtol=1e-5)


def test_unstitchable_specs_raise(vit, ctx):
    with pytest.raises(SurgeryError):
        make_stitch(nc(8), nchw(8, 4))
    with pytest.raises(StitchError, match="token_context"):
        make_stitch(nchw(8, 4), nlc(8, 4, prefix=1))
    with pytest.raises(StitchError):
        make_stitch(nchw(8, 4), nchw(16, 4), project=False)
    with pytest.raises(StitchError):
        make_stitch(nchw(8, 4), nchw(64, 4), token_context=ctx)
    with pytest.raises(StitchError):
        fit_stitch(make_stitch(nchw(8, 4), nchw(16, 4)), torch.randn(2, 8, 4, 4), torch.randn(3, 16, 4, 4))


@pytest.mark.parametrize("spec", [nchw(16, 4), nhwc(16, 4), nlc(16, 4, prefix=1), nlc(16, 4), nc(16)])
def test_linear_head_fits_separable_features(spec):
    torch.manual_seed(0)
    n, k = 60, 3
    labels = torch.arange(n) % k
    centres = 5 * torch.randn(k, 16)
    pooled = centres[labels] + 0.1 * torch.randn(n, 16)
    head = make_head(spec, k)
    # Features in the head's layout whose pooled form is ``pooled``.
    if spec.layout == "NCHW":
        feats = pooled[:, :, None, None].expand(-1, -1, 4, 4)
    elif spec.layout == "NHWC":
        feats = pooled[:, None, None, :].expand(-1, 4, 4, -1)
    elif spec.layout == "NLC":
        feats = pooled[:, None, :].expand(-1, spec.shape[1], -1)
    else:
        feats = pooled
    acc = fit_linear_head(head, feats, labels)
    assert acc == 1.0
    with torch.no_grad():
        assert (head(feats).argmax(1) == labels).all()


def test_stitch_is_an_nn_module():
    assert isinstance(make_stitch(nchw(4, 2), nchw(6, 2)), torch.nn.Module)
    assert isinstance(make_stitch(nchw(4, 2), nchw(6, 2)), Stitch)


# ----------------------------------------------------------------------------------------------
# What stitch_cost accepts is exactly what make_stitch builds and runs


def accepted_and_built(out_spec, in_spec, ctx, project):
    """(stitch_cost accepts, make_stitch builds a stitch that maps the donor's shape to the receiver's)."""
    try:
        cost = stitch_cost(out_spec, in_spec, token_context=ctx if ctx is not None else False, project=project)
    except StitchError:
        cost = None
    try:
        stitch = make_stitch(out_spec, in_spec, token_context=ctx, project=project)
        with torch.no_grad():
            y = stitch(torch.randn(2, *out_spec.shape[1:]))
        built = tuple(y.shape) == (2, *in_spec.shape[1:])
    except Exception:  # noqa: BLE001 - any failure to build or run counts as "not built"
        stitch, built = None, False
    if cost is not None and built:
        assert stitch.cost() == cost
    return cost is not None, built


def test_tokens_of_unknown_grid_are_not_stitched_spatially():
    pit_first_stage = TensorSpec("NLC", 16, None, prefix_tokens=0, shape=(1, 730, 16))  # 730 = 1 + 27 x 27
    for receiver in (nchw(8, 14), nlc(8, 14), nhwc(8, 27)):
        assert accepted_and_built(pit_first_stage, receiver, None, True) == (False, False)
        with pytest.raises(StitchError, match="no known grid"):
            stitch_cost(pit_first_stage, receiver, project=True)
    with pytest.raises(StitchError, match="no known grid"):
        make_stitch(nchw(8, 14), TensorSpec("NLC", 8, None, shape=(1, 196, 8)))


def test_unknown_specs_are_not_stitched():
    blocked = TensorSpec("other", 96, (56, 56), 4, 0, (1, 16, 196, 96))  # NesT's (B, T, N, C)
    for other in (nchw(96, 56), nlc(96, 56), blocked):
        with pytest.raises(StitchError, match="unknown"):
            stitch_cost(blocked, other, project=True)
        with pytest.raises(StitchError, match="unknown"):
            stitch_cost(other, blocked, project=True)
    assert make_stitch(blocked, blocked).is_identity  # the same tensor may still pass through unchanged
    lying = TensorSpec("NCHW", 16, (196, 96), 1, 0, (1, 16, 196, 95))  # grid does not match its shape
    with pytest.raises(StitchError, match="unknown"):
        make_stitch(lying, nchw(16, 14), project=True)


def _spec_strategy():
    from hypothesis import strategies as st

    @st.composite
    def spec(draw):
        layout = draw(st.sampled_from(["NCHW", "NHWC", "NLC", "NC", "other"]))
        c = draw(st.integers(1, 6))
        grid = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
        prefix = draw(st.integers(0, 2)) if layout == "NLC" else 0
        if layout == "NCHW":
            shape = (1, c, *grid)
        elif layout == "NHWC":
            shape = (1, *grid, c)
        elif layout == "NLC":
            shape = (1, prefix + grid[0] * grid[1], c)
            grid = grid if draw(st.booleans()) else None  # tokens of unknown grid
        elif layout == "NC":
            shape, grid = (1, c), None
        else:
            shape = (1, 2, grid[0] * grid[1], c)
        if draw(st.integers(0, 5)) == 0:  # now and then a spec that contradicts its shape
            shape = (*shape[:-1], shape[-1] + 1)
        return TensorSpec(layout, c, grid, 1 if grid else None, prefix, shape)

    return spec()


def _context_strategy():
    from hypothesis import strategies as st

    @st.composite
    def context(draw):
        if draw(st.booleans()):
            return None
        c, p = draw(st.integers(1, 6)), draw(st.integers(0, 2))
        grid = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
        has_pos, has_prefix = draw(st.booleans()), draw(st.booleans())
        pos = torch.randn(1, (p if has_prefix else 0) + grid[0] * grid[1], c) if has_pos else None
        return TokenContext(torch.randn(1, p, c) if p else None, pos, has_prefix and has_pos, grid)

    return context()


def test_cost_accepts_exactly_what_builds_synthetic():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(_spec_strategy(), _spec_strategy(), _context_strategy(), st.sampled_from([None, True, False]))
    def check(out_spec, in_spec, ctx, project):
        accepted, built = accepted_and_built(out_spec, in_spec, ctx, project)
        assert accepted == built, (out_spec, in_spec, ctx, project)

    check()


# Real cut specs of several families, paired across models (donor output -> receiver input)
FAMILIES = {
    "test_resnet": {}, "test_vit": {}, "test_convnext": {}, "test_vit_relpos": {},
    "deit_tiny_distilled_patch16_224": {"depth": 2, "img_size": 160},
    "pit_ti_224": {"depth": (1, 1, 1)},
    "hiera_tiny_224": {"stages": (1, 1, 1, 1)},
    "cait_xxs24_224": {"depth": 2, "depth_token_only": 1, "img_size": 160},
}


@pytest.fixture(scope="module")
def family_cuts():
    from timm.models.nest import Nest

    from surgery.dissection import dissect

    models, cuts = {}, {}
    for name, kwargs in FAMILIES.items():
        torch.manual_seed(0)
        models[name] = timm.create_model(name, pretrained=False, **kwargs).eval()
    torch.manual_seed(0)
    models["nest"] = Nest(img_size=160, embed_dims=(16, 32, 64), num_heads=(1, 2, 4), depths=(1, 1, 1)).eval()
    for name, model in models.items():
        size = (3, *model.pretrained_cfg["input_size"][1:]) if name != "nest" else (3, 160, 160)
        if "img_size" in FAMILIES.get(name, {}):
            size = (3, FAMILIES[name]["img_size"], FAMILIES[name]["img_size"])
        d = dissect(model, size, name=name)
        seen = {}
        for c in d.cut_points:
            seen.setdefault(c.spec, c.name)  # one cut per distinct spec
        cuts[name] = (d, seen)
    return models, cuts


def test_cost_accepts_exactly_what_builds_real_cut_specs(family_cuts):
    """Every pair of cut specs across the families: the solver's price exists iff the stitch builds and runs."""
    from surgery.assembled import needs_token_context
    from surgery.reassembly import junction_cost

    models, cuts = family_cuts
    accepted_count = refused_count = 0
    for donor, (_, donor_specs) in cuts.items():
        for receiver, (_, receiver_specs) in cuts.items():
            if donor == receiver:
                continue
            for out_spec in donor_specs:
                for in_spec in receiver_specs:
                    try:
                        junction_cost(models[receiver], out_spec, in_spec)
                        accepted = True
                    except SurgeryError:
                        accepted = False
                    try:  # what surgery.assembled.build_parts builds
                        ctx = (token_context_from_timm(models[receiver], in_spec)
                               if needs_token_context(out_spec, in_spec) else None)
                        built = accepted_and_built(out_spec, in_spec, ctx, True)[1]
                    except StitchError:
                        built = False
                    assert accepted == built, (donor, out_spec, receiver, in_spec)
                    accepted_count += accepted
                    refused_count += not accepted
    assert accepted_count > 100 and refused_count > 10


def test_stitched_receivers_run_their_blocks(family_cuts):
    """Into each token-receiving cut of each family, a map donor's stitch feeds the receiver's own block."""
    from surgery.assembled import needs_token_context
    from surgery.reassembly import junction_cost

    models, cuts = family_cuts
    donor = nchw(24, 7)
    ran = 0
    for receiver, (d, specs) in cuts.items():
        for in_spec, name in specs.items():
            if in_spec.layout != "NLC" or not in_spec.prefix_tokens:
                continue
            try:
                junction_cost(models[receiver], donor, in_spec)
            except SurgeryError:
                continue
            ctx = token_context_from_timm(models[receiver], in_spec) if needs_token_context(donor, in_spec) else None
            stitch = make_stitch(donor, in_spec, token_context=ctx, project=True)
            with torch.no_grad():
                out = d.split([name])[1](stitch(torch.randn(2, 24, 7, 7)))
            assert out.shape[0] == 2 and torch.isfinite(out).all()
            ran += 1
    assert ran >= 4


# ----------------------------------------------------------------------------------------------
# Token contexts of timm families


def _patch_tokens(model, img):
    with torch.no_grad():
        patches = model.patch_embed(img)
    return patches, (nhwc(patches.shape[-1], *patches.shape[1:3]) if patches.dim() == 4
                     else nlc(patches.shape[-1], *model.patch_embed.grid_size))


@pytest.mark.parametrize("arch,kwargs", [
    ("test_vit", {}),
    ("deit_tiny_distilled_patch16_224", {"depth": 1, "img_size": 64, "embed_dim": 32, "num_heads": 2}),
    ("vit_dwee_patch16_reg1_gap_256", {"depth": 1, "img_size": 64, "embed_dim": 32, "num_heads": 2}),
    ("vit_small_patch14_reg4_dinov2", {"depth": 1, "img_size": 56, "embed_dim": 32, "num_heads": 2}),
])
def test_token_context_reproduces_the_models_own_embedding(arch, kwargs):
    """Distilled DeiT (class + distillation token), register ViTs: the context-only stitch equals timm's step."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    size = kwargs.get("img_size", model.pretrained_cfg["input_size"][1])
    patches, donor = _patch_tokens(model, torch.randn(2, 3, size, size))
    receiver = nlc(donor.channels, *model.patch_embed.grid_size, prefix=model.num_prefix_tokens)
    ctx = token_context_from_timm(model, receiver)
    assert ctx.num_prefix == model.num_prefix_tokens
    stitch = make_stitch(donor, receiver, token_context=ctx, project=False)
    with torch.no_grad():
        torch.testing.assert_close(stitch(patches), model._pos_embed(patches))


def test_pit_token_context_per_stage():
    torch.manual_seed(0)
    model = timm.create_model("pit_ti_224", pretrained=False, depth=(1, 1, 1)).eval()
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        patches = model.patch_embed(img)  # (B, C, 27, 27)
        native = torch.cat([model.cls_token.expand(2, -1, -1),
                            (patches + model.pos_embed).flatten(2).transpose(1, 2)], dim=1)
    c, gh, gw = patches.shape[1:]
    first = nlc(c, gh, gw, prefix=1)
    ctx = token_context_from_timm(model, first)
    assert ctx.grid == (gh, gw) and not ctx.pos_embed_has_prefix  # pos_embed stored as a map, no prefix row
    stitch = make_stitch(nchw(c, gh, gw), first, token_context=ctx, project=False)
    with torch.no_grad():
        torch.testing.assert_close(stitch(patches), native)  # PiT's own class token + position step
    cls = model.cls_token
    for stage in list(model.transformers)[1:]:  # later stages: a class token of the stage's width, no position
        cls = stage.pool.fc(cls)
        later = token_context_from_timm(model, nlc(cls.shape[-1], 7, prefix=1))
        assert later.pos_embed is None
        torch.testing.assert_close(later.cls_token, cls.detach())
    with pytest.raises(StitchError, match="no token context"):
        token_context_from_timm(model, nlc(c + 1, 7, prefix=1))


def test_late_class_token_context_has_no_position_embedding():
    """CaiT prepends its class token after the patch blocks, long after its position embedding."""
    model = timm.create_model("cait_xxs24_224", pretrained=False, depth=1, depth_token_only=1).eval()
    spec = nlc(model.embed_dim, 14, prefix=1)
    ctx = token_context_from_timm(model, spec)
    assert ctx.pos_embed is None and ctx.num_prefix == 1
    stitch = make_stitch(nchw(8, 7), spec, token_context=ctx)
    assert stitch.cost() == stitch_cost(nchw(8, 7), spec, token_context=ctx)
    assert stitch(torch.randn(2, 8, 7, 7)).shape == (2, 197, model.embed_dim)
