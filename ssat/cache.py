"""Stage artifacts on disk, keyed by a hash of the config that produced them.

A stage works in ``<root>/<stage>/<key>.partial/`` (kept across crashes so training can resume from its
checkpoints) and is committed by renaming that folder to ``<root>/<stage>/<key>/`` once its record is written:
a folder without the ``.partial`` suffix is always complete.

The jobs of a sweep share one cache: a stage is computed under an exclusive ``flock`` on ``<key>.lock``, so a
second job that needs it at the same time waits and then reuses the first one's result. The kernel drops the lock
when its holder dies (a killed or preempted job), so a stale lock never blocks; the next job resumes the
``.partial`` folder. flock works on local disks and on NFSv4 and Lustre mounts with locking enabled.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from ssat import distributed
from ssat.errors import WriteError

# Bump when a stage's computation changes so that old artifacts are not reused.
CACHE_VERSION = 1
RECORD = "record.json"
# What a full disk, a quota, a file-size limit or a read-only / missing folder raise while writing.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}

log = logging.getLogger("ssat")


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def stage_key(name: str, inputs: dict[str, Any]) -> str:
    """Hash of the stage name, the cache version and everything that affects the stage's output."""
    payload = json.dumps(
        {"version": CACHE_VERSION, "stage": name, "inputs": {k: _plain(v) for k, v in inputs.items()}},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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
    """What a stage left on disk and how long it took when it was computed."""

    name: str
    key: str
    path: Path
    seconds: float
    cached: bool
    info: dict[str, Any]


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

    def run(self, name: str, inputs: dict[str, Any], compute: Callable[[Path], dict[str, Any]],
            distributed_stage: bool = False) -> StageResult:
        """The committed stage, or computed under the key's lock (rank 0 holds it for all the job's ranks).

        With ``distributed_stage`` every DDP rank runs ``compute``; otherwise rank 0 alone, the others waiting.
        """
        key = stage_key(name, inputs)
        final = self.path(name, key)
        if distributed.world_size() == 1:  # ranks must decide together, so only a lone process takes this shortcut
            committed = self._committed(name, key)
            if committed is not None:
                return committed
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            lock = exclusive(final.with_name(key + ".lock"), f"stage {name}") if distributed.rank() == 0 \
                else nullcontext()
            with lock:
                distributed.barrier()  # every rank looks only once rank 0 holds the lock
                # Another job may have committed it while this one waited for the lock.
                return self._committed(name, key) or self._compute(name, key, inputs, compute, distributed_stage)
        except OSError as err:
            if err.errno not in WRITE_ERRNOS:
                raise
            raise WriteError(f"stage {name} could not write {err.filename or final.parent}: {err.strerror}; its "
                             f"unfinished work stays in {final.with_name(key + '.partial')}, which no run takes as "
                             f"complete") from None

    def _committed(self, name: str, key: str) -> StageResult | None:
        final = self.path(name, key)
        record_file = final / RECORD
        if not record_file.exists():
            return None
        record = json.loads(record_file.read_text())
        return StageResult(name, key, final, record["seconds"], True, record["info"])

    def _compute(self, name: str, key: str, inputs: dict[str, Any], compute: Callable[[Path], dict[str, Any]],
                 distributed_stage: bool) -> StageResult:
        final = self.path(name, key)
        record_file = final / RECORD
        work = final.with_name(key + ".partial")
        lead = distributed.rank() == 0
        if lead:
            work.mkdir(parents=True, exist_ok=True)
            write_json_atomic(work / "inputs.json", {k: _plain(v) for k, v in inputs.items()})
        distributed.barrier()
        start = time.perf_counter()
        info = compute(work) if lead or distributed_stage else None
        seconds = time.perf_counter() - start
        time.sleep(stage_delay_for_tests(name))
        if lead:
            write_json_atomic(work / RECORD, {"stage": name, "key": key, "seconds": seconds, "info": info})
            os.rename(work, final)
        distributed.barrier()
        if not lead:
            record = json.loads(record_file.read_text())
            seconds, info = record["seconds"], record["info"]
        return StageResult(name, key, final, seconds, False, info)
