"""Loaders that turn a data set on disk into uint8 arrays, so every later stage works on one in-memory format.

Each loader is called by Hydra through `dataset.loader._target_` and returns an `ImageDataset`. Problems with the
files on disk raise `DataError` with one line that names the file and says how to fix it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ssat.errors import ConfigError, DataError
from ssat.progress import track


@dataclass
class ImageDataset:
    """A labelled image data set held as uint8 arrays (N, C, H, W) with int64 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]

    def __post_init__(self) -> None:
        """Reject inconsistent arrays here, so a bad loader fails at load time rather than mid-training."""
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.ndim != 4:
                raise DataError(f"{split} images are {images.dtype} {images.shape}; expected uint8 (N, C, H, W)")
            if labels.dtype != np.int64 or labels.shape != (len(images),):
                raise DataError(
                    f"{split} labels are {labels.dtype} {labels.shape}; expected int64 ({len(images)},), one per image"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise DataError(
                    f"{split} labels span {labels.min()}..{labels.max()}; expected 0..{len(self.classes) - 1}"
                    f" for {len(self.classes)} classes"
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DataError(
                f"train images are {self.train_images.shape[1:]} but test images are {self.test_images.shape[1:]};"
                " both splits need the same (C, H, W)"
            )


# Failures a download can end in: network errors are OSError (URLError included), checksum mismatches RuntimeError.
_DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError, http.client.HTTPException, tarfile.TarError)


def _one_line(exc: BaseException) -> str:
    """An exception's text on a single line, falling back to its type name."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _not_found(name: str, missing: Path, what: str) -> DataError:
    return DataError(
        f"{name} not found: {missing} is missing; run with dataset.download=true on a machine with internet,"
        f" or put {what} at that path (or point SSAT_DATA_DIR / dataset.root elsewhere,"
        " or use dataset=image_folder)"
    )


def load_digits(test_fraction: float = 0.2, split_seed: int = 0, image_size: int = 8,
                channels: int = 1) -> ImageDataset:
    """The UCI 8x8 handwritten digits bundled with scikit-learn: a real data set that needs no download.
    ``image_size`` and ``channels`` give the same images at another shape (bilinear resize, the grey copied to
    every channel): at 32 and 3, CIFAR-10's, they fit the models that take only CIFAR-shaped input (RobustBench's)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    n, num_classes = len(digits.target), 10
    n_test = math.ceil(test_fraction * n)  # how scikit-learn sizes the test split
    if not 0.0 < test_fraction < 1.0 or min(n_test, n - n_test) < num_classes:
        raise ConfigError(
            f"dataset.loader.test_fraction={test_fraction} must leave at least {num_classes} images in each split"
            f" of {n};"
            " use a value between 0.01 and 0.99"
        )
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    if image_size != images.shape[-1]:
        images = np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BILINEAR))
                           for im in images])
    images = np.repeat(images[:, None], channels, axis=1)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(n), test_size=test_fraction, stratify=labels, random_state=split_seed
    )
    return ImageDataset(
        train_images=images[train_idx],
        train_labels=labels[train_idx],
        test_images=images[test_idx],
        test_labels=labels[test_idx],
        classes=[str(d) for d in range(num_classes)],
    )


@dataclass(frozen=True)
class _CifarFormat:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    labels_key: bytes
    names_key: bytes
    url: str
    archive: str
    md5: str


_CIFAR10 = _CifarFormat(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    labels_key=b"labels",
    names_key=b"label_names",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    archive="cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
)

_CIFAR100 = _CifarFormat(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    labels_key=b"fine_labels",
    names_key=b"fine_label_names",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    archive="cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
)


def _read_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path} is missing; the extracted archive is incomplete, delete its folder and extract again")
    try:
        with path.open("rb") as f:
            content = pickle.load(f, encoding="bytes")
    except Exception as e:  # a damaged pickle can raise almost anything
        raise DataError(f"cannot read {path}: {_one_line(e)}; the file is corrupt, extract the archive again") from e
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a {type(content).__name__}, not the dict of the official python format")
    return content


def _read_cifar_batch(path: Path, labels_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_pickle(path)
    data, labels = batch.get(b"data"), batch.get(labels_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path} has no uint8 b'data' array of shape (N, 3072) as in the official python format")
    if labels is None or len(labels) != len(data):
        raise DataError(f"{path} has no {labels_key!r} list with one label per image as in the official python format")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _load_cifar(fmt: _CifarFormat, root: str | os.PathLike, download: bool) -> ImageDataset:
    root = Path(root).expanduser()
    folder = root / fmt.folder
    if not folder.is_dir() and download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(fmt.url, str(root), filename=fmt.archive, md5=fmt.md5)
        except _DOWNLOAD_ERRORS as e:
            raise DataError(
                f"downloading {fmt.name} from {fmt.url} into {root} failed ({_one_line(e)}); check the connection,"
                f" or copy the extracted archive to {folder} and run with dataset.download=false"
            ) from e
    if not folder.is_dir():
        raise _not_found(fmt.name, folder, f"the folder extracted from {fmt.archive}")
    train = [_read_cifar_batch(folder / name, fmt.labels_key) for name in fmt.train_files]
    test_images, test_labels = _read_cifar_batch(folder / fmt.test_file, fmt.labels_key)
    meta_path = folder / fmt.meta_file
    names = _read_pickle(meta_path).get(fmt.names_key)
    if not isinstance(names, list):
        raise DataError(f"{meta_path} has no {fmt.names_key!r} list of class names as in the official python format")
    return ImageDataset(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        classes=[n.decode() if isinstance(n, bytes) else str(n) for n in names],
    )


def load_cifar10(root: str | os.PathLike, download: bool = False) -> ImageDataset:
    """CIFAR-10 from the official python-format batches under `root/cifar-10-batches-py`."""
    return _load_cifar(_CIFAR10, root, download)


def load_cifar100(root: str | os.PathLike, download: bool = False) -> ImageDataset:
    """CIFAR-100 (fine labels) from the official python-format files under `root/cifar-100-python`."""
    return _load_cifar(_CIFAR100, root, download)


# (file name, url, md5) of each SVHN split, as torchvision downloads them.
_SVHN_FILES = {
    "train": ("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
              "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": ("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
             "eb5a983be6a315427106f1b164d9cef3"),
    "extra": ("extra_32x32.mat", "http://ufldl.stanford.edu/housenumbers/extra_32x32.mat",
              "a93ce644f1a588dc4d68dda5feec44a7"),
}


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as e:  # scipy raises many types for damaged or non-MATLAB files
        raise DataError(f"cannot read {path}: {_one_line(e)}; the file is corrupt, download it again") from e
    images, labels = mat.get("X"), mat.get("y")
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise DataError(f"{path} has no 'X' array of shape (32, 32, 3, N) as in the official SVHN format")
    if not isinstance(labels, np.ndarray) or labels.size != images.shape[3]:
        raise DataError(f"{path} has no 'y' array with one label per image as in the official SVHN format")
    labels = labels.reshape(-1).astype(np.int64)
    if labels.min() < 1 or labels.max() > 10:
        raise DataError(f"{path} has labels {labels.min()}..{labels.max()}; the official SVHN format uses 1..10")
    labels[labels == 10] = 0  # SVHN writes digit 0 as label 10
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1), dtype=np.uint8), labels


def load_svhn(root: str | os.PathLike, download: bool = False, include_extra: bool = False) -> ImageDataset:
    """SVHN from the official `*_32x32.mat` files directly under `root`; `include_extra` adds extra to train."""
    root = Path(root).expanduser()
    splits = ["train", "test"] + (["extra"] if include_extra else [])
    for split in splits:
        filename, url, md5 = _SVHN_FILES[split]
        if (root / filename).is_file() or not download:
            continue
        from torchvision.datasets.utils import download_url

        try:
            download_url(url, str(root), filename=filename, md5=md5)
        except _DOWNLOAD_ERRORS as e:
            raise DataError(
                f"downloading svhn {split} from {url} into {root} failed ({_one_line(e)}); check the connection,"
                f" or copy {filename} to {root} and run with dataset.download=false"
            ) from e
    for split in splits:
        path = root / _SVHN_FILES[split][0]
        if not path.is_file():
            raise _not_found("svhn", path, f"the official {path.name} file")
    loaded = {split: _read_svhn_mat(root / _SVHN_FILES[split][0]) for split in splits}
    train = [loaded["train"]] + ([loaded["extra"]] if include_extra else [])
    return ImageDataset(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=loaded["test"][0],
        test_labels=loaded["test"][1],
        classes=[str(d) for d in range(10)],
    )


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
# Bump when decoding changes, so caches written by older code are not reused.
_CACHE_FORMAT = 1


def _list_split(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, label) pairs of `root/split/<class>/*`, in sorted order."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(
            f"no {split}/ subfolder in {root}; dataset.root must hold train/<class>/ and test/<class>/ image folders"
        )
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {split_dir}; expected {split_dir}/<class>/<image> files")
    if len(classes) == 1:
        raise DataError(f"{split_dir} holds 1 class folder ({classes[0]}); a classifier needs at least 2 classes")
    files = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        images = sorted(
            p for p in class_dir.iterdir()
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
        )
        if not images:
            raise DataError(f"no images found in {class_dir}; allowed extensions: {' '.join(sorted(IMAGE_EXTENSIONS))}")
        files.extend((path, label) for path in images)
    return classes, files


def _decode(path: Path, mode: str, image_size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if image_size is not None and image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path}: {_one_line(e)}; delete or replace the file") from e
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _decode_all(files: list[tuple[Path, int]], mode: str, image_size: int | None, desc: str) -> np.ndarray:
    """Decode every file into one (N, C, H, W) array; without `image_size` all must match the first file's size."""
    first = _decode(files[0][0], mode, image_size)
    images = np.empty((len(files), *first.shape), dtype=np.uint8)
    images[0] = first
    for i, (path, _) in enumerate(track(files[1:], len(files), desc, "img", initial=1), start=1):
        pixels = _decode(path, mode, image_size)
        if pixels.shape != first.shape:
            raise DataError(
                f"image {path} is {pixels.shape[2]}x{pixels.shape[1]} but {files[0][0]} is"
                f" {first.shape[2]}x{first.shape[1]}; set dataset.image_size to resize all images to one square size"
            )
        images[i] = pixels
    return images


def _cache_key(root: Path, channels: int, image_size: int | None, files: list[tuple[Path, int]]) -> str:
    """A digest of everything the decoded arrays depend on: any added, removed or touched file changes it."""
    listing = []
    for path, _ in files:
        stat = path.stat()
        listing.append((path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    payload = json.dumps([_CACHE_FORMAT, str(root), channels, image_size, sorted(listing)])
    return hashlib.sha256(payload.encode()).hexdigest()


_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def _load_cache(entry: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when there is no complete entry (a damaged one is removed so it gets rebuilt)."""
    if not entry.is_dir():
        return None
    try:
        return {name: np.load(entry / f"{name}.npy") for name in _ARRAYS}
    except (OSError, ValueError, EOFError):
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _save_cache(entry: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write into a temporary folder and rename it into place, so a crash never leaves a half-written entry."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.tmp-"))
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        os.rename(tmp, entry)
    except OSError as e:
        if not entry.is_dir():  # anything but another process having written the same entry first
            raise DataError(
                f"cannot write the decoded-image cache {entry}: {_one_line(e)}; set cache_dir to a writable folder"
            ) from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_image_folder(
    root: str | os.PathLike,
    channels: int = 3,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ImageDataset:
    """Any labelled image set laid out as `root/{train,test}/<class>/<image>`, decoded once and cached as .npy.

    Classes are the sorted folder names under train/, and test/ must have the same ones. With `image_size` every
    image is resized to that square size; without it all images must already share one size.
    """
    if channels not in (1, 3):
        raise ConfigError(f"dataset.channels={channels} is not supported for image folders; use 1 (grey) or 3 (RGB)")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"dataset.image_size={image_size!r} must be a positive integer or null (keep file sizes)")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist; set dataset.root to a folder holding train/<class>/ and test/<class>/"
        )
    classes, train_files = _list_split(root, "train")
    test_classes, test_files = _list_split(root, "test")
    if test_classes != classes:
        missing, extra = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
        raise DataError(
            f"{root}/test has different class folders from {root}/train (missing in test: {missing},"
            f" not in train: {extra}); both splits need the same classes"
        )
    entry = None
    if cache_dir is not None:
        key = _cache_key(root, channels, image_size, train_files + test_files)
        entry = Path(cache_dir).expanduser() / "image_folder" / key
        cached = _load_cache(entry)
        if cached is not None:
            return ImageDataset(**cached, classes=classes)
    images = _decode_all(train_files + test_files, "L" if channels == 1 else "RGB", image_size, f"decoding {root}")
    arrays = {
        "train_images": images[: len(train_files)],
        "train_labels": np.array([label for _, label in train_files], dtype=np.int64),
        "test_images": images[len(train_files) :],
        "test_labels": np.array([label for _, label in test_files], dtype=np.int64),
    }
    dataset = ImageDataset(**arrays, classes=classes)
    if entry is not None:
        _save_cache(entry, arrays)
    return dataset
