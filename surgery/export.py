"""``surgery export``: a saved model folder (or one member of an ensemble) as a ``torch.export`` program.

The program (``.pt2``, :func:`torch.export.save`) runs without surgery or timm installed:
``torch.export.load(path).module()(x)``. The batch dimension is exported as dynamic when the model
allows it (otherwise the example's batch size is fixed, and said so), and the exported program's
outputs are checked against the eager model's before the file is written.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from surgery.errors import SurgeryError

__all__ = ["export_model_dir"]


def export_model_dir(model_dir: str | os.PathLike, out: str | os.PathLike, *, member: int | None = None,
                     batch: int = 2) -> Path:
    """Export a model folder with ``torch.export``; returns the written file.

    Args:
        model_dir: any folder :func:`surgery.load` reads.
        out: destination ``.pt2`` file (written atomically).
        member: for an ensemble (``surgery cotrain``), export member ``member`` alone.
        batch: batch size of the example input ``(batch, *input_size)``.

    Raises:
        SurgeryError: ``member`` on a model that is not an ensemble or out of range; a model
            ``torch.export`` cannot capture; outputs of the exported program that differ.
    """
    from surgery.assembled import load, read_recipe
    from surgery.workspace import atomic_path

    out = Path(out)
    if out.is_dir():
        raise SurgeryError(f"--out {out} is a folder; give a file name such as {out / 'model.pt2'}")
    if batch < 2:  # torch.export specialises a dimension of size 1: the program would take batch 1 only
        raise SurgeryError(f"the example batch must be at least 2 (got {batch}) to keep the batch dimension dynamic")
    recipe = read_recipe(model_dir)
    model = load(model_dir)
    if member is not None:
        if recipe.get("kind") != "ensemble":
            raise SurgeryError(f"--member applies to an ensemble folder (surgery cotrain); {model_dir} is not one")
        if not 0 <= member < len(model.members):
            raise SurgeryError(f"--member must be in 0..{len(model.members) - 1}, got {member}")
        model = model.members[member].eval()
    x = torch.randn(batch, *recipe["input_size"])
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception:  # noqa: BLE001  (a model that specialises its batch size: export it fixed)
        try:
            program = torch.export.export(model, (x,))
        except Exception as e:  # noqa: BLE001
            raise SurgeryError(f"torch.export cannot capture {model_dir}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]}") from None
    with torch.inference_mode():
        expected, got = model(x), program.module()(x)
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        raise SurgeryError(f"the exported program of {model_dir} differs from the model "
                           f"(max |diff| {(expected - got).abs().max().item():.3g}); not written")
    buffer = io.BytesIO()  # torch.export.save wants a .pt2 name or a buffer; the file is then written atomically
    torch.export.save(program, buffer)
    with atomic_path(out) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return out
