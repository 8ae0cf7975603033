"""Faults of the processes and clocks around a run (issue 13): the login-node `run`/`watch` killed with SIGKILL
while the jobs run, two `run` commands on one run directory at the same moment, a job that starts hours after it
was submitted, and a wall clock that jumps forward and back.

The clocks are faked (a wall clock and a monotonic one that the test moves); the processes are real: `run` and
`watch` on the dev Slurm cluster (tests/slurmdev.py), a detached local run, real SIGKILLs.

Which clock decides what (pixeldiff/budget.py says why): inside a job, durations by the monotonic clock from one
wall reading at the job's start (the job's stop, its bill so far, heartbeats, `cancel`'s waits); across jobs, wall
time (the wall-clock budget, the next job's time limit, Slurm's end time, read as RunTime/TimeLimit durations).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launcher.job import job_window
from launcher.policy import SubmitError, next_action, time_limit_min
from launcher.manifest import load_manifest
from pixeldiff.billing import billed_gpu_seconds
from pixeldiff.budget import JobClock, margin_s
from pixeldiff.ledger import read_jsonl

REPO = Path(__file__).resolve().parents[1]
DEVCLUSTER = REPO / "manifests" / "devcluster.yaml"


def ev(event, t, **kw):
    return {"event": event, "time": t, **kw}


class FakeClocks:
    """A wall clock that can be stepped (NTP, an operator's `date -s`) and a monotonic clock that only runs."""

    def __init__(self, wall: float):
        self.wall_t, self.mono_t = wall, 5000.0

    def wall(self) -> float:
        return self.wall_t

    def monotonic(self) -> float:
        return self.mono_t

    def run(self, seconds: float) -> None:
        self.wall_t += seconds
        self.mono_t += seconds

    def step_wall(self, seconds: float) -> None:
        self.wall_t += seconds


def slurm_manifest(*sets):
    return load_manifest(DEVCLUSTER, ["cluster.max_job_hours=1", *sets])


# ------------------------------------------------------------------ clocks (fake)


@pytest.mark.parametrize("jump_s", [2 * 3600.0, -2 * 3600.0])
def test_a_wall_clock_stepped_mid_job_moves_neither_the_stop_nor_the_bill(jump_s):
    """A 1-hour job (Slurm's end at t0 + 3600), $ cap far away. Ten minutes in, the node's wall clock is stepped by
    +-2 h. Forward, a wall-clock reading would stop the job at once (its end looks 50 minutes past) and bill 2 h
    more; back, it would train past Slurm's end and be killed without its final checkpoint. The job's clock counts
    on: no stop before its end's margin, the stop at it, 600 s billed at the jump."""
    t0, gpus, step, ckpt = 1_000_000.0, 4, 1.0, 10.0
    c = FakeClocks(t0 + 20)  # the trainer starts 20 s after Slurm's allocation
    m = slurm_manifest("budget.usd=100")  # 100 GPU-hours at $1: never the binding limit here
    clock = JobClock(m, [], [], gpus=gpus, start=t0, under_slurm=True, environ={"PIXELDIFF_DEADLINE": str(t0 + 3600)},
                     wall=c.wall, monotonic=c.monotonic)
    clock.observe_step(step)
    clock.observe_save(ckpt)
    c.run(580)
    assert clock.stop_reason() is None and clock.billed() == pytest.approx(gpus * 600)
    c.step_wall(jump_s)
    assert clock.now() == pytest.approx(t0 + 600) and clock.billed() == pytest.approx(gpus * 600)
    assert clock.stop_reason() is None
    margin = margin_s(step, ckpt, clock.samples_s or clock.samples_estimate())
    c.run(3600 - 600 - margin - 1)
    assert clock.stop_reason() is None
    c.run(1)
    assert clock.stop_reason() == "deadline"  # by the job's own count: inside Slurm's limit whatever the wall says
    assert clock.elapsed() == pytest.approx(3600 - margin)


def test_a_wall_clock_stepped_mid_job_does_not_bill_the_step():
    """The ledger's times are wall times (for people, and across hosts); a segment's end also carries its job's
    monotonic `elapsed_s`, and billing takes start + elapsed_s: a +5 h step during a 10-minute job bills 10 minutes
    (and the next job's time limit and the dollar cap see the same), a -5 h step is not billed as nothing."""
    start = 1_000_000.0
    for jump in (5 * 3600.0, -5 * 3600.0):
        events = [ev("segment_start", start + 20, gpus=4, job_id="7", job_start=start),
                  ev("heartbeat", start + 300 + jump, elapsed_s=300.0),
                  ev("segment_end", start + 600 + jump, reason="deadline", step=100, elapsed_s=600.0),
                  ev("step_ended", start + 605 + jump, job_id="7", restart=0, exit_status=0, elapsed_s=605.0)]
        assert billed_gpu_seconds(events) == pytest.approx(4 * 605)
        # without elapsed_s (a ledger from before it existed), the wall times still count, as they always did
        legacy = [{k: v for k, v in e.items() if k != "elapsed_s"} for e in events]
        assert billed_gpu_seconds(legacy) == pytest.approx(max(0.0, 4 * (605 + jump)))
    # the next job's limit: $1/GPU-hour, $1 = 3600 GPU-s, 4 GPUs: 605 s billed leaves 295 s of the run's GPUs
    m = slurm_manifest("budget.usd=1", "cluster.gpus_per_node=2")
    events = [ev("segment_start", start + 20, gpus=4, job_id="7", job_start=start),
              ev("segment_end", start + 600 + 5 * 3600, reason="deadline", step=100, elapsed_s=600.0)]
    assert time_limit_min(m, events, start + 700 + 5 * 3600) == (3600 - 4 * 600) // 4 // 60


def test_a_job_queued_for_hours_stops_inside_the_wall_budget():
    """The run's first job ran 1 h of a 4-hour wall-clock budget; the next job was sized at submission (1 h limit,
    3 h left) but waited 2.5 h in the queue. It starts with 30 minutes of budget left: it stops for the budget at
    the wall budget's end less the margin, long before its own end; its bill starts at its allocation, not at its
    submission."""
    t0, step, ckpt = 1_000_000.0, 1.0, 10.0
    m = slurm_manifest("budget.wall_hours=4")
    past = [ev("segment_start", t0, gpus=4, job_id="1", job_start=t0),
            ev("segment_end", t0 + 3600, reason="deadline", step=500, elapsed_s=3600.0),
            ev("job_submitted", t0 + 3610, job_id="2", time_limit_min=60)]
    assert time_limit_min(m, past[:2], t0 + 3610) == 60  # 3 h left at submission: a full job
    started = t0 + 3610 + 2.5 * 3600
    c = FakeClocks(started + 15)
    clock = JobClock(m, past, [], gpus=4, start=started, under_slurm=True,
                     environ={"PIXELDIFF_DEADLINE": str(started + 3600)}, wall=c.wall, monotonic=c.monotonic)
    clock.observe_step(step)
    assert clock.billed() == pytest.approx(4 * 3600 + 4 * 15)  # the first job's hour and this one's 15 s
    wall_end = t0 + 4 * 3600
    margin = margin_s(step, clock.checkpoint_s, clock.samples_s or clock.samples_estimate())
    c.run(wall_end - margin - 1 - c.wall_t)
    assert clock.stop_reason() is None
    c.run(1)
    assert clock.stop_reason() == "budget"
    assert c.wall_t < started + 3600 - 1000  # in time for the budget, far from the job's own end
    assert not clock.next_job_affordable()


def test_a_job_that_starts_after_the_wall_budget_ended_stops_at_once_and_nothing_follows():
    t0 = 1_000_000.0
    m = slurm_manifest("budget.wall_hours=2")
    past = [ev("segment_start", t0, gpus=4, job_id="1", job_start=t0),
            ev("segment_end", t0 + 3600, reason="deadline", step=500, elapsed_s=3600.0),
            ev("job_submitted", t0 + 3610, job_id="2", time_limit_min=59)]
    started = t0 + 3 * 3600  # queued for 2 h: the wall budget ended an hour ago
    c = FakeClocks(started + 10)
    clock = JobClock(m, past, [], gpus=4, start=started, under_slurm=True,
                     environ={"PIXELDIFF_DEADLINE": str(started + 3540)}, wall=c.wall, monotonic=c.monotonic)
    assert clock.stop_reason() == "budget"  # at the first step boundary
    action = next_action(m, past, "budget", c.wall_t + 30, started + 3540, 3, 15.0)
    assert action.kind == "none"
    with pytest.raises(SubmitError, match="less than one useful job segment"):
        time_limit_min(m, past, c.wall_t + 30)
    # and a preemption of such a job does not requeue it either: the budget is spent
    stop = next_action(m, past, "signal SIGUSR2", c.wall_t + 30, started + 3540, 3, 15.0)
    assert stop.kind == "stop" and stop.stop_kind == "budget"


def test_a_dollar_budget_is_not_spent_by_a_queued_job():
    """Queued time costs nothing: 2 h in the queue, then the job's bill starts at its allocation."""
    t0 = 1_000_000.0
    m = slurm_manifest("budget.usd=2")  # 2 GPU-hours at $1 = 7200 GPU-s; 4 GPUs: 1800 s of the run
    past = [ev("job_submitted", t0, job_id="1", time_limit_min=30)]
    started = t0 + 2 * 3600
    c = FakeClocks(started + 5)
    clock = JobClock(m, past, [], gpus=4, start=started, under_slurm=True,
                     environ={"PIXELDIFF_DEADLINE": str(started + 1800)}, wall=c.wall, monotonic=c.monotonic)
    assert clock.billed() == pytest.approx(4 * 5)
    assert clock.stop_reason() is None
    c.run(1800 - 5 - margin_s(0.0, 10.0, clock.samples_estimate()))
    assert clock.stop_reason() == "budget"


def test_slurms_end_time_is_read_as_durations_on_the_nodes_own_clock():
    """The supervisor reads `scontrol show job` once: RunTime and TimeLimit are durations, so the deadline it hands
    the trainer is right on this node's clock even when the controller's clock is an hour off."""
    controller_start = 1_000_000.0
    node_now = controller_start + 3600 + 12  # this node's clock is an hour ahead; the job has run 12 s
    t = {"start": controller_start, "end": controller_start + 7200, "run_s": 12.0, "limit_s": 7200.0}
    assert job_window(t, node_now) == (node_now - 12, node_now - 12 + 7200)
    assert job_window({"start": 5.0, "end": 65.0, "run_s": None, "limit_s": None}, 100.0) == (5.0, 65.0)
