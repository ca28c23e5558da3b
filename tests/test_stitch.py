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
    "nlc_no_grid_to_nchw": (TensorSpec("NLC", 16, None, shape=(1, 36, 16)), nchw(8, 3), False),
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
