"""One training loop for everything in surgery that trains: aligning and fine-tuning a reassembled
model, incubating its stitched segments, co-training and progressive growth.

Provenance (ideas, not code):

* timm's ``train.py`` recipe: AdamW without weight decay on biases / norm weights / the names in
  ``model.no_weight_decay()``, a per-step cosine schedule with linear warm-up down to ``min_lr``,
  label-smoothing cross-entropy, an EMA of the weights evaluated beside the raw model (timm's
  ``ModelEmaV3``), AMP with a gradient scaler on CUDA, optional gradient clipping and
  channels-last memory format.
* DeRy (Yang et al., NeurIPS 2022) fine-tunes a reassembled network in two modes: FZ (pretrained
  blocks frozen, only stitches and head trained) and FT (everything trained). They are
  ``freeze="blocks"`` and ``freeze="none"`` here. Deep Incubation (Ni et al., ICCV 2023) trains one
  module inside a frozen meta model: pass that module's parameters as ``trainable``.

What a step computes is a *task*: a callable ``task(model, inputs, targets) -> dict`` with ``"loss"`` (a
scalar tensor to minimise), ``"output"`` (the logits ``(N, classes)``, for the running accuracy) and any
other scalar tensors, logged as ``train_<name>`` epoch means (timm's ``TrainingTask`` interface, in
which the loss and forward live together). The default, :func:`classification_task`, is
label-smoothing cross-entropy on ``model(inputs)``. A task with a method ``on_step(step, total_steps)``
is told the global step (0-based) and the run's total before each step, e.g. for a loss-weight ramp
that must continue where a resumed run left off. A hybrid with frozen parts is just a model with a
``trainable=`` selection; a teacher, a distillation term or an ensemble's agreement loss is a task, and
all of them train in this one loop. An ``nn.Module`` task is moved to the training device; the model
owns every trained parameter and the checkpoint.

Under torch.distributed (``torchrun``, or any process group of more than one rank; see
:mod:`surgery.distributed`) the same call trains data-parallel, with nothing to change in the caller:

* DDP wraps the model's forward with every frozen parameter and the buffers of frozen norm layers
  registered as ignored, so only the trainable part is broadcast, bucketed and all-reduced (timm's
  rule: wrap only the trainable module). The task receives the DDP wrapper: it must *call* the
  model (DDP's bookkeeping runs in its forward); a task that needs the model's attributes reads
  ``getattr(model, "module", model)``. A teacher inside a task is never wrapped.
* The training loader is re-dealt by a ``DistributedSampler`` seeded by ``config.seed``: its batch
  size stays the *global* batch (each rank takes ``batch / W``, which ``W`` must divide), so the
  learning rate and schedule mean the same at any ``W``; it must be a DataLoader or a Dataset.
* Epoch figures (loss, accuracy, the task's terms, images/s) are summed over the ranks, and
  validation is sharded and reduced (:func:`evaluate`); step lines are rank 0's running figures.
  After each epoch every rank takes rank 0's buffers (batch-norm statistics), which the checkpoint
  holds.
* Rank 0 writes the metrics log and checkpoints and prints progress; the other ranks are silent.
  Randomness (dropout, augmentation, a task's draws) is reseeded at each epoch from
  ``(seed, epoch, rank)``, so a run resumes at an epoch boundary with the same or another number of
  processes without per-rank RNG state (another number warns: the data order differs).

Which parameters train, in order of precedence:

1. ``trainable`` given to :func:`train`: a list of parameters or a callable ``model -> params``.
2. ``freeze != "none"`` and the model has a method ``trainable_parameters(freeze)``: its result.
3. ``freeze == "blocks"``: every parameter except those of modules whose ``_surgery_role``
   attribute is ``"block"`` (a pretrained donor block). Roles are ``"block"``, ``"stitch"``,
   ``"head"`` and ``"stem"``; a module without the attribute inherits its parent's role, so the
   nearest marked ancestor decides. Unmarked parameters train.
4. ``freeze == "none"``: every parameter with ``requires_grad`` (a user's own freezing is kept).

``requires_grad`` is set accordingly for the run and restored afterwards, so a later FT run with
``freeze="none"`` trains everything again. Batch-norm layers whose affine parameters are all frozen,
or that sit in a frozen block, are put in eval mode at every epoch start: their running statistics
must keep describing the frozen weights they were trained with.

``channels_last="auto"`` turns NHWC on when the model has a spatial convolution (an ``nn.Conv2d``
with a kernel larger than 1x1 that is not a patchify stem, kernel == stride): oneDNN on CPU and
cuDNN tensor cores run those faster in NHWC, while a ViT's single patchify conv gains nothing.

Files written to ``out_dir``:

* ``metrics.jsonl``: one JSON object per line. Epoch lines have the keys of :data:`EPOCH_KEYS`
  (``type == "epoch"``), step lines (every ``log_every`` steps) those of :data:`STEP_KEYS`
  (``type == "step"``; loss and accuracy are running means over the epoch so far).
* ``checkpoint/model.safetensors``: the model's weights (parameters and buffers).
* ``checkpoint/state.pt``: optimizer, scheduler, scaler, EMA weights, epoch, step, RNG states,
  history and config; plain containers and tensors only, so ``torch.load(..., weights_only=True)``
  reads it. The folder is written as ``checkpoint.tmp`` and renamed into place, so ``checkpoint``
  (or ``checkpoint.old`` after a crash between two renames) is always a complete checkpoint.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load_model
from torch import nn
from torch.utils.data import DataLoader, Dataset

from surgery import distributed
from surgery.errors import SurgeryError
from surgery.training.checkpoint import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    find_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from surgery.training.report import TrainReporter, append_jsonl, truncate_metrics
from surgery.training.schedule import build_scheduler, cosine_lr, make_ema

__all__ = [
    "TrainConfig", "TrainResult", "Task", "train", "evaluate", "classification_task", "select_trainable", "cosine_lr",
    "build_scheduler",
    "ROLE_ATTR", "ROLES", "EPOCH_KEYS", "STEP_KEYS", "CHECKPOINT_DIR",
]

ROLE_ATTR = "_surgery_role"
ROLES = ("block", "stitch", "head", "stem")
EPOCH_KEYS = (
    "type", "epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "ema_val_loss", "ema_val_acc",
    "lr", "images_per_s", "epoch_time_s",
)
STEP_KEYS = ("type", "epoch", "step", "loss", "acc", "lr", "images_per_s")
# Config fields that may change between a run and its resumption without a warning.
_RESUME_FREE_FIELDS = {"log_every", "device", "num_workers"}

# task(model, inputs, targets) -> {"loss": scalar, "output": logits (N, classes), other scalar terms}
Task = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def classification_task(label_smoothing: float = 0.0) -> Task:
    """The default task: ``{"loss": cross_entropy(model(x), y), "output": model(x)}``.

    Args:
        label_smoothing: of the cross-entropy, in ``[0, 1)``.

    Returns:
        A :data:`Task`; the loss is computed in float32 whatever the autocast dtype of the logits.
    """
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def task(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(x)
        return {"loss": criterion(logits.float(), y), "output": logits}

    return task


class TrainConfig(BaseModel):
    """Hyper-parameters of one training run (a config file reproduces a run given the data).

    Attributes:
        epochs: total epochs, counting those already done when resuming.
        batch_size: used only when a ``Dataset`` is passed instead of a loader.
        num_workers: loader workers, same condition.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW decoupled weight decay; never applied to biases, 1-D params (norms)
            or names in ``model.no_weight_decay()``.
        warmup_epochs: linear warm-up length in epochs; fractions allowed (``0.5``).
        warmup_steps: warm-up length in optimizer steps; overrides ``warmup_epochs`` when set.
        min_lr: learning rate the cosine ends at.
        label_smoothing: of the training cross-entropy (evaluation uses plain cross-entropy).
        ema: keep an exponential moving average of the weights and evaluate it too.
        ema_decay: EMA decay per step.
        ema_warmup: ramp the decay up early in training (timm's EMA warm-up), useful for short runs.
        amp: mixed precision; ``"auto"`` means on when the device is CUDA. Ignored on CPU.
        amp_dtype: autocast dtype; float16 uses a gradient scaler, bfloat16 does not need one.
        device: ``"auto"`` (CUDA when present, else CPU) or a torch device string.
        channels_last: NHWC memory format; ``"auto"`` follows the rule in the module docstring.
        grad_clip: max global gradient norm, or None for no clipping.
        seed: seeds torch, numpy and ``random`` at the start of a fresh run and the shuffling of
            loaders built here.
        freeze: ``"none"`` (DeRy FT) or ``"blocks"`` (DeRy FZ); see the module docstring.
        log_every: a step line (plain output and metrics.jsonl) every this many steps; 0 for none.
        schedule_epochs: this run is a window of a learning-rate schedule this many epochs long
            (a stage of progressive growth); None: the schedule is this run's ``epochs``.
        schedule_start_epoch: where in that schedule this run starts (its warm-up and cosine continue
            from there); ``schedule_start_epoch + epochs`` must not exceed ``schedule_epochs``.
        ddp_find_unused: under torch.distributed, let DDP find parameters a step did not use (an
            AutoProg supernet skips blocks); off otherwise, as it costs a graph traversal per step.
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    ema: bool = False
    ema_decay: float = Field(0.9998, gt=0, lt=1)
    ema_warmup: bool = False
    amp: bool | Literal["auto"] = "auto"
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    device: str = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    grad_clip: float | None = Field(None, gt=0)
    seed: int = 0
    freeze: Literal["none", "blocks"] = "none"
    log_every: int = Field(50, ge=0)
    schedule_epochs: int | None = Field(None, ge=1)
    schedule_start_epoch: int = Field(0, ge=0)
    ddp_find_unused: bool = False

    @model_validator(mode="after")
    def _check_lrs(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.schedule_epochs is None and self.schedule_start_epoch:
            raise ValueError("schedule_start_epoch needs schedule_epochs (the schedule it is a place in)")
        if self.schedule_epochs is not None and self.schedule_start_epoch + self.epochs > self.schedule_epochs:
            raise ValueError(f"epochs {self.schedule_start_epoch}..{self.schedule_start_epoch + self.epochs} run past "
                             f"schedule_epochs ({self.schedule_epochs})")
        return self


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        history: one dict per epoch with the keys of :data:`EPOCH_KEYS` (same as metrics.jsonl).
        best_val_acc: best validation top-1 of the raw model (fraction in [0, 1]), None without val.
        best_epoch: 1-based epoch of ``best_val_acc``.
        last_val_acc: validation top-1 after the last epoch.
        best_ema_val_acc: best validation top-1 of the EMA weights, None without EMA or val.
        checkpoint: folder of the last checkpoint, None without ``out_dir``.
        ema_model: the EMA copy of the model (eval mode), None without EMA.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_acc: float | None = None
    best_epoch: int | None = None
    last_val_acc: float | None = None
    best_ema_val_acc: float | None = None
    checkpoint: Path | None = None
    ema_model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (without the EMA model)."""
        return {
            "history": self.history, "best_val_acc": self.best_val_acc, "best_epoch": self.best_epoch,
            "last_val_acc": self.last_val_acc, "best_ema_val_acc": self.best_ema_val_acc,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
        }


# ---------------------------------------------------------------------------- parameter selection


def _role_of_params(model: nn.Module) -> dict[int, str | None]:
    """Effective role of every parameter (by id): the nearest marked ancestor's ``_surgery_role``."""
    roles: dict[int, str | None] = {}

    def visit(module: nn.Module, inherited: str | None) -> None:
        role = getattr(module, ROLE_ATTR, None) or inherited
        if role is not None and role not in ROLES:
            raise SurgeryError(f"unknown {ROLE_ATTR} {role!r} on {type(module).__name__}; expected one of {ROLES}")
        for p in module.parameters(recurse=False):
            roles.setdefault(id(p), role)
        for child in module.children():
            visit(child, role)

    visit(model, None)
    return roles


def select_trainable(
    model: nn.Module,
    freeze: str = "none",
    trainable: Callable[[nn.Module], Iterable[nn.Parameter]] | Iterable[nn.Parameter] | None = None,
) -> list[nn.Parameter]:
    """The parameters a run trains, following the precedence in the module docstring.

    Args:
        model: the model.
        freeze: ``"none"`` or ``"blocks"``.
        trainable: optional override, a parameter list or a callable ``model -> params``.

    Returns:
        The trainable parameters in ``model.parameters()`` order, without duplicates.

    Raises:
        SurgeryError: nothing would train, a parameter is not the model's, or ``freeze="blocks"``
            on a model with no marked blocks and no ``trainable_parameters`` method.
    """
    if freeze not in ("none", "blocks"):
        raise SurgeryError(f"unknown freeze mode {freeze!r}; expected 'none' or 'blocks'")
    own = list(model.parameters())
    if trainable is not None:
        chosen = trainable(model) if callable(trainable) else trainable
        ids = {id(p) for p in chosen}
        unknown = ids - {id(p) for p in own}
        if unknown:
            raise SurgeryError(f"{len(unknown)} trainable parameter(s) do not belong to the model")
    elif freeze != "none" and callable(getattr(model, "trainable_parameters", None)):
        ids = {id(p) for p in model.trainable_parameters(freeze)}
    elif freeze == "blocks":
        roles = _role_of_params(model)
        if "block" not in roles.values():
            raise SurgeryError(
                f"freeze='blocks' but no module of the model has {ROLE_ATTR}='block' and the model has no "
                "trainable_parameters(freeze) method; mark the pretrained blocks or use freeze='none'"
            )
        ids = {i for i, role in roles.items() if role != "block"}
    else:
        ids = {id(p) for p in own if p.requires_grad}
    selected = [p for p in own if id(p) in ids]
    if not selected:
        raise SurgeryError("no trainable parameters: everything is frozen")
    return selected


def _frozen_norms(model: nn.Module, trainable_ids: set[int], freeze: str) -> list[nn.Module]:
    """Norm layers with running statistics that belong to frozen parts (kept in eval mode)."""
    block_norms: set[int] = set()
    if freeze == "blocks":

        def visit(module: nn.Module, in_block: bool) -> None:
            in_block = in_block or getattr(module, ROLE_ATTR, None) == "block"
            if in_block:
                block_norms.add(id(module))
            for child in module.children():
                visit(child, in_block)

        visit(model, False)
    norms = []
    for m in model.modules():
        if not isinstance(m, nn.modules.batchnorm._NormBase) or not m.track_running_stats:
            continue
        params = list(m.parameters(recurse=False))
        if id(m) in block_norms or (params and not any(id(p) in trainable_ids for p in params)):
            norms.append(m)
    return norms


def _param_groups(model: nn.Module, params: list[nn.Parameter], weight_decay: float, lr: float,
                  lr_scale: Mapping[nn.Parameter, float] | None = None) -> list[dict[str, Any]]:
    """timm's split: no weight decay on biases, 1-D tensors (norms, scales) and ``no_weight_decay()`` names.

    ``lr_scale`` maps parameters to a multiplier of ``lr`` (default 1): one group per (decay, scale),
    each starting at ``lr * scale``; the schedule multiplies every group's initial lr, as timm's
    layer-wise ``lr_scale`` groups do.
    """
    skip = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    names = {id(p): n for n, p in model.named_parameters()}
    scales = {id(p): float(s) for p, s in (lr_scale or {}).items()}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for p in params:
        name = names.get(id(p), "")
        decay = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        groups.setdefault((decay, scales.get(id(p), 1.0)), []).append(p)
    order = sorted(groups, key=lambda key: (not key[0], -key[1]))  # decay first, then by scale
    return [{"params": groups[key], "weight_decay": weight_decay if key[0] else 0.0, "lr": lr * key[1]}
            for key in order]


# ---------------------------------------------------------------------------- data and devices


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise SurgeryError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SurgeryError(f"device {device!r} requested but CUDA is not available")
    return dev


def _wants_channels_last(model: nn.Module) -> bool:
    """A spatial convolution that is not a patchify stem (see the module docstring)."""
    for m in model.modules():
        if (isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 and tuple(m.kernel_size) != tuple(m.stride)
                and m.weight.dim() == 4):  # not a member-stacked (5-D) weight, which NHWC cannot hold
            return True
    return False


def _as_loader(data: Any, config: TrainConfig, shuffle: bool, generator: torch.Generator | None) -> Any:
    """A DataLoader or any sized iterable of ``(inputs, targets)`` passes; a Dataset gets a loader."""
    if data is None or isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        # Drop a trailing partial batch when training: a batch of 1 breaks BatchNorm.
        drop_last = shuffle and len(data) > config.batch_size
        return DataLoader(data, batch_size=config.batch_size, shuffle=shuffle, generator=generator,
                          num_workers=config.num_workers, drop_last=drop_last)
    if not hasattr(data, "__len__") or not hasattr(data, "__iter__"):
        raise SurgeryError(f"expected a DataLoader, a sized Dataset or a list of batches, got {type(data).__name__}")
    return data


def _batch_to(batch: Any, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise SurgeryError("each batch must be (inputs, targets) with integer class targets")
    x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _is_channels_last(model: nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.ndim == 4:
            w = m.weight
            return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    return False


# ---------------------------------------------------------------------------- evaluation


def evaluate(
    model: nn.Module, loader: Any, device: str | torch.device | None = None, *, amp: bool = False,
    channels_last: bool | None = None, shard: bool | None = None,
) -> dict[str, float | int]:
    """Top-1 accuracy and mean cross-entropy (no label smoothing) of ``model`` on ``loader``.

    Args:
        model: a classifier returning logits; moved to ``device`` when one is given.
        loader: sized iterable of ``(inputs, integer targets)`` batches.
        device: where to run; None uses the device of the model's parameters.
        amp: autocast (float16) on CUDA.
        channels_last: feed NHWC inputs; None does so when the model's convolutions are NHWC.
        shard: under torch.distributed, each rank evaluates every W-th sample of the loader's data
            set and the sums are reduced (every rank gets the full-set figures; every rank must
            call). None: whenever a process group is active. The model must be the same on all ranks.

    Returns:
        ``{"top1": fraction in [0, 1], "loss": mean per sample, "n": samples, "images_per_s": float}``
        (``images_per_s`` over all ranks when sharded).
    """
    if device is None:
        dev = _model_device(model)
    else:
        dev = _resolve_device(str(device)) if isinstance(device, str) else device
        model.to(dev)
    cl = _is_channels_last(model) if channels_last is None else channels_last
    shard = distributed.active() if shard is None else shard and distributed.active()
    if shard:
        loader = distributed.shard_eval_loader(loader)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    n = 0
    start = time.perf_counter()
    try:
        with torch.inference_mode(), torch.autocast(dev.type, enabled=amp and dev.type == "cuda"):
            for batch in loader:
                x, y = _batch_to(batch, dev, cl)
                logits = model(x).float()
                loss_sum += F.cross_entropy(logits, y, reduction="sum")
                correct += (logits.argmax(-1) == y).sum()
                n += y.shape[0]
        if shard:
            count = torch.tensor(n, dtype=torch.int64, device=dev)
            distributed.all_reduce_sum(loss_sum, correct, count)
            n = int(count.item())
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    finally:
        model.train(was_training)
    if n == 0:
        raise SurgeryError("evaluation loader yielded no samples")
    elapsed = max(time.perf_counter() - start, 1e-9)
    return {"top1": correct.item() / n, "loss": loss_sum.item() / n, "n": n, "images_per_s": n / elapsed}


# ---------------------------------------------------------------------------- training


_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"  # the attribute DDP's ignore list is kept in


def _rank_seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, rank)."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**63


def _wrap_ddp(model: nn.Module, trainable_ids: set[int], frozen_norms: list[nn.Module],
              device: torch.device, find_unused: bool = False) -> nn.Module:
    """DDP over the trainable part only (timm's training-task rule).

    Frozen parameters (a meta model around an incubated module, pretrained blocks under
    ``freeze="blocks"``) and the buffers of frozen norm layers are registered as ignored, so DDP
    neither broadcasts nor buckets nor all-reduces them; only trainable parameters and the running
    statistics of trainable norms are synchronised. ``_set_params_and_buffers_to_ignore_for_model``
    is DDP's own (underscored) hook for exactly this, used by torch's FSDP and torchrec; wrapping
    submodules instead would rename every key of the model's state dict.
    """
    from torch.nn.parallel import DistributedDataParallel

    frozen_norm_ids = {id(m) for m in frozen_norms}
    ignored = [n for n, p in model.named_parameters() if id(p) not in trainable_ids]
    ignored += [f"{mn}.{bn}" if mn else bn for mn, m in model.named_modules() if id(m) in frozen_norm_ids
                for bn, _ in m.named_buffers(recurse=False)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def _reduce_epoch(model: nn.Module, loss_sum: torch.Tensor, correct: torch.Tensor,
                  term_sums: dict[str, torch.Tensor], seen: int, scored: int,
                  device: torch.device) -> tuple[int, int]:
    """Sum an epoch's running figures over the ranks (in place) and give every rank rank 0's buffers.

    DDP broadcasts buffers at the start of each forward, so after the last step each rank's
    batch-norm statistics hold one local update; rank 0's are what the checkpoint saves, and
    validation must see the same model on every rank.
    """
    counts = torch.tensor([seen, scored], dtype=torch.float64, device=device)
    names = sorted(term_sums)
    terms = torch.stack([term_sums[n].to(torch.float64) for n in names]) if names else None
    distributed.all_reduce_sum(loss_sum, correct, counts, *([terms] if terms is not None else []))
    for i, name in enumerate(names):
        term_sums[name] = terms[i]
    ignored = set(getattr(model, _DDP_IGNORE, ()))
    for name, buf in model.named_buffers():
        if name not in ignored:
            torch.distributed.broadcast(buf, src=0)
    return int(counts[0].item()), int(counts[1].item())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    model: nn.Module,
    train_loader: Any,
    val_loader: Any = None,
    config: TrainConfig | dict[str, Any] | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    trainable: Callable[[nn.Module], Iterable[nn.Parameter]] | Iterable[nn.Parameter] | None = None,
    task: Task | None = None,
    lr_scale: Mapping[nn.Parameter, float] | None = None,
    quiet: bool = False,
    on_start: Callable[[torch.optim.Optimizer, nn.Module | None], None] | None = None,
) -> TrainResult:
    """Train a classifier in place with AdamW, warm-up + cosine, label smoothing, optional EMA and AMP.

    Args:
        model: returns logits ``(N, classes)``; moved to the configured device (and NHWC if chosen).
        train_loader: a DataLoader, a sized iterable of ``(inputs, targets)`` batches, or a Dataset
            (then a shuffled loader of ``config.batch_size`` is built, seeded by ``config.seed``).
        val_loader: same forms, evaluated after every epoch; None skips validation.
        config: a :class:`TrainConfig` or a dict of its fields; None uses the defaults.
        out_dir: folder for ``metrics.jsonl`` and ``checkpoint/``; None writes nothing. A fresh
            (not resumed) run replaces the log and checkpoint of an earlier run in the same folder.
        resume: continue from the last complete checkpoint in ``out_dir``. Given the same model
            architecture, data and config, the result equals an uninterrupted run.
        trainable: override of which parameters train (see the module docstring).
        task: ``task(model, x, y) -> {"loss", "output", terms...}``; default
            :func:`classification_task` with ``config.label_smoothing`` (see the module docstring).
        lr_scale: per-parameter multipliers of ``config.lr`` (e.g. pretrained blocks at 0.1 next to
            new stitches at 1); parameters not in it train at ``config.lr``. Pass the same mapping
            when resuming.
        quiet: print nothing.
        on_start: called as ``on_start(optimizer, ema)`` once both are built, on a fresh (not resumed)
            run only: a run that continues another (a growth stage) seeds the optimizer's moments and
            the EMA there; a resumed run has them in its checkpoint.

    Returns:
        A :class:`TrainResult` (its ``optimizer`` holds the final state: a later run may carry it).

    Raises:
        SurgeryError: bad config, device, data or freeze setting; ``resume`` without a checkpoint;
            a diverged (non-finite) training loss.
    """
    if not isinstance(config, TrainConfig):
        try:
            config = TrainConfig(**(config or {}))
        except ValidationError as e:
            raise SurgeryError(f"bad training config: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise SurgeryError("resume=True needs out_dir")
    dist_on = distributed.init_from_env()
    world = distributed.world_size()
    device = distributed.device_for_rank(_resolve_device(config.device))
    use_amp = device.type == "cuda" and config.amp in (True, "auto")
    if config.amp is True and device.type != "cuda":
        warnings.warn("amp=True ignored: mixed precision is used on CUDA only", stacklevel=2)
    amp_dtype = torch.float16 if config.amp_dtype == "float16" else torch.bfloat16
    channels_last = _wants_channels_last(model) if config.channels_last == "auto" else config.channels_last

    if not resume:
        _seed_everything(config.seed)
    loader_gen = torch.Generator().manual_seed(config.seed)
    train_loader = _as_loader(train_loader, config, shuffle=True, generator=loader_gen)
    val_loader = _as_loader(val_loader, config, shuffle=False, generator=None)
    if dist_on:  # same global batch, a 1/W share per rank (evaluate() shards the val set itself)
        train_loader = distributed.shard_train_loader(train_loader, config.seed)
    quiet = quiet or not distributed.is_main()
    try:
        steps_per_epoch = len(train_loader)
    except TypeError:
        raise SurgeryError("train_loader must have a length (steps per epoch drive the schedule)") from None
    if steps_per_epoch == 0:
        raise SurgeryError("train_loader is empty")

    original_grad = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    params = select_trainable(model, config.freeze, trainable)
    trainable_ids = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable_ids)
    frozen_norms = _frozen_norms(model, trainable_ids, config.freeze)

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = _wrap_ddp(model, trainable_ids, frozen_norms, device, config.ddp_find_unused) if dist_on else model
    optimizer = torch.optim.AdamW(_param_groups(model, params, config.weight_decay, config.lr, lr_scale), lr=config.lr)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    ema = make_ema(model, config) if config.ema else None
    if task is None:
        task = classification_task(config.label_smoothing)
    elif isinstance(task, nn.Module):
        task.to(device)

    history: list[dict[str, Any]] = []
    start_epoch, global_step = 0, 0
    metrics_path = out / "metrics.jsonl" if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    # Every rank has read what it needs to decide before rank 0 removes an older run's files.
    distributed.barrier()
    if resume:
        folder = find_checkpoint(out)
        if folder is None:
            raise SurgeryError(f"nothing to resume: no complete checkpoint in {out}")
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        defaults = TrainConfig().model_dump(mode="json")  # fields added later read as their defaults
        changed = sorted(k for k, v in config.model_dump(mode="json").items()
                         if state["config"].get(k, defaults.get(k)) != v and k not in _RESUME_FREE_FIELDS)
        if state["steps_per_epoch"] != steps_per_epoch:
            changed.append(f"steps_per_epoch {state['steps_per_epoch']} -> {steps_per_epoch}")
        if state.get("world_size", 1) != world:
            changed.append(f"processes {state.get('world_size', 1)} -> {world}")
        if changed and distributed.is_main():
            warnings.warn(f"resuming with a changed config ({', '.join(changed)}): results will differ from "
                          "an uninterrupted run", stacklevel=2)
        load_model(model, folder / "model.safetensors", strict=True, device=str(device))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        start_epoch, global_step, history = state["epoch"], state["step"], list(state["history"])
        if not dist_on:  # under a group every epoch reseeds from (seed, epoch, rank) instead
            set_rng_state(state["rng"], train_loader)
        truncate_metrics(metrics_path, start_epoch)
    if not resume and on_start is not None:
        on_start(optimizer, ema.module if ema is not None else None)
    if not resume and out is not None and distributed.is_main():
        # A fresh run starts a fresh log, and drops an older run's checkpoint so that a crash in its
        # first epoch can never be "resumed" from someone else's weights.
        metrics_path.unlink(missing_ok=True)
        for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old", f"{CHECKPOINT_DIR}.tmp"):
            shutil.rmtree(out / name, ignore_errors=True)

    # A task that depends on where training is (a loss weight ramp) is told before each step.
    on_step = getattr(task, "on_step", None) if callable(getattr(task, "on_step", None)) else None
    total_steps = config.epochs * steps_per_epoch
    reporter = TrainReporter(quiet, config.epochs, steps_per_epoch, config.log_every)
    checkpoint = None
    try:
        for epoch in range(start_epoch, config.epochs):
            model.train()
            for m in frozen_norms:  # frozen statistics must not drift (see module docstring)
                m.eval()
            sampler = getattr(train_loader, "sampler", None)
            if callable(getattr(sampler, "set_epoch", None)):  # DistributedSampler-style reshuffle
                sampler.set_epoch(epoch)
            if dist_on:
                # Dropout, augmentation and a task's own draws differ per rank but depend only on
                # (seed, epoch, rank): a run resumed at an epoch boundary, with any number of
                # processes, needs no saved per-rank RNG state.
                _seed_everything(_rank_seed(config.seed, epoch, distributed.rank()))
            reporter.start_epoch(epoch + 1)
            # Running sums stay on the device; reading them only at log points avoids a sync per step.
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            term_sums: dict[str, torch.Tensor] = {}
            seen, scored = 0, 0  # scored: samples whose task returned logits
            start = time.perf_counter()
            for i, batch in enumerate(train_loader):
                x, y = _batch_to(batch, device, channels_last)
                if on_step is not None:
                    on_step(global_step, total_steps)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    result = task(net, x, y)
                if not isinstance(result, dict) or not isinstance(result.get("loss"), torch.Tensor):
                    raise SurgeryError("a training task must return a dict with a tensor 'loss' (and 'output' logits)")
                loss, logits = result["loss"].float(), result.get("output")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.grad_clip is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    nn.utils.clip_grad_norm_(params, config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                global_step += 1
                if ema is not None:
                    ema.update(model, step=global_step)
                n = y.shape[0]
                seen += n
                loss_sum += loss.detach() * n
                if logits is not None:
                    correct += (logits.detach().argmax(-1) == y).sum()
                    scored += n
                for name, value in result.items():
                    if name not in ("loss", "output") and isinstance(value, torch.Tensor) and value.numel() == 1:
                        term_sums[name] = term_sums.get(name, 0) + value.detach().float().reshape(()) * n
                step_metrics = None
                if config.log_every and (i + 1) % config.log_every == 0:
                    step_metrics = {
                        "type": "step", "epoch": epoch + 1, "step": global_step, "loss": loss_sum.item() / seen,
                        "acc": correct.item() / scored if scored else None, "lr": scheduler.get_last_lr()[0],
                        "images_per_s": seen / max(time.perf_counter() - start, 1e-9),
                    }
                    append_jsonl(metrics_path, step_metrics)
                reporter.step(epoch + 1, i + 1, step_metrics)
            if dist_on:
                seen, scored = _reduce_epoch(model, loss_sum, correct, term_sums, seen, scored, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = max(time.perf_counter() - start, 1e-9)
            train_loss = loss_sum.item() / max(seen, 1)
            if not math.isfinite(train_loss):
                raise SurgeryError(f"training diverged at epoch {epoch + 1} (loss {train_loss}); lower lr")
            record: dict[str, Any] = {
                "type": "epoch", "epoch": epoch + 1, "step": global_step, "train_loss": train_loss,
                "train_acc": correct.item() / scored if scored else None, "val_loss": None, "val_acc": None,
                "ema_val_loss": None, "ema_val_acc": None, "lr": scheduler.get_last_lr()[0],
                "images_per_s": seen / elapsed, "epoch_time_s": 0.0,
                **{f"train_{name}": total.item() / max(seen, 1) for name, total in term_sums.items()},
            }
            if val_loader is not None:
                ev = evaluate(model, val_loader, amp=use_amp, channels_last=channels_last)
                record["val_loss"], record["val_acc"] = ev["loss"], ev["top1"]
                if ema is not None:
                    ev = evaluate(ema.module, val_loader, amp=use_amp, channels_last=channels_last)
                    record["ema_val_loss"], record["ema_val_acc"] = ev["loss"], ev["top1"]
            record["epoch_time_s"] = time.perf_counter() - start
            history.append(record)
            append_jsonl(metrics_path, record)
            reporter.end_epoch(record)
            if out is not None and distributed.is_main():
                # Saved after validation: the RNG state is then exactly where the next epoch begins.
                state = {
                    "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "step": global_step,
                    "steps_per_epoch": steps_per_epoch, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "ema": dict(ema.module.state_dict()) if ema is not None else None,
                    "rng": rng_state(train_loader), "history": history,
                    "config": config.model_dump(mode="json"), "world_size": world,
                }
                checkpoint = save_checkpoint(out, model, state)
    finally:
        reporter.close()
        if hasattr(model, _DDP_IGNORE):
            delattr(model, _DDP_IGNORE)
        for p in model.parameters():
            p.requires_grad_(original_grad.get(id(p), True))
        model.train(was_training)

    distributed.barrier()  # rank 0's last checkpoint is on disk before any rank reads it
    if checkpoint is None and out is not None:
        checkpoint = find_checkpoint(out)  # resumed a run that was already complete
    vals = [(r["val_acc"], r["epoch"]) for r in history if r["val_acc"] is not None]
    best = max(vals, key=lambda v: v[0]) if vals else (None, None)
    ema_vals = [r["ema_val_acc"] for r in history if r["ema_val_acc"] is not None]
    return TrainResult(
        history=history, best_val_acc=best[0], best_epoch=best[1], last_val_acc=vals[-1][0] if vals else None,
        best_ema_val_acc=max(ema_vals) if ema_vals else None, checkpoint=checkpoint,
        ema_model=ema.module if ema is not None else None, optimizer=optimizer,
    )
