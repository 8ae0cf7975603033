"""Schedules as pure functions of the step: stage boundaries, learning rate, budget.

Resuming needs only the step: every schedule here is recomputed from it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from pixeldiff.config import Manifest, OptimizerConfig


def budget_gpu_hours(m: Manifest) -> float | None:
    """GPU-hours the binding budget allows (the smaller of wall clock and dollars), None if uncapped."""
    caps = []
    if m.budget.wall_hours:
        caps.append(m.budget.wall_hours * m.world_size)
    if m.budget.usd and m.budget.gpu_hour_usd:
        caps.append(m.budget.usd / m.budget.gpu_hour_usd)
    return min(caps) if caps else None


def stage_steps(m: Manifest) -> list[int]:
    """Optimizer steps per stage: given, or from the stage's share of the budget's GPU-hours."""
    out = []
    for s in m.stages:
        if s.steps is not None:
            out.append(s.steps)
        else:
            img = s.budget_share * budget_gpu_hours(m) * 3600 * s.est_img_per_s_per_gpu
            out.append(max(1, int(img // s.global_batch)))
    return out


def eval_reason(step: int, ends, every: int) -> str | None:
    """Why a run evaluates after `step` ('interval', 'stage_end', 'end': the run's last step), or None: every
    eval.interval_steps (`every`, 0 = never), and at each stage's end. The trainer and the plan both ask here."""
    if step == ends[-1]:
        return "end"
    if step in ends:
        return "stage_end"
    return "interval" if every and step % every == 0 and step < ends[-1] else None


@dataclass(frozen=True)
class StageSchedule:
    ends: tuple[int, ...]  # cumulative step at which each stage ends

    @classmethod
    def from_manifest(cls, m: Manifest) -> "StageSchedule":
        ends, total = [], 0
        for n in stage_steps(m):
            total += n
            ends.append(total)
        return cls(tuple(ends))

    @property
    def total_steps(self) -> int:
        return self.ends[-1]

    def stage_at(self, step: int) -> int:
        """Index of the stage that step `step` (0-based, the step about to run) belongs to."""
        return min(bisect.bisect_right(self.ends, step), len(self.ends) - 1)


FILL = 0.98  # extend_last_stage: plan the schedule to this fraction of the time the budget has left
EXTEND_BELOW = 0.95  # ... when it needs less than this fraction


def schedule_seconds(ends: tuple[int, ...], step: int, batches: list[int], rates: list[float | None],
                     gpus: int) -> float | None:
    """Training seconds the schedule still needs from `step` at `rates` (images/s per GPU; None: unknown)."""
    starts = [0, *ends[:-1]]
    remaining = [max(0, ends[i] - max(step, starts[i])) for i in range(len(ends))]
    if any(remaining[i] and (rates[i] is None or rates[i] <= 0) for i in range(len(ends))):
        return None
    return sum(remaining[i] * batches[i] / (rates[i] * gpus) for i in range(len(ends)) if remaining[i])


def resplit(ends: tuple[int, ...], step: int, batches: list[int], rates: list[float | None], gpus: int,
            seconds_left: float, extend: bool = False) -> tuple[int, ...]:
    """Stage ends that fit the time the budget has left (`budget.policy: finish_stages`, `extend_last_stage`).

    `rates[i]` is stage i's throughput in images/s per GPU (measured for the stages that ran, estimated for
    the others; None when unknown). When the remaining steps of the current and later stages need more than
    `seconds_left`, each one's remaining steps shrink by the same factor, so every stage still runs (at
    least one step). When they need less than EXTEND_BELOW of it and `extend`, the last stage grows to fill FILL
    of it; otherwise nothing changes. Finished stages and the steps already taken are kept."""
    cur = StageSchedule(ends).stage_at(step)
    starts = [0, *ends[:-1]]
    remaining = [max(0, ends[i] - max(step, starts[i])) for i in range(len(ends))]
    need = schedule_seconds(ends, step, batches, rates, gpus)
    if need is None:
        return ends
    if need < EXTEND_BELOW * seconds_left and extend and rates[-1]:
        more = int((FILL * seconds_left - need) * rates[-1] * gpus / batches[-1])
        return (*ends[:-1], ends[-1] + more) if more > 0 else ends
    if need <= seconds_left:
        return ends
    f = max(0.0, seconds_left) / need
    out, total = [], 0
    for i in range(len(ends)):
        if i < cur:
            n = ends[i] - starts[i]
        else:
            done = max(0, step - starts[i])
            n = done + max(1, int(remaining[i] * f)) if remaining[i] else ends[i] - starts[i]
        total += n
        out.append(total)
    return tuple(out)


def lr_at(step: int, cfg: OptimizerConfig, base: float | None = None) -> float:
    """Linear warmup over warmup_steps, then constant (the speedrun's schedule), of `base` (default `cfg.lr`; Muon's
    group passes `cfg.muon_lr`)."""
    base = cfg.lr if base is None else base
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    return base
