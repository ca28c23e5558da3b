"""Stitches: adapters that let a block of one model read the output of a block of another.

A stitch is built from two :class:`~surgery.spec.TensorSpec` objects, the donor block's output spec
and the receiving block's input spec, and is an ordinary ``nn.Module`` that ``torch.export`` accepts.
It has up to four parts, applied in this order:

1. **Layout adapter.** ``NCHW`` <-> ``NHWC`` by permuting; maps -> tokens by flattening the grid;
   tokens -> maps by dropping the donor's prefix tokens and reshaping the rest to the donor spec's
   grid (at another input resolution, a grid of its aspect ratio recovered from the token count).
   Tokens whose grid is unknown are only stitched token for token, and specs that do not describe
   their tensor (layout ``"other"``, see :class:`~surgery.spec.TensorSpec`) not at all. ``NC``
   vectors only connect to ``NC`` vectors.
2. **Resolution adapter.** The map is resampled to the receiving block's native grid: average
   pooling (``adaptive_avg_pool2d``) when the donor grid is an integer multiple of the receiver's,
   otherwise bilinear ``F.interpolate`` (anti-aliased when shrinking). Strides come from the specs,
   never from a random draw as in DeRy (``research/dery.md`` §6).
3. **Channel projection.** A 1x1 convolution for ``NCHW`` maps, a linear layer for tokens,
   channels-last maps and vectors, with bias. It is initialised by :func:`fit_stitch`: ridge
   regression (closed form, float64) from the adapted donor activations to the receiver's native
   input on the same probe images, the "direct matching" of Csiszarik et al. 2021 ("Similarity and
   Matching of Neural Network Representations", renyi-ai/drfrankenstein) that SN-Net (Pan et al.
   2023, ziplab/SN-Net ``ps_inv``) uses to initialise its stitching layers; Bansal et al. 2021
   ("Revisiting Model Stitching") is the reference for stitching with a single affine layer.
4. **Token context.** A receiving ViT block expects its model's class/register tokens in front of
   the patch tokens and position information in them. The stitch prepends the receiver's own prefix
   tokens and adds its position embedding, resampled (bicubic) to the receiving grid; both are
   trainable parameters initialised from the receiver model (:func:`token_context_from_timm`, in
   :mod:`surgery.token_context`).

Resampling and the projection are both linear and the resampling weights of every output cell sum
to one, so they commute (bias included). The projection therefore runs on whichever grid is smaller
(before an upsample, after a downsample), and :func:`fit_stitch` always fits in the receiver's
"positions x channels" space after the layout and resolution adapters.

Costs (:func:`stitch_cost`, :meth:`Stitch.cost`) are computed from the specs alone so the assembly
solver can budget stitches without building them. They count what ``FlopCounterMode`` counts: the
projection's matrix products (1 MAC per multiply-add, bias excluded); resampling, permutes and the
position-embedding add are memory-bound and count 0 there as here.

A new classification head (:func:`make_head`, :func:`fit_linear_head`) is fitted the same way: a
closed-form ridge regression to one-hot targets, i.e. a linear-probe initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery.spec import TensorSpec

# Re-exported: the token context lives in its own module (as does StitchError, which both raise).
from surgery.token_context import StitchError, TokenContext, needs_token_context, token_context_from_timm

__all__ = [
    "StitchError", "TokenContext", "token_context_from_timm", "needs_token_context", "Stitch", "make_stitch",
    "stitch_cost", "StitchFit", "fit_stitch", "ridge_regression", "Head", "make_head", "fit_linear_head",
]

_LAYOUTS = ("NCHW", "NHWC", "NLC", "NC")


# ----------------------------------------------------------------------------------------------
# Plan: everything about a stitch that follows from the specs (pure Python, no tensors)


@dataclass(frozen=True)
class _Plan:
    src: str  # donor layout
    dst: str  # receiver layout
    cin: int
    cout: int
    src_grid: tuple[int, int] | None
    dst_grid: tuple[int, int] | None
    drop_prefix: int  # donor prefix tokens thrown away
    carry_prefix: int  # donor prefix tokens passed through the projection (SN-Net style ViT -> ViT)
    resample: str | None  # None, "pool" or "bilinear"
    project: bool
    project_first: bool  # project on the donor grid, before upsampling (cheaper)
    proj_conv: bool  # 1x1 conv (NCHW) rather than linear (channels last)
    context: bool
    dst_prefix: int
    proj_rows: int  # positions per sample the projection runs on

    @property
    def identity(self) -> bool:
        return not (self.project or self.resample or self.drop_prefix or self.context) and self.src == self.dst


def _same(a: TensorSpec, b: TensorSpec) -> bool:
    return ((a.layout, a.channels, a.grid, a.prefix_tokens, tuple(a.shape[1:]))
            == (b.layout, b.channels, b.grid, b.prefix_tokens, tuple(b.shape[1:])))


def _body(spec: TensorSpec) -> int:
    """Patch tokens or spatial positions per sample of a known spec, 1 for vectors."""
    if spec.layout == "NC":
        return 1
    if spec.grid is not None:
        return spec.grid[0] * spec.grid[1]
    return spec.shape[1] - spec.prefix_tokens  # tokens of unknown grid


def _unknown(spec: TensorSpec) -> str:
    if spec.layout not in _LAYOUTS:
        return f"layout {spec.layout!r} is not one a stitch adapts"
    if not spec.shape:
        return "the spec has no shape"
    return "; ".join(spec.problems())


def _plan(out_spec: TensorSpec, in_spec: TensorSpec, context_grid: tuple[int, int] | None,
          has_context: bool, project: bool | None) -> _Plan:
    src, dst = out_spec.layout, in_spec.layout
    if not (out_spec.known and in_spec.known):
        if _same(out_spec, in_spec) and not has_context and not project:
            src = dst = "other"  # a tensor no spec describes can only pass through unchanged
        else:
            which, spec = ("donor", out_spec) if not out_spec.known else ("receiver", in_spec)
            raise StitchError(f"cannot stitch {src} -> {dst}: the {which} spec is unknown ({_unknown(spec)})")
    if (src == "NC") != (dst == "NC"):
        raise StitchError(f"vectors (NC) only stitch to vectors, not {src} -> {dst}")
    if has_context and dst != "NLC":
        raise StitchError(f"a token context needs a receiver that takes tokens (NLC), not {dst}")
    if project is None:
        project = not _same(out_spec, in_spec)
    if not project and out_spec.channels != in_spec.channels:
        raise StitchError(f"channels differ ({out_spec.channels} -> {in_spec.channels}) but project=False")

    # Prefix tokens: a receiver with prefix tokens gets its own (context), or the donor's when the
    # counts agree (ViT -> ViT as in SN-Net, the class token goes through the projection too).
    src_prefix = out_spec.prefix_tokens if src == "NLC" else 0
    dst_prefix = in_spec.prefix_tokens if dst == "NLC" else 0
    carry = src_prefix if (dst == "NLC" and not has_context and src_prefix == dst_prefix) else 0
    if dst_prefix and not has_context and not carry:
        raise StitchError(f"the receiver expects {dst_prefix} prefix token(s) and the donor has "
                          f"{src_prefix}: pass a token_context (token_context_from_timm(receiver))")

    src_grid = tuple(out_spec.grid) if src in ("NCHW", "NHWC", "NLC") and out_spec.grid is not None else None
    dst_grid = tuple(in_spec.grid) if dst in ("NCHW", "NHWC", "NLC") and in_spec.grid is not None else None
    if dst_grid is None and has_context and context_grid is not None and dst != "other" \
            and context_grid[0] * context_grid[1] == _body(in_spec):
        dst_grid = tuple(context_grid)  # tokens of the receiver model's own patch grid
    if src not in ("NC", "other") and (src_grid is None or dst_grid is None) and not (
            src_grid is None and dst_grid is None and _body(out_spec) == _body(in_spec)):
        # Tokens of unknown grid can neither become a map nor be resampled: only token for token.
        side = "donor" if src_grid is None else "receiver"
        raise StitchError(f"cannot stitch {src} -> {dst}: the {side} tokens have no known grid")
    resample = None
    if src_grid is not None and dst_grid is not None and src_grid != dst_grid:
        fh, fw = src_grid[0] / dst_grid[0], src_grid[1] / dst_grid[1]
        # Integer shrink: an average over each fh x fw cell is exact and alias-free.
        integer_down = fh >= 1 and fw >= 1 and fh.is_integer() and fw.is_integer()
        resample = "pool" if integer_down else "bilinear"
    src_rows = src_grid[0] * src_grid[1] if src_grid is not None else 0
    if dst_grid is not None:
        dst_rows = dst_grid[0] * dst_grid[1]
    else:
        dst_rows = _body(in_spec) if project and dst != "other" else 0
    project_first = bool(project and resample == "bilinear" and not carry and 0 < src_rows < dst_rows)
    proj_conv = project_first or dst == "NCHW"
    rows = (src_rows if project_first else dst_rows) + carry if project else 0
    return _Plan(
        src=src, dst=dst, cin=out_spec.channels, cout=in_spec.channels,
        src_grid=src_grid, dst_grid=dst_grid,
        drop_prefix=src_prefix - carry, carry_prefix=carry, resample=resample, project=bool(project),
        project_first=project_first, proj_conv=proj_conv, context=has_context, dst_prefix=dst_prefix,
        proj_rows=rows,
    )


def _check_context(plan: _Plan, ctx: TokenContext | None, channels: int) -> int:
    """Check that a token context fits the plan's receiver; returns the position embedding's prefix rows.

    ``ctx=None`` with ``plan.context`` stands for a standard timm ViT (class tokens and a position
    embedding with prefix rows), as :func:`stitch_cost` assumes for ``token_context=True``.
    """
    if not plan.context:
        return 0
    num_prefix = ctx.num_prefix if ctx is not None else plan.dst_prefix
    if num_prefix != plan.dst_prefix:
        raise StitchError(f"token context has {num_prefix} prefix token(s), the receiver spec {plan.dst_prefix}")
    if ctx is not None and ctx.width not in (None, channels):
        raise StitchError(f"token context width {ctx.width} != receiver channels {channels}")
    if ctx is not None and ctx.pos_embed is None:
        return 0
    if plan.dst_grid is None:
        raise StitchError("the receiver's patch grid is unknown: its position embedding cannot be placed")
    if ctx is None:
        return plan.dst_prefix
    n_pre = plan.dst_prefix if ctx.pos_embed_has_prefix else 0
    pos = ctx.pos_embed
    if ctx.grid is None or pos.dim() != 3 or pos.shape[1] != n_pre + ctx.grid[0] * ctx.grid[1]:
        raise StitchError(f"pos_embed {tuple(pos.shape)} does not match {n_pre} prefix rows + grid "
                          f"{ctx.grid} x {channels} channels")
    return n_pre


def _context_params(plan: _Plan, channels: int, has_cls: bool, has_pos: bool, pos_has_prefix: bool) -> int:
    if not plan.context:
        return 0
    grid_rows = plan.dst_grid[0] * plan.dst_grid[1] if plan.dst_grid is not None else 0
    n = plan.dst_prefix * channels if has_cls else 0
    if has_pos:
        n += ((plan.dst_prefix if pos_has_prefix else 0) + grid_rows) * channels
    return n


def stitch_cost(out_spec: TensorSpec, in_spec: TensorSpec, *, token_context: TokenContext | bool = False,
                project: bool | None = None, batch_size: int = 1) -> tuple[int, int]:
    """Parameters and MACs of the stitch :func:`make_stitch` would build, from the specs alone.

    Args:
        out_spec: donor block output spec.
        in_spec: receiving block input spec.
        token_context: the receiver's :class:`TokenContext`, or ``True`` for a standard timm ViT
            (``in_spec.prefix_tokens`` prefix tokens, position embedding with prefix rows), or
            ``False`` for none.
        project: as in :func:`make_stitch`.
        batch_size: batch size the MACs are counted at.

    Returns:
        ``(params, macs)``; MACs as ``FlopCounterMode`` counts them (FLOPs / 2, bias excluded).

    Raises:
        StitchError: exactly when :func:`make_stitch` would refuse the specs (and context): a spec
            that is unknown (layout ``"other"``, no shape, or contradicting its shape) unless both
            are the same and pass through, tokens of unknown grid that would need one, vectors to
            or from non-vectors, missing or mismatching prefix tokens or position embedding.
    """
    ctx = token_context if isinstance(token_context, TokenContext) else None
    has_context = ctx is not None or bool(token_context)
    plan = _plan(out_spec, in_spec, ctx.grid if ctx else None, has_context, project)
    n_pre = _check_context(plan, ctx, in_spec.channels)
    params = (plan.cin * plan.cout + plan.cout) if plan.project else 0
    if ctx is not None:
        params += _context_params(plan, in_spec.channels, ctx.cls_token is not None,
                                  ctx.pos_embed is not None, bool(n_pre))
    else:
        params += _context_params(plan, in_spec.channels, plan.dst_prefix > 0, True, True)
    macs = batch_size * plan.proj_rows * plan.cin * plan.cout
    return int(params), int(macs)


# ----------------------------------------------------------------------------------------------
# Layout helpers (static shapes: every branch depends on the plan, never on tensor values)


def _tokens_grid(n: int, hint: tuple[int, int] | None) -> tuple[int, int]:
    """Grid of ``n`` patch tokens: the hint if it fits, else its aspect ratio, else square."""
    if hint is not None and hint[0] * hint[1] == n:
        return hint
    if hint is not None:
        h = max(1, round(math.sqrt(n * hint[0] / hint[1])))
    else:
        h = math.isqrt(n)
    if h * (n // h) != n:
        raise StitchError(f"{n} tokens do not form a grid with aspect ratio {hint or (1, 1)}")
    return h, n // h


def _to_nchw(x: Tensor, layout: str, hint: tuple[int, int] | None) -> Tensor:
    if layout == "NHWC":
        return x.permute(0, 3, 1, 2)
    if layout == "NLC":
        h, w = _tokens_grid(x.shape[1], hint)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    return x


def _from_nchw(x: Tensor, layout: str) -> Tensor:
    if layout == "NHWC":
        return x.permute(0, 2, 3, 1)
    if layout == "NLC":
        return x.flatten(2).transpose(1, 2)
    return x


def _convert(x: Tensor, src: str, dst: str, hint: tuple[int, int] | None) -> Tensor:
    if src == dst:
        return x
    if src == "NHWC" and dst == "NLC":
        return x.flatten(1, 2)
    if src == "NLC" and dst == "NHWC":
        h, w = _tokens_grid(x.shape[1], hint)
        return x.reshape(x.shape[0], h, w, x.shape[2])
    return _from_nchw(_to_nchw(x, src, hint), dst)


def _rows(x: Tensor, layout: str) -> Tensor:
    """Flatten a tensor in ``layout`` to ``(positions, channels)``."""
    if layout == "NCHW":
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------------------------
# The stitch module


class Stitch(nn.Module):
    """Adapter from a donor block's output to a receiving block's input (see the module docstring).

    Attributes:
        out_spec: donor output spec.
        in_spec: receiver input spec.
        proj: ``nn.Conv2d`` (1x1) or ``nn.Linear`` channel projection, or ``None``.
        prefix_tokens: receiver prefix tokens ``(1, P, C)`` (token context), or ``None``.
        pos_embed: receiver position embedding resampled to the receiving grid, or ``None``.
    """

    def __init__(self, out_spec: TensorSpec, in_spec: TensorSpec, *,
                 token_context: TokenContext | None = None, project: bool | None = None):
        super().__init__()
        self.out_spec, self.in_spec = out_spec, in_spec
        ctx = token_context
        self.plan = _plan(out_spec, in_spec, ctx.grid if ctx else None, ctx is not None, project)
        p = self.plan
        self.proj: nn.Module | None = None
        if p.project:
            self.proj = nn.Conv2d(p.cin, p.cout, 1) if p.proj_conv else nn.Linear(p.cin, p.cout)
        self.prefix_tokens: nn.Parameter | None = None
        self.pos_embed: nn.Parameter | None = None
        self.pos_has_prefix = False
        if ctx is not None:
            self._init_context(ctx)

    def _init_context(self, ctx: TokenContext) -> None:
        p = self.plan
        n_pre = _check_context(p, ctx, self.in_spec.channels)
        if ctx.cls_token is not None:
            self.prefix_tokens = nn.Parameter(ctx.cls_token.detach().clone().float())
        if ctx.pos_embed is None:
            return
        pos = ctx.pos_embed.detach().float()
        gh, gw = ctx.grid
        if tuple(p.dst_grid) != tuple(ctx.grid):
            from timm.layers import resample_abs_pos_embed  # timm is a dependency; import only when used

            pos = resample_abs_pos_embed(pos, new_size=list(p.dst_grid), old_size=[gh, gw],
                                         num_prefix_tokens=n_pre, interpolation="bicubic", antialias=True)
        self.pos_embed = nn.Parameter(pos.clone())
        self.pos_has_prefix = bool(n_pre)

    @property
    def is_identity(self) -> bool:
        """Whether the stitch passes its input through unchanged."""
        return self.plan.identity

    def cost(self, batch_size: int = 1) -> tuple[int, int]:
        """``(params, macs)`` of this stitch, from its specs (equals :func:`stitch_cost`)."""
        p = self.plan
        params = (p.cin * p.cout + p.cout) if p.project else 0
        if p.context:
            params += _context_params(p, self.in_spec.channels, self.prefix_tokens is not None,
                                      self.pos_embed is not None, self.pos_has_prefix)
        return int(params), int(batch_size * p.proj_rows * p.cin * p.cout)

    def adapt(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        """Layout and resolution adapters only: ``(carried prefix tokens or None, body)``.

        The body is in the receiver's layout at the receiver's grid, with the donor's channels.
        """
        p = self.plan
        prefix = None
        if p.carry_prefix:
            prefix, x = x[:, :p.carry_prefix], x[:, p.carry_prefix:]
        elif p.drop_prefix:
            x = x[:, p.drop_prefix:]
        if p.resample:
            x = _from_nchw(self._resample(_to_nchw(x, p.src, p.src_grid)), p.dst)
        else:
            x = _convert(x, p.src, p.dst, p.src_grid)
        return prefix, x

    def _resample(self, x: Tensor) -> Tensor:
        # Decided from the (static) shapes at run time, so an input at another resolution still
        # arrives at the receiver's native grid.
        size = self.plan.dst_grid
        h, w = x.shape[2], x.shape[3]
        if (h, w) == tuple(size):
            return x
        if h % size[0] == 0 and w % size[1] == 0:
            return F.adaptive_avg_pool2d(x, size)
        shrink = size[0] < h or size[1] < w
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)

    def forward(self, x: Tensor) -> Tensor:
        """Map a donor output to the receiver's input."""
        p = self.plan
        if p.identity:
            return x
        if p.project_first:
            # Upsampling: project on the smaller donor grid; equal to projecting afterwards.
            x = _to_nchw(x[:, p.drop_prefix:] if p.drop_prefix else x, p.src, p.src_grid)
            x = _from_nchw(self._resample(self.proj(x)), p.dst)
            prefix = None
        else:
            prefix, x = self.adapt(x)
            if self.proj is not None:
                x = self.proj(x)
                if prefix is not None:
                    prefix = self.proj(prefix)
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        if p.context:
            x = self._add_context(x)
        return x

    def _add_context(self, x: Tensor) -> Tensor:
        # Same order as timm's VisionTransformer._pos_embed.
        if self.pos_embed is not None and not self.pos_has_prefix:
            x = x + self.pos_embed
        if self.prefix_tokens is not None:
            x = torch.cat([self.prefix_tokens.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None and self.pos_has_prefix:
            x = x + self.pos_embed
        return x

    def extra_repr(self) -> str:
        p = self.plan
        return (f"{p.src}{list(p.src_grid or [])}x{p.cin} -> {p.dst}{list(p.dst_grid or [])}x{p.cout}, "
                f"resample={p.resample}, carry_prefix={p.carry_prefix}, context={p.context}")


def make_stitch(out_spec: TensorSpec, in_spec: TensorSpec, *, token_context: TokenContext | None = None,
                project: bool | None = None) -> Stitch:
    """Build the stitch from a donor output spec to a receiver input spec.

    Args:
        out_spec: donor block output spec.
        in_spec: receiving block input spec.
        token_context: the receiver model's class/register tokens and position embedding
            (:func:`token_context_from_timm`); required when the receiver expects prefix tokens the
            donor does not have. Without it a donor with as many prefix tokens passes its own
            through the projection (SN-Net's ViT -> ViT stitching).
        project: add a channel projection. ``None`` (default): unless the specs are the same
            (layout, channels, grid, prefix tokens), so a stitch between equal specs is the
            identity. Pass ``True`` between different models whose specs happen to agree: their
            channels do not share a basis.

    Returns:
        A :class:`Stitch` with a default-initialised projection; fit it with :func:`fit_stitch`.

    Raises:
        StitchError: the specs cannot be stitched.
    """
    return Stitch(out_spec, in_spec, token_context=token_context, project=project)


# ----------------------------------------------------------------------------------------------
# Closed-form fitting


def _ridge_lambda(trace: Tensor, dim: int, ridge: float) -> Tensor:
    # Relative to the mean eigenvalue of the scatter matrix, so ``ridge`` means the same for
    # activations of any scale and any probe-set size.
    return ridge * trace.clamp_min(1e-300) / max(dim, 1)


def _solve_spd(a: Tensor, b: Tensor, lam: Tensor) -> Tensor:
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    if float(lam) > 0:
        return torch.linalg.solve(a + lam * eye, b)
    # No ridge: minimum-norm least squares, tolerant of rank deficiency.
    return torch.linalg.pinv(a, hermitian=True) @ b


def ridge_regression(x: Tensor, y: Tensor, ridge: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Closed-form ridge regression with an unpenalised bias, in float64.

    Minimises ``||x A + b - y||^2 + lam ||A||^2`` with ``lam = ridge * trace(Xc^T Xc) / d``
    (``Xc`` centred), solving the primal ``d x d`` or the dual ``n x n`` system, whichever is
    smaller.

    Args:
        x: inputs ``(n, d)``.
        y: targets ``(n, k)``.
        ridge: relative ridge strength (0: minimum-norm least squares).

    Returns:
        ``(A, b)`` with ``A`` of shape ``(d, k)`` and ``b`` of shape ``(k,)``, float64.
    """
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    n, d = xc.shape
    lam = _ridge_lambda((xc * xc).sum(), d, ridge)
    if d <= n:
        a = _solve_spd(xc.T @ xc, xc.T @ yc, lam)
    else:
        a = xc.T @ _solve_spd(xc @ xc.T, yc, lam)
    return a, my - mx @ a


@dataclass
class StitchFit:
    """Diagnostics of :func:`fit_stitch` on its probe data.

    Attributes:
        mse: mean squared error per element of the projection's fit (the reconstruction loss).
        r2: fraction of the target variance explained (1 = perfect, 0 = as good as the mean).
        rows: number of positions (tokens/pixels over all probe images) fitted.
    """

    mse: float
    r2: float
    rows: int


def _as_list(acts: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [acts] if isinstance(acts, Tensor) else list(acts)


@torch.no_grad()
def fit_stitch(stitch: Stitch, donor_acts: Tensor | Sequence[Tensor], receiver_acts: Tensor | Sequence[Tensor],
               ridge: float = 1e-3, *, fit_prefix: bool = True, chunk: int = 32) -> StitchFit:
    """Initialise a stitch by ridge regression from donor outputs to receiver inputs.

    The regression runs in the receiver's "positions x channels" space: donor activations go
    through the stitch's layout and resolution adapters, receiver activations are flattened in
    their own layout, minus the stitch's position embedding when it adds one. Sufficient
    statistics are accumulated in float64 chunk by chunk, so memory does not grow with the probe
    set. With a token context and ``fit_prefix``, the prefix tokens are set to the mean of the
    receiver's native prefix tokens (the least-squares constant), minus their position embedding.

    Args:
        stitch: the stitch to initialise (modified in place).
        donor_acts: donor block outputs in the donor's native layout, one tensor or a list of
            batches.
        receiver_acts: the receiving block's native inputs on the same images, same batching.
        ridge: relative ridge strength (see :func:`ridge_regression`).
        fit_prefix: also refit the prefix tokens of a token context.
        chunk: samples per float64 chunk.

    Returns:
        :class:`StitchFit` diagnostics of the fitted projection.

    Raises:
        StitchError: the activations do not match the stitch's specs.
    """
    donors, receivers = _as_list(donor_acts), _as_list(receiver_acts)
    if len(donors) != len(receivers):
        raise StitchError(f"{len(donors)} donor batches but {len(receivers)} receiver batches")
    p = stitch.plan
    dev = stitch.proj.weight.device if stitch.proj is not None else donors[0].device
    sxx = torch.zeros(p.cin, p.cin, dtype=torch.float64, device=dev)
    sxy = torch.zeros(p.cin, p.cout, dtype=torch.float64, device=dev)
    sx = torch.zeros(p.cin, dtype=torch.float64, device=dev)
    sy = torch.zeros(p.cout, dtype=torch.float64, device=dev)
    syy = torch.zeros((), dtype=torch.float64, device=dev)
    prefix_sum = torch.zeros(max(p.dst_prefix, 1), p.cout, dtype=torch.float64, device=dev)
    n = n_samples = 0
    pos = stitch.pos_embed.detach().double().to(dev) if stitch.pos_embed is not None else None
    n_pos_pre = p.dst_prefix if stitch.pos_has_prefix else 0
    for d_batch, r_batch in zip(donors, receivers, strict=True):
        if d_batch.shape[0] != r_batch.shape[0]:
            raise StitchError(f"batch sizes differ: donor {d_batch.shape[0]}, receiver {r_batch.shape[0]}")
        for start in range(0, d_batch.shape[0], chunk):
            d = d_batch[start:start + chunk].to(dev)
            r = r_batch[start:start + chunk].to(dev).double()
            prefix, body = stitch.adapt(d)
            x = _rows(body, p.dst).double()
            if p.dst_prefix:
                r_prefix, r = r[:, :p.dst_prefix], r[:, p.dst_prefix:]
                prefix_sum += r_prefix.sum(0)
            if pos is not None:
                r = r - pos[:, n_pos_pre:]
            y = _rows(r, p.dst)
            if prefix is not None:  # carried donor prefix tokens regress onto the receiver's
                x = torch.cat([x, _rows(prefix, p.dst).double()])
                y = torch.cat([y, _rows(r_prefix, p.dst)])
            if x.shape != (y.shape[0], p.cin) or y.shape[1] != p.cout:
                raise StitchError(f"adapted donor rows {tuple(x.shape)} do not match receiver rows "
                                  f"{tuple(y.shape)} (expected {p.cin} -> {p.cout} channels)")
            sxx += x.T @ x
            sxy += x.T @ y
            sx += x.sum(0)
            sy += y.sum(0)
            syy += (y * y).sum()
            n += x.shape[0]
            n_samples += d.shape[0]
    if n == 0:
        raise StitchError("no probe activations to fit the stitch on")

    if stitch.proj is not None:
        cxx = sxx - torch.outer(sx, sx) / n
        cxy = sxy - torch.outer(sx, sy) / n
        a = _solve_spd(cxx, cxy, _ridge_lambda(torch.diagonal(cxx).sum(), p.cin, ridge))
        b = (sy - sx @ a) / n
        w = a.T.to(stitch.proj.weight.dtype)
        stitch.proj.weight.copy_(w.reshape(stitch.proj.weight.shape))
        stitch.proj.bias.copy_(b.to(stitch.proj.bias.dtype))
    else:
        a = torch.eye(p.cin, dtype=torch.float64, device=dev)
        b = torch.zeros(p.cout, dtype=torch.float64, device=dev)
    if fit_prefix and stitch.prefix_tokens is not None:
        mean_prefix = prefix_sum / n_samples
        if pos is not None and stitch.pos_has_prefix:
            mean_prefix = mean_prefix - pos[0, :p.dst_prefix]
        stitch.prefix_tokens.copy_(mean_prefix[None].to(stitch.prefix_tokens.dtype))

    # Residual from the sufficient statistics: sum ||x A + b - y||^2.
    sse = (torch.sum(a * (sxx @ a)) + 2 * b @ (a.T @ sx) + n * (b @ b)
           - 2 * torch.sum(a * sxy) - 2 * b @ sy + syy)
    total = syy - (sy @ sy) / n
    sse = float(sse.clamp_min(0))
    return StitchFit(mse=sse / (n * p.cout), r2=1.0 - sse / max(float(total), 1e-300), rows=n)


# ----------------------------------------------------------------------------------------------
# New head for the target classes


class Head(nn.Module):
    """Pooling (if needed) and a linear classifier.

    Pooling: spatial mean for maps; for tokens the first prefix (class) token (``"token"``) or
    the mean of the patch tokens (``"avg"``); nothing for vectors.
    """

    def __init__(self, in_spec: TensorSpec, num_classes: int, pool: str = "auto"):
        super().__init__()
        if in_spec.layout not in _LAYOUTS:
            raise StitchError(f"cannot put a head on layout {in_spec.layout!r}")
        if pool == "auto":
            pool = "token" if in_spec.layout == "NLC" and in_spec.prefix_tokens else "avg"
        if pool not in ("token", "avg"):
            raise StitchError(f"pool must be 'auto', 'token' or 'avg', not {pool!r}")
        if pool == "token" and not (in_spec.layout == "NLC" and in_spec.prefix_tokens):
            raise StitchError("token pooling needs a receiver with prefix tokens")
        self.in_spec, self.pool_mode = in_spec, pool
        self.fc = nn.Linear(in_spec.channels, num_classes)

    def pool(self, x: Tensor) -> Tensor:
        """Pooled features ``(batch, channels)``."""
        layout = self.in_spec.layout
        if layout == "NCHW":
            return x.mean(dim=(2, 3))
        if layout == "NHWC":
            return x.mean(dim=(1, 2))
        if layout == "NLC":
            if self.pool_mode == "token":
                return x[:, 0]
            return x[:, self.in_spec.prefix_tokens:].mean(dim=1)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Logits."""
        return self.fc(self.pool(x))


def make_head(in_spec: TensorSpec, num_classes: int, pool: str = "auto") -> Head:
    """New classification head for ``num_classes`` target classes on features of ``in_spec``.

    Args:
        in_spec: spec of the features the head reads.
        num_classes: number of target classes.
        pool: ``"auto"`` (class token for tokens with prefix tokens, else mean), ``"token"`` or
            ``"avg"``.

    Returns:
        A :class:`Head`; initialise it with :func:`fit_linear_head`.
    """
    return Head(in_spec, num_classes, pool)


@torch.no_grad()
def fit_linear_head(head: Head, features: Tensor, labels: Tensor, ridge: float = 1e-3) -> float:
    """Fit a head by closed-form ridge regression to one-hot targets (linear-probe initialisation).

    Args:
        head: the head (modified in place).
        features: features in the head's input layout, or already pooled ``(n, channels)``.
        labels: integer class labels ``(n,)`` in ``[0, num_classes)``.
        ridge: relative ridge strength (see :func:`ridge_regression`).

    Returns:
        Training accuracy of the fitted head.
    """
    pooled = features if features.dim() == 2 else head.pool(features)
    labels = labels.long().reshape(-1).to(pooled.device)
    k = head.fc.out_features
    if pooled.shape[0] != labels.shape[0]:
        raise StitchError(f"{pooled.shape[0]} feature rows but {labels.shape[0]} labels")
    if labels.numel() and (labels.min() < 0 or labels.max() >= k):
        raise StitchError(f"labels must lie in [0, {k})")
    a, b = ridge_regression(pooled, F.one_hot(labels, k), ridge)
    head.fc.weight.copy_(a.T.to(head.fc.weight))
    head.fc.bias.copy_(b.to(head.fc.bias))
    scores = pooled.double() @ a + b
    return float((scores.argmax(1) == labels).double().mean())
