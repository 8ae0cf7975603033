"""What the Slurm client returns: plain records, parsed from squeue/sacct/sinfo/scontrol text.

Times are Unix seconds (float) or None when Slurm reports Unknown/None; durations are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class QueueEntry:
    """One line of `squeue` for a job (pending or running)."""

    job_id: str
    state: str  # PENDING, RUNNING, COMPLETING, REQUEUED, ... (long form)
    nodes: int
    nodelist: list[str]  # expanded; empty while pending
    elapsed_s: float
    time_left_s: float | None  # None when unlimited or unknown
    reason: str  # squeue's %R: the pending reason or the node list


@dataclass(frozen=True)
class AcctRecord:
    """One run of a job from `sacct --duplicates --parsable2` (a requeued job has one record per run).
    Job steps (`123.batch`, `123.0`) are not records."""

    job_id: str
    state: str  # COMPLETED, TIMEOUT, PREEMPTED, REQUEUED, CANCELLED, FAILED, NODE_FAIL, RUNNING, PENDING, ...
    start: float | None
    end: float | None  # None while running
    elapsed_s: float
    alloc_gpus: int  # from AllocTRES gres/gpu=N (0 when none)
    nodelist: list[str]  # expanded
    exit_code: str  # "0:0"
    restarts: int | None = None  # when sacct reports it

    def billed_gpu_seconds(self, now: float | None = None) -> float:
        """GPUs x (end - start), as Slurm allocated it; a running record counts to `now`."""
        if self.start is None:
            return 0.0
        end = self.end if self.end is not None else now
        return self.alloc_gpus * max(0.0, (end if end is not None else self.start) - self.start)


@dataclass(frozen=True)
class NodeInfo:
    name: str
    state: str  # idle, alloc, mix, down, drain, ... (lower case, without flags like '*')
    cpus: int
    gpus: int
    reason: str = ""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TaskEnd:
    """One `srun: error: NODE: task(s) N: WHAT` line: tasks of a step that ended badly (the first line names the
    first to die; --kill-on-bad-exit then ends the others)."""

    node: str
    tasks: list[int]
    what: str  # "Killed", "Exited with exit code 1", "Terminated", ...
