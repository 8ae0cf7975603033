"""When must this job stop on its own? The job's deadline and the budget's, with a measured margin.

Two limits:
- the job's end: `PIXELDIFF_DEADLINE` (Unix time; the launcher sets it from the Slurm job's
  end time), so the job saves and exits before Slurm kills it;
- the budget: the wall-clock cap counts from the run's first segment start, the dollar cap
  converts to GPU-seconds (`usd / gpu_hour_usd * 3600`) and counts every segment's billed
  GPU-seconds (GPUs x (end - start), from the ledger) plus this one's so far.

The stop comes `margin` seconds early: room for two more steps, the final checkpoint (1.5x
the slowest save measured so far, or an estimate before the first), and a fixed safety.
Everything here is a pure function of the times it is given, so tests use a fake clock.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from pixeldiff.config import BudgetConfig


LAST_JOB_S = 90.0  # a job ending this close to the budget's end is the run's last
MIN_JOB_S = 300.0  # no job is started for less than this (or its whole time limit, if shorter)


def next_job_possible(seconds_left: float, job_s: float) -> bool:
    """Is `seconds_left` of budget worth another job of `job_s` seconds (start-up, a checkpoint, some steps)?"""
    return seconds_left >= min(MIN_JOB_S, job_s)


# what a job's trainer writes while it lives (the signs of life that close a segment that died without an end)
SEGMENT_EVENTS = ("segment_start", "heartbeat", "checkpoint_saved", "stage_change", "schedule_change", "warning",
                  "budget_stop", "segment_end")


def margin_s(step_s: float, checkpoint_s: float, safety_s: float = 30.0) -> float:
    return 2 * step_s + 1.5 * checkpoint_s + safety_s


def billed_gpu_seconds(events: list[dict], until: float | None = None) -> float:
    """GPU-seconds of the finished segments in a ledger: GPUs x (end - start); a segment without an
    end event is closed at its last heartbeat or event. The open segment (if `until`) counts to `until`."""
    total, start, gpus, last = 0.0, None, 0, None
    for e in events:
        if e["event"] not in SEGMENT_EVENTS:  # the launcher's events say nothing of a job that may be long dead
            continue
        if e["event"] == "segment_start":
            if start is not None:  # died without an end: closed at its last sign of life
                total += gpus * max(0.0, last - start)
            # a Slurm job's segment starts when Slurm allocated it (job_start), before the trainer's start-up
            start, gpus, last = e.get("job_start", e["time"]), e.get("gpus", 1), e["time"]
        elif start is not None:
            last = e["time"]
            if e["event"] == "segment_end":
                total += gpus * max(0.0, last - start)
                start = None
    if start is not None:
        total += gpus * max(0.0, (until if until is not None else last) - start)
    return total


@dataclass
class Limits:
    job_end: float | None  # Unix time the job is killed
    wall_end: float | None  # Unix time the wall-clock budget ends
    gpu_seconds_cap: float | None  # dollar budget in GPU-seconds
    gpus: int = 1
    next_job_s: float | None = None  # a following job's time limit (Slurm runs); None: no following job to fund

    @classmethod
    def from_run(cls, budget: BudgetConfig, events: list[dict], gpus: int, environ=os.environ,
                 now: float | None = None) -> "Limits":
        """`events`: the ledger before this segment; the wall clock counts from the first segment's start (this one's,
        `now`, for the run's first)."""
        starts = [e.get("job_start", e["time"]) for e in events if e["event"] == "segment_start"]
        job_end = float(environ["PIXELDIFF_DEADLINE"]) if environ.get("PIXELDIFF_DEADLINE") else None
        first = starts[0] if starts else (now if now is not None else time.time())
        wall_end = first + budget.wall_hours * 3600 if budget.wall_hours else None
        cap = budget.usd / budget.gpu_hour_usd * 3600 if budget.usd and budget.gpu_hour_usd else None
        return cls(job_end, wall_end, cap, gpus)

    def budget_end(self, now: float, billed_so_far: float) -> float | None:
        """The moment the first budget cap is reached at the current spending rate (None: no cap)."""
        ends = [t for t in (self.wall_end,) if t is not None]
        if self.gpu_seconds_cap is not None:
            ends.append(now + (self.gpu_seconds_cap - billed_so_far) / max(1, self.gpus))
        return min(ends) if ends else None

    def check(self, now: float, billed_so_far: float, step_s: float, checkpoint_s: float) -> str | None:
        """-> 'deadline' (the job's end is near), 'budget' (a budget cap is near) or None.

        A job whose time limit was cut to the budget (the launcher rounds it down to whole minutes) ends less
        than `LAST_JOB_S` before the budget does, or leaves less than another job needs (`next_job_possible`): its
        deadline is the budget's, and says so."""
        m = margin_s(step_s, checkpoint_s)
        budget_end = self.budget_end(now, billed_so_far)
        if budget_end is not None and now + m >= budget_end:
            return "budget"
        if self.job_end is not None and now + m >= self.job_end:
            left_after = budget_end - self.job_end if budget_end is not None else None
            last_job = left_after is not None and (left_after < LAST_JOB_S or (
                self.next_job_s is not None and not next_job_possible(left_after, self.next_job_s)))
            return "budget" if last_job else "deadline"
        return None
