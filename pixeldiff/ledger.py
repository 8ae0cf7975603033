"""The run's append-only event ledger (`ledger.jsonl`), written by rank 0.

Each event is one JSON line, flushed and fsynced, so a crash loses at most the
line being written; a torn last line is skipped by `read_events`.
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
