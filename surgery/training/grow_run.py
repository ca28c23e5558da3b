"""``surgery grow``: train a timm model while it grows in depth and input resolution (AutoProg, MoGrow).

Automated Progressive Learning (Li et al., CVPR 2022): training starts from a shallow model at a low
resolution and grows, stage by stage, to the full model at full resolution; the last stage always
trains the full model. Each stage is one window of a single warm-up + cosine learning-rate schedule
(no restart at a growth). At a growth:

* depth grows by :func:`~surgery.training.growth.grow_depth` (``interleave``: each block followed by
  its copy, the paper's default; or ``stack``), the new blocks initialised by ``init``: ``mogrow``
  (the whole grown model, inherited and new blocks, taken from the EMA: the paper's MoGrow),
  ``copy`` (copies of the live blocks), ``zero`` (copies whose residual branch is zeroed: the grown
  model computes what the smaller one did) or ``random``;
* the EMA grows by plain copying (new blocks under ``zero`` / ``random`` take the model's values);
* AdamW moments follow the parameter each new parameter came from (MSG; the paper's code resets them:
  ``carry_optimizer=False``);
* resolution: inputs are resized on the fly to the stage's side (data stay at full resolution, as the
  paper's GPU down-sampling); a ViT is built with ``dynamic_img_size`` when timm offers it (position
  embeddings resampled on the fly), other models with a position embedding are resized with timm's
  ``set_input_size`` at each stage.

``schedule="manual"``: K equal stages, depth, resolution and drop-path ramped linearly
(:func:`~surgery.training.growth.manual_schedule`). ``schedule="auto"``: AutoProg; at the start of every
stage but the last the model grows to an elastic supernet, trains ``search_epochs`` (counted in the
stage) with a random sub-network per step, and continues as the sub-network with the best
loss-time trade-off (:mod:`surgery.training.autoprog`).

A run folder is also the result's model folder: ``grow.json`` (spec, block groups, every stage's
architecture and AutoProg's candidate tables), ``metrics.jsonl`` (one record per stage and per
search), ``search.png`` (AutoProg's candidates: step time against loss, the fit, the choice),
``stage_<k>/`` (the loop's log and checkpoints; ``stage_<k>/search/`` for the supernet), then
``config.json`` (``kind: "model"``), ``model.safetensors`` and ``README.md``. ``kill -9`` and the same
command resumes mid-stage (the architecture is rebuilt from the manifest before the checkpoint loads).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from surgery.errors import SurgeryError
from surgery.training.autoprog import (
    Candidate,
    ElasticDepth,
    InputSize,
    SupernetTask,
    candidates,
    measure_candidates,
    plot_searches,
)
from surgery.training.growth import (
    BlockGroup,
    autoprog_choice,
    carry_optimizer_state,
    find_block_groups,
    grow_depth,
    growth_plan,
    manual_schedule,
    mogrow,
    patch_stride,
    renamed_parameters,
    resized_group,
    select_blocks,
    set_depths,
    set_drop_path,
    set_resolution,
    source_name,
)
from surgery.training.phases import check_run_folder, finish_phase, phase_done
from surgery.training.report import append_jsonl
from surgery.workspace import save_tensors, write_json, write_text

__all__ = ["GrowSpec", "grow", "SCHEMA"]

SCHEMA = "surgery.grow/1"
MANIFEST = "grow.json"
VAL_FRACTION = 0.1


class GrowSpec(BaseModel):
    """Everything that decides a growth run (the manifest records it; a rerun must match).

    Attributes:
        model: ``{"arch": timm name, "model_kwargs": {...}}`` of the full model.
        data: target data spec; ``input_size``: full ``(C, H, W)``.
        epochs: the whole budget, search epochs included; ``stages``: K.
        schedule: ``manual`` or ``auto`` (AutoProg).
        init: new blocks at a growth: ``mogrow``, ``copy``, ``zero`` or ``random`` (module docstring).
        mode: ``interleave`` or ``stack``; ``carry_optimizer``: AdamW moments follow their parameters.
        depth_start, resolution_start: the first stage's depth and resolution, as fractions of the full ones.
        drop_path: the full model's drop-path rate (ramped from 0 like the rest).
        ema_decay: None chooses a horizon of 8% of a stage's steps (0.9996 at AutoProg's ImageNet scale).
        search_epochs, search_batches: AutoProg's supernet epochs per stage, and the training batches
            each candidate's loss is measured on.
    """

    model_config = ConfigDict(extra="forbid")

    model: dict[str, Any]
    data: str
    input_size: tuple[int, int, int]
    epochs: int = Field(12, ge=1)
    stages: int = Field(4, ge=1)
    schedule: Literal["manual", "auto"] = "manual"
    init: Literal["mogrow", "copy", "zero", "random"] = "mogrow"
    mode: Literal["interleave", "stack"] = "interleave"
    carry_optimizer: bool = True
    depth_start: float = Field(0.5, gt=0, le=1)
    resolution_start: float = Field(0.6, gt=0, le=1)
    drop_path: float = Field(0.0, ge=0, lt=1)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    search_epochs: int = Field(1, ge=1)
    search_batches: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    seed: int = 0


@dataclass
class _End:
    """What a stage hands to the next: the trained model, its groups, EMA and optimizer."""

    model: nn.Module
    groups: list[BlockGroup]
    ema: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    depths: tuple[int, ...]


@dataclass
class _Carry:
    """A transition's state for the next ``train`` call (given to it as ``on_start``)."""

    old: torch.optim.Optimizer | None
    old_names: dict[int, str]
    model: nn.Module
    renames: dict[str, str]
    ema: dict[str, torch.Tensor]

    def __call__(self, optimizer: torch.optim.Optimizer, ema: nn.Module | None) -> None:
        if self.old is not None:
            carry_optimizer_state(self.old, self.old_names, self.model, self.renames, optimizer)
        if ema is not None:
            ema.load_state_dict(self.ema)


class _Run:
    """One growth run: the built pieces and the stage logic (the public entry is :func:`grow`)."""

    def __init__(self, spec: GrowSpec, run: Path, manifest: dict[str, Any], loaders, num_classes: int,
                 report: Callable[[str], None], quiet: bool):
        self.spec, self.run, self.manifest, self.report, self.quiet = spec, run, manifest, report, quiet
        self.train_loader, self.val_loader, self.test_loader = loaders
        self.num_classes = num_classes
        self.meta = self.build_meta()
        self.groups = [BlockGroup(**g) for g in manifest["groups"]]
        self.full_depths = tuple(g.length for g in self.groups)
        self.has_pos_embed = any(isinstance(getattr(self.meta, n, None), torch.Tensor)
                                 for n in ("pos_embed", "absolute_pos_embed"))
        # a model sized per input (dynamic ViT, CNN) takes any sampled resolution
        self.any_size = bool(spec.model["model_kwargs"].get("dynamic_img_size")) or not self.has_pos_embed
        self.steps_per_epoch = len(self.train_loader)

    # -------------------------------------------------------------- building

    def build(self) -> nn.Module:
        """The full model, freshly initialised from the run's seed."""
        import timm

        torch.manual_seed(self.spec.seed)
        return timm.create_model(self.spec.model["arch"], pretrained=False, num_classes=self.num_classes,
                                 **self.spec.model["model_kwargs"])

    def architecture(self, depths, resolution: int) -> tuple[nn.Module, list[BlockGroup]]:
        """A model of the given per-group depths (weights to be loaded from a checkpoint)."""
        model = self.build()
        groups = set_depths(model, self.groups, depths)
        self.resize(model, resolution)
        return model, groups

    def resize(self, model: nn.Module, resolution: int) -> None:
        if self.has_pos_embed and not self.any_size:
            set_resolution(model, resolution)

    # -------------------------------------------------------------- training windows

    def config(self, epochs: int, first_epoch: int, seed: int):
        from surgery.training.loop import TrainConfig

        spec = self.spec
        stage_steps = spec.epochs / spec.stages * self.steps_per_epoch
        decay = spec.ema_decay or min(0.9999, max(0.9, 1 - 1 / (0.08 * stage_steps)))
        return TrainConfig(epochs=epochs, schedule_epochs=spec.epochs, schedule_start_epoch=first_epoch,
                           batch_size=spec.batch_size, lr=spec.lr, weight_decay=spec.weight_decay,
                           warmup_epochs=min(1.0, spec.epochs / 5), label_smoothing=spec.label_smoothing,
                           ema=True, ema_decay=decay, ema_warmup=True, seed=seed, log_every=0,
                           ddp_find_unused=spec.schedule == "auto")

    def train_window(self, model, folder: Path, epochs: int, first_epoch: int, seed: int, resolution: int,
                     carry: _Carry | None, task=None, size: InputSize | None = None, validate: bool = True):
        """One ``train`` call: a fresh window (``carry`` seeds its optimizer and EMA) or a resumed one."""
        from surgery.training.loop import train

        resume = self.started(folder)
        with (size or InputSize(model, resolution)) as hook:
            hook.size = resolution
            # no validation of a supernet: it would score whichever sub-network the last step drew
            return train(model, self.train_loader, self.val_loader if validate else None,
                         self.config(epochs, first_epoch, seed),
                         out_dir=folder, resume=resume, task=task, quiet=self.quiet,
                         on_start=None if carry is None else carry)

    def end_of(self, model, groups, result, depths) -> _End:
        ema = {n: t.detach().clone() for n, t in result.ema_model.state_dict().items()}
        return _End(model, groups, ema, result.optimizer, tuple(depths))

    # -------------------------------------------------------------- transitions

    def grow_into(self, end: _End, depths, resolution: int, stage: int) -> tuple[list[BlockGroup], _Carry]:
        """Grow the previous stage's model (in place) to ``depths``; the carry for the next window."""
        spec, model = self.spec, end.model
        old_names = {id(p): n for n, p in model.named_parameters()}
        torch.manual_seed(spec.seed * 7919 + stage)  # random-init blocks: the same on resume
        renames, groups, new_prefixes = {}, [], []
        for group, depth in zip(end.groups, depths, strict=True):
            plan = grow_depth(model, group, depth, mode=spec.mode, init="copy" if spec.init == "mogrow" else spec.init)
            renames.update(renamed_parameters(group, plan))
            new_prefixes += [f"{group.container}.{group.start + k}." for k, _, is_new in plan if is_new]
            groups.append(resized_group(group, depth))
        if spec.init == "mogrow":
            mogrow(model, end.ema, renames)
        ema = {}  # end.ema is this transition's own snapshot: its tensors are taken, not copied again
        for name, value in model.state_dict().items():
            from_model = spec.init in ("zero", "random") and any(name.startswith(p) for p in new_prefixes)
            old = end.ema.get(source_name(name, renames))
            ema[name] = value.detach().clone() if from_model or old is None or old.shape != value.shape else old
        self.resize(model, resolution)
        after = model.state_dict()
        ema = {n: (t if t.shape == after[n].shape else after[n].detach().clone())
               for n, t in ema.items()}  # a resampled position embedding: the model's
        carry = _Carry(end.optimizer if spec.carry_optimizer else None, old_names, model, renames, ema)
        return groups, carry

    def extract(self, end: _End, keep: list[list[int]]) -> tuple[list[BlockGroup], _Carry]:
        """Keep only the chosen sub-network's blocks (live weights, AutoProg's ``load_super``)."""
        model = end.model
        old_names = {id(p): n for n, p in model.named_parameters()}
        renames, groups = {}, []
        for group, blocks in zip(end.groups, keep, strict=True):
            new_group, plan = select_blocks(model, group, blocks)
            renames.update(renamed_parameters(group, plan))
            groups.append(new_group)
        ema = {n: end.ema[source_name(n, renames)] for n in model.state_dict()}
        return groups, _Carry(end.optimizer, old_names, model, renames, ema)

    # -------------------------------------------------------------- stages

    def levels(self) -> list:
        """The manual ramp; resolutions are multiples of the patch size (ViTs) or of the network's
        total stride (CNNs: a smaller input would shrink to nothing in the last stage)."""
        spec = self.spec
        multiple = patch_stride(self.meta)
        if multiple is None:
            info = getattr(self.meta, "feature_info", None) or []
            multiple = max([int(f.get("reduction", 1)) for f in info if isinstance(f, dict)] or [1])
        return manual_schedule(spec.epochs, spec.stages, self.full_depths, spec.input_size[-1],
                               depth_start=spec.depth_start, resolution_start=spec.resolution_start,
                               multiple=multiple, drop_path=spec.drop_path)

    def build_meta(self) -> nn.Module:
        import timm

        with torch.device("meta"):
            return timm.create_model(self.spec.model["arch"], pretrained=False, num_classes=self.num_classes,
                                     **self.spec.model["model_kwargs"])

    def stage_folder(self, k: int) -> Path:
        return self.run / f"stage_{k}"

    def started(self, folder: Path) -> bool:
        from surgery.training.checkpoint import find_checkpoint

        return find_checkpoint(folder) is not None

    def restore_end(self, k: int) -> _End:
        """Stage ``k``'s final state from its last checkpoint (a resumed run that grows from it)."""
        rec = self.manifest["stages"][k]
        model, groups = self.architecture(rec["depths"], rec["resolution"])
        set_drop_path(model, rec["drop_path"])
        skip = rec.get("search_epochs", 0)
        result = self.train_window(model, self.stage_folder(k), rec["epochs"] - skip, rec["first_epoch"] + skip,
                                   self.spec.seed + k, rec["resolution"], None)
        return self.end_of(model, groups, result, rec["depths"])

    def run_stage(self, k: int, stage, end: _End | None, current: tuple[int, int], levels) -> tuple[_End, tuple]:
        """Train stage ``k`` (searching first under ``auto``); ``end``: the previous stage's, None when
        this stage already started (it resumes) or is the first."""
        spec = self.spec
        folder = self.stage_folder(k)
        records = self.manifest["stages"]
        if spec.schedule == "auto" and k < spec.stages - 1:
            rec, model, groups, carry = self.search(k, stage, end, current, levels)
            first, epochs = stage.first_epoch + spec.search_epochs, stage.epochs - spec.search_epochs
        else:
            rec = {"index": k, "first_epoch": stage.first_epoch, "epochs": stage.epochs,
                   "depths": list(stage.depths), "resolution": stage.resolution, "drop_path": stage.drop_path}
            if end is None:  # the first stage, or a stage resuming from its own checkpoint
                model, groups = self.architecture(stage.depths, stage.resolution)
                carry = None
            else:
                groups, carry = self.grow_into(end, stage.depths, stage.resolution, k)
                model = end.model
            first, epochs = stage.first_epoch, stage.epochs
        if len(records) <= k:
            records.append(rec)
            write_json(self.run / MANIFEST, self.manifest)
        depths, resolution = tuple(rec["depths"]), rec["resolution"]
        set_drop_path(model, stage.drop_path)
        span = f"epoch {first + 1}" if epochs == 1 else f"epochs {first + 1}-{first + epochs}"
        self.report(f"stage {k + 1}/{spec.stages}: {span} of {spec.epochs}, depth "
                    f"{'/'.join(map(str, depths))}, resolution {resolution}, drop-path {stage.drop_path:.3g}")
        result = self.train_window(model, folder, epochs, first, spec.seed + k, resolution, carry)
        wall = sum(r["epoch_time_s"] for r in result.history)
        # the stage's cost: its epochs, and under AutoProg the supernet's epochs and the measurements
        search_s = (phase_done(folder, "search") or {}).get("wall_s", 0.0) + rec.get("search", {}).get("measure_s", 0.0)
        done = {**{n: v for n, v in rec.items() if n != "search"}, "val_acc": result.last_val_acc,
                "ema_val_acc": result.history[-1]["ema_val_acc"] if result.history else None,
                "wall_s": round(wall + search_s, 3),
                "params": sum(p.numel() for p in model.parameters())}
        finish_phase(self.run, f"stage_{k}", done)
        append_jsonl(self.run / "metrics.jsonl", {"type": "stage", **done})
        return self.end_of(model, groups, result, depths), (rec.get("depth_level", k), rec.get("res_level", k))

    def search(self, k: int, stage, end: _End | None, current: tuple[int, int], levels):
        """AutoProg at the start of stage ``k``: grow to the supernet, train it, measure, choose, extract.

        Returns:
            The stage record, the chosen sub-network (model, groups) and the carry into its window.
        """
        spec = self.spec
        folder = self.stage_folder(k)
        records = self.manifest["stages"]
        if self.started(folder):  # the chosen sub-network already trains: resume it
            rec = records[k]
            model, groups = self.architecture(rec["depths"], rec["resolution"])
            return rec, model, groups, None
        depth_levels = [s.depths for s in levels]
        res_levels = [s.resolution for s in levels]
        options = candidates(k, depth_levels, res_levels, current)
        if not self.any_size:  # a fixed-size position embedding: resolution follows the manual ramp
            options = list({c.depth_level: Candidate(c.depth_level, k, c.depths, res_levels[k])
                            for c in options}.values())
        super_depths = tuple(max(c.depths[i] for c in options) for i in range(len(self.groups)))
        super_res = max(c.resolution for c in options)
        base = tuple(depth_levels[current[0]])
        search_dir = folder / "search"
        if self.started(search_dir):  # resume the supernet's training
            model, groups = self.architecture(super_depths, super_res)
            carry = None
        else:
            if end is None:  # stage 0: the fresh shallow model is grown at once (AutoProg's first search)
                model, groups = self.architecture(base, super_res)
                end = _End(model, groups, {n: t.detach().clone() for n, t in model.state_dict().items()}, None, base)
            groups, carry = self.grow_into(end, super_depths, super_res, k)
            model = end.model
        plans = [growth_plan(b, d, spec.mode) for b, d in zip(base, super_depths, strict=True)]
        elastic = ElasticDepth(groups, base, plans)
        set_drop_path(model, spec.drop_path)  # the search runs at the final regularisation (the paper)
        from surgery.training.loop import classification_task

        hook = InputSize(model, super_res)
        task = SupernetTask(classification_task(spec.label_smoothing), model, elastic, hook, options,
                            seed=spec.seed * 31 + k)
        self.report(f"stage {k + 1}/{spec.stages}: AutoProg search over {len(options)} candidates, supernet depth "
                    f"{'/'.join(map(str, super_depths))} at {super_res}, {spec.search_epochs} epoch(s)")
        result = self.train_window(model, search_dir, spec.search_epochs, stage.first_epoch, spec.seed + 100 + k,
                                   super_res, carry, task=task, size=hook, validate=False)
        elastic.apply(model, None)
        finish_phase(folder, "search", {"epochs": spec.search_epochs,
                                        "wall_s": round(sum(r["epoch_time_s"] for r in result.history), 3)})
        super_end = self.end_of(model, groups, result, super_depths)
        if len(records) > k:  # measured before an interruption: the recorded choice stands
            rec = records[k]
        else:
            with hook:
                rec = self.measure(k, stage, options, super_end, elastic, result.ema_model, hook)
            from surgery import distributed

            # step times differ between ranks: rank 0's measurement decides, so all build one architecture
            rec = distributed.broadcast_object(rec)
            records.append(rec)
            write_json(self.run / MANIFEST, self.manifest)
            append_jsonl(self.run / "metrics.jsonl", {"type": "search", "stage": k, **rec["search"]})
            plot_searches([{"stage": r["index"], **r["search"]} for r in records if "search" in r],
                          self.run / "search.png")
        groups, carry = self.extract(super_end, elastic.active(rec["depths"]))
        self.resize(model, rec["resolution"])
        return rec, model, groups, carry

    def measure(self, k, stage, options, end: _End, elastic: ElasticDepth, ema_model: nn.Module,
                hook: InputSize) -> dict[str, Any]:
        """Score every candidate, pick one (:func:`autoprog_choice`); the stage record with the table."""
        import torch.nn.functional as F

        spec = self.spec
        started = time.perf_counter()
        device = next(end.model.parameters()).device
        batches = []
        for i, (x, y) in enumerate(self.train_loader):
            if i >= spec.search_batches:
                break
            batches.append((x.to(device), y.to(device)))
        table = measure_candidates(end.model, ema_model, elastic, hook, options, batches,
                                   lambda z, y: F.cross_entropy(z.float(), y), seed=spec.seed)
        index, fit = autoprog_choice([(t["loss"], t["step_s"]) for t in table])
        chosen = table[index]
        self.report("  candidates (depth@resolution: EMA loss, ms per step): "
                    + "; ".join(f"{'/'.join(map(str, t['depths']))}@{t['resolution']}: {t['loss']:.3f}, "
                                f"{t['step_s'] * 1e3:.0f}" + (" <-" if i == index else "") for i, t in enumerate(table))
                    + f"; fit L ~ T^{fit['b']:.3f}, time weight w = {fit['w']:.3f} (argmin L T^w)")
        return {"index": k, "first_epoch": stage.first_epoch, "epochs": stage.epochs,
                "search_epochs": spec.search_epochs, "depths": chosen["depths"], "resolution": chosen["resolution"],
                "drop_path": stage.drop_path, "depth_level": chosen["depth_level"], "res_level": chosen["res_level"],
                "search": {"candidates": table, "chosen": index, "fit": fit,
                           "measure_s": round(time.perf_counter() - started, 3)}}

    def stages_run(self) -> _End:
        """Every stage in order, skipping finished ones; the last stage's end."""
        levels = self.levels()
        end, current = None, (0, 0)
        for k, stage in enumerate(levels):
            done = phase_done(self.run, f"stage_{k}")
            if done is not None:
                end, current = None, (done.get("depth_level", k), done.get("res_level", k))
                continue
            started = self.started(self.stage_folder(k)) or self.started(self.stage_folder(k) / "search")
            if k > 0 and end is None and not started:
                end = self.restore_end(k - 1)
            end, current = self.run_stage(k, stage, None if started else end, current, levels)
        if end is None:  # every stage had finished: the last one's state
            end = self.restore_end(len(levels) - 1)
        return end


def _accepts(arch: str, kwargs: dict[str, Any], **extra) -> bool:
    """Whether timm's constructor takes ``extra`` (tried on the meta device)."""
    import timm

    try:
        with torch.device("meta"):
            timm.create_model(arch, pretrained=False, **kwargs, **extra)
    except (TypeError, AssertionError, ValueError):
        return False
    return True


def _card(manifest: dict[str, Any]) -> str:
    spec, res = manifest["spec"], manifest.get("result", {})
    rows = []
    for rec in manifest["stages"]:
        val = rec.get("val_acc")
        search = rec.get("search")
        rows.append(f"| {rec['index'] + 1} | {rec['first_epoch'] + 1}-{rec['first_epoch'] + rec['epochs']} | "
                    f"{'/'.join(map(str, rec['depths']))} | {rec['resolution']} | "
                    f"{'-' if val is None else f'{100 * val:.1f}'} | "
                    f"{'-' if not search else len(search['candidates'])} |")
    lines = [f"# {spec['model']['arch']} grown during training", "",
             "Automated Progressive Learning (Li et al., CVPR 2022), made by `surgery grow`: "
             f"{spec['schedule']} schedule, {spec['stages']} stages, new blocks `{spec['init']}` "
             f"({spec['mode']}), optimizer moments {'carried' if spec['carry_optimizer'] else 'reset'}.", "",
             f"Data `{spec['data']}` at {tuple(spec['input_size'])}; {spec['epochs']} epochs, batch "
             f"{spec['batch_size']}, lr {spec['lr']}.", "",
             "| stage | epochs | depths | resolution | val top-1 | AutoProg candidates |", "|---|---|---|---|---|---|",
             *rows]
    if res:
        lines += ["", f"Test top-1 {res['top1']:.2%}, EMA {res['ema_top1']:.2%} ({res['n']} images); the saved weights "
                  f"are the {'EMA' if res.get('saved') == 'ema' else 'model'}'s (the better on validation). Training "
                  f"{res['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def grow(model: str | dict[str, Any], data: str, *, out: str | os.PathLike, epochs: int = 12, stages: int = 4,
         schedule: str = "manual", init: str = "mogrow", mode: str = "interleave", input_size: int | None = None,
         batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05, label_smoothing: float = 0.1,
         drop_path: float = 0.0, depth_start: float = 0.5, resolution_start: float = 0.6,
         carry_optimizer: bool = True, ema_decay: float | None = None, search_epochs: int = 1,
         search_batches: int = 10, seed: int = 0, quiet: bool = False,
         report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``model`` on ``data`` while it grows in depth and resolution; save it in ``out``.

    Args:
        model: a timm name, or ``{"arch": name, "model_kwargs": {...}}`` (random init): the full model.
        data: target data (``digits``, ``fashion-mnist``, a folder, ...).
        out: the run folder, also the model folder; rerunning the same call resumes it.
        epochs: the whole budget (AutoProg's search epochs included); stages: K >= 1 (1 = plain training).
        schedule: ``manual`` or ``auto`` (AutoProg); init, mode, carry_optimizer, ema_decay,
            depth_start, resolution_start, drop_path, search_epochs, search_batches: see :class:`GrowSpec`.
        input_size: full square input side (default the model's own).
        batch_size, lr, weight_decay, label_smoothing, seed: the training recipe.
        quiet: no progress output; ``report``: receives one line per event (default print).

    Returns:
        The manifest (``grow.json``), with ``result`` (test top-1 of the model and of its EMA, wall seconds).

    Raises:
        SurgeryError: bad options; a model with no repeated shape-preserving blocks; more stages than
            its blocks allow; a resolution the patch size does not divide; ``out`` holding something else.
    """

    from surgery import distributed
    from surgery.assembled import RECIPE_SCHEMA
    from surgery.training.incubation_run import with_input_size
    from surgery.training.loop import evaluate
    from surgery.training.phases import split_loaders
    from zoo.entries import ZooEntry, data_config

    distributed.init_from_env()
    if report is None:
        report = (lambda line: None) if quiet or not distributed.is_main() else (lambda line: print(line, flush=True))
    entry = {"name": model, "arch": model} if isinstance(model, str) else {"name": model.get("arch"), **model}
    entry = with_input_size({"name": entry["name"], "arch": entry["arch"], "random_init": True,
                             "model_kwargs": dict(entry.get("model_kwargs") or {})}, input_size)
    zentry = ZooEntry.model_validate(entry)
    kwargs = dict(zentry.model_kwargs)
    import timm

    try:
        with torch.device("meta"):
            probe = timm.create_model(zentry.timm_name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise SurgeryError(f"cannot build {zentry.timm_name}: {str(e).splitlines()[0]}") from None
    if "dynamic_img_size" not in kwargs and _accepts(zentry.timm_name, kwargs, dynamic_img_size=True):
        kwargs["dynamic_img_size"] = True  # position embeddings resampled per input: any stage resolution
    if drop_path > 0 and "drop_path_rate" not in kwargs:
        kwargs["drop_path_rate"] = drop_path  # builds the DropPath modules the stages ramp
    cfg = data_config(zentry, probe)
    size = input_size or cfg["input_size"][-1]
    patch = patch_stride(probe)
    if patch is not None and size % patch:
        raise SurgeryError(f"input size {size} is not a multiple of {zentry.timm_name}'s patch size {patch}")
    chans = int(kwargs.get("in_chans", 3))
    try:
        spec = GrowSpec(model={"arch": zentry.timm_name, "model_kwargs": kwargs}, data=data,
                        input_size=(chans, size, size), epochs=epochs, stages=stages, schedule=schedule, init=init,
                        mode=mode, carry_optimizer=carry_optimizer, depth_start=depth_start,
                        resolution_start=resolution_start, drop_path=drop_path, ema_decay=ema_decay,
                        search_epochs=search_epochs, search_batches=search_batches, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, label_smoothing=label_smoothing, seed=seed)
    except ValidationError as e:
        err = e.errors()[0]
        raise SurgeryError(f"bad --{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    if spec.epochs < spec.stages:
        raise SurgeryError(f"{spec.stages} stages need at least {spec.stages} epochs (got {spec.epochs})")
    if spec.schedule == "auto" and spec.stages > 1 and spec.epochs // spec.stages <= spec.search_epochs:
        raise SurgeryError(f"AutoProg needs stages longer than its {spec.search_epochs} search epoch(s), but "
                           f"{spec.epochs} epochs in {spec.stages} stages give {spec.epochs // spec.stages} per stage: "
                           "raise --epochs or lower --stages")
    run = Path(out)
    existing = check_run_folder(run, MANIFEST, SCHEMA, spec, "growth run")
    distributed.check_batch(spec.batch_size)
    distributed.barrier()
    if existing is not None and existing.get("complete"):
        report(f"{run} is already trained with these options")
        return existing
    loaders, classes = split_loaders(spec.data, spec.seed, spec.input_size, spec.batch_size, cfg["mean"], cfg["std"],
                                     VAL_FRACTION)
    if existing is None:
        torch.manual_seed(spec.seed)
        full = timm.create_model(spec.model["arch"], pretrained=False, num_classes=len(classes), **kwargs)
        example = next(iter(loaders[1]))[0][:2]
        groups = find_block_groups(full, example)
        if not groups:
            raise SurgeryError(f"{zentry.timm_name} has no run of repeated shape-preserving blocks to grow")
        full.eval()
        manifest = {"schema": SCHEMA, "spec": spec.model_dump(mode="json"), "classes": classes,
                    "groups": [asdict(g) for g in groups], "stages": [], "complete": False}
    else:
        manifest = existing
    state = _Run(spec, run, manifest, loaders, len(classes), report, quiet)
    levels = state.levels()
    totals = [sum(s.depths) for s in levels]
    if spec.depth_start < 1 and any(b <= a for a, b in zip(totals, totals[1:], strict=False)):
        raise SurgeryError(f"{spec.stages} stages are more than {zentry.timm_name}'s blocks allow (depths "
                           f"{', '.join('/'.join(map(str, s.depths)) for s in levels)}): lower --stages")
    if existing is None:
        _probe_resolutions(full, state, levels, example, zentry.timm_name)
        run.mkdir(parents=True, exist_ok=True)
        write_json(run / MANIFEST, manifest)
    else:
        report(f"resuming {run}: {sum(1 for k in range(spec.stages) if phase_done(run, f'stage_{k}'))} of "
               f"{spec.stages} stages done")
    groups_text = ", ".join(f"{g.container}[{g.start}:{g.stop}] {g.block_class}" for g in state.groups)
    report(f"{zentry.timm_name}: growing {groups_text}; stages " + ", ".join(
        f"{'/'.join(map(str, s.depths))}@{s.resolution}" for s in levels)
        + (" (AutoProg picks each stage's depth and resolution)" if spec.schedule == "auto" and spec.stages > 1
           else " (one stage: plain training, AutoProg has nothing to choose)" if spec.schedule == "auto" else ""))
    patch = patch_stride(state.meta)
    if patch is not None and spec.resolution_start < 1:
        side = levels[0].resolution // patch
        if side < 4:
            report(f"note: the first stage sees a {side}x{side} token grid; growing the resolution from so few "
                   "tokens costs accuracy (a patch covers a different share of the image at each stage): "
                   "consider --resolution-start 1")
    end = state.stages_run()
    net = end.model
    test = evaluate(net, loaders[2])
    ema_net = state.build()
    ema_net.load_state_dict(end.ema)
    ema_test = evaluate(ema_net, loaders[2])
    stage_recs = [phase_done(run, f"stage_{k}") for k in range(spec.stages)]
    # the saved weights: the EMA's when it validates better at the end (chosen on val, never on test)
    last = stage_recs[-1] or {}
    use_ema = (last.get("ema_val_acc") or 0.0) > (last.get("val_acc") or 0.0)
    saved = ema_net if use_ema else net
    manifest["stages"] = [{**m, **(r or {})} for m, r in zip(manifest["stages"], stage_recs, strict=False)]
    manifest["result"] = {"top1": test["top1"], "ema_top1": ema_test["top1"], "n": test["n"],
                          "saved": "ema" if use_ema else "model",
                          "wall_s": round(sum((r or {}).get("wall_s", 0.0) for r in stage_recs), 3),
                          "params": sum(p.numel() for p in net.parameters())}
    manifest["complete"] = True
    arch = {"name": zentry.name, "arch": spec.model["arch"], "random_init": True,
            "model_kwargs": {**kwargs, "num_classes": len(classes)}}
    save_tensors(run / "model.safetensors", saved.state_dict(), metadata={"format": "pt", "schema": RECIPE_SCHEMA})
    write_json(run / "config.json", {
        "schema": RECIPE_SCHEMA, "kind": "model", "entry": arch, "num_classes": len(classes), "classes": classes,
        "target": spec.data, "input_size": list(spec.input_size), "mean": list(cfg["mean"]), "std": list(cfg["std"]),
        "made_by": "surgery grow"})
    write_text(run / "README.md", _card(manifest))
    write_json(run / MANIFEST, manifest)
    distributed.barrier()
    report(f"done: test top-1 {test['top1']:.4f} (EMA {ema_test['top1']:.4f}), training "
           f"{manifest['result']['wall_s']:.0f} s; model folder {run} (saved: the "
           f"{'EMA, better on validation' if use_ema else 'model'})")
    return manifest


def _probe_resolutions(model: nn.Module, state: _Run, levels, example: torch.Tensor, name: str) -> None:
    """One image through the full model at every stage's resolution, before anything is written: a
    size the model cannot take (a CNN's stride, a window size) is a one-line error, not a crash in a stage."""
    for size in sorted({s.resolution for s in levels}):
        hook = InputSize(model, size)
        try:
            state.resize(model, size)  # a fixed position embedding is resampled (this model is a probe)
            with hook, torch.no_grad():
                model(example[:1])
        except (RuntimeError, AssertionError, ValueError, SurgeryError) as e:
            raise SurgeryError(f"{name} cannot take {size} px inputs (a stage's resolution: "
                               f"{', '.join(str(s.resolution) for s in levels)}): {str(e).splitlines()[0][:160]}; "
                               "raise --resolution-start or --input-size") from None
