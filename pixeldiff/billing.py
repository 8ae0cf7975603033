"""What the run's records say was spent and how fast it went: segments, billed GPU-seconds, stage rates.

Pure functions over the ledger's events and the metrics records (pixeldiff/ledger.py writes them);
no torch, no Slurm. The job's budget guard (pixeldiff/budget.py), the launcher's submission
(launcher/policy.py) and the run summary (launcher/summary.py) all count with these.

Segments. One per `segment_start` (one run of one job), from its `job_start` (Slurm's allocation
start, when the trainer knows it) or else its time. Its end is, in order of preference: its
`segment_end` event, or the job's supervisor's `step_ended` after it (the tasks' exit and the
decision are billed too); the given `now` while the run is live (the last segment only); the end of
the job run's accounting record, when the caller matched one (`Segment.acct`, anything with
`.start` and `.end`: launcher/slurmview.py pairs sacct's records); its last sign of life (the
last trainer event, `SEGMENT_EVENTS`, or metrics record of the segment).
Billed GPU-seconds = GPUs x (end - start). Where an end event carries `elapsed_s` (the job's monotonic seconds
since its allocation: pixeldiff/budget.py JobClock, the supervisor), the end is start + elapsed_s, so that a
wall clock stepped during the job does not bill the step.

Caps. The dollar cap in GPU-seconds is `usd / gpu_hour_usd * 3600`; the wall clock counts from
the first segment's start.

Stage rates. A stage's measured speed comes from its last `RATE_RECORDS` metrics records in the
most recent segment that trained it: steps/s from the first to the last of them, the latest
record's img/s, and the mean img/s per GPU over them. A stage that never ran has the plan's
estimate (`est_img_per_s_per_gpu`); `trainer_stage_rates` extrapolates further for the budget's
re-split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RATE_RECORDS = 10  # metrics records behind a stage's recent rate

# what a job's trainer writes while it lives (the signs of life that close a segment that died without an end)
SEGMENT_EVENTS = ("segment_start", "heartbeat", "checkpoint_saved", "stage_change", "schedule_change", "warning",
                  "samples_written", "evaluated", "budget_stop", "segment_end")


# ------------------------------------------------------------------ segments


@dataclass
class Segment:
    job_id: str
    restart: int
    nodes: int
    gpus: int
    nodelist: str
    start: float
    start_step: int
    end: float | None = None  # set by close_segments
    end_source: str = ""  # segment_end | now | sacct | last_seen
    end_reason: str | None = None
    end_step: int | None = None
    last_seen: float = 0.0  # last trainer event or metrics record
    max_step: int = 0
    checkpoints: list[tuple[float, int, float]] = field(default_factory=list)  # (time, step, seconds_blocked)
    evaluations: list[tuple[float, float]] = field(default_factory=list)  # (time written, seconds)
    metrics: list[dict] = field(default_factory=list)
    acct: Any = None  # the job run's accounting record (slurm.types.AcctRecord), when the caller matched one

    @property
    def billed(self) -> float:
        return self.gpus * max(0.0, (self.end if self.end is not None else self.last_seen) - self.start)

    @property
    def open(self) -> bool:
        return self.end_reason is None


def segment_start(e: dict) -> float:
    """When a `segment_start` event's segment began: a Slurm job's bills from Slurm's allocation (job_start),
    before the trainer's start-up."""
    return float(min(e.get("job_start") or e["time"], e["time"]))


def event_end(s: Segment, e: dict) -> float:
    """How far into segment `s` an event of its job is: start + its `elapsed_s` (monotonic) when it has one, else
    its wall time."""
    elapsed = e.get("elapsed_s")
    if isinstance(elapsed, (int, float)) and elapsed >= 0:
        return s.start + float(elapsed)
    return float(e["time"])


def build_segments(events: list[dict], metrics: list[dict]) -> list[Segment]:
    """Segments from the ledger, with their trainer events and metrics records (by time); not yet closed."""
    segs: list[Segment] = []
    for e in events:
        kind = e["event"]
        if kind == "segment_start":
            segs.append(Segment(str(e.get("job_id", "?")), int(e.get("restart", 0) or 0), int(e.get("nodes", 1) or 1),
                                int(e.get("gpus", 1) or 1), str(e.get("nodelist", "")), segment_start(e),
                                int(e.get("step", 0) or 0), last_seen=float(e["time"]), max_step=int(e.get("step", 0) or 0)))
            continue
        if kind == "step_ended":  # the job's supervisor, after its training step ended: billed until now
            own = [s for s in segs if s.job_id == str(e.get("job_id")) and s.restart == int(e.get("restart", 0) or 0)]
            if own and own[-1].end_reason is not None:
                own[-1].end = max(own[-1].end, event_end(own[-1], e))
            elif own:
                own[-1].last_seen = max(own[-1].last_seen, event_end(own[-1], e))
            continue
        # the launcher's events say nothing of a job that may be long dead
        if not segs or kind not in SEGMENT_EVENTS or segs[-1].end_reason is not None:
            continue
        s = segs[-1]
        s.last_seen = max(s.last_seen, event_end(s, e))
        if isinstance(e.get("step"), int):
            s.max_step = max(s.max_step, e["step"])
        if kind == "checkpoint_saved":
            s.checkpoints.append((float(e["time"]), int(e.get("step", 0)), float(e.get("seconds_blocked", 0.0) or 0.0)))
        if kind == "evaluated":
            s.evaluations.append((float(e["time"]), float(e.get("seconds", 0.0) or 0.0)))
        elif kind == "segment_end":
            s.end, s.end_source, s.end_reason = event_end(s, e), "segment_end", str(e.get("reason", ""))
            s.end_step = e.get("step")
    starts = [s.start for s in segs]
    for r in metrics:
        i = max((k for k, t in enumerate(starts) if t <= r["time"]), default=None)
        if i is None:
            continue
        s = segs[i]
        if s.end_reason is not None and r["time"] > s.end + 1.0:
            continue  # written after this segment ended: not its record
        s.metrics.append(r)
        s.last_seen = max(s.last_seen, float(r["time"]))
        s.max_step = max(s.max_step, int(r["step"]))
    return segs


def close_segments(segs: list[Segment], now: float | None, live: bool) -> None:
    """Give every segment an end: its end event; `now` for the last one while live; its accounting record's end;
    its last sign of life."""
    for i, s in enumerate(segs):
        if s.end_reason is not None:
            continue
        if live and i == len(segs) - 1:
            s.end, s.end_source = max(now, s.last_seen), "now"
        elif s.acct is not None and s.acct.end is not None:
            s.end, s.end_source = max(s.acct.end, s.start), "sacct"
        else:
            s.end, s.end_source = s.last_seen, "last_seen"


def billed_gpu_seconds(events: list[dict], until: float | None = None) -> float:
    """GPU-seconds of the segments in a ledger: GPUs x (end - start); a segment without an end event is closed at
    its last sign of life, except the last one, which counts to `until` when given (the segment running now)."""
    segs = build_segments(events, [])
    close_segments(segs, until, live=until is not None)
    return sum(s.billed for s in segs)


def run_started(events: list[dict]) -> float | None:
    """When the run's wall clock started: its first segment's start (None before any)."""
    return next((segment_start(e) for e in events if e["event"] == "segment_start"), None)


def gpu_seconds_cap(budget) -> float | None:
    """The dollar cap (a BudgetConfig: usd, gpu_hour_usd) in GPU-seconds; None without one."""
    return budget.usd / budget.gpu_hour_usd * 3600 if budget.usd and budget.gpu_hour_usd else None


# ------------------------------------------------------------------ stage rates


@dataclass(frozen=True)
class StageRate:
    steps_per_s: float | None
    img_per_s: float | None  # the latest record's (or the estimate for all the run's GPUs)
    img_per_s_per_gpu: float | None  # the mean over the recent records, per GPU (or the estimate)
    source: str | None  # measured | plan (the stage's est_img_per_s_per_gpu) | None (neither)


def stage_rates(records_by_segment: list[list[dict]], stages, gpus: int) -> list[StageRate]:
    """One StageRate per stage. `records_by_segment`: the metrics records of each segment, oldest first (one list
    for all of them when segments do not matter); `stages`: StageConfig-like (name, global_batch,
    est_img_per_s_per_gpu); `gpus`: the run's GPUs."""
    out = []
    for st in stages:
        tail = next((mine[-RATE_RECORDS:] for recs in reversed(records_by_segment)
                     if (mine := [r for r in recs if r.get("stage") == st.name])), None)
        if tail is not None:
            out.append(_measured(tail, st.global_batch, gpus))
        elif st.est_img_per_s_per_gpu:
            img = st.est_img_per_s_per_gpu * gpus
            out.append(StageRate(img / st.global_batch, img, st.est_img_per_s_per_gpu, "plan"))
        else:
            out.append(StageRate(None, None, None, None))
    return out


def _measured(tail: list[dict], batch: int, gpus: int) -> StageRate:
    first, last = tail[0], tail[-1]
    timed = len(tail) >= 2 and all("time" in r and "step" in r for r in (first, last))
    if timed and last["time"] > first["time"] and last["step"] > first["step"]:
        rate = (last["step"] - first["step"]) / (last["time"] - first["time"])
    elif last.get("img_per_s"):
        rate = last["img_per_s"] / batch
    elif last.get("step_time"):
        rate = 1.0 / last["step_time"]
    else:
        rate = None
    per_gpu = [r["img_per_s"] / gpus for r in tail if r.get("img_per_s") is not None]
    return StageRate(rate, last.get("img_per_s") or (rate * batch if rate else None),
                     sum(per_gpu) / len(per_gpu) if per_gpu else None, "measured")


def trainer_stage_rates(metrics: list[dict], stages, gpus: int) -> list[float | None]:
    """img/s per GPU for each stage, for the budget's re-split: measured (its last RATE_RECORDS metrics records)
    where the stage ran, else its estimate scaled by how the measured stages compared with their estimates, else
    the nearest measured stage scaled by pixels. `stages`: StageConfig (name, resolution, global_batch,
    est_img_per_s_per_gpu)."""
    measured = [r.img_per_s_per_gpu if r.source == "measured" else None for r in stage_rates([metrics], stages, gpus)]
    ratio = [r / s.est_img_per_s_per_gpu for r, s in zip(measured, stages) if r is not None and s.est_img_per_s_per_gpu]
    q = sum(ratio) / len(ratio) if ratio else 1.0
    out = [r if r is not None else (s.est_img_per_s_per_gpu * q if s.est_img_per_s_per_gpu else None)
           for r, s in zip(measured, stages)]
    known = [i for i, r in enumerate(measured) if r is not None]
    for i, s in enumerate(stages):
        if out[i] is None and known:
            k = min(known, key=lambda j: abs(j - i))
            out[i] = measured[k] * (stages[k].resolution / s.resolution) ** 2
    return out
