"""Tests of the mini-zoo: the definition in zoo/mini.py and the builder in surgery/minizoo.py.

Every spec is checked structurally (builds, 0.2-3 M params, runs at 32x32, dissects into >= 4 blocks);
the builder runs in quick mode (a few hundred images, one epoch) on three models of different
families into a temporary folder, and the tests assert on what it wrote: a loadable zoo file whose
entries rebuild to the trained models, cards, README, and caching on a second call.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch

from surgery.count import count_params
from surgery.errors import SurgeryError
from surgery.minizoo import CARDS_FILE, README_FILE, build_mini_zoo, default_mini_zoo_dir, numerics, probe_input
from zoo.data import FASHION_MNIST_DIRS, load_split
from zoo.entries import build_model, data_config, load_zoo_file
from zoo.mini import MINI_INPUT_SIZE, MINI_THREADS, MINI_ZOO, mini_spec, spec_hash

try:
    from surgery.dissection import dissect
except ImportError:  # older layout
    from surgery.dissect import dissect

torch.set_num_threads(2)

# One CNN, one ViT, one ConvNeXt: different families, all quick to train.
QUICK_NAMES = ["resnet10t-fm04", "convnext-fm59", "vit-fmall"]


def _fashion_mnist_installed() -> bool:
    return any((Path(d).expanduser() / f"train-images-idx3-ubyte{ext}").exists()
               for d in FASHION_MNIST_DIRS for ext in ("", ".gz"))


needs_fashion_mnist = pytest.mark.skipif(
    not _fashion_mnist_installed(), reason="Debian package dataset-fashion-mnist not installed"
)

# ---------------------------------------------------------------------------------------- definition


def test_specs_are_unique_diverse_and_hash_stably():
    names = [s.name for s in MINI_ZOO]
    assert len(set(names)) == len(names) >= 6
    assert len({s.family for s in MINI_ZOO}) >= 6  # heterogeneous: one family per model
    assert len({s.data for s in MINI_ZOO}) >= 3 and len({s.seed for s in MINI_ZOO}) == len(MINI_ZOO)
    spec = MINI_ZOO[0]
    assert spec_hash(spec) == spec_hash(dataclasses.replace(spec))
    assert spec_hash(spec) != spec_hash(dataclasses.replace(spec, seed=spec.seed + 1))
    assert spec_hash(spec, quick=True) != spec_hash(spec)
    assert mini_spec(spec.name) is spec
    with pytest.raises(KeyError, match="known"):
        mini_spec("nope")


@pytest.mark.parametrize("spec", MINI_ZOO, ids=lambda s: s.name)
def test_spec_builds_small_runs_at_32_and_dissects(spec):
    torch.manual_seed(0)
    model = timm.create_model(spec.arch, pretrained=False, **spec.model_kwargs).eval()
    assert 0.2e6 <= count_params(model) <= 3e6
    with torch.inference_mode():
        assert model(torch.randn(2, *MINI_INPUT_SIZE)).shape == (2, spec.num_classes)
    d = dissect(model, MINI_INPUT_SIZE, name=spec.name, granularity="block", verify=True)
    assert len(d.blocks) >= 4
    # Model kwargs must survive YAML (plain lists and scalars), as the zoo file stores them.
    assert json.loads(json.dumps(spec.model_kwargs)) == spec.model_kwargs


@needs_fashion_mnist
@pytest.mark.parametrize("spec", MINI_ZOO, ids=lambda s: s.name)
def test_spec_head_matches_its_task(spec):
    assert load_split(spec.data, "test").num_classes == spec.num_classes


def test_default_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_mini_zoo_dir() == tmp_path / "surgery" / "mini-zoo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_mini_zoo_dir() == Path("~/.cache/surgery/mini-zoo").expanduser()


def test_unknown_name_is_a_user_error(tmp_path):
    with pytest.raises(SurgeryError, match="unknown mini-zoo model"):
        build_mini_zoo(tmp_path, quick=True, names=["nope"], quiet=True)


# ---------------------------------------------------------------------------------------- quick build


class Phases:
    """Records ``on_model`` calls as ``{name: [phase, ...]}``."""

    def __init__(self):
        self.seen: dict[str, list[str]] = {}

    def __call__(self, name: str, phase: str) -> None:
        self.seen.setdefault(name, []).append(phase)


@pytest.fixture(scope="module")
def quick_zoo(tmp_path_factory):
    if not _fashion_mnist_installed():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    folder = tmp_path_factory.mktemp("mini-zoo")
    phases = Phases()
    path = build_mini_zoo(folder, quick=True, quiet=True, names=QUICK_NAMES, on_model=phases)
    return path, phases


def _cards(folder: Path) -> dict:
    return json.loads((folder / CARDS_FILE).read_text())


def test_quick_build_writes_a_loadable_zoo(quick_zoo):
    path, phases = quick_zoo
    assert {n: p[0] for n, p in phases.seen.items()} == {n: "train" for n in QUICK_NAMES}
    assert all(p[-1] == "done" for p in phases.seen.values())
    entries = load_zoo_file(path)
    assert [e.name for e in entries] == QUICK_NAMES  # definition order
    cards = _cards(path.parent)["models"]
    text = path.read_text()
    for entry in entries:
        assert entry.weights == path.parent / f"{entry.name}.safetensors" and entry.weights.is_file()
        assert f"weights: {entry.name}.safetensors" in text  # relative: the folder can move
        assert entry.input_size == MINI_INPUT_SIZE and entry.arch == mini_spec(entry.name).arch
        card = cards[entry.name]
        assert card["quick"] and card["train_samples"] == 256 and card["epochs"] == 1
        assert 0.0 <= card["test_top1"] <= 1.0 and card["params"] == count_params(build_model(entry))
        assert card["macs"] > 0 and card["train_seconds"] > 0
    readme = (path.parent / README_FILE).read_text()
    assert all(f"| {n} |" in readme for n in QUICK_NAMES) and "test top-1" in readme


def test_entries_rebuild_to_the_trained_models(quick_zoo):
    path, _ = quick_zoo
    cards = _cards(path.parent)["models"]
    for entry in load_zoo_file(path):
        model = build_model(entry)
        with torch.inference_mode():
            logits = model(probe_input())
        torch.testing.assert_close(logits, torch.tensor(cards[entry.name]["probe_logits"]), atol=1e-4, rtol=0)
        # Training used exactly the normalisation downstream users get from data_config.
        cfg = data_config(entry, model)
        assert list(cfg["mean"]) == pytest.approx(cards[entry.name]["mean"])
        assert list(cfg["std"]) == pytest.approx(cards[entry.name]["std"])
        assert tuple(cfg["input_size"]) == MINI_INPUT_SIZE


def test_second_call_reuses_the_cache(quick_zoo):
    path, _ = quick_zoo
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.parent.glob("*.safetensors")}
    (path.parent / README_FILE).unlink()  # a lost README or zoo file is rewritten, not retrained
    phases = Phases()
    assert build_mini_zoo(path.parent, quick=True, quiet=True, names=QUICK_NAMES, on_model=phases) == path
    assert phases.seen == {n: ["cached"] for n in QUICK_NAMES}
    assert {p.name: p.stat().st_mtime_ns for p in path.parent.glob("*.safetensors")} == mtimes
    assert (path.parent / README_FILE).is_file()
    assert sorted(_cards(path.parent)["build"]["cached"]) == sorted(QUICK_NAMES)


def test_changed_spec_or_damaged_weights_retrain_only_those_models(quick_zoo):
    path, _ = quick_zoo
    folder = path.parent
    # One run over a definition of the three models where the ConvNeXt's recipe changed (seed) and
    # the ResNet's weights were damaged (checksum mismatch): those two retrain, the ViT is reused.
    specs = [dataclasses.replace(s, seed=s.seed + 100) if s.name == "convnext-fm59" else s
             for s in MINI_ZOO if s.name in QUICK_NAMES]
    weights = folder / "resnet10t-fm04.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    phases = Phases()
    build_mini_zoo(folder, quick=True, quiet=True, specs=specs, on_model=phases)
    assert phases.seen["vit-fmall"] == ["cached"]
    assert phases.seen["convnext-fm59"][0] == phases.seen["resnet10t-fm04"][0] == "train"
    assert _cards(folder)["models"]["convnext-fm59"]["seed"] == mini_spec("convnext-fm59").seed + 100
    # A definition without the ViT gives a zoo file without it; its weights stay for later runs.
    build_mini_zoo(folder, quick=True, quiet=True, specs=specs[:2])
    assert [e.name for e in load_zoo_file(path)] == QUICK_NAMES[:2]
    assert (folder / "vit-fmall.safetensors").is_file()


def test_weights_do_not_depend_on_the_callers_thread_count(quick_zoo, tmp_path):
    # torch's thread count follows the machine's cores and changes oneDNN's summation order; the
    # build pins its own count, so a caller (or machine) with another count gets the same weights.
    path, _ = quick_zoo  # built by a caller with this module's 2 threads
    name = QUICK_NAMES[0]
    torch.set_num_threads(1)  # another caller (or machine) with 1
    try:
        build_mini_zoo(tmp_path, quick=True, quiet=True, names=[name])
    finally:
        torch.set_num_threads(2)
    mine, theirs = _cards(tmp_path)["models"][name], _cards(path.parent)["models"][name]
    assert mine["weights_sha256"] == theirs["weights_sha256"]
    assert mine["torch_threads"] == mine["numerics"]["threads"] == MINI_THREADS


def test_cards_record_what_decides_the_numbers(quick_zoo):
    path, _ = quick_zoo
    cards = _cards(path.parent)
    for card in cards["models"].values():
        assert set(card["numerics"]) == set(numerics())
        assert card["numerics"]["torch"] == torch.__version__
        assert card["numerics"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert cards["build"]["numerics"]["threads"] == cards["build"]["torch_threads"] == MINI_THREADS
    assert cards["build"]["numerics"]["cpu_capability"] in (path.parent / README_FILE).read_text()


@needs_fashion_mnist
def test_a_model_cached_with_another_thread_count_is_retrained(tmp_path):
    name = QUICK_NAMES[0]
    torch.set_num_threads(3)
    try:
        build_mini_zoo(tmp_path, quick=True, quiet=True, names=[name], threads=MINI_THREADS + 1)
        assert torch.get_num_threads() == 3  # the caller's count is given back
        assert _cards(tmp_path)["models"][name]["torch_threads"] == MINI_THREADS + 1
        phases = Phases()
        build_mini_zoo(tmp_path, quick=True, quiet=True, names=[name], on_model=phases)
        assert phases.seen[name][0] == "train"
        assert _cards(tmp_path)["models"][name]["torch_threads"] == MINI_THREADS
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(2)
