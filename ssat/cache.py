"""Stage artifacts on disk, keyed by a hash of the config that produced them.

A stage works in ``<root>/<stage>/<key>.partial/`` (kept across crashes so training can resume from its
checkpoints) and is committed by renaming that folder to ``<root>/<stage>/<key>/`` once its record is written:
a folder without the ``.partial`` suffix is always complete. The record lists the size and sha256 of every file
the stage wrote, and a committed folder is checked against it before it is reused: a truncated or changed file
(a full disk, a copy cut short, a bit flip) moves the folder aside with a one-line warning and the stage is
computed again, instead of failing every later run with a traceback that names no folder.

The jobs of a sweep share one cache: a stage is computed under an exclusive ``flock`` on ``<key>.lock``, so a
second job that needs it at the same time waits and then reuses the first one's result. The kernel drops the lock
when its holder dies (a killed or preempted job), so a stale lock never blocks; the next job resumes the
``.partial`` folder. flock works on local disks and on NFSv4 and Lustre mounts with locking enabled.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ssat import distributed
from ssat.errors import WriteError

RECORD = "record.json"
# Files are hashed in blocks of this many bytes (sha256 runs at about 1.3 GB/s on one core here).
HASH_BLOCK = 1 << 24
# What a full disk, a quota, a file-size limit or a read-only / missing folder raise while writing.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}

log = logging.getLogger("ssat")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def file_manifest(folder: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under ``folder`` but the record itself."""
    manifest = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink()):
        relative = path.relative_to(folder).as_posix()
        if relative == RECORD:
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(HASH_BLOCK), b""):
                digest.update(block)
        manifest[relative] = [path.stat().st_size, digest.hexdigest()]
    return manifest


def manifest_problem(folder: Path, manifest: dict[str, list]) -> str | None:
    """What is wrong with ``folder`` against its manifest (a missing, resized or changed file), or None.

    Sizes are compared first, so a truncated file is found without reading the others."""
    folder = Path(folder)
    for relative, (size, _) in manifest.items():
        path = folder / relative
        if not path.is_file():
            return f"{relative} is missing"
        if path.stat().st_size != size:
            return f"{relative} has {path.stat().st_size} bytes, {size} were written"
    found = file_manifest(folder)
    for relative, (_, digest) in manifest.items():
        if found[relative][1] != digest:
            return f"{relative} has changed since it was written (sha256 {found[relative][1][:12]}..., " \
                   f"written {digest[:12]}...)"
    return None


def stage_delay_for_tests(stage: str) -> float:
    """Test-only: seconds to wait between a stage's work and its commit, from SSAT_TEST_STAGE_DELAY (for example
    "select:2,embed:1"), so that a kill test can land in stages that take milliseconds. Unset: 0."""
    delays = dict(item.split(":") for item in os.environ.get("SSAT_TEST_STAGE_DELAY", "").split(",") if item)
    return float(delays.get(stage, 0))


@contextmanager
def exclusive(lock_file: Path, what: str):
    """Holds an exclusive flock on lock_file; says so once when another process holds it and this one waits."""
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("    waiting for another job that is computing %s (%s)", what, lock_file)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class StageResult:
    """What a stage left on disk (or, for a stage computed in memory, its ``value``) and how long it took."""

    name: str
    key: str
    path: Path | None
    seconds: float
    cached: bool
    info: dict[str, Any]
    value: Any = None


def check_writable(directory: str | Path, what: str) -> None:
    """Create ``directory`` and write a file in it, so that an unwritable output fails now, not after training."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise WriteError(f"{what}={directory} is not writable: {err.strerror}") from None


class StageCache:
    """Runs each stage at most once per key; later calls return the committed artifacts.

    Under DDP (ssat.distributed) a ``distributed`` stage computes on every rank and any other on rank 0 alone;
    either way only rank 0 commits, and the other ranks read the committed record.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def path(self, name: str, key: str) -> Path:
        return self.root / name / key

    def run(self, name: str, key: str, inputs: dict[str, Any], compute: Callable[[Path], dict[str, Any]],
            distributed_stage: bool = False) -> StageResult:
        """The committed stage, or computed under the key's lock (rank 0 holds it for all the job's ranks).

        ``inputs`` (what the key hashes) is written beside the artifacts as inputs.json, for people. With
        ``distributed_stage`` every DDP rank runs ``compute``; otherwise rank 0 alone, the others waiting.
        """
        final = self.path(name, key)
        if distributed.world_size() == 1:  # ranks must decide together, so only a lone process takes this shortcut
            committed = self._committed(name, key)
            if committed is not None:
                return committed
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            lead = distributed.rank() == 0
            lock = exclusive(final.with_name(key + ".lock"), f"stage {name}") if lead else nullcontext()
            with lock:
                if lead:  # another job may have committed it while this one waited; rank 0 checks its files
                    self._committed(name, key)
                distributed.barrier()  # every rank looks only once rank 0 holds the lock and has checked
                return self._committed(name, key, verify=False) or self._compute(name, key, inputs, compute,
                                                                                 distributed_stage)
        except OSError as err:
            if err.errno not in WRITE_ERRNOS:
                raise
            raise WriteError(f"stage {name} could not write {err.filename or final.parent}: {err.strerror}; its "
                             f"unfinished work stays in {final.with_name(key + '.partial')}, which no run takes as "
                             f"complete") from None

    def _committed(self, name: str, key: str, verify: bool = True) -> StageResult | None:
        """The committed stage; with ``verify``, a folder whose files do not match its record is moved aside
        (``<key>.corrupt-<time>``) with a warning, and None returned so that the stage is computed again."""
        final = self.path(name, key)
        if not final.is_dir():
            return None
        try:
            record = json.loads((final / RECORD).read_text())
            problem = manifest_problem(final, record["files"]) if verify else None
        except (OSError, ValueError, KeyError, TypeError) as err:
            record, problem = None, f"{RECORD} is unreadable ({type(err).__name__}: {err})"
        if problem is not None:
            aside = move_aside(final, f"{key}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            log.warning("!!! cache: %s is corrupt (%s); moved aside to %s, computing stage %s again",
                        final, problem, aside.name, name)
            return None
        return StageResult(name, key, final, record["seconds"], True, record["info"])

    def _compute(self, name: str, key: str, inputs: dict[str, Any], compute: Callable[[Path], dict[str, Any]],
                 distributed_stage: bool) -> StageResult:
        final = self.path(name, key)
        record_file = final / RECORD
        work = final.with_name(key + ".partial")
        lead = distributed.rank() == 0
        if lead:
            work.mkdir(parents=True, exist_ok=True)
            write_json_atomic(work / "inputs.json", inputs)
        distributed.barrier()
        start = time.perf_counter()
        info = compute(work) if lead or distributed_stage else None
        seconds = time.perf_counter() - start
        time.sleep(stage_delay_for_tests(name))
        if lead:
            write_json_atomic(work / RECORD, {"stage": name, "key": key, "seconds": seconds, "info": info,
                                              "files": file_manifest(work)})
            os.rename(work, final)
        distributed.barrier()
        if not lead:
            record = json.loads(record_file.read_text())
            seconds, info = record["seconds"], record["info"]
        return StageResult(name, key, final, seconds, False, info)


def move_aside(folder: Path, name: str) -> Path:
    """Renames ``folder`` to ``name`` in its parent, or ``name-1``, ``name-2``, ... where one process already moved
    a corrupt copy aside under that name within the same second."""
    for n in itertools.count():
        aside = folder.with_name(name if n == 0 else f"{name}-{n}")
        try:
            os.rename(folder, aside)  # onto an existing non-empty folder: ENOTEMPTY/EEXIST, never a merge
            return aside
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
