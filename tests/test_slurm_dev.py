"""The Slurm client and the dev cluster against real Slurm daemons on 127.0.0.1 (fixture: slurm_cluster).

The two slow jobs (a 1-minute time limit, a requeue) are submitted once per module at the start, run while
the quick tests run, and are checked by the last tests, so the module takes about as long as the time limit.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm.commands import Slurm, SlurmError
from slurm.nodelist import expand

REPO = Path(__file__).resolve().parents[1]


def sbatch(cluster, *args: str, script: str) -> str:
    r = subprocess.run(["sbatch", "--parsable", *args, "--wrap", script], env=cluster.env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def finished(slurm: Slurm, job_id: str) -> bool:
    return job_id not in slurm.queue([job_id])


@pytest.fixture(scope="module")
def slow_jobs(slurm_cluster, tmp_path_factory):
    """Submitted first, checked last: a job that hits `-t 1` after being warned with USR2, and a requeued one."""
    out = tmp_path_factory.mktemp("slow")
    # the batch shell itself traps USR2 (--signal=B:...), logs it and keeps running into the time limit
    timeout = sbatch(slurm_cluster, "-t", "1", "--signal=B:USR2@45", "--gpus-per-node=1", f"--output={out}/t.out",
                     script=f"trap 'date +%s > {out}/usr2' USR2; date +%s > {out}/start; "
                            "for i in $(seq 300); do sleep 1; done")
    requeued = sbatch(slurm_cluster, "-N2", "--gpus-per-node=2", "--requeue", f"--output={out}/r.out",
                      script=f"echo run >> {out}/runs; sleep 4")
    return {"timeout": timeout, "requeued": requeued, "dir": out}


@pytest.fixture
def slurm(slurm_cluster):
    return Slurm(min_interval_s=0, timeout_s=20, env=slurm_cluster.slurm_env)


def test_requeue_by_hand(slurm_cluster, slurm, slow_jobs):
    job = slow_jobs["requeued"]
    wait_until(lambda: slurm.queue([job]).get(job) and slurm.queue([job])[job].state == "RUNNING", 30, "running")
    slurm.requeue(job)
    # cred_expire=10: the requeued job starts again ~12 s later and then completes
    wait_until(lambda: finished(slurm, job) or None, 60, "the requeued job to finish", interval=1)
    runs = wait_until(lambda: [r for r in slurm.accounting([job]) if r.state != "RUNNING"] if
                      len(slurm.accounting([job])) == 2 else None, 15, "two sacct records")
    assert [r.state for r in runs] == ["REQUEUED", "COMPLETED"]
    assert all(r.job_id == job and r.alloc_gpus == 4 and len(r.nodelist) == 2 for r in runs)
    assert runs[0].end <= runs[1].start
    assert (slow_jobs["dir"] / "runs").read_text().count("run") == 2


def test_two_node_job_sees_its_slurm_environment(slurm_cluster, slurm, tmp_path):
    script = ("srun bash -c 'echo $SLURM_PROCID $SLURM_NODEID $SLURM_LOCALID $SLURM_NTASKS $SLURM_JOB_NUM_NODES "
              f"$SLURMD_NODENAME $SLURM_JOB_NODELIST $CUDA_VISIBLE_DEVICES > {tmp_path}/rank$SLURM_PROCID'")
    job = sbatch(slurm_cluster, "-N2", "--ntasks-per-node=2", "--gpus-per-node=8", f"--output={tmp_path}/out",
                 script=script)
    wait_until(lambda: finished(slurm, job), 60, f"job {job}")
    rows = sorted(f.read_text().split() for f in tmp_path.glob("rank*"))
    assert len(rows) == 4, (tmp_path / "out").read_text()
    nodes = expand(rows[0][6])
    assert len(nodes) == 2 and set(nodes) <= set(slurm_cluster.nodes)
    for procid, nodeid, localid, ntasks, nnodes, nodename, nodelist, cuda in rows:
        assert (int(nodeid), int(localid)) == divmod(int(procid), 2)
        assert (ntasks, nnodes, nodelist) == ("4", "2", rows[0][6])
        assert nodename == nodes[int(nodeid)]
        assert cuda == "0,1,2,3,4,5,6,7"
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]


def test_queue_and_accounting_batch_all_jobs_into_one_call(slurm_cluster, tmp_path):
    now = [0.0]
    slurm = Slurm(min_interval_s=10, env=slurm_cluster.slurm_env, clock=lambda: now[0])
    running = sbatch(slurm_cluster, "-N2", "--gpus-per-node=3", f"--output={tmp_path}/%j.out", script="sleep 60")
    held = sbatch(slurm_cluster, "--hold", f"--output={tmp_path}/%j.out", script="true")
    wait_until(lambda: Slurm(0, env=slurm_cluster.slurm_env).queue([running])[running].state == "RUNNING", 30,
               "running")
    q = slurm.queue([running, held])
    assert slurm.calls == 1
    assert q[running].state == "RUNNING" and q[running].nodes == 2 and len(q[running].nodelist) == 2
    assert q[running].time_left_s is not None and 0 < q[running].time_left_s <= 600
    assert q[held].state == "PENDING" and q[held].reason == "JobHeldUser" and q[held].nodelist == []

    # rate limit: the same question within min_interval_s is answered from the cache, later ones ask again
    time.sleep(2)  # let the running job accrue a couple of seconds to bill
    subprocess.run(["scancel", running, held], env=slurm_cluster.env, check=True, timeout=30)
    now[0] = 9.9
    assert slurm.queue([held, running]) == q and slurm.calls == 1
    now[0] = 10.0
    assert running in slurm.queue([held, running], include_finished=True) and slurm.calls == 2

    def both_cancelled():
        now[0] += 10
        gone = finished(slurm, running) and finished(slurm, held)
        recs = {r.job_id: r for r in slurm.accounting([running, held]) if r.state == "CANCELLED"}
        # sacct's NodeList of a just-cancelled job can lag by about a second (seen: node1, then node[1-2])
        return recs if gone and len(recs) == 2 and len(recs[running].nodelist) == 2 else None

    by_id = wait_until(both_cancelled, 30, "both jobs to leave the queue and show as CANCELLED in sacct")
    assert by_id[running].alloc_gpus == 6 and len(by_id[running].nodelist) == 2 and by_id[running].start is not None
    # a job cancelled while pending never ran: Start is None, or (seen too) Start == End == the cancel time
    held_rec = by_id[held]
    assert held_rec.start in (None, held_rec.end) and held_rec.nodelist == [] and held_rec.elapsed_s == 0
    assert held_rec.alloc_gpus == 0 and held_rec.billed_gpu_seconds() == 0
    assert 0 < by_id[running].billed_gpu_seconds() < 6 * 60


def test_signal_reaches_every_task_on_every_node(slurm_cluster, slurm, tmp_path):
    task = tmp_path / "task.sh"
    task.write_text(f"trap 'echo $SLURM_PROCID > {tmp_path}/got$SLURM_PROCID' USR2\n"
                    f"touch {tmp_path}/ready$SLURM_PROCID\nfor i in $(seq 60); do sleep 1; done\n")
    job = sbatch(slurm_cluster, "-N2", "--ntasks-per-node=1", f"--output={tmp_path}/out", script=f"srun bash {task}")
    wait_until(lambda: len(list(tmp_path.glob("ready*"))) == 2, 30, "both tasks to start")
    slurm.cancel(job, signal="USR2")  # tasks of the steps only: the batch shell would die of USR2
    got = wait_until(lambda: sorted(f.name for f in tmp_path.glob("got*")) if len(list(tmp_path.glob("got*"))) == 2
                     else None, 20, "USR2 in both tasks")
    assert got == ["got0", "got1"]
    assert slurm.queue([job])[job].state == "RUNNING"  # a signal is not a cancel
    slurm.cancel(job)
    wait_until(lambda: finished(slurm, job), 30, "cancel")
    assert [r.state for r in slurm.accounting([job])] == ["CANCELLED"]


def test_dead_controller_raises_a_clear_error(slurm_cluster, tmp_path):
    conf = tmp_path / "slurm.conf"
    text = (slurm_cluster.base / "etc" / "slurm.conf").read_text()
    conf.write_text(re.sub(r"SlurmctldPort=\d+", "SlurmctldPort=9", text))  # nothing listens on port 9
    slurm = Slurm(min_interval_s=0, timeout_s=3, env={"SLURM_CONF": str(conf)})
    expected = rf"^squeue (did not answer within 3 s|.*failed).*SLURM_CONF={re.escape(str(conf))}"
    with pytest.raises(SlurmError, match=expected):
        slurm.queue(["1"])


def test_missing_commands_and_disabled_accounting(slurm_cluster, tmp_path):
    with pytest.raises(SlurmError, match=r"sacct not found on PATH"):
        Slurm(min_interval_s=0, env={"PATH": str(tmp_path)}).accounting(["1"])
    conf = tmp_path / "slurm.conf"
    text = (slurm_cluster.base / "etc" / "slurm.conf").read_text()
    conf.write_text(re.sub(r"(?m)^AccountingStorage\w*=.*$", "", text))
    assert Slurm(min_interval_s=0, timeout_s=10, env={"SLURM_CONF": str(conf)}).accounting(["1"]) == []


def test_nodes_job_and_cli(slurm_cluster, slurm):
    nodes = slurm.nodes()
    assert [n.name for n in nodes] == list(slurm_cluster.nodes)
    assert all(n.cpus == 8 and n.gpus == slurm_cluster.gpus_per_node and n.state in ("idle", "mix", "alloc")
               for n in nodes)
    env = {**slurm_cluster.env, "PIXELDIFF_SLURM_DEV": str(slurm_cluster.base)}
    r = subprocess.run([sys.executable, "-m", "slurm.dev.cluster", "env"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=30)
    assert r.stdout.strip() == f"export SLURM_CONF={slurm_cluster.slurm_env['SLURM_CONF']}"
    r = subprocess.run([sys.executable, "-m", "slurm.dev.cluster", "status"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "slurmctld      alive" in r.stdout and "dev*" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "slurm.dev.cluster", "start"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "already running" in r.stdout


def test_time_limit_warns_with_usr2_then_times_out(slurm_cluster, slurm, slow_jobs):
    job, out = slow_jobs["timeout"], slow_jobs["dir"]
    info = wait_until(lambda: slurm.job(job) if (out / "start").exists() else None, 30, "the job to start")
    assert info["TimeLimit"] == "00:01:00" and info["JobState"] == "RUNNING"
    # limits are checked every 30 s: TIMEOUT lands 60-90 s into the run
    wait_until(lambda: finished(slurm, job), 110, "the time limit", interval=1)
    rec = wait_until(lambda: [r for r in slurm.accounting([job]) if r.state != "RUNNING"], 15, "sacct")
    assert [r.state for r in rec] == ["TIMEOUT"]
    started, warned = int((out / "start").read_text()), int((out / "usr2").read_text())
    assert 0 <= warned - started <= 60  # USR2@45 may arrive up to 60 s early (SLURM-DEV-FACTS.md)
    assert 60 <= rec[0].elapsed_s <= 95 and rec[0].alloc_gpus == 1


def test_cpus_per_task_defaults_to_the_dev_nodes_share(slurm_cluster, slurm):
    from launcher.manifest import load_manifest
    from launcher.policy import cpus_per_task

    nodes = slurm.nodes(slurm_cluster.partition)
    assert [n.name for n in nodes] == list(slurm_cluster.nodes) and slurm.nodes("no-such-partition") == []
    m = load_manifest(REPO / "manifests" / "devcluster.yaml", ["cluster.cpus_per_task=0"])  # 2 tasks per node
    assert cpus_per_task(m, nodes) == 8 // 2
