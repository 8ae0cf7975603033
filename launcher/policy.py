"""What comes after a job segment, as pure functions of the manifest, the ledger and the clock.

`next_action` decides, for the segment's end reason:
- the schedule is done, or the money is: nothing; the run is over;
- stopped before the time limit or by a signal: `scontrol requeue` (the same job id runs
  again and resumes from the checkpoint just written), or a fresh submission when the job
  must change (a shorter time limit so the last segment cannot pass the budget);
- failed: the node that failed is excluded and a fresh job is submitted, until
  `cluster.max_failures` jobs in a row failed without saving a checkpoint;
- cancelled (`pixeldiff-launch cancel`): nothing.
`time_limit_min` sizes the next job to the budget; `excluded_nodes` are the manifest's and the
ledger's; `cpus_per_task` gives each task its share of a node's CPUs. launcher/job.py carries the decision out; launcher/submit.py submits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.plan import make_plan
from pixeldiff.billing import billed_gpu_seconds, gpu_seconds_cap, run_started
from pixeldiff.budget import next_job_possible
from pixeldiff.config import Manifest


class SubmitError(Exception):
    """Submission was refused or impossible (budget spent, Slurm error); the message says why."""


def submitted_jobs(events: list[dict]) -> list[str]:
    return [str(e["job_id"]) for e in events if e["event"] == "job_submitted"]


def excluded_nodes(m: Manifest, events: list[dict]) -> list[str]:
    nodes = list(m.cluster.exclude)
    for e in events:
        if e["event"] == "node_excluded" and e["node"] not in nodes:
            nodes.append(e["node"])
    return nodes


def min_cpus_per_task(m: Manifest) -> int:
    """What one task needs: its training process, the pin-memory thread, and its data workers."""
    return m.data.workers + 2


def cpus_per_task(m: Manifest, nodes: list | None, exclude: list[str] = ()) -> int:
    """`cluster.cpus_per_task`, or when 0 the smallest usable node's CPUs (sinfo's NodeInfo list, of the partition)
    divided by the tasks per node; without node information, the data workers + 2 (`min_cpus_per_task`)."""
    if m.cluster.cpus_per_task:
        return m.cluster.cpus_per_task
    cpus = [n.cpus for n in nodes or () if n.name not in exclude and n.cpus > 0]
    if not cpus:
        return min_cpus_per_task(m)
    return max(1, min(cpus) // max(1, m.cluster.gpus_per_node))


def time_limit_min(m: Manifest, events: list[dict], now: float) -> int:
    """The next job's time limit: `cluster.max_job_hours`, cut so that the job cannot pass the dollar
    cap or the wall-clock cap. Raises SubmitError when less than a useful segment is left."""
    limit = max(1, round(m.cluster.max_job_hours * 60))
    left_s = []
    cap = gpu_seconds_cap(m.budget)
    if cap is not None:
        left_s.append((cap - billed_gpu_seconds(events)) / m.world_size)
    started = run_started(events)
    if m.budget.wall_hours and started is not None:
        left_s.append(started + m.budget.wall_hours * 3600 - now)
    if left_s:
        left = min(left_s)
        if not next_job_possible(left, limit * 60):
            raise SubmitError(f"the budget has {max(0.0, left):.0f} s of the run's GPUs left, less than one useful "
                              f"job segment: not submitting; the run is over budget")
        limit = min(limit, int(left // 60))
    return limit


def plan_jobs(m: Manifest) -> dict:
    """The plan's job section: time limit, USR2 lead, requeue limits (launcher.plan.job_plan)."""
    return make_plan(m)["jobs"]


@dataclass
class Action:
    kind: str  # "requeue" | "resubmit" | "stop" | "none"
    message: str = ""
    requeue_kind: str = ""  # timeout | preemption
    exclude: list[str] = field(default_factory=list)  # nodes newly excluded
    stop_kind: str = ""  # for "stop": cancelled | failed | limits | budget


def since_last(events: list[dict], name: str) -> list[dict]:
    idx = max((i for i, e in enumerate(events) if e["event"] == name), default=-1)
    return events[idx + 1:]


def next_action(m: Manifest, events: list[dict], reason: str, now: float, job_end: float | None,
                max_timeouts: int, lead_s: float, failed_nodes: tuple[str, ...] = ()) -> Action:
    """What the run does after this segment ended for `reason` (the trainer's: finished, budget, deadline,
    'signal SIGxxx', 'diverged' or 'failed: ...'). Pure: the ledger, the clock and the job's end time decide."""
    if reason in ("finished", "budget"):
        return Action("none", "finished" if reason == "finished" else "the budget is spent")
    if reason == "diverged":  # another job would start from the same checkpoint and diverge the same way
        return Action("stop", "the run diverged (the ledger's segment_end names the step and the last good "
                              "checkpoint); lower optimizer.lr or allow more optimizer.max_rollbacks, then run again",
                      stop_kind="failed")
    if any(e["event"] == "cancel_requested" for e in since_last(events, "job_submitted")):
        return Action("stop", "cancelled by pixeldiff-launch cancel", stop_kind="cancelled")
    if reason.startswith("failed"):
        failures = 1 + sum(1 for e in since_last(events, "checkpoint_saved") if e["event"] == "job_failed")
        if failures >= m.cluster.max_failures:
            return Action("stop", f"{failures} jobs in a row failed without saving a checkpoint "
                                  f"(cluster.max_failures = {m.cluster.max_failures}); last: {reason}", stop_kind="failed")
        return Action("resubmit", f"job failed ({reason}); resubmitting", exclude=list(failed_nodes))
    # stopped before its time limit, or by a signal: timeout or preemption?
    near_end = job_end is not None and now >= job_end - lead_s - 90  # USR2 may come up to 60 s early
    kind = "timeout" if reason == "deadline" or near_end else "preemption"
    done = sum(1 for e in events if e["event"] == "requeue_requested" and e.get("kind") == kind)
    cap = max_timeouts if kind == "timeout" else m.cluster.max_preemptions
    if done >= cap:
        what = "cluster.max_timeouts" if kind == "timeout" else "cluster.max_preemptions"
        return Action("stop", f"{done} requeues after a {kind} already ({what} = {cap}); not requeueing",
                      stop_kind="limits")
    try:
        minutes = time_limit_min(m, events, now)
    except SubmitError as e:
        return Action("stop", str(e), stop_kind="budget")
    full = max(1, round(m.cluster.max_job_hours * 60))
    if minutes < full:  # the job must shrink to stay inside the budget: a fresh job with a shorter limit
        return Action("resubmit", f"{kind}: resubmitting with a {minutes} min limit to stay inside the budget",
                      requeue_kind=kind)
    return Action("requeue", f"{kind}: requeueing", requeue_kind=kind)
