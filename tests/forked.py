"""`python -m <module> <args>` as a real process, without importing torch, Lightning and diffusers again each time.

A test worker starts one forkserver (multiprocessing's) that imports ssat's command lines and the pipeline, and
each run is a process forked from it: its own pid, environment, working directory, stdout and stderr, and exit
code; SIGKILL ends it as it ends `python -m ssat.run`. A fresh interpreter costs about 6 s of imports on the 2-core
machine, and the suite starts about a hundred runs.

The child gets the environment the run asks for, but what a module read from it when it was imported is what the
server started with (the worker's own environment): OpenMP's thread count, the hub's HF_HUB_OFFLINE, Lightning's
rank from RANK or SLURM_PROCID, SSAT_SLURM_GRACE_S. A run that changes a variable of that kind (IMPORT_TIME_ENV)
starts a fresh interpreter instead. Set SSAT_TEST_FRESH_INTERPRETERS=1 to start every run that way.
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# What the command lines import, not the modules run as __main__ themselves (runpy would run a second copy).
PRELOAD = ["hydra", "ssat.config", "ssat.pipeline", "ssat.stages", "ssat.stages.model_file", "ssat.run_dir",
           "ssat.report"]
# Prefixes of the variables that the preloaded modules (torch, OpenMP, BLAS, the hub, Lightning, ssat) or the
# interpreter read when they start. Others (PL_GLOBAL_SEED and MASTER_ADDR, which in-process runs leave set; WANDB_*,
# HOME, SSAT_TEST_STAGE_DELAY) are read at run time, from the child's environment.
IMPORT_TIME_ENV = ("OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "PYTHON", "LD_", "CUDA", "TORCH", "PYTORCH", "HF_",
                   "HUGGINGFACE", "DIFFUSERS", "SLURM_", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                   "WORLD_SIZE", "JSM_", "SSAT_SLURM")
for _module in PRELOAD:  # here too, so that what they set in os.environ (KMP_INIT_AT_FORK, ...) is in BASE_ENV
    importlib.import_module(_module)
BASE_ENV = dict(os.environ)  # the worker's environment, as the server's will be, before any test changed it

PIPE, STDOUT, DEVNULL = subprocess.PIPE, subprocess.STDOUT, subprocess.DEVNULL
_context = multiprocessing.get_context("forkserver")
_started = False


def start_server() -> None:
    """The server inherits the environment it is started in: the worker's own, whatever a test has patched."""
    global _started
    if _started:
        return
    _context.set_forkserver_preload(PRELOAD)
    patched = dict(os.environ)
    os.environ.clear()
    os.environ.update(BASE_ENV)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(patched)
    _started = True


def _redirect(fd: int, target: str | int | None) -> None:
    """fd onto a file (appended to), onto another fd (an int: stderr onto stdout), or left as it is (None)."""
    if target is None:
        return
    if isinstance(target, int):
        os.dup2(target, fd)
        return
    opened = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(opened, fd)
    os.close(opened)


def _run_module(module: str, args: list[str], env: dict[str, str], cwd: str | None, out: str | None,
                err: str | int | None) -> None:
    """In the forked process: what `python -m module args` does after its imports."""
    os.environ.clear()
    os.environ.update(env)
    if cwd:
        os.chdir(cwd)
    _redirect(1, out)
    _redirect(2, err)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    sys.argv = [module, *args]
    code: int | str | None = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exited:
        code = exited.code
    except BaseException:  # noqa: BLE001 - as the interpreter: the traceback on stderr, exit code 1
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    if isinstance(code, str):
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code if isinstance(code, int) else int(code is not None))


class ForkedProcess:
    """The part of subprocess.Popen's interface the tests use, for a process forked from the server."""

    def __init__(self, process, out: Path | None, err: Path | None, scratch: tempfile.TemporaryDirectory):
        self._process, self._out, self._err, self._scratch = process, out, err, scratch
        self.pid = process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not self._process.is_alive():
            self._process.join()
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self._process.name, timeout)
        return self.poll()

    def kill(self) -> None:
        if self.poll() is None:
            self._process.kill()

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        self.wait(timeout)
        texts = tuple(path.read_text(errors="replace") if path else None for path in (self._out, self._err))
        self._scratch.cleanup()
        return texts


def popen_module(module: str, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 stdout=None, stderr=None) -> ForkedProcess | subprocess.Popen:
    """`python -m module args` started as subprocess.Popen would start it (text mode when output is captured).

    stdout and stderr: None (inherit), PIPE (read with communicate), DEVNULL, a path, or STDOUT for stderr."""
    env = dict(os.environ if env is None else env)
    changed = {key for key in env.keys() | BASE_ENV.keys() if env.get(key) != BASE_ENV.get(key)}
    fresh = {key for key in changed if key.startswith(IMPORT_TIME_ENV)} - {"PYTHONUNBUFFERED"}
    if fresh or os.environ.get("SSAT_TEST_FRESH_INTERPRETERS") == "1":
        files = [open(s, "a") if isinstance(s, (str, Path)) else None for s in (stdout, stderr)]  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=cwd, stdout=files[0] or stdout,
                                stderr=files[1] or stderr, text=True)
        for file in filter(None, files):
            file.close()  # the child holds its own copy
        return proc
    start_server()
    scratch = tempfile.TemporaryDirectory(prefix="forked-")
    targets, captured = [], []
    for name, stream in (("stdout", stdout), ("stderr", stderr)):
        path = Path(scratch.name) / name if stream == PIPE else None
        if path:
            path.touch()
        captured.append(path)
        if stream is None or isinstance(stream, (str, Path)):
            targets.append(None if stream is None else str(stream))
        else:
            targets.append({PIPE: str(path), DEVNULL: os.devnull, STDOUT: 1}[stream])
    process = _context.Process(target=_run_module, args=(module, list(args), env, str(cwd) if cwd else None,
                                                         *targets), daemon=False)
    process.start()
    return ForkedProcess(process, *captured, scratch)


def run_module(module: str, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 900) -> subprocess.CompletedProcess:
    """As subprocess.run(capture_output=True, text=True) of `python -m module args`."""
    proc = popen_module(module, args, env=env, cwd=cwd, stdout=PIPE, stderr=PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # as subprocess.run: the child does not outlive the call
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess([sys.executable, "-m", module, *args], proc.returncode, out, err)
