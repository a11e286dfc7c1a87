"""Sweeps through `hydra/launcher=slurm` on a real one-node SLURM cluster (scripts/slurm_local.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from conftest import compose, run_ssat
from ssat import distributed
from ssat.artifacts import ModelWeights
from ssat.config import build, check_command_line
from ssat.errors import ConfigError
from ssat.lightning.trainer import build_trainer
from ssat.pipeline import load_data
from ssat import slurm
from ssat.slurm import fix_hint, gpu_count, minutes
from ssat.stages.embed import embed_pool
from test_faults import outcome

pytestmark = pytest.mark.slow  # real ssat.run processes (see pyproject's markers)

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")

# A hopeless job ends the sweep after 5 s of looking so here, not the default 30 s.
GRACE_S = 5
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_local.sh"
# Tiny schedules and one CPU per job: the two CPUs of a CI machine run two jobs at once.
TINY = ["intermediate.epochs=3", "eval.pgd.steps=3", "eval.val_pgd.steps=2", "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=15"]


@pytest.mark.parametrize("limit, expected", [("infinite", None), ("UNLIMITED", None), ("30:00", 30),
                                             ("4:00:00", 240), ("1-12:00:00", 2160), ("2-00:00:30", 2880.5)])
def test_slurm_time_limits_read_in_minutes(limit, expected):
    assert minutes(limit) == expected


@pytest.mark.parametrize("gres, expected", [("(null)", 0), ("gpu:4", 4), ("gpu:a100:8(S:0-1),shard:16", 8),
                                            ("gpu:a100:2,gpu:v100:2", 4)])
def test_node_gpus_read_from_sinfo_gres(gres, expected):
    assert gpu_count(gres) == expected


@pytest.mark.parametrize("params, hint", [
    ({"cpus_per_task": 1, "tasks_per_node": 2},
     "hydra.launcher.cpus_per_task=1 for each of hydra.launcher.tasks_per_node=2 tasks exceeds every node (1 CPUs)"),
    ({"cpus_per_task": 4, "mem_gb": 64},
     "hydra.launcher.cpus_per_task=4 exceeds every node (1 CPUs); hydra.launcher.mem_gb=64 exceeds every node"),
    ({"cpus_per_task": 1, "timeout_min": 90}, "hydra.launcher.timeout_min=90 exceeds the partition's limit (1:00:00)"),
    ({"cpus_per_task": 1}, "the request fits a node")])
def test_a_request_no_node_fits_is_named_by_the_settings_that_exceed_it(monkeypatch, params, hint):
    """What sinfo says a node of 1 CPU and 2 GB offers, against the launcher settings of a job it will never start."""
    sinfo = subprocess.CompletedProcess([], 0, stdout="1|2000|(null)|1:00:00\n")
    monkeypatch.setattr(slurm.subprocess, "run", lambda *args, **kwargs: sinfo)
    assert hint in fix_hint(params, "local")


# What srun sets in rank 9 of a job of 2 nodes x 8 tasks.
TWO_NODES_OF_EIGHT = {"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2", "SLURM_PROCID": "9",
                      "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NODELIST": "gpu[3-4]", "SLURM_JOB_ID": "4242",
                      "SLURM_JOB_NAME": "run"}


def test_ddp_in_a_slurm_job_of_several_tasks_takes_the_jobs_tasks_and_nodes(monkeypatch):
    for name, value in TWO_NODES_OF_EIGHT.items():
        monkeypatch.setenv(name, value)
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # Lightning writes the group's address into os.environ: undone after
        monkeypatch.setenv(name, "")            # the test, or the later runs' ranks would look for gpu3
        monkeypatch.delenv(name)
    # The trainer below sets Lightning's process-wide rank to 9: undone after the test, or the later runs in this
    # process would log nothing (Lightning's loggers write on rank 0 only).
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    assert distributed.slurm_tasks() == (8, 2)
    assert distributed.placement(-1) == distributed.placement("auto") == {"devices": 8, "num_nodes": 2}
    with pytest.raises(ConfigError, match=r"^trainer.devices=4 but the SLURM job runs 8 tasks per node"):
        distributed.placement(4)
    with pytest.raises(ConfigError, match=r"^trainer.num_nodes=3 but the SLURM job runs on 2 nodes"):
        distributed.placement(8, 3)
    # Lightning checks the trainer against SLURM's variables (devices=-1 or num_nodes=1 it would refuse here).
    trainer = build_trainer(accelerator="cpu", strategy="ddp", devices=-1, logger=False)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size, trainer.global_rank) == (2, 8, 16, 9)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert trainer.strategy.cluster_environment.main_address == "gpu3"

    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: Lightning's launcher, the config's devices
    assert distributed.slurm_tasks() is None and distributed.placement(-1) == {"devices": -1, "num_nodes": 1}


@pytest.mark.parametrize("overrides, error", [
    (["hydra.launcher.tasks_per_node=2"], "hydra.launcher.tasks_per_node=2 and hydra.launcher.nodes=1 start 2 tasks "
                                          "per job, which run as one DDP group: add trainer=ddp"),
    (["trainer=ddp"], "trainer=ddp on SLURM runs one rank per task"),
    (["trainer=ddp", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=8", "hydra.launcher.gpus_per_task=1"],
     "hydra.launcher.gpus_per_task=1 hides the node's other GPUs from each task"),
    (["trainer=ddp", "hydra.launcher.tasks_per_node=2", "trainer.devices=4"],
     "trainer.devices=4 but the SLURM job runs 2 tasks per node"),
])
def test_slurm_ddp_settings_that_contradict_each_other_stop_before_submission(overrides, error):
    with pytest.raises(ConfigError) as info:
        check_command_line(["-m", "hydra/launcher=slurm", *overrides])
    assert str(info.value).startswith(error)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_gpu_sweep_on_slurm_is_submitted_from_a_machine_without_a_gpu():
    """A login node has no GPU; the job checks its own devices where it runs."""
    check_command_line(["-m", "hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.nodes=2",
                        "hydra.launcher.tasks_per_node=8", "hydra.launcher.gpus_per_node=8", "trainer.accelerator=gpu"])
    check_command_line(["-m", "hydra/launcher=slurm", "trainer=gpu"])
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu but no CUDA device is visible"):
        check_command_line(["trainer=gpu"])


@pytest.fixture(scope="module")
def cluster():
    proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        pytest.skip(f"no local SLURM cluster here: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
    yield
    if "already running" not in proc.stdout:  # leave a cluster that someone else started
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


def sweep(*overrides: str, sweep_dir: Path, cache_dir: Path) -> subprocess.Popen:
    """`python -m ssat.run -m hydra/launcher=slurm ...`: submits the array and waits for its jobs."""
    return subprocess.Popen([sys.executable, "-m", "ssat.run", "-m", *TINY, *overrides, f"cache_dir={cache_dir}",
                             f"hydra.sweep.dir={sweep_dir}"], cwd=sweep_dir.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "SSAT_SLURM_GRACE_S": str(GRACE_S)})


def finish(proc: subprocess.Popen) -> str:
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, f"the sweep failed ({proc.returncode}):\n{log[-5000:]}"
    return log


def wait_until(what: str, check, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm_cache")


def test_sweep_on_slurm_runs_four_jobs_sharing_the_intermediate_model_and_embedding(cluster, cache, tmp_path):
    sweep_dir = tmp_path / "sweep"
    finish(sweep("selector=random,lcs_km", "budget=0.1,0.2", "ssat.epochs=2", sweep_dir=sweep_dir,
                 cache_dir=cache))
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")}
    assert sorted(results) == ["0_random_0.1", "1_random_0.2", "2_lcs_km_0.1", "3_lcs_km_0.2"]
    # Each ran as a SLURM job through submitit (its result pickle), not in the launcher's process.
    assert len(list(sweep_dir.glob(".submitit/*/*_result.pkl"))) == 4
    for stage in ("intermediate", "embed"):
        flags = sorted(r["cached"][stage] for r in results.values())
        assert flags == [False, True, True, True], f"{stage} computed {flags.count(False)} times"
        assert len({r["stage_keys"][stage] for r in results.values()}) == 1
        assert [p.name for p in (cache / stage).iterdir() if p.is_dir()] == [results["0_random_0.1"]
                                                                                 ["stage_keys"][stage]]
    assert all(not r["cached"]["ssat"] and r["ssat_epochs"] == 2 for r in results.values())


def test_preempted_job_is_requeued_into_the_same_run_dir_and_resumes_from_its_checkpoint(cluster, cache, tmp_path):
    """USR2 (submitit's preemption signal) mid-SSAT: submitit requeues the job; the rerun takes the finished stages
    from the cache and resumes SSAT from last.ckpt in the same run directory, ending at the configured epoch."""
    epochs = 30
    sweep_dir = tmp_path / "sweep"
    proc = sweep("selector=random", "budget=0.1", f"ssat.epochs={epochs}", sweep_dir=sweep_dir, cache_dir=cache)
    wait_until("the SSAT stage's first checkpoint",
               lambda: list((cache / "ssat").glob("*.partial/checkpoints/last.ckpt")) if (cache / "ssat").exists()
               else None)
    (job_id,) = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)

    def requeued():
        state = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        return "Restarts=1" in state and "JobState=PENDING" in state

    wait_until("the job to be requeued", requeued, timeout=120)
    # SLURM holds a requeued job for two minutes before it may start again; the test does not wait for that. But
    # slurmd refuses a job started within the second its last run's credential was revoked ("Killing non-startable
    # batch JobId=...: Job credential revoked" in slurmctld's log; the job then ends FAILED), so not at once.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    finish(proc)

    (run_dir,) = [p.parent for p in sweep_dir.glob("*/results.json")]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["ssat_epochs"] == epochs and not results["cached"]["ssat"]
    run_log = (run_dir / "run.log").read_text()
    assert "Caught signal SIGUSR2" in run_log and f"Requeued job {job_id}" in run_log
    # Two attempts logged into the one run directory: the first stopped early, the second went on from there.
    attempts = sorted((run_dir / "logs" / "ssat").glob("version_*/metrics.csv"))
    assert len(attempts) == 2
    first, second = ([int(line.split(",")[0]) for line in p.read_text().splitlines()[1:]] for p in attempts)
    assert max(first) < epochs - 1
    assert 0 < min(second) == max(first) + 1 and max(second) == epochs - 1


def ended(proc: subprocess.Popen, timeout: float = 240) -> str:
    """The sweep's output once it has ended; a sweep still waiting after `timeout` s is killed and fails the test."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the sweep still waited after {timeout} s:\n{proc.communicate()[0][-3000:]}") from None


def array_id(sweep_dir: Path) -> str:
    return wait_until("the array's submission", lambda: [p.name for p in (sweep_dir / ".submitit").glob("*")
                                                          if p.name.isdigit()] if sweep_dir.exists() else None)[0]


def in_queue(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip()


def one_error_line(log: str) -> str:
    errors = [line for line in log.splitlines() if line.startswith("ssat: error: ")]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    return errors[0]


@pytest.mark.slow
def test_job_that_slurm_will_never_start_cancels_the_array_and_ends_the_sweep_naming_the_setting(cluster, tmp_path):
    """64 CPUs per task on a node with fewer: SLURM keeps the jobs PENDING (PartitionConfig) for ever."""
    sweep_dir = tmp_path / "sweep"
    proc = sweep("selector=random,lcs_km", "hydra.launcher.cpus_per_task=64", sweep_dir=sweep_dir,
                 cache_dir=tmp_path / "cache")
    job = array_id(sweep_dir)
    try:
        log = ended(proc)
        left_in_queue = in_queue(job)  # before the clean-up below: the sweep itself must have cancelled the array
    finally:
        subprocess.run(["scancel", job])
    assert proc.returncode == 1
    error = one_error_line(log)
    assert f"SLURM will never start job {job}_" in error and "reason PartitionConfig" in error
    assert "request cpu=64," in error and "hydra.launcher.cpus_per_task=64 exceeds every node" in error
    assert f"cancelled job {job}" in error and left_in_queue == ""


@pytest.mark.slow
def test_array_cancelled_while_running_ends_the_sweep(cluster, tmp_path):
    """scancel of a running array, without an accounting database: the jobs leave the queue without a result."""
    sweep_dir = tmp_path / "sweep"
    proc = sweep("selector=random", "budget=0.1,0.2", "ssat.epochs=30", sweep_dir=sweep_dir,
                 cache_dir=tmp_path / "cache")
    job = array_id(sweep_dir)
    try:
        wait_until("a job of the array to run", lambda: " R " in f" {in_queue(job)} ", timeout=180)
        subprocess.run(["scancel", job], check=True)
        log = ended(proc)
    finally:
        subprocess.run(["scancel", job])
    assert proc.returncode == 1
    error = one_error_line(log)
    assert f"job {job}_" in error and "CANCELLED without a result" in error
    assert not list(sweep_dir.glob("*/results.json"))


# One job of two tasks as one DDP group (gloo on CPU); trainer=ddp's devices=-1 is the job's tasks per node (on CPU,
# Lightning itself takes no -1). The same ranks through Lightning's own launcher: trainer.devices=2.
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true"]
DDP_SCHEDULE = ["ssat.epochs=2", "ssat.batches_per_epoch=3", "test_size=60", "eval.sanity.num_points=20",
                "eval.sanity.noise_samples=1"]


@pytest.mark.slow
def test_job_of_two_tasks_runs_the_pipeline_as_one_ddp_group_equal_to_lightnings_launcher(cluster, tmp_path,
                                                                                         monkeypatch):
    """`hydra.launcher.tasks_per_node=2`: SLURM starts both ranks (srun), Lightning's SLURMEnvironment reads them from
    SLURM's variables, and the run computes what the two ranks that Lightning's own launcher starts compute: the
    same records, selection, accuracies and every weight and array file, byte for byte."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # both runs: the same kernels, bit for bit
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "ssat.run", "-m", *TINY, *DDP, *DDP_SCHEDULE,
                             "hydra.launcher.tasks_per_node=2", "hydra.launcher.mem_gb=2",
                             f"cache_dir={tmp_path / 'slurm_cache'}", f"hydra.sweep.dir={sweep_dir}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        finish(proc)
    finally:  # a failed or hung run leaves neither its sweep nor a job holding the node's CPUs
        if proc.poll() is None:
            proc.kill()
        for submitted in (sweep_dir / ".submitit").glob("[0-9]*"):
            subprocess.run(["scancel", submitted.name])
    (run_dir,) = [p.parent for p in sweep_dir.glob("*/results.json")]
    (job,) = [p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
    assert sorted(p.name for p in job.glob("*_result.pkl")) == [f"{job.name}_{task}_result.pkl" for task in (0, 1)]
    slurm = outcome(run_dir)
    assert slurm["records"]["intermediate"]["world_size"] == slurm["records"]["ssat"]["world_size"] == 2
    assert slurm["records"]["embed"]["ranks"] == 2 and slurm["records"]["ssat"]["steps"] == 2 * 3
    assert (run_dir / "run.log").read_text().count("results in") == 1  # rank 0 reports

    local = run_ssat(*[o for o in TINY if not o.startswith("hydra")], *DDP, "trainer.devices=2", *DDP_SCHEDULE,
                     run_dir=tmp_path / "local", cache_dir=tmp_path / "local_cache", fast=False)
    lightning = outcome(local.run_dir)
    for one in (slurm, lightning):  # the keys hold trainer.devices as typed (-1 and 2)
        del one["results"]["stage_keys"]
    assert slurm == lightning

    # The embedding the two ranks assembled is the one a single process computes with the same model (test_ddp.py).
    cfg = compose(f"cache_dir={tmp_path / 'slurm_cache'}")
    model = ModelWeights.load_into(build(cfg.model), Path(json.loads((run_dir / "results.json").read_text())
                                                          ["stage_dirs"]["intermediate"]))
    single = tmp_path / "single"
    single.mkdir()
    embed_pool(model, load_data(cfg).pool_images, single, 512)
    stage = Path(json.loads((run_dir / "results.json").read_text())["stage_dirs"]["embed"])
    for name in ("features.npy", "logits.npy"):
        np.testing.assert_allclose(np.load(stage / name), np.load(single / name), rtol=1e-5, atol=1e-5)
