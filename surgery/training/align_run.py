"""``surgery align MODEL_DIR --data DATA``: align and fine-tune a reassembled model folder in place.

Phases (each in ``MODEL_DIR/align/<phase>/`` with ``result.json`` when done; a rerun skips finished
phases and resumes an interrupted one from its last epoch checkpoint):

1. ``meta``: the truncated meta model (:func:`surgery.training.align.truncated_meta`), its head fitted
   in closed form; with ``meta="pretrain"`` then trained end to end (``meta/meta.safetensors``).
2. ``mt_k``: stage module k inside the frozen meta model, training what ``train`` names
   (``mt_k/module.safetensors``). Each job starts from the reassembled weights.
3. ``assemble``: every job's weights loaded into the chain, batch-norm statistics re-estimated on
   unlabelled target images (:func:`surgery.training.incubation.recalibrate_norms`).
4. ``ft``: end-to-end fine-tuning with :func:`surgery.training.finetune`'s recipe (AdamW, one warm-up
   epoch, cosine, label smoothing 0.1); ``frozen_warmup`` epochs first train stitches and head only.

The reassembled weights are kept in ``align/start.safetensors``; ``model.safetensors``, ``config.json``
(an ``align`` record: the spec and every phase's accuracy) and ``README.md`` are replaced, each
atomically, only when the run is complete.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from surgery import distributed
from surgery.errors import SurgeryError
from surgery.training.phases import RESULT, changed_fields, finish_phase, parse_counts, phase_done
from surgery.workspace import load_tensors, read_json, save_tensors, write_json, write_text

SCHEMA = "surgery.align/1"
RUN_DIR = "align"
RECAL_BATCHES = 20
KD_POOL = 4096  # unlabelled images held for the distillation term (prepared once, on the CPU)


class AlignSpec(BaseModel):
    """Everything that decides an alignment run (stored in ``align/align.json``; a rerun must match).

    Attributes:
        data: target data spec (its classes must be the model's).
        mt_epochs: epochs of each stage job (MT) and of the meta pre-training with ``meta="pretrain"``;
            0 skips the meta model and MT (fine-tuning only, with the teacher when one is given).
        ft_epochs: epochs of the end-to-end fine-tuning (``frozen_warmup`` of them with blocks frozen).
        meta: ``truncated`` (donor blocks cut down, no training) or ``pretrain`` (the same, trained).
        train: what MT trains: ``stitches``, ``norms`` (also norm weights) or ``blocks`` (everything but the
            head).
        block_lr_scale: learning-rate multiplier of block weights with ``train="blocks"``.
        teacher: a model folder or a zoo model of the workspace to distil from (None: labels only).
        alpha / temperature: weight of the distillation term and its temperature (m2mKD: 0.5, 1).
        kd_unlabeled: unlabelled target images added to every step's distillation term (with a
            teacher; the labels of the target's unlabelled pool are never read).
        batch_size, lr, seed: the training recipe (lr: peak AdamW learning rate).
    """

    model_config = ConfigDict(extra="forbid")

    data: str
    mt_epochs: int = Field(2, ge=0)
    ft_epochs: int = Field(4, ge=0)
    frozen_warmup: int = Field(0, ge=0)
    meta: Literal["truncated", "pretrain"] = "truncated"
    train: Literal["stitches", "norms", "blocks"] = "stitches"
    block_lr_scale: float = Field(0.1, gt=0, le=1)
    teacher: str | None = None
    alpha: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(1.0, gt=0)
    kd_unlabeled: int = Field(64, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0


def parse_epochs(text: str) -> tuple[int, int]:
    """``"MT,FT"`` -> two epoch counts (each >= 0, not both 0).

    Raises:
        SurgeryError: anything else (one line).
    """
    values = parse_counts(text, ("MT", "FT"), "2,4", (0, 0))
    if sum(values) < 1:
        raise SurgeryError(f"--epochs must be MT,FT epoch counts with at least one epoch, got {text!r}")
    return values  # type: ignore[return-value]


# ---------------------------------------------------------------------------- pieces


def _data(model_dir: Path, recipe: dict[str, Any], spec: AlignSpec):
    from surgery.training.finetune import check_classes
    from zoo.data import load_splits, make_loader, make_transform

    splits = load_splits(spec.data, seed=spec.seed, val_fraction=0.1, unlabeled=True)
    check_classes(recipe, spec.data, splits["train"].classes)
    tf = make_transform(tuple(recipe["input_size"]), recipe.get("mean"), recipe.get("std"))
    bs = spec.batch_size
    # Built afresh on every access: a phase's shuffling must not depend on how far earlier phases (which
    # a resumed run skips) advanced a shared loader's generator.
    makers = {
        "train": lambda: make_loader(splits["train"], bs, shuffle=True, seed=spec.seed, transform=tf),
        "train_eval": lambda: make_loader(splits["train"], bs, transform=tf),
        "val": lambda: make_loader(splits["val"], bs, transform=tf),
        "test": lambda: make_loader(splits["test"], bs, transform=tf),
        "unlabeled": lambda: make_loader(splits["unlabeled"], bs, shuffle=True, seed=spec.seed + 1, transform=tf),
    }
    return _Loaders(makers)


class _Loaders:
    """``loaders[name]``: a new DataLoader of that split each time."""

    def __init__(self, makers: dict[str, Callable[[], Any]]):
        self._makers = makers

    def __getitem__(self, name: str):
        return self._makers[name]()


def _teacher(spec: AlignSpec, recipe: dict[str, Any]):
    """``(teacher model, InputConverter, description)`` for ``spec.teacher``, or ``None``."""
    from surgery.assembled import load, read_recipe
    from surgery.training.distill import InputConverter

    if spec.teacher is None:
        return None
    path = Path(spec.teacher)
    if (path / "config.json").exists():
        t_recipe = read_recipe(path)
        teacher = load(path)
        what = f"model folder {path}"
    else:
        from surgery.baseline import baseline
        from surgery.workspace import Workspace

        ws_root = recipe.get("workspace")
        ws = Workspace(ws_root) if ws_root else None
        if ws is None or not ws.root.exists():
            raise SurgeryError(f"--teacher {spec.teacher}: not a model folder, and the model's workspace "
                               f"{ws_root} is gone")
        names = list(ws.read_index().get("models", {}))
        if spec.teacher not in names:
            raise SurgeryError(f"--teacher {spec.teacher} is neither a model folder nor a model of the workspace "
                               f"{ws.root} (models: {', '.join(names[:8])})")
        built = baseline(ws.root, spec.teacher, data=spec.data, seed=spec.seed).best
        teacher, t_recipe = built.model, _single_recipe(ws, built)
        what = f"zoo model {spec.teacher} with a closed-form head"
    if [str(c) for c in t_recipe.get("classes") or []] not in ([], [str(c) for c in recipe.get("classes") or []]):
        raise SurgeryError(f"the teacher's classes are not the model's ({spec.teacher})")
    conv = InputConverter(recipe["input_size"], recipe["mean"], recipe["std"],
                          t_recipe["input_size"], t_recipe["mean"], t_recipe["std"])
    return teacher.eval(), conv, what


def _single_recipe(ws, built) -> dict[str, Any]:
    manifest = ws.read_dissection(built.stages[0].model)
    cfg = manifest.get("data_config", {})
    return {"input_size": list(built.stages[0].input_size), "mean": list(cfg.get("mean") or (0.485, 0.456, 0.406)),
            "std": list(cfg.get("std") or (0.229, 0.224, 0.225))}


def _unlabeled_pool(loaders) -> torch.Tensor:
    """Up to :data:`KD_POOL` unlabelled target images, prepared as the model's inputs (labels dropped)."""
    images, held = [], 0
    for x, _ in loaders["unlabeled"]:
        images.append(x)
        held += len(x)
        if held >= KD_POOL:
            break
    return torch.cat(images)[:KD_POOL]


def _task(spec: AlignSpec, teacher, label_smoothing: float, unlabeled: torch.Tensor | None):
    from surgery.training.distill import distillation_task
    from surgery.training.loop import classification_task

    if teacher is None:
        return classification_task(label_smoothing)
    model, conv, _ = teacher
    return distillation_task(model, alpha=spec.alpha, temperature=spec.temperature,
                             label_smoothing=label_smoothing, converter=conv, unlabeled=unlabeled,
                             unlabeled_batch=spec.kd_unlabeled)


def _config(spec: AlignSpec, epochs: int, *, warmup: float, freeze: str = "none"):
    from surgery.training.loop import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=spec.batch_size, lr=spec.lr, warmup_epochs=warmup, seed=spec.seed,
                       freeze=freeze, log_every=0)


def _train(run: Path, name: str, model: nn.Module, loaders, spec: AlignSpec, epochs: int, task, *,
           warmup: float, trainable=None, lr_scale=None, freeze: str = "none", quiet: bool) -> dict[str, Any]:
    from surgery.training.checkpoint import find_checkpoint
    from surgery.training.loop import train

    folder = run / name
    resume = find_checkpoint(folder) is not None
    result = train(model, loaders["train"], loaders["val"], _config(spec, epochs, warmup=warmup, freeze=freeze),
                   out_dir=folder, resume=resume, trainable=trainable, lr_scale=lr_scale, task=task, quiet=quiet)
    last = result.history[-1] if result.history else {}
    return {"phase": name, "epochs": epochs, "val_acc": last.get("val_acc"), "val_acc_best": result.best_val_acc,
            "wall_s": round(sum(r["epoch_time_s"] for r in result.history), 3), "resumed": resume,
            "history": result.history}


def _accuracy(model: nn.Module, loader) -> float:
    from surgery.training.loop import evaluate

    return float(evaluate(model, loader)["top1"])


def _check_run(run: Path, spec: AlignSpec) -> dict[str, Any] | None:
    """The manifest of the same spec, None for a new run; refuses another spec's run (one line)."""
    path = run / "align.json"
    if not path.exists():
        return None
    manifest = read_json(path, what="align manifest")
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or "spec" not in manifest:
        raise SurgeryError(f"{path} is not a {SCHEMA} manifest; move it away to align again")
    try:
        old = AlignSpec.model_validate(manifest["spec"]).model_dump(mode="json")
    except ValidationError:
        old = manifest["spec"]
    shown = changed_fields(old, spec.model_dump(mode="json"))
    if shown:
        raise SurgeryError(f"{run.parent} was aligned with other options ({shown}); give the same options to resume, "
                           f"or align a fresh copy (the reassembled weights are in {run / 'start.safetensors'})")
    return manifest


# ---------------------------------------------------------------------------- the run


def align(model_dir: str | os.PathLike, data: str, *, epochs: tuple[int, int] = (2, 4), meta: str = "truncated",
          train: str = "stitches", block_lr_scale: float = 0.1, teacher: str | None = None, alpha: float = 0.5,
          temperature: float = 1.0, kd_unlabeled: int = 64, frozen_warmup: int = 0, batch_size: int = 64,
          lr: float = 1e-3, seed: int = 0, quiet: bool = False, log: Callable[[str], None] | None = None
          ) -> dict[str, Any]:
    """Align and fine-tune a reassembled model folder in place (module docstring).

    Args:
        model_dir: a folder written by ``surgery reassemble`` (or ``baseline``).
        data: target data; its classes must be the model's.
        epochs: ``(MT, FT)``: epochs of each stage job and of the end-to-end fine-tuning.
        meta, train, block_lr_scale, teacher, alpha, temperature, kd_unlabeled, frozen_warmup, batch_size, lr,
            seed:
            see :class:`AlignSpec`.
        quiet: no progress bars.
        log: one-line phase announcements.

    Returns:
        The manifest (``align/align.json``): spec, stages, and per phase its accuracies.

    Raises:
        SurgeryError / WorkspaceError: not a reassembled model folder, classes differ, an unknown
            teacher, a run of other options in the folder, bad options (one line each).
    """
    from surgery.assembled import StagePlan, load, read_recipe
    from surgery.training.align import module_parameters, stage_modules, truncated_meta
    from surgery.training.incubation import IncubationHybrid, recalibrate_norms

    distributed.init_from_env()
    say = log if log is not None and distributed.is_main() else (lambda msg: None)
    model_dir = Path(model_dir)
    try:
        spec = AlignSpec(data=data, mt_epochs=epochs[0], ft_epochs=epochs[1], meta=meta, train=train,
                         block_lr_scale=block_lr_scale, teacher=teacher, alpha=alpha, temperature=temperature,
                         kd_unlabeled=kd_unlabeled, frozen_warmup=frozen_warmup, batch_size=batch_size, lr=lr,
                         seed=seed)
    except ValidationError as e:
        err = e.errors()[0]
        raise SurgeryError(f"bad option {'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
    if spec.teacher is None:  # distillation options without a teacher change nothing: not part of the identity
        spec = spec.model_copy(update={"alpha": 0.5, "temperature": 1.0, "kd_unlabeled": 64})
    elif (Path(spec.teacher) / "config.json").exists():  # the same folder however it was written
        spec = spec.model_copy(update={"teacher": str(Path(spec.teacher).resolve())})
    if spec.train == "stitches":
        spec = spec.model_copy(update={"block_lr_scale": 0.1})
    if spec.frozen_warmup > spec.ft_epochs:
        raise SurgeryError(f"frozen_warmup ({spec.frozen_warmup}) must not exceed the FT epochs ({spec.ft_epochs})")
    recipe = read_recipe(model_dir)
    if recipe.get("kind") == "model" or "stages" not in recipe:
        raise SurgeryError(f"{model_dir} is not a reassembled model (kind {recipe.get('kind')!r}); align takes the "
                           "folder of 'surgery reassemble' or 'surgery baseline'")
    run = model_dir / RUN_DIR
    manifest = _check_run(run, spec)
    distributed.check_batch(spec.batch_size)  # under torchrun, before anything is written
    if manifest is not None and manifest.get("complete"):
        say(f"{model_dir} is already aligned with these options")
        return manifest
    loaders = _data(model_dir, recipe, spec)
    teacher_info = _teacher(spec, recipe)
    model = load(model_dir)  # a folder whose weights do not load fails here, before anything is written
    start = run / "start.safetensors"
    done = sorted(p.parent.name for p in run.glob(f"*/{RESULT}")) if run.exists() else []
    if done:
        say(f"resuming the alignment in {run}: done already: {', '.join(done)}")
    run.mkdir(parents=True, exist_ok=True)
    if not start.exists():
        save_tensors(start, model.state_dict(), metadata={"format": "pt"})
    distributed.barrier()  # rank 0 has written the start weights every rank loads next
    model.load_state_dict(load_tensors(start), strict=True)
    stages = [StagePlan.from_dict(s) for s in recipe["stages"]]
    modules = stage_modules(model)
    K = len(modules)
    phases: dict[str, Any] = {}
    write_json(run / "align.json", {"schema": SCHEMA, "spec": spec.model_dump(mode="json"), "complete": False,
                                    "stages": K, "phases": phases})
    pool = _unlabeled_pool(loaders) if teacher_info is not None and spec.kd_unlabeled else None  # once, for MT and FT
    task_mt = _task(spec, teacher_info, 0.0, pool)
    mt_warmup = min(1.0, spec.mt_epochs / 5)  # a fifth of a short run, as incubation's PT and MT
    task_ft = _task(spec, teacher_info, 0.1, pool)
    phases["start"] = {"val_acc": _accuracy(model, loaders["val"]),
                       "previously_aligned": "align" in recipe}

    finished = [phase_done(run, name) for name in ("meta", *(f"mt_{k}" for k in range(K)))]
    if spec.mt_epochs == 0:
        phases["meta"] = {"phase": "meta", "skipped": "MT epochs 0"}
        for k in range(K):
            phases[f"mt_{k}"] = {"phase": f"mt_{k}", "skipped": "MT epochs 0"}
    elif all(rec is not None for rec in finished):  # resumed past MT: the meta model is not needed again
        phases["meta"] = _summary(finished[0])
        for k, (module, rec) in enumerate(zip(modules, finished[1:], strict=True)):
            if "skipped" not in rec:
                module.load_state_dict(load_tensors(run / f"mt_{k}" / "module.safetensors"), strict=True)
            phases[f"mt_{k}"] = _summary(rec)
    else:
        # 1. meta model
        t0 = time.perf_counter()
        meta_model, infos = truncated_meta(model, stages, loaders["train_eval"])
        kept = ", ".join(f"{i['kept']}/{i['sub_blocks']}" for i in infos)
        say(f"meta model: {kept} sub-blocks kept per stage")
        if (rec := phase_done(run, "meta")) is not None:
            if spec.meta == "pretrain":
                meta_model.load_state_dict(load_tensors(run / "meta" / "meta.safetensors"), strict=True)
        else:
            rec = {"phase": "meta", "kind": spec.meta, "stages": infos, "val_acc_closed_form": _accuracy(meta_model,
                                                                                                      loaders["val"])}
            if spec.meta == "pretrain":
                say(f"pre-training the meta model for {spec.mt_epochs} epoch(s)")
                meta_model.requires_grad_(True)
                rec.update(_train(run, "meta", meta_model, loaders, spec, spec.mt_epochs, task_mt, warmup=mt_warmup,
                                  quiet=quiet))
                save_tensors(run / "meta" / "meta.safetensors", meta_model.state_dict(), metadata={"format": "pt"})
            rec["wall_s_total"] = round(time.perf_counter() - t0, 3)
            rec = finish_phase(run, "meta", rec)
        meta_model.requires_grad_(False)
        phases["meta"] = _summary(rec)

        # 2. MT_k: each stage inside the frozen meta model
        for k, module in enumerate(modules):
            name = f"mt_{k}"
            params, scale = module_parameters(module, spec.train, spec.block_lr_scale)
            if (rec := phase_done(run, name)) is not None:
                if params:
                    module.load_state_dict(load_tensors(run / name / "module.safetensors"), strict=True)
            elif not params:
                rec = finish_phase(run, name, {"phase": name, "skipped": "no stitch after this block"})
            else:
                say(f"MT {k + 1}/{K}: stage {k} ({stages[k].model}; stages count from 0 as in the model card) "
                    f"inside the meta model, {spec.mt_epochs} epoch(s)")
                hybrid = IncubationHybrid(list(meta_model.parts), module, k)
                rec = _train(run, name, hybrid, loaders, spec, spec.mt_epochs, task_mt, warmup=mt_warmup,
                             trainable=params, lr_scale=scale, quiet=quiet)
                rec["trained_params"] = int(sum(p.numel() for p in params))
                save_tensors(run / name / "module.safetensors", module.state_dict(), metadata={"format": "pt"})
                rec = finish_phase(run, name, rec)
            phases[name] = _summary(rec)

    # 3. assemble: the modules are the chain's parts. Batch-norm layers that MT ran in train mode collected
    # their statistics on the meta model's activations: re-estimated on unlabelled target images. The
    # others keep the source model's statistics, which the closed-form head and the stitches were fitted
    # to (re-estimating those too cost 50 val points on a few-label digits chain, measured).
    if (rec := phase_done(run, "assemble")) is not None:
        model.load_state_dict(load_tensors(run / "assemble" / "model.safetensors"), strict=True)
    else:
        rec = {"phase": "assemble", "val_acc": _accuracy(model, loaders["val"])}
        moved = [module for k, module in enumerate(modules)
                 if spec.train != "stitches" and "skipped" not in phases.get(f"mt_{k}", {"skipped": True})]
        # only the layers recalibrated can change: their buffers are all a revert needs
        before = [{k: v.clone() for k, v in _bn_buffers(m).items()} for m in moved]
        rec["norm_layers_recalibrated"] = recalibrate_norms(model, loaders["unlabeled"], max_batches=RECAL_BATCHES,
                                                            only=moved)
        rec["val_acc_recalibrated"] = _accuracy(model, loaders["val"]) if rec["norm_layers_recalibrated"] \
            else rec["val_acc"]
        if rec["val_acc_recalibrated"] < rec["val_acc"]:
            # the statistics MT collected serve the validation split better: kept (selection on val only)
            for m, saved in zip(moved, before, strict=True):
                for key, value in _bn_buffers(m).items():
                    value.copy_(saved[key])
            rec["recalibration_kept"] = False
            rec["val_acc_recalibrated"] = rec["val_acc"]
        else:
            rec["recalibration_kept"] = bool(rec["norm_layers_recalibrated"])
        save_tensors(run / "assemble" / "model.safetensors", model.state_dict(), metadata={"format": "pt"})
        rec = finish_phase(run, "assemble", rec)
    phases["assemble"] = _summary(rec)

    # 4. FT: end to end (optionally stitches and head first)
    for name, n_epochs, freeze in (("ft_frozen", spec.frozen_warmup, "blocks"),
                                   ("ft", spec.ft_epochs - spec.frozen_warmup, "none")):
        if n_epochs <= 0:
            continue
        if (rec := phase_done(run, name)) is not None:
            model.load_state_dict(load_tensors(run / name / "model.safetensors"), strict=True)
        else:
            say(f"fine-tuning {'stitches and head' if freeze == 'blocks' else 'end to end'} for {n_epochs} epoch(s)")
            rec = _train(run, name, model, loaders, spec, n_epochs, task_ft, warmup=min(1.0, n_epochs / 4),
                         freeze=freeze, quiet=quiet)
            save_tensors(run / name / "model.safetensors", model.state_dict(), metadata={"format": "pt"})
            rec = finish_phase(run, name, rec)
        phases[name] = _summary(rec)
    model.eval()
    phases["final"] = {"val_acc": _accuracy(model, loaders["val"]), "test_acc": _accuracy(model, loaders["test"])}
    manifest = {"schema": SCHEMA, "spec": spec.model_dump(mode="json"), "complete": True, "stages": K,
                "teacher": teacher_info[2] if teacher_info else None, "phases": phases}
    _save(model_dir, model, recipe, manifest)
    write_json(run / "align.json", manifest)
    return manifest


def _bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of a module's batch-norm layers, by qualified name (tensors, not copies)."""
    return {f"{name}.{b}": buf for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for b, buf in m.named_buffers(recurse=False)}


def _summary(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k != "history"}


def _save(model_dir: Path, model: nn.Module, recipe: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Replace the folder's weights, recipe and card (each write atomic; weights first)."""
    save_tensors(model_dir / "model.safetensors", model.state_dict(), metadata={"format": "pt"})
    new_recipe = {k: v for k, v in recipe.items() if k != "schema"}
    new_recipe["align"] = {"spec": manifest["spec"], "phases": manifest["phases"]}
    from surgery.assembled import RECIPE_SCHEMA

    write_json(model_dir / "config.json", {"schema": RECIPE_SCHEMA, **new_recipe})
    card_path = model_dir / "README.md"
    card = card_path.read_text() if card_path.exists() else "# Reassembled model\n"
    card = card.split("\n## Alignment")[0].rstrip() + "\n\n" + _card(manifest) + "\n"
    write_text(card_path, card)


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}" if isinstance(x, (int, float)) else "-"


def _card(manifest: dict[str, Any]) -> str:
    s, p = manifest["spec"], manifest["phases"]
    first = ("start (weights of an earlier alignment)" if p["start"].get("previously_aligned")
             else "reassembled (least-squares stitches)")
    rows = [f"| {first} | {_pct(p['start']['val_acc'])} |",
            f"| meta model ({s['meta']}, closed-form head) | {_pct(p['meta'].get('val_acc_closed_form'))} |"]
    if s["meta"] == "pretrain":
        rows.append(f"| meta model after pre-training | {_pct(p['meta'].get('val_acc'))} |")
    for k in range(manifest["stages"]):
        rec = p.get(f"mt_{k}", {})
        rows.append(f"| MT: stage {k} in the meta model | "
                    f"{_pct(rec.get('val_acc')) if 'skipped' not in rec else 'skipped (' + rec['skipped'] + ')'} |")
    rows.append(f"| assembled | {_pct(p['assemble']['val_acc'])} |")
    if p["assemble"].get("norm_layers_recalibrated"):
        kept = "kept" if p["assemble"].get("recalibration_kept") else "not kept: val fell"
        rows.append(f"| assembled, norms re-estimated ({kept}) | {_pct(p['assemble']['val_acc_recalibrated'])} |")
    if "ft_frozen" in p:
        rows.append(f"| fine-tuned, blocks frozen ({s['frozen_warmup']} epochs) | {_pct(p['ft_frozen']['val_acc'])} |")
    rows.append(f"| fine-tuned ({s['ft_epochs']} epochs in all) | {_pct(p['final']['val_acc'])} |")
    teacher = f", teacher {manifest['teacher']} (alpha {s['alpha']}, T {s['temperature']})" if s["teacher"] else ""
    fell = p["final"]["val_acc"] < p["start"]["val_acc"]
    warn = (f"\n\n**Validation accuracy fell** ({_pct(p['start']['val_acc'])} -> {_pct(p['final']['val_acc'])} %): "
            "the previous weights are in `align/start.safetensors`." if fell else "")
    return (f"## Alignment\n\nAligned by `surgery align` on `{s['data']}`: meta model `{s['meta']}`, MT trains "
            f"`{s['train']}` for {s['mt_epochs']} epoch(s) per stage, then {s['ft_epochs']} fine-tuning "
            f"epochs{teacher}.\n\n"
            "| step | val top-1 (%) |\n|---|---:|\n" + "\n".join(rows) +
            f"\n\nHeld-out test top-1 after alignment: {_pct(p['final']['test_acc'])} %." + warn)
