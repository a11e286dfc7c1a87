"""Real CIFAR-10 images for offline tests, streamed from the shared JPEG archive (ImageFolder layout inside)."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_ARCHIVE = "shared/datasets/cifar10-jpeg.tar.gz"
# The shared folder sits beside the checkout here and inside the copied working tree on the device machine.
_CANDIDATES = [Path(__file__).resolve().parents[1].parent / _ARCHIVE, Path(__file__).resolve().parents[1] / _ARCHIVE]


def cifar_archive() -> Path:
    """Path of the archive; skips the calling test when it is not on this machine."""
    for path in _CANDIDATES:
        if path.is_file():
            return path
    pytest.skip(f"real CIFAR-10 JPEG archive not found at {_CANDIDATES[0]}")


def read_cifar_jpegs(
    per_class_train: int, per_class_test: int, classes: list[str] | None = None
) -> dict[tuple[str, str], list[tuple[str, bytes]]]:
    """The first JPEGs of each (split, class) as (file name, bytes), streaming the archive once and stopping early."""
    wanted = {"train": per_class_train, "test": per_class_test}
    classes = CIFAR10_CLASSES if classes is None else classes
    found: dict[tuple[str, str], list[tuple[str, bytes]]] = {
        (split, name): [] for split, count in wanted.items() if count > 0 for name in classes
    }
    remaining = sum(wanted[split] for split, _ in found)
    with tarfile.open(cifar_archive(), "r|gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or tuple(parts[:2]) not in found:
                continue
            files = found[parts[0], parts[1]]
            if len(files) < wanted[parts[0]]:
                files.append((parts[2], tar.extractfile(member).read()))
                remaining -= 1
                if remaining == 0:
                    break
    short = [key for key, files in found.items() if len(files) < wanted[key[0]]]
    if short:
        raise ValueError(f"the archive has too few images for {short}")
    return found


def write_image_folder(dest: Path, jpegs: dict[tuple[str, str], list[tuple[str, bytes]]]) -> Path:
    """Write files from `read_cifar_jpegs` as dest/<split>/<class>/<file>."""
    for (split, name), files in jpegs.items():
        class_dir = dest / split / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for filename, data in files:
            (class_dir / filename).write_bytes(data)
    return dest


def extract_cifar_subset(
    dest: Path, per_class_train: int, per_class_test: int, classes: list[str] | None = None
) -> Path:
    """An ImageFolder tree (dest/train/<class>/*.jpg, dest/test/<class>/*.jpg) of real CIFAR-10 images."""
    return write_image_folder(dest, read_cifar_jpegs(per_class_train, per_class_test, classes))


def decode(data: bytes, mode: str = "RGB") -> np.ndarray:
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert(mode))
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def pixels_and_labels(jpegs, split, classes=CIFAR10_CLASSES):
    """(N, 3, 32, 32) uint8 pixels and int64 labels of one split, classes interleaved as in the real batches."""
    items = [(decode(data), label) for label, name in enumerate(classes) for _, data in jpegs[split, name]]
    order = np.random.default_rng(0).permutation(len(items))
    return np.stack([items[i][0] for i in order]), np.array([items[i][1] for i in order], dtype=np.int64)


def dump(path: Path, content) -> None:
    with path.open("wb") as f:
        pickle.dump(content, f, protocol=2)


def write_cifar10(root: Path, jpegs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Official python-format CIFAR-10 files (bytes keys, rows of 3072 R-G-B planes) built from real images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = pixels_and_labels(jpegs, "train")
    test_x, test_y = pixels_and_labels(jpegs, "test")
    for i, (x, y) in enumerate(zip(np.array_split(train_x, 5), np.array_split(train_y, 5)), start=1):
        dump(folder / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(),
                                          b"labels": y.tolist(), b"data": x.reshape(len(x), -1),
                                          b"filenames": [b"x.png"] * len(x)})
    dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test_y.tolist(),
                                 b"data": test_x.reshape(len(test_x), -1), b"filenames": [b"x.png"] * len(test_x)})
    dump(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                                   b"num_cases_per_batch": 10000, b"num_vis": 3072})
    return train_x, train_y, test_x, test_y
