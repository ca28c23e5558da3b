"""surgery: cut pretrained networks into blocks, find equivalent blocks, reassemble them under budgets.

Entry points: ``import surgery`` (this module) and the ``surgery`` command (:mod:`surgery.cli`).

Public API (imported lazily, so ``import surgery`` stays cheap)::

    surgery.dissect(model, input_size=(3, 224, 224))   # -> Dissection (.blocks, .block_info, ...)
    surgery.load_library(workdir)                      # blocks rebuilt from a workspace
    surgery.cka(X, Y, estimator="unbiased")            # linear CKA of two feature matrices
    surgery.StreamingCKA                               # all-pairs minibatch CKA accumulator
    surgery.count_macs(module, x), surgery.count_params(module)
    surgery.reassemble(workdir, max_gflops=..., data=...)  # -> ranked candidates and the built model
    surgery.load(model_dir)                            # a saved reassembled model, no unpickling
    surgery.train(model, loader, val_loader, config)   # the one training loop
    surgery.incubate("vit_tiny_patch16_224", "fashion-mnist", out="run")  # Deep Incubation, resumable
    surgery.align("my-model", "digits", teacher="best-single")  # incubation-aligned reassembly, in place
    surgery.divide("resnet18", ways=2)                 # S narrower members of about the same total size
    surgery.cotrain("resnet18", "fashion-mnist", ways=2, out="run")  # Divide-and-Co-training, resumable
    surgery.grow("vit_tiny_patch16_224", "fashion-mnist", out="run", schedule="auto")  # AutoProg / MoGrow
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_LAZY = {
    "dissect": ("surgery.dissection", "dissect"),
    "Dissection": ("surgery.dissection", "Dissection"),
    "load_library": ("surgery.library", "load_library"),
    "Library": ("surgery.library", "Library"),
    "cka": ("surgery.cka", "cka"),
    "StreamingCKA": ("surgery.cka", "StreamingCKA"),
    "count_macs": ("surgery.count", "count_macs"),
    "count_params": ("surgery.count", "count_params"),
    "TensorSpec": ("surgery.spec", "TensorSpec"),
    "BlockInfo": ("surgery.spec", "BlockInfo"),
    "Workspace": ("surgery.workspace", "Workspace"),
    "reassemble": ("surgery.reassembly", "reassemble"),
    "baseline": ("surgery.baseline", "baseline"),
    "load": ("surgery.assembled", "load"),
    "ReassembledModel": ("surgery.assembled", "ReassembledModel"),
    "train": ("surgery.training.loop", "train"),
    "evaluate": ("surgery.training.loop", "evaluate"),
    "TrainConfig": ("surgery.training.loop", "TrainConfig"),
    "incubate": ("surgery.training.incubation_run", "incubate"),
    "align": ("surgery.training.align_run", "align"),
    "divide": ("surgery.training.divide", "divide"),
    "cotrain": ("surgery.training.cotrain_run", "cotrain"),
    "Ensemble": ("surgery.training.cotrain", "Ensemble"),
    "grow": ("surgery.training.grow_run", "grow"),
}

__all__ = sorted(_LAZY)


class _PackageModule(types.ModuleType):
    """The package's module type: public names win over same-named submodules.

    Importing a submodule binds it as an attribute of its package (``import surgery.cka`` sets
    ``surgery.cka`` to the module), which would shadow the public function of the same name for the
    rest of the process: ``surgery.cka(x, y)`` raised "'module' object is not callable" once anything
    had imported ``surgery.cka``. Such bindings are dropped here; the submodule stays importable by
    its dotted path (``from surgery.cka import StreamingCKA``) through ``sys.modules``.
    """

    def __setattr__(self, name: str, value) -> None:
        if (name in _LAZY and isinstance(value, types.ModuleType)
                and value.__name__ == f"{__name__}.{name}"):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _PackageModule


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
