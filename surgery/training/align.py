"""Incubation-aligned reassembly: a stitched chain's stages trained one at a time inside a frozen meta model.

A reassembled chain ``block_1 -> stitch_1 -> block_2 -> ... -> block_K -> head`` is K modules
(:func:`stage_modules`): module k is block k with the stitch that leaves it (it emits what block k+1's
source model natively takes), the last module is the last block with the new head. Aligning it is
Deep Incubation's MT phase (Ni et al., ICCV 2023, §3.2) applied to those modules, as planned in
research/training_methods.md §1.9 (recipes A and C):

* **meta model** (:func:`truncated_meta`): each stage's donor block truncated to the blocks that keep
  its interfaces (the blocks that change the tensor spec plus the first shape-preserving one, with
  their pretrained weights), followed by a frozen copy of the stitch after it; the last stage ends in
  a head fitted in closed form on the truncated chain's features. Nothing is trained ("meta =
  truncated donor", recipe C). ``meta="pretrain"`` trains this meta model end to end on the target
  first (recipe A's PT phase).
* **MT_k**: module k inside the frozen meta model (:class:`~surgery.training.incubation.IncubationHybrid`),
  training only what ``train`` names: the stitch, plus the norm layers' affine parameters (``norms``)
  or every block weight at a lower learning rate (``blocks``). The closed-form head is left to the
  fine-tuning (it was fitted to the real chain's features, not the meta model's).
  The least-squares stitch initialisation is the start. The K jobs are independent (module k only
  ever sees meta modules around it).
* **teacher** (optional, m2mKD, Lo et al. 2024): the task adds ``alpha * KL`` to a teacher model's
  logits (:mod:`surgery.training.distill`), in MT and FT.
* **assemble**: the modules are the chain's own parts, so assembling is loading each job's weights;
  batch-norm statistics are re-estimated on target images (labels unused), then the chain is
  fine-tuned end to end (optionally blocks frozen for the first epochs).

:func:`align` runs it on a model folder (``surgery align``); every phase writes its folder under
``MODEL_DIR/align/`` with ``result.json`` when done, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from surgery.assembled import ROLE_ATTR, ReassembledModel, StagePlan, headless
from surgery.errors import SurgeryError
from surgery.stitch import fit_linear_head, make_head
from surgery.training.incubation import ModuleChain, shallow_indices

__all__ = ["stage_modules", "truncated_stage", "truncated_meta", "module_parameters", "TRAIN_MODES"]

TRAIN_MODES = ("stitches", "norms", "blocks")
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def stage_modules(model: ReassembledModel) -> list[nn.Sequential]:
    """The chain's K modules: block k plus the stitch after it; the last block plus the head.

    The modules hold the chain's own parts (no copies): training a module trains the chain.

    Returns:
        K ``nn.Sequential`` modules; module k maps block k's input to block k+1's input (the last
        one: to logits ``(N, classes)``).
    """
    groups: list[list[nn.Module]] = []
    for part, role in zip(model.parts, model.roles, strict=True):
        if role == "block" or not groups:
            groups.append([])
        groups[-1].append(part)
    groups[-1].append(model.head)
    return [nn.Sequential(*g) for g in groups]


def _role(module: nn.Module) -> str | None:
    return getattr(module, ROLE_ATTR, None)


def module_parameters(module: nn.Sequential, train: str, block_lr_scale: float = 0.1
                      ) -> tuple[list[nn.Parameter], dict[nn.Parameter, float]]:
    """What MT trains in one stage module, and at which learning-rate scale.

    Args:
        module: a stage module from :func:`stage_modules`.
        train: ``"stitches"``, ``"norms"`` (also the blocks' norm-layer weights) or ``"blocks"`` (also
            every block weight, at ``block_lr_scale`` of the learning rate). The head never trains in MT.
        block_lr_scale: learning-rate multiplier of block weights in ``"blocks"`` mode.

    Returns:
        ``(parameters, lr_scale)``; the list is empty when the module has nothing ``train`` names
        (a block followed by a block of the same model, no stitch between).

    Raises:
        SurgeryError: unknown ``train``.
    """
    if train not in TRAIN_MODES:
        raise SurgeryError(f"unknown train mode {train!r}; expected one of {', '.join(TRAIN_MODES)}")
    params: list[nn.Parameter] = []
    scale: dict[nn.Parameter, float] = {}
    for part in module:
        if _role(part) == "head":
            # The closed-form head was fitted to the real chain's features; inside the meta model it would
            # adapt to the truncated stages' instead (measured: val 74 -> 56 % in MT on a few-label chain).
            # It trains in the fine-tuning.
            continue
        if _role(part) == "stitch":
            params += list(part.parameters())
        elif train == "norms":
            params += [p for m in part.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)]
        elif train == "blocks":
            block = list(part.parameters())
            params += block
            scale.update({p: block_lr_scale for p in block})
    seen: set[int] = set()
    unique = [p for p in params if not (id(p) in seen or seen.add(id(p)))]
    return unique, scale


def truncated_stage(plan: StagePlan, block: nn.Module, *, last: bool) -> tuple[nn.Module, dict[str, Any]]:
    """A stage's donor block cut down to the sub-blocks that keep its interfaces, with its own weights.

    The donor architecture is rebuilt (no checkpoint needed: the weights come from ``block``, whose
    tensors keep the source model's names), dissected at block granularity, and the sub-blocks
    between the stage's cut points are reduced as :func:`~surgery.training.incubation.shallow_indices`
    says (spec-changing ones plus the first shape-preserving one).

    Args:
        plan: the stage (source entry, cut nodes, input size).
        block: the chain's block of that stage (its weights are copied, not shared).
        last: the chain's last stage (its block runs to the pre-logits features).

    Returns:
        ``(module, info)``: the truncated block (maps the block's input to the same output spec) and
        ``{"sub_blocks", "kept", "params", "macs"}``.

    Raises:
        SurgeryError: the block's weights do not belong to the rebuilt architecture.
    """
    from surgery.dissection import dissect
    from zoo.entries import ZooEntry, build_model

    entry = ZooEntry.model_validate(plan.entry)
    arch = build_model(entry.model_copy(update={"weights": None, "pretrained_tag": None, "random_init": True}))
    donor = headless(arch) if last else arch
    state = block.state_dict()
    missing = sorted(set(state) - set(donor.state_dict()))
    if missing:
        raise SurgeryError(f"stage of {plan.model}: its block's weights {missing[:2]} are not in the rebuilt "
                           "architecture")
    donor.load_state_dict(state, strict=False)
    d = dissect(donor, plan.input_size, name=plan.model, granularity="block")
    lo = d.position(plan.start) if plan.start is not None else -1
    end = None if last else plan.end
    hi = d.position(end) if end is not None else math.inf
    inner = [b for b in d.boundaries if lo < d.position(b) < hi]
    bounds = ([plan.start] if plan.start is not None else []) + inner + ([end] if end is not None else [])
    blocks = d.split(bounds)
    infos = d.block_infos(bounds, blocks)
    first = 1 if plan.start is not None else 0
    span = list(range(first, first + len(inner) + 1))
    keep = [span[i] for i in shallow_indices([infos[j] for j in span])]
    kept = [blocks[i] for i in keep]
    module = kept[0] if len(kept) == 1 else nn.Sequential(*kept)
    info = {"sub_blocks": len(span), "kept": len(keep), "params": int(sum(infos[i].params for i in keep)),
            "macs": int(sum(infos[i].macs for i in keep))}
    return module.eval(), info


def truncated_meta(model: ReassembledModel, stages: Sequence[StagePlan], batches: Iterable[Any]
                   ) -> tuple[ModuleChain, list[dict[str, Any]]]:
    """The chain's meta model: truncated donor blocks, frozen copies of its stitches, a closed-form head.

    Args:
        model: the reassembled chain (not modified).
        stages: its stage plans (``model.recipe["stages"]``).
        batches: labelled target ``(images, labels)`` batches for the meta head's closed-form fit.

    Returns:
        ``(meta, infos)``: a :class:`~surgery.training.incubation.ModuleChain` of K meta modules (meta
        module k has stage module k's input and output), and per stage the :func:`truncated_stage`
        info.
    """
    modules = stage_modules(model)
    if len(modules) != len(stages):
        raise SurgeryError(f"the chain has {len(modules)} stages but its recipe {len(stages)}")
    meta_modules, infos = [], []
    for k, (plan, module) in enumerate(zip(stages, modules, strict=True)):
        last = k == len(stages) - 1
        block, info = truncated_stage(plan, module[0], last=last)
        rest = [copy.deepcopy(p) for p in module[1:] if _role(p) != "head"]
        meta_modules.append(nn.Sequential(block, *rest))
        infos.append(info)
    old_head = model.head
    head = make_head(old_head.in_spec, old_head.fc.out_features, old_head.pool_mode)
    meta_modules[-1].append(head)
    meta = ModuleChain(meta_modules).eval()
    # The meta head reads the truncated chain's features: fitted in closed form on them (a linear probe).
    feats, labels = [], []
    with torch.inference_mode():
        for x, y in batches:
            z = x
            for m in meta_modules[:-1]:
                z = m(z)
            for m in meta_modules[-1][:-1]:
                z = m(z)
            feats.append(head.pool(z))
            labels.append(y)
    fit_linear_head(head, torch.cat(feats), torch.cat(labels))
    meta.requires_grad_(False)
    return meta, infos
