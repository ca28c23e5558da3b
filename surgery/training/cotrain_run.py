"""``surgery cotrain``: divide a timm model into S members, co-train them, save the ensemble.

A run folder is also the result's model folder:

* ``cotrain.json``: the spec, the division (member width arguments, sizes), how the members ran
  (``stacked`` under vmap or ``looped``), and once finished the test accuracies of the ensemble and of
  every member;
* ``train/``: the one loop's metrics log and checkpoint (``kill -9`` then the same command resumes;
  a folder of other options is refused, untouched);
* ``config.json`` (``kind: "ensemble"``: the member recipe, S, classes, input size, normalisation),
  ``model.safetensors`` (``members.<i>.<name>``) and ``README.md``, written when training finishes.
  :func:`surgery.load` returns an :class:`~surgery.training.cotrain.Ensemble`.

The method, from Zhao et al. (IEEE TIP 2022): :mod:`surgery.training.divide` (widths, divided
regularisation) and :mod:`surgery.training.cotrain` (views, JSD loss, batched members).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from surgery.errors import SurgeryError
from surgery.training.phases import check_run_folder, split_loaders
from surgery.workspace import save_tensors, write_json, write_text

__all__ = ["CoTrainSpec", "cotrain", "evaluate_ensemble", "SCHEMA"]

SCHEMA = "surgery.cotrain/1"
MANIFEST = "cotrain.json"
VAL_FRACTION = 0.1


class CoTrainSpec(BaseModel):
    """Everything that decides a co-training run (the manifest records it; a rerun must match).

    Attributes:
        model: ``{"arch": timm name, "model_kwargs": {...}}`` of the undivided model.
        ways: S.
        match: the division keeps total ``params`` or ``macs``.
        data: target data spec; ``input_size``: ``(C, H, W)``.
        epochs, batch_size, lr, weight_decay, label_smoothing, seed: the loop's recipe.
        divide_weight_decay: multiply the weight decay by ``exp(1/S - 1)`` (the paper's Eq. 6).
        regularisation: dropout / drop-path division, ``sqrt`` (p / sqrt(S)) or ``linear`` (p / S).
        lam, warmup, views, mixup: the co-training loss (:class:`~surgery.training.cotrain.CoTrainingTask`).
        members: ``auto`` (stacked when vmap runs the members and is faster here), ``stacked`` or ``looped``.
    """

    model_config = ConfigDict(extra="forbid")

    model: dict[str, Any]
    ways: int = Field(2, ge=1)
    match: Literal["params", "macs"] = "params"
    data: str
    input_size: tuple[int, int, int]
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    divide_weight_decay: bool = False
    regularisation: Literal["sqrt", "linear"] = "sqrt"
    lam: float = Field(0.5, ge=0)
    warmup: float = Field(0.13, ge=0, le=1)
    views: bool = True
    mixup: float = Field(0.0, ge=0)
    members: Literal["auto", "stacked", "looped"] = "auto"


def _choose_members(members, choice: str, example: torch.Tensor) -> tuple[torch.nn.Module, str, dict[str, float]]:
    """Stacked or looped; ``auto`` times one training step of each on ``example`` and keeps the faster.

    Measured, not assumed: vmap turns S convolutions into one grouped convolution, which wins where
    per-operation overhead dominates (small members, GPUs) and loses on a few CPU cores with wider
    members (ResNet-18 divided in 4, 32 px, 2 cores: 137 ms batched vs 100 ms looped per step).
    """
    from surgery.training.cotrain import LoopedMembers, co_training_views, make_members

    if choice == "looped" or len(members) == 1:
        return LoopedMembers(members), "looped", {}
    stacked, mode = make_members(members, True if choice == "stacked" else "auto", example)
    if choice == "stacked" or mode == "looped":
        return stacked, mode, {}
    looped = LoopedMembers(members)
    views = co_training_views(example, len(members))
    timings = {}
    for name, module in (("stacked", stacked), ("looped", looped)):
        state = {k: v.clone() for k, v in module.state_dict().items()}
        module.train()
        best = float("inf")
        for _ in range(2):  # the first call pays one-off costs
            t0 = time.perf_counter()
            module(views, per_member=True).float().sum().backward()
            best = min(best, time.perf_counter() - t0)
        module.zero_grad(set_to_none=True)
        module.load_state_dict(state)  # timing must not move batch-norm statistics
        timings[name] = round(best, 4)
    from surgery import distributed

    # every rank must build the same layout (DDP checks it): rank 0's measurement decides
    choice = distributed.broadcast_object("stacked" if timings["stacked"] <= timings["looped"] else "looped")
    return (stacked, "stacked", timings) if choice == "stacked" else (looped, "looped", timings)


def evaluate_ensemble(ensemble, loader, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Ensemble and member top-1 in one pass; images/s with members run one by one and concurrently.

    Returns:
        ``{"top1", "loss", "n", "member_top1": [...], "images_per_s": sequential, "images_per_s_concurrent"}``.
    """
    import torch.nn.functional as F

    ensemble.eval().to(device)
    correct, members_correct, loss, n = 0, None, 0.0, 0
    ensemble.concurrent = False
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            z = ensemble.member_logits(x).float()  # (S, B, K)
            mean = z.mean(0)
            correct += int((mean.argmax(-1) == y).sum())
            loss += float(F.cross_entropy(mean, y, reduction="sum"))
            hits = (z.argmax(-1) == y).sum(1)
            members_correct = hits if members_correct is None else members_correct + hits
            n += y.shape[0]
    sequential = n / max(time.perf_counter() - t0, 1e-9)
    ensemble.concurrent = True
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            ensemble(x.to(device))
    concurrent = n / max(time.perf_counter() - t0, 1e-9)
    ensemble.concurrent = False
    return {"top1": correct / n, "loss": loss / n, "n": n,
            "member_top1": [int(c) / n for c in members_correct.tolist()],
            "images_per_s": sequential, "images_per_s_concurrent": concurrent}


def _check_folder(run: Path, spec: CoTrainSpec) -> dict[str, Any] | None:
    return check_run_folder(run, MANIFEST, SCHEMA, spec, "co-training run")


def _card(manifest: dict[str, Any]) -> str:
    spec, div, res = manifest["spec"], manifest["division"], manifest.get("result", {})
    members = res.get("member_top1") or []
    macs = spec["match"] == "macs"
    unit, scale = ("GMACs", 1e9) if macs else ("M params", 1e6)
    each, whole = (div["member_macs"], div["original_macs"]) if macs else (div["member_params"], div["original_params"])
    lines = [
        f"# Co-trained ensemble: {spec['model']['arch']} divided in {spec['ways']}",
        "",
        "Divide-and-Co-training (Zhao et al., IEEE TIP 2022), made by `surgery cotrain`.",
        "",
        f"- members: `{div['recipe']['arch']}` with {div['recipe']['model_kwargs']} ({div['family']} rule, width "
        f"x{div['multiplier']:.3f}), {each / scale:.4g} {unit} each, {spec['ways']} x = "
        f"{spec['ways'] * each / scale:.4g} {unit} against {whole / scale:.4g} {unit} undivided ({div['error']:+.1%})",
        f"- data `{spec['data']}` at {tuple(spec['input_size'])}; {spec['epochs']} epochs, batch {spec['batch_size']}, "
        f"lr {spec['lr']}, JSD weight {spec['lam']} (warm-up {spec['warmup']:.0%} of the steps), members "
        f"{manifest['members']}",
    ]
    if res:
        lines += ["", f"Test top-1: ensemble **{res['top1']:.2%}**; members "
                  + ", ".join(f"{a:.2%}" for a in members) + f" ({res['n']} images).",
                  f"Inference: {res['images_per_s']:.0f} images/s members one by one, "
                  f"{res['images_per_s_concurrent']:.0f} concurrently."]
    return "\n".join(lines) + "\n"


def cotrain(model: str | dict[str, Any], data: str, *, out: str | os.PathLike, ways: int = 2, epochs: int = 10,
            input_size: int | None = None, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05,
            seed: int = 0, match: str = "params", lam: float = 0.5, warmup: float = 0.13, views: bool = True,
            mixup: float = 0.0, label_smoothing: float = 0.0, divide_weight_decay: bool = False,
            regularisation: str = "sqrt", members: str = "auto", quiet: bool = False,
            report=None) -> dict[str, Any]:
    """Divide ``model`` into ``ways`` members, co-train them on ``data``, save the ensemble in ``out``.

    Args:
        model: a timm name, or ``{"arch": name, "model_kwargs": {...}}`` (random init).
        data: target data (``digits``, ``fashion-mnist``, a folder, ...).
        out: the run folder, also the model folder; rerunning the same call resumes it.
        ways: S >= 1 (S = 1 is plain training of the undivided model, with the same views and loop).
        input_size: square input side (default the model's own); ViTs get ``img_size`` to match.
        epochs, batch_size, lr, weight_decay, seed, label_smoothing: the training recipe.
        match, divide_weight_decay, regularisation: see :func:`surgery.training.divide.divide`.
        lam, warmup, views, mixup: the co-training loss.
        members: ``auto`` | ``stacked`` | ``looped`` (see :class:`CoTrainSpec`).
        quiet: no progress output; ``report``: receives one line per event (default print).

    Returns:
        The manifest (``cotrain.json``).

    Raises:
        SurgeryError: bad options, an architecture that cannot be divided, ``out`` holding something else.
    """
    import timm

    from surgery import distributed
    from surgery.training.checkpoint import find_checkpoint
    from surgery.training.cotrain import CoTrainingTask, to_ensemble
    from surgery.training.divide import build_member, divide, divided_weight_decay
    from surgery.training.incubation_run import with_input_size
    from surgery.training.loop import TrainConfig, train
    from zoo.entries import ZooEntry, data_config

    distributed.init_from_env()
    if report is None:
        report = (lambda line: None) if quiet or not distributed.is_main() else (lambda line: print(line, flush=True))
    if not isinstance(ways, int) or ways < 1:
        raise SurgeryError(f"--ways must be a whole number >= 1, got {ways!r}")
    entry = {"name": model, "arch": model} if isinstance(model, str) else {"name": model.get("arch"), **model}
    entry.setdefault("model_kwargs", {})
    entry = with_input_size({"name": entry["name"], "arch": entry["arch"], "random_init": True,
                             "model_kwargs": dict(entry["model_kwargs"])}, input_size)
    zentry = ZooEntry.model_validate(entry)
    try:
        with torch.device("meta"):
            probe = timm.create_model(zentry.timm_name, pretrained=False, **zentry.model_kwargs)
    except (RuntimeError, TypeError, ValueError) as e:
        raise SurgeryError(f"cannot build {zentry.timm_name}: {str(e).splitlines()[0]}") from None
    cfg = data_config(zentry, probe)
    size = input_size or cfg["input_size"][-1]
    chans = int(zentry.model_kwargs.get("in_chans", 3))
    try:
        spec = CoTrainSpec(model={"arch": zentry.timm_name, "model_kwargs": zentry.model_kwargs}, ways=ways,
                           match=match, data=data, input_size=(chans, size, size), epochs=epochs, batch_size=batch_size,
                           lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing, seed=seed,
                           divide_weight_decay=divide_weight_decay, regularisation=regularisation, lam=lam,
                           warmup=warmup, views=views, mixup=mixup, members=members)
    except ValidationError as e:
        err = e.errors()[0]
        raise SurgeryError(f"bad co-training setting {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    run = Path(out)
    existing = _check_folder(run, spec)
    distributed.check_batch(spec.batch_size)  # before anything is written
    distributed.barrier()  # every rank has read the folder before rank 0 writes to it
    if existing is not None and existing.get("complete"):
        report(f"{run} is already co-trained with these options")
        return existing
    (train_loader, val_loader, test_loader), classes = split_loaders(spec.data, spec.seed, spec.input_size,
                                                                     spec.batch_size, cfg["mean"], cfg["std"],
                                                                     VAL_FRACTION)
    division = divide(spec.model, ways, match=spec.match, input_size=spec.input_size, num_classes=len(classes),
                      seed=seed, regularisation=spec.regularisation, build=False)
    recipe = division.member_recipe
    members_list = [build_member(recipe, spec.input_size, seed + i).train() for i in range(ways)]
    example = next(iter(val_loader))[0][:16]  # not the shuffled loader: its order must not move
    if existing is not None:  # resuming: the members ran as recorded (the checkpoint's layout)
        trainable, mode, timings = _choose_members(members_list, existing["members"], example)
    else:
        trainable, mode, timings = _choose_members(members_list, spec.members, example)
    unit, scale = ("GMACs", 1e9) if spec.match == "macs" else ("M params", 1e6)
    each, whole = ((division.member_macs, division.original_macs) if spec.match == "macs"
                   else (division.member_params, division.original_params))
    report(f"{zentry.timm_name} divided in {ways}: {recipe['model_kwargs']} ({division.family}), "
           f"{each / scale:.4g} {unit} each, {ways * each / scale:.4g} {unit} in all vs "
           f"{whole / scale:.4g} {unit} ({division.error:+.1%}); members {mode}"
           + (f" (one step: stacked {timings['stacked'] * 1e3:.0f} ms, looped {timings['looped'] * 1e3:.0f} ms)"
              if timings else ""))
    manifest: dict[str, Any] = {
        "schema": SCHEMA, "spec": spec.model_dump(mode="json"), "members": mode, "member_timing_s": timings,
        "division": {"recipe": recipe, "family": division.family, "multiplier": division.multiplier,
                     "original_params": division.original_params, "member_params": division.member_params,
                     "original_macs": division.original_macs, "member_macs": division.member_macs,
                     "error": division.error, "notes": division.notes},
        "classes": classes, "complete": False,
    }
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / MANIFEST, manifest)
    wd = divided_weight_decay(spec.weight_decay, ways) if spec.divide_weight_decay else spec.weight_decay
    config = TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, weight_decay=wd,
                         warmup_epochs=min(1.0, spec.epochs / 5), seed=seed, label_smoothing=spec.label_smoothing,
                         channels_last=False, log_every=0)
    task = CoTrainingTask(ways, lam=spec.lam, warmup=spec.warmup, views=spec.views, mixup=spec.mixup,
                          label_smoothing=spec.label_smoothing)
    resume = find_checkpoint(run / "train") is not None
    result = train(trainable, train_loader, val_loader, config, out_dir=run / "train", resume=resume, task=task,
                   quiet=quiet)
    ensemble = to_ensemble(trainable, members_list)
    test = evaluate_ensemble(ensemble, test_loader, next(iter(trainable.parameters())).device)
    last = result.history[-1] if result.history else {}
    manifest["result"] = {**test, "val_acc": last.get("val_acc"), "best_val_acc": result.best_val_acc,
                          "train_member_acc": [last.get(f"train_member{i}_acc") for i in range(ways)],
                          "train_images_per_s": last.get("images_per_s"), "resumed": resume,
                          "wall_s": round(sum(r["epoch_time_s"] for r in result.history), 3)}
    manifest["complete"] = True
    from surgery.assembled import RECIPE_SCHEMA

    save_tensors(run / "model.safetensors", ensemble.state_dict(), metadata={"format": "pt", "schema": RECIPE_SCHEMA})
    write_json(run / "config.json", {
        "schema": RECIPE_SCHEMA, "kind": "ensemble", "member": recipe, "ways": ways, "num_classes": len(classes),
        "classes": classes, "target": spec.data, "input_size": list(spec.input_size), "mean": list(cfg["mean"]),
        "std": list(cfg["std"]), "made_by": "surgery cotrain"})
    write_text(run / "README.md", _card(manifest))
    write_json(run / MANIFEST, manifest)
    distributed.barrier()
    report(f"done: test top-1 ensemble {test['top1']:.4f}, members "
           + ", ".join(f"{a:.4f}" for a in test["member_top1"])
           + f"; {test['images_per_s']:.0f} images/s one by one, {test['images_per_s_concurrent']:.0f} concurrently; "
           f"model folder {run}")
    return manifest
