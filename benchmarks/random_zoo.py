"""Random-init zoo entries at a chosen input size, shared by the benchmarks that build their own zoo."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.entries import ZooEntry  # noqa: E402

# timm families whose patch grid is fixed at construction: they need img_size, not just another input size
_FIXED_GRID = ("vit", "deit", "swin", "beit", "eva")


def zoo_entries(names: list[str], size: int) -> list[ZooEntry]:
    """Random-init entries at ``size`` px (ViT-style models get ``img_size`` so their grid matches)."""
    entries = []
    for n in names:
        if size == 224:
            entries.append(ZooEntry(name=n, random_init=True))
        elif any(k in n for k in _FIXED_GRID):
            entries.append(ZooEntry(name=n, random_init=True, model_kwargs={"img_size": size}))
        else:
            entries.append(ZooEntry(name=n, random_init=True, input_size=(3, size, size)))
    return entries


def dissected_workspace(root: Path, names: list[str], size: int):
    """A workspace at ``root`` with ``names`` dissected at random init and ``size`` px; exits on a failure."""
    from surgery.library import dissect_zoo
    from surgery.workspace import Workspace

    ws = Workspace(root)
    status = dissect_zoo(zoo_entries(names, size), ws, verify=False)
    failed = [f"{s.name}: {s.reason}" for s in status if s.status == "failed"]
    if failed:
        raise SystemExit(f"dissect failed: {failed}")
    return ws
