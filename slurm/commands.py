"""The one place that runs Slurm commands: batched (one squeue/sacct call for all jobs), rate-limited, with timeouts.

    slurm = Slurm()                              # uses $SLURM_CONF like any Slurm client
    slurm.queue(["12", "13"])                    # {"12": QueueEntry(...)}; finished jobs are absent
    slurm.accounting(["12"])                     # [AcctRecord(...), ...] one per run (requeues included)
    slurm.nodes(); slurm.job("12"); slurm.cancel("12", signal="USR2"); slurm.requeue("12")

queue() and accounting() results are cached: Slurm is asked at most once per `min_interval_s` for the same
job ids (a dashboard polling every second must not hammer slurmctld). Every failure raises SlurmError
saying which command failed, why, and what to check.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Callable, Iterable

from slurm.parse import parse_sacct, parse_scontrol_record, parse_sinfo, parse_squeue
from slurm.types import AcctRecord, NodeInfo, QueueEntry

# The formats are ours, so the parsers know exactly what they get. %R (reason) comes last: it may hold anything.
SQUEUE_FORMAT = "%i|%T|%D|%M|%L|%N|%R"
SACCT_FIELDS = ("JobID", "JobName", "State", "Submit", "Start", "End", "ElapsedRaw", "TimelimitRaw", "AllocTRES",
                "NNodes", "NodeList", "ExitCode")
SINFO_FORMAT = "%N|%t|%c|%G|%E"
# squeue states of a job that has ended (man squeue, JOB STATE CODES); a requeued job leaves them for PENDING
FINISHED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                             "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT"})


class SlurmError(Exception):
    """A Slurm command failed, timed out or is missing; the message says which, why, and what to check."""


class Slurm:
    def __init__(self, min_interval_s: float = 10.0, timeout_s: float = 20.0, env: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.min_interval_s = min_interval_s
        self.timeout_s = timeout_s
        self.env = env  # extra variables for every command (e.g. {"SLURM_CONF": ...}); None: os.environ only
        self.clock = clock
        self._cache: dict[tuple, tuple[float, object]] = {}
        self.calls = 0  # commands actually run (tests check the rate limit with it)

    # ------------------------------------------------------------ queries

    def queue(self, job_ids: Iterable[str], include_finished: bool = False) -> dict[str, QueueEntry]:
        """The jobs still in the queue (pending, running, completing, requeued, ...), by id; a finished job is
        absent. ONE squeue call for all ids. `include_finished=True` also returns jobs that ended within
        slurmctld's MinJobAge, with their final state (COMPLETED, TIMEOUT, ...)."""
        ids = _ids(job_ids)
        if not ids:
            return {}

        def ask() -> dict[str, QueueEntry]:
            # with --jobs, squeue lists finished jobs too (for MinJobAge seconds): all of them, filtered below
            r = self.run(["squeue", "--noheader", f"--format={SQUEUE_FORMAT}", "--jobs", ",".join(ids)],
                         ok_error="Invalid job id specified")
            return {e.job_id: e for e in parse_squeue(r)}

        entries = self._cached(("queue", ids), ask)
        return entries if include_finished else {k: e for k, e in entries.items() if e.state not in FINISHED_STATES}

    def accounting(self, job_ids: Iterable[str]) -> list[AcctRecord]:
        """Every run of each job from sacct (--duplicates: a requeued job has one record per run), job steps
        left out. ONE sacct call. [] when the cluster has no accounting storage."""
        ids = _ids(job_ids)
        if not ids:
            return []

        def ask() -> list[AcctRecord]:
            try:
                out = self.run(["sacct", "--parsable2", "--noheader", "--duplicates", "--allocations",
                                f"--format={','.join(SACCT_FIELDS)}", "--jobs", ",".join(ids)])
            except SlurmError as e:
                if "accounting storage is disabled" in str(e).lower():
                    return []
                raise
            return parse_sacct(out, SACCT_FIELDS)

        return self._cached(("accounting", ids), ask)

    def comments(self, job_name: str) -> dict[str, str]:
        """The queued or running jobs named `job_name` (any user's), by id -> their --comment. ONE squeue call."""
        out = self.run(["squeue", "--noheader", "--format=%i|%k", "--name", job_name])
        return dict(line.strip().split("|", 1) for line in out.splitlines() if "|" in line)

    def nodes(self, partition: str | None = None) -> list[NodeInfo]:
        """Every node (of `partition`, when given) with its state, CPUs and GPUs, from sinfo."""
        where = ["--partition", partition] if partition else []
        return parse_sinfo(self.run(["sinfo", "--noheader", "--Node", *where, f"--format={SINFO_FORMAT}"]))

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (EndTime, RunTime, TimeLimit, NodeList, Reason, ...)."""
        return parse_scontrol_record(self.run(["scontrol", "show", "job", str(job_id)]))

    # ------------------------------------------------------------ actions

    def cancel(self, job_id: str, signal: str | None = None, full: bool = False) -> None:
        """Cancel the job, or with `signal` (e.g. "USR2") only send it: to every task of every step on every node
        (what submitit's handlers catch). `full=True` signals the batch script's shell too; bash dies of an
        untrapped USR2, which ends the job, so leave it False unless the batch script traps the signal."""
        argv = ["scancel"]
        if signal:
            argv.append(f"--signal={signal}")
        if full:
            argv.append("--full")
        self.run([*argv, str(job_id)])
        self._cache.clear()

    def requeue(self, job_id: str) -> None:
        self.run(["scontrol", "requeue", str(job_id)])
        self._cache.clear()

    # ------------------------------------------------------------ running

    def run(self, argv: list[str], ok_error: str | None = None) -> str:
        """Run one Slurm command; -> stdout. SlurmError when it is missing, times out or fails
        (a failure whose stderr contains `ok_error` returns "" instead)."""
        env = {**os.environ, **(self.env or {})}
        where = f"SLURM_CONF={env.get('SLURM_CONF', '(unset: the default /etc/slurm/slurm.conf)')}"
        self.calls += 1
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s, env=env,
                               stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise SlurmError(f"{argv[0]} not found on PATH: is this a Slurm login node? "
                             f"(install the Slurm client, e.g. `apt-get install slurm-client`)") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{argv[0]} did not answer within {self.timeout_s:g} s: is slurmctld running "
                             f"and reachable? ({where})") from None
        if r.returncode != 0:
            err = (r.stderr or r.stdout).strip()
            if ok_error and ok_error in err:
                return ""
            raise SlurmError(f"{' '.join(argv[:3])}... failed with exit status {r.returncode}: "
                             f"{err or '(no output)'} ({where})")
        return r.stdout

    def _cached(self, key: tuple, ask: Callable[[], object]):
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.min_interval_s:
            return hit[1]
        value = ask()
        self._cache[key] = (now, value)
        return value


def _ids(job_ids: Iterable[str]) -> tuple[str, ...]:
    if isinstance(job_ids, (str, int)):
        job_ids = [job_ids]
    return tuple(sorted({str(j) for j in job_ids}))
