"""The run's append-only event ledger (`ledger.jsonl`), written by rank 0.

Each event is one JSON line, flushed and fsynced, so a crash loses at most the
line being written; a torn last line is skipped by `read_jsonl`. Every event has
`event` and `time` (Unix seconds). The vocabulary:

written by rank 0 of a job (pixeldiff.train):
  segment_start     job_id, restart, nodes, gpus, nodelist, device, launcher, step,
                    job_start (Slurm's start time of this job run: billing counts from it)
  heartbeat         step                                  (every minute)
  checkpoint_saved  step, checkpoint, seconds_blocked (the loop waited), seconds_write, bytes, async
                    (written when the save is complete: a background save, a few steps later)
  stage_change      step, stage, previous
  schedule_change   step, ends, previous (cumulative stage ends; budget.policy finish_stages, extend_last_stage)
  under_budget      step, projected_end, projected_gpu_hours, projected_usd, seconds_needed, seconds_left, policy
                    (at a job's start: the schedule would end far inside the budget at the measured speed)
  warning           message, step
  samples_written   step, grid (its path), seconds (its time sizes the stop margin)
  budget_stop       step, billed_gpu_seconds
  segment_end       reason (finished | budget | deadline | signal SIGxxx | failed: ...), step
written by the launcher (login node, or the job's submitit wrapper):
  job_submitted     job_id, nodes, gpus, exclude (list of nodes), partition
  step_ended        job_id, restart, exit_status (the supervisor, after the training step; billing ends here)
  requeue_requested job_id, kind (timeout | preemption), restart
  job_failed        job_id, node (or null), message, failures (consecutive start-up failures)
  node_excluded     node, job_id, reason
  cancel_requested  job_ids
  run_stopped       reason (why the launcher will not submit or requeue again),
                    kind (cancelled | failed | limits | budget)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def append_event(path: Path, event: str, **fields) -> dict:
    record = {"event": event, "time": time.time(), **fields}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return record


def read_jsonl(path: Path) -> list[dict]:
    """All complete JSON lines of a file; a torn or corrupt line is skipped."""
    out = []
    if not Path(path).exists():
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
