"""Image data sets by a spec string, deterministic stratified splits, and batched transforms.

A *data spec* names a source and, after a colon, optional options::

    fashion-mnist                       Debian's dataset-fashion-mnist IDX files (60k train, 10k test)
    digits                              scikit-learn's load_digits (1,797 8x8 images, 17 grey levels)
    cifar10 | cifar100                  torchvision's CIFAR (files under ``root``; download=True to fetch)
    /path/to/folder                     ImageFolder layout (one sub-folder per class); a folder holding
                                        ``train/`` and ``test/`` (or ``val/``) ImageFolders uses them
    idx:/path/dir | /path/dir           a folder of ``*-images-idx3-ubyte[.gz]`` + ``*-labels-idx1-ubyte[.gz]``
    idx:/path/prefix                    one pair ``prefix-images-idx3-ubyte[.gz]`` + ``prefix-labels-...``

    options:  classes=LIST      keep these classes, relabelled 0..C-1 in ascending original order;
                                LIST items are class names, ids or id ranges: 0-4 | 0,2,5 | Coat,Bag
              per_class=N       at most N images per class in each pool (fixed choice, seed-independent)
              train_per_class=N at most N images per class in the train split only (few-label
                                transfer; drawn with the split's seed; val and test untouched)

Options are separated by ``;`` or ``,`` (an item holding ``=`` starts a new option, any other item
continues the previous option's list), so ``fashion-mnist:classes=0,2,5,per_class=100`` and
``'fashion-mnist:classes=0,2,5;per_class=100'`` mean the same. Class names match before ids, so a
folder class named ``"3"`` is matched by name.

Splits (:func:`load_split`): the *test* split is held out once per source and never depends on the
seed or on the options: the official test set where there is one (Fashion-MNIST, CIFAR, IDX
``train``/``t10k`` pairs, ``train/``+``test/`` folders), else a stratified 20% drawn with a fixed
seed before any option is applied. ``train`` and ``val`` split the rest, stratified, with the
caller's seed.

Images are kept as uint8 ``(N, C, H, W)`` tensors (folders: file paths, decoded per item).
:func:`make_transform` converts whole batches at once (grey to 3 channels, ``F.interpolate`` resize,
normalisation) and :func:`make_loader` applies it in the loader's collate step, so memory does not
grow with the number of samples beyond the data set itself.

Provenance: the IDX layout is LeCun's MNIST file format (big-endian header: two zero bytes, a type
code, the number of dimensions, then one uint32 per dimension). Fashion-MNIST is by Xiao, Rasul &
Vollgraf (2017, MIT licence), packaged by Debian as ``dataset-fashion-mnist``; the digits are the UCI
"Optical Recognition of Handwritten Digits" test set shipped in scikit-learn. The code is ours.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from zoo.errors import DataError
from zoo.idx import idx_pairs, read_idx, read_idx_cached, write_idx
from zoo.transforms import BatchTransform, make_transform, transform_for_model

__all__ = [
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIRS", "TEST_FRACTION", "DataSpec", "ImageDataset",
    "BatchTransform", "parse_spec", "read_idx", "write_idx", "load_split", "load_splits",
    "make_transform", "transform_for_model", "make_loader",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Searched in order after $SURGERY_FASHION_MNIST; the first is where Debian's package puts the files.
FASHION_MNIST_DIRS = (
    "/usr/share/datasets/fashion-mnist",
    "/usr/local/share/datasets/fashion-mnist",
    "~/.local/share/datasets/fashion-mnist",
    "~/.cache/surgery/data/fashion-mnist",
    "~/.cache/surgery/data/FashionMNIST/raw",  # torchvision's layout under our default root
)
FASHION_MNIST_HINT = (
    "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    "or set SURGERY_FASHION_MNIST=DIR to a folder holding its four IDX files"
)
# Fraction held out as the test split where a source has no official test set, drawn with a fixed
# seed so the test set is the same whatever the training seed.
TEST_FRACTION = 0.2
_TEST_SPLIT_SEED = 20_231_109
_PER_CLASS_SEED = 7_919
_NAMED_SOURCES = ("fashion-mnist", "digits", "cifar10", "cifar100")
_OPTIONS = ("classes", "per_class", "train_per_class")
_SPLITS = ("train", "val", "test", "unlabeled")

# ---------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec.

    Attributes:
        kind: ``"fashion-mnist"``, ``"digits"``, ``"cifar10"``, ``"cifar100"``, ``"idx"`` or ``"folder"``.
        path: the folder or IDX prefix for ``"idx"``/``"folder"``, else ``None``.
        classes: class tokens (names, ids or ``a-b`` ranges) as written, or ``None`` for all classes.
        per_class: cap on images per class in each pool, or ``None``.
        train_per_class: cap on images per class in the train split only, or ``None``.
        text: the spec as given.
    """

    kind: str
    path: str | None = None
    classes: tuple[str, ...] | None = None
    per_class: int | None = None
    train_per_class: int | None = None
    text: str = ""


def _parse_options(options: str, spec: str) -> dict[str, list[str]]:
    parsed: dict[str, list[str]] = {}
    current: str | None = None
    for item in (part.strip() for part in re.split(r"[;,]", options)):
        if not item:
            continue
        if "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            if key not in _OPTIONS:
                raise DataError(f"bad data option {item!r} in {spec!r}: known options are classes=, per_class=, "
                                "train_per_class=")
            if key in parsed:
                raise DataError(f"data option {key!r} given twice in {spec!r}")
            current = key
            parsed[key] = [value] if value else []
        elif current is None:
            raise DataError(f"bad data option {item!r} in {spec!r}: expected classes=LIST or per_class=N")
        else:
            parsed[current].append(item)
    return parsed


def parse_spec(spec: str | os.PathLike) -> DataSpec:
    """Parse a data spec string (syntax in the module docstring).

    Args:
        spec: e.g. ``"digits:per_class=20"`` or ``"idx:/data/mnist/train"``.

    Returns:
        The parsed :class:`DataSpec`.

    Raises:
        DataError: on an empty spec or a malformed option (the message names it).
    """
    text = os.fspath(spec).strip()
    if not text:
        raise DataError("empty data spec: give a name (fashion-mnist, digits, cifar10), a folder or idx:PATH")
    head, _, tail = text.partition(":")
    if head.lower() in _NAMED_SOURCES:
        kind, path, options = head.lower(), None, tail
    else:
        kind = "idx" if head.lower() == "idx" else "folder"
        body = tail if kind == "idx" else text
        path, options = body, ""
        # Options never hold ':' and always hold '='; a path that exists as written wins.
        if not os.path.exists(body) and ":" in body:
            left, right = body.rsplit(":", 1)
            if "=" in right:
                path, options = left, right
        if not path:
            raise DataError(f"data spec {text!r} names no path")
    parsed = _parse_options(options, text)
    classes = None
    if "classes" in parsed:
        if not parsed["classes"]:
            raise DataError(f"data option classes= in {text!r} lists no class")
        classes = tuple(parsed["classes"])
    caps: dict[str, int | None] = {}
    for key in ("per_class", "train_per_class"):
        caps[key] = None
        if key in parsed:
            values = parsed[key]
            if len(values) != 1 or not values[0].isdigit() or int(values[0]) < 1:
                raise DataError(f"data option {key}={','.join(values)} in {text!r}: expected a positive integer")
            caps[key] = int(values[0])
    return DataSpec(kind=kind, path=path, classes=classes, text=text, **caps)


# ---------------------------------------------------------------------------------------- IDX pools


def _idx_pool(pair: tuple[Path, Path], name: str = "all") -> _Pool:
    """One IDX images + labels pair as a pool of uint8 ``(N, C, H, W)`` images and int64 labels."""
    images_file, labels_file = pair
    images = read_idx_cached(images_file)
    labels = read_idx_cached(labels_file)
    if images.ndim == 3:
        images = images[:, None]  # (N, H, W) grey -> (N, 1, H, W)
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{images_file}: expected (N, H, W) or (N, H, W, C) images, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{images_file}: expected uint8 pixels, got {images.dtype}")
    if labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu":
        raise DataError(f"{labels_file}: expected {len(images)} integer labels, got shape {labels.shape}")
    return _Pool(labels.astype(np.int64), images, name=name)


# ---------------------------------------------------------------------------------------- sources


@dataclass
class _Pool:
    """All samples of one pool (development or test) before any split: images or paths, labels."""

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[str] | None = None
    name: str = "all"


@dataclass
class _Source:
    dev: _Pool
    test: _Pool | None  # None: the test split is carved out of ``dev`` with a fixed seed
    classes: list[str]  # original class names, indexed by original label id
    meta: dict[str, Any] = field(default_factory=dict)


def _idx_source(location: Path, what: str, hint: str) -> _Source:
    if location.is_dir():
        pairs = idx_pairs(location)
        if not pairs:
            raise DataError(
                f"{what}: no *-images-idx3-ubyte[.gz] + *-labels-idx1-ubyte[.gz] pair in {location}; {hint}"
            )
        test_prefix = next((p for p in ("t10k", "test") if p in pairs), None)
        if "train" in pairs and test_prefix:
            dev, test = _idx_pool(pairs["train"], "train"), _idx_pool(pairs[test_prefix], "test")
        elif len(pairs) == 1:
            dev, test = _idx_pool(next(iter(pairs.values()))), None
        else:
            raise DataError(
                f"{what}: several IDX pairs in {location} ({', '.join(sorted(pairs))}) and no train + t10k/test; "
                f"name one as idx:{location}/PREFIX"
            )
    else:
        pairs = idx_pairs(location.parent) if location.parent.is_dir() else {}
        if location.name not in pairs:
            raise DataError(
                f"{what}: no {location}-images-idx3-ubyte[.gz] + {location}-labels-idx1-ubyte[.gz]; {hint}"
            )
        dev, test = _idx_pool(pairs[location.name]), None
    labels = np.concatenate([dev.labels] + ([test.labels] if test is not None else []))
    if labels.min() < 0:
        raise DataError(f"{what}: negative labels in {location}")
    classes = [str(i) for i in range(int(labels.max()) + 1)]
    return _Source(dev, test, classes, {"path": str(location)})


def _fashion_mnist_source() -> _Source:
    env = os.environ.get("SURGERY_FASHION_MNIST")
    if env:
        folder = Path(env).expanduser()
        if not folder.is_dir() or not {"train", "t10k"} <= set(idx_pairs(folder)):
            raise DataError(
                f"SURGERY_FASHION_MNIST={env} does not hold Fashion-MNIST's train-* and t10k-* IDX files; "
                f"{FASHION_MNIST_HINT}"
            )
        candidates = [folder]
    else:
        candidates = [Path(d).expanduser() for d in FASHION_MNIST_DIRS]
        data_root = os.environ.get("SURGERY_DATA")
        if data_root:
            candidates.insert(0, Path(data_root).expanduser() / "fashion-mnist")
    for folder in candidates:
        if folder.is_dir() and {"train", "t10k"} <= set(idx_pairs(folder)):
            source = _idx_source(folder, "fashion-mnist", FASHION_MNIST_HINT)
            source.classes = list(FASHION_MNIST_CLASSES)
            return source
    raise DataError(f"fashion-mnist not found: {FASHION_MNIST_HINT}")


def _digits_source() -> _Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 17 grey levels (0..16) stretched to 0..255 so every source is uint8 on the same scale.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return _Source(_Pool(digits.target.astype(np.int64), images), None, [str(c) for c in digits.target_names])


def _cifar_source(kind: str, root: Path, download: bool) -> _Source:
    from torchvision import datasets

    cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
    pools = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted."
            raise DataError(
                f"{kind} not found under {root}: pass download=True (needs internet) or put "
                f"{cls.base_folder} there ({exc})"
            ) from exc
        except OSError as exc:  # offline download, unwritable root
            raise DataError(f"{kind}: download to {root} failed ({exc}); copy {cls.base_folder} there") from exc
        pools.append(
            _Pool(np.asarray(ds.targets, np.int64), ds.data.transpose(0, 3, 1, 2), name="train" if train else "test")
        )
        classes = list(ds.classes)
    return _Source(pools[0], pools[1], classes, {"root": str(root)})


def _image_folder_pool(folder: Path, name: str) -> tuple[_Pool, list[str]]:
    from torchvision.datasets import ImageFolder

    try:
        found = ImageFolder(str(folder), loader=lambda p: p)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{folder} is not an image folder (one sub-folder per class): {exc}") from exc
    paths = [p for p, _ in found.samples]
    return _Pool(np.asarray(found.targets, np.int64), paths=paths, name=name), list(found.classes)


def _folder_source(folder: Path) -> _Source:
    test_dir = next((folder / d for d in ("test", "val") if (folder / d).is_dir()), None)
    if (folder / "train").is_dir() and test_dir is not None:
        dev, classes = _image_folder_pool(folder / "train", "train")
        test, test_classes = _image_folder_pool(test_dir, "test")
        if test_classes != classes:
            raise DataError(f"{folder}: train/ and {test_dir.name}/ have different class folders")
        return _Source(dev, test, classes, {"path": str(folder)})
    dev, classes = _image_folder_pool(folder, "all")
    return _Source(dev, None, classes, {"path": str(folder)})


def _load_source(spec: DataSpec, root: str | os.PathLike | None, download: bool) -> _Source:
    if spec.kind == "fashion-mnist":
        return _fashion_mnist_source()
    if spec.kind == "digits":
        return _digits_source()
    if spec.kind in ("cifar10", "cifar100"):
        data_root = Path(root or os.environ.get("SURGERY_DATA") or "~/.cache/surgery/data").expanduser()
        return _cifar_source(spec.kind, data_root, download)
    path = Path(spec.path).expanduser()
    if spec.kind == "idx":
        return _idx_source(path, spec.text, "check the path")
    if not path.exists():
        raise DataError(f"data path {path} not found: give an image folder, an IDX folder, or a name (digits, ...)")
    if path.is_dir() and idx_pairs(path) and not any(p.is_dir() for p in path.iterdir()):
        return _idx_source(path, spec.text, "check the path")
    if not path.is_dir():
        raise DataError(f"data path {path} is a file: give a folder, or idx:PREFIX for IDX files")
    return _folder_source(path)


# ---------------------------------------------------------------------------------------- splits


def _rank_within_class(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random rank 0..count-1 for every sample among the samples of its class (vectorised)."""
    perm = rng.permutation(len(labels))
    order = perm[np.argsort(labels[perm], kind="stable")]
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels)) - starts
    return rank


def _stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a stratified ``fraction`` of samples (at least one per class of 2+ samples)."""
    if fraction <= 0 or len(labels) == 0:
        return np.zeros(len(labels), bool)
    rank = _rank_within_class(labels, rng)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    # Round, but keep at least one sample on each side where a class has two or more.
    take = np.clip(np.rint(counts * fraction), 1, np.maximum(counts - 1, 0)).astype(np.int64)
    return rank < take[inverse]


def _resolve_classes(tokens: Sequence[str], names: list[str], spec: str) -> list[int]:
    by_name = {n: i for i, n in enumerate(names)}
    by_folded = {n.casefold(): i for i, n in enumerate(names)}
    ids: set[int] = set()
    for token in tokens:
        if token in by_name or token.casefold() in by_folded:
            ids.add(by_name.get(token, by_folded.get(token.casefold())))
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", token)
        if not match:
            raise DataError(f"unknown class {token!r} in {spec!r}: classes are {', '.join(names)}")
        lo, hi = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if lo > hi or hi >= len(names):
            raise DataError(f"class range {token!r} in {spec!r} is outside 0-{len(names) - 1}")
        ids.update(range(lo, hi + 1))
    return sorted(ids)


def _filter_pool(pool: _Pool, keep: np.ndarray, class_ids: list[int], num_classes: int,
                 per_class: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``pool`` kept by the ``keep`` mask, the class selection and the per-class cap,
    and their labels renumbered 0..C-1 in the order of ``class_ids``."""
    remap = np.full(max(num_classes, int(pool.labels.max(initial=-1)) + 1), -1, np.int64)
    remap[class_ids] = np.arange(len(class_ids))
    keep = keep & (remap[pool.labels] >= 0)
    if per_class is not None:
        # Fixed seed: the same images whatever the training seed; only kept samples count.
        idx = np.flatnonzero(keep)
        rank = _rank_within_class(pool.labels[idx], np.random.default_rng(_PER_CLASS_SEED))
        keep = np.zeros_like(keep)
        keep[idx[rank < per_class]] = True
    idx = np.flatnonzero(keep)
    return idx, remap[pool.labels[idx]]


def _dataset(source: _Source, pool: _Pool, idx: np.ndarray, labels: np.ndarray, class_ids: list[int],
             meta: dict[str, Any]) -> ImageDataset:
    return ImageDataset(
        labels=torch.from_numpy(labels),
        classes=[source.classes[c] for c in class_ids],
        class_ids=class_ids,
        images=torch.from_numpy(np.ascontiguousarray(pool.images[idx])) if pool.images is not None else None,
        paths=[pool.paths[i] for i in idx] if pool.paths is not None else None,
        sample_ids=torch.from_numpy(idx.astype(np.int64)),
        pool=pool.name,
        meta={**source.meta, **meta},
    )


def load_splits(
    spec: str | os.PathLike | DataSpec,
    seed: int = 0,
    val_fraction: float = 0.1,
    *,
    download: bool = False,
    root: str | os.PathLike | None = None,
    unlabeled: bool = False,
) -> dict[str, ImageDataset]:
    """Load the ``train``, ``val`` and ``test`` splits of a data spec at once (one read of the files).

    Args:
        spec: a data spec string (module docstring) or a parsed :class:`DataSpec`.
        seed: seed of the train/val split; the test split never depends on it.
        val_fraction: stratified fraction of the non-test samples that goes to ``val`` (``0 <= f < 1``).
        download: let torchvision download CIFAR when it is not under ``root``.
        root: where CIFAR lives (default ``$SURGERY_DATA`` or ``~/.cache/surgery/data``).
        unlabeled: also return ``"unlabeled"``: every training image before ``train_per_class``
            caps the train split (the train split itself without the option), for label-free fits
            such as stitches; its labels are carried but must not be used.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` (and ``"unlabeled"``); ``val`` is empty when
        ``val_fraction`` is 0.

    Raises:
        DataError: missing or unreadable source, bad option, bad fraction.
    """
    parsed = spec if isinstance(spec, DataSpec) else parse_spec(spec)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    source = _load_source(parsed, root, download)
    class_ids = (
        _resolve_classes(parsed.classes, source.classes, parsed.text)
        if parsed.classes is not None
        else list(range(len(source.classes)))
    )
    # The test split is fixed before any option applies, so options never move a sample into it.
    if source.test is not None:
        test_pool, test_keep = source.test, np.ones(len(source.test.labels), bool)
        dev_keep = np.ones(len(source.dev.labels), bool)
    else:
        test_pool = source.dev
        test_keep = _stratified_holdout(source.dev.labels, TEST_FRACTION, np.random.default_rng(_TEST_SPLIT_SEED))
        dev_keep = ~test_keep
    base = {"spec": parsed.text, "kind": parsed.kind, "seed": seed, "val_fraction": val_fraction}
    test_idx, test_labels = _filter_pool(test_pool, test_keep, class_ids, len(source.classes), parsed.per_class)
    dev_idx, dev_labels = _filter_pool(source.dev, dev_keep, class_ids, len(source.classes), parsed.per_class)
    if len(dev_idx) == 0:
        raise DataError(f"{parsed.text!r} selects no training samples")
    rng = np.random.default_rng(seed)
    is_val = _stratified_holdout(dev_labels, val_fraction, rng)
    train_idx, train_labels = dev_idx[~is_val], dev_labels[~is_val]
    pool_idx, pool_labels = train_idx, train_labels
    if parsed.train_per_class is not None:  # few labels: cap the train split only, after val is drawn
        keep = _rank_within_class(train_labels, rng) < parsed.train_per_class
        train_idx, train_labels = train_idx[keep], train_labels[keep]
    splits = {
        "train": _dataset(source, source.dev, train_idx, train_labels, class_ids, {**base, "split": "train"}),
        "val": _dataset(source, source.dev, dev_idx[is_val], dev_labels[is_val], class_ids, {**base, "split": "val"}),
        "test": _dataset(source, test_pool, test_idx, test_labels, class_ids, {**base, "split": "test"}),
    }
    if unlabeled:
        # every training image before the few-label cap; its labels must not be used (label-free fits)
        splits["unlabeled"] = _dataset(source, source.dev, pool_idx, pool_labels, class_ids,
                                       {**base, "split": "unlabeled"})
    return splits


def load_split(
    spec: str | os.PathLike | DataSpec,
    split: str = "train",
    seed: int = 0,
    val_fraction: float = 0.1,
    *,
    download: bool = False,
    root: str | os.PathLike | None = None,
) -> ImageDataset:
    """Load one split of a data spec; deterministic given ``seed``, stratified by class.

    Args:
        spec: a data spec string (module docstring) or a parsed :class:`DataSpec`.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"unlabeled"`` (see :func:`load_splits`).
        seed: seed of the train/val split; the test split never depends on it.
        val_fraction: stratified fraction of the non-test samples that goes to ``val``.
        download: let torchvision download CIFAR when it is not under ``root``.
        root: where CIFAR lives (default ``$SURGERY_DATA`` or ``~/.cache/surgery/data``).

    Returns:
        The split as an :class:`ImageDataset`.

    Raises:
        DataError: unknown split, missing source, bad option, or an empty ``val`` split.
    """
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}: use train, val, test or unlabeled")
    if split == "val" and val_fraction <= 0:
        raise DataError("the val split is empty with val_fraction=0")
    return load_splits(spec, seed, val_fraction, download=download, root=root, unlabeled=split == "unlabeled")[split]


# ---------------------------------------------------------------------------------------- datasets


class _Batch(tuple):
    """``(images, labels)`` already stacked by :meth:`ImageDataset.__getitems__`."""


class ImageDataset(Dataset):
    """Labelled images: uint8 ``(N, C, H, W)`` in memory, or image files decoded per item.

    Items are ``(uint8 (C, H, W) tensor, int label)``; the float conversion, resize and
    normalisation happen per batch in :func:`make_loader`.

    Attributes:
        labels: int64 ``(N,)`` labels in ``0..C-1``.
        classes: class names in label order.
        class_ids: the original class id of each label (before a ``classes=`` subset relabelled them).
        images: uint8 ``(N, C, H, W)`` tensor, or ``None`` for folders.
        paths: image file paths (folders), or ``None``.
        sample_ids: int64 ``(N,)`` index of each sample in its source pool.
        pool: the source pool the samples come from (``"train"``, ``"test"`` or ``"all"``);
            ``(pool, sample_id)`` identifies a sample across splits.
        meta: spec, kind, split, seed, val_fraction and the source's path or root.
    """

    def __init__(self, labels: torch.Tensor, classes: list[str], class_ids: list[int], *,
                 images: torch.Tensor | None = None, paths: list[str] | None = None,
                 sample_ids: torch.Tensor | None = None, pool: str = "all", meta: dict | None = None):
        if (images is None) == (paths is None):
            raise ValueError("ImageDataset needs exactly one of images or paths")
        self.labels = labels
        self.classes = classes
        self.class_ids = class_ids
        self.images = images
        self.paths = paths
        self.sample_ids = sample_ids if sample_ids is not None else torch.arange(len(labels))
        self.pool = pool
        self.meta = meta or {}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _load_file(self, i: int) -> torch.Tensor:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"))
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i] if self.images is not None else self._load_file(int(i))
        return image, int(self.labels[i])

    def __getitems__(self, indices: Sequence[int]) -> _Batch | list[tuple[torch.Tensor, int]]:
        # DataLoader calls this with a whole batch of indices: one gather instead of N item calls.
        if self.images is None:
            return [self[i] for i in indices]
        idx = torch.as_tensor(indices, dtype=torch.long)
        return _Batch((self.images[idx], self.labels[idx]))

    def gather(self, indices: Sequence[int] | torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """uint8 ``(len(indices), C, H, W)`` images at the given positions, for in-memory and folder data.

        Args:
            indices: positions in this data set.
            size: ``(H, W)`` to fit images to (shorter side resized, centre crop); required for
                folders whose images differ in size, ignored when every image already has it.
        """
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.images is not None and (size is None or tuple(self.images.shape[-2:]) == tuple(size)):
            return self.images[idx]
        images = [self[i][0] for i in idx.tolist()]
        if size is not None:
            images = [img if tuple(img.shape[-2:]) == tuple(size) else _fit_to(img, *size) for img in images]
        elif len({tuple(img.shape) for img in images}) > 1:
            raise DataError("images of different sizes: pass size=(H, W) to gather them into one tensor")
        return torch.stack(images) if images else torch.empty(0, dtype=torch.uint8)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageDataset:
        """A new data set of the given positions (same classes and metadata)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(
            self.labels[idx], self.classes, self.class_ids,
            images=self.images[idx] if self.images is not None else None,
            paths=[self.paths[i] for i in idx.tolist()] if self.paths is not None else None,
            sample_ids=self.sample_ids[idx], pool=self.pool, meta=dict(self.meta),
        )

    def __repr__(self) -> str:
        shape = tuple(self.images.shape[1:]) if self.images is not None else "files"
        return (f"ImageDataset({self.meta.get('spec', '?')!r}, split={self.meta.get('split', '?')}, "
                f"n={len(self)}, classes={self.num_classes}, image={shape})")


# ---------------------------------------------------------------------------------------- loaders

def _fit_to(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize the shorter side then centre-crop, keeping a photo's aspect ratio (uint8 in, uint8 out)."""
    h, w = image.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    x = F.interpolate(image.unsqueeze(0).float(), size=(new_h, new_w), mode="bilinear", align_corners=False,
                      antialias=scale < 1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return x[0, :, top : top + height, left : left + width].round_().clamp_(0, 255).to(torch.uint8)


class _Collate:
    """Stack a batch and apply the batched transform (module level so loader workers can pickle it)."""

    def __init__(self, transform: BatchTransform | None):
        self.transform = transform

    def __call__(self, batch):
        if isinstance(batch, _Batch):
            images, labels = batch
        else:
            items = list(batch)
            labels = torch.tensor([label for _, label in items], dtype=torch.long)
            shapes = {tuple(img.shape) for img, _ in items}
            if len(shapes) == 1:
                images = torch.stack([img for img, _ in items])
            elif self.transform is None:
                raise DataError("images of different sizes need a transform: pass make_transform(...)")
            else:
                _, height, width = self.transform.input_size
                images = torch.stack([_fit_to(img, height, width) for img, _ in items])
        if self.transform is None:
            return images.float().div_(255.0) if images.dtype == torch.uint8 else images, labels
        return self.transform(images), labels


def make_loader(dataset: ImageDataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                transform: BatchTransform | None = None, *, num_workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader yielding ``(float32 images, int64 labels)`` batches.

    In-memory data sets are gathered a batch at a time and transformed as one tensor; folders are
    decoded per image, fitted to the transform's size, then transformed as one batch.

    Args:
        dataset: an :class:`ImageDataset` (or any dataset of ``(uint8 CHW image, label)`` items).
        batch_size: samples per batch.
        shuffle: reshuffle every epoch, in an order fixed by ``seed``.
        seed: seed of the shuffle order.
        transform: a :func:`make_transform` result; ``None`` gives float images in ``[0, 1]`` at their
            stored size.
        num_workers: loader worker processes (0: load in the main process).
        drop_last: drop a last incomplete batch (useful for statistics that need full batches).

    Returns:
        The DataLoader.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=_Collate(transform), num_workers=num_workers, drop_last=drop_last)
