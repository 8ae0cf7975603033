"""The run's state, one set of rules for `run`, `status` and `watch`: queued | running | finished | failed |
over_budget | cancelled, with the reason.

From the ledger's segments and events, plus (when given) whether the run's lock is held and what
squeue/sacct say. `run_over` is the part that needs neither: whether the run has ended for good
(finished, or the budget is spent), so that `run` does not submit it again.
"""

from __future__ import annotations

from launcher.slurmview import FAILED_STATES, QUEUED_STATES, RUNNING_STATES, SlurmView
from pixeldiff.billing import Segment, build_segments

ALIVE_S = 180.0  # without squeue or a lock: an open segment seen this recently is running
TERMINAL = ("finished", "failed", "over_budget", "cancelled")


def _last_stop(events: list[dict], segs: list[Segment]) -> tuple[list[dict], str, str]:
    """The run_stopped events since the run was last (re)started, their last one's kind and reason. run_stopped: the
    launcher will not go on (until someone runs the manifest again: a later submit or start)."""
    last_start_t = segs[-1].start if segs else float("-inf")
    restarted = max([e["time"] for e in events if e["event"] == "job_submitted"] + [last_start_t])
    stopped = [e for e in events if e["event"] == "run_stopped" and e["time"] >= restarted]
    stop_reason = str(stopped[-1].get("reason", "")) if stopped else ""
    stop_kind = str(stopped[-1].get("kind") or "") if stopped else ""
    if stopped and not stop_kind:  # a ledger from before run_stopped had a kind
        stop_kind = "budget" if "budget" in stop_reason.lower() else (
            "cancelled" if "cancel" in stop_reason.lower() else "failed")
    return stopped, stop_kind, stop_reason


def run_over(events: list[dict], segs: list[Segment] | None = None) -> tuple[str, str] | None:
    """(state, why) when the run has ended for good: finished, or over_budget; else None. `segs`: the ledger's
    segments (built from `events` when not given)."""
    segs = build_segments(events, []) if segs is None else segs
    last_end = segs[-1].end_reason if segs else None
    last_start_t = segs[-1].start if segs else float("-inf")
    _, stop_kind, stop_reason = _last_stop(events, segs)
    budget_stop = any(e["event"] == "budget_stop" and e["time"] >= last_start_t for e in events)
    if last_end == "finished":
        return "finished", "the last segment ended: finished"
    if not (segs and segs[-1].open) and (last_end == "budget" or budget_stop):
        return "over_budget", "the budget is spent (segment ended: budget)"
    if stop_kind == "budget":
        return "over_budget", f"run stopped: {stop_reason}"
    return None


def run_state(events: list[dict], segs: list[Segment], backend: str, live: bool | None, view: SlurmView | None,
              now: float) -> tuple[str, str]:
    """-> (state, why): queued | running | finished | failed | over_budget | cancelled."""
    over = run_over(events, segs)
    if over is not None:
        return over
    last_end = segs[-1].end_reason if segs else None
    open_seg = bool(segs) and segs[-1].open
    last_start_t = segs[-1].start if segs else float("-inf")
    cancels = [e for e in events if e["event"] == "cancel_requested"]
    submits = [e for e in events if e["event"] == "job_submitted"]
    stopped, stop_kind, stop_reason = _last_stop(events, segs)
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
