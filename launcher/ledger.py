"""The cost ledger, summarised: what a run has cost, how well it used the GPUs, where it is going.

Pure functions over the run directory (`ledger.jsonl`, `metrics.jsonl`, `manifest.yaml`,
`plan.json`, `samples/`) plus, when given, what Slurm says (`squeue`, `sacct`). Time comes in
as `now`, so tests use a fake clock. `summary(run_dir, slurm, now)` is what `status` prints
and `watch` draws.

Segments. One per `segment_start` (one run of one job), from its `job_start` (Slurm's allocation
start, when the trainer knows it) or else its time. Its end is, in order of preference:
its `segment_end` event; `now` while the run is live; `sacct`'s End for the matching run of
the job; its last sign of life (the last trainer event or metrics record of the segment).
Billed GPU-seconds = GPUs x (end - start).

Cost. Where `sacct` records exist they are the authority: billed = sum of each record's
GPUs x (End - Start), which also covers what the ledger cannot see (allocation before the
trainer's `segment_start`, runs that died before writing anything). `ledger_vs_sacct_pct`
says how far the ledger's own figure was off. Dollars = GPU-hours x `budget.gpu_hour_usd`.

Goodput = GPU-seconds inside useful training steps / billed GPU-seconds. The rest is broken
down as (all in GPU-seconds, summing to billed):
  startup     segment start (or sacct Start) -> the first step; runs with no segment at all
  checkpoint  `checkpoint_saved.seconds_blocked`
  sampling    time between logged steps that is neither a step nor a checkpoint (sample
              grids, logging, and the noise of the step-time estimate)
  lost        steps trained past the last checkpoint of a segment that then died, which the
              next segment trained again
  idle        the last logged step -> the segment's end (final save excluded; for a finished
              run this includes writing the final sample grid)
  other       billed minus all of the above (sacct's extra, rounding)
Approximations: a step's time is the `step_time` of the metrics record closing its interval
(one measured step stands for the `metrics_interval` steps before it); steps after the last
metrics record of a segment are counted at that record's step time; a live segment's time
since its last record counts as training.

Forecast. The recent step rate (the last `RATE_RECORDS` metrics records of the current stage
in the current segment) prices the rest of the current stage; later stages use their own
measured rate if they ran before, else the plan's `est_img_per_s_per_gpu`. Restarts and
start-up of future segments are not forecast.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pixeldiff.config import ConfigError, Manifest, load_resolved
from pixeldiff.budget import SEGMENT_EVENTS, Limits
from pixeldiff.ledger import read_jsonl
from slurm.types import AcctRecord, QueueEntry

try:
    from slurm.commands import SlurmError
except ImportError:  # the Slurm client is written separately; until it lands, a stand-in
    class SlurmError(Exception):
        """Slurm did not answer."""


RATE_RECORDS = 10  # metrics records behind the recent step rate
ALIVE_S = 180.0  # without squeue or a lock: an open segment seen this recently is running
RECENT_EVENTS = 12
LOSS_HISTORY = 60
TERMINAL = ("finished", "failed", "over_budget", "cancelled")
TRAINER_EVENTS = SEGMENT_EVENTS  # what a job's trainer writes: the signs of life of a segment
QUEUED_STATES = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED")
RUNNING_STATES = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING")
FAILED_STATES = ("FAILED", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY", "DEADLINE", "TIMEOUT")


class RunDirError(Exception):
    """The path is not a run directory this project wrote; the message says what is missing."""


# ------------------------------------------------------------------ reading


@dataclass
class Run:
    run_dir: Path
    manifest: Manifest
    plan: dict
    events: list[dict]
    metrics: list[dict]


def read_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such directory; give a run directory such as runs/<name> "
                          f"(made by `pixeldiff-launch run`)")
    if not (run_dir / "manifest.yaml").exists():
        raise RunDirError(f"{run_dir}: not a run directory (no manifest.yaml); give runs/<name>, the directory "
                          f"`pixeldiff-launch run` created")
    try:
        m = load_resolved(run_dir / "manifest.yaml")
    except (ConfigError, OSError, ValueError) as e:
        raise RunDirError(f"{run_dir}/manifest.yaml cannot be read: {e}") from None
    plan = None
    if (run_dir / "plan.json").exists():
        try:
            plan = json.loads((run_dir / "plan.json").read_text())
        except (OSError, json.JSONDecodeError):
            plan = None
    if plan is None:
        from launcher.plan import make_plan

        plan = make_plan(m)
    events = [e for e in read_jsonl(run_dir / "ledger.jsonl") if isinstance(e, dict) and "event" in e and "time" in e]
    metrics = [r for r in read_jsonl(run_dir / "metrics.jsonl") if isinstance(r, dict) and "step" in r and "time" in r]
    return Run(run_dir, m, plan, events, metrics)


def lock_held(run_dir: Path) -> bool:
    """Is `run_dir/run.lock` held (pixeldiff.train.lock_run) by a process on this machine?

    Read from /proc/locks so that looking never takes the lock (a probe could make a job that
    starts at that instant fail with RunLocked); elsewhere, a shared non-blocking probe."""
    path = Path(run_dir) / "run.lock"
    try:
        st = path.stat()
    except OSError:
        return False
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        table = None
    if table is not None:
        for line in table.splitlines():
            parts = line.split()
            # "1: FLOCK  ADVISORY  WRITE 13665 fe:00:2565563 0 EOF"  (a blocked waiter has "->" after the id)
            parts = [p for p in parts if p != "->"]
            if len(parts) >= 6 and parts[1] == "FLOCK":
                try:
                    major, minor, inode = parts[5].split(":")
                    if int(inode) == st.st_ino and (int(major, 16), int(minor, 16)) == (os.major(st.st_dev), os.minor(st.st_dev)):
                        return True
                except ValueError:
                    continue
        return False
    import fcntl

    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def lock_host(run_dir: Path) -> str | None:
    """The host named in run.lock ('pid N on HOST'), if any."""
    try:
        text = (Path(run_dir) / "run.lock").read_text().split()
    except OSError:
        return None
    return text[3] if len(text) >= 4 and text[2] == "on" else None


# ------------------------------------------------------------------ Slurm


@dataclass
class SlurmView:
    """What Slurm said at one poll: None where it was not asked or did not answer."""

    queue: dict[str, QueueEntry] | None = None
    accounting: list[AcctRecord] | None = None
    error: str | None = None
    polled_at: float | None = None


class SlurmPoller:
    """One squeue and at most one sacct per poll, no more often than `min_interval_s`; when Slurm does
    not answer, the last answer is kept and the error is reported beside it."""

    def __init__(self, client, min_interval_s: float = 10.0, clock=time.time):
        self.client, self.min_interval_s, self.clock = client, min_interval_s, clock
        self.last = SlurmView()
        self._ids: tuple[str, ...] = ()
        self.polls = 0

    def view(self, job_ids, now: float | None = None) -> SlurmView:
        ids = tuple(sorted(set(job_ids)))
        now = self.clock() if now is None else now
        fresh = self.last.polled_at is not None and now - self.last.polled_at < self.min_interval_s
        if not ids or (fresh and ids == self._ids):
            return self.last
        self.polls += 1
        self._ids = ids
        try:
            queue = self.client.queue(ids)
            acct = self.client.accounting(ids)
        except SlurmError as e:
            self.last = SlurmView(self.last.queue, self.last.accounting, f"{e}".strip() or type(e).__name__, now)
            return self.last
        self.last = SlurmView(dict(queue), list(acct), None, now)
        return self.last


def slurm_job_ids(events: list[dict]) -> list[str]:
    ids = []
    for e in events:
        for j in ([e.get("job_id")] if e["event"] != "cancel_requested" else e.get("job_ids") or []):
            if j and not str(j).startswith("local-") and str(j) not in ids:
                ids.append(str(j))
    return ids


def _same_job(record_id: str, job_id: str) -> bool:
    return record_id == job_id or record_id.split("_")[0] == job_id.split("_")[0] and "_" not in job_id


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
    metrics: list[dict] = field(default_factory=list)
    acct: AcctRecord | None = None

    @property
    def billed(self) -> float:
        return self.gpus * max(0.0, (self.end if self.end is not None else self.last_seen) - self.start)

    @property
    def open(self) -> bool:
        return self.end_reason is None


def build_segments(events: list[dict], metrics: list[dict]) -> list[Segment]:
    """Segments from the ledger, with their trainer events and metrics records (by time); not yet closed."""
    segs: list[Segment] = []
    for e in events:
        kind = e["event"]
        if kind == "segment_start":
            # a Slurm job's segment bills from Slurm's allocation start (job_start), before the trainer's start-up
            segs.append(Segment(str(e.get("job_id", "?")), int(e.get("restart", 0) or 0), int(e.get("nodes", 1) or 1),
                                int(e.get("gpus", 1) or 1), str(e.get("nodelist", "")),
                                float(min(e.get("job_start") or e["time"], e["time"])),
                                int(e.get("step", 0) or 0), last_seen=float(e["time"]), max_step=int(e.get("step", 0) or 0)))
            continue
        if not segs or kind not in TRAINER_EVENTS or segs[-1].end_reason is not None:
            continue
        s = segs[-1]
        s.last_seen = max(s.last_seen, float(e["time"]))
        if isinstance(e.get("step"), int):
            s.max_step = max(s.max_step, e["step"])
        if kind == "checkpoint_saved":
            s.checkpoints.append((float(e["time"]), int(e.get("step", 0)), float(e.get("seconds_blocked", 0.0) or 0.0)))
        elif kind == "segment_end":
            s.end, s.end_source, s.end_reason = float(e["time"]), "segment_end", str(e.get("reason", ""))
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


def match_acct(segs: list[Segment], acct: list[AcctRecord]) -> list[AcctRecord]:
    """Pair each segment with the run of its job that contains its start. -> records no segment matched."""
    free = [r for r in acct if r.start is not None]
    for s in segs:
        best = None
        for r in free:
            if _same_job(r.job_id, s.job_id) and r.start <= s.start + 1.0 and (r.end is None or r.end >= s.start - 1.0):
                if best is None or r.start > best.start:
                    best = r
        if best is not None:
            s.acct = best
            free.remove(best)
    return free


def close_segments(segs: list[Segment], now: float, live: bool) -> None:
    """Give every segment an end: its end event; `now` for the last one while live; sacct's End; its last sign of life."""
    for i, s in enumerate(segs):
        if s.end_reason is not None:
            continue
        if live and i == len(segs) - 1:
            s.end, s.end_source = max(now, s.last_seen), "now"
        elif s.acct is not None and s.acct.end is not None:
            s.end, s.end_source = max(s.acct.end, s.start), "sacct"
        else:
            s.end, s.end_source = s.last_seen, "last_seen"


# ------------------------------------------------------------------ goodput


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
    parts = dict.fromkeys(("training", "startup", "checkpoint", "sampling", "lost", "idle"), 0.0)
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
                parts["sampling"] += g * max(0.0, wall - steps_s - in_window)
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
            parts["idle"] += g * (tail - tail_train)
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


# ------------------------------------------------------------------ forecast


def replanned(plan: dict, events: list[dict]) -> dict:
    """The plan with the stage steps of the latest `schedule_change` (budget.policy finish_stages), if any."""
    changes = [e for e in events if e["event"] == "schedule_change"]
    if not changes:
        return plan
    ends, starts = changes[-1]["ends"], [0, *changes[-1]["ends"][:-1]]
    stages = [{**r, "steps": end - start} for r, start, end in zip(plan["stages"], starts, ends)]
    return {**plan, "stages": stages, "total_steps": ends[-1]}


def stage_bounds(plan: dict) -> list[tuple[str, int, int]]:
    """(name, first step, end step) per stage."""
    out, at = [], 0
    for r in plan["stages"]:
        out.append((r["stage"], at, at + int(r["steps"])))
        at += int(r["steps"])
    return out


def stage_rates(metrics_by_seg: list[list[dict]], plan: dict, gpus: int) -> dict[str, dict]:
    """Per stage: steps/s from the last RATE_RECORDS records of its most recent segment; img/s; source."""
    out = {}
    batch = {r["stage"]: r["global_batch"] for r in plan["stages"]}
    for row in plan["stages"]:
        name = row["stage"]
        rate, img, source = None, None, None
        for recs in reversed(metrics_by_seg):
            mine = [r for r in recs if r.get("stage") == name]
            if not mine:
                continue
            tail = mine[-RATE_RECORDS:]
            if len(tail) >= 2 and tail[-1]["time"] > tail[0]["time"] and tail[-1]["step"] > tail[0]["step"]:
                rate = (tail[-1]["step"] - tail[0]["step"]) / (tail[-1]["time"] - tail[0]["time"])
            elif tail[-1].get("img_per_s"):
                rate = tail[-1]["img_per_s"] / batch[name]
            elif tail[-1].get("step_time"):
                rate = 1.0 / tail[-1]["step_time"]
            img = tail[-1].get("img_per_s") or (rate * batch[name] if rate else None)
            source = "measured"
            break
        if rate is None and row.get("est_img_per_s_per_gpu"):
            img = row["est_img_per_s_per_gpu"] * gpus
            rate, source = img / row["global_batch"], "plan"
        out[name] = {"steps_per_s": rate, "img_per_s": img, "rate_source": source}
    return out


def forecast(step: int, plan: dict, rates: dict, gpus: int, price: float, billed: float, now: float,
             gpu_seconds_cap: float | None, wall_end: float | None) -> dict:
    """Time, GPU-hours and dollars to finish every stage from `step`, and whether a cap comes first."""
    stages, t, known = [], 0.0, True
    for name, first, end in stage_bounds(plan):
        left = max(0, end - max(step, first))
        rate = rates[name]["steps_per_s"]
        secs = left / rate if left and rate else (0.0 if not left else None)
        if secs is None:
            known = False
        else:
            t += secs
        stages.append({"stage": name, "steps_left": left, "seconds": secs, "eta_s": t if secs is not None and known else None})
    seconds = t if known else None
    gpu_s = seconds * gpus if seconds is not None else None
    out = {"steps_left": sum(s["steps_left"] for s in stages), "seconds": seconds,
           "gpu_hours": gpu_s / 3600 if gpu_s is not None else None,
           "usd": gpu_s / 3600 * price if gpu_s is not None else None,
           "total_gpu_hours": (billed + gpu_s) / 3600 if gpu_s is not None else None,
           "total_usd": (billed + gpu_s) / 3600 * price if gpu_s is not None else None,
           "finish_time": now + seconds if seconds is not None else None, "stages": stages,
           "cap_hit_first": None, "cap": None}
    if seconds is not None:
        hits = []
        if gpu_seconds_cap is not None and billed + gpu_s > gpu_seconds_cap:
            hits.append(("dollars", (gpu_seconds_cap - billed) / gpus))
        if wall_end is not None and now + seconds > wall_end:
            hits.append(("wall clock", wall_end - now))
        out["cap_hit_first"] = bool(hits)
        if hits:
            out["cap"], left_s = min(hits, key=lambda h: h[1])
            out["seconds_to_cap"] = max(0.0, left_s)
    return out


# ------------------------------------------------------------------ state


def run_state(events: list[dict], segs: list[Segment], backend: str, live: bool | None, view: SlurmView | None,
              now: float) -> tuple[str, str]:
    """-> (state, why): queued | running | finished | failed | over_budget | cancelled."""
    last_end = segs[-1].end_reason if segs else None
    open_seg = bool(segs) and segs[-1].open
    last_start_t = segs[-1].start if segs else float("-inf")
    cancels = [e for e in events if e["event"] == "cancel_requested"]
    submits = [e for e in events if e["event"] == "job_submitted"]
    restarted = max([e["time"] for e in submits] + [last_start_t])
    # run_stopped: the launcher will not go on (until someone runs the manifest again: a later submit or start)
    stopped = [e for e in events if e["event"] == "run_stopped" and e["time"] >= restarted]
    budget_stop = any(e["event"] == "budget_stop" and e["time"] >= last_start_t for e in events)
    stop_reason = str(stopped[-1].get("reason", "")) if stopped else ""
    stop_kind = str(stopped[-1].get("kind") or "") if stopped else ""
    if stopped and not stop_kind:  # a ledger from before run_stopped had a kind
        stop_kind = "budget" if "budget" in stop_reason.lower() else (
            "cancelled" if "cancel" in stop_reason.lower() else "failed")

    if last_end == "finished":
        return "finished", "the last segment ended: finished"
    if not open_seg and (last_end == "budget" or budget_stop):
        return "over_budget", "the budget is spent (segment ended: budget)"
    if stop_kind == "budget":
        return "over_budget", f"run stopped: {stop_reason}"
    queue = view.queue if view is not None else None
    ours = list(queue.values()) if queue else []
    if live:
        return "running", "the run directory's lock is held"
    if any(q.state in RUNNING_STATES for q in ours):
        return "running", "squeue: RUNNING"
    if any(q.state in QUEUED_STATES for q in ours):
        return "queued", f"squeue: {ours[0].state} ({ours[0].reason})"
    if open_seg and live is None and queue is None and now - segs[-1].last_seen <= ALIVE_S:
        return "running", f"the last sign of life is {now - segs[-1].last_seen:.0f} s old"
    if cancels and cancels[-1]["time"] >= max([e["time"] for e in submits], default=float("-inf")):
        return "cancelled", "cancel requested"
    if stop_kind == "cancelled":
        return "cancelled", f"run stopped: {stop_reason}"
    if last_end and last_end.startswith("failed"):
        return "failed", f"segment ended: {last_end}"
    if stopped:  # failed, or limits (too many requeues): it will not go on by itself
        return "failed", f"run stopped ({stop_kind}): {stop_reason}"
    if open_seg:
        acct = segs[-1].acct
        if acct is not None and acct.state.split()[0] in FAILED_STATES + ("CANCELLED",):
            return ("cancelled" if acct.state.startswith("CANCELLED") else "failed"), f"sacct: {acct.state}, no end event"
        return "failed", "the job stopped without an end event (crashed or killed)"
    failed = [e for e in events if e["event"] == "job_failed"]
    if failed and failed[-1]["time"] > last_start_t and not any(e["time"] > failed[-1]["time"] for e in submits):
        return "failed", f"job {failed[-1].get('job_id')} failed: {failed[-1].get('message', '')}"
    if last_end and last_end.startswith("signal"):
        if backend == "local":
            return "cancelled", f"stopped by {last_end[7:]}; run the same command again to resume"
        return "queued", f"segment ended: {last_end}; waiting for the requeue"
    if last_end == "deadline":
        return "queued", "saved before the job's time limit; waiting for the next job"
    if submits and submits[-1]["time"] > last_start_t:
        return "queued", f"job {submits[-1].get('job_id')} submitted"
    if not segs:
        return "queued", "nothing has started yet"
    return "queued", f"segment ended: {last_end}"


# ------------------------------------------------------------------ jobs, events


def job_rows(events: list[dict], segs: list[Segment], view: SlurmView | None, now: float) -> list[dict]:
    ids = []
    for e in events:
        if e["event"] in ("job_submitted", "segment_start") and e.get("job_id") and str(e["job_id"]) not in ids:
            ids.append(str(e["job_id"]))
    queue = (view.queue or {}) if view else {}
    acct = (view.accounting or []) if view else []
    rows = []
    for j in ids:
        mine = [s for s in segs if s.job_id == j]
        recs = [r for r in acct if _same_job(r.job_id, j)]
        sub = next((e for e in events if e["event"] == "job_submitted" and str(e.get("job_id")) == j), {})
        requeues = sum(1 for e in events if e["event"] == "requeue_requested" and str(e.get("job_id")) == j)
        requeues = max(requeues, max((s.restart for s in mine), default=0), len(recs) - 1 if recs else 0)
        q = queue.get(j)
        if q is not None:
            state, elapsed, left, nodes = q.state, q.elapsed_s, q.time_left_s, q.nodes
        elif recs:
            r = max(recs, key=lambda r: r.start or 0)
            state, elapsed, left, nodes = r.state, r.elapsed_s, None, len(r.nodelist) or (mine[-1].nodes if mine else None)
        elif mine:
            s = mine[-1]
            state = "RUNNING" if s.end_source == "now" else ("ENDED" if s.end_reason else "LOST")
            elapsed, left, nodes = (s.end or s.last_seen) - s.start, None, s.nodes
        else:
            state, elapsed, left, nodes = "SUBMITTED", None, None, sub.get("nodes")
        rows.append({"job_id": j, "state": str(state).split()[0], "nodes": nodes, "elapsed_s": elapsed, "time_left_s": left,
                     "requeues": requeues, "segments": len(mine),
                     "last_end_reason": next((s.end_reason for s in reversed(mine) if s.end_reason), None)})
    return rows


def last_line(text: str) -> str:
    """The last non-empty line of a command's error (where Slurm's tools say what went wrong)."""
    lines = [x.strip() for x in str(text).splitlines() if x.strip()]
    return lines[-1] if lines else ""


def describe(e: dict) -> str:
    k = e["event"]
    skip = {"event", "time"}
    if k == "segment_end":
        return f"segment end: {e.get('reason')} at step {e.get('step')}"
    if k == "segment_start":
        return f"segment start: job {e.get('job_id')} restart {e.get('restart', 0)}, {e.get('gpus')} GPU(s), step {e.get('step')}"
    if k == "checkpoint_saved":
        return f"checkpoint at step {e.get('step')} ({e.get('seconds_blocked', 0):.1f} s blocked)"
    if k == "stage_change":
        return f"stage {e.get('previous')} -> {e.get('stage')} at step {e.get('step')}"
    if k == "job_submitted":
        ex = e.get("exclude") or []
        return (f"job {e.get('job_id')} submitted: {e.get('nodes')} node(s), {e.get('gpus')} GPU(s)"
                + (f", excluding {','.join(ex)}" if ex else ""))
    if k == "requeue_requested":
        return f"requeue job {e.get('job_id')} ({e.get('kind')}), restart {e.get('restart')}"
    if k == "job_failed":
        node = f" on {e['node']}" if e.get("node") else ""
        return f"job {e.get('job_id')} failed{node}: {e.get('message')} (failures: {e.get('failures')})"
    if k == "node_excluded":
        return f"node {e.get('node')} excluded: {e.get('reason')}"
    if k == "cancel_requested":
        return f"cancel requested: jobs {', '.join(map(str, e.get('job_ids') or []))}"
    if k == "run_stopped":
        return f"run stopped: {e.get('reason')}"
    if k == "budget_stop":
        return f"budget stop at step {e.get('step')}"
    if k == "schedule_change":
        return f"stages re-split to fit the budget at step {e.get('step')}: ends {e.get('ends')}"
    if k == "warning":
        return f"warning: {e.get('message')}"
    fields = ", ".join(f"{a}={b}" for a, b in e.items() if a not in skip)
    return f"{k.replace('_', ' ')}: {fields}" if fields else k


def newest_sample(run_dir: Path) -> str | None:
    files = sorted((Path(run_dir) / "samples").glob("*.png"))
    return str(files[-1]) if files else None


# ------------------------------------------------------------------ summary


def _current_step(events: list[dict], metrics: list[dict]) -> int:
    stamped = [(e["time"], e["step"]) for e in events if isinstance(e.get("step"), int)]
    stamped += [(r["time"], int(r["step"])) for r in metrics]
    return max(stamped)[1] if stamped else 0


def summary(run_dir, slurm=None, now: float | None = None, live: bool | None = None) -> dict:
    """Everything `status` prints and `watch` draws, as a JSON-ready dict (keys in docs/dashboard.md).

    `slurm`: None, a Slurm client (`.queue(ids)`, `.accounting(ids)`), a SlurmPoller or a SlurmView.
    `live`: whether the run's lock is held; None = look (local runs only)."""
    now = time.time() if now is None else float(now)
    run = read_run(Path(run_dir))
    m, plan, events, metrics = run.manifest, run.plan, run.events, run.metrics
    plan = replanned(plan, events)
    backend = m.cluster.backend
    ids = slurm_job_ids(events)
    if slurm is None or isinstance(slurm, SlurmView):
        view = slurm
    elif isinstance(slurm, SlurmPoller):
        view = slurm.view(ids, now)
    else:
        view = SlurmPoller(slurm, min_interval_s=0.0).view(ids, now)
    if view is not None and view.queue is None and view.accounting is None and view.error is None:
        view = None  # nothing to ask about (no Slurm jobs yet)
    if live is None and backend == "local":
        host = lock_host(run.run_dir)
        live = lock_held(run.run_dir) if host in (None, socket.gethostname()) else None

    segs = build_segments(events, metrics)
    acct = list(view.accounting) if view and view.accounting else []
    unmatched = match_acct(segs, acct)
    state_live = bool(live) or bool(view and view.queue and any(
        q.state in RUNNING_STATES for q in view.queue.values()))
    if not state_live and live is None and (view is None or view.queue is None) and segs and segs[-1].open:
        state_live = now - segs[-1].last_seen <= ALIVE_S
    close_segments(segs, now, state_live)
    state, why = run_state(events, segs, backend, live, view, now)

    gpus = segs[-1].gpus if segs else plan.get("gpus", m.world_size)
    price = m.budget.gpu_hour_usd
    ledger_billed = sum(s.billed for s in segs)
    if acct:
        billed = sum(r.billed_gpu_seconds(now) for r in acct)
        source = "sacct"
        off = (ledger_billed - billed) / billed * 100 if billed > 0 else None
    else:
        billed, source, off = ledger_billed, "ledger", None
    limits = Limits.from_run(m.budget, events, gpus, environ={}, now=now)
    cap_gpu_s = limits.gpu_seconds_cap
    wall_left = max(0.0, limits.wall_end - now) / 3600 if limits.wall_end is not None else (
        m.budget.wall_hours if m.budget.wall_hours else None)
    gp = goodput_breakdown(segs, unmatched, billed, now)

    step = _current_step(events, metrics)
    total = int(plan.get("total_steps") or sum(r["steps"] for r in plan["stages"]))
    bounds = stage_bounds(plan)
    stage_idx = next((i for i, (_, a, b) in enumerate(bounds) if step < b), len(bounds) - 1)
    rates = stage_rates([s.metrics for s in segs], plan, gpus)
    fc = forecast(step, plan, rates, gpus, price, billed, now, cap_gpu_s, limits.wall_end)
    if state in TERMINAL:
        for s in fc["stages"]:
            s["eta_s"] = None
    stages = []
    for (name, first, end), f in zip(bounds, fc["stages"]):
        done = min(max(step - first, 0), end - first)
        stages.append({"stage": name, "step": done, "steps": end - first, "first_step": first,
                       "fraction": done / (end - first) if end > first else 1.0,
                       "steps_per_s": rates[name]["steps_per_s"], "img_per_s": rates[name]["img_per_s"],
                       "rate_source": rates[name]["rate_source"], "eta_s": f["eta_s"], "done": step >= end})
    last = metrics[-1] if metrics else {}
    losses = {k: v for k, v in last.items() if k == "loss" or k.startswith("loss_")}
    notices = []
    if view is not None and view.error:
        shown = "its answer from before" if view.queue is not None else "the ledger only"
        notices.append(f"Slurm did not answer at {time.strftime('%H:%M:%S', time.gmtime(view.polled_at or now))} "
                       f"(showing {shown}): {last_line(view.error)}")
    if backend == "slurm" and view is None:
        notices.append("no Slurm information (state from the ledger)")
    usd = lambda gs: gs / 3600 * price if price else 0.0
    return {
        "name": m.name, "run_dir": str(run.run_dir), "manifest": str(run.run_dir / "manifest.yaml"),
        "backend": backend, "cluster": {"backend": backend, "nodes": m.cluster.nodes if backend == "slurm" else 1,
                                        "gpus": gpus, "partition": m.cluster.partition},
        "now": now, "state": state, "state_reason": why,
        "stage": bounds[stage_idx][0], "stage_index": stage_idx, "step": step, "total_steps": total,
        "billed_gpu_seconds": round(billed, 3), "billed_source": source, "ledger_gpu_seconds": round(ledger_billed, 3),
        "gpu_hours": billed / 3600, "gpu_hours_cap": cap_gpu_s / 3600 if cap_gpu_s is not None else None,
        "gpu_hour_usd": price, "usd_spent": usd(billed),
        "usd_forecast": fc["total_usd"] if state not in ("finished",) else usd(billed),
        "usd_cap": m.budget.usd or None, "wall_hours_cap": m.budget.wall_hours or None,
        "wall_hours_left": wall_left, "forecast": fc,
        "goodput": gp["goodput"], "goodput_breakdown": gp["fraction"], "goodput_gpu_seconds": gp["gpu_seconds"],
        "ledger_vs_sacct_pct": off,
        "segments": [{"job_id": s.job_id, "restart": s.restart, "gpus": s.gpus, "start": s.start, "end": s.end,
                      "end_source": s.end_source, "end_reason": s.end_reason, "start_step": s.start_step,
                      "max_step": s.max_step, "billed_gpu_seconds": round(s.billed, 3)} for s in segs],
        "jobs": job_rows(events, segs, view, now),
        "recent_events": [{"time": e["time"], "event": e["event"], "text": describe(e)}
                          for e in [e for e in events if e["event"] != "heartbeat"][-RECENT_EVENTS:]],
        "last_heartbeat": max((e["time"] for e in events if e["event"] == "heartbeat"), default=None),
        "newest_sample": newest_sample(run.run_dir),
        "latest": {"step": last.get("step"), "time": last.get("time"), "losses": losses, "lr": last.get("lr"),
                   "grad_norm": last.get("grad_norm"), "img_per_s": last.get("img_per_s")},
        "loss_history": [r.get("loss") for r in metrics[-LOSS_HISTORY:] if r.get("loss") is not None],
        "stages": stages,
        "slurm": None if view is None else {"polled_at": view.polled_at, "error": view.error},
        "notices": notices,
    }


def to_json(s: dict) -> str:
    return json.dumps(s, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
