"""Every public name of ``surgery`` works whatever was imported before it.

Lazy public names share some names with submodules (``surgery.cka`` the function and ``surgery/cka.py``);
importing the submodule must not shadow the public name.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import surgery

SUBMODULES = sorted(m.name for m in pkgutil.iter_modules(surgery.__path__, "surgery."))


def test_every_public_name_after_importing_every_submodule():
    for name in SUBMODULES:
        importlib.import_module(name)
    for name in surgery.__all__:
        module_path, attr = surgery._LAZY[name]
        expected = getattr(importlib.import_module(module_path), attr)
        assert getattr(surgery, name) is expected, name
    assert callable(surgery.cka) and callable(surgery.train)


@pytest.mark.parametrize("first", ["import surgery.cka", "import surgery.training", "import surgery.reassembly",
                                   "import surgery; surgery.StreamingCKA", "import surgery; surgery.evaluate"])
def test_cka_and_train_after_a_colliding_import(first):
    """Fresh interpreter per case: the collision depends on what the process imported first."""
    code = (f"{first}\n"
            "import numpy as np, surgery\n"
            "x = np.random.default_rng(0).normal(size=(20, 5))\n"
            "assert abs(surgery.cka(x, x) - 1) < 1e-9\n"
            "assert surgery.train.__name__ == 'train' and callable(surgery.train)\n"
            "from surgery.cka import StreamingCKA\n"
            "assert StreamingCKA is surgery.StreamingCKA\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr.strip().splitlines()[-1:]
