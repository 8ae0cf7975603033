"""Submission through submitit, and nothing else: one Slurm job (nodes x tasks, one GPU per task, the node's CPUs
shared among its tasks) whose function is `launcher.job.TrainJob(run_dir)`, the supervisor that runs in the batch
step and starts the training step; sized by launcher/policy.py and recorded in the ledger.

Called on the login node (`pixeldiff-launch run`) and from inside a job that resubmits the run
(launcher/job.py), which is why the job's own Slurm environment is scrubbed around sbatch.

Exactly one submission, whoever submits: every submitter holds the run directory's `submit.lock` (an
exclusive flock, taken atomically by the kernel or the network file system's lock manager) from
reading the ledger and squeue to writing `job_submitted`. A submitter killed between sbatch and
the ledger leaves `submission_started` without `job_submitted`: its job carries the token in its
Slurm comment, and the next submitter finds it in squeue and cancels it before submitting (it could
not run: see `recover_submissions`), so two jobs of the run are never queued at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
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


SUBMIT_LOCK_WAIT_S = 120.0  # longer than one squeue + sbatch, even on a slow controller


@contextlib.contextmanager
def submission_lock(run_dir: Path, wait_s: float = SUBMIT_LOCK_WAIT_S, poll_s: float = 0.1):
    """Hold `run_dir/submit.lock` (exclusive) for one plan -> submit -> record; SubmitError after `wait_s`."""
    path = Path(run_dir) / "submit.lock"
    f = open(path, "a+")
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.seek(0)
                    holder = f.read().strip() or "another process"
                    raise SubmitError(f"{path} is still held by {holder} after {wait_s:.0f} s: another "
                                      f"pixeldiff-launch is submitting this run; wait for it, then run again (a lock "
                                      f"of a host that died lasts until the file system's lease expires)") from None
                time.sleep(poll_s)
            except OSError as e:  # e.g. Lustre mounted without -o flock
                raise SubmitError(f"cannot lock {path} ({e.strerror}): the run directory's file system does not "
                                  f"support flock, so two submissions could not be told apart; use --runs-dir on "
                                  f"one that does (NFS, a local disk, Lustre mounted with -o flock)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def unrecorded_submissions(events: list[dict]) -> list[str]:
    """Tokens of submissions that started but recorded neither a job nor a failure (the submitter was killed)."""
    ends = ("job_submitted", "submission_failed", "submission_abandoned")
    done = {e.get("token") for e in events if e["event"] in ends}
    return [e["token"] for e in events if e["event"] == "submission_started" and e.get("token") not in done]


def recover_submissions(run_dir: Path, m: Manifest, events: list[dict], slurm=None) -> tuple[list[str], list[str]]:
    """Jobs a killed submitter left unrecorded, found in squeue by their comment (call it under `submission_lock`).
    Such a job cannot run: submitit moves its pickled function into the job's folder only after sbatch answered,
    so it would fail at its start. It is cancelled and recorded (`submission_abandoned`); one that already started
    a segment all the same is recorded as the run's job. -> (adopted ids, cancelled ids)."""
    tokens = unrecorded_submissions(events)
    if not tokens:
        return [], []
    from slurm.commands import Slurm, SlurmError

    slurm = slurm or Slurm(min_interval_s=0)
    by_comment = {c: j for j, c in slurm.comments(m.name).items()}
    started = {str(e.get("job_id")) for e in events if e["event"] == "segment_start"}
    adopted, cancelled = [], []
    for token in tokens:
        job_id = by_comment.get(f"pixeldiff:{token}")
        if job_id and job_id in started:
            append_event(ledger_path(run_dir), "job_submitted", job_id=job_id, token=token, nodes=m.cluster.nodes,
                         gpus=m.world_size, why="recorded late: its submitter was killed after sbatch")
            adopted.append(job_id)
        elif job_id:
            try:
                slurm.cancel(job_id)
            except SlurmError as e:  # it ended meanwhile
                print(f"pixeldiff: scancel {job_id} failed ({e})", flush=True)
            append_event(ledger_path(run_dir), "submission_abandoned", token=token, job_id=job_id,
                         reason="its submitter was killed between sbatch and the ledger; cancelled")
            cancelled.append(job_id)
        else:
            append_event(ledger_path(run_dir), "submission_abandoned", token=token,
                         reason="its submitter was killed; no job with its token is queued")
    return adopted, cancelled


def make_executor(m: Manifest, run_dir: Path, minutes: int, exclude: list[str], nodes: list | None = None,
                  comment: str | None = None, job_nodes: int | None = None, job_name: str | None = None):
    """submitit's executor for one job. The pickled function (launcher.job.TrainJob, the supervisor, or
    launcher.evaljob.EvalJob) runs once, in the batch step (use_srun=False); it starts its step with srun itself.
    `job_nodes`: fewer nodes than the run's (an evaluation takes one)."""
    import submitit

    c, jobs = m.cluster, plan_jobs(m)
    ex = submitit.SlurmExecutor(folder=str(Path(run_dir) / "jobs" / "%j"), max_num_timeout=jobs["max_timeouts"])
    setup = [SHELL_TRAP] + list(c.setup) + [f"export {k}={json.dumps(str(v))}" for k, v in c.env.items()]
    params = dict(
        job_name=job_name or m.name, nodes=job_nodes or c.nodes, ntasks_per_node=c.gpus_per_node,
        gpus_per_node=c.gpus_per_node,
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
    if comment:
        params["comment"] = comment
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
    """Submit one job for the run; record it in the ledger. -> the job id. The caller holds `submission_lock`."""
    run_dir = Path(run_dir)
    events = events_of(run_dir)
    minutes = time_limit_min(m, events, now or time.time())
    exclude = excluded_nodes(m, events)
    token = uuid.uuid4().hex[:16]
    ex = make_executor(m, run_dir, minutes, exclude, None if m.cluster.cpus_per_task else node_cpus(m),
                       comment=f"pixeldiff:{token}")
    from launcher.job import TrainJob  # here, not above: launcher.job imports this module to resubmit

    append_event(ledger_path(run_dir), "submission_started", token=token, why=why)
    try:
        with job_environment_scrubbed():
            job = ex.submit(TrainJob(str(run_dir.resolve())))
    except Exception as e:  # submitit wraps sbatch's failure; the message is sbatch's
        message = f"sbatch refused the job: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
        append_event(ledger_path(run_dir), "submission_failed", token=token, message=message)
        raise SubmitError(message) from None
    append_event(ledger_path(run_dir), "job_submitted", job_id=str(job.job_id), nodes=m.cluster.nodes,
                 gpus=m.world_size, exclude=exclude, partition=m.cluster.partition, time_limit_min=minutes, why=why,
                 token=token)
    return str(job.job_id)
