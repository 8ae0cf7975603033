"""The run summary: everything `status` prints and `watch` draws, as one JSON-ready dict (keys in
docs/dashboard.md), and the events' text.

Pure over the run directory (launcher/rundir.py) plus, when given, what Slurm says (squeue,
sacct: launcher/slurmview.py). Time comes in as `now`, so tests use a fake clock. The parts:
segments and billing (pixeldiff/billing.py), goodput (launcher/goodput.py), the forecast
(launcher/forecast.py), the state (launcher/state.py).

Cost. Where `sacct` records exist they are the authority: billed = sum of each record's
GPUs x (End - Start), which also covers what the ledger cannot see (allocation before the
trainer's `segment_start`, runs that died before writing anything). `ledger_vs_sacct_pct`
says how far the ledger's own figure was off. Dollars = GPU-hours x `budget.gpu_hour_usd`.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict
from pathlib import Path

from launcher.forecast import forecast, replanned, stage_bounds, stage_rates
from launcher.goodput import goodput_breakdown
from launcher.rundir import lock_held, lock_host, newest_sample, read_run
from launcher.slurmview import RUNNING_STATES, SlurmPoller, SlurmView, last_line, match_acct, same_job, slurm_job_ids
from launcher.state import ALIVE_S, TERMINAL, run_state
from pixeldiff.billing import Segment, build_segments, close_segments, gpu_seconds_cap, run_started
from pixeldiff.ledger import read_jsonl

RECENT_EVENTS = 12
LOSS_HISTORY = 60


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
        recs = [r for r in acct if same_job(r.job_id, j)]
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
    if k == "samples_written":
        return f"samples at step {e.get('step')} ({e.get('seconds', 0):.1f} s)"
    if k == "evaluated":
        shown = " ".join(f"{m} {e[m]:.4g}" for m in EVAL_METRICS if isinstance(e.get(m), (int, float)))
        return f"eval at step {e.get('step')}: {shown} ({e.get('seconds', 0):.1f} s)"
    fields = ", ".join(f"{a}={b}" for a, b in e.items() if a not in skip)
    return f"{k.replace('_', ' ')}: {fields}" if fields else k


def _current_step(events: list[dict], metrics: list[dict]) -> int:
    stamped = [(e["time"], e["step"]) for e in events if isinstance(e.get("step"), int)]
    stamped += [(r["time"], int(r["step"])) for r in metrics]
    return max(stamped)[1] if stamped else 0


EVAL_METRICS = ("fid", "cmmd", "clip_score", "dino_mmd")


def eval_summary(records: list[dict]) -> dict:
    """eval.jsonl for the dashboard: the newest evaluation and each metric's history (oldest first)."""
    last = records[-1] if records else None
    return {"latest": None if last is None else {k: last.get(k) for k in ("step", "stage", "why", "samples", "seconds",
                                                                              "features", *EVAL_METRICS) if k in last},
            "history": {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
                        for k in EVAL_METRICS if any(isinstance(r.get(k), (int, float)) for r in records)}}


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
    cap_gpu_s = gpu_seconds_cap(m.budget)
    started = run_started(events)  # the wall clock counts from the first segment (from now, before any)
    wall_end = (now if started is None else started) + m.budget.wall_hours * 3600 if m.budget.wall_hours else None
    wall_left = max(0.0, wall_end - now) / 3600 if wall_end is not None else (
        m.budget.wall_hours if m.budget.wall_hours else None)
    gp = goodput_breakdown(segs, unmatched, billed, now)

    step = _current_step(events, metrics)
    total = int(plan.get("total_steps") or sum(r["steps"] for r in plan["stages"]))
    bounds = stage_bounds(plan)
    stage_idx = next((i for i, (_, a, b) in enumerate(bounds) if step < b), len(bounds) - 1)
    rates = stage_rates([s.metrics for s in segs], plan, gpus)
    fc = forecast(step, plan, rates, gpus, price, billed, now, cap_gpu_s, wall_end)
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
                          for e in [e for e in events if e["event"] not in ("heartbeat", "submission_started")][-RECENT_EVENTS:]],
        "last_heartbeat": max((e["time"] for e in events if e["event"] == "heartbeat"), default=None),
        "newest_sample": newest_sample(run.run_dir),
        "eval": eval_summary(read_jsonl(run.run_dir / "eval.jsonl")),
        "latest": {"step": last.get("step"), "time": last.get("time"), "losses": losses, "lr": last.get("lr"),
                   "grad_norm": last.get("grad_norm"), "img_per_s": last.get("img_per_s"),
                   "tflops_per_gpu": last.get("tflops_per_gpu"), "mfu": last.get("mfu")},
        "loss_history": [r.get("loss") for r in metrics[-LOSS_HISTORY:] if r.get("loss") is not None],
        "stages": stages,
        "slurm": None if view is None else {"polled_at": view.polled_at, "error": view.error},
        "notices": notices,
    }


def to_json(s: dict) -> str:
    return json.dumps(s, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
