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


def lr_at(step: int, cfg: OptimizerConfig) -> float:
    """Linear warmup over warmup_steps, then constant (the speedrun's schedule)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr
