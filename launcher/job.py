"""What runs inside a Slurm job, on every task: the rank entry point that submitit pickles (`TrainJob`), and rank 0's
decision after the training step ends.

`TrainJob` reads the job's start and end from Slurm (rank 0), runs the trainer, and rank 0 then
asks launcher/policy.py what comes next and carries it out (`act`): requeue, resubmit, or stop.
A rank that fails writes a failure report; rank 0 reads them all to blame a node or none.
Every decision is written to the ledger first, then acted on.

The trainer's own signal handlers (USR2, TERM, INT only set a flag; pixeldiff.train) replace
submitit's while it trains; submitit's handler, which calls `TrainJob.checkpoint()` and
requeues, covers only the seconds of start-up before them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from launcher.policy import Action, SubmitError, next_action, plan_jobs, since_last
from launcher.rundir import events_of, ledger_path
from launcher.submit import submit
from pixeldiff.config import ConfigError, Manifest, load_resolved
from pixeldiff.ledger import append_event

FAILURE_WAIT_S = 15.0  # how long rank 0 waits for the other ranks' failure reports


COLLECTIVE_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "broken pipe",
                    "by peer", "process group", "tcpstore")


def is_collective_error(e: BaseException) -> bool:
    """An error that says another rank went away (its victims), not one that happened here."""
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None)) if k)
    text = str(e).lower()
    return isinstance(e, kinds) or any(w in text for w in COLLECTIVE_WORDS)


def rank_nodes(environ=os.environ) -> list[str]:
    """Node of each rank, with Slurm's default block distribution."""
    from slurm.nodelist import expand

    nodes = expand(environ.get("SLURM_JOB_NODELIST", ""))
    ntasks = int(environ.get("SLURM_NTASKS", 1))
    per = max(1, ntasks // max(1, len(nodes)))
    return [nodes[min(r // per, len(nodes) - 1)] if nodes else "" for r in range(ntasks)]


def failure_dir(run_dir: Path, environ=os.environ) -> Path:
    return Path(run_dir) / "jobs" / f"failures-{environ.get('SLURM_JOB_ID', 'local')}-{environ.get('SLURM_RESTART_COUNT', '0')}"


def report_failure(run_dir: Path, rank: int, e: BaseException, environ=os.environ, fatal: bool = False) -> None:
    """`fatal`: an error another job would hit the same way (the manifest, the data): stop, blame no node."""
    d = failure_dir(run_dir, environ)
    d.mkdir(parents=True, exist_ok=True)
    rec = {"rank": rank, "node": environ.get("SLURMD_NODENAME", ""), "error": f"{type(e).__name__}: {e}"[:500],
           "collective": is_collective_error(e), "fatal": fatal, "time": time.time()}
    tmp = d / f".rank{rank:05d}.tmp"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, d / f"rank{rank:05d}.json")


def failed_nodes(run_dir: Path, world: int, environ=os.environ, wait_s: float = FAILURE_WAIT_S
                 ) -> tuple[list[str], str, bool]:
    """After a failure, on rank 0: the nodes to blame, the first real error, and whether it is fatal (no retry).
    A rank that reported an error of its own is to blame; if none did, a rank that reported nothing (killed) is.
    An error of their own on every node blames none (the code or the manifest, not a node)."""
    d = failure_dir(run_dir, environ)
    deadline = time.time() + wait_s
    reports = {}
    while time.time() < deadline:
        reports = {}
        for f in d.glob("rank*.json"):
            r = json.loads(f.read_text())
            reports[r["rank"]] = r
        if len(reports) >= world:
            break
        time.sleep(0.5)
    nodes = rank_nodes(environ)
    fatal = [r for r in reports.values() if r.get("fatal")]
    if fatal:
        return [], fatal[0]["error"], True
    own = [r for r in reports.values() if not r["collective"]]
    blamed = own or [{"rank": k, "node": nodes[k] if k < len(nodes) else "", "error": "the process died"}
                     for k in range(world) if k not in reports]
    names = sorted({r["node"] or (nodes[r["rank"]] if r["rank"] < len(nodes) else "") for r in blamed} - {""})
    first = own[0]["error"] if own else (f"rank(s) {', '.join(str(r['rank']) for r in blamed)} died" if blamed else
                                          next(iter(reports.values()), {}).get("error", "unknown error"))
    if len(set(nodes)) > 1 and set(names) >= set(nodes):
        names = []  # every node failed on its own: not a node's fault
    return names, first, False


def slurm_times(job_id: str) -> tuple[float | None, float | None]:
    """(start, end) of the running job, from `scontrol show job` (None when Slurm does not say)."""
    from slurm.commands import Slurm, SlurmError
    from slurm.parse import job_times

    try:
        t = job_times(Slurm(min_interval_s=0).job(job_id))
    except SlurmError as e:
        print(f"pixeldiff: cannot read the job's end time from Slurm ({e}); relying on the USR2 signal", flush=True)
        return None, None
    return t["start"], t["end"]


def act(run_dir: Path, m: Manifest, action: Action, environ=os.environ) -> None:
    """Rank 0: write the decision to the ledger, then carry it out."""
    led = ledger_path(run_dir)
    job_id = environ.get("SLURM_JOB_ID", "")
    for node in action.exclude:
        append_event(led, "node_excluded", node=node, job_id=job_id, reason=action.message)
    if action.kind == "stop":
        append_event(led, "run_stopped", reason=action.message, kind=action.stop_kind, job_id=job_id)
    elif action.kind == "requeue":
        append_event(led, "requeue_requested", job_id=job_id, kind=action.requeue_kind,
                     restart=int(environ.get("SLURM_RESTART_COUNT", 0)))
        from slurm.commands import Slurm, SlurmError

        try:
            Slurm(min_interval_s=0).requeue(job_id)
        except SlurmError as e:  # e.g. the job cannot be requeued any more: a fresh job instead
            print(f"pixeldiff: requeue failed ({e}); submitting a new job", flush=True)
            act(run_dir, m, Action("resubmit", f"requeue failed: {e}"), environ)
            return
    elif action.kind == "resubmit":
        if any(e["event"] == "cancel_requested" for e in since_last(events_of(run_dir), "job_submitted")):
            append_event(led, "run_stopped", reason="cancelled by pixeldiff-launch cancel", kind="cancelled",
                         job_id=job_id)
            return
        if action.requeue_kind:
            append_event(led, "requeue_requested", job_id=job_id, kind=action.requeue_kind, resubmit=True,
                         restart=int(environ.get("SLURM_RESTART_COUNT", 0)))
        try:
            new = submit(run_dir, m, why=action.message)
        except SubmitError as e:
            append_event(led, "run_stopped", reason=str(e), kind="budget" if "budget" in str(e) else "failed",
                         job_id=job_id)
            return
        print(f"pixeldiff: submitted job {new} to continue the run", flush=True)
    if action.message:
        print(f"pixeldiff: {action.message}", flush=True)


def close_own_segment(run_dir: Path, reason: str, environ=os.environ) -> None:
    """segment_end for this job run's segment, if it started one and the trainer did not end it (never another's)."""
    events = events_of(run_dir)
    tail = since_last(events, "segment_end")
    mine = [e for e in tail if e["event"] == "segment_start" and str(e.get("job_id")) == environ.get("SLURM_JOB_ID")
            and int(e.get("restart", 0)) == int(environ.get("SLURM_RESTART_COUNT", 0))]
    if mine:
        append_event(ledger_path(run_dir), "segment_end", reason=reason, job_id=environ.get("SLURM_JOB_ID", ""))


def stop_failed_run(run_dir: Path, message: str, environ=os.environ) -> None:
    close_own_segment(run_dir, f"failed: {message}", environ)
    append_event(ledger_path(run_dir), "run_stopped", reason=f"not retried: {message}", kind="failed",
                 job_id=environ.get("SLURM_JOB_ID", ""))
    print(f"pixeldiff: {message}; not retried (another job would fail the same way)", flush=True)


def job_main(run_dir: Path, environ=os.environ) -> str:
    """Every task of a Slurm job: train, then (rank 0) decide what comes next."""
    from pixeldiff import distributed
    from pixeldiff.checkpoint import CheckpointError
    from pixeldiff.shards import DataError
    from pixeldiff.train import RunLocked, run_job

    run_dir = Path(run_dir)
    env = distributed.env_from(environ)
    m = load_resolved(run_dir / "manifest.yaml")
    job_end = None
    if env.rank == 0 and environ.get("SLURM_JOB_ID"):
        start, job_end = slurm_times(environ["SLURM_JOB_ID"])
        if job_end:
            os.environ["PIXELDIFF_DEADLINE"] = str(job_end)
        if start:
            os.environ["PIXELDIFF_JOB_START"] = str(start)
    bad = environ.get("PIXELDIFF_TEST_FAIL_NODES", "").split(",")  # test hook: ranks on these nodes fail at start-up
    try:
        if environ.get("SLURMD_NODENAME") in bad:
            raise RuntimeError(f"injected start-up failure on {environ['SLURMD_NODENAME']} (PIXELDIFF_TEST_FAIL_NODES)")
        # the trainer's flag-setting handlers stay to the end: a late TERM (the requeue's kill) must not cut `act` short
        reason = run_job(run_dir, log=lambda s: print(s, flush=True), restore_signals=False)
    except KeyboardInterrupt:
        raise
    except (ConfigError, DataError, CheckpointError, RunLocked) as e:  # another job would fail the same way
        report_failure(run_dir, env.rank, e, environ, fatal=True)
        if env.rank == 0:
            stop_failed_run(run_dir, f"{type(e).__name__}: {e}", environ)
        raise
    except Exception as e:
        report_failure(run_dir, env.rank, e, environ)
        if env.rank == 0:
            nodes, first, fatal = failed_nodes(run_dir, env.world_size, environ)
            if fatal:
                stop_failed_run(run_dir, first, environ)
                raise
            led = ledger_path(run_dir)
            events = events_of(run_dir)
            failures = 1 + sum(1 for ev in since_last(events, "checkpoint_saved") if ev["event"] == "job_failed")
            append_event(led, "job_failed", job_id=environ.get("SLURM_JOB_ID", ""), node=nodes[0] if nodes else None,
                         nodes=nodes, message=first, failures=failures)
            close_own_segment(run_dir, f"failed: {first}", environ)
            jobs = plan_jobs(m)
            action = next_action(m, events, f"failed: {first}", time.time(), job_end, jobs["max_timeouts"],
                                 jobs["signal_lead_s"], tuple(nodes))
            act(run_dir, m, action, environ)
        raise
    if env.rank == 0 and environ.get("SLURM_JOB_ID"):
        jobs = plan_jobs(m)
        action = next_action(m, events_of(run_dir), reason, time.time(), job_end, jobs["max_timeouts"],
                             jobs["signal_lead_s"])
        act(run_dir, m, action, environ)
    return reason


class TrainJob:
    """What submitit pickles and runs on every task. `checkpoint()` makes it requeueable by submitit."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def __call__(self) -> str:
        sys.stdout.reconfigure(line_buffering=True)
        return job_main(Path(self.run_dir))

    def checkpoint(self, *args, **kwargs):
        # submitit calls this from its USR2 handler (only before the trainer installs its own): the run directory
        # holds everything, so the requeued job is the same job
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.run_dir))
