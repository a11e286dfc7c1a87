"""Waiting for a sweep's SLURM jobs by asking `squeue` (the `hydra/launcher=slurm` launcher's wait).

submitit waits for a result file and asks `sacct` for the job's state; without an accounting database (a small
cluster) the state stays UNKNOWN, and a job that SLURM will never start, or one that left the queue without a
result, keeps the sweep waiting for ever. Here such a job cancels the array and ends the sweep in one line.
The launcher itself is hydra_plugins/ssat_launcher/slurm_launcher.py (Hydra takes launchers only from there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from typing import Any, Sequence

from ssat.errors import SweepError

log = logging.getLogger(__name__)

POLL_S = 5.0
# How long a job must look hopeless before the sweep ends: a node coming back, a requeue between two states or a
# result file that a network file system shows late do not end it (SSAT_SLURM_GRACE_S sets it).
GRACE_S = float(os.environ.get("SSAT_SLURM_GRACE_S", 30))
# A job that SLURM ends FAILED (or PREEMPTED, TIMEOUT, NODE_FAIL) may still come back: submitit requeues it on a
# preemption or a time limit, and SLURM holds a requeued job for about two minutes before it is PENDING again.
REQUEUE_GRACE_S = 240.0
MAY_COME_BACK = frozenset({"FAILED", "PREEMPTED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL"})
# Pending reasons that no amount of waiting changes (the request exceeds what the partition or its nodes offer,
# the account or QOS is refused, the nodes it needs are down, a launch failed and SLURM held the job).
NEVER_STARTS = frozenset({
    "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "PartitionDown", "PartitionInactive",
    "ReqNodeNotAvail", "BadConstraints", "InvalidAccount", "InvalidQOS", "DependencyNeverSatisfied",
    "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob", "QOSMaxMemoryPerJob", "QOSMaxNodePerJobLimit",
    "QOSMaxWallDurationPerJobLimit", "AssocMaxCpuPerJobLimit", "AssocMaxGRESPerJob", "AssocMaxMemPerJob",
    "AssocMaxNodePerJobLimit", "AssocMaxWallDurationPerJobLimit", "launch_failed_requeued_held",
})
# States of a job that is still in the queue; any other (COMPLETED, CANCELLED, FAILED, TIMEOUT, ...) has ended.
IN_QUEUE = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
    "RESIZING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD",
})


def wait_for_results(jobs: Sequence[Any], params: dict[str, Any]) -> None:
    """Returns once every job has written its result; cancels the array and raises SweepError when SLURM will
    never start a job or a job left the queue without one."""
    array_id = jobs[0].job_id.split("_")[0]
    hopeless_since: dict[str, float] = {}
    while waiting := [job for job in jobs if not has_results(job)]:
        queue = queue_states(array_id)
        now = time.monotonic()
        for job in waiting if queue is not None else ():
            problem = why_hopeless(job, queue, params)
            grace = REQUEUE_GRACE_S if queue.get(job.job_id, ("", ""))[0] in MAY_COME_BACK else GRACE_S
            if problem is None:
                hopeless_since.pop(job.job_id, None)
            elif now - hopeless_since.setdefault(job.job_id, now) >= grace:
                subprocess.run(["scancel", array_id], capture_output=True)
                raise SweepError(f"{problem}; cancelled job {array_id} (the sweep's array)")
        time.sleep(POLL_S)


def has_results(job: Any) -> bool:
    """Every task of the job wrote its result file (the folder's chmod refreshes an NFS cache, as submitit does)."""
    folder = job.paths.folder
    with contextlib.suppress(OSError):
        folder.chmod(folder.stat().st_mode)
    return all(job.task(task).paths.result_pickle.exists() for task in range(job.num_tasks))


def queue_states(array_id: str) -> dict[str, tuple[str, str]] | None:
    """{job id: (state, reason)} of the array's jobs that SLURM still knows; None when squeue cannot answer."""
    proc = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", array_id, "-o", "%i|%T|%r"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # every job of the array has left the queue and its records
            return {}
        log.warning("squeue failed (%s); waiting on", proc.stderr.strip())
        return None
    rows = (line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 2)
    return {job_id: (state, reason) for job_id, state, reason in rows}


def why_hopeless(job: Any, queue: dict[str, tuple[str, str]], params: dict[str, Any]) -> str | None:
    """Why the job, which has no result yet, will never give one; None while it may."""
    if job.job_id not in queue:
        return f"job {job.job_id} left the queue without a result (its log: {job.paths.stderr})"
    state, reason = queue[job.job_id]
    if state == "COMPLETED":  # the job wrote its result where this machine does not see it
        return (f"job {job.job_id} ended COMPLETED without a result in {job.paths.folder}: put hydra.sweep.dir on a "
                f"file system that every node shares")
    if state not in IN_QUEUE:
        return f"job {job.job_id} ended {state} without a result (its log: {job.paths.stderr})"
    if state == "PENDING" and reason in NEVER_STARTS:
        job_info = scontrol_fields(job.job_id)
        partition = job_info.get("Partition", "?")
        request = f"{job_info.get('ReqTRES') or job_info.get('TRES', '?')} for {job_info.get('TimeLimit', '?')}"
        return (f"SLURM will never start job {job.job_id} (reason {reason}; request {request} on partition "
                f"{partition}): {fix_hint(params, partition)}")
    return None


def scontrol_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job` as {field: value}: TRES (what the job asked for), TimeLimit, Partition, ..."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def fix_hint(params: dict[str, Any], partition: str) -> str:
    """Which launcher setting exceeds every node of the partition (from `sinfo`), and what to do."""
    out = subprocess.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%c|%m|%G|%l"], capture_output=True,
                         text=True).stdout
    nodes = [line.split("|") for line in out.splitlines() if line.count("|") == 3]
    if not nodes:
        return "sinfo lists no node in it: check hydra.launcher.partition"
    tasks = int(params.get("tasks_per_node") or 1)
    most_gpus = max(gpu_count(gres) for _, _, gres, _ in nodes)
    needs = {  # launcher key: (what one node must offer, the most that any node offers, unit)
        "cpus_per_task": ((params.get("cpus_per_task") or 1) * tasks, max(int(c) for c, *_ in nodes), "CPUs"),
        "mem_gb": ((params.get("mem_gb") or 0) * 1024, max(int(m) for _, m, *_ in nodes), "MB of memory"),
        "gpus_per_task": ((params.get("gpus_per_task") or 0) * tasks, most_gpus, "GPUs"),
        "gpus_per_node": (params.get("gpus_per_node") or 0, most_gpus, "GPUs"),
    }
    over = [f"hydra.launcher.{key}={params[key]}{per_node(key, tasks)} exceeds every node ({most} {unit})"
            for key, (need, most, unit) in needs.items() if need > most]
    limit = nodes[0][3]
    limit_min = minutes(limit)
    if limit_min is not None and params.get("timeout_min", 0) > limit_min:
        over.append(f"hydra.launcher.timeout_min={params['timeout_min']} exceeds the partition's limit ({limit})")
    if not over:
        return "the request fits a node: see why with sinfo -R and check hydra.launcher.additional_parameters"
    return f"{'; '.join(over)}: lower {'it' if len(over) == 1 else 'them'}"


def per_node(key: str, tasks: int) -> str:
    """' for each of tasks_per_node=2 tasks' where a per-task request is multiplied by the tasks on a node."""
    return f" for each of hydra.launcher.tasks_per_node={tasks} tasks" if key.endswith("_per_task") and tasks > 1 \
        else ""


def gpu_count(gres: str) -> int:
    """GPUs in a node's generic resources as sinfo prints them: 'gpu:a100:4(S:0-1),shard:8' -> 4."""
    return sum(int(item.split("(")[0].rsplit(":", 1)[-1]) for item in gres.split(",")
               if item.startswith("gpu:") and item.split("(")[0].rsplit(":", 1)[-1].isdigit())


def minutes(limit: str) -> float | None:
    """A SLURM time limit ('infinite', '30:00', '4:00:00', '1-12:00:00') in minutes; None when unlimited."""
    if not limit[:1].isdigit():
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts[-3:])))
    return int(days or 0) * 1440 + seconds / 60
