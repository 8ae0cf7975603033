"""Submission through submitit, and nothing else: one Slurm job (nodes x tasks, one GPU per task, the node's CPUs
shared among its tasks) whose function is `launcher.job.TrainJob(run_dir)`, the supervisor that runs in the batch
step and starts the training step; sized by launcher/policy.py and recorded in the ledger.

Called on the login node (`pixeldiff-launch run`) and from inside a job that resubmits the run
(launcher/job.py), which is why the job's own Slurm environment is scrubbed around sbatch.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from launcher.policy import SubmitError, cpus_per_task, excluded_nodes, plan_jobs, time_limit_min
from launcher.rundir import events_of, ledger_path
from pixeldiff.config import Manifest
from pixeldiff.ledger import append_event


# The batch shell must outlive a TERM sent to the whole job (plain scancel, preemption): bash runs a trap only after
# its foreground command (the supervisor) returns, so with one it waits for the supervisor's decision.
SHELL_TRAP = "trap 'echo \"pixeldiff: the batch shell got a signal; the supervisor decides\"' TERM INT"


def node_cpus(m: Manifest) -> list | None:
    """sinfo's nodes of the manifest's partition (None when Slurm cannot say: the default then applies)."""
    from slurm.commands import Slurm, SlurmError

    try:
        return Slurm(min_interval_s=0).nodes(m.cluster.partition)
    except (SlurmError, ValueError) as e:
        print(f"pixeldiff: cannot read the nodes' CPUs from sinfo ({e}); cpus_per_task = data.workers + 2", flush=True)
        return None


def make_executor(m: Manifest, run_dir: Path, minutes: int, exclude: list[str], nodes: list | None = None):
    """submitit's executor for one job. The pickled function (launcher.job.TrainJob, the supervisor) runs once, in
    the batch step (use_srun=False); it starts the training step with srun itself."""
    import submitit

    c, jobs = m.cluster, plan_jobs(m)
    ex = submitit.SlurmExecutor(folder=str(Path(run_dir) / "jobs" / "%j"), max_num_timeout=jobs["max_timeouts"])
    setup = [SHELL_TRAP] + list(c.setup) + [f"export {k}={json.dumps(str(v))}" for k, v in c.env.items()]
    params = dict(
        job_name=m.name, nodes=c.nodes, ntasks_per_node=c.gpus_per_node, gpus_per_node=c.gpus_per_node,
        cpus_per_task=cpus_per_task(m, nodes, exclude), use_srun=False,
        time=minutes, signal_delay_s=min(int(jobs["signal_lead_s"]), minutes * 30), setup=setup, stderr_to_stdout=True,
    )
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(c, key):
            params[key] = getattr(c, key)
    if c.exclusive:
        params["exclusive"] = True
    if exclude:
        params["exclude"] = ",".join(exclude)
    ex.update_parameters(**params)
    return ex


STALE_PREFIXES = ("SLURM_", "SLURMD_", "SRUN_", "SBATCH_", "SUBMITIT_")
STALE_NAMES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "PIXELDIFF_DEADLINE",
               "PIXELDIFF_JOB_START")


@contextlib.contextmanager
def job_environment_scrubbed():
    """sbatch exports this process's environment into the new job: from inside a job (a resubmission) that would
    carry this job's rendezvous address, deadline and Slurm variables into the next. Keep SLURM_CONF."""
    stale = {k: v for k, v in os.environ.items()
             if (k.startswith(STALE_PREFIXES) and k != "SLURM_CONF") or k in STALE_NAMES}
    for k in stale:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(stale)


def submit(run_dir: Path, m: Manifest, why: str = "start", now: float | None = None) -> str:
    """Submit one job for the run; record it in the ledger. -> the job id."""
    run_dir = Path(run_dir)
    events = events_of(run_dir)
    minutes = time_limit_min(m, events, now or time.time())
    exclude = excluded_nodes(m, events)
    ex = make_executor(m, run_dir, minutes, exclude, None if m.cluster.cpus_per_task else node_cpus(m))
    from launcher.job import TrainJob  # here, not above: launcher.job imports this module to resubmit

    try:
        with job_environment_scrubbed():
            job = ex.submit(TrainJob(str(run_dir.resolve())))
    except Exception as e:  # submitit wraps sbatch's failure; the message is sbatch's
        raise SubmitError(f"sbatch refused the job: {str(e).strip().splitlines()[-1] if str(e).strip() else e}") from None
    append_event(ledger_path(run_dir), "job_submitted", job_id=str(job.job_id), nodes=m.cluster.nodes,
                 gpus=m.world_size, exclude=exclude, partition=m.cluster.partition, time_limit_min=minutes, why=why)
    return str(job.job_id)
