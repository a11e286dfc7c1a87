"""Errors that end a run with one clear line instead of a traceback, and the data checks that raise them."""

from contextlib import contextmanager

import numpy as np

# Exit codes of `python -m ssat.run`: bad input found before any work starts, or a run that failed later.
BAD_INPUT, FAILED = 2, 1

# faiss-cpu and faiss-gpu both install the module faiss (installing both leaves whichever wrote last), so the
# package depends on neither and each comes with an extra.
FAISS_MISSING = ("FAISS is not installed; install ssat with one of its FAISS extras: pip install -e '.[cpu]', "
                 "or '.[gpu]' (faiss-gpu) on a machine with CUDA 12 drivers")


class SsatError(Exception):
    """A problem with the user's input (config, data, files), or a stage that failed: printed as one line.

    ``exit_code`` is BAD_INPUT unless the error surfaced while a stage computed (``during_work``): then FAILED.
    """

    exit_code = BAD_INPUT


@contextmanager
def during_work():
    """Marks an SsatError raised inside as a failure of work under way (exit code 1), not bad input."""
    try:
        yield
    except SsatError as err:
        err.exit_code = FAILED
        raise


class ConfigError(SsatError):
    """A config value outside what is allowed; the message names the key, the value and what is allowed."""


class DataError(SsatError):
    """A data set or pool that is missing, empty or malformed."""


class WriteError(SsatError):
    """An output that cannot be written: a full disk, a read-only or missing folder, a path under a file."""


class SweepError(SsatError):
    """A sweep's job that SLURM will never start, or that left the queue without a result. Exit code 1: unlike bad
    input, it shows only after submission."""


class TrainingDiverged(SsatError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


def check_finite(array: np.ndarray, what: str = "features", batch_size: int = 65536, first_row: int = 0,
                 total: int | None = None) -> None:
    """One NaN or infinity turns every distance and likelihood into NaN: stop at the first, naming its row.

    Reads a memory-mapped array one batch of rows at a time. A block of a larger array names its rows as there:
    its first row's index there and the larger array's length.
    """
    for start in range(0, len(array), batch_size):
        finite = np.isfinite(array[start:start + batch_size]).reshape(min(batch_size, len(array) - start), -1)
        rows_ok = finite.all(axis=1)
        if not rows_ok.all():
            row = first_row + start + int(np.argmin(rows_ok))
            raise DataError(f"{what} contain NaN or infinity at row {row} (of {total or len(array)}); the model that "
                            f"computed them diverged or the pool holds broken images")
