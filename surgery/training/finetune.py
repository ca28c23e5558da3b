"""Fine-tune and evaluate a saved reassembled model folder: ``surgery finetune`` / ``surgery evaluate``.

Both read the model's recipe (``config.json``) for its input size and normalisation, so the target
data is presented exactly as the model's first block expects it. Fine-tuning goes through the one
training loop (:func:`surgery.training.train`); checkpoints live in ``MODEL_DIR/finetune/`` (``--resume``
continues from there), and the fine-tuned weights replace ``model.safetensors`` atomically only
when training completes, so an interrupted run never damages the saved model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from surgery.assembled import load, read_recipe
from surgery.count import count_macs, count_params
from surgery.training.loop import TrainConfig, evaluate, train
from surgery.workspace import read_json, save_tensors, write_json


def check_classes(recipe: dict[str, Any], data: str, classes: Sequence[Any]) -> None:
    """Refuse data whose classes are not the ones the model's head was made for.

    The count must match, and so must the class names when the model folder records them (a digits
    model and Fashion-MNIST both have 10 classes; fine-tuning one on the other would silently replace
    the head's meaning, evaluating it would report a meaningless accuracy).

    Raises:
        SurgeryError: the classes differ (one line, naming both).
    """
    from surgery.errors import SurgeryError

    names = [str(c) for c in classes]
    if len(names) != recipe["num_classes"]:
        raise SurgeryError(f"{data} has {len(names)} classes but the model's head has {recipe['num_classes']}; "
                           "reassemble with --data on this target")
    made_for = recipe.get("classes")
    if made_for is not None and [str(c) for c in made_for] != names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        made = ", ".join(str(c) for c in made_for[:4]) + (", ..." if len(made_for) > 4 else "")
        raise SurgeryError(f"{data}'s classes ({shown}) are not the ones the model was made for "
                           f"({recipe.get('target', 'its target')}: {made}); reassemble with --data on this target")


def _loaders(recipe: dict[str, Any], data: str, batch_size: int, seed: int, val_fraction: float = 0.1):
    from zoo.data import load_splits, make_loader, make_transform

    splits = load_splits(data, seed=seed, val_fraction=val_fraction)
    check_classes(recipe, data, splits["train"].classes)
    tf = make_transform(tuple(recipe["input_size"]), recipe.get("mean"), recipe.get("std"))
    return (make_loader(splits["train"], batch_size, shuffle=True, seed=seed, transform=tf),
            make_loader(splits["val"], batch_size, transform=tf),
            make_loader(splits["test"], batch_size, transform=tf))


def finetune_model_dir(model_dir: str | Path, data: str, *, epochs: int = 5, batch_size: int = 64, lr: float = 1e-3,
                       freeze: str = "none", seed: int = 0, resume: bool = False, quiet: bool = False,
                       **config: Any) -> dict[str, Any]:
    """Fine-tune a saved reassembled model on ``data`` and write the result back into the folder.

    Args:
        model_dir: folder written by ``surgery reassemble``.
        data: target data source (its classes must match the model's head).
        epochs, batch_size, lr, seed: training recipe (see :class:`surgery.training.TrainConfig`).
        freeze: ``"none"`` (DeRy FT) or ``"blocks"`` (DeRy FZ: only stitches and head train).
        resume: continue an interrupted fine-tuning from ``MODEL_DIR/finetune``.
        quiet: no progress output.
        **config: other :class:`~surgery.training.TrainConfig` fields.

    Returns:
        A summary: history, best and last validation accuracy, held-out test accuracy.
    """
    from surgery import distributed

    distributed.init_from_env()
    model_dir = Path(model_dir)
    recipe = read_recipe(model_dir)
    model = load(model_dir)
    train_loader, val_loader, test_loader = _loaders(recipe, data, batch_size, seed)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, freeze=freeze, seed=seed, **config)
    result = train(model, train_loader, val_loader, cfg, out_dir=model_dir / "finetune", resume=resume, quiet=quiet)
    final = result.ema_model if result.ema_model is not None else model
    test = evaluate(final, test_loader)
    save_tensors(model_dir / "model.safetensors", final.state_dict(), metadata={"format": "pt"})
    summary = {"data": data, "epochs": epochs, "freeze": freeze, "lr": lr, "batch_size": batch_size, "seed": seed,
               "best_val_acc": result.best_val_acc, "last_val_acc": result.last_val_acc,
               "test_top1": test["top1"], "test_loss": test["loss"], "history": result.history}
    write_json(model_dir / "finetune.json", summary)
    distributed.barrier()  # the folder is complete on disk before any rank returns
    return summary


def evaluate_model_dir(model_dir: str | Path, data: str, *, split: str = "test", batch_size: int = 128,
                       seed: int = 0) -> dict[str, Any]:
    """Top-1, loss, params, GFLOPs and images/s of a saved model on a split of ``data``.

    For an ensemble folder (``surgery cotrain``) also each member's top-1 (``member_top1``) and the
    images/s with the members run concurrently (``images_per_s_concurrent``).
    """
    from zoo.data import load_split, make_loader, make_transform

    model_dir = Path(model_dir)
    recipe = read_recipe(model_dir)
    model = load(model_dir)
    ds = load_split(data, split, seed=seed)
    check_classes(recipe, data, ds.classes)
    tf = make_transform(tuple(recipe["input_size"]), recipe.get("mean"), recipe.get("std"))
    t0 = time.perf_counter()
    if recipe.get("kind") == "ensemble":  # one pass for the ensemble and every member, then a concurrent pass
        from surgery.training.cotrain_run import evaluate_ensemble

        metrics = evaluate_ensemble(model, make_loader(ds, batch_size, transform=tf))
    else:
        metrics = evaluate(model, make_loader(ds, batch_size, transform=tf))
    seconds = time.perf_counter() - t0
    macs = count_macs(model, torch.zeros(1, *recipe["input_size"]))
    out = {"model": str(model_dir), "data": data, "split": split, **metrics, "params": count_params(model),
           "macs": macs, "seconds": seconds}
    ft = model_dir / "finetune.json"
    if ft.exists():
        out["finetuned"] = {k: v for k, v in read_json(ft).items() if k != "history"}
    return out
