"""Divide one network into S narrower ones of about the same total size (Divide-and-Co-training).

Zhao et al., "Towards Better Accuracy-efficiency Trade-offs: Divide and Co-training" (IEEE TIP 2022),
Sec. III-A: parameters of convolutions and linears grow with width squared, so S networks of width
``w / sqrt(S)`` hold about as many parameters as one of width ``w``; depth, input and classifier output
are unchanged, and regularisation is divided too (dropout and drop-path ``p / sqrt(S)``, weight decay
``x exp(1/S - 1)``, Eq. 6). The paper's code keeps a hand-written width table per family; here a width
multiplier ``m`` is solved numerically (:func:`scipy.optimize.brentq`) so that ``S`` members at ``m``
match the original's parameters (or MACs) within :data:`TOLERANCE`, for any architecture of a family:

=============  ===============================================  ===================================
family         timm constructor argument(s) scaled by ``m``     rounded to
=============  ===============================================  ===================================
resnet         ``channels`` (stage planes; WRN, ResNeXt too),   multiples of 8 (4, 2, 1 if needed)
               ``stem_width`` for deep stems
vit            ``embed_dim`` (``num_heads`` kept), ``mlp_ratio``  multiples of the heads
swin           ``embed_dim`` (``num_heads`` kept), ``mlp_ratio``  multiples of the first stage's heads
convnext       ``dims``                                         multiples of 8 (4, 2, 1)
pvt_v2         ``embed_dims`` (``num_heads`` kept),             multiples of each stage's heads
               ``mlp_ratios``
densenet       ``growth_rate``                                  even numbers
(any other)    every channel dimension pruned by one uniform    multiples of 8 (4, 2, 1), via
               ratio, weights re-initialised                    Torch-Pruning's dependency graph
=============  ===============================================  ===================================

Transformer widths must stay multiples of the heads, a coarse step on small models (a step of 2 in a
64-wide ViT moves its parameters by ~6%): when the width alone cannot meet the tolerance, the MLP
ratio (a continuous knob, hidden width rounded to an integer) is solved next, with the width fixed.
A family rule that still misses (a tiny DenseNet's even growth rates) falls back to the generic path.

The generic path uses Torch-Pruning (Fang et al., CVPR 2023), a maintained library that knows how a
channel change propagates through residuals, concatenations, depthwise and grouped convolutions and
squeeze-excitation; we only pick the ratio. Uniform (not global) pruning makes every layer's width a
function of the ratio alone, so a pruned member is rebuilt exactly from its recipe.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from surgery.errors import SurgeryError

__all__ = ["TOLERANCE", "FAMILIES", "Division", "divide", "build_member", "divided_regularisation",
           "divided_weight_decay"]

TOLERANCE = 0.03  # |S * member size / original size - 1| at most this
FAMILIES = ("resnet", "vit", "swin", "convnext", "pvt_v2", "densenet", "pruned")
_MULTIPLES = (8, 4, 2, 1)


@dataclass
class Division:
    """What :func:`divide` returns.

    Attributes:
        members: the S narrow models (random init, seeds ``seed + i``), CPU, train mode.
        member_recipe: how to rebuild one member: ``{"arch", "model_kwargs", "family",
            "multiplier"}`` plus ``"prune_ratio"`` for the generic family (see :func:`build_member`).
        ways: S.
        family: one of :data:`FAMILIES`.
        multiplier: the width multiplier (``1 - prune_ratio`` for the generic family).
        original_params, member_params: parameter counts (one member).
        original_macs, member_macs: multiply-accumulates per image at ``input_size``.
        match: ``"params"`` or ``"macs"``; ``error`` = S * member / original - 1 in that measure.
    """

    members: list[nn.Module]
    member_recipe: dict[str, Any]
    ways: int
    family: str
    multiplier: float
    original_params: int
    member_params: int
    original_macs: int
    member_macs: int
    match: str
    error: float
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- width rules


def _round(value: float, multiple: int, minimum: int = 1) -> int:
    return max(minimum * multiple, int(round(value / multiple)) * multiple)


def _family(model: nn.Module) -> str:
    from timm.models.convnext import ConvNeXt
    from timm.models.densenet import DenseNet
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    for cls, name in ((ResNet, "resnet"), (VisionTransformer, "vit"), (SwinTransformer, "swin"),
                      (ConvNeXt, "convnext"), (PyramidVisionTransformerV2, "pvt_v2"), (DenseNet, "densenet")):
        if type(model) is cls:  # subclasses may take other arguments: the generic path handles them
            return name
    return "pruned"


def _widths(model: nn.Module, family: str) -> dict[str, Any]:
    """The original's width arguments, read from the built model (not from per-variant tables)."""
    chs = [f["num_chs"] for f in getattr(model, "feature_info", [])]
    if family == "resnet":
        stages = [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
        planes = [s[-1].conv3.out_channels // 4 if hasattr(s[-1], "conv3") else s[-1].conv2.out_channels
                  for s in stages]
        deep = isinstance(model.conv1, nn.Sequential)
        return {"channels": planes, "stem_width": model.conv1[0].out_channels if deep else None}
    if family == "vit":
        block = model.blocks[0]
        return {"embed_dim": model.embed_dim, "heads": block.attn.num_heads,
                "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim}
    if family == "swin":
        block = model.layers[0].blocks[0]
        return {"embed_dim": model.embed_dim, "heads": block.attn.num_heads,
                "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim}
    if family == "convnext":
        return {"dims": chs}
    if family == "pvt_v2":
        return {"embed_dims": chs, "heads": [s.blocks[0].attn.num_heads for s in model.stages],
                "mlp_ratios": [s.blocks[0].mlp.fc1.out_features / c for s, c in zip(model.stages, chs, strict=True)]}
    if family == "densenet":
        return {"growth_rate": model.features.denseblock1.denselayer1.conv2.out_channels}
    raise AssertionError(family)


def _width_kwargs(family: str, widths: dict[str, Any], m: float, multiple: int, mlp: float = 1.0) -> dict[str, Any]:
    """Constructor kwargs of a member at width multiplier ``m`` (and MLP-ratio multiplier ``mlp``)."""
    if family == "resnet":
        out: dict[str, Any] = {"channels": tuple(_round(c * m, multiple) for c in widths["channels"])}
        if widths["stem_width"] is not None:
            out["stem_width"] = _round(widths["stem_width"] * m, min(multiple, 8))
        return out
    if family in ("vit", "swin"):
        out = {"embed_dim": _round(widths["embed_dim"] * m, widths["heads"])}
        if mlp != 1.0:
            out["mlp_ratio"] = widths["mlp_ratio"] * mlp
        return out
    if family == "convnext":
        return {"dims": tuple(_round(c * m, multiple) for c in widths["dims"])}
    if family == "pvt_v2":
        dims = zip(widths["embed_dims"], widths["heads"], strict=True)
        out = {"embed_dims": tuple(_round(c * m, h) for c, h in dims)}
        if mlp != 1.0:
            out["mlp_ratios"] = tuple(r * mlp for r in widths["mlp_ratios"])
        return out
    if family == "densenet":
        return {"growth_rate": _round(widths["growth_rate"] * m, min(multiple, 2))}
    raise AssertionError(family)


# ---------------------------------------------------------------------------- building and measuring


def _create(arch: str, kwargs: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    import timm

    try:
        with torch.device(device):
            return timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SurgeryError(f"cannot build {arch} with {kwargs}: {why}") from None


def _prune(model: nn.Module, ratio: float, example: torch.Tensor, round_to: int = 8) -> nn.Module:
    """``model`` (CPU, real weights) with every channel dimension cut by ``ratio``, in place.

    Raises:
        SurgeryError: Torch-Pruning cannot follow the model's graph (e.g. weight-standardised convs).
    """
    try:
        import torch_pruning as tp
    except ImportError:
        raise SurgeryError("dividing this architecture needs Torch-Pruning (pip install torch-pruning)") from None

    if ratio <= 0:
        return model
    head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    ignored = [head] if isinstance(head, nn.Module) and any(True for _ in head.parameters()) else []
    try:
        pruner = tp.pruner.BasePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=ignored, global_pruning=False,
                                      round_to=round_to)
        pruner.step()
        with torch.no_grad():
            model(example)  # a graph it followed wrongly fails here, not in training
    except Exception as e:  # noqa: BLE001  (any failure inside the library means: not divisible this way)
        raise SurgeryError(f"{type(model).__name__} has no known width arguments and Torch-Pruning cannot narrow it "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return model


def _reinit(model: nn.Module) -> None:
    """Fresh weights after pruning (the division trains from scratch): every layer's own init."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset) and module is not model:
            reset()


def _size(model: nn.Module, input_size: tuple[int, int, int], macs: bool = True) -> tuple[int, int]:
    """``(params, MACs per image)``; MACs are 0 when not asked for (the solver's parameter search)."""
    from surgery.count import count_macs, count_params

    if not macs:
        return count_params(model), 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:  # eval: one probe image must not meet a training-mode batch norm
        return count_params(model), count_macs(model.eval(), torch.zeros(1, *input_size, device=device))
    except (AssertionError, RuntimeError, ValueError) as e:  # e.g. a ViT's patch size not dividing the input
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SurgeryError(f"{type(model).__name__} cannot run at input size {tuple(input_size)}: {why}") from None
    finally:
        model.train(was_training)


def build_member(recipe: dict[str, Any], input_size: tuple[int, int, int], seed: int | None = None,
                 device: str | torch.device = "cpu") -> nn.Module:
    """One member from its recipe (:attr:`Division.member_recipe`), random init (seeded if given).

    Raises:
        SurgeryError: the architecture cannot be built with those arguments.
    """
    if seed is not None:
        torch.manual_seed(seed)
    ratio = recipe.get("prune_ratio")
    if ratio is None:
        return _create(recipe["arch"], recipe["model_kwargs"], device)
    model = _create(recipe["arch"], recipe["model_kwargs"])
    _prune(model.eval(), ratio, torch.randn(1, *input_size), recipe.get("round_to", 8))
    _reinit(model)
    return model.to(device).train()


def divided_regularisation(model_kwargs: dict[str, Any], ways: int, rule: str = "sqrt") -> dict[str, Any]:
    """Dropout and drop-path rates divided for S members: ``p / sqrt(S)`` (``rule="sqrt"``) or ``p / S``.

    Only the rates present in ``model_kwargs`` (timm's ``drop_rate``, ``drop_path_rate``,
    ``proj_drop_rate``, ``attn_drop_rate``, ``drop_block_rate``) change; the paper, Sec. III-A.
    """
    if rule not in ("sqrt", "linear"):
        raise SurgeryError(f"unknown regularisation rule {rule!r}; expected 'sqrt' or 'linear'")
    div = math.sqrt(ways) if rule == "sqrt" else float(ways)
    keys = ("drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate", "drop_block_rate")
    return {k: (v / div if k in keys and isinstance(v, (int, float)) else v) for k, v in model_kwargs.items()}


def divided_weight_decay(weight_decay: float, ways: int) -> float:
    """``weight_decay * exp(1/S - 1)``, the paper's Eq. 6 (S=2: x0.607, S=4: x0.472)."""
    return weight_decay * math.exp(1.0 / ways - 1.0)


# ---------------------------------------------------------------------------- the solver


def divide(
    model: str | dict[str, Any],
    ways: int,
    *,
    match: Literal["params", "macs"] = "params",
    input_size: tuple[int, int, int] = (3, 224, 224),
    num_classes: int | None = None,
    seed: int = 0,
    regularisation: str = "sqrt",
    build: bool = True,
) -> Division:
    """Divide a timm architecture into ``ways`` narrower members of about the same total size.

    Args:
        model: a timm name, or ``{"arch": name, "model_kwargs": {...}}`` (e.g. a depth, ``num_classes``,
            ``drop_path_rate``; the rates are divided, see :func:`divided_regularisation`).
        ways: S >= 1 (S = 1 returns the original architecture).
        match: keep the total parameters (default) or the total MACs per image.
        input_size: ``(C, H, W)`` for counting MACs and for tracing the generic family.
        num_classes: overrides the classifier size.
        seed: member i is initialised with seed ``seed + i``.
        regularisation: ``"sqrt"`` (p / sqrt(S)) or ``"linear"`` (p / S).
        build: build the members (False: only solve, on the meta device where possible).

    Returns:
        A :class:`Division`.

    Raises:
        SurgeryError: ``ways < 1``, an unknown architecture, or no width within :data:`TOLERANCE`
            (the message gives the closest one).
    """
    if not isinstance(ways, int) or ways < 1:
        raise SurgeryError(f"ways must be a whole number >= 1, got {ways!r}")
    if match not in ("params", "macs"):
        raise SurgeryError(f"match must be 'params' or 'macs', got {match!r}")
    spec = {"arch": model, "model_kwargs": {}} if isinstance(model, str) else dict(model)
    arch = spec.get("arch") or spec.get("name")
    kwargs = dict(spec.get("model_kwargs") or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    member_kwargs = divided_regularisation(kwargs, ways, regularisation)
    original = _create(arch, kwargs, "meta")
    orig_params, orig_macs = _size(original, input_size)
    target = orig_params if match == "params" else orig_macs
    family = _family(original)
    notes: list[str] = []

    def measure(model: nn.Module) -> float:
        p, macs = _size(model, input_size, macs=match == "macs")
        return ways * (p if match == "params" else macs) / target - 1.0

    recipe: dict[str, Any] | None = None
    err, m = 0.0, 1.0
    if ways == 1:
        recipe = {"arch": arch, "model_kwargs": dict(member_kwargs), "family": family, "multiplier": 1.0}
    elif family != "pruned":
        widths = _widths(original, family)

        def by_width(m_: float, multiple: int, mlp: float = 1.0) -> tuple[dict[str, Any], float]:
            kw = {**member_kwargs, **_width_kwargs(family, widths, m_, multiple, mlp)}
            return kw, measure(_create(arch, kw, "meta"))

        best = None
        for multiple in _MULTIPLES:
            best = _solve(lambda m_, mult=multiple: by_width(m_, mult), ways, best)
            if best[0] <= TOLERANCE:
                break
        if best[0] > TOLERANCE and family in ("vit", "swin", "pvt_v2"):
            m_fixed = best[1]
            best = _solve(lambda f: by_width(m_fixed, 1, f), ways, best, lo=0.25, hi=3.0, guess=1.0, keep_m=m_fixed)
        err, m, kw = best
        if err <= TOLERANCE:
            recipe = {"arch": arch, "model_kwargs": kw, "family": family, "multiplier": round(m, 6)}
        else:
            notes.append(f"{family} width arguments miss by {err:.1%}: channels pruned instead")
            family = "pruned"
    if recipe is None:
        cpu_original = _create(arch, kwargs).eval()
        example = torch.randn(1, *input_size)

        def by_ratio(m_: float, multiple: int) -> tuple[dict[str, Any], float]:
            pruned = _prune(copy.deepcopy(cpu_original), 1.0 - m_, example, multiple)
            return {**member_kwargs, "_ratio": 1.0 - m_, "_round": multiple}, measure(pruned)

        best = None
        for multiple in _MULTIPLES:
            best = _solve(lambda m_, mult=multiple: by_ratio(m_, mult), ways, best)
            if best[0] <= TOLERANCE:
                break
        err, m, kw = best
        ratio, round_to = kw.pop("_ratio"), kw.pop("_round")
        recipe = {"arch": arch, "model_kwargs": kw, "family": "pruned", "multiplier": round(m, 6),
                  "prune_ratio": ratio, "round_to": round_to}
    if err > TOLERANCE:
        raise SurgeryError(f"cannot divide {arch} into {ways} members within {TOLERANCE:.0%} of its {match}: the "
                           f"closest width (x{m:.3f}) is off by {err:.1%}; try fewer ways or a larger model")
    members = [build_member(recipe, input_size, seed + i).train() for i in range(ways)] if build else []
    probe = members[0] if members else (build_member(recipe, input_size, seed) if family == "pruned" else
                                        _create(arch, recipe["model_kwargs"], "meta"))
    member_params, member_macs = _size(probe, input_size)
    size = member_params if match == "params" else member_macs
    return Division(members=members, member_recipe=recipe, ways=ways, family=family, multiplier=m,
                    original_params=orig_params, member_params=member_params, original_macs=orig_macs,
                    member_macs=member_macs, match=match, error=ways * size / target - 1.0, notes=notes)


def _solve(candidate: Callable[[float], tuple[dict[str, Any], float]], ways: int,
           best: tuple[float, float, dict[str, Any]] | None, *, lo: float | None = None, hi: float | None = None,
           guess: float | None = None, keep_m: float | None = None) -> tuple[float, float, dict[str, Any]]:
    """Root of the (step-wise) size error of ``candidate(x) -> (kwargs, error)``, then the closest
    rounded value around it; ``best`` is ``(|error|, m, kwargs)`` so far (``keep_m``: report that ``m``)."""
    from scipy.optimize import brentq

    def err(x: float) -> float:
        return candidate(x)[1]

    guess = 1.0 / math.sqrt(ways) if guess is None else guess
    lo = max(0.02, guess / 4) if lo is None else lo
    hi = min(1.0, guess * 2) if hi is None else hi
    try:
        root = brentq(err, lo, hi, xtol=1e-3, maxiter=40) if err(lo) < 0 < err(hi) else guess
    except ValueError:
        root = guess
    # the error is a step function: look at the values either side of the root
    for x in sorted({root, root * 0.98, root * 1.02, root * 0.95, root * 1.05, guess}):
        kw, e = candidate(x)
        if best is None or abs(e) < best[0]:
            best = (abs(e), x if keep_m is None else keep_m, kw)
    return best
