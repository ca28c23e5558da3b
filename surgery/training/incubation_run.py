"""``surgery incubate``: a model trained as K incubated modules, phase by phase, in one resumable run folder.

The phases (Ni et al., ICCV 2023, §3 and Fig. 3) form a small DAG recorded in ``RUN/incubation.json``::

    PT (meta model, end to end) -> MT_0 .. MT_{K-1} (independent) -> assemble -> FT (end to end)

* **PT** trains the meta model (:func:`surgery.training.incubation.auto_meta`, or the user's shallow
  variant) end to end; skipped when its epoch count is 0 (a meta model that is already trained).
* **MT_k** trains module k of the target inside the frozen, pre-trained meta model
  (:class:`~surgery.training.incubation.IncubationHybrid`); the K jobs are independent, and
  ``jobs > 1`` runs them as parallel processes with ``cores // jobs`` threads each.
* **assemble** loads the K trained modules into the target and evaluates it before any fine-tuning:
  the compatibility check (the modules never saw each other).
* **FT** fine-tunes the assembled target end to end (warm-up 0, gradient clipping 1.0: the paper's
  FT recipe); skipped when its epoch count is 0.

Each phase trains in its own folder (``pt/``, ``mt_0/``, ..., ``ft/``) with the loop's checkpoints, and
writes ``result.json`` when it is done: a finished phase is skipped, an interrupted one resumes at its
last completed epoch (``kill -9``, then the same command). The run folder is also the result's model
folder: ``config.json`` (recipe ``kind: "model"``: the timm architecture, rebuilt by
:func:`surgery.load`), ``model.safetensors`` and a ``README.md`` card with every phase's accuracy and
cost (wall seconds; MACs x images, where training MACs per image are counted as 1x forward for frozen
parts run without gradient, 2x for frozen parts that pass activation gradients back, 3x for trained
parts: the usual backward = 2x forward rule).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from surgery.errors import SurgeryError
from surgery.training.incubation import (
    IncubationHybrid,
    MetaPlan,
    ModuleChain,
    ModulePlan,
    auto_meta,
    init_from_meta,
    load_module_states,
    meta_from_model,
    module_state,
    plan_modules,
)
from surgery.training.phases import check_run_folder, finish_phase, parse_counts, phase_done
from surgery.workspace import load_tensors, read_json, save_tensors, write_json, write_text

MANIFEST = "incubation.json"
SCHEMA = "surgery.incubation/1"
VAL_FRACTION = 0.1

__all__ = ["IncubationSpec", "incubate", "parse_epochs", "MANIFEST", "SCHEMA"]


class IncubationSpec(BaseModel):
    """Everything that determines an incubation run (saved in the manifest; the same spec resumes it).

    Attributes:
        model: the target, as a zoo entry dict (``name``, ``arch``, ``model_kwargs``, ...); its
            architecture is used with random weights seeded by ``seed``.
        meta: a shallow meta model as a zoo entry dict, or None for the automatic meta model.
        modules: K.
        epochs: ``(PT, MT, FT)`` epochs; MT is per module. PT or FT may be 0 (phase skipped).
        data: the data spec (``digits``, ``fashion-mnist``, ...).
        input_size: ``(C, H, W)`` the model sees.
        batch_size, lr: the recipe of every phase (AdamW, label smoothing 0.1, cosine).
        seed: initialisation, data split and order.
        init: how MT modules start: ``"random"`` (the paper) or ``"meta"`` (copied and stacked from
            the pre-trained automatic meta module, :func:`~surgery.training.incubation.init_from_meta`).
    """

    model_config = ConfigDict(extra="forbid")

    model: dict[str, Any]
    meta: dict[str, Any] | None = None
    modules: int = Field(4, ge=1)
    epochs: tuple[int, int, int] = (3, 1, 1)
    data: str
    input_size: tuple[int, int, int]
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0
    init: Literal["random", "meta"] = "random"


def parse_epochs(text: str) -> tuple[int, int, int]:
    """``"PT,MT,FT"`` -> three epoch counts (PT, FT >= 0; MT >= 1).

    Raises:
        SurgeryError: anything else (one line).
    """
    return parse_counts(text, ("PT", "MT", "FT"), "3,1,1", (0, 1, 0))  # type: ignore[return-value]


# ---------------------------------------------------------------------------- building (per process)


def _entry(d: dict[str, Any]):
    from zoo.entries import ZooEntry

    return ZooEntry.model_validate(d)


def _create(entry_dict: dict[str, Any], num_classes: int, seed: int) -> nn.Module:
    """The entry's architecture with ``num_classes`` outputs and random weights drawn from ``seed``.

    An entry with a ``weights`` file or a ``pretrained_tag`` (a trained shallow meta model) is built
    with those weights instead.
    """
    import timm

    from zoo.entries import build_model

    entry = _entry(entry_dict)
    entry = entry.model_copy(update={"model_kwargs": {**entry.model_kwargs, "num_classes": num_classes}})
    if entry.weights is not None or entry.pretrained_tag is not None:
        return build_model(entry)
    # fork_rng: the caller's RNG state is untouched; the same seed gives the same model in any process.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        try:
            return timm.create_model(entry.timm_name, pretrained=False, **entry.model_kwargs).eval()
        except (TypeError, RuntimeError) as err:
            raise SurgeryError(f"{entry.name}: timm cannot build {entry.timm_name!r}: "
                               f"{str(err).splitlines()[0]}") from None


def with_input_size(entry_dict: dict[str, Any], size: int | None) -> dict[str, Any]:
    """Add ``img_size=size`` to the entry's kwargs when its timm class takes one (ViTs, Swin, ...).

    CNNs take any input size and have no such argument; a ViT's position embedding is sized by it.
    Whether the class takes it is tried on the meta device (timm's entry points take ``**kwargs``).
    """
    import timm

    entry = _entry(entry_dict)
    kwargs = dict(entry.model_kwargs)
    if size is None or "img_size" in kwargs:
        return entry_dict
    try:
        with torch.device("meta"):
            timm.create_model(entry.timm_name, pretrained=False, img_size=size, **kwargs)
    except TypeError:
        return entry_dict
    except RuntimeError as err:  # unknown model: the build reports it with timm's close names
        raise SurgeryError(f"{entry.name}: {str(err).splitlines()[0]}") from None
    return {**entry_dict, "model_kwargs": {**kwargs, "img_size": size}}


@dataclass
class Built:
    """Target, module plan, meta model and data of a spec, built in one process."""

    spec: IncubationSpec
    target: nn.Module
    modules: list[nn.Module]
    plan: ModulePlan
    meta: ModuleChain
    meta_plan: MetaPlan
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    target_params: int
    target_macs: int
    block_keys: list[list[str]]


def _splits(spec: IncubationSpec):
    from zoo.data import load_splits

    return load_splits(spec.data, seed=spec.seed, val_fraction=VAL_FRACTION)


def build(spec: IncubationSpec, splits: dict[str, Any] | None = None) -> Built:
    """Build everything a phase needs from the spec (deterministic: same spec -> same weights)."""
    from surgery.dissection import dissect
    from zoo.entries import data_config

    splits = splits if splits is not None else _splits(spec)
    classes = [str(c) for c in splits["train"].classes]
    target = _create(spec.model, len(classes), spec.seed)
    cfg = data_config(_entry(spec.model), target)
    d = dissect(target, spec.input_size, name=_entry(spec.model).name)
    plan = plan_modules(d, spec.modules)
    modules = d.split(plan.boundaries)
    if spec.meta is None:
        twin = _create(spec.model, len(classes), spec.seed + 1)
        meta_modules, meta_plan = auto_meta(dissect(twin, spec.input_size, name=f"{d.name}-meta"), plan)
    else:
        shallow = _create(spec.meta, len(classes), spec.seed + 1)
        name = _entry(spec.meta).name
        meta_modules, meta_plan = meta_from_model(dissect(shallow, spec.input_size, name=name), plan, name=name)
    if spec.init == "meta" and spec.meta is not None:
        raise SurgeryError("init='meta' copies the automatic meta model's blocks; it cannot be used with a "
                           "user-given meta model")
    return Built(spec, target, modules, plan, ModuleChain(meta_modules), meta_plan, classes,
                 tuple(cfg["mean"]), tuple(cfg["std"]), int(d.params), int(d.macs),
                 [list(block.state_dict()) for block in d.blocks])


def _loaders(b: Built, splits: dict[str, Any]):
    from zoo.data import make_loader, make_transform

    tf = make_transform(b.spec.input_size, b.mean, b.std)
    bs, seed = b.spec.batch_size, b.spec.seed
    drop_last = len(splits["train"]) > bs  # a last batch of 1 breaks batch norm
    return (make_loader(splits["train"], bs, shuffle=True, seed=seed, transform=tf, drop_last=drop_last),
            make_loader(splits["val"], 256, transform=tf), make_loader(splits["test"], 256, transform=tf))


def _config(spec: IncubationSpec, phase: str, epochs: int):
    from surgery.training.loop import TrainConfig

    if phase == "ft":  # the paper's FT recipe: no warm-up, gradient clipping at 1.0
        return TrainConfig(epochs=epochs, batch_size=spec.batch_size, lr=spec.lr, warmup_epochs=0, grad_clip=1.0,
                           seed=spec.seed, log_every=0)
    # PT and MT: a warm-up of a fifth of the run (the paper: 20 of 100-300 epochs), at most one epoch.
    return TrainConfig(epochs=epochs, batch_size=spec.batch_size, lr=spec.lr, warmup_epochs=min(1.0, epochs / 5),
                       seed=spec.seed, log_every=0)


# ---------------------------------------------------------------------------- phases


def _train_phase(run: Path, name: str, model: nn.Module, b: Built, splits, epochs: int, *, trainable=None,
                 macs_per_image: int, quiet: bool) -> dict[str, Any]:
    from surgery.training.checkpoint import find_checkpoint
    from surgery.training.loop import train

    folder = run / name
    train_loader, val_loader, _ = _loaders(b, splits)
    resume = find_checkpoint(folder) is not None
    result = train(model, train_loader, val_loader, _config(b.spec, "ft" if name == "ft" else name[:2], epochs),
                   out_dir=folder, resume=resume, trainable=trainable, quiet=quiet)
    images = epochs * len(train_loader) * b.spec.batch_size  # the loader drops a last partial batch
    last = result.history[-1] if result.history else {}
    return {"phase": name, "epochs": epochs, "val_acc": last.get("val_acc"),
            "val_acc_best": result.best_val_acc,
            "wall_s": round(sum(r["epoch_time_s"] for r in result.history), 3),
            "images": images, "train_macs_per_image": int(macs_per_image),
            "train_macs_x_images": int(macs_per_image) * images,
            "resumed": resume, "history": result.history}


def run_pt(run: Path, b: Built, splits, quiet: bool) -> dict[str, Any]:
    """PT: the meta model trained end to end; writes ``pt/meta.safetensors``."""
    if (rec := phase_done(run, "pt")) is not None:
        return rec
    epochs = b.spec.epochs[0]
    record = _train_phase(run, "pt", b.meta, b, splits, epochs, macs_per_image=3 * sum(b.meta_plan.macs), quiet=quiet)
    save_tensors(run / "pt" / "meta.safetensors", b.meta.state_dict(), metadata={"format": "pt"})
    return finish_phase(run, "pt", record)


def load_meta(run: Path, b: Built) -> None:
    """Meta weights after PT (nothing to load when PT was skipped: the meta model is used as built)."""
    if b.spec.epochs[0] > 0:
        b.meta.load_state_dict(load_tensors(run / "pt" / "meta.safetensors"), strict=True)


def run_mt(run: Path, b: Built, splits, k: int, quiet: bool) -> dict[str, Any]:
    """MT_k: module k inside the frozen meta model; writes ``mt_k/module.safetensors``."""
    name = f"mt_{k}"
    if (rec := phase_done(run, name)) is not None:
        return rec
    load_meta(run, b)
    if b.spec.init == "meta":
        init_from_meta(b.modules[k], b.block_keys, b.plan.blocks[k], b.meta.parts[k], b.meta_plan.blocks[k])
    hybrid = IncubationHybrid(list(b.meta.parts), b.modules[k], k)
    # prefix: forward only (no_grad); module k: forward + both gradients; suffix: forward + input gradients.
    meta_macs = b.meta_plan.macs
    cost = sum(meta_macs[:k]) + 3 * b.plan.macs[k] + 2 * sum(meta_macs[k + 1:])
    record = _train_phase(run, name, hybrid, b, splits, b.spec.epochs[1], trainable=hybrid.trainable_parameters(),
                          macs_per_image=cost, quiet=quiet)
    save_tensors(run / name / "module.safetensors", module_state(b.modules[k]), metadata={"format": "pt"})
    return finish_phase(run, name, record)


def _mt_job(run: str, k: int) -> dict[str, Any]:
    """One MT_k as a separate process (a pure function of the run folder's spec and k)."""
    spec = IncubationSpec.model_validate(read_json(Path(run) / MANIFEST)["spec"])
    splits = _splits(spec)
    return run_mt(Path(run), build(spec, splits), splits, k, quiet=True)


def assemble(run: Path, b: Built, splits) -> dict[str, Any]:
    """The K incubated modules loaded into the target; its accuracy before any fine-tuning.

    Batch-norm statistics are re-estimated on 20 training batches first (each module's were collected
    on the meta model's activations, see :func:`~surgery.training.incubation.recalibrate_norms`); the
    accuracy is reported before and after. The result, the FT phase's start, is ``assemble/model.safetensors``.
    """
    from surgery.training.incubation import recalibrate_norms
    from surgery.training.loop import evaluate

    if (rec := phase_done(run, "assemble")) is not None:
        b.target.load_state_dict(load_tensors(run / "assemble" / "model.safetensors"), strict=True)
        return rec
    states = [load_tensors(run / f"mt_{k}" / "module.safetensors") for k in range(b.plan.k)]
    load_module_states(b.target, states)
    train_loader, val_loader, test_loader = _loaders(b, splits)
    t0 = time.perf_counter()
    record: dict[str, Any] = {"phase": "assemble"}
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in b.target.modules()):
        record["test_acc_stored_stats"] = evaluate(b.target, test_loader)["top1"]
        record["recalibrated_norms"] = recalibrate_norms(b.target, train_loader)
    record["val_acc"] = evaluate(b.target, val_loader)["top1"]
    record["test_acc"] = evaluate(b.target, test_loader)["top1"]
    record["wall_s"] = round(time.perf_counter() - t0, 3)
    save_tensors(run / "assemble" / "model.safetensors", b.target.state_dict(), metadata={"format": "pt"})
    return finish_phase(run, "assemble", record)


def run_ft(run: Path, b: Built, splits, quiet: bool) -> dict[str, Any]:
    """FT: the assembled target fine-tuned end to end; the target holds the final weights after it."""
    from surgery.training.loop import evaluate

    epochs = b.spec.epochs[2]
    if (rec := phase_done(run, "ft")) is not None or epochs == 0:
        if epochs > 0:
            b.target.load_state_dict(load_tensors(run / "ft" / "final.safetensors"), strict=True)
        return rec or {"phase": "ft", "epochs": 0, "skipped": True}
    record = _train_phase(run, "ft", b.target, b, splits, epochs, macs_per_image=3 * b.target_macs, quiet=quiet)
    _, _, test_loader = _loaders(b, splits)
    record["test_acc"] = evaluate(b.target, test_loader)["top1"]
    save_tensors(run / "ft" / "final.safetensors", b.target.state_dict(), metadata={"format": "pt"})
    return finish_phase(run, "ft", record)


# ---------------------------------------------------------------------------- the run


def _check_run_folder(run: Path, spec: IncubationSpec) -> dict[str, Any] | None:
    """The existing manifest of the same spec, None for a new run; refuses a folder of anything else."""
    return check_run_folder(run, MANIFEST, SCHEMA, spec, "incubation run")


def _run_mt_jobs(run: Path, b: Built, splits, jobs: int, executor: str | None, quiet: bool,
                 report: Callable[[str], None]) -> list[dict[str, Any]]:
    """The K MT jobs on an executor backend (:mod:`surgery.executor`); finished ones are skipped."""
    from surgery.executor import default_backend, run_jobs, threads_per_worker

    k = b.plan.k
    backend = executor or default_backend(jobs)
    todo = [i for i in range(k) if phase_done(run, f"mt_{i}") is None]
    epochs = b.spec.epochs[1]
    if backend == "process" and jobs > 1 and len(todo) > 1:
        workers = min(jobs, len(todo))
        report(f"MT: {len(todo)} of {k} module jobs to run, {epochs} epochs each, in {workers} processes x "
               f"{threads_per_worker(workers)} threads")
        fn: Callable[..., Any] = _mt_job  # rebuilt from the run folder in each worker
    elif backend == "torchrun":
        from surgery import distributed

        world = distributed.world_size() if distributed.init_from_env() else 1
        report(f"MT: {len(todo)} of {k} module jobs to run, {epochs} epochs each, dealt to {world} processes "
               "(each trains its own jobs alone)")
        fn = lambda run_s, i: run_mt(run, b, splits, i, quiet=True)  # noqa: E731
    else:
        def fn(run_s: str, i: int) -> dict[str, Any]:
            report(f"MT_{i}: module {i} of {k} in the frozen meta model, {epochs} epochs")
            return run_mt(run, b, splits, i, quiet)

    def on_done(i: int, rec: dict[str, Any]) -> None:
        if backend != "serial" and rec is not None:
            report(f"MT_{i} done: val top-1 {rec['val_acc']:.4f} ({rec['wall_s']:.0f} s)")

    run_jobs(fn, [(str(run), i) for i in range(k)], backend=backend, workers=jobs,
             done=lambda i: phase_done(run, f"mt_{i}") is not None, on_done=on_done)
    return [phase_done(run, f"mt_{i}") for i in range(k)]


def _phase_summary(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    if rec is None:
        return None
    return {k: v for k, v in rec.items() if k != "history"}


def _write_manifest(run: Path, b: Built, phases: dict[str, Any]) -> dict[str, Any]:
    manifest = {
        "schema": SCHEMA, "spec": b.spec.model_dump(mode="json"),
        "dag": {"pt": [], **{f"mt_{k}": ["pt"] for k in range(b.plan.k)},
                "assemble": [f"mt_{k}" for k in range(b.plan.k)], "ft": ["assemble"]},
        "target": {"params": b.target_params, "macs": b.target_macs, "modules": b.plan.to_dict()},
        "meta": {"params": sum(b.meta_plan.params), "macs": sum(b.meta_plan.macs), "source": b.meta_plan.source,
                 "modules": b.meta_plan.to_dict()},
        "classes": b.classes,
        "phases": {k: _phase_summary(v) for k, v in phases.items()},
    }
    write_json(run / MANIFEST, manifest)
    return manifest


def _recipe(b: Built) -> dict[str, Any]:
    entry = _entry(b.spec.model)
    arch = {"name": entry.name, "arch": entry.timm_name, "random_init": True,
            "model_kwargs": {**entry.model_kwargs, "num_classes": len(b.classes)}}
    return {"kind": "model", "entry": arch, "num_classes": len(b.classes), "classes": b.classes,
            "target": b.spec.data, "input_size": list(b.spec.input_size), "mean": list(b.mean), "std": list(b.std),
            "made_by": "surgery incubate"}


def _card(b: Built, phases: dict[str, Any]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    rows = []
    for name, rec in phases.items():
        if rec is None or rec.get("skipped"):
            continue
        acc = rec.get("test_acc", rec.get("val_acc"))
        what = "test" if "test_acc" in rec else "val"
        cost = rec.get("train_macs_x_images")
        rows.append(f"| {name} | {rec.get('epochs', '-')} | {pct(acc)} ({what}) | {rec.get('wall_s', 0):.0f} | "
                    f"{'-' if cost is None else f'{cost / 1e12:.3g}'} |")
    spec = b.spec
    return "\n".join([
        f"# {_entry(spec.model).name}, trained by module incubation on {spec.data}",
        "",
        f"Deep Incubation (Ni et al., ICCV 2023): {spec.modules} modules, each trained inside a frozen pre-trained "
        f"meta model, then assembled and fine-tuned. Epochs PT,MT,FT = {','.join(map(str, spec.epochs))}; "
        f"batch {spec.batch_size}, lr {spec.lr}, seed {spec.seed}, input {tuple(spec.input_size)}.",
        "",
        f"- target: {b.target_params / 1e6:.3f} M params, {b.target_macs / 1e9:.4g} GMACs per image",
        f"- meta model ({b.meta_plan.source}): {sum(b.meta_plan.params) / 1e6:.3f} M params, "
        f"{sum(b.meta_plan.macs) / 1e9:.4g} GMACs per image",
        "",
        "| phase | epochs | top-1 % | wall s | train TMACs (MACs x images) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Load with `surgery.load(folder)` (a plain timm model); `surgery evaluate` / `surgery finetune` accept it.",
        "",
    ])


def _save_model(run: Path, b: Built, phases: dict[str, Any]) -> None:
    from surgery.assembled import RECIPE_SCHEMA

    save_tensors(run / "model.safetensors", b.target.state_dict(), metadata={"format": "pt", "schema": RECIPE_SCHEMA})
    write_json(run / "config.json", {"schema": RECIPE_SCHEMA, **_recipe(b)})
    write_text(run / "README.md", _card(b, phases))


def incubate(model: str | dict[str, Any], data: str, *, out: str | os.PathLike, modules: int = 4,
             epochs: tuple[int, int, int] | str = (3, 1, 1), model_kwargs: dict[str, Any] | None = None,
             meta: str | dict[str, Any] | None = None, input_size: int | None = None, batch_size: int = 64,
             lr: float = 1e-3, seed: int = 0, jobs: int = 1, init: str = "random", quiet: bool = False,
             report: Callable[[str], None] | None = None, executor: str | None = None) -> dict[str, Any]:
    """Train a model as ``modules`` incubated modules: PT -> MT_k (parallel) -> assemble -> FT.

    Args:
        model: a timm name (random init) or a zoo entry dict (``name``, ``arch``, ``model_kwargs``).
        data: target data spec (``digits``, ``fashion-mnist``, ...).
        out: the run folder, also the result's model folder; rerunning the same call resumes it.
        modules: K, at most the model's block count minus 2.
        epochs: ``(PT, MT, FT)`` or ``"PT,MT,FT"``; MT is per module job.
        model_kwargs: extra ``timm.create_model`` kwargs of the target (e.g. ``{"depth": 12}``).
        meta: None for the automatic meta model, or a shallow model: a dict of ``model_kwargs`` for
            the target's architecture (``{"depth": 4}``), a timm name, or a zoo entry dict.
        input_size: square input side; default the model's own (timm data config).
        batch_size, lr, seed: the recipe of every phase.
        jobs: MT jobs run as this many parallel processes (threads split between them).
        executor: how the independent MT jobs run (:mod:`surgery.executor`): ``"serial"``,
            ``"process"`` (``jobs`` processes) or ``"torchrun"`` (under torchrun, rank r trains jobs
            r, r + W, ... alone); None: ``torchrun`` under a torchrun launch, else ``process`` when
            ``jobs > 1``, else ``serial``. Under torchrun, ``"serial"`` trains each MT job in turn with
            all ranks (data parallel), as PT and FT always are.
        init: ``"random"`` (the paper: modules start at random) or ``"meta"`` (modules start from the
            pre-trained automatic meta model, its kept blocks copied and the others stacked).
        quiet: no progress output.
        report: receives one line per phase event (default: print unless ``quiet``).

    Returns:
        The manifest (``incubation.json``): spec, module plan, meta model, each phase's accuracy and cost.

    Raises:
        SurgeryError: bad arguments, K larger than the model allows, a model the dissection cannot cut,
            a meta model without the target's interfaces, or ``out`` holding something else.
    """
    from surgery import distributed
    from zoo.entries import ZooEntry, data_config

    distributed.init_from_env()
    if report is None:
        report = (lambda line: None) if quiet or not distributed.is_main() else (lambda line: print(line, flush=True))
    epochs = parse_epochs(epochs) if isinstance(epochs, str) else tuple(epochs)
    if len(epochs) != 3 or min(epochs) < 0 or epochs[1] < 1:
        raise SurgeryError(f"epochs must be (PT, MT, FT) with MT >= 1, got {epochs}")
    if jobs < 1:
        raise SurgeryError(f"jobs must be at least 1, got {jobs}")
    entry = {"name": model, "arch": model} if isinstance(model, str) else dict(model)
    # The target always starts from random weights (the method trains it from scratch): a zoo entry's
    # checkpoint, if any, is not used.
    entry = ZooEntry.model_validate({**entry, "weights": None, "pretrained_tag": None, "random_init": True,
                                     "model_kwargs": {**entry.get("model_kwargs", {}), **(model_kwargs or {})}}
                                    ).model_dump(mode="json")
    entry = with_input_size(entry, input_size)
    size = input_size or data_config(_entry(entry), _create_structure(entry))["input_size"][-1]
    if isinstance(meta, str):
        meta = {"name": meta, "arch": meta}
    elif isinstance(meta, dict) and not {"name", "arch"} & set(meta):
        meta = {**entry, "name": f"{entry['name']}-meta", "model_kwargs": {**entry["model_kwargs"], **meta}}
    if meta is not None:
        meta = with_input_size(ZooEntry.model_validate(meta).model_dump(mode="json"), input_size)
    chans = int(entry["model_kwargs"].get("in_chans", 3))
    try:
        spec = IncubationSpec(model=entry, meta=meta, modules=modules, epochs=epochs, data=data,
                              input_size=(chans, size, size), batch_size=batch_size, lr=lr, seed=seed, init=init)
    except ValidationError as e:
        err = e.errors()[0]
        raise SurgeryError(f"bad incubation setting {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    run = Path(out)
    existing = _check_run_folder(run, spec)
    distributed.check_batch(spec.batch_size)  # under torchrun, before anything is written
    splits = _splits(spec)
    b = build(spec, splits)
    report(f"target {b.plan.k} modules: {b.target_params / 1e6:.3f} M params, {b.target_macs / 1e9:.4g} GMACs; "
           f"meta ({b.meta_plan.source}): {sum(b.meta_plan.params) / 1e6:.3f} M params, "
           f"{sum(b.meta_plan.macs) / 1e9:.4g} GMACs")
    run.mkdir(parents=True, exist_ok=True)
    phases: dict[str, Any] = {"pt": None, **{f"mt_{k}": None for k in range(b.plan.k)}, "assemble": None, "ft": None}
    for name in phases:
        phases[name] = phase_done(run, name)
    wanted = [n for n in phases if not (n == "pt" and epochs[0] == 0) and not (n == "ft" and epochs[2] == 0)]
    finished = all(phases[n] is not None for n in wanted) and (run / "config.json").exists()
    if existing is not None:
        done = [n for n in phases if phases[n] is not None]
        report(f"resuming {run}: done {', '.join(done) or 'nothing'}" + ("; nothing left to do" if finished else ""))
    if finished:  # the model folder may hold a later fine-tuning: leave it as it is
        return read_json(run / MANIFEST, what="incubation manifest")
    _write_manifest(run, b, phases)
    if epochs[0] > 0:
        if phases["pt"] is None:
            report(f"PT: meta model end to end, {epochs[0]} epochs")
        phases["pt"] = run_pt(run, b, splits, quiet)
    else:
        report("PT skipped (0 epochs): the meta model is used as built" +
               (" (random weights: a frozen random context teaches the modules little)" if spec.meta is None else ""))
        phases["pt"] = {"phase": "pt", "epochs": 0, "skipped": True}
    _write_manifest(run, b, phases)
    for k, rec in enumerate(_run_mt_jobs(run, b, splits, jobs, executor, quiet, report)):
        phases[f"mt_{k}"] = rec
    _write_manifest(run, b, phases)
    phases["assemble"] = assemble(run, b, splits)
    asm = phases["assemble"]
    stored = (f" (batch-norm statistics re-estimated on training images; with the modules' stored statistics: "
              f"test top-1 {asm['test_acc_stored_stats']:.4f})" if "test_acc_stored_stats" in asm else "")
    report(f"assembled (before fine-tuning): val top-1 {asm['val_acc']:.4f}, test top-1 {asm['test_acc']:.4f}{stored}")
    if epochs[2] > 0 and phase_done(run, "ft") is None:
        report(f"FT: the assembled model end to end, {epochs[2]} epochs")
    phases["ft"] = run_ft(run, b, splits, quiet)
    manifest = _write_manifest(run, b, phases)
    _save_model(run, b, phases)
    final = phases["ft"].get("test_acc", phases["assemble"]["test_acc"])
    report(f"done: test top-1 {final:.4f}; model folder {run} (config.json, model.safetensors, README.md)")
    return manifest


def _create_structure(entry_dict: dict[str, Any]) -> nn.Module:
    from zoo.entries import build_model

    return build_model(_entry(entry_dict), structure_only=True)
