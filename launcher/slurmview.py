"""What Slurm says about a run's jobs: one poll of squeue and sacct (`SlurmView`), a poller that asks at most every
few seconds and keeps its last answer when Slurm does not answer, and the pairing of sacct's records (one per run of
a job) with the ledger's segments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pixeldiff.billing import Segment
from slurm.commands import SlurmError
from slurm.types import AcctRecord, QueueEntry

QUEUED_STATES = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED")
RUNNING_STATES = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING")
FAILED_STATES = ("FAILED", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY", "DEADLINE", "TIMEOUT")


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


def same_job(record_id: str, job_id: str) -> bool:
    return record_id == job_id or record_id.split("_")[0] == job_id.split("_")[0] and "_" not in job_id


def match_acct(segs: list[Segment], acct: list[AcctRecord]) -> list[AcctRecord]:
    """Pair each segment with the run of its job that contains its start. -> records no segment matched."""
    free = [r for r in acct if r.start is not None]
    for s in segs:
        best = None
        for r in free:
            if same_job(r.job_id, s.job_id) and r.start <= s.start + 1.0 and (r.end is None or r.end >= s.start - 1.0):
                if best is None or r.start > best.start:
                    best = r
        if best is not None:
            s.acct = best
            free.remove(best)
    return free


def last_line(text: str) -> str:
    """The last non-empty line of a command's error (where Slurm's tools say what went wrong)."""
    lines = [x.strip() for x in str(text).splitlines() if x.strip()]
    return lines[-1] if lines else ""
