"""The job's clock: when this job must stop on its own, whether another job is affordable, and the
`finish_stages` re-split of the remaining stages; and the billing rules the launcher uses too.

Two limits:
- the job's end: `PIXELDIFF_DEADLINE` (Unix time; the launcher sets it from the Slurm job's
  end time), so the job saves and exits before Slurm kills it;
- the budget: the wall-clock cap counts from the run's first segment start, the dollar cap
  converts to GPU-seconds and counts every segment's billed GPU-seconds plus this one's so far
  (the rules are `pixeldiff.billing`'s, which the launcher uses too).

The stop comes `margin` seconds early: room for two more steps, the final checkpoint (1.5x
the slowest save measured so far, or an estimate before the first), and a fixed safety.
Everything here is a pure function of the times it is given, so tests use a fake clock; `JobClock`
holds one job's measured step and save times and asks these functions. Torch-free: the login node
imports it.

Which clock. The limits are wall-clock times (Slurm's end time is one; the wall-clock budget spans
jobs, nodes and reboots, which no monotonic clock does), but inside a job every decision measures a
duration: `JobClock` reads the wall clock once, at its start, and from then on counts with the
monotonic clock (`JobClock.now`). A wall clock stepped mid-job (NTP, an operator) then moves neither
the job's stop nor its bill: Slurm's own limit is a duration since the allocation too. The bill's
start-up part (Slurm's allocation start to the trainer's start) is the one wall-clock difference,
taken at that single reading and never negative. The ledger's `segment_end`, `heartbeat` and the
supervisor's `step_ended` carry `elapsed_s` (monotonic seconds since the allocation), which billing
prefers over the difference of wall timestamps.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from pixeldiff.billing import billed_gpu_seconds, gpu_seconds_cap, run_started, trainer_stage_rates
from pixeldiff.config import BudgetConfig, Manifest
from pixeldiff.schedule import resplit, schedule_seconds


LAST_JOB_S = 90.0  # a job ending this close to the budget's end is the run's last
MIN_JOB_S = 300.0  # no job is started for less than this (or its whole time limit, if shorter)


def next_job_possible(seconds_left: float, job_s: float) -> bool:
    """Is `seconds_left` of budget worth another job of `job_s` seconds (start-up, a checkpoint, some steps)?"""
    return seconds_left >= min(MIN_JOB_S, job_s)


def margin_s(step_s: float, checkpoint_s: float, samples_s: float = 0.0, safety_s: float = 30.0) -> float:
    """How early to stop: two more steps, the final checkpoint (1.5x the slowest save), the final sample grid (1.5x
    its measured time) and a fixed safety."""
    return 2 * step_s + 1.5 * checkpoint_s + 1.5 * samples_s + safety_s


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
        job_end = float(environ["PIXELDIFF_DEADLINE"]) if environ.get("PIXELDIFF_DEADLINE") else None
        first = run_started(events)
        first = first if first is not None else (now if now is not None else time.time())
        wall_end = first + budget.wall_hours * 3600 if budget.wall_hours else None
        cap = gpu_seconds_cap(budget)
        return cls(job_end, wall_end, cap, gpus)

    def budget_end(self, now: float, billed_so_far: float) -> float | None:
        """The moment the first budget cap is reached at the current spending rate (None: no cap)."""
        ends = [t for t in (self.wall_end,) if t is not None]
        if self.gpu_seconds_cap is not None:
            ends.append(now + (self.gpu_seconds_cap - billed_so_far) / max(1, self.gpus))
        return min(ends) if ends else None

    def check(self, now: float, billed_so_far: float, step_s: float, checkpoint_s: float,
              samples_s: float = 0.0) -> str | None:
        """-> 'deadline' (the job's end is near), 'budget' (a budget cap is near) or None.

        A job whose time limit was cut to the budget (the launcher rounds it down to whole minutes) ends less
        than `LAST_JOB_S` before the budget does, or leaves less than another job needs (`next_job_possible`): its
        deadline is the budget's, and says so."""
        m = margin_s(step_s, checkpoint_s, samples_s)
        budget_end = self.budget_end(now, billed_so_far)
        if budget_end is not None and now + m >= budget_end:
            return "budget"
        if self.job_end is not None and now + m >= self.job_end:
            left_after = budget_end - self.job_end if budget_end is not None else None
            last_job = left_after is not None and (left_after < LAST_JOB_S or (
                self.next_job_s is not None and not next_job_possible(left_after, self.next_job_s)))
            return "budget" if last_job else "deadline"
        return None


class JobClock:
    """One job's view of time and money: when it started (billing counts from Slurm's allocation), what earlier
    jobs were billed, and its measured step and save times, which size the stop margin.

    `past` is the ledger before this job's `segment_start`; `metrics` the run's metrics records so far."""

    def __init__(self, m: Manifest, past: list[dict], metrics: list[dict], gpus: int, start: float,
                 under_slurm: bool, environ=os.environ, wall=time.time, monotonic=time.monotonic):
        self.m, self.gpus, self.start, self.metrics = m, gpus, start, metrics
        self._monotonic = monotonic
        self._wall0, self._mono0 = wall(), monotonic()  # the one wall-clock reading of the job
        self.startup_s = max(0.0, self._wall0 - start)  # Slurm's allocation to now, billed too
        self.limits = Limits.from_run(m.budget, past, gpus=gpus, environ=environ, now=start)
        self.job_s = m.cluster.max_job_hours * 3600
        if under_slurm:  # another job follows this one only if the budget can pay for it
            self.limits.next_job_s = self.job_s
        self.billed_before = billed_gpu_seconds(past)
        self.step_s, self.checkpoint_s = 0.0, 10.0  # 10 s until a save is measured
        self.samples_s = max([e.get("seconds", 0.0) for e in past if e["event"] == "samples_written"][-5:], default=0.0)
        self.eval_s = max([e.get("seconds", 0.0) for e in past if e["event"] == "evaluated"][-5:], default=0.0)
        self._measured_save = False
        # start the margin from what earlier jobs measured, not from nothing: a job that starts with a few seconds
        # of budget left must see that it has none
        saves = [e.get("seconds_write", e.get("seconds_blocked", 0.0)) for e in past if e["event"] == "checkpoint_saved"]
        if saves:
            self.checkpoint_s, self._measured_save = max(saves[-5:]), True
        recent = [r["step_time"] for r in metrics[-5:] if r.get("step_time")]
        if recent:
            self.step_s = sum(recent) / len(recent)

    def now(self) -> float:
        """The wall time as this job counts it: its one wall reading plus the monotonic seconds since."""
        return self._wall0 + (self._monotonic() - self._mono0)

    def elapsed(self, now: float | None = None) -> float:
        """Seconds since Slurm's allocation (or the trainer's start): what this job is billed for so far."""
        if now is None:
            return self.startup_s + (self._monotonic() - self._mono0)
        return max(0.0, now - self.start)

    def observe_step(self, seconds: float) -> None:
        self.step_s = seconds if not self.step_s else 0.9 * self.step_s + 0.1 * seconds

    def observe_samples(self, seconds: float) -> None:
        """A sample grid's time: the final one must fit in the margin too."""
        self.samples_s = max(self.samples_s, seconds)

    def observe_eval(self, seconds: float) -> None:
        """An evaluation's time: one may come right before the stop (a stage's end), so the margin holds it too."""
        self.eval_s = max(self.eval_s, seconds)

    def observe_save(self, write_s: float) -> None:
        """A finished save's write time (a final save is synchronous: it takes the whole write time)."""
        self.checkpoint_s = max(self.checkpoint_s if self._measured_save else 0.0, write_s)
        self._measured_save = True

    def billed(self, now: float | None = None) -> float:
        return self.billed_before + self.gpus * self.elapsed(now)

    def stop_reason(self, now: float | None = None) -> str | None:
        """'deadline' or 'budget' when the job's end or the budget is within the margin, else None."""
        t = self.now() if now is None else now
        return self.limits.check(t, self.billed(now), self.step_s, self.checkpoint_s,
                                 (self.samples_s or self.samples_estimate()) + self.eval_s)

    def samples_estimate(self) -> float:
        """The final grid's time before one was measured: its forward passes (steps, x2 with guidance) over this
        rank's share of the images, at a third of a training step per sample of the last stage's batch."""
        lg, last = self.m.logging, self.m.stages[-1]
        images = -(-len(lg.sample_prompts) * 4 // self.gpus)
        passes = lg.sample_steps * (1 if lg.sample_cfg == 1.0 else 2)
        return passes * images * self.step_s / (3 * max(1, last.global_batch // self.gpus))

    def next_job_affordable(self, now: float | None = None) -> bool:
        t = self.now() if now is None else now
        budget_end = self.limits.budget_end(t, self.billed(now))
        return budget_end is None or next_job_possible(budget_end - t, self.job_s)

    def seconds_left(self, now: float, budget_end: float) -> float:
        """Training seconds before the budget ends: less this job's start-up (as measured) for each job still to
        come, and the stop margin."""
        per_job = max(0.0, now - self.start) + margin_s(0.0, self.checkpoint_s, self.samples_s)
        left = budget_end - now
        job_s = self.job_s if self.m.cluster.backend == "slurm" else left
        jobs = max(1, math.ceil(left / max(job_s, 1.0)))
        return left - jobs * per_job

    def projection(self, ends: tuple[int, ...], step: int, now: float | None = None) -> tuple[float, float] | None:
        """(training seconds the schedule still needs at the measured speed, training seconds the budget has left);
        None without a cap or a known speed for every remaining stage."""
        t = self.now() if now is None else now
        budget_end = self.limits.budget_end(t, self.billed(now))
        if budget_end is None:
            return None
        need = schedule_seconds(ends, step, [s.global_batch for s in self.m.stages],
                                trainer_stage_rates(self.metrics, self.m.stages, self.gpus), self.gpus)
        return None if need is None else (need, self.seconds_left(t, budget_end))

    def resplit(self, ends: tuple[int, ...], step: int, now: float | None = None,
                extend: bool = False) -> tuple[int, ...] | None:
        """budget.policy finish_stages (and extend_last_stage, which also lengthens the last stage of a schedule that
        would end far inside the budget): the stage ends that fit what the budget has left, from the measured
        speed (None: no cap)."""
        t = self.now() if now is None else now
        budget_end = self.limits.budget_end(t, self.billed(now))
        if budget_end is None:
            return None
        return resplit(ends, step, [s.global_batch for s in self.m.stages],
                       trainer_stage_rates(self.metrics, self.m.stages, self.gpus), self.gpus,
                       self.seconds_left(t, budget_end), extend=extend)
