"""Loaders read the official on-disk formats exactly and fail with one clear line; all offline, on real images."""

import inspect
import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf
from PIL import Image
from scipy.io import savemat

from cifar_archive import (
    CIFAR10_CLASSES,
    decode,
    dump,
    pixels_and_labels,
    read_cifar_jpegs,
    write_cifar10,
    write_image_folder,
)
from ssat.data.datasets import (
    ImageDataset,
    load_cifar10,
    load_cifar100,
    load_digits,
    load_image_folder,
    load_svhn,
)
from ssat.errors import ConfigError, DataError

CONF = Path(__file__).resolve().parents[1] / "ssat" / "conf" / "dataset"
FOLDER_CLASSES = ["truck", "airplane", "cat"]  # deliberately unsorted


@pytest.fixture(scope="module")
def jpegs():
    """Five train and two test JPEGs of every CIFAR-10 class, read from the archive in one pass."""
    return read_cifar_jpegs(per_class_train=5, per_class_test=2)


# ---------------------------------------------------------------- digits


def test_digits_shapes_values_and_stratified_split():
    ds = load_digits(test_fraction=0.2, split_seed=0)
    assert ds.train_images.shape == (1437, 1, 8, 8) and ds.test_images.shape == (360, 1, 8, 8)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int64
    assert ds.train_images.min() == 0 and ds.train_images.max() == 255
    assert ds.classes == [str(d) for d in range(10)]
    per_class = np.bincount(np.concatenate([ds.train_labels, ds.test_labels]), minlength=10)
    assert np.all(np.abs(np.bincount(ds.test_labels, minlength=10) - 0.2 * per_class) <= 1)


def test_digits_split_depends_only_on_seed():
    a, b, c = load_digits(split_seed=3), load_digits(split_seed=3), load_digits(split_seed=4)
    assert np.array_equal(a.test_images, b.test_images) and np.array_equal(a.test_labels, b.test_labels)
    assert not np.array_equal(a.test_images, c.test_images)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.001, -0.5])
def test_digits_bad_test_fraction(fraction):
    with pytest.raises(ConfigError, match=f"test_fraction={fraction}"):
        load_digits(test_fraction=fraction)


def test_image_dataset_rejects_inconsistent_arrays():
    images, labels = np.zeros((2, 1, 8, 8), np.uint8), np.array([0, 1])
    with pytest.raises(DataError, match="train labels"):
        ImageDataset(images, labels.astype(np.int32), images, labels, ["a", "b"])
    with pytest.raises(DataError, match="expected 0..0"):
        ImageDataset(images, labels, images, labels, ["a"])


# ---------------------------------------------------------------- CIFAR


def test_cifar10_reads_official_pickles_exactly(tmp_path, jpegs):
    train_x, train_y, test_x, test_y = write_cifar10(tmp_path, jpegs)
    ds = load_cifar10(root=tmp_path)
    assert ds.train_images.shape == (50, 3, 32, 32) and ds.train_images.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_images, train_x)
    np.testing.assert_array_equal(ds.train_labels, train_y)
    np.testing.assert_array_equal(ds.test_images, test_x)
    np.testing.assert_array_equal(ds.test_labels, test_y)
    assert ds.classes == CIFAR10_CLASSES


def test_cifar100_uses_fine_labels(tmp_path, jpegs):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = CIFAR10_CLASSES + [f"filler_{i}" for i in range(90)]
    splits = {split: pixels_and_labels(jpegs, split) for split in ("train", "test")}
    for split, (x, y) in splits.items():
        fine = (y * 7 + 3).tolist()  # spread over the 100 classes
        dump(folder / split, {b"data": x.reshape(len(x), -1), b"fine_labels": fine, b"coarse_labels": [0] * len(x)})
    dump(folder / "meta", {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"c"] * 20})
    ds = load_cifar100(root=tmp_path)
    np.testing.assert_array_equal(ds.train_images, splits["train"][0])
    np.testing.assert_array_equal(ds.test_labels, splits["test"][1] * 7 + 3)
    assert ds.classes == names


def test_cifar_missing_root_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="dataset.download=true") as err:
        load_cifar10(root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in str(err.value) and "\n" not in str(err.value)


def test_cifar_download_failure_is_a_data_error(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(DataError, match="downloading cifar100 .* failed") as err:
        load_cifar100(root=tmp_path, download=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "missing", "not_a_dict", "wrong_shape"])
def test_cifar_damaged_file_is_named(tmp_path, jpegs, damage):
    write_cifar10(tmp_path, jpegs)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    if damage == "garbage":
        path.write_bytes(b"\x80\x02this is not a pickle")
    elif damage == "missing":
        path.unlink()
    elif damage == "not_a_dict":
        dump(path, [1, 2, 3])
    else:
        dump(path, {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4})
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(root=tmp_path)


# ---------------------------------------------------------------- SVHN


def write_svhn(root: Path, name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An official-layout SVHN .mat file: X is (32, 32, 3, N), y is (N, 1) with 10 standing for digit 0."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = np.arange(n) % 10 + 1
    savemat(root / name, {"X": x, "y": y.reshape(-1, 1).astype(np.uint8)})
    return x.transpose(3, 2, 0, 1), (y % 10).astype(np.int64)


def test_svhn_reads_mat_files_and_maps_label_10_to_0(tmp_path):
    train_x, train_y = write_svhn(tmp_path, "train_32x32.mat", 23, seed=0)
    test_x, test_y = write_svhn(tmp_path, "test_32x32.mat", 12, seed=1)
    ds = load_svhn(root=tmp_path)
    np.testing.assert_array_equal(ds.train_images, train_x)
    np.testing.assert_array_equal(ds.train_labels, train_y)
    np.testing.assert_array_equal(ds.test_images, test_x)
    np.testing.assert_array_equal(ds.test_labels, test_y)
    assert ds.train_labels[9] == 0 and ds.classes == [str(d) for d in range(10)]
    # A pixel spot check against the .mat layout: X[row, col, channel, index].
    assert ds.train_images[5, 2, 7, 11] == train_x[5, 2, 7, 11]


def test_svhn_extra_goes_into_train(tmp_path):
    train_x, _ = write_svhn(tmp_path, "train_32x32.mat", 10, seed=0)
    write_svhn(tmp_path, "test_32x32.mat", 10, seed=1)
    with pytest.raises(DataError, match="extra_32x32.mat"):
        load_svhn(root=tmp_path, include_extra=True)
    extra_x, _ = write_svhn(tmp_path, "extra_32x32.mat", 7, seed=2)
    ds = load_svhn(root=tmp_path, include_extra=True)
    np.testing.assert_array_equal(ds.train_images, np.concatenate([train_x, extra_x]))


def test_svhn_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="train_32x32.mat is missing.*dataset.download=true"):
        load_svhn(root=tmp_path)
    write_svhn(tmp_path, "train_32x32.mat", 10, seed=0)
    (tmp_path / "test_32x32.mat").write_bytes(b"not a matlab file at all")
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_svhn(root=tmp_path)


# ---------------------------------------------------------------- image folders


@pytest.fixture
def folder(tmp_path, jpegs):
    """Real CIFAR-10 JPEGs as root/{train,test}/<class>/NNNN.jpg for three classes."""
    return write_image_folder(tmp_path / "images", {k: v for k, v in jpegs.items() if k[1] in FOLDER_CLASSES})


def test_image_folder_decodes_real_jpegs(folder, jpegs):
    ds = load_image_folder(root=folder)
    assert ds.classes == sorted(FOLDER_CLASSES)
    assert ds.train_images.shape == (15, 3, 32, 32) and ds.test_images.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(ds.train_labels, np.repeat([0, 1, 2], 5))
    np.testing.assert_array_equal(ds.test_labels, np.repeat([0, 1, 2], 2))
    # Files are read in sorted order: the first cat image is label 1's first train row.
    np.testing.assert_array_equal(ds.train_images[5], decode(jpegs["train", "cat"][0][1]))
    np.testing.assert_array_equal(ds.test_images[-1], decode(jpegs["test", "truck"][-1][1]))


def test_image_folder_channels_resize_and_extensions(folder, jpegs):
    (folder / "train" / "cat" / "notes.txt").write_text("not an image")
    (folder / "train" / "cat" / ".hidden.jpg").write_bytes(b"resource fork")
    Image.open(io.BytesIO(jpegs["train", "dog"][0][1])).save(folder / "train" / "cat" / "extra.PNG")
    grey = load_image_folder(root=folder, channels=1)
    assert grey.train_images.shape == (16, 1, 32, 32)
    np.testing.assert_array_equal(grey.train_images[0], decode(jpegs["train", "airplane"][0][1], "L"))
    small = load_image_folder(root=folder, image_size=16)
    assert small.train_images.shape == (16, 3, 16, 16) and small.test_images.shape == (6, 3, 16, 16)


def test_image_folder_cache_is_reused_and_keyed_on_the_tree(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_image_folder(root=folder, cache_dir=cache)
    entries = list((cache / "image_folder").iterdir())
    assert len(entries) == 1 and len(entries[0].name) == 64
    assert sorted(p.name for p in entries[0].iterdir()) == sorted(
        f"{name}.npy" for name in ("train_images", "train_labels", "test_images", "test_labels")
    )

    def no_decoding(*args, **kwargs):
        raise RuntimeError("decoded although the cache should have been used")

    monkeypatch.setattr(Image, "open", no_decoding)
    cached = load_image_folder(root=folder, cache_dir=cache)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(cached, name), getattr(first, name))
    assert cached.classes == first.classes

    touched = folder / "test" / "cat" / sorted(os.listdir(folder / "test" / "cat"))[0]
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(RuntimeError, match="decoded although"):
        load_image_folder(root=folder, cache_dir=cache)
    with pytest.raises(RuntimeError, match="decoded although"):
        load_image_folder(root=folder, image_size=16, cache_dir=cache)


def test_image_folder_damaged_cache_is_rebuilt(folder, tmp_path):
    cache = tmp_path / "cache"
    first = load_image_folder(root=folder, cache_dir=cache)
    (entry,) = (cache / "image_folder").iterdir()
    (entry / "train_images.npy").write_bytes(b"truncated")
    again = load_image_folder(root=folder, cache_dir=cache)
    np.testing.assert_array_equal(again.train_images, first.train_images)
    assert np.load(entry / "train_images.npy").shape == (15, 3, 32, 32)


def test_image_folder_unwritable_cache_is_a_data_error(folder, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(DataError, match="set cache_dir to a writable folder"):
        load_image_folder(root=folder, cache_dir=blocker)


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist.*dataset.root"):
        load_image_folder(root=tmp_path / "nowhere")


def test_image_folder_without_test_split(folder):
    for path in sorted((folder / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (folder / "test").rmdir()
    with pytest.raises(DataError, match="no test/ subfolder"):
        load_image_folder(root=folder)


def test_image_folder_empty_class_folder_is_named(folder):
    empty = folder / "train" / "zebra"
    empty.mkdir()
    with pytest.raises(DataError, match=f"no images found in {empty}"):
        load_image_folder(root=folder)


def test_image_folder_empty_train_folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders in"):
        load_image_folder(root=tmp_path)


def test_image_folder_test_classes_must_match(folder):
    (folder / "test" / "cat").rename(folder / "test" / "kitten")
    with pytest.raises(DataError, match=r"missing in test: \['cat'\].*not in train: \['kitten'\]"):
        load_image_folder(root=folder)


def test_image_folder_corrupt_image_is_named(folder):
    bad = folder / "train" / "cat" / "0002.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        load_image_folder(root=folder)


def test_image_folder_mixed_sizes_need_image_size(folder):
    Image.new("RGB", (20, 24), "red").save(folder / "test" / "cat" / "odd.png")
    with pytest.raises(DataError, match="is 20x24 .* set dataset.image_size"):
        load_image_folder(root=folder)
    assert load_image_folder(root=folder, image_size=32).test_images.shape == (7, 3, 32, 32)


@pytest.mark.parametrize("kwargs, words", [(dict(channels=2), "channels=2"), (dict(image_size=0), "image_size=0")])
def test_image_folder_bad_settings(folder, kwargs, words):
    with pytest.raises(ConfigError, match=words):
        load_image_folder(root=folder, **kwargs)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "image_folder"])
def test_dataset_config_layout_and_loader_arguments(name, tmp_path):
    text = (CONF / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    cfg = OmegaConf.merge(
        OmegaConf.load(CONF / f"{name}.yaml"), {"cache_dir": str(tmp_path), "dataset": {"root": str(tmp_path)}}
    )
    assert set(cfg) == {"dataset", "cache_dir"}
    expected = ["name", "loader", "channels", "image_size", "num_classes", "mean", "std", "augment"]
    assert [k for k in cfg.dataset if k not in ("root", "download")] == expected
    assert len(cfg.dataset.mean) == len(cfg.dataset.std) == cfg.dataset.channels
    loader = OmegaConf.to_container(cfg.dataset.loader, resolve=True)
    inspect.signature(get_method(loader.pop("_target_"))).bind(**loader)


def test_cifar10_config_instantiates_from_data_dir(tmp_path, jpegs, monkeypatch):
    write_cifar10(tmp_path, jpegs)
    monkeypatch.setenv("SSAT_DATA_DIR", str(tmp_path))
    ds = instantiate(OmegaConf.load(CONF / "cifar10.yaml").dataset.loader)
    assert isinstance(ds, ImageDataset) and len(ds.train_labels) == 50
