"""Real CIFAR-10 images for offline tests, streamed from the shared JPEG archive (ImageFolder layout inside)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

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
