"""A reassembled network: blocks of several models, stitches between them, a new head.

The model is an ordinary ``nn.Module`` (``torch.export`` accepts it). It is saved as a folder:

* ``config.json``: the recipe (schema ``surgery.reassembled/1``): for each stage its source zoo entry
  and the cut nodes that delimit its block, the stitch specs between stages, the head, the input
  size and normalisation;
* ``model.safetensors``: every weight the model needs (so the zoo's checkpoints are not needed);
* ``README.md``: a short model card.

:func:`load` rebuilds each block from its recipe (the architecture with random weights, re-traced and
cut at the same nodes), then loads ``model.safetensors``: nothing is unpickled.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.errors import WorkspaceError
from surgery.spec import TensorSpec
from surgery.stitch import Head, Stitch, make_head, make_stitch
from surgery.token_context import needs_token_context, token_context_from_timm
from surgery.workspace import load_tensors, read_manifest, save_tensors, write_json, write_text
from zoo.entries import ZooEntry, build_model

RECIPE_SCHEMA = "surgery.reassembled/1"
ROLE_ATTR = "_surgery_role"  # read by surgery.training for freeze="blocks"


@dataclass
class StagePlan:
    """Where one stage's block comes from: a model and the two cut nodes around it."""

    model: str
    entry: dict[str, Any]
    start: str | None
    end: str | None
    input_size: tuple[int, int, int]
    granularity: str
    in_spec: TensorSpec
    out_spec: TensorSpec

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "entry": self.entry, "start": self.start, "end": self.end,
                "input_size": list(self.input_size), "granularity": self.granularity,
                "in_spec": self.in_spec.to_dict(), "out_spec": self.out_spec.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StagePlan:
        return cls(d["model"], d["entry"], d.get("start"), d.get("end"), tuple(d["input_size"]),
                   d.get("granularity", "block"), TensorSpec.from_dict(d["in_spec"]),
                   TensorSpec.from_dict(d["out_spec"]))


def headless(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose output is its pre-logits features (timm's ``reset_classifier(0)``)."""
    if not hasattr(model, "reset_classifier"):
        raise WorkspaceError(
            f"{type(model).__name__} has no reset_classifier(); only timm-style models can end a reassembled chain"
        )
    m = copy.deepcopy(model)
    m.reset_classifier(0)
    return m.eval()


def cut_segment(model: nn.Module, plan: StagePlan, *, last: bool) -> tuple[nn.Module, TensorSpec]:
    """The block of ``model`` between ``plan.start`` and ``plan.end`` (to the pre-logits for the last stage).

    Returns the block and the spec of its output (for the last stage: the pooled feature vector).
    """
    from surgery.dissection import dissect

    src = headless(model) if last else model
    d = dissect(src, plan.input_size, name=plan.model, granularity=plan.granularity)
    cuts = [c for c in (plan.start, None if last else plan.end) if c is not None]
    blocks = d.split(cuts)
    block = blocks[1] if plan.start is not None else blocks[0]
    out_spec = d.output_spec if last else plan.out_spec
    return block, out_spec


class ReassembledModel(nn.Module):
    """Blocks of several models chained with stitches, ending in a new classification head.

    ``parts`` alternate blocks and stitches (a stitch only where consecutive blocks come from
    different models). Each part carries a role attribute (``block``/``stitch``/``head``) so that the
    training loop can freeze the pretrained blocks (DeRy's FZ mode).
    """

    def __init__(self, parts: list[nn.Module], roles: list[str], head: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        for part, role in zip(self.parts, roles, strict=True):
            setattr(part, ROLE_ATTR, role)
        self.roles = list(roles)
        self.head = head
        setattr(self.head, ROLE_ATTR, "head")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The chain without the head: pre-logits features."""
        for part in self.parts:
            x = part(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def build_parts(models: dict[str, nn.Module], stages: list[StagePlan], stitch_project: list[bool | None],
                cut: Callable[[StagePlan, bool], tuple[nn.Module, TensorSpec]] | None = None
                ) -> tuple[list[nn.Module], list[str], TensorSpec]:
    """Cut the blocks of a chain and make (unfitted) stitches between blocks of different models.

    Args:
        models: source models by name (real weights, or random ones when rebuilding before a load).
        stages: the chain.
        stitch_project: per junction, the ``project`` argument of the stitch (``None``: no stitch).
        cut: ``cut(plan, last) -> (block, out_spec)`` as :func:`cut_segment` returns them; default
            :func:`cut_segment` (one dissection per stage). Reassembly passes a cut from dissections it
            already holds, so the top-N chains do not re-trace their models.

    Returns:
        ``(parts, roles, feature_spec)``.
    """
    parts: list[nn.Module] = []
    roles: list[str] = []
    feature_spec = stages[-1].out_spec
    for k, plan in enumerate(stages):
        last = k == len(stages) - 1
        block, out_spec = (cut(plan, last) if cut is not None
                           else cut_segment(models[plan.model], plan, last=last))
        if k > 0 and stitch_project[k - 1] is not None:
            prev = stages[k - 1]
            ctx = (token_context_from_timm(models[plan.model], plan.in_spec)
                   if needs_token_context(prev.out_spec, plan.in_spec) else None)
            parts.append(make_stitch(prev.out_spec, plan.in_spec, token_context=ctx,
                                     project=stitch_project[k - 1]))
            roles.append("stitch")
        parts.append(block)
        roles.append("block")
        if last:
            feature_spec = out_spec
    return parts, roles, feature_spec


def save(model: ReassembledModel, out_dir: str | os.PathLike, recipe: dict[str, Any], card: str) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` (each atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    save_tensors(out / "model.safetensors", state, metadata={"format": "pt", "schema": RECIPE_SCHEMA})
    write_json(out / "config.json", {"schema": RECIPE_SCHEMA, **recipe})
    write_text(out / "README.md", card)
    return out


def read_recipe(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The recipe of a saved reassembled model (one-line error when missing or foreign)."""
    return read_manifest(Path(model_dir) / "config.json", RECIPE_SCHEMA, what="model config",
                         missing=f"no reassembled model in {model_dir} (config.json missing)")


def rebuild(recipe: dict[str, Any]) -> nn.Module:
    """The architecture of a recipe with random weights (load the weights afterwards).

    A recipe of ``kind: "model"`` (``surgery incubate``'s and ``surgery grow``'s results) is one whole
    timm model: its entry's architecture is built as is; ``kind: "ensemble"`` (``surgery cotrain``) is an
    :class:`~surgery.training.cotrain.Ensemble` of its member recipe. Any other recipe is a reassembled chain.
    """
    if recipe.get("kind") == "model":
        entry = ZooEntry.model_validate(recipe["entry"])
        return build_model(entry.model_copy(update={"weights": None, "pretrained_tag": None, "random_init": True}))
    if recipe.get("kind") == "ensemble":  # surgery cotrain: S members of one recipe
        from surgery.training.cotrain import Ensemble
        from surgery.training.divide import build_member

        size = tuple(recipe["input_size"])
        return Ensemble([build_member(recipe["member"], size) for _ in range(int(recipe["ways"]))])
    stages = [StagePlan.from_dict(s) for s in recipe["stages"]]
    models: dict[str, nn.Module] = {}
    for plan in stages:
        if plan.model in models:
            continue
        entry = ZooEntry.model_validate(plan.entry)
        if entry.module_class is not None:
            raise WorkspaceError(f"{plan.model} came from a Python module; rebuild it with surgery.assembled.rebuild "
                                 "after registering it as a timm model")
        # The architecture only: every weight comes from model.safetensors.
        arch = entry.model_copy(update={"weights": None, "pretrained_tag": None, "random_init": True})
        models[plan.model] = build_model(arch)
    parts, roles, feature_spec = build_parts(models, stages, recipe["stitch_project"])
    head = make_head(feature_spec, int(recipe["num_classes"]))
    return ReassembledModel(parts, roles, head)


def load(model_dir: str | os.PathLike) -> nn.Module:
    """Load a model folder (``surgery reassemble``, ``baseline``, ``incubate``, ``cotrain`` or ``grow``): no unpickling.

    Args:
        model_dir: the folder holding ``config.json`` and ``model.safetensors``.

    Returns:
        The model in eval mode, with ``model.recipe`` attached: a :class:`ReassembledModel`, or for a
        ``kind: "model"`` recipe the timm model itself.
    """
    recipe = read_recipe(model_dir)
    model = rebuild(recipe)
    state = load_tensors(Path(model_dir) / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WorkspaceError(f"{model_dir}: model.safetensors does not match config.json "
                             f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    model.recipe = recipe
    return model.eval()


__all__ = ["ReassembledModel", "StagePlan", "Head", "Stitch", "build_parts", "load", "save", "rebuild",
           "read_recipe", "needs_token_context", "headless"]
