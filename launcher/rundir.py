"""Reading a run directory: the resolved manifest, the plan, the ledger's events and the metrics records, and
whether a local run's trainer holds the run's lock (looked at without taking it).

A torn last line of ledger.jsonl or metrics.jsonl is ignored (pixeldiff/ledger.py read_jsonl).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pixeldiff.config import ConfigError, Manifest, load_resolved
from pixeldiff.ledger import read_jsonl


def ledger_path(run_dir: Path) -> Path:
    return Path(run_dir) / "ledger.jsonl"


def events_of(run_dir: Path) -> list[dict]:
    """The ledger's events as written (launcher/job.py, launcher/submit.py and the CLI's decisions read these)."""
    return read_jsonl(ledger_path(run_dir))


class RunDirError(Exception):
    """The path is not a run directory this project wrote; the message says what is missing."""


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


def newest_sample(run_dir: Path) -> str | None:
    files = sorted((Path(run_dir) / "samples").glob("*.png"))
    return str(files[-1]) if files else None
