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
from dataclasses import dataclass

from pixeldiff.config import BudgetConfig


def margin_s(step_s: float, checkpoint_s: float, safety_s: float = 30.0) -> float:
    return 2 * step_s + 1.5 * checkpoint_s + safety_s


def billed_gpu_seconds(events: list[dict], until: float | None = None) -> float:
    """GPU-seconds of the finished segments in a ledger: GPUs x (end - start); a segment without an
    end event is closed at its last heartbeat or event. The open segment (if `until`) counts to `until`."""
    total, start, gpus, last = 0.0, None, 0, None
    for e in events:
        if e["event"] == "segment_start":
            if start is not None:  # died without an end: closed at its last sign of life
                total += gpus * max(0.0, last - start)
            start, gpus, last = e["time"], e.get("gpus", 1), e["time"]
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

    @classmethod
    def from_run(cls, budget: BudgetConfig, events: list[dict], gpus: int, environ=os.environ) -> "Limits":
        starts = [e["time"] for e in events if e["event"] == "segment_start"]
        job_end = float(environ["PIXELDIFF_DEADLINE"]) if environ.get("PIXELDIFF_DEADLINE") else None
        wall_end = starts[0] + budget.wall_hours * 3600 if budget.wall_hours and starts else None
        cap = budget.usd / budget.gpu_hour_usd * 3600 if budget.usd and budget.gpu_hour_usd else None
        return cls(job_end, wall_end, cap, gpus)

    def check(self, now: float, billed_so_far: float, step_s: float, checkpoint_s: float) -> str | None:
        """-> 'deadline' (the job's end is near), 'budget' (a budget cap is near) or None."""
        m = margin_s(step_s, checkpoint_s)
        if self.wall_end is not None and now + m >= self.wall_end:
            return "budget"
        if self.gpu_seconds_cap is not None and billed_so_far + self.gpus * m >= self.gpu_seconds_cap:
            return "budget"
        if self.job_end is not None and now + m >= self.job_end:
            return "deadline"
        return None
