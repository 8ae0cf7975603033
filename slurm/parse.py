"""Pure parsers of Slurm command output (no subprocess here): text in, slurm.types records out.

srun's own stderr lines (`srun: error: node2: task 3: Killed`) say which tasks of a step ended badly.
The squeue/sacct/sinfo formats are the explicit ones slurm.commands asks for (SQUEUE_FORMAT, SACCT_FIELDS,
SINFO_FORMAT); scontrol's `Key=Value` output is parsed generically. Times are local wall-clock strings
(`2026-11-27T23:45:01`) turned into Unix seconds; "Unknown"/"None" become None.
"""

from __future__ import annotations

import re
import time

from slurm.nodelist import expand
from slurm.types import AcctRecord, NodeInfo, QueueEntry, TaskEnd

_NO_TIME = {"", "Unknown", "None", "N/A", "(null)"}
_NO_LIMIT = {"UNLIMITED", "NOT_SET", "INVALID", "Partition_Limit", "N/A", ""}
_NODE_FLAGS = "*~#!%$@^-+"  # sinfo's state suffixes: not responding, powered down, ... (man sinfo, NODE STATE CODES)


def parse_time(text: str | None) -> float | None:
    """`2026-11-27T23:45:01` (local time, as Slurm prints it) -> Unix seconds; Unknown/None/"" -> None."""
    if text is None or text.strip() in _NO_TIME:
        return None
    return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))


def parse_duration(text: str | None) -> float | None:
    """Slurm durations -> seconds: `05` `4:05` `3:04:05` `2-03:04:05` `2-03` (days-hours) ; UNLIMITED etc. -> None."""
    if text is None or text.strip() in _NO_LIMIT:
        return None
    text = text.strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        if ":" not in text:  # "D-HH"
            return float(days * 86400 + int(text) * 3600)
    parts = [float(p) for p in text.split(":")]
    if len(parts) > 3:
        raise ValueError(f"not a Slurm duration: {text!r}")
    while len(parts) < 3:
        parts.insert(0, 0.0)
    h, m, s = parts
    return days * 86400 + h * 3600 + m * 60 + s


def base_state(state: str) -> str:
    """`CANCELLED by 0` -> `CANCELLED`; `RUNNING` -> `RUNNING`."""
    return state.strip().split(" ", 1)[0] if state.strip() else ""


def tres_count(tres: str, name: str) -> int:
    """`billing=2,cpu=2,gres/gpu=16,node=2`, "gres/gpu" -> 16 (0 when absent). Typed GPUs (gres/gpu:h100=8)
    are counted only when the untyped total is missing."""
    total, typed = None, 0
    for item in tres.split(","):
        key, _, value = item.partition("=")
        if key == name:
            total = int(_count(value))
        elif key.startswith(name + ":"):
            typed += int(_count(value))
    return total if total is not None else typed


def _count(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTP]?)", value.strip())
    if not m:
        return 0
    return float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}[m.group(2)]


# ---------------------------------------------------------------- squeue


def parse_squeue(text: str) -> list[QueueEntry]:
    """Lines of `squeue --noheader --format=%i|%T|%D|%M|%L|%N|%R`."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|", 6)
        if len(fields) != 7:
            raise ValueError(f"unexpected squeue line (want 7 '|'-separated fields: %i|%T|%D|%M|%L|%N|%R): {line!r}")
        job_id, state, nodes, elapsed, left, nodelist, reason = fields
        out.append(QueueEntry(job_id=job_id.strip(), state=state.strip(), nodes=int(nodes or 0),
                              nodelist=expand(nodelist), elapsed_s=parse_duration(elapsed) or 0.0,
                              time_left_s=parse_duration(left), reason=_unparen(reason.strip())))
    return out


def _unparen(reason: str) -> str:
    """squeue prints a pending reason in parentheses: `(JobHeldUser)` -> `JobHeldUser`; a node list stays."""
    return reason[1:-1] if reason.startswith("(") and reason.endswith(")") else reason


# ---------------------------------------------------------------- sacct


def parse_sacct(text: str, fields: tuple[str, ...] | list[str]) -> list[AcctRecord]:
    """`sacct --parsable2 --noheader [--duplicates] --format=<fields>` -> one record per run of each job.

    `fields` must name JobID, State, Start, End, ElapsedRaw, AllocTRES, NodeList and ExitCode (any order,
    more allowed). Step lines (123.batch, 123.extern, 123.0) are skipped."""
    need = ("JobID", "State", "Start", "End", "ElapsedRaw", "AllocTRES", "NodeList", "ExitCode")
    missing = [f for f in need if f not in fields]
    if missing:
        raise ValueError(f"sacct fields {list(fields)} lack {missing}")
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        values = line.split("|")
        if len(values) != len(fields):
            raise ValueError(f"unexpected sacct line ({len(values)} fields, want {len(fields)}: {fields}): {line!r}")
        row = dict(zip(fields, values))
        if "." in row["JobID"]:
            continue
        restarts = row.get("Restarts")
        out.append(AcctRecord(
            job_id=row["JobID"], state=base_state(row["State"]), start=parse_time(row["Start"]),
            end=parse_time(row["End"]), elapsed_s=float(row["ElapsedRaw"] or 0),
            alloc_gpus=tres_count(row["AllocTRES"], "gres/gpu"), nodelist=expand(row["NodeList"]),
            exit_code=row["ExitCode"], restarts=int(restarts) if restarts not in (None, "") else None))
    return out


# ---------------------------------------------------------------- sinfo


def parse_sinfo(text: str) -> list[NodeInfo]:
    """Lines of `sinfo --noheader --Node --format=%N|%t|%c|%G|%E` (one line per node and partition: a node in
    two partitions is reported once)."""
    out, seen = [], set()
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|", 4)
        if len(fields) != 5:
            raise ValueError(f"unexpected sinfo line (want %N|%t|%c|%G|%E): {line!r}")
        names, state, cpus, gres, reason = fields
        flags = "".join(ch for ch in state if ch in _NODE_FLAGS)
        for name in expand(names):
            if name in seen:
                continue
            seen.add(name)
            out.append(NodeInfo(name=name, state=state.strip().rstrip(_NODE_FLAGS).lower(), cpus=int(cpus),
                                gpus=gres_gpus(gres), reason="" if reason.strip() == "none" else reason.strip(),
                                extra={"flags": flags} if flags else {}))
    return out


def gres_gpus(gres: str) -> int:
    """`gpu:8`, `gpu:h100:8(S:0-1)`, `gpu:a100:4,gpu:v100:2` -> total GPUs; `(null)` -> 0."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres):
        item = re.sub(r"\(.*?\)", "", item).strip()
        parts = item.split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


# ---------------------------------------------------------------- scontrol

_KEY = re.compile(r"^[A-Za-z][\w/:.]*=")


def parse_scontrol_record(text: str) -> dict[str, str]:
    """One `scontrol show job|node` record -> {key: value}. Values keep their spaces (Reason=Not responding
    [slurm@...], OS=Linux 6.1 ...): a word without `Key=` continues the previous value."""
    records = parse_scontrol_records(text)
    if len(records) != 1:
        raise ValueError(f"expected one scontrol record, got {len(records)}")
    return records[0]


def parse_scontrol_records(text: str) -> list[dict[str, str]]:
    """Every record of `scontrol show ...` output (records are separated by blank lines)."""
    records, cur, last = [], {}, None
    for line in text.splitlines():
        if not line.strip():
            if cur:
                records.append(cur)
            cur, last = {}, None
            continue
        for word in line.split():
            if _KEY.match(word):
                key, _, value = word.partition("=")
                cur[key] = value
                last = key
            elif last is not None:
                cur[last] = f"{cur[last]} {word}"
    if cur:
        records.append(cur)
    return records


def job_times(record: dict[str, str]) -> dict[str, float | None]:
    """The times a launcher needs from a `scontrol show job` record, in Unix seconds / seconds."""
    return {"submit": parse_time(record.get("SubmitTime")), "start": parse_time(record.get("StartTime")),
            "end": parse_time(record.get("EndTime")), "run_s": parse_duration(record.get("RunTime")),
            "limit_s": parse_duration(record.get("TimeLimit"))}


_LONG_STATES = {"allocated": "alloc", "mixed": "mix", "draining": "drng", "drained": "drain", "completing": "comp"}


def node_from_scontrol(record: dict[str, str]) -> NodeInfo:
    """A `scontrol show node` record -> NodeInfo (State=IDLE+DRAIN -> state "idle", extra["flags"] "DRAIN")."""
    state, _, flags = record.get("State", "").partition("+")
    state = state.lower().rstrip(_NODE_FLAGS)
    return NodeInfo(name=record["NodeName"], state=_LONG_STATES.get(state, state), cpus=int(record.get("CPUTot", 0)),
                    gpus=gres_gpus(record.get("Gres", "")), reason=record.get("Reason", "").strip(),
                    extra={"flags": flags} if flags else {})


# ---------------------------------------------------------------- srun

_SRUN_TASKS = re.compile(r"^srun: error: (?P<node>[^:\s]+): tasks? (?P<tasks>[\d,\-]+): (?P<what>.+?)\s*$")


def _task_ids(text: str) -> list[int]:
    """`3` `0-1` `0,2-3` -> [3] [0, 1] [0, 2, 3]."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def parse_srun_errors(lines) -> list[TaskEnd]:
    """srun's stderr lines -> the tasks that ended badly, in srun's order (the first names the first to die).
    Lines that are not task ends (step cancelled, Job step aborted, the tasks' own output) are skipped."""
    out = []
    for line in lines:
        m = _SRUN_TASKS.match(line.strip())
        if m:
            out.append(TaskEnd(node=m["node"], tasks=_task_ids(m["tasks"]), what=m["what"]))
    return out
