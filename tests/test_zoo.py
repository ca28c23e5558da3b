"""Tests for zoo entries: resolving, zoo files, checkpoints, random init, meta builds, offline errors.

All offline: models are timm's tiny ``test_*`` architectures with random weights; nothing is
downloaded.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from zoo.entries import (
    DEFAULT_TIMM_ZOO,
    ZooEntry,
    build_model,
    data_config,
    load_weights,
    load_zoo_file,
    resolve_zoo,
    save_weights,
    save_zoo_file,
)
from zoo.errors import ZooError

ROOT = Path(__file__).resolve().parents[1]


class NotATensor:
    """A pickled instance of this must be refused by weights_only loading."""

    def __init__(self) -> None:
        self.payload = "code could run here"


@pytest.fixture(scope="module")
def tiny_resnet() -> nn.Module:
    return build_model(ZooEntry(name="test_resnet", random_init=True))


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# --- resolving -----------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", DEFAULT_TIMM_ZOO, ids=lambda e: e.name)
def test_default_zoo_names_exist_in_timm(entry: ZooEntry) -> None:
    assert timm.is_model(entry.arch)
    assert timm.list_pretrained(f"{entry.arch}.*"), "default entries must have pretrained weights"
    model = build_model(entry, structure_only=True)  # every default entry builds (on meta)
    assert all(p.is_meta for p in model.parameters())


def test_resolve_default_zoo() -> None:
    entries = resolve_zoo("timm")
    assert [e.name for e in entries] == [e.name for e in DEFAULT_TIMM_ZOO]
    assert len({e.name for e in entries}) == len(entries) == 14


def test_wildcards_select_default_zoo_first() -> None:
    names = [e.name for e in resolve_zoo("timm", "resnet*, vit_small*")]
    assert names == ["resnet18", "resnet50", "resnet101", "vit_small_patch16_224"]
    # Duplicates across patterns are dropped, order follows the patterns.
    assert [e.name for e in resolve_zoo("timm", "vit_tiny*,vit_t*")] == ["vit_tiny_patch16_224"]


def test_wildcards_fall_back_to_timm_registry() -> None:
    assert [e.name for e in resolve_zoo("timm", "test_vit*")] == timm.list_models("test_vit*")
    assert [e.name for e in resolve_zoo("timm", "resnet34")] == ["resnet34"]
    (tagged,) = resolve_zoo("timm", "resnet50.a1_in1k")
    assert (tagged.arch, tagged.pretrained_tag, tagged.timm_name) == ("resnet50", "a1_in1k", "resnet50.a1_in1k")


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ZooError, match="resnet50") as info:
        resolve_zoo("timm", "resnet5O")
    assert "did you mean" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ZooError, match="unknown timm architecture"):
        build_model(ZooEntry(name="convnxt_tiny", random_init=True))
    with pytest.raises(ZooError, match="unknown zoo"):
        resolve_zoo("timmm")


def test_weights_override_needs_single_model(tmp_path: Path) -> None:
    with pytest.raises(ZooError, match="single model"):
        resolve_zoo("timm", "resnet*", weights=tmp_path / "w.safetensors")
    (entry,) = resolve_zoo("timm", "resnet18", weights=tmp_path / "w.safetensors")
    assert entry.weights == tmp_path / "w.safetensors" and not entry.random_init
    assert all(e.random_init and e.weights is None for e in resolve_zoo("timm", "vit*", random_init=True))


# --- entries and zoo files -------------------------------------------------------------------------


def test_entry_validation_names_the_field() -> None:
    assert ZooEntry(name="r").arch == "r"
    with pytest.raises(ValueError, match="input_size"):
        ZooEntry(name="r", input_size=(3, 224))
    with pytest.raises(ValueError, match="wieghts"):
        ZooEntry(name="r", wieghts="x.pth")
    with pytest.raises(ValueError, match="mutually exclusive"):
        ZooEntry(name="r", weights="x.pth", random_init=True)
    with pytest.raises(ValueError, match="pretrained"):
        ZooEntry(name="r", model_kwargs={"pretrained": True})


def test_zoo_file_round_trip(tmp_path: Path) -> None:
    entries = [
        ZooEntry(name="small", arch="test_resnet", random_init=True, model_kwargs={"num_classes": 10}),
        ZooEntry(name="local", arch="test_vit", weights=tmp_path / "ckpt" / "vit.safetensors", input_size=(3, 96, 96)),
        ZooEntry(name="resnet50", pretrained_tag="a1_in1k"),
        ZooEntry(name="elsewhere", arch="test_convnext", weights=Path("/elsewhere/w.pth").resolve()),
    ]
    path = tmp_path / "zoo.yaml"
    save_zoo_file(entries, path)
    assert load_zoo_file(path) == entries
    assert "ckpt/vit.safetensors" in path.read_text() and "arch: resnet50" not in path.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing
    # A plain YAML list works too, and --models selects from the file only.
    path.write_text("- name: a\n  arch: test_resnet\n- name: b\n  arch: test_vit\n")
    assert [e.name for e in resolve_zoo(str(path), "b*")] == ["b"]
    with pytest.raises(ZooError, match="matches no model"):
        resolve_zoo(str(path), "resnet50")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("- name: a\n- name: b\n  input_size: [3, 224]\n", ["entry 1", "'b'", "'input_size'"]),
        ("models:\n  - name: a\n    wieghts: x.pth\n", ["entry 0", "'wieghts'", "unknown field"]),
        ("- name: a\n- name: a\n", ["entry 1", "'name'", "duplicate"]),
        ("- name: a\n  random_init: true\n  weights: x.pth\n", ["entry 0", "mutually exclusive"]),
        ("name: a\n", ["YAML list"]),
    ],
)
def test_bad_zoo_file_names_file_entry_field(tmp_path: Path, body: str, expected: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ZooError) as info:
        load_zoo_file(path)
    message = str(info.value)
    assert "\n" not in message and "bad.yaml" in message
    for part in expected:
        assert part in message


# --- checkpoints -------------------------------------------------------------------------------------


def test_safetensors_checkpoint_gives_identical_outputs(tmp_path, tiny_resnet, probe) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(tiny_resnet, path)
    model = build_model(ZooEntry(name="mine", arch="test_resnet", weights=path))
    assert not model.training
    torch.testing.assert_close(model(probe), tiny_resnet(probe), rtol=0, atol=0)


def test_pth_checkpoint_with_wrappers_gives_identical_outputs(tmp_path, tiny_resnet, probe) -> None:
    # A DDP-style training checkpoint: wrapped under 'state_dict', 'module.' prefixes, extra metadata.
    state = {f"module.{k}": v for k, v in tiny_resnet.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "epoch": 3, "arch": "test_resnet"}, path)
    model = build_model(ZooEntry(name="mine", arch="test_resnet", weights=path))
    torch.testing.assert_close(model(probe), tiny_resnet(probe), rtol=0, atol=0)
    plain = tmp_path / "plain.pt"
    torch.save(tiny_resnet.state_dict(), plain)
    torch.testing.assert_close(
        load_weights(build_model(ZooEntry(name="x", arch="test_resnet", random_init=True)), plain)(probe),
        tiny_resnet(probe),
        rtol=0,
        atol=0,
    )


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": NotATensor()}, path)
    with pytest.raises(ZooError, match="weights_only") as info:
        build_model(ZooEntry(name="mine", arch="test_resnet", weights=path))
    assert "\n" not in str(info.value)


def test_mismatched_checkpoint_lists_keys_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    save_weights(build_model(ZooEntry(name="test_vit", random_init=True)), path)
    with pytest.raises(ZooError, match="missing .*unexpected") as info:
        build_model(ZooEntry(name="mine", arch="test_resnet", weights=path))
    assert "\n" not in str(info.value) and "in all" in str(info.value)
    with pytest.raises(ZooError, match="not found"):
        build_model(ZooEntry(name="mine", arch="test_resnet", weights=tmp_path / "missing.safetensors"))


def test_tied_weights_round_trip(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied: one tensor, two names
    path = tmp_path / "tied.safetensors"
    save_weights(model, path)
    other = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    other[1].weight = other[0].weight
    load_weights(other, path)
    torch.testing.assert_close(other[1].weight, model[0].weight)


# --- random init, meta, custom modules, data config -----------------------------------------------------


def test_random_init_is_deterministic_and_keeps_global_rng() -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    entry = ZooEntry(name="test_vit", random_init=True)
    first, second = build_model(entry).state_dict(), build_model(entry).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    renamed = build_model(ZooEntry(name="other", arch="test_vit", random_init=True)).state_dict()
    assert not torch.equal(renamed["blocks.0.attn.qkv.weight"], first["blocks.0.attn.qkv.weight"])


def test_structure_only_is_meta_and_instant() -> None:
    start = time.perf_counter()
    model = build_model(ZooEntry(name="vit_large_patch16_224"), structure_only=True)
    assert time.perf_counter() - start < 10
    assert sum(p.numel() for p in model.parameters()) > 300_000_000
    assert all(t.is_meta for t in model.state_dict().values()) and not model.training
    with pytest.raises(ZooError, match="meta"):
        save_weights(model, "/nonexistent/never-written.safetensors")


def test_from_module_entry(tmp_path: Path) -> None:
    module = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    entry = ZooEntry.from_module("custom", module)
    assert entry.to_dict()["module_class"] == "torch.nn.modules.container.Sequential"
    assert build_model(entry) is module and not module.training
    meta = build_model(entry, structure_only=True)
    assert meta[0].weight.is_meta and not module[0].weight.is_meta
    with pytest.raises(ZooError, match="save_weights"):
        save_zoo_file([entry], tmp_path / "zoo.yaml")
    save_weights(module, tmp_path / "custom.safetensors")
    saved = ZooEntry.from_module("custom", module, weights=tmp_path / "custom.safetensors")
    save_zoo_file([saved], tmp_path / "zoo.yaml")
    (reloaded,) = load_zoo_file(tmp_path / "zoo.yaml")
    with pytest.raises(ZooError, match="from_module"):
        build_model(reloaded)


def test_data_config_applies_overrides() -> None:
    entry = ZooEntry(name="test_resnet", random_init=True)
    model = build_model(entry, structure_only=True)
    cfg = data_config(entry, model)
    assert cfg["input_size"] == (3, 160, 160) and len(cfg["mean"]) == 3 and "crop_pct" in cfg
    assert data_config(entry.model_copy(update={"input_size": (3, 96, 96)}), model)["input_size"] == (3, 96, 96)
    gray = ZooEntry(name="test_vit", random_init=True, model_kwargs={"in_chans": 1, "img_size": 64})
    cfg = data_config(gray, build_model(gray, structure_only=True))
    assert cfg["input_size"] == (1, 64, 64) and len(cfg["mean"]) == len(cfg["std"]) == 1


# --- offline behaviour and layering -------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline_child(tmp_path_factory) -> subprocess.CompletedProcess[str]:
    """One fresh interpreter, offline with an empty Hugging Face cache, that imports zoo and asks
    for pretrained weights; it also reports whether :mod:`surgery` got imported along the way.

    huggingface_hub reads HF_HUB_OFFLINE/HF_HOME at import time, so only a new interpreter sees the
    patched environment. One child serves both tests because importing torch costs seconds.
    """
    tmp = tmp_path_factory.mktemp("offline")
    code = """
        import sys
        import zoo, zoo.entries, zoo.errors
        from zoo.entries import ZooEntry, build_model
        from zoo.errors import ZooError
        print("SURGERY_MODULES", [m for m in sys.modules if m == "surgery" or m.startswith("surgery.")])
        try:
            build_model(ZooEntry(name="resnet18"))
        except ZooError as err:
            print("ZOOERROR", err)
        """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(tmp / "hf"))
        mp.setenv("TORCH_HOME", str(tmp / "torch"))
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120
        )


def test_offline_pretrained_request_is_one_line_error(offline_child) -> None:
    lines = [ln for ln in offline_child.stdout.splitlines() if ln.startswith("ZOOERROR")]
    assert len(lines) == 1, offline_child.stdout + offline_child.stderr
    assert "resnet18: pretrained weights not in the local Hugging Face cache" in lines[0]
    assert "--weights FILE" in lines[0] and "--random-init" in lines[0]


def test_zoo_does_not_import_surgery(offline_child) -> None:
    assert "SURGERY_MODULES []" in offline_child.stdout, offline_child.stdout + offline_child.stderr
