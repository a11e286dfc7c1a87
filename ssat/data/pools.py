"""Unlabeled pools too large for RAM (1M DDPM images, 20M later): converted once to .npy files and memory-mapped.

A pool on disk (an .npz of the de facto DDPM format, or a folder of images) is converted in a streaming pass into
`<cache_dir>/pools/<key>/images.npy` (uint8, N x C x H x W), with `labels.npy` beside it when the source has labels
and `meta.json` written last: a folder with `meta.json` is complete, so an interrupted conversion is redone and a
finished one is reused. Stages then read only the rows they need through `MemmapImages`.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.lib.format import open_memmap, read_array, read_array_header_1_0, read_array_header_2_0, read_magic

from ssat.cache import write_json_atomic
from ssat.data.datasets import IMAGE_EXTENSIONS, ImageDataset, _cache_key, _decode, _one_line
from ssat.data.splits import SemiSupervisedData, assemble, carve_val_and_labeled
from ssat.errors import ConfigError, DataError
from ssat.progress import progress, track

IMAGES, LABELS, META = "images.npy", "labels.npy", "meta.json"
# Bump when the conversion changes, so folders written by older code are not reused.
_FORMAT = 1
# Rows are converted in chunks of about this many bytes: memory stays flat whatever the pool size.
_CHUNK_BYTES = 1 << 20
# What a truncated or corrupt .npz raises while it is read.
_READ_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError)


class MemmapImages:
    """A read-only uint8 (N, C, H, W) pool joined from .npy parts without copying them into RAM.

    Every read returns an in-RAM copy of just the rows asked for: an int, a slice (which may cross parts) or a
    1-D int array (any order, duplicates allowed), which reads each part in sorted order for locality.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise DataError("a pool needs at least one .npy file of images")
        self._parts = [_open_part(p) for p in self.paths]
        for path, part in zip(self.paths[1:], self._parts[1:]):
            if part.shape[1:] != self._parts[0].shape[1:]:
                raise DataError(
                    f"{path} holds images of shape {part.shape[1:]} but {self.paths[0]} holds"
                    f" {self._parts[0].shape[1:]}; all parts of a pool need the same (C, H, W)"
                )
        self._offsets = np.cumsum([0] + [len(part) for part in self._parts])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (int(self._offsets[-1]), *self._parts[0].shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def ndim(self) -> int:
        return 4

    @property
    def fingerprint(self) -> list[tuple[int, int]]:
        """(size, mtime) of each part: it changes when a source is converted again, and with it the cache keys; it
        does not change when the cache that holds the parts moves."""
        return [(p.stat().st_size, p.stat().st_mtime_ns) for p in self.paths]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __repr__(self) -> str:
        return f"MemmapImages({len(self)} images of {'x'.join(map(str, self.shape[1:]))} in {len(self._parts)} files)"

    def __array__(self, *args, **kwargs):
        """Refuse to materialise the whole pool behind the caller's back."""
        raise TypeError(f"{self!r} is not converted to one array; read rows with pool[a:b] or pool[indices]")

    def __reduce__(self):
        """Pickle as the file paths, so sending the pool to another process does not copy its pixels."""
        return MemmapImages, (self.paths,)

    def __getitem__(self, key) -> np.ndarray:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            if not -n <= key < n:
                raise IndexError(f"index {key} is out of range for a pool of {n} images")
            key = int(key) % n
            part = int(np.searchsorted(self._offsets, key, side="right")) - 1
            return np.array(self._parts[part][key - self._offsets[part]])
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[np.arange(start, stop, step)]
            pieces = [
                part[max(start, lo) - lo : min(stop, hi) - lo]
                for part, lo, hi in zip(self._parts, self._offsets[:-1], self._offsets[1:])
                if max(start, lo) < min(stop, hi)
            ]
            return np.concatenate(pieces) if pieces else np.empty((0, *self.shape[1:]), dtype=np.uint8)
        return self._take(key)

    def _take(self, key) -> np.ndarray:
        index = np.asarray(key)
        if index.ndim != 1 or not (np.issubdtype(index.dtype, np.integer) or index.size == 0):
            raise IndexError(
                f"pool indices must be an int, a slice or a 1-D int array, not {index.dtype} {index.shape}"
            )
        index = index.astype(np.int64)
        n = len(self)
        if index.size and (index.min() < -n or index.max() >= n):
            raise IndexError(f"indices {index.min()}..{index.max()} are out of range for a pool of {n} images")
        index = np.where(index < 0, index + n, index)
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        bounds = np.searchsorted(ordered, self._offsets)
        out = np.empty((len(index), *self.shape[1:]), dtype=np.uint8)
        for part, offset, lo, hi in zip(self._parts, self._offsets, bounds[:-1], bounds[1:]):
            if lo < hi:
                out[order[lo:hi]] = part[ordered[lo:hi] - offset]
        return out


def _open_part(path: Path) -> np.ndarray:
    try:
        part = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot open pool images {path}: {_one_line(e)}; delete its folder to convert it again") from e
    if part.dtype != np.uint8 or part.ndim != 4 or len(part) == 0:
        raise DataError(f"{path} holds {part.dtype} {part.shape}; expected uint8 images (N, C, H, W) with N >= 1")
    return part


def convert_npz(npz_path: str | os.PathLike, out_dir: str | os.PathLike, image_key: str = "image",
                label_key: str = "label") -> tuple[Path, Path | None]:
    """Stream an .npz's (N, H, W, C) or greyscale (N, H, W) uint8 images into out_dir/images.npy as (N, C, H, W).

    Labels, when the .npz has `label_key`, go to out_dir/labels.npy as int64. A conversion whose meta.json matches
    the source's path, size and mtime is reused; anything else is converted again.
    """
    source = Path(npz_path).expanduser().resolve()
    out_dir = Path(out_dir)
    if not source.is_file():
        raise DataError(
            f"pool file {source} not found; expected an .npz holding uint8 images (N, H, W, C) under {image_key!r}"
        )
    stat = source.stat()
    meta = {"format": _FORMAT, "source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "image_key": image_key, "label_key": label_key}
    images_path, labels_path = out_dir / IMAGES, out_dir / LABELS
    done = _read_meta(out_dir)
    if done is not None and {k: done.get(k) for k in meta} == meta and images_path.is_file():
        return images_path, labels_path if done.get("labels") else None
    _clear(out_dir)
    temps = (_staging(out_dir, IMAGES), _staging(out_dir, LABELS))
    staged = dict(zip((IMAGES, LABELS), temps))
    try:
        try:
            with zipfile.ZipFile(source) as archive:
                shape, labels = _convert_members(archive, source, staged[IMAGES], image_key, label_key)
        except _READ_ERRORS as e:
            raise DataError(
                f"cannot read {source}: {_one_line(e)}; expected a complete .npz written by numpy.savez or"
                " savez_compressed (the file is truncated or corrupt: copy or generate it again)"
            ) from e
        if labels is None:
            del staged[LABELS]
        else:
            _write(out_dir, lambda: np.save(staged[LABELS], labels))
        _publish(out_dir, staged, {**meta, "shape": list(shape), "labels": labels is not None})
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        _drop_if_empty(out_dir)
    return images_path, labels_path if labels is not None else None


def _convert_members(archive: zipfile.ZipFile, source: Path, out_path: Path, image_key: str,
                     label_key: str) -> tuple[tuple[int, ...], np.ndarray | None]:
    """Check the image header and the labels first, then transpose the images chunk by chunk into out_path."""
    members = {name[: -len(".npy")]: name for name in archive.namelist() if name.endswith(".npy")}
    if image_key not in members:
        raise DataError(
            f"{source} has no {image_key!r} array (keys: {', '.join(sorted(members)) or 'none'});"
            " set pool.image_key to the key that holds the images"
        )
    where = f"{source}[{image_key!r}]"
    with archive.open(members[image_key]) as f:
        stored, fortran, dtype = _read_header(f)
        n, h, w, c = _image_shape(where, stored, fortran, dtype)
        labels = _read_labels(archive, members[label_key], f"{source}[{label_key!r}]", n) \
            if label_key in members else None
        row = h * w * c
        rows_per_chunk = max(1, _CHUNK_BYTES // row)
        out = _write(out_path.parent, lambda: open_memmap(out_path, mode="w+", dtype=np.uint8, shape=(n, c, h, w)))
        with progress(n, f"converting {source.name}", "img") as bar:
            for start in range(0, n, rows_per_chunk):
                count = min(rows_per_chunk, n - start)
                data = f.read(count * row)
                if len(data) != count * row:
                    raise DataError(f"{where} ends after {start + len(data) // row} of its {n} images; the file is"
                                    " truncated: copy or generate it again")
                out[start : start + count] = np.frombuffer(data, np.uint8).reshape(count, h, w, c).transpose(0, 3, 1, 2)
                bar.update(count)
        out.flush()
        del out
    return (n, c, h, w), labels


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = read_magic(f)
    if version == (1, 0):
        return read_array_header_1_0(f)
    if version == (2, 0):
        return read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")


def _image_shape(where: str, shape: tuple[int, ...], fortran: bool, dtype: np.dtype) -> tuple[int, int, int, int]:
    """(N, H, W, C) of a stored image array, or a one-line DataError saying what is expected instead."""
    expected = "expected uint8 images (N, H, W, C) with C = 1 or 3, or (N, H, W) for greyscale"
    if dtype != np.uint8:
        raise DataError(f"{where} is {dtype}; expected uint8 pixels 0..255 (scale the images and cast them with"
                        " .astype(np.uint8) before saving)")
    if len(shape) == 3 and shape[-1] in (3, 4):
        raise DataError(f"{where} has shape {shape}, colour images without the N axis; {expected}")
    if len(shape) == 3:
        shape = (*shape, 1)
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise DataError(f"{where} has shape {shape}; {expected}")
    if shape[0] == 0:
        raise DataError(f"{where} holds no images; {expected}")
    if fortran:
        raise DataError(f"{where} is stored in Fortran order, which cannot be read row by row;"
                        " save it again with np.ascontiguousarray(images)")
    return shape


def _read_labels(archive: zipfile.ZipFile, member: str, where: str, n: int) -> np.ndarray:
    with archive.open(member) as f:
        labels = read_array(f, allow_pickle=False)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where} is {labels.dtype} {labels.shape} but there are {n} images;"
                        f" expected integer labels of shape ({n},), one per image")
    return labels.astype(np.int64)


def _read_meta(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / META).read_text())
    except (OSError, ValueError):
        return None


def _staging(out_dir: Path, name: str) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    return out_dir / f".{Path(name).stem}.tmp-{os.getpid()}.npy"


def _write(out_dir: Path, action):
    """Run a write into the pool cache; a failure there is the cache's fault, not the source's."""
    try:
        return action()
    except OSError as e:
        raise DataError(
            f"cannot write the pool cache {out_dir}: {_one_line(e)}; set cache_dir to a writable folder with room"
            " for the whole pool"
        ) from e


def _clear(out_dir: Path) -> None:
    """Remove an earlier result before converting, so a failure never leaves stale files that look finished."""

    def clear():
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (META, IMAGES, LABELS):
            (out_dir / name).unlink(missing_ok=True)

    _write(out_dir, clear)


def _drop_if_empty(folder: Path) -> None:
    """A failed conversion leaves no empty folder behind (its own, or the pools folder it was the first in)."""
    try:
        folder.rmdir()
    except OSError:  # not empty, or already gone
        pass


def _publish(out_dir: Path, staged: dict[str, Path], meta: dict) -> None:
    """Rename the staged files into place, then write meta.json: its presence marks the folder complete."""

    def publish():
        for name, tmp in staged.items():
            os.replace(tmp, out_dir / name)
        write_json_atomic(out_dir / META, meta)

    _write(out_dir, publish)


def _pools_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        raise ConfigError(
            "pool.cache_dir is null; the pool is converted once into a cache, set it to a writable folder"
        )
    return Path(cache_dir).expanduser().resolve() / "pools"


def _npz_dir(pools_root: Path, path: str | os.PathLike, image_key: str, label_key: str) -> Path:
    """One folder per source file and keys, so every run that names the same .npz shares one conversion."""
    source = str(Path(path).expanduser().resolve())
    payload = json.dumps([_FORMAT, "npz", source, image_key, label_key])
    return pools_root / hashlib.sha256(payload.encode()).hexdigest()[:16]


# What the selected points of an .npz pool train with (pool.labels): the intermediate model's pseudo-labels, or
# the files' own labels (the release trains on those of the DDPM files).
POOL_LABELS = ("intermediate", "file")


def npz_pool(dataset: ImageDataset, val_size: int, paths, cache_dir: str | os.PathLike | None, name: str = "npz",
             image_key: str = "image", label_key: str = "label", num_labeled: int | None = None,
             split_seed: int = 0, labels: str = "file") -> SemiSupervisedData:
    """The data set's training images (minus validation) as the labeled set, one or more .npz files as the pool.

    Parts are joined in the given order; the pool's hidden labels are the files' labels when every part has them.
    ``labels`` (which labels train, read by the pipeline) is checked here: ``file`` needs labels in every part.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ConfigError("pool.paths is empty; give one .npz or a list: pool.paths=[a.npz,b.npz]")
    if labels not in POOL_LABELS:
        raise ConfigError(f"pool.labels={labels!r} is not one of {', '.join(POOL_LABELS)}")
    for path in paths:
        _check_before_converting(Path(path), dataset, image_key, label_key)
    root = _pools_root(cache_dir)
    try:
        converted = [convert_npz(p, _npz_dir(root, p, image_key, label_key), image_key, label_key) for p in paths]
    finally:
        _drop_if_empty(root)
    for path, (images_path, _) in zip(paths, converted):
        _check_shape(_open_part(images_path).shape[1:], dataset, f"pool file {path}",
                     "use a pool generated for this data set")
    label_paths = [label_path for _, label_path in converted]
    if labels == "file" and None in label_paths:
        unlabeled = paths[label_paths.index(None)]
        raise ConfigError(f"pool.labels=file but {unlabeled} has no {label_key!r} array (pool.label_key); set "
                          f"pool.labels=intermediate to train on the intermediate model's pseudo-labels")
    hidden = None if None in label_paths else np.concatenate([np.load(p) for p in label_paths])
    return _semi_supervised(dataset, val_size, num_labeled, split_seed, MemmapImages([i for i, _ in converted]),
                            hidden)


def _check_before_converting(path: Path, dataset: ImageDataset, image_key: str, label_key: str) -> None:
    """A pool that can never serve this data set (other image shape, labels outside its classes) is refused from
    its headers, before a conversion fills the cache; an unreadable file is left to convert_npz to report."""
    try:
        with zipfile.ZipFile(path.expanduser()) as archive:
            members = {name.removesuffix(".npy"): name for name in archive.namelist()}
            if image_key not in members:
                return
            where = f"pool file {path}"
            with archive.open(members[image_key]) as f:
                n, h, w, c = _image_shape(f"{path}[{image_key!r}]", *_read_header(f))
            _check_shape((c, h, w), dataset, where, "use a pool generated for this data set")
            labels = _read_labels(archive, members[label_key], f"{path}[{label_key!r}]", n) \
                if label_key in members else None
    except _READ_ERRORS:
        return
    classes = len(dataset.classes)
    if labels is not None and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{where} holds labels {labels.min()}..{labels.max()} under {label_key!r}; the data set "
                        f"has {classes} classes, 0..{classes - 1} (set pool.label_key to another key to leave them "
                        f"out)")


def image_folder_pool(dataset: ImageDataset, val_size: int, root: str | os.PathLike,
                      cache_dir: str | os.PathLike | None, name: str = "image_folder", num_labeled: int | None = None,
                      split_seed: int = 0, image_size: int | None = None) -> SemiSupervisedData:
    """Every image under `root` (recursively, no labels) as the pool, decoded once into the pool cache.

    Images are read with the data set's channels and must have its size, unless `image_size` (the data set's
    square size) asks to resize them.
    """
    channels, height, width = dataset.train_images.shape[1:]
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or (image_size, image_size) != (height, width)):
        raise ConfigError(f"pool.image_size={image_size!r} must be null or the data set's image size, and the data"
                          f" set's images are {width}x{height}")
    if channels not in (1, 3):
        raise DataError(f"the data set has {channels} channels; image folder pools are read as 1 (grey) or 3 (RGB)")
    folder = Path(root).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"pool folder {folder} does not exist; set pool.root to a folder of images (searched"
                        " recursively)")
    files = sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise DataError(f"no images found in {folder} or its subfolders; allowed extensions:"
                        f" {' '.join(sorted(IMAGE_EXTENSIONS))}")
    key = _cache_key(folder, channels, image_size, [(p, 0) for p in files])
    out_dir = _pools_root(cache_dir) / key[:16]
    images_path = out_dir / IMAGES
    if not ((out_dir / META).is_file() and images_path.is_file()):
        try:
            _decode_folder(files, folder, out_dir, "L" if channels == 1 else "RGB", image_size,
                           (channels, height, width))
        finally:
            _drop_if_empty(out_dir.parent)
    pool = MemmapImages([images_path])
    _check_shape(pool.shape[1:], dataset, f"pool folder {folder}", f"set pool.image_size={height} to resize them")
    return _semi_supervised(dataset, val_size, num_labeled, split_seed, pool, None)


def _decode_folder(files: list[Path], folder: Path, out_dir: Path, mode: str, image_size: int | None,
                   expected: tuple[int, int, int]) -> None:
    """Decode straight into a memory-mapped .npy, so the folder never has to fit in RAM."""
    _clear(out_dir)
    staged = _staging(out_dir, IMAGES)
    try:
        out = _write(out_dir, lambda: open_memmap(staged, mode="w+", dtype=np.uint8, shape=(len(files), *expected)))
        for i, path in enumerate(track(files, len(files), f"decoding {folder}", "img")):
            pixels = _decode(path, mode, image_size)
            if pixels.shape != expected:
                raise DataError(
                    f"image {path} is {pixels.shape[2]}x{pixels.shape[1]} but the data set's images are"
                    f" {expected[2]}x{expected[1]}; set pool.image_size={expected[1]} to resize the pool's images"
                )
            out[i] = pixels
        out.flush()
        del out
        _publish(out_dir, {IMAGES: staged}, {"format": _FORMAT, "source": str(folder), "count": len(files),
                                             "shape": [len(files), *expected]})
    finally:
        staged.unlink(missing_ok=True)
        _drop_if_empty(out_dir)


def _check_shape(shape: tuple[int, ...], dataset: ImageDataset, what: str, fix: str) -> None:
    expected = dataset.train_images.shape[1:]
    if tuple(shape) != expected:
        raise DataError(f"{what} has images of shape (C, H, W) = {tuple(shape)} but the data set's are {expected};"
                        f" {fix}")


def _semi_supervised(dataset: ImageDataset, val_size: int, num_labeled: int | None, split_seed: int,
                     pool: MemmapImages, hidden_labels: np.ndarray | None) -> SemiSupervisedData:
    """Validation (stratified) and labeled set (the rest, or a stratified part) from the data set's training split."""
    labels = dataset.train_labels
    n_train = len(labels)
    if not 1 <= val_size < n_train:
        raise ConfigError(f"val_size={val_size} must be between 1 and {n_train - 1}: the training set has {n_train}"
                          " images")
    if num_labeled is not None and not 1 <= num_labeled <= n_train - val_size:
        raise ConfigError(f"pool.num_labeled={num_labeled} must be between 1 and {n_train - val_size} (the training"
                          f" images outside val_size={val_size}), or null to label them all")
    val, labeled, _ = carve_val_and_labeled(labels, val_size, num_labeled, np.random.default_rng(split_seed))
    return assemble(dataset, val, labeled, pool, hidden_labels)
