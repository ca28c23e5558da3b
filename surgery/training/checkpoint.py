"""Atomic training checkpoints and the RNG state that makes a resumed run exact.

A checkpoint is a folder: ``model.safetensors`` (weights and buffers) and ``state.pt`` (optimizer,
scheduler, scaler, EMA, epoch, step, RNG states, history, config: tensors and plain containers only,
so ``torch.load(..., weights_only=True)`` reads it). It is written as ``checkpoint.tmp`` and renamed
into place, so ``checkpoint`` (or ``checkpoint.old`` after a crash between two renames) is always
complete.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_model
from torch import nn

__all__ = ["CHECKPOINT_DIR", "CHECKPOINT_FORMAT", "rng_state", "set_rng_state", "loader_generators",
           "save_checkpoint", "find_checkpoint"]

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FORMAT = "surgery.train/1"


def rng_state(loader: Any) -> dict[str, Any]:
    """Every RNG that decides data order, dropout and augmentation, as tensors and plain containers."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    for name, gen in loader_generators(loader).items():
        state[name] = gen.get_state()
    return state


def set_rng_state(state: dict[str, Any], loader: Any) -> None:
    """Restore what :func:`rng_state` captured, the loader's own generators included."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in loader_generators(loader).items():
        if name in state:
            gen.set_state(state[name])


def loader_generators(loader: Any) -> dict[str, torch.Generator]:
    """Private generators a DataLoader or its sampler shuffle with (not covered by the global RNG)."""
    gens = {}
    candidates = {
        "loader_generator": getattr(loader, "generator", None),
        "sampler_generator": getattr(getattr(loader, "sampler", None), "generator", None),
    }
    for name, gen in candidates.items():
        if isinstance(gen, torch.Generator) and all(gen is not g for g in gens.values()):
            gens[name] = gen
    return gens


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(out_dir: Path, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write ``checkpoint.tmp`` completely, then swap it in with renames (never a half checkpoint)."""
    final, tmp, old = out_dir / CHECKPOINT_DIR, out_dir / f"{CHECKPOINT_DIR}.tmp", out_dir / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"),
               metadata={"format": CHECKPOINT_FORMAT, "epoch": str(state["epoch"])}, force_contiguous=True)
    _fsync(tmp / "model.safetensors")
    # state.pt last: its presence marks the folder complete.
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint folder under ``out_dir`` (``checkpoint``, then ``checkpoint.old``)."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        folder = out_dir / name
        if (folder / "state.pt").is_file() and (folder / "model.safetensors").is_file():
            return folder
    return None
