"""What runs inside a Slurm job: the supervisor (`TrainJob`, what submitit pickles; it runs once, in the batch step
on the first node) and the rank entry point (`python -m launcher.job RUN_DIR`, every task of the training step).

The supervisor reads the job's start and end from Slurm, starts the training step with
`srun --kill-on-bad-exit=1` (one dead task ends the whole step at once), waits for it, and then
decides: it reads the step's outcome (rank 0's end reason, the ranks' failure reports, srun's
`task N: Killed` lines), asks launcher/policy.py what comes next and carries it out (`act`):
requeue, resubmit excluding the node to blame, or stop. It outlives the training processes, so
the decision is made even when a rank (rank 0 included) is killed or NCCL aborts every rank.
Every decision is written to the ledger first, then acted on.

Signals: the job's `--signal=USR2@lead` and `scancel --signal=...` reach the step's tasks, not the
batch step; the trainer's handlers only set a flag and stop at a step boundary. A TERM to the
whole job (plain scancel, preemption) reaches the supervisor too: it notes it and keeps waiting
for srun (the batch shell traps it: launcher.submit.SHELL_TRAP).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from launcher.policy import Action, SubmitError, next_action, plan_jobs, since_last
from launcher.rundir import events_of, ledger_path
from launcher.submit import submission_lock, submit
from pixeldiff.config import ConfigError, Manifest, load_resolved
from pixeldiff.ledger import append_event

RESUBMIT_LOCK_WAIT_S = 600.0  # a `run` on the login node may hold the submission lock meanwhile
RANK_MODULE = "launcher.job"  # python -m launcher.job RUN_DIR: one rank of the training step


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


def failed_nodes(run_dir: Path, world: int, environ=os.environ, wait_s: float = 0.0, dead: tuple = ()
                 ) -> tuple[list[str], str, bool]:
    """After a failed step, in the supervisor: the nodes to blame, the first real error, and whether it is fatal
    (no retry). A rank that reported an error of its own is to blame; if none did, the first task srun saw die
    (`dead`: slurm.types.TaskEnd records, srun's order) that did not report a victim's error; failing that, a rank
    that reported nothing. An error of their own on every node blames none (the code or the manifest, not a node)."""
    d = failure_dir(run_dir, environ)
    deadline = time.time() + wait_s
    while True:
        reports = {}
        for f in d.glob("rank*.json"):
            r = json.loads(f.read_text())
            reports[r["rank"]] = r
        if len(reports) >= world or time.time() >= deadline:
            break
        time.sleep(0.5)
    nodes = rank_nodes(environ)
    fatal = [r for r in reports.values() if r.get("fatal")]
    if fatal:
        return [], fatal[0]["error"], True
    own = [r for r in reports.values() if not r["collective"]]
    for end in dead if not own else ():
        killed = [t for t in end.tasks if t not in reports]
        if killed:
            own = [{"rank": t, "node": end.node, "error": f"rank {t} on {end.node}: {end.what} (srun)"} for t in killed]
            break
    blamed = own or [{"rank": k, "node": nodes[k] if k < len(nodes) else "", "error": "the process died"}
                     for k in range(world) if k not in reports]
    names = sorted({r["node"] or (nodes[r["rank"]] if r["rank"] < len(nodes) else "") for r in blamed} - {""})
    first = own[0]["error"] if own else (f"rank(s) {', '.join(str(r['rank']) for r in blamed)} died" if blamed else
                                          next(iter(reports.values()), {}).get("error", "unknown error"))
    if len(set(nodes)) > 1 and set(names) >= set(nodes):
        names = []  # every node failed on its own: not a node's fault
    return names, first, False


def job_window(t: dict, now: float) -> tuple[float | None, float | None]:
    """(start, end) of the running job on this node's clock, from slurm.parse.job_times of `scontrol show job`
    read at `now`: Slurm's RunTime and TimeLimit are durations, so now - RunTime and that + TimeLimit hold even when
    this node's clock differs from the controller's; StartTime and EndTime (the controller's clock) otherwise."""
    if t.get("run_s") is not None and t.get("limit_s") is not None:
        start = now - t["run_s"]
        return start, start + t["limit_s"]
    return t.get("start"), t.get("end")


def slurm_times(job_id: str) -> tuple[float | None, float | None]:
    """(start, end) of the running job, from `scontrol show job` (None when Slurm does not say)."""
    from slurm.commands import Slurm, SlurmError
    from slurm.parse import job_times

    try:
        t = job_times(Slurm(min_interval_s=0).job(job_id))
    except SlurmError as e:
        print(f"pixeldiff: cannot read the job's end time from Slurm ({e}); relying on the USR2 signal", flush=True)
        return None, None
    return job_window(t, time.time())


def act(run_dir: Path, m: Manifest, action: Action, environ=os.environ) -> None:
    """The supervisor: write the decision to the ledger, then carry it out."""
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
        try:
            with submission_lock(run_dir, wait_s=RESUBMIT_LOCK_WAIT_S):  # the same lock as `run`: one submission
                if any(e["event"] == "cancel_requested" for e in since_last(events_of(run_dir), "job_submitted")):
                    append_event(led, "run_stopped", reason="cancelled by pixeldiff-launch cancel", kind="cancelled",
                                 job_id=job_id)
                    return
                if action.requeue_kind:
                    append_event(led, "requeue_requested", job_id=job_id, kind=action.requeue_kind, resubmit=True,
                                 restart=int(environ.get("SLURM_RESTART_COUNT", 0)))
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


def step_dir(run_dir: Path, what: str, environ=os.environ) -> Path:
    """jobs/<what>-JOB-RESTART/: per job run, what the ranks leave for the supervisor (pids, rank 0's end reason)."""
    return Path(run_dir) / "jobs" / f"{what}-{environ.get('SLURM_JOB_ID', 'local')}-{environ.get('SLURM_RESTART_COUNT', '0')}"


def write_json(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, path)


class EarlySignals:
    """A rank's start-up (imports, before the trainer installs its handlers): a USR2/TERM/INT then (a cancel, a
    preemption) is noted instead of killing the process, and sent again once the trainer's own handlers are in."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.seen: list[int] = []
        for s in self.SIGNALS:
            signal.signal(s, self._note)
        threading.Thread(target=self._hand_over, daemon=True).start()

    def _note(self, signum, frame):
        self.seen.append(signum)

    def _hand_over(self):
        while all(signal.getsignal(s) == self._note for s in self.SIGNALS):
            time.sleep(0.2)
        time.sleep(0.2)  # the trainer installs its handlers one after the other
        for s in dict.fromkeys(self.seen):
            os.kill(os.getpid(), s)


def rank_main(run_dir: Path, environ=os.environ) -> int:
    """One task of the training step: train, report. -> exit status (0: the trainer returned its end reason)."""
    from pixeldiff import distributed
    from pixeldiff.checkpoint import CheckpointError, StorageError
    from pixeldiff.shards import DataError
    from pixeldiff.train import OutOfMemory, RunLocked, run_job

    run_dir = Path(run_dir)
    rank = distributed.env_from(environ).rank
    node = environ.get("SLURMD_NODENAME", "")
    write_json(step_dir(run_dir, "ranks", environ) / f"rank{rank:05d}.json", {"rank": rank, "node": node, "pid": os.getpid()})
    bad = environ.get("PIXELDIFF_TEST_FAIL_NODES", "").split(",")  # test hook: ranks on these nodes fail at start-up
    try:
        if node in bad:
            raise RuntimeError(f"injected start-up failure on {node} (PIXELDIFF_TEST_FAIL_NODES)")
        # the trainer's flag-setting handlers stay to the end: a late signal must not cut its last writes short
        reason = run_job(run_dir, log=lambda s: print(s, flush=True), restore_signals=False)
    # another job would fail the same way; StorageError (disk full, S3 down past the retries) is the shared
    # storage's, not this node's: stop, blame no node, `run` resumes once it is fixed; so is a micro-batch that
    # does not fit in the GPU's memory (every node's GPUs are the same: a requeue would run out again)
    except (ConfigError, DataError, CheckpointError, StorageError, RunLocked, OutOfMemory) as e:
        report_failure(run_dir, rank, e, environ, fatal=True)
        print(f"pixeldiff: rank {rank}: {type(e).__name__}: {e}", flush=True)
        return 1
    except Exception as e:  # noqa: BLE001  (reported for the supervisor, with the traceback in this task's log)
        report_failure(run_dir, rank, e, environ)
        traceback.print_exc()
        return 1
    if rank == 0:
        write_json(step_dir(run_dir, "ranks", environ) / "end.json", {"reason": reason, "time": time.time()})
    return 0


def srun_command(m: Manifest, run_dir: Path, cpus_per_task: int, python: str = sys.executable) -> list[str]:
    """The training step: every task of the job, one GPU each, a dead task ends the step; output per task in
    submitit's folder (jobs/JOB/JOB_TASK_log.out, task 0 beside the supervisor's lines)."""
    c = m.cluster
    out = Path(run_dir) / "jobs" / "%j" / "%j_%t_log.out"
    argv = ["srun", "--kill-on-bad-exit=1", "--unbuffered", f"--nodes={c.nodes}", f"--ntasks={c.nodes * c.gpus_per_node}",
            f"--ntasks-per-node={c.gpus_per_node}", "--gpus-per-task=1", f"--output={out}", "--open-mode=append"]
    if cpus_per_task:
        argv.append(f"--cpus-per-task={cpus_per_task}")  # Slurm 22.05's srun does not take it from the job
    return argv + [python, "-u", "-m", RANK_MODULE, str(run_dir)]


def step_environment(m: Manifest, environ, start: float | None, end: float | None, cpus_per_task: int) -> dict:
    env = dict(environ)
    if end:
        env["PIXELDIFF_DEADLINE"] = str(end)
    if start:
        env["PIXELDIFF_JOB_START"] = str(start)
    if "OMP_NUM_THREADS" not in env:  # the CPUs the data workers and the pin-memory thread do not use
        env["OMP_NUM_THREADS"] = str(max(1, (cpus_per_task or 1) - m.data.workers - 1))
    return env


class NotedSignals:
    """The supervisor's handlers: a TERM/INT/USR2 that reaches it is noted, not obeyed (it must outlive srun)."""

    def __init__(self):
        self.seen: list[str] = []
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
            signal.signal(s, self._note)

    def _note(self, signum, frame):
        self.seen.append(signal.Signals(signum).name)
        print(f"pixeldiff: supervisor got {signal.Signals(signum).name}; waiting for the training step", flush=True)


def run_step(argv: list[str], env: dict) -> tuple[int, list[str]]:
    """Run srun; its own stderr lines are echoed to this log and returned (they name the tasks that died)."""
    print(f"pixeldiff: starting the training step: {' '.join(argv)}", flush=True)
    p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
    lines: list[str] = []

    def pump():
        for line in p.stderr:
            lines.append(line.rstrip("\n"))
            print(line, end="", flush=True)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    rc = p.wait()
    t.join(timeout=10)
    print(f"pixeldiff: the training step ended with exit status {rc}", flush=True)
    return rc, lines


def supervise(run_dir: Path, environ=os.environ) -> str:
    """The batch step: start the training step, wait for it, decide what comes next. -> the segment's end reason."""
    from slurm.parse import parse_srun_errors

    run_dir = Path(run_dir)
    m = load_resolved(run_dir / "manifest.yaml")
    noted = NotedSignals()
    wall0, mono0 = time.time(), time.monotonic()  # the job's bill counts by the monotonic clock (pixeldiff/budget.py)
    start, job_end = slurm_times(environ["SLURM_JOB_ID"])
    cpus = int(environ.get("SLURM_CPUS_PER_TASK", 0) or 0)
    rc, lines = run_step(srun_command(m, run_dir, cpus), step_environment(m, environ, start, job_end, cpus))
    # Slurm bills until the job ends, not until rank 0's segment_end: the tasks' exit and this decision count too
    elapsed = {"elapsed_s": round(max(0.0, wall0 - start) + time.monotonic() - mono0, 3)} if start else {}
    append_event(ledger_path(run_dir), "step_ended", job_id=environ.get("SLURM_JOB_ID", ""),
                 restart=int(environ.get("SLURM_RESTART_COUNT", 0)), exit_status=rc, **elapsed)
    end = step_dir(run_dir, "ranks", environ) / "end.json"
    jobs = plan_jobs(m)
    if end.exists():
        reason = json.loads(end.read_text())["reason"]
        if rc:
            print(f"pixeldiff: rank 0 ended the segment ({reason}) but the step's exit status is {rc}", flush=True)
        act(run_dir, m, next_action(m, events_of(run_dir), reason, time.time(), job_end, jobs["max_timeouts"],
                                    jobs["signal_lead_s"]), environ)
        return reason
    world = m.cluster.nodes * m.cluster.gpus_per_node
    nodes, first, fatal = failed_nodes(run_dir, world, {**environ, "SLURM_NTASKS": str(world)},
                                       dead=tuple(parse_srun_errors(lines)))
    if not first or first == "unknown error":
        first = f"the training step ended with exit status {rc} and no report" + (
            f" (the job got {', '.join(noted.seen)})" if noted.seen else "")
    if fatal:
        stop_failed_run(run_dir, first, environ)
        raise RuntimeError(first)
    events = events_of(run_dir)
    failures = 1 + sum(1 for ev in since_last(events, "checkpoint_saved") if ev["event"] == "job_failed")
    append_event(ledger_path(run_dir), "job_failed", job_id=environ.get("SLURM_JOB_ID", ""),
                 node=nodes[0] if nodes else None, nodes=nodes, message=first, failures=failures, exit_status=rc)
    close_own_segment(run_dir, f"failed: {first}", environ)
    action = next_action(m, events_of(run_dir), f"failed: {first}", time.time(), job_end, jobs["max_timeouts"],
                         jobs["signal_lead_s"], tuple(nodes))
    act(run_dir, m, action, environ)
    raise RuntimeError(f"the training step failed: {first}")


class TrainJob:
    """What submitit pickles and runs once per job, in the batch step: the supervisor. `checkpoint()` keeps it
    requeueable by submitit's own USR2 handler (only if a USR2 reaches the batch step before ours are installed)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def __call__(self) -> str:
        from pixeldiff.process import no_world_write

        no_world_write()
        sys.stdout.reconfigure(line_buffering=True)
        return supervise(Path(self.run_dir))

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.run_dir))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m launcher.job RUN_DIR  (one rank of a training step, started by the supervisor's srun)",
              file=sys.stderr)
        sys.exit(2)
    sys.stdout.reconfigure(line_buffering=True)
    EarlySignals()
    status = rank_main(Path(sys.argv[1]))
    from pixeldiff.process import leave

    leave(status)  # late TERMs ignored; a multi-rank task skips the interpreter's teardown (it has aborted there)
