"""The pure parsers on real output captured from the dev cluster (tests/data/slurm/, by slurm.dev.capture).

Jobs in the capture (jobs.txt): 2 done (2 nodes x 8 GPUs), 3 failed (exit 3), 4 timeout (-t 1, 2 GPUs),
5 cancelled while running, 6 requeued by hand then completed (2 nodes x 1 GPU), 7 held then cancelled.
Times in the files are the capture machine's local time, which was UTC.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from slurm.commands import SACCT_FIELDS
from slurm.nodelist import compress, expand
from slurm.parse import (gres_gpus, job_times, node_from_scontrol, parse_duration, parse_sacct, parse_scontrol_record,
                         parse_scontrol_records, parse_sinfo, parse_squeue, parse_srun_errors, parse_time, tres_count)
from slurm.types import AcctRecord, NodeInfo, QueueEntry, TaskEnd

DATA = Path(__file__).parent / "data" / "slurm"
T0 = 1795822489  # 2026-11-27T23:34:49 UTC: every job of the capture was submitted then


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def read(name: str) -> str:
    return (DATA / name).read_text()


# ---------------------------------------------------------------- nodelist

@pytest.mark.parametrize("expr, hosts", [
    ("node1", ["node1"]),
    ("node[1-3,7]", ["node1", "node2", "node3", "node7"]),
    ("node[1-2]", ["node1", "node2"]),
    ("gpu-a[01-02],gpu-b5", ["gpu-a01", "gpu-a02", "gpu-b5"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("a[1],b[3-4],c", ["a1", "b3", "b4", "c"]),
    ("None assigned", []),
    ("", []),
    ("(null)", []),
    (None, []),
])
def test_expand(expr, hosts):
    assert expand(expr) == hosts


@pytest.mark.parametrize("hosts, expr", [
    (["node1"], "node1"),
    (["node3", "node1", "node2", "node7"], "node[1-3,7]"),
    (["gpu-a01", "gpu-a02", "gpu-b5"], "gpu-a[01-02],gpu-b5"),
    (["n08", "n09", "n10"], "n[08-10]"),
    (["n8", "n9", "n10", "n10"], "n[8-10]"),
    (["login", "node2", "node1"], "login,node[1-2]"),
    ([], ""),
])
def test_compress(hosts, expr):
    assert compress(hosts) == expr
    assert sorted(expand(expr)) == sorted(set(hosts))


@pytest.mark.parametrize("bad", ["node[1-", "node]1[", "node[a-b]", "node[3-1]"])
def test_expand_rejects_malformed_expressions(bad):
    with pytest.raises(ValueError, match="hostlist"):
        expand(bad)


# ---------------------------------------------------------------- small values

@pytest.mark.parametrize("text, seconds", [
    ("0:03", 3), ("9:57", 597), ("1:02:03", 3723), ("2-03:04:05", 183845), ("1-02", 93600), ("00:01:00", 60),
    ("UNLIMITED", None), ("NOT_SET", None), ("Partition_Limit", None), ("INVALID", None),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


def test_parse_time_is_local_time():
    assert parse_time("2026-11-27T23:34:49") == T0
    assert parse_time("Unknown") is None and parse_time("None") is None and parse_time("") is None


@pytest.mark.parametrize("tres, gpus", [
    ("billing=2,cpu=2,gres/gpu=16,node=2", 16), ("billing=1,cpu=1,node=1", 0), ("", 0),
    ("cpu=8,gres/gpu:h100=8,gres/gpu=8", 8), ("cpu=8,gres/gpu:h100=4,gres/gpu:a100=2", 6),
])
def test_tres_count(tres, gpus):
    assert tres_count(tres, "gres/gpu") == gpus


@pytest.mark.parametrize("gres, gpus", [("gpu:8", 8), ("gpu:h100:8(S:0-1)", 8), ("gpu:a100:4,gpu:v100:2", 6),
                                        ("(null)", 0), ("", 0)])
def test_gres_gpus(gres, gpus):
    assert gres_gpus(gres) == gpus


# ---------------------------------------------------------------- captured output

def test_squeue():
    assert parse_squeue(read("squeue.txt")) == [
        QueueEntry("7", "PENDING", 1, [], 0.0, 600.0, "JobHeldUser"),
        QueueEntry("4", "RUNNING", 1, ["node3"], 3.0, 57.0, "node3"),
        QueueEntry("5", "RUNNING", 1, ["node1"], 3.0, 597.0, "node1"),
        QueueEntry("6", "RUNNING", 2, ["node3", "node4"], 3.0, 597.0, "node[3-4]"),
    ]


def test_squeue_rejects_another_format():
    with pytest.raises(ValueError, match="unexpected squeue line"):
        parse_squeue("  JOBID PARTITION NAME USER ST TIME NODES NODELIST(REASON)\n")


def test_sacct_one_record_per_run_with_requeues():
    recs = parse_sacct(read("sacct.txt"), SACCT_FIELDS)
    assert recs == [
        AcctRecord("2", "COMPLETED", T0, T0 + 1, 1.0, 16, ["node1", "node2"], "0:0"),
        AcctRecord("3", "FAILED", T0, T0, 0.0, 0, ["node1"], "3:0"),
        AcctRecord("4", "TIMEOUT", T0, T0 + 87, 87.0, 2, ["node3"], "0:0"),
        AcctRecord("5", "CANCELLED", T0, T0 + 3, 3.0, 0, ["node1"], "0:0"),
        AcctRecord("6", "REQUEUED", T0, T0 + 3, 3.0, 2, ["node3", "node4"], "0:0"),
        AcctRecord("7", "CANCELLED", None, T0 + 88, 0.0, 0, [], "0:0"),
        AcctRecord("6", "COMPLETED", T0 + 15, T0 + 30, 15.0, 2, ["node1", "node2"], "0:0"),
    ]
    assert sum(r.billed_gpu_seconds() for r in recs if r.job_id == "6") == 2 * 3 + 2 * 15
    assert recs[5].billed_gpu_seconds() == 0


def test_sacct_skips_job_steps():
    with_steps = parse_sacct(read("sacct_steps.txt"), SACCT_FIELDS)
    assert with_steps == parse_sacct(read("sacct.txt"), SACCT_FIELDS)
    assert len(read("sacct_steps.txt").splitlines()) == 14  # the steps really are in the file


def test_sacct_running_record_counts_to_now():
    line = ("9|x|RUNNING|2026-11-27T23:34:49|2026-11-27T23:34:49|Unknown|20|10|billing=8,cpu=8,gres/gpu=8,node=1|1|"
            "node2|0:0")
    (rec,) = parse_sacct(line, SACCT_FIELDS)
    assert rec.end is None and rec.state == "RUNNING"
    assert rec.billed_gpu_seconds(now=T0 + 20) == 160


def test_sacct_field_mismatch_is_an_error():
    with pytest.raises(ValueError, match="unexpected sacct line"):
        parse_sacct("1|COMPLETED", SACCT_FIELDS)
    with pytest.raises(ValueError, match=r"lack \['AllocTRES'\]"):
        parse_sacct("", [f for f in SACCT_FIELDS if f != "AllocTRES"])


def test_sinfo():
    assert parse_sinfo(read("sinfo.txt")) == [
        NodeInfo("node1", "mix", 8, 8), NodeInfo("node2", "idle", 8, 8),
        NodeInfo("node3", "mix", 8, 8), NodeInfo("node4", "mix", 8, 8),
    ]


def test_sinfo_flags_reason_and_ranges():
    text = ("node[1-2]|down*|8|gpu:8|Not responding\n"
            "node3|drain|8|gpu:h100:8(S:0-1)|bad gpu [root@2026-11-27T23:00:00]\n")
    assert parse_sinfo(text) == [
        NodeInfo("node1", "down", 8, 8, "Not responding", {"flags": "*"}),
        NodeInfo("node2", "down", 8, 8, "Not responding", {"flags": "*"}),
        NodeInfo("node3", "drain", 8, 8, "bad gpu [root@2026-11-27T23:00:00]"),
    ]


def test_scontrol_show_job_running():
    job = parse_scontrol_record(read("scontrol_show_job_running.txt"))
    assert (job["JobId"], job["JobName"], job["JobState"], job["Reason"]) == ("4", "timeout", "RUNNING", "None")
    assert (job["NodeList"], job["TimeLimit"], job["RunTime"]) == ("node3", "00:01:00", "00:00:03")
    assert job["TRES"] == "cpu=1,node=1,billing=1,gres/gpu=2"
    assert job["AllocNode:Sid"] == "localhost:11468" and job["NtasksPerN:B:S:C"] == "0:0:*:*"
    assert job_times(job) == {"submit": T0, "start": T0, "end": T0 + 60, "run_s": 3, "limit_s": 60}


def test_scontrol_show_job_pending_and_timeout():
    job = parse_scontrol_record(read("scontrol_show_job_pending.txt"))
    assert (job["JobState"], job["Reason"], job["NodeList"], job["Power"]) == ("PENDING", "JobHeldUser", "", "")
    assert job_times(job) == {"submit": T0, "start": None, "end": None, "run_s": 0, "limit_s": 600}
    job = parse_scontrol_record(read("scontrol_show_job_timeout.txt"))
    assert (job["JobState"], job["Reason"], job["RunTime"]) == ("TIMEOUT", "TimeLimit", "00:01:27")
    assert job_times(job)["end"] == T0 + 87


def test_scontrol_show_node():
    records = parse_scontrol_records(read("scontrol_show_node.txt"))
    assert [r["NodeName"] for r in records] == ["node1", "node2", "node3", "node4"]
    assert [r["Port"] for r in records] == ["16821", "16822", "16823", "16824"]
    assert records[0]["OS"] == "Linux 6.18.44-fc-v669 #1 SMP PREEMPT_DYNAMIC @0"  # values keep their spaces
    assert records[2]["AllocTRES"] == "cpu=2,gres/gpu=3" and records[1]["AllocTRES"] == ""
    assert [node_from_scontrol(r) for r in records] == [
        NodeInfo("node1", "mix", 8, 8), NodeInfo("node2", "idle", 8, 8),
        NodeInfo("node3", "mix", 8, 8), NodeInfo("node4", "mix", 8, 8),
    ]


def test_scontrol_node_with_flags_and_reason():
    text = "NodeName=node2 CPUTot=8\n   Gres=gpu:8\n   State=IDLE+DRAIN ThreadsPerCore=1\n" \
           "   Reason=bad gpu 3 [root@2026-11-27T23:00:00]\n"
    assert node_from_scontrol(parse_scontrol_record(text)) == NodeInfo(
        "node2", "idle", 8, 8, "bad gpu 3 [root@2026-11-27T23:00:00]", {"flags": "DRAIN"})


@pytest.mark.parametrize("capture, first, rest", [
    # captured on the dev cluster: `kill -9` of task 3 (node2) under srun --kill-on-bad-exit=1
    ("srun_task_killed.txt", TaskEnd("node2", [3], "Killed"), []),
    # task 1 exits 1: srun terminates the others (they are victims, listed after it)
    ("srun_task_exited.txt", TaskEnd("node1", [1], "Exited with exit code 1"),
     [TaskEnd("node1", [0], "Terminated"), TaskEnd("node2", [2, 3], "Terminated")]),
])
def test_srun_errors_name_the_first_task_to_die(capture, first, rest):
    assert parse_srun_errors(read(capture).splitlines()) == [first, *rest]


def test_srun_error_task_lists():
    lines = ["srun: error: gpu-a07: tasks 0,2-3,8: Killed", "some task output: error: x: task 1: y",
             "srun: error: n01-ib: task 12: Segmentation fault (core dumped)"]
    assert parse_srun_errors(lines) == [TaskEnd("gpu-a07", [0, 2, 3, 8], "Killed"),  # task output is not srun's
                                        TaskEnd("n01-ib", [12], "Segmentation fault (core dumped)")]
