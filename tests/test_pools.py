"""On-disk pools: npz files and image folders converted once, streamed, memory-mapped and read back exactly."""

import io
import os
import pickle
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from sklearn.datasets import load_digits as sklearn_digits

from cifar_archive import read_cifar_jpegs
from ssat.config import build
from ssat.data import pools
from ssat.data.datasets import ImageDataset, load_digits
from ssat.data.pools import MemmapImages, convert_npz, image_folder_pool, npz_pool
from ssat.errors import ConfigError, DataError

CONF = Path(__file__).resolve().parents[1] / "ssat" / "conf"


@pytest.fixture(scope="module")
def digits():
    """The real 8x8 digits as uint8 (N, H, W) greyscale, the layout of a greyscale .npz pool, and their labels."""
    data = sklearn_digits()
    return np.round(data.images * (255.0 / 16.0)).astype(np.uint8), data.target.astype(np.int64)


@pytest.fixture(scope="module")
def cifar():
    """Twenty real CIFAR-10 training JPEGs (two per class) as (file name, bytes) and as (N, 32, 32, 3) pixels."""
    jpegs = read_cifar_jpegs(per_class_train=2, per_class_test=0)
    files = [(f"{cls}_{name}", data) for (_, cls), items in sorted(jpegs.items()) for name, data in items]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for _, data in files])
    return files, pixels


@pytest.fixture
def parts(tmp_path, digits):
    """The digits in three .npz parts: stored, deflate-compressed, and stored again."""
    images, labels = digits
    cuts = [(0, 700, np.savez), (700, 1300, np.savez_compressed), (1300, len(images), np.savez)]
    paths = []
    for i, (lo, hi, save) in enumerate(cuts):
        paths.append(tmp_path / f"part{i}.npz")
        save(paths[-1], image=images[lo:hi], label=labels[lo:hi])
    return paths


def indexed_dataset(n_train: int, shape=(1, 8, 8)) -> ImageDataset:
    """A data set stand-in whose training image i carries i in its first two pixels, so rows can be traced."""
    train = np.random.default_rng(0).integers(0, 256, (n_train, *shape), dtype=np.uint8)
    flat = train.reshape(n_train, -1)
    flat[:, 0], flat[:, 1] = np.arange(n_train) // 256, np.arange(n_train) % 256
    test = np.random.default_rng(1).integers(0, 256, (20, *shape), dtype=np.uint8)
    return ImageDataset(train, np.arange(n_train, dtype=np.int64) % 10, test, np.arange(20, dtype=np.int64) % 10,
                        [str(c) for c in range(10)])


def row_ids(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1).astype(np.int64)
    return flat[:, 0] * 256 + flat[:, 1]


def test_multi_part_pool_reads_like_the_concatenated_arrays(tmp_path, parts, digits):
    converted = [convert_npz(p, tmp_path / f"out{i}") for i, p in enumerate(parts)]
    pool = MemmapImages([images for images, _ in converted])
    expected = digits[0][:, None]  # (N, 1, 8, 8)
    assert pool.shape == expected.shape and len(pool) == len(expected) and pool.dtype == np.uint8
    for key in [slice(None), slice(690, 710), slice(650, 1400), slice(-5, None), slice(1299, 1301), slice(5, 5),
                slice(0, 1500, 7)]:
        assert np.array_equal(np.asarray(pool[key]), expected[key]), key
    for index in [0, 699, 700, 1796, -1]:
        assert np.array_equal(pool[index], expected[index])
    fancy = np.array([1500, 3, 700, 699, 3, 1299, 1300, -1, 3])  # unsorted, duplicates, every part
    assert np.array_equal(pool[fancy], expected[fancy])
    assert pool[np.array([], dtype=np.int64)].shape == (0, 1, 8, 8)
    labels = [np.load(labels) for _, labels in converted]
    assert np.array_equal(np.concatenate(labels), digits[1]) and labels[0].dtype == np.int64
    with pytest.raises(IndexError):
        pool[len(pool)]
    with pytest.raises(TypeError, match="pool\\[a:b\\]"):
        np.asarray(pool)  # never materialised behind the caller's back
    copy = pickle.loads(pickle.dumps(pool))
    assert copy.paths == pool.paths and np.array_equal(copy[fancy], expected[fancy])


def test_rgb_npz_is_transposed_to_channels_first(tmp_path, cifar):
    _, pixels = cifar
    np.savez_compressed(tmp_path / "rgb.npz", image=pixels)
    images, labels = convert_npz(tmp_path / "rgb.npz", tmp_path / "out")
    assert labels is None
    assert np.array_equal(MemmapImages([images])[:], pixels.transpose(0, 3, 1, 2))


def test_conversion_is_reused_and_redone_when_the_source_changes(tmp_path, parts, digits, monkeypatch):
    out = tmp_path / "out"
    images, _ = convert_npz(parts[0], out)
    with monkeypatch.context() as patch:
        patch.setattr(pools.zipfile, "ZipFile", lambda *a, **k: pytest.fail("the source was read again"))
        assert convert_npz(parts[0], out)[0] == images
    changed = 255 - digits[0][:700]
    np.savez(parts[0], image=changed)  # same path and size, new pixels, no labels
    stat = os.stat(parts[0])
    os.utime(parts[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    images, labels = convert_npz(parts[0], out)
    assert labels is None and not (out / "labels.npy").exists()
    assert np.array_equal(MemmapImages([images])[:], changed[:, None])


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_conversion_streams_instead_of_loading_the_array(tmp_path, save):
    """A 50 MB image array converts with a few MB of numpy and zip buffers; loading it whole would need 50 MB."""
    tile = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    images = np.tile(tile, (1024 + 64, 1, 1, 1))  # 17,408 images: 53.5 MB
    save(tmp_path / "big.npz", image=images, label=np.zeros(len(images), dtype=np.int64))
    size = images.nbytes
    del images
    tracemalloc.start()
    try:
        path, _ = convert_npz(tmp_path / "big.npz", tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 8, f"peak {peak / 1e6:.1f} MB while converting {size / 1e6:.1f} MB"
    pool = MemmapImages([path])
    assert pool.shape == (17408, 3, 32, 32) and np.array_equal(pool[[17407]], tile[[15]].transpose(0, 3, 1, 2))


def _truncated(path: Path) -> None:
    np.savez(path, image=np.zeros((100, 8, 8), np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_payload(path: Path) -> None:
    np.savez(path, image=np.zeros((100, 8, 8), np.uint8))
    data = bytearray(path.read_bytes())
    data[3000:3100] = b"\xff" * 100  # inside the stored pixels: the zip's CRC no longer matches
    path.write_bytes(bytes(data))


def _corrupt_deflate(path: Path) -> None:
    np.savez_compressed(path, image=np.random.default_rng(0).integers(0, 256, (100, 8, 8), dtype=np.uint8))
    data = bytearray(path.read_bytes())
    data[1000:1400] = bytes(range(200)) * 2
    path.write_bytes(bytes(data))


def _short_member(path: Path) -> None:
    """A member whose header promises 100 images but holds 50: read as far as it goes, then refused."""
    member = io.BytesIO()
    np.save(member, np.zeros((100, 8, 8), np.uint8))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("image.npy", member.getvalue()[: -50 * 64])


BAD_SOURCES = {
    "truncated": (_truncated, "cannot read .*truncated or corrupt"),
    "corrupt pixels": (_corrupt_payload, "cannot read .*CRC"),
    "short member": (_short_member, r"\['image'\] ends after 50 of its 100 images; the file is truncated"),
    "corrupt deflate stream": (_corrupt_deflate, "cannot read .*truncated or corrupt"),
    "garbage": (lambda p: p.write_bytes(os.urandom(2000)), "cannot read .*not a zip file"),
    "missing key": (lambda p: np.savez(p, images=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4)),
                    r"has no 'image' array \(keys: images, y\); set pool.image_key"),
    "float images": (lambda p: np.savez(p, image=np.zeros((4, 8, 8, 3), np.float32)),
                     r"\['image'\] is float32; expected uint8 pixels 0..255"),
    "single rgb image": (lambda p: np.savez(p, image=np.zeros((32, 32, 3), np.uint8)),
                         r"has shape \(32, 32, 3\), colour images without the N axis"),
    "channels first": (lambda p: np.savez(p, image=np.zeros((4, 3, 32, 32), np.uint8)),
                       r"has shape \(4, 3, 32, 32\); expected uint8 images \(N, H, W, C\)"),
    "flat rows": (lambda p: np.savez(p, image=np.zeros((4, 3072), np.uint8)), r"has shape \(4, 3072\)"),
    "fortran order": (lambda p: np.savez(p, image=np.asfortranarray(np.zeros((4, 8, 8, 3), np.uint8))),
                      "Fortran order"),
    "label count": (lambda p: np.savez(p, image=np.zeros((4, 8, 8), np.uint8), label=np.arange(3)),
                    r"\['label'\] is int64 \(3,\) but there are 4 images; expected integer labels of shape \(4,\)"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources_fail_in_one_line_and_leave_nothing_that_looks_finished(tmp_path, parts, case):
    make, message = BAD_SOURCES[case]
    out = tmp_path / "out"
    source = tmp_path / "bad.npz"
    source.write_bytes(parts[0].read_bytes())
    convert_npz(source, out)  # a finished conversion of the earlier, good content
    make(source)
    os.utime(source, ns=(0, os.stat(source).st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=message) as err:
        convert_npz(source, out)
    assert str(source) in str(err.value) and "\n" not in str(err.value)
    assert not out.exists(), "a failed conversion leaves no folder behind"


def test_missing_source_file(tmp_path):
    with pytest.raises(DataError, match="pool file .*missing.npz not found; expected an .npz"):
        convert_npz(tmp_path / "missing.npz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_npz_pool_splits_the_data_set_and_joins_the_parts(tmp_path, parts, digits):
    dataset = indexed_dataset(400)
    data = npz_pool(dataset, 50, [str(p) for p in parts], tmp_path / "cache")
    assert data.sizes() == {"labeled": 350, "val": 50, "pool": len(digits[0]), "test": 20}
    assert np.array_equal(data.pool_hidden_labels, digits[1])
    assert np.array_equal(data.pool_images[np.array([1300, 2, 699])], digits[0][[1300, 2, 699], None])
    val, labeled = row_ids(data.val_images), row_ids(data.labeled_images)
    assert set(val).isdisjoint(labeled) and len(set(val) | set(labeled)) == 400
    assert np.array_equal(np.bincount(data.val_labels), [5] * 10)  # stratified
    assert len(list((tmp_path / "cache" / "pools").iterdir())) == 3

    some = npz_pool(dataset, 50, parts[1], tmp_path / "cache", num_labeled=100, split_seed=0)
    assert some.sizes()["labeled"] == 100 and some.sizes()["pool"] == 600
    assert np.array_equal(row_ids(some.val_images), val)  # the same seed keeps the same validation split
    assert set(row_ids(some.labeled_images)) <= set(labeled)
    assert np.array_equal(np.bincount(some.labeled_labels), [10] * 10)


def test_npz_pool_hidden_labels_need_every_part(tmp_path, parts, digits):
    np.savez(tmp_path / "unlabelled.npz", image=digits[0][:10])
    data = npz_pool(indexed_dataset(100), 20, [parts[0], tmp_path / "unlabelled.npz"], tmp_path / "cache",
                    labels="intermediate")
    assert data.pool_hidden_labels is None and len(data.pool_images) == 710
    with pytest.raises(ConfigError, match="pool.labels=file but .*unlabelled.npz has no 'label' array"):
        npz_pool(indexed_dataset(100), 20, [parts[0], tmp_path / "unlabelled.npz"], tmp_path / "cache")


def test_npz_pool_must_match_the_data_set(tmp_path, parts, cifar):
    np.savez(tmp_path / "rgb.npz", image=cifar[1])
    with pytest.raises(DataError, match=r"rgb.npz has images of shape \(C, H, W\) = \(3, 32, 32\) but the data "
                                        r"set's are \(1, 8, 8\)"):
        npz_pool(indexed_dataset(100), 20, tmp_path / "rgb.npz", tmp_path / "cache")
    with pytest.raises(ConfigError, match="pool.num_labeled=500 must be between 1 and 80"):
        npz_pool(indexed_dataset(100), 20, parts[0], tmp_path / "cache", num_labeled=500)
    with pytest.raises(ConfigError, match="pool.paths is empty"):
        npz_pool(indexed_dataset(100), 20, [], tmp_path / "cache")


def write_files(root: Path, files) -> list[Path]:
    """The JPEGs spread over nested folders, beside files that are not images."""
    paths = []
    for i, (name, data) in enumerate(files):
        path = root / f"batch{i % 3}" / ("deep" if i % 2 else "") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    (root / "README.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.jpg").write_bytes(files[0][1])
    return sorted(paths)


def test_image_folder_pool_decodes_once_into_the_cache(tmp_path, cifar, monkeypatch):
    paths = write_files(tmp_path / "folder", cifar[0])
    dataset = indexed_dataset(60, shape=(3, 32, 32))
    data = image_folder_pool(dataset, 10, tmp_path / "folder", tmp_path / "cache", num_labeled=20)
    expected = np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in paths])
    assert data.pool_hidden_labels is None and data.sizes() == {"labeled": 20, "val": 10, "pool": 20, "test": 20}
    assert np.array_equal(data.pool_images[:], expected)
    with monkeypatch.context() as patch:
        patch.setattr(pools, "_decode", lambda *a: pytest.fail("decoded again"))
        again = image_folder_pool(dataset, 10, tmp_path / "folder", tmp_path / "cache")
    assert np.array_equal(again.pool_images[::-1], expected[::-1])


def test_image_folder_pool_size_must_match_unless_resized(tmp_path, cifar):
    write_files(tmp_path / "folder", cifar[0][:3])
    grey = indexed_dataset(60, shape=(1, 8, 8))
    with pytest.raises(DataError, match=r"is 32x32 but the data set's images are 8x8; set pool.image_size=8"):
        image_folder_pool(grey, 10, tmp_path / "folder", tmp_path / "cache")
    assert not list((tmp_path / "cache" / "pools").glob("*/*.npy"))
    data = image_folder_pool(grey, 10, tmp_path / "folder", tmp_path / "cache", image_size=8)
    assert data.pool_images.shape == (3, 1, 8, 8)
    with pytest.raises(ConfigError, match="pool.image_size=16 must be null or the data set's image size"):
        image_folder_pool(grey, 10, tmp_path / "folder", tmp_path / "cache", image_size=16)
    with pytest.raises(DataError, match="no images found in .*empty"):
        (tmp_path / "empty").mkdir()
        image_folder_pool(grey, 10, tmp_path / "empty", tmp_path / "cache")


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_npz_config_builds_the_pool(tmp_path, parts, digits):
    cfg = compose_config(["pool=npz", f"pool.paths=['{parts[0]}','{parts[2]}']", f"cache_dir={tmp_path}"])
    data = build(cfg.pool, dataset=build(cfg.dataset.loader), val_size=cfg.val_size)
    assert data.sizes()["pool"] == 700 + len(digits[0]) - 1300
    assert data.sizes()["labeled"] == cfg.pool.num_labeled == 300 and data.sizes()["val"] == cfg.val_size
    assert np.array_equal(data.pool_hidden_labels, np.concatenate([digits[1][:700], digits[1][1300:]]))

    cfg = compose_config(["pool=npz", f"pool.paths={tmp_path / 'missing.npz'}", f"cache_dir={tmp_path}"])
    with pytest.raises(DataError, match="missing.npz not found"):
        build(cfg.pool, dataset=load_digits(), val_size=cfg.val_size)


def test_image_folder_config_builds_the_pool(tmp_path, cifar):
    write_files(tmp_path / "folder", cifar[0][:4])
    cfg = compose_config(["pool=image_folder", f"pool.root={tmp_path / 'folder'}", "pool.image_size=8",
                          f"cache_dir={tmp_path}"])
    data = build(cfg.pool, dataset=build(cfg.dataset.loader), val_size=cfg.val_size)
    assert data.pool_images.shape == (4, 1, 8, 8) and data.pool_hidden_labels is None
