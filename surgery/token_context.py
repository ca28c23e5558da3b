"""Token context: what a receiving ViT block expects around its patch tokens.

A block in the middle of a token model (a ViT and relatives) reads more than patch tokens: its model
has prepended class, distillation and/or register tokens and added an absolute position embedding
before the first block. When a stitch feeds such a block from another model, it must supply both,
and the only source for them is the receiving model itself. :class:`TokenContext` holds them;
:func:`token_context_from_timm` reads them from a timm model (detached copies) for the receiving
block's input spec; :func:`needs_token_context` says when a junction needs one (the receiver has
prefix tokens the donor does not carry). :class:`surgery.stitch.Stitch` turns a context into
trainable parameters (position embedding resampled to the receiving grid) and
:func:`surgery.stitch.fit_stitch` refits the prefix tokens.

timm families covered (attribute names as in ``huggingface/pytorch-image-models``):

* ``VisionTransformer`` and the models built like it (DeiT, distilled DeiT, register ViTs, TNT's
  ``patch_pos``, ...): ``cls_token``/``dist_token``/``reg_token`` and ``pos_embed`` with or
  without prefix rows (timm's ``no_embed_class``), checked against ``num_prefix_tokens``;
* models that prepend the class token after their patch blocks (CaiT, XCiT, ConViT, VOLO): the
  class token only;
* PiT: stage 0 gets the class token and the ``(1, C, H, W)`` position embedding; later stages a
  class token of their width, through each stage's pooling ``fc``;
* CoaT: one class token per stage (``cls_token1``...), no position embedding.

Provenance: moved unchanged out of :mod:`surgery.stitch` (and :func:`needs_token_context` out of
:mod:`surgery.assembled`), which re-export the public names. The prefix/position order follows
timm's ``VisionTransformer._pos_embed``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from surgery.errors import SurgeryError
from surgery.spec import TensorSpec

__all__ = ["StitchError", "TokenContext", "token_context_from_timm", "needs_token_context"]


class StitchError(SurgeryError, ValueError):
    """Two specs cannot be stitched, or fitting data does not match a stitch.

    Defined here, the lower of the two modules, so that both this module and :mod:`surgery.stitch`
    (which re-exports it) raise the same class without a circular import.
    """


@dataclass
class TokenContext:
    """What a receiving token block expects around its patch tokens.

    Attributes:
        cls_token: prefix tokens (class, distillation, then register tokens), shape ``(1, P, C)``, or
            ``None``.
        pos_embed: absolute position embedding, ``(1, P + N, C)`` when ``pos_embed_has_prefix``
            else ``(1, N, C)``, with ``N = grid[0] * grid[1]``; ``None`` when the receiver gets none
            (the model has none, or added it before the receiving block's stage, e.g. models that
            prepend the class token late, or PiT after its first stage).
        pos_embed_has_prefix: whether ``pos_embed`` has rows for the prefix tokens (timm's
            ``not no_embed_class``).
        grid: patch grid ``(h, w)`` that ``pos_embed`` was trained for; ``None`` when there is no
            ``pos_embed`` and the model has no patch grid.
    """

    cls_token: Tensor | None
    pos_embed: Tensor | None
    pos_embed_has_prefix: bool
    grid: tuple[int, int] | None

    @property
    def num_prefix(self) -> int:
        """Number of prefix tokens ``P``."""
        return 0 if self.cls_token is None else int(self.cls_token.shape[1])

    @property
    def width(self) -> int | None:
        """Embedding width ``C`` of the tokens it holds (``None`` when it holds none)."""
        t = self.cls_token if self.cls_token is not None else self.pos_embed
        return None if t is None else int(t.shape[-1])


# Attributes of timm models that prepend their class token only after the patch blocks (CaiT, XCiT,
# ConViT, VOLO): their position embedding went in long before, so a receiver there gets none.
_LATE_CLASS = ("blocks_token_only", "cls_attn_blocks", "local_up_to_layer", "post_network")


def _flat_pos(pos: Tensor, width: int | None) -> tuple[Tensor, tuple[int, int] | None]:
    """A position embedding as ``(1, rows, C)``, and its grid when it was stored as a map (PiT's
    ``(1, C, H, W)``, channels-last ``(1, H, W, C)``)."""
    if pos.dim() != 4:
        return pos, None
    if width is not None and pos.shape[-1] == width and pos.shape[1] != width:  # channels last
        return pos.flatten(1, 2), (int(pos.shape[1]), int(pos.shape[2]))
    return pos.flatten(2).transpose(1, 2), (int(pos.shape[2]), int(pos.shape[3]))


def _timm_contexts(model: nn.Module) -> list[TokenContext]:
    """Every token context a timm model offers, one per token width (stage); the input context first."""
    name = type(model).__name__
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    grid = (int(grid[0]), int(grid[1])) if grid is not None else None
    staged = sorted((a for a, _ in model.named_parameters(recurse=False) if re.fullmatch(r"cls_token\d+", a)),
                    key=lambda a: int(a[9:]))
    if staged:  # CoaT: one class token per stage, position by convolutions (no embedding)
        return [TokenContext(getattr(model, a).detach().clone(), None, False, None) for a in staged]
    prefix = [t for t in (getattr(model, a, None) for a in ("cls_token", "dist_token", "reg_token"))
              if isinstance(t, Tensor)]
    cls_token = torch.cat([t.detach() for t in prefix], dim=1).clone() if prefix else None
    num_prefix = 0 if cls_token is None else int(cls_token.shape[1])
    declared = getattr(model, "num_prefix_tokens", None)
    if isinstance(declared, int) and declared != num_prefix:
        raise StitchError(f"{name}: num_prefix_tokens={declared} but cls_token/dist_token/reg_token hold "
                          f"{num_prefix} tokens")
    width = None if cls_token is None else int(cls_token.shape[-1])
    if any(hasattr(model, a) for a in _LATE_CLASS):
        return [TokenContext(cls_token, None, False, grid)]
    pos = getattr(model, "pos_embed", None)
    pos = pos if isinstance(pos, Tensor) else getattr(model, "patch_pos", None)  # TNT's name for it
    pos_embed, has_prefix = None, False
    if isinstance(pos, Tensor):
        pos_embed, map_grid = _flat_pos(pos.detach().clone(), width)
        grid = map_grid or grid
        if grid is None:
            raise StitchError(f"{name} has a position embedding but no patch grid (patch_embed.grid_size)")
        area = grid[0] * grid[1]
        if pos_embed.shape[1] not in (area, num_prefix + area):
            raise StitchError(f"{name}: position embedding {tuple(pos.shape)} fits neither grid {grid} nor "
                              f"{num_prefix} prefix rows + grid")
        has_prefix = bool(num_prefix) and pos_embed.shape[1] == num_prefix + area
    contexts = [TokenContext(cls_token, pos_embed, has_prefix, grid)]
    stages = getattr(model, "transformers", None)
    if cls_token is not None and isinstance(stages, nn.Sequential):
        # PiT: each later stage's class token is the previous one through its pooling layer's fc
        cls = cls_token
        for stage in list(stages)[1:]:
            fc = getattr(getattr(stage, "pool", None), "fc", None)
            if not isinstance(fc, nn.Linear) or fc.in_features != cls.shape[-1]:
                break
            with torch.no_grad():
                cls = fc(cls.to(fc.weight)).detach().clone()
            contexts.append(TokenContext(cls, None, False, None))
    return contexts


def token_context_from_timm(model: nn.Module, spec: TensorSpec | None = None) -> TokenContext:
    """Read the token context a receiving block of a timm token model expects.

    Prefix tokens are the model's ``cls_token``, ``dist_token`` (distilled DeiT) and ``reg_token``
    (register ViTs), in timm's order, checked against ``num_prefix_tokens``. The position embedding is
    ``pos_embed`` (TNT: ``patch_pos``), with or without prefix rows as its row count says; one stored as
    a map (PiT's ``(1, C, H, W)``) is flattened in raster order. Per family:

    * models that prepend the class token after their patch blocks (CaiT, XCiT, ConViT, VOLO): the
      class token, no position embedding;
    * PiT: stage 0 gets the class token and the position embedding; stage ``k`` a class token of its
      width, the previous one through the stage's pooling ``fc``, and no position embedding;
    * CoaT: one class token per stage (``cls_token1``...), no position embedding.

    Tensors are detached copies. :func:`fit_stitch` refits the prefix tokens to the receiver's mean.

    Args:
        model: a timm token model (``VisionTransformer`` and the families above).
        spec: the receiving block's input spec; picks the stage whose width and prefix count match
            it. ``None``: the model's input context (its first stage).

    Returns:
        The :class:`TokenContext`.

    Raises:
        StitchError: the model has no tokens context (no prefix tokens and no position embedding), its
            prefix tokens are inconsistent, or no stage matches ``spec``.
    """
    name = type(model).__name__
    contexts = [c for c in _timm_contexts(model) if c.cls_token is not None or c.pos_embed is not None]
    if not contexts:
        raise StitchError(f"{name} has no class/register tokens and no position embedding: no token context")
    if spec is None:
        return contexts[0]
    for ctx in contexts:
        if ctx.width == spec.channels and ctx.num_prefix == spec.prefix_tokens:
            if ctx.grid is None and ctx.pos_embed is None and spec.grid is not None:
                ctx = TokenContext(ctx.cls_token, None, False, tuple(spec.grid))
            return ctx
    have = ", ".join(f"{c.width} wide with {c.num_prefix} prefix token(s)" for c in contexts)
    raise StitchError(f"{name} has no token context for a receiver {spec.channels} wide with "
                      f"{spec.prefix_tokens} prefix token(s) (it has: {have})")



def needs_token_context(out_spec: TensorSpec, in_spec: TensorSpec) -> bool:
    """A receiving token block whose prefix tokens the donor does not carry gets them from its model."""
    if in_spec.layout != "NLC" or in_spec.prefix_tokens == 0:
        return False
    return not (out_spec.layout == "NLC" and out_spec.prefix_tokens == in_spec.prefix_tokens)
