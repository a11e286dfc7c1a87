"""`hydra/launcher=slurm`: hydra-submitit-launcher's SLURM launcher, waiting on `squeue` (ssat/slurm.py) instead of
on submitit's `sacct` polls, so that a job that can never finish ends the sweep instead of blocking it for ever.
A job of several tasks (`hydra.launcher.tasks_per_node`, `hydra.launcher.nodes`) runs its pipeline as one DDP
group, one rank per task (ssat/distributed.py)."""

from __future__ import annotations

from importlib.util import find_spec

# Hydra imports every module here at start-up and warns about one that fails: without the slurm extra
# (hydra-submitit-launcher) this module defines nothing.
if find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
    import logging
    import os
    import sys
    from pathlib import Path
    from typing import Sequence

    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
    from omegaconf import OmegaConf

    from ssat.errors import SweepError
    from ssat.slurm import wait_for_results

    log = logging.getLogger(__name__)

    class SlurmLauncher(SubmititSlurmLauncher):
        """Submits the sweep as one array job, as hydra-submitit-launcher does, then waits with wait_for_results."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            import submitit

            assert self.config is not None
            executor = submitit.AutoExecutor(cluster="slurm", folder=self.params["submitit_folder"],
                                             slurm_max_num_timeout=self.params["max_num_timeout"])
            shared = set(OmegaConf.structured(BaseQueueConf).keys())  # the rest take submitit's "slurm_" prefix
            executor.update_parameters(**{key if key in shared else f"slurm_{key}": value
                                          for key, value in self.params.items()
                                          if key not in ("submitit_folder", "max_num_timeout")})
            if self.params["tasks_per_node"] * self.params["nodes"] > 1:
                # One DDP group: a task that fails ends the others, which would otherwise wait at the next barrier.
                executor.update_parameters(slurm_srun_args=["--kill-on-bad-exit=1"])
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
            job_params = []
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
                job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                                   Singleton.get_state()))
            jobs = executor.map_array(self, *zip(*job_params))
            try:
                wait_for_results(jobs, self.params)
            except SweepError as err:  # raised past Hydra, it would print a traceback
                print(f"ssat: error: {err}", file=sys.stderr)
                raise SystemExit(1) from None
            return [job.results()[0] for job in jobs]  # rank 0's, in a job of several tasks

        def __call__(self, sweep_overrides: list[str], *args) -> JobReturn:
            """One task of a job; in a job of several tasks (the ranks of one DDP group) rank 0 alone writes the
            run directory's .hydra folder."""
            import submitit

            if submitit.JobEnvironment().global_rank > 0:
                sweep_overrides = [*sweep_overrides, "hydra.output_subdir=null"]
            return super().__call__(sweep_overrides, *args)
