"""Tests of zoo.data: spec parsing, sources (digits, IDX, image folders, Fashion-MNIST), splits,
batched transforms and loaders. Offline; Fashion-MNIST runs where Debian's package is installed."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIRS,
    ImageDataset,
    load_split,
    load_splits,
    make_loader,
    make_transform,
    parse_spec,
    read_idx,
    write_idx,
)
from zoo.errors import DataError


def ids(ds: ImageDataset) -> set[tuple[str, int]]:
    return {(ds.pool, i) for i in ds.sample_ids.tolist()}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file written by hand (independent of zoo.data.write_idx): uint8 or int32 payload."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_pair(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    suffix = ".gz" if gz else ""
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        data = idx_bytes(array)
        (folder / f"{prefix}-{kind}-ubyte{suffix}").write_bytes(gzip.compress(data) if gz else data)


def tiny_idx(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 6, 5), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 4


# ---------------------------------------------------------------------------------------- specs


def test_parse_spec_options_and_separators():
    a = parse_spec("fashion-mnist:classes=0,2,5;per_class=100")
    b = parse_spec("fashion-mnist:classes=0,2,5,per_class=100")
    assert a.kind == b.kind == "fashion-mnist"
    assert a.classes == b.classes == ("0", "2", "5") and a.per_class == b.per_class == 100
    assert parse_spec("digits:classes=0-4").classes == ("0-4",)
    assert parse_spec("digits").classes is None
    spec = parse_spec("idx:/data/mnist/train:per_class=3")
    assert (spec.kind, spec.path, spec.per_class) == ("idx", "/data/mnist/train", 3)
    assert parse_spec("/some/folder").kind == "folder"


@pytest.mark.parametrize(
    "spec, word",
    [
        ("digits:foo", "foo"),
        ("digits:colour=red", "colour=red"),
        ("digits:per_class=0", "per_class"),
        ("digits:per_class=ten", "per_class"),
        ("digits:classes=", "classes"),
        ("digits:per_class=3;per_class=4", "per_class"),
        ("digits:train_per_class=0", "train_per_class"),
        ("", "empty"),
    ],
)
def test_bad_spec_raises_data_error_naming_it(spec, word):
    with pytest.raises(DataError, match=word):
        parse_spec(spec)


@pytest.mark.parametrize("spec", ["digits:classes=11", "digits:classes=4-2", "digits:classes=cat"])
def test_bad_class_selection(spec):
    with pytest.raises(DataError, match="class"):
        load_split(spec)


def test_missing_sources_raise_one_line_data_errors(tmp_path):
    for spec in [str(tmp_path / "nowhere"), f"idx:{tmp_path}/nowhere", f"idx:{tmp_path}"]:
        with pytest.raises(DataError) as info:
            load_split(spec)
        assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="download=True"):
        load_split("cifar10", root=tmp_path)  # offline and absent: no download unless asked
    with pytest.raises(DataError, match="unknown split"):
        load_split("digits", "holdout")
    with pytest.raises(DataError, match="val_fraction"):
        load_split("digits", "val", val_fraction=0)


# ---------------------------------------------------------------------------------------- digits, splits


def test_digits_loads_and_splits_cover_everything_once():
    splits = load_splits("digits", seed=0, val_fraction=0.1)
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 8, 8)
    assert int(train.images.max()) == 255 and train.classes == [str(i) for i in range(10)]
    assert len(train) + len(val) + len(test) == 1797
    assert not ids(train) & ids(val) and not ids(train) & ids(test) and not ids(val) & ids(test)
    assert len(ids(train) | ids(val) | ids(test)) == 1797
    # Stratified: every class in every split, roughly in proportion (20% test, 10% of the rest val).
    for ds, share in ((test, 0.2), (val, 0.08)):
        counts = torch.bincount(ds.labels, minlength=10).numpy()
        full = torch.bincount(torch.cat([train.labels, val.labels, test.labels]), minlength=10).numpy()
        assert np.all(np.abs(counts - share * full) <= 1.5)
    image, label = train[0]
    assert image.shape == (1, 8, 8) and isinstance(label, int)


def test_splits_deterministic_by_seed_and_test_held_out():
    a = load_splits("digits", seed=3)
    b = load_splits("digits", seed=3)
    c = load_splits("digits", seed=4)
    assert torch.equal(a["train"].sample_ids, b["train"].sample_ids)
    assert torch.equal(a["val"].sample_ids, b["val"].sample_ids)
    assert not torch.equal(a["val"].sample_ids, c["val"].sample_ids)
    # The test split ignores the seed and the options.
    assert torch.equal(a["test"].sample_ids, c["test"].sample_ids)
    sub = load_split("digits:classes=1,2;per_class=30", "test", seed=9)
    assert ids(sub) <= ids(a["test"])
    dev = load_splits("digits:classes=1,2;per_class=30", seed=9)
    assert not (ids(dev["train"]) | ids(dev["val"])) & ids(a["test"])


def test_classes_and_per_class_relabel():
    splits = load_splits("digits:classes=3-5,per_class=20", seed=1)
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert train.classes == ["3", "4", "5"] and train.class_ids == [3, 4, 5]
    assert set(train.labels.tolist()) == {0, 1, 2}
    dev_counts = torch.bincount(torch.cat([train.labels, val.labels]), minlength=3)
    assert dev_counts.tolist() == [20, 20, 20]
    assert torch.bincount(test.labels).tolist() == [20, 20, 20]
    # Labels still point at the right images: relabelled class 0 is original digit 3.
    everything = load_splits("digits", seed=1)["train"]
    pos = {int(i): k for k, i in enumerate(everything.sample_ids)}
    shared = [(k, pos[int(i)]) for k, i in enumerate(train.sample_ids) if int(i) in pos]
    assert shared
    assert all(train.class_ids[int(train.labels[k])] == int(everything.labels[j]) for k, j in shared)
    # Same selection by names; the per-class choice does not depend on the seed.
    again = load_splits("digits:per_class=20;classes=3,4,5", seed=2)
    assert ids(again["train"]) | ids(again["val"]) == ids(train) | ids(val)


def test_train_per_class_caps_only_the_train_split():
    full = load_splits("digits", seed=3)
    few = load_splits("digits:train_per_class=5", seed=3)
    assert torch.bincount(few["train"].labels, minlength=10).tolist() == [5] * 10
    assert ids(few["train"]) <= ids(full["train"])  # drawn from the same train split
    # val and test are exactly the uncapped ones, so accuracies are comparable with the full-data run
    for split in ("val", "test"):
        assert torch.equal(few[split].sample_ids, full[split].sample_ids)
        assert torch.equal(few[split].labels, full[split].labels)
    # which labelled images a run gets follows its seed
    assert ids(load_splits("digits:train_per_class=5", seed=4)["train"]) != ids(few["train"])
    assert ids(load_splits("digits:train_per_class=5", seed=3)["train"]) == ids(few["train"])


# ---------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_round_trips_hand_written_file(tmp_path, gz):
    images, labels = tiny_idx(7, 0)
    big = np.arange(-3, 9, dtype=np.int32).reshape(3, 4)
    for name, array in (("a", images), ("b", labels), ("c", big)):
        data = idx_bytes(array)
        path = tmp_path / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
        back = read_idx(path)
        assert back.dtype == array.dtype and np.array_equal(back, array)
    write_idx(tmp_path / "d.gz", big.astype(np.float32))
    assert np.array_equal(read_idx(tmp_path / "d.gz"), big.astype(np.float32))


def test_idx_reader_rejects_corrupt_files(tmp_path):
    data = idx_bytes(tiny_idx(7, 0)[0])
    (tmp_path / "short").write_bytes(data[:-5])
    (tmp_path / "magic").write_bytes(b"\x01\x02" + data[2:])
    for name, word in (("short", "truncated"), ("magic", "not an IDX"), ("absent", "cannot read")):
        with pytest.raises(DataError, match=word):
            read_idx(tmp_path / name)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_prefix_and_folder_sources(tmp_path, gz):
    images, labels = tiny_idx(40, 1)
    write_pair(tmp_path, "mine", images, labels, gz)
    splits = load_splits(f"idx:{tmp_path}/mine", val_fraction=0.25)
    assert sum(len(s) for s in splits.values()) == 40
    assert splits["train"].images.shape[1:] == (1, 6, 5) and splits["train"].classes == ["0", "1", "2", "3"]
    train = splits["train"]
    assert torch.equal(train.images[:, 0], torch.from_numpy(images[train.sample_ids.numpy()]))
    assert len(load_split(str(tmp_path), "test")) == 8  # a folder with one pair: 20% held out

    official = tmp_path / "official"
    official.mkdir()
    write_pair(official, "train", images, labels, gz)
    write_pair(official, "t10k", *tiny_idx(12, 2), gz)
    test = load_split(f"idx:{official}", "test")
    assert len(test) == 12 and test.pool == "test"
    assert len(load_split(f"idx:{official}:classes=0-1", "test")) == 6


def test_fashion_mnist_env_var(tmp_path, monkeypatch):
    write_pair(tmp_path, "train", *tiny_idx(30, 3), gz=True)
    write_pair(tmp_path, "t10k", *tiny_idx(10, 4), gz=False)
    monkeypatch.setenv("SURGERY_FASHION_MNIST", str(tmp_path))
    test = load_split("fashion-mnist:classes=Coat,0", "test")
    assert test.classes == ["T-shirt/top", "Coat"] and test.class_ids == [0, 4]
    monkeypatch.setenv("SURGERY_FASHION_MNIST", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_split("fashion-mnist")


def _fashion_mnist_installed() -> bool:
    return any(
        (Path(d).expanduser() / "train-images-idx3-ubyte.gz").exists()
        or (Path(d).expanduser() / "train-images-idx3-ubyte").exists()
        for d in FASHION_MNIST_DIRS
    )


@pytest.mark.skipif(
    not _fashion_mnist_installed(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_from_debian_package(monkeypatch):
    monkeypatch.delenv("SURGERY_FASHION_MNIST", raising=False)
    monkeypatch.delenv("SURGERY_DATA", raising=False)
    splits = load_splits("fashion-mnist", seed=0, val_fraction=0.1)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [54_000, 6_000, 10_000]
    assert splits["test"].pool == "test" and splits["train"].pool == "train"
    assert splits["train"].images.shape[1:] == (1, 28, 28)
    assert splits["train"].classes == list(FASHION_MNIST_CLASSES)
    assert torch.bincount(splits["test"].labels).tolist() == [1000] * 10
    small = load_split("fashion-mnist:classes=0-4;per_class=50", "train", val_fraction=0.2)
    assert small.classes == list(FASHION_MNIST_CLASSES[:5]) and len(small) == 200


# ---------------------------------------------------------------------------------------- folders


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(6):
            size = (20 + 3 * i, 16 + 2 * c)  # mixed sizes and aspect ratios
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            mode = "L" if i == 0 else "RGB"  # a grey file too: it must come out RGB
            img = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode)
            img.save(tmp_path / name / f"{i}.png")
    return tmp_path


def test_image_folder_source_and_loader(image_folder):
    splits = load_splits(str(image_folder), seed=0, val_fraction=0.2)
    assert splits["train"].classes == ["cat", "dog"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    assert not ids(splits["train"]) & ids(splits["test"])
    image, _ = splits["train"][0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    transform = make_transform((3, 24, 24), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    batches = list(make_loader(splits["train"], 3, shuffle=True, seed=0, transform=transform))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 3, 24, 24)] * 2 + [(2, 3, 24, 24)]
    assert all(x.dtype == torch.float32 for x, _ in batches)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(splits["train"].labels.tolist())
    with pytest.raises(DataError, match="transform"):
        list(make_loader(splits["train"], 4, transform=None))
    assert len(load_split(f"{image_folder}:classes=dog", "train", val_fraction=0)) == 5
    assert splits["train"].gather([0, 3, 5], size=(10, 12)).shape == (3, 3, 10, 12)
    with pytest.raises(DataError, match="size"):
        splits["train"].gather(range(8))


def test_image_folder_with_train_and_test_subfolders(image_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("split_root")
    (root / "train").symlink_to(image_folder, target_is_directory=True)
    (root / "test").symlink_to(image_folder, target_is_directory=True)
    test = load_split(str(root), "test")
    assert len(test) == 12 and test.pool == "test"


# ---------------------------------------------------------------------------------------- transforms


def test_transform_expands_grey_resizes_and_normalises():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    transform = make_transform((3, 32, 32), mean, std)
    batch = torch.full((4, 1, 8, 8), 255, dtype=torch.uint8)
    out = transform(batch)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    expected = (1 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(out[:, :, 5, 7], expected.expand(4, 3), atol=1e-6)
    assert make_transform(16)(torch.zeros(2, 3, 40, 30, dtype=torch.uint8)).shape == (2, 3, 16, 16)
    assert make_transform((1, 10, 12), (0.5,), (0.5,))(torch.zeros(1, 3, 5, 5)).shape == (1, 1, 10, 12)
    assert transform(batch[0]).shape == (3, 32, 32)
    assert make_transform((3, 8, 8), None, None).mean.flatten().tolist() == pytest.approx(mean)


def test_transform_for_timm_model_config():
    import timm

    from zoo.data import transform_for_model

    model = timm.create_model("test_resnet.r160_in1k", pretrained=False)
    transform = transform_for_model(model)
    config = timm.data.resolve_data_config({}, model=model)
    assert transform.input_size == tuple(config["input_size"])
    assert transform(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape == (2, *config["input_size"])


def test_loader_batches_whole_tensor_data_deterministically():
    ds = load_split("digits:per_class=10", "train", val_fraction=0)
    transform = make_transform((3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    first = [y for _, y in make_loader(ds, 32, shuffle=True, seed=5, transform=transform)]
    second = [y for _, y in make_loader(ds, 32, shuffle=True, seed=5, transform=transform)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    x, y = next(iter(make_loader(ds, 32, transform=transform)))
    assert x.shape == (32, 3, 16, 16) and torch.equal(y, ds.labels[:32])
    raw, _ = next(iter(make_loader(ds, 8)))
    assert raw.dtype == torch.float32 and raw.shape == (8, 1, 8, 8) and float(raw.max()) <= 1.0
    assert len(make_loader(ds, 32, drop_last=True)) == len(ds) // 32
    assert torch.equal(ds.gather([4, 1]), ds.images[[4, 1]])
