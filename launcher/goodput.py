"""Goodput: of the billed GPU-seconds, how many went into training steps, and where the rest went.

Goodput = GPU-seconds inside useful training steps / billed GPU-seconds. The rest is broken
down as (all in GPU-seconds, summing to billed):
  startup     segment start (or sacct Start) -> the first step; runs with no segment at all
  checkpoint  `checkpoint_saved.seconds_blocked`
  evaluation  `evaluated.seconds` (quality metrics: generation and features; eval.jsonl)
  sampling    time between logged steps that is neither a step, a checkpoint nor an evaluation
              (sample grids, logging, and the noise of the step-time estimate)
  lost        steps trained past the last checkpoint of a segment that then died, which the
              next segment trained again
  idle        the last logged step -> the segment's end (final save excluded; for a finished
              run this includes writing the final sample grid)
  other       billed minus all of the above (sacct's extra, rounding)
Approximations: a step's time is the `step_time` of the metrics record closing its interval
(one measured step stands for the `metrics_interval` steps before it); steps after the last
metrics record of a segment are counted at that record's step time; a live segment's time
since its last record counts as training.
"""

from __future__ import annotations

import statistics

from pixeldiff.billing import Segment
from slurm.types import AcctRecord


def _windows(s: Segment):
    """(steps, step_time, wall seconds or None for the first window) per metrics record of a segment."""
    prev_step, prev_t = s.start_step, None
    for r in s.metrics:
        n = max(0, int(r["step"]) - prev_step)
        yield n, float(r.get("step_time") or 0.0), (None if prev_t is None else r["time"] - prev_t), r
        prev_step, prev_t = int(r["step"]), r["time"]


def step_time_of(s: Segment) -> float:
    times = [float(r.get("step_time") or 0.0) for r in s.metrics if r.get("step_time")]
    return statistics.median(times) if times else 0.0


def goodput_breakdown(segs: list[Segment], unmatched_acct: list[AcctRecord], billed: float, now: float) -> dict:
    """GPU-seconds by where they went (keys in the module docstring); `goodput` = training / billed."""
    parts = dict.fromkeys(("training", "startup", "checkpoint", "evaluation", "sampling", "lost", "idle"), 0.0)
    for k, s in enumerate(segs):
        g, end = s.gpus, s.end if s.end is not None else s.last_seen
        ckpt = [(t, b) for t, _, b in s.checkpoints]
        parts["checkpoint"] += g * sum(b for _, b in ckpt)
        if s.acct is not None and s.acct.start is not None:
            parts["startup"] += g * max(0.0, s.start - s.acct.start)
        train, last_t, last_step, last_dt = 0.0, None, s.start_step, 0.0
        for n, dt_step, wall, r in _windows(s):
            steps_s = n * dt_step
            if wall is None:  # first record: everything before its steps is start-up
                parts["startup"] += g * max(0.0, r["time"] - steps_s - s.start)
            else:
                in_window = sum(b for t, b in ckpt if last_t < t <= r["time"])
                steps_s = min(steps_s, wall)
                between = max(0.0, wall - steps_s - in_window)
                ev = min(between, sum(sec for t, sec in s.evaluations if last_t < t <= r["time"]))
                parts["evaluation"] += g * ev
                parts["sampling"] += g * (between - ev)
            train += steps_s
            last_t, last_step, last_dt = r["time"], int(r["step"]), dt_step
        if last_t is None:  # no metrics record: nothing measurable as training
            parts["startup"] += g * max(0.0, end - s.start - sum(b for _, b in ckpt))
        else:
            tail = max(0.0, end - last_t - sum(b for t, b in ckpt if t > last_t))
            if s.end_source == "now":
                tail_train = tail  # steps in progress
            else:
                done = max(s.end_step if isinstance(s.end_step, int) else s.max_step, s.max_step) - last_step
                tail_train = min(tail, max(0, done) * last_dt)
            train += tail_train
            ev = min(tail - tail_train, sum(sec for t, sec in s.evaluations if t > last_t))  # the final evaluation
            parts["evaluation"] += g * ev
            parts["idle"] += g * (tail - tail_train - ev)
        # steps this segment trained past its last checkpoint, which the next segment trains again (or, for a
        # last segment that died without saving, which any resume would)
        redo = 0
        if k + 1 < len(segs):
            redo = max(0, s.max_step - segs[k + 1].start_step)
        elif s.end_reason is None and s.end_source != "now":
            redo = max(0, s.max_step - max([s.start_step] + [c[1] for c in s.checkpoints]))
        if redo:
            lost = min(train, redo * step_time_of(s))
            parts["lost"] += g * lost
            train -= lost
        parts["training"] += g * train
    for r in unmatched_acct:  # runs that never wrote a segment_start: all start-up
        parts["startup"] += r.billed_gpu_seconds(now)
    parts["other"] = billed - sum(parts.values())
    fractions = {k: (v / billed if billed > 0 else 0.0) for k, v in parts.items()}
    return {"goodput": fractions["training"], "gpu_seconds": {k: round(v, 3) for k, v in parts.items()},
            "fraction": {k: round(v, 5) for k, v in fractions.items()}}
