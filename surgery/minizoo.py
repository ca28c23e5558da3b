"""Build the pretrained mini-zoo: train :data:`zoo.mini.MINI_ZOO` on CPU in minutes and register it.

No model hub is reachable here, so the toolkit's own trained weights come from this module. Each
spec is trained with :func:`surgery.training.train` on its Fashion-MNIST source task, evaluated on the
task's held-out test split, and saved as safetensors next to a zoo YAML file whose entries rebuild
every model through :func:`zoo.entries.build_model` alone. The folder holds::

    mini-zoo.yaml          the zoo file (arch, model_kwargs, input_size, weights: NAME.safetensors)
    NAME.safetensors       weights, written atomically
    cards.json             model cards: task, recipe, params, MACs, normalisation, accuracy, timings,
                           the config hash and weight checksum used for caching
    README.md              the same cards as a table

Caching: a model is reused when its card's config hash (spec + recipe + normalisation + quick
mode) matches and its weights file still has the recorded SHA-256; otherwise it is retrained. A
missing zoo file or README is simply rewritten. Cards and the zoo file are rewritten after every
model, so an interrupted build keeps the models it finished.

Normalisation: every model is trained with exactly the mean/std that
:func:`zoo.entries.data_config` reports for its entry (timm's pretrained config of the arch, e.g.
ImageNet statistics for CNNs and 0.5 for ViTs) and :data:`zoo.mini.MINI_INTERPOLATION` resizing, so
anything that normalises through ``data_config`` feeds the models what they were trained on.

Provenance: the cache-by-config-hash pattern is the one our dissection library uses; the model card
fields follow timm's model cards (params, GMACs at the input size, top-1). Written for this project.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from surgery.count import count_macs, count_params
from surgery.errors import SurgeryError
from surgery.training.loop import TrainConfig, evaluate, train
from surgery.workspace import atomic_path
from zoo.data import ImageDataset, load_splits, make_loader, make_transform
from zoo.entries import ZooEntry, build_model, data_config, save_weights, save_zoo_file
from zoo.mini import MINI_INPUT_SIZE, MINI_INTERPOLATION, MINI_THREADS, MINI_ZOO, MiniSpec, spec_hash

__all__ = [
    "build_mini_zoo", "default_mini_zoo_dir", "probe_input", "numerics", "pinned_threads", "ZOO_FILE", "CARDS_FILE",
    "README_FILE", "CARDS_FORMAT", "QUICK",
]

ZOO_FILE = "mini-zoo.yaml"
CARDS_FILE = "cards.json"
README_FILE = "README.md"
CARDS_FORMAT = "surgery.minizoo/1"
#: Quick mode (tests, smoke runs): a few hundred images, one epoch, a small test subset.
QUICK = {"train_samples": 256, "val_samples": 64, "test_samples": 256, "epochs": 1}
# Validation only reports progress per epoch; a capped subset keeps it to a second or two.
_VAL_SAMPLES = 2_000
_EVAL_BATCH = 512
# The probe batch whose logits a card records: rebuilding from the zoo file must reproduce them.
_PROBE_SEED, _PROBE_BATCH = 1234, 4
_PROBE_ATOL = 1e-4

OnModel = Callable[[str, str], None]


def default_mini_zoo_dir() -> Path:
    """``$XDG_CACHE_HOME/surgery/mini-zoo``, or ``~/.cache/surgery/mini-zoo`` when the variable is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "surgery" / "mini-zoo"


def numerics() -> dict[str, Any]:
    """What decides this process's float results besides the code, the data and the seeds.

    Same values on two machines give bit-identical weights and accuracies; a different thread count
    or CPU kernel set gives different float summation orders, hence different (equally good) numbers.

    Returns:
        ``torch`` and ``timm`` versions, intra-op ``threads``, ``cpu_capability`` (the SIMD kernel set
        ATen dispatches to: ``AVX512``, ``AVX2``, ...), ``onednn_max_cpu_isa`` (the environment's cap on
        oneDNN's kernels, which run the convolutions; None means the best the CPU has), ``cpu`` (the
        processor's model name, since oneDNN also sizes its blocking to the caches) and ``device``.
    """
    return {
        "torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        "cpu": _cpu_model(), "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads, then give the caller's count back.

    torch defaults to one thread per core, and the thread count changes the order in which
    convolution gradients are summed: the same seed then gives different weights on a machine with
    more cores (measured: see :data:`zoo.mini.MINI_THREADS`).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def probe_input(batch: int = _PROBE_BATCH) -> torch.Tensor:
    """The fixed random batch (``(batch, 3, 32, 32)``, seed 1234) whose logits each card records."""
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    return torch.randn(batch, *MINI_INPUT_SIZE, generator=gen)


# ---------------------------------------------------------------------------- small helpers


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    # train() reseeds torch, numpy and random for its run; the caller's streams are put back after.
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    # Two builds into one folder would train the same models twice and race on cards.json.
    try:
        import fcntl
    except ImportError:  # Windows: atomic writes still keep every file whole
        yield
        return
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary file and a rename (``atomic_path``), so readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users


def _load_average() -> float | None:
    # The 1-minute load: a build on a busy machine takes longer than the cards' figures suggest.
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on Windows
        return None


def _read_cards(folder: Path) -> dict[str, Any]:
    path = folder / CARDS_FILE
    try:
        cards = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or unreadable: everything is rebuilt
    if not isinstance(cards, dict) or cards.get("format") != CARDS_FORMAT or not isinstance(cards.get("models"), dict):
        return {}
    return cards["models"]


def _subset(dataset: ImageDataset, n: int | None, seed: int) -> ImageDataset:
    """A seeded random subset of ``n`` samples (all of them when ``n`` is None or not smaller)."""
    if n is None or n >= len(dataset):
        return dataset
    gen = torch.Generator().manual_seed(seed)
    return dataset.subset(torch.randperm(len(dataset), generator=gen)[:n].sort().values)


def _entry(spec: MiniSpec, folder: Path) -> ZooEntry:
    return ZooEntry(name=spec.name, arch=spec.arch, weights=folder / f"{spec.name}.safetensors",
                    model_kwargs=dict(spec.model_kwargs), input_size=MINI_INPUT_SIZE)


def _plan(spec: MiniSpec, folder: Path, quick: bool) -> dict[str, Any]:
    """Entry, structure-only model, normalisation and config hash of a spec (no weights needed)."""
    entry = _entry(spec, folder)
    meta_model = build_model(entry, structure_only=True)
    cfg = data_config(entry, meta_model)
    if tuple(cfg["input_size"]) != MINI_INPUT_SIZE:
        raise SurgeryError(f"{spec.name}: data config input size {cfg['input_size']} is not {MINI_INPUT_SIZE}")
    mean, std = [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]
    norm = {"mean": mean, "std": std, "interpolation": MINI_INTERPOLATION}
    config_hash = spec_hash(spec, quick=QUICK if quick else None, normalisation=norm)
    return {"entry": entry, "meta_model": meta_model, "norm": norm, "config_hash": config_hash}


def _cache_hit(card: dict[str, Any] | None, plan: dict[str, Any], threads: int) -> bool:
    if not card or card.get("config_hash") != plan["config_hash"]:
        return False
    if card.get("torch_threads") != threads:  # other weights than this thread count gives (pinned_threads)
        return False
    weights: Path = plan["entry"].weights
    return weights.is_file() and card.get("weights_sha256") == _sha256(weights)


# ---------------------------------------------------------------------------- training one model


def _train_one(spec: MiniSpec, plan: dict[str, Any], quick: bool, quiet: bool, notify: Callable[[str], None]
               ) -> dict[str, Any]:
    """Train, evaluate, save and verify one model; returns its card."""
    entry: ZooEntry = plan["entry"]
    norm = plan["norm"]
    splits = load_splits(spec.data, seed=spec.seed)
    train_ds = splits["train"]
    if train_ds.num_classes != spec.num_classes:
        raise SurgeryError(f"{spec.name}: num_classes={spec.num_classes} but {spec.data!r} has "
                           f"{train_ds.num_classes} classes")
    n_train = QUICK["train_samples"] if quick else spec.train_samples
    epochs = QUICK["epochs"] if quick else spec.epochs
    train_ds = _subset(train_ds, n_train, spec.seed)
    val_ds = _subset(splits["val"], QUICK["val_samples"] if quick else _VAL_SAMPLES, spec.seed)
    test_ds = _subset(splits["test"], QUICK["test_samples"], 0) if quick else splits["test"]

    # Exactly the normalisation data_config() reports for the entry (module docstring).
    transform = make_transform(MINI_INPUT_SIZE, norm["mean"], norm["std"], norm["interpolation"])
    batch = spec.batch_size
    train_loader = make_loader(train_ds, batch, shuffle=True, seed=spec.seed, transform=transform,
                               drop_last=len(train_ds) > batch)  # a last batch of 1 would break BatchNorm
    val_loader = make_loader(val_ds, _EVAL_BATCH, transform=transform)
    test_loader = make_loader(test_ds, _EVAL_BATCH, transform=transform)
    config = TrainConfig(**spec.train_config(epochs=epochs, log_every=0 if quiet else 50))

    with _preserved_rng():
        torch.manual_seed(spec.seed)  # the initial weights depend on the spec's seed only
        model = timm.create_model(spec.arch, pretrained=False, **spec.model_kwargs)
        if spec.zero_head:  # see MiniSpec.zero_head
            for p in model.get_classifier().parameters():
                torch.nn.init.zeros_(p)
        notify("train")
        start, cpu_start = time.perf_counter(), time.process_time()
        result = train(model, train_loader, val_loader, config=config, quiet=quiet)
        # CPU seconds beside wall seconds: on a shared machine the wall time says more about the neighbours.
        train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    notify("evaluate")
    start = time.perf_counter()
    test = evaluate(model, test_loader)
    eval_seconds = time.perf_counter() - start

    notify("save")
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    probe = probe_input()
    with torch.inference_mode():
        logits = model(probe)
    save_weights(model, entry.weights)
    os.chmod(entry.weights, 0o644)  # written through mkstemp (0600); see _write_text
    _check_rebuild(entry, logits)

    last = result.history[-1]
    return {
        "name": spec.name, "family": spec.family, "arch": spec.arch, "model_kwargs": dict(spec.model_kwargs),
        "source_task": spec.data, "classes": list(train_ds.classes), "num_classes": train_ds.num_classes,
        "seed": spec.seed, "epochs": epochs, "train_samples": len(train_ds), "val_samples": len(val_ds),
        "test_samples": len(test_ds), "batch_size": batch, "lr": spec.lr, "weight_decay": spec.weight_decay,
        "input_size": list(MINI_INPUT_SIZE), **norm,
        "params": count_params(model),
        "macs": count_macs(plan["meta_model"], torch.empty(1, *MINI_INPUT_SIZE, device="meta")),
        "test_top1": test["top1"], "test_loss": test["loss"], "val_top1": last["val_acc"],
        "train_top1": last["train_acc"], "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds": round(train_cpu_seconds, 2),
        "eval_seconds": round(eval_seconds, 2), "train_images_per_s": round(last["images_per_s"], 1),
        "device": "cuda" if torch.cuda.is_available() else "cpu",  # where train() ran (device="auto")
        "torch_threads": torch.get_num_threads(), "numerics": numerics(), "quick": quick,
        "config_hash": plan["config_hash"], "weights": entry.weights.name, "weights_sha256": _sha256(entry.weights),
        "probe_logits": [[round(float(v), 6) for v in row] for row in logits.tolist()],
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _check_rebuild(entry: ZooEntry, logits: torch.Tensor) -> None:
    """The saved entry must rebuild, from its file alone, into the model just trained."""
    rebuilt = build_model(entry)
    with torch.inference_mode():
        again = rebuilt(probe_input())
    if not torch.allclose(again, logits, atol=_PROBE_ATOL, rtol=0):
        diff = (again - logits).abs().max().item()
        raise SurgeryError(f"{entry.name}: the model rebuilt from {entry.weights.name} differs from the trained "
                           f"one (max |diff| {diff:.2e})")


# ---------------------------------------------------------------------------- zoo file and cards


def _write_outputs(folder: Path, specs: Sequence[MiniSpec], plans: dict[str, dict[str, Any]],
                   cards: dict[str, dict[str, Any]], build: dict[str, Any]) -> Path:
    """Zoo file, cards.json and README.md for every spec whose weights are current, in spec order."""
    ready = [s for s in specs if s.name in cards]
    zoo_path = folder / ZOO_FILE
    save_zoo_file([plans[s.name]["entry"] for s in ready], zoo_path)
    os.chmod(zoo_path, 0o644)
    ordered = {s.name: cards[s.name] for s in ready}
    payload = {"format": CARDS_FORMAT, "zoo_file": ZOO_FILE, "models": ordered, "build": build}
    _write_text(folder / CARDS_FILE, json.dumps(payload, indent=2) + "\n")
    _write_text(folder / README_FILE, _readme(ordered, build))
    return zoo_path


def _readme(cards: dict[str, dict[str, Any]], build: dict[str, Any]) -> str:
    quick = any(c.get("quick") for c in cards.values())
    lines = [
        "# surgery mini-zoo" + (" (quick build: smoke-test weights, not for use)" if quick else ""),
        "",
        "Small timm models of different families, trained on CPU by `surgery zoo build-mini` "
        "(`surgery.minizoo.build_mini_zoo`) on Fashion-MNIST source tasks at 32x32. "
        f"Load them with `--zoo {ZOO_FILE}` or `zoo.entries.load_zoo_file`; every entry rebuilds from the "
        "zoo file alone (timm arch + model_kwargs + safetensors weights).",
        "",
        "| model | family | arch | params (M) | GMACs @32x32 | source task | epochs | train images "
        "| test top-1 | train s |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for c in cards.values():
        lines.append(
            f"| {c['name']} | {c['family']} | `{c['arch']}` | {c['params'] / 1e6:.2f} | {c['macs'] / 1e9:.4f} "
            f"| `{c['source_task']}` | {c['epochs']} | {c['train_samples']:,} | {100 * c['test_top1']:.1f}% "
            f"| {c['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "Test top-1 is on the source task's held-out test split (Fashion-MNIST's official test set, "
        "restricted to the task's classes; quick builds use a subset). GMACs count one image "
        "(1 FLOP = 1 multiply-accumulate, timm's convention).",
        "",
        "Inputs: 28x28 grey images repeated to 3 channels, resized to 32x32 "
        f"({MINI_INTERPOLATION}), scaled to [0, 1] and normalised with each model's own mean/std: "
        "the values `zoo.entries.data_config(entry, model)` reports (listed per model in `cards.json`).",
        "",
        "| model | mean | std | classes |",
        "|---|---|---|---|",
    ]
    for c in cards.values():
        mean = ", ".join(f"{v:.3f}" for v in c["mean"])
        std = ", ".join(f"{v:.3f}" for v in c["std"])
        lines.append(f"| {c['name']} | {mean} | {std} | {', '.join(c['classes'])} |")
    versions = next(iter(cards.values()))["versions"] if cards else {}
    lines += [
        "",
        f"Training time of the {len(cards)} models: {sum(c['train_seconds'] for c in cards.values()):.0f} s "
        f"wall, {sum(c.get('train_cpu_seconds', 0) for c in cards.values()):.0f} s CPU, plus "
        f"{sum(c['eval_seconds'] for c in cards.values()):.0f} s of test evaluation.",
        "",
        f"Last build: {build.get('finished_at', '?')}, {build.get('total_seconds', 0):.0f} s in all "
        f"({len(build.get('trained', []))} trained, {len(build.get('cached', []))} reused from cache) "
        f"with torch {versions.get('torch', '?')}, timm {versions.get('timm', '?')}, "
        f"{build.get('torch_threads', '?')} threads, {build.get('numerics', {}).get('cpu_capability', '?')} "
        f"kernels (1-minute load average {build.get('load_average_at_start')} "
        f"at the start, {build.get('load_average_at_end')} at the end: other work on the machine slows training).",
        "",
        "Reproducibility: a rebuild with the same `numerics` in `cards.json` (torch version, threads, CPU "
        "kernels and model) gives the same `weights_sha256`, bit for bit. Another CPU or thread count sums "
        "floats in another order and trains different, equally good weights: test top-1 then moves by "
        "tenths of a point, up to about one.",
        "",
        "Licence of the training data: Fashion-MNIST (Xiao, Rasul & Vollgraf 2017), MIT.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- public entry point


def build_mini_zoo(
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
    quick: bool = False,
    quiet: bool = False,
    on_model: OnModel | None = None,
    names: Sequence[str] | None = None,
    specs: Sequence[MiniSpec] | None = None,
    threads: int = MINI_THREADS,
) -> Path:
    """Train (or reuse) the mini-zoo and write its zoo file, weights, cards.json and README.md.

    Args:
        out: folder of the zoo; default :func:`default_mini_zoo_dir` (``mini-zoo-quick`` beside it
            with ``quick``, so smoke-test weights never shadow real ones).
        force: retrain the selected models even when their cached weights are current.
        quick: train each model on a few hundred images for one epoch and test on a subset (tests).
        quiet: print nothing (training progress included).
        on_model: called as ``on_model(name, phase)`` with phase ``"cached"`` (reused, nothing
            trained), ``"train"``, ``"evaluate"``, ``"save"`` or ``"done"``.
        names: build only these models (others already current in the folder stay in the zoo file).
        specs: the zoo definition; default :data:`zoo.mini.MINI_ZOO`.
        threads: intra-op threads for training, whatever the machine's core count (the count changes
            the weights; :data:`zoo.mini.MINI_THREADS`). Cached models trained with another count
            are retrained.

    Returns:
        Path of the zoo YAML file. It lists every spec whose weights in the folder match the
        current definition, in definition order.

    Raises:
        SurgeryError: an unknown name in ``names``, a spec whose head does not fit its task, or a
            saved model that does not rebuild to the trained one.
        DataError: Fashion-MNIST not installed.
    """
    if threads < 1:
        raise SurgeryError(f"threads must be at least 1, got {threads}")
    specs = list(MINI_ZOO if specs is None else specs)
    known = {s.name for s in specs}
    if len(known) != len(specs):
        raise SurgeryError("mini-zoo specs have duplicate names")
    selected = list(known) if names is None else list(names)
    unknown = [n for n in selected if n not in known]
    if unknown:
        raise SurgeryError(f"unknown mini-zoo model {unknown[0]!r}; known: {', '.join(s.name for s in specs)}")
    if out is not None:
        folder = Path(out).expanduser()
    else:
        folder = default_mini_zoo_dir()
        if quick:
            folder = folder.with_name(folder.name + "-quick")
    folder.mkdir(parents=True, exist_ok=True)
    notify_all = on_model or (lambda name, phase: None)
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))

    start = time.perf_counter()
    with _folder_lock(folder):
        old_cards = _read_cards(folder)
        # Only specs that are to be built or that may already be current need a plan (a meta build).
        plans = {s.name: _plan(s, folder, quick) for s in specs if s.name in selected or s.name in old_cards}
        # Cards of current models only: a changed spec's old card and weights no longer describe it.
        cards = {n: c for n, c in old_cards.items() if n in plans and _cache_hit(c, plans[n], threads)}
        with pinned_threads(threads):
            machine = numerics()
        build: dict[str, Any] = {"trained": [], "cached": [], "quick": quick, "torch_threads": threads,
                                 "numerics": machine, "load_average_at_start": _load_average()}
        todo = [s for s in specs if s.name in selected]
        for i, spec in enumerate(todo, 1):
            notify = (lambda phase, _n=spec.name: notify_all(_n, phase))
            if spec.name in cards and not force:
                build["cached"].append(spec.name)
                say(f"[{i}/{len(todo)}] {spec.name}: cached (test top-1 {100 * cards[spec.name]['test_top1']:.1f}%)")
                notify("cached")
                continue
            say(f"[{i}/{len(todo)}] {spec.name}: training {spec.arch} on {spec.data!r}")
            cards.pop(spec.name, None)
            with pinned_threads(threads):
                card = _train_one(spec, plans[spec.name], quick, quiet, notify)
            cards[spec.name] = card
            build["trained"].append(spec.name)
            say(f"[{i}/{len(todo)}] {spec.name}: test top-1 {100 * card['test_top1']:.1f}% "
                f"({card['train_seconds']:.0f} s training)")
            build["total_seconds"] = round(time.perf_counter() - start, 2)
            build["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            _write_outputs(folder, specs, plans, cards, build)  # keep finished models if interrupted
            notify("done")
        build["total_seconds"] = round(time.perf_counter() - start, 2)
        build["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        build["load_average_at_end"] = _load_average()
        zoo_path = _write_outputs(folder, specs, plans, cards, build)
    say(f"mini-zoo: {len(cards)} models in {zoo_path} ({build['total_seconds']:.0f} s)")
    return zoo_path
