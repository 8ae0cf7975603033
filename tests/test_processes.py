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
    t0, step = 1_000_000.0, 1.0
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


# ------------------------------------------------------------------ processes (real, on the dev Slurm cluster)

# 1 node x 2 tasks, one CPU each, a short two-stage run that fits in one 2-minute job
SMALL = ("cluster.nodes=1", "cluster.cpus_per_task=1", "stages[0].global_batch=8", "stages[1].global_batch=8",
         "stages[0].steps=150", "stages[1].steps=50")


def unique(name: str) -> str:
    """Job names are how Slurm is asked here, and the dev cluster keeps every session's jobs: one name per test run."""
    return f"{name}-{os.getpid()}-{time.time_ns() % 10**6}"


def cli_argv(*args) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", *map(str, args)]


def cli(args: list, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli_argv(*args), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_args(runs: Path, name: str, *extra) -> list:
    sets = sum((["--set", s] for s in (*SMALL, f"name={name}")), [])
    return ["run", DEVCLUSTER, "--runs-dir", runs, *sets, *extra]


def ledger(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "ledger.jsonl")


def explain(run_dir: Path) -> str:
    logs = sorted((run_dir / "jobs").glob("*/*_0_log.out"))
    tails = "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-12:]) for p in logs[-2:])
    return "ledger:\n" + "\n".join(json.dumps(e)[:200] for e in ledger(run_dir)[-20:]) + "\n" + tails


def wait_for(run_dir: Path, done, timeout: float, what: str) -> list[dict]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        ev = ledger(run_dir)
        if done(ev):
            return ev
        time.sleep(1)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s\n{explain(run_dir)}")


def finished(ev: list[dict]) -> bool:
    return any(e["event"] == "run_stopped" for e in ev) or any(
        e["event"] == "segment_end" and e["reason"] in ("finished", "budget") for e in ev)


def jobs_named(name: str, env: dict) -> tuple[list[str], list[str]]:
    """(squeue's job ids, sacct's job ids) of jobs named `name`: what Slurm itself holds for the run."""
    q = subprocess.run(["squeue", "--noheader", "--format=%i", "--name", name], env=env, capture_output=True,
                       text=True, timeout=30, check=True).stdout.split()
    a = subprocess.run(["sacct", "--noheader", "--allocations", "--parsable2", "--format=JobID", "--name", name,
                        "--starttime", "now-1days"], env=env, capture_output=True, text=True, timeout=30,
                       check=True).stdout.split()
    return q, a


def submitted(ev: list[dict]) -> list[str]:
    return [str(e["job_id"]) for e in ev if e["event"] == "job_submitted"]


def status_json(run_dir: Path, env: dict) -> tuple[int, dict]:
    out = cli(["status", run_dir, "--json"], env)
    return out.returncode, json.loads(out.stdout)


def cancel(run_dir: Path, env: dict) -> None:
    if (run_dir / "ledger.jsonl").exists() and not finished(ledger(run_dir)):
        cli(["cancel", run_dir, "--wait", "30"], env, timeout=120)


AT_THE_SAME_MOMENT = """
import sys, time
start = float(sys.argv[1])
from launcher.cli import main   # imports done before the moment
while time.time() < start:
    time.sleep(0.001)
sys.exit(main(sys.argv[2:]))
"""


def test_two_runs_on_one_run_directory_at_the_same_moment_submit_exactly_one_job(slurm_cluster, tmp_path):
    """Three `run` commands of a new run, released at the same instant (imports done): one creates the run
    directory and submits; the others wait on its submission lock, then find the job and submit nothing. Slurm
    (squeue and sacct, by job name) and the run directory (ledger, submitit's job folders) hold one job."""
    env, runs, name = slurm_cluster.env, tmp_path / "runs", unique("proc-twice")
    at = time.time() + 4.0
    procs = [subprocess.Popen([sys.executable, "-c", AT_THE_SAME_MOMENT, str(at), *map(str, run_args(runs, name, "--detach"))],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    run_dir = runs / name
    try:
        texts = [o + e for o, e in outs]
        assert [p.returncode for p in procs] == [0, 0, 0], texts
        assert sum("submitted Slurm job" in t for t in texts) == 1, texts
        assert sum("not submitting a second copy" in t for t in texts) == 2, texts
        ids = submitted(ledger(run_dir))
        assert len(ids) == 1, ids
        assert [e["event"] for e in ledger(run_dir)].count("submission_started") == 1
        t0 = time.monotonic()
        while not (q_a := jobs_named(name, env))[1] and time.monotonic() - t0 < 30:
            time.sleep(1)  # sacct sees a new job a few seconds after its submission
        q, a = q_a
        assert q == ids and a == ids, (q, a, ids)
        assert sorted(p.name for p in (run_dir / "jobs").iterdir() if p.name.isdigit()) == ids
        # and again, now that the job is queued or running: still one
        again = cli(run_args(runs, name, "--detach"), env)
        assert again.returncode == 0 and "not submitting a second copy" in again.stdout, again.stdout + again.stderr
        assert submitted(ledger(run_dir)) == ids and jobs_named(name, env)[0] == ids
    finally:
        cancel(run_dir, env)


def test_the_login_node_run_and_watch_killed_with_sigkill_lose_nothing(slurm_cluster, tmp_path):
    """`run` (its dashboard attached, piped) is SIGKILLed while the job trains, then a live `watch` is too: the job
    trains on; `status --json` and `watch --once` from new processes show the same run (state, job, stage, the step
    going on); the run finishes at its last step with every checkpoint valid, and one job was submitted."""
    env, runs, name = slurm_cluster.env, tmp_path / "runs", unique("proc-kill")
    run_dir = runs / name
    log = open(tmp_path / "run.out", "w")
    longer = ["--set", "stages[0].steps=500", "--set", "stages[1].steps=100"]  # about a minute: killed mid-run
    run = subprocess.Popen(cli_argv(*run_args(runs, name, *longer)), env=env, cwd=REPO, stdout=log,
                           stderr=subprocess.STDOUT)
    try:
        wait_for(run_dir, lambda ev: any(e["event"] == "checkpoint_saved" for e in ev), 180, "a first checkpoint")
        assert run.poll() is None, (tmp_path / "run.out").read_text()  # still attached, showing the dashboard
        rc, before = status_json(run_dir, env)
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=10)
        log.close()
        assert "attaching the dashboard" in (tmp_path / "run.out").read_text()
        job_id = submitted(ledger(run_dir))[0]
        rc_after, after = status_json(run_dir, env)
        assert (rc, rc_after) == (10, 10) and before["state"] == after["state"] == "running", (before, after)
        assert after["jobs"] == before["jobs"] or [j["job_id"] for j in after["jobs"]] == [job_id]
        assert after["step"] >= before["step"] and after["stage"] in ("32px", "64px")
        once = cli(["watch", run_dir, "--once"], env)
        assert once.returncode == 10 and job_id in once.stdout and "running" in once.stdout.lower(), once.stdout
        q, _ = jobs_named(name, env)
        assert q == [job_id]  # the job did not notice

        watch = subprocess.Popen(cli_argv("watch", run_dir, "--interval", "1"), env=env, cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first_line = watch.stdout.readline()
        assert first_line.strip(), first_line
        os.kill(watch.pid, signal.SIGKILL)
        watch.wait(timeout=10)
        rc3, third = status_json(run_dir, env)
        assert third["state"] in ("running", "finished") and third["step"] >= after["step"], third

        ev = wait_for(run_dir, finished, 300, "the end of the run")
        end = [e for e in ev if e["event"] == "segment_end"][-1]
        assert end["reason"] == "finished" and end["step"] == 600, explain(run_dir)
        assert (run_dir / "checkpoints" / "step-00000600" / "COMPLETE").exists()
        for ck in (run_dir / "checkpoints").glob("step-*"):
            assert (ck / "COMPLETE").exists(), ck  # nothing partial left behind
        assert submitted(ev) == [job_id] and not any(e["event"] == "job_failed" for e in ev)
        time.sleep(3)
        rc4, final = status_json(run_dir, env)
        assert rc4 == 0 and final["state"] == "finished" and final["step"] == 600, final
        again = cli(run_args(runs, name, "--detach", *longer), env)
        assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr
        assert submitted(ledger(run_dir)) == [job_id]
    finally:
        if run.poll() is None:
            run.kill()
        cancel(run_dir, env)


SLOW_SBATCH = """#!/bin/sh
# the real sbatch (the job held, so that it is still queued when the next `run` looks), then a pause before its
# answer reaches submitit: the window to kill `run` in
out=$({real} --hold "$@"); rc=$?
touch {marker}
sleep 60
echo "$out"
exit $rc
"""


def test_run_killed_between_sbatch_and_the_ledger_leaves_no_second_job(slurm_cluster, tmp_path):
    """`run` SIGKILLed (its whole process group, sbatch too) after sbatch queued the job and before the ledger
    recorded it. That job could never run (submitit had not yet moved its pickled function into the job's folder).
    The next `run` finds it in squeue by the token in its comment, cancels it, records that, and submits one job;
    the run goes on as that job. Two jobs of the run are never queued together."""
    import shutil

    env, runs, name = dict(slurm_cluster.env), tmp_path / "runs", unique("proc-orphan")
    run_dir = runs / name
    bindir, marker = tmp_path / "bin", tmp_path / "sbatch-returned"
    bindir.mkdir()
    (bindir / "sbatch").write_text(SLOW_SBATCH.format(real=shutil.which("sbatch", path=env.get("PATH")), marker=marker))
    (bindir / "sbatch").chmod(0o755)
    slow = {**env, "PATH": f"{bindir}{os.pathsep}{env.get('PATH', '')}"}
    run = subprocess.Popen(cli_argv(*run_args(runs, name, "--detach")), env=slow, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.monotonic()
        while not marker.exists():
            assert run.poll() is None and time.monotonic() - t0 < 90, "sbatch was never called"
            time.sleep(0.2)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=10)
        ev = ledger(run_dir)
        assert [e["event"] for e in ev] == ["submission_started"], ev  # killed before it recorded the job
        orphan, _ = jobs_named(name, env)
        assert len(orphan) == 1, orphan  # but Slurm has it
        again = cli(run_args(runs, name, "--detach"), env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"job {orphan[0]} of run {name} was left by a pixeldiff-launch killed" in again.stdout, again.stdout
        assert "submitted Slurm job" in again.stdout, again.stdout
        ev = ledger(run_dir)
        new = submitted(ev)
        assert len(new) == 1 and new != orphan
        gone = [e for e in ev if e["event"] == "submission_abandoned"]
        assert len(gone) == 1 and gone[0]["job_id"] == orphan[0] and gone[0]["token"] == ev[0]["token"]
        assert jobs_named(name, env)[0] == new  # only the new job is queued
        ev = wait_for(run_dir, lambda ev: any(e["event"] == "segment_start" for e in ev), 120, "the job's start")
        assert [e for e in ev if e["event"] == "segment_start"][0]["job_id"] == new[0]
        rc, st = status_json(run_dir, env)
        assert st["state"] in ("running", "finished") and [j["job_id"] for j in st["jobs"]] == new, st["jobs"]
        third = cli(run_args(runs, name, "--detach"), env)  # nothing left to recover: attaches
        assert "not submitting a second copy" in third.stdout and submitted(ledger(run_dir)) == new, third.stdout
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        cancel(run_dir, env)


# ------------------------------------------------------------------ a detached local run


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # PPid
            out.append(int(stat.parent.name))
    return out


def test_a_detached_local_run_outlives_its_killed_launcher(write_manifest, tmp_path):
    """`run --detach` of a local run: its whole process group (a closed terminal) SIGKILLed while it still looks at
    the trainer it started: the trainer (its own session) trains on; `status` shows it running, then finished at its
    last step."""
    path = write_manifest(name="detached", steps=(60, 20))
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.Popen(cli_argv("run", path, "--detach", "--runs-dir", runs), env=env, cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert run.stdout.readline().startswith("starting detached")
    def own_session(pids):  # forked, and past its setsid: the kill of `run`'s group cannot reach it any more
        try:
            return [p for p in pids if os.getpgid(p) != run.pid]
        except ProcessLookupError:
            return []

    t0 = time.monotonic()
    while not (trainer := own_session(children_of(run.pid))) and run.poll() is None and time.monotonic() - t0 < 30:
        time.sleep(0.01)
    assert trainer and run.poll() is None, "the trainer did not start while `run` looked at it"
    os.killpg(run.pid, signal.SIGKILL)  # during its 1 s look at the trainer
    run.wait(timeout=10)
    run_dir = runs / "detached"
    wait_for(run_dir, lambda ev: any(e["event"] == "segment_start" for e in ev), 180, "the trainer's start")
    rc, st = status_json(run_dir, env)
    assert st["state"] in ("running", "finished"), st
    ev = wait_for(run_dir, finished, 120, "the end of the detached run")
    assert [e for e in ev if e["event"] == "segment_end"][-1] | {"time": 0, "elapsed_s": 0} == {
        "event": "segment_end", "time": 0, "elapsed_s": 0, "reason": "finished", "step": 80}
    time.sleep(1)
    rc, st = status_json(run_dir, env)
    assert rc == 0 and st["state"] == "finished" and st["step"] == 80
