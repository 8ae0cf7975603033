"""End to end on the real dev Slurm cluster (slurm/dev/): `pixeldiff-launch run` on manifests/devcluster.yaml.

The whole run (2 nodes x 2 tasks, gloo on the CPU, two stages, 2-minute jobs) takes about 5 minutes, so it
starts once per module, detached, and the shorter runs (a budget that runs out, a node that fails) run beside
it on the other two nodes. Failures print the run's ledger and job logs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pixeldiff.billing import billed_gpu_seconds
from pixeldiff.ledger import read_jsonl

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "manifests" / "devcluster.yaml"
FULL_STEPS = (700, 800)  # at full speed ~650 steps fit in one 2-minute job: the run needs 3 or more


def launch(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def start(runs: Path, name: str, env: dict, *sets: str) -> Path:
    # one CPU per task, not the default share of the node (8 CPUs / 2 tasks): the runs share the 4 dev nodes
    sets = ("cluster.cpus_per_task=1", *sets)
    out = launch(["run", MANIFEST, "--detach", "--runs-dir", runs, "--set", f"name={name}", *sum((["--set", s] for s in sets), [])], env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "submitted Slurm job" in out.stdout, out.stdout
    assert f"warning: no calibration of {name}" in out.stderr, out.stderr  # none written under these runs
    return runs / name


def events(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "ledger.jsonl")


def explain(run_dir: Path) -> str:
    logs = sorted((run_dir / "jobs").glob("*/*_0_log.out"))
    tails = "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]) for p in logs[-3:])
    return "ledger:\n" + "\n".join(json.dumps(e)[:220] for e in events(run_dir)[-25:]) + "\n" + tails


def wait_until(run_dir: Path, done, timeout: float, what: str) -> list[dict]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        ev = events(run_dir)
        if done(ev):
            return ev
        time.sleep(2)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s\n{explain(run_dir)}")


def over(ev: list[dict]) -> bool:
    return any(e["event"] in ("run_stopped",) for e in ev) or any(
        e["event"] == "segment_end" and e["reason"] in ("finished", "budget") for e in ev)


@pytest.fixture(scope="module")
def runs(slurm_cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm-e2e")
    full = start(base, "e2e-full", slurm_cluster.env, f"stages[0].steps={FULL_STEPS[0]}", f"stages[1].steps={FULL_STEPS[1]}",
                 "logging.tensorboard=true")
    yield {"base": base, "full": full, "env": slurm_cluster.env}
    for run_dir in base.iterdir():  # leave nothing queued for the next module
        if not over(events(run_dir)) and not any(e["event"] == "cancel_requested" for e in events(run_dir)):
            launch(["cancel", run_dir, "--wait", "30"], slurm_cluster.env)


def sacct(job_ids: list[str], env: dict):
    from slurm.commands import Slurm

    return Slurm(min_interval_s=0, env=env).accounting(job_ids)


def test_a_dollar_budget_that_runs_out_mid_stage_stops_with_a_final_checkpoint(runs):
    # $1 per GPU-hour, 4 GPUs: $0.17 = 612 GPU-seconds = 153 s of the run. The first 2-minute job ends inside
    # the budget's last 90 s, so it is the last: the trainer stops for the budget, saves, and nothing requeues.
    run_dir = start(runs["base"], "e2e-budget", runs["env"], "budget.usd=0.17")
    ev = wait_until(run_dir, over, 240, "the budget stop")
    submitted = [e for e in ev if e["event"] == "job_submitted"]
    assert len(submitted) == 1 and submitted[0]["time_limit_min"] == 2
    end = [e for e in ev if e["event"] == "segment_end"][-1]
    assert end["reason"] == "budget", explain(run_dir)
    assert 0 < end["step"] < 400 + 150  # stopped mid-run: the manifest's stages have 400 + 150 steps
    assert any(e["event"] == "budget_stop" for e in ev)
    assert not any(e["event"] == "requeue_requested" for e in ev)
    assert (run_dir / "checkpoints" / f"step-{end['step']:08d}" / "COMPLETE").exists()
    time.sleep(15)  # a requeue would show in the queue by now
    from slurm.commands import Slurm

    assert Slurm(min_interval_s=0, env=runs["env"]).queue([submitted[0]["job_id"]]) == {}
    status = launch(["status", run_dir, "--json"], runs["env"])
    assert status.returncode == 3 and json.loads(status.stdout)["state"] == "over_budget", status.stdout + status.stderr


def test_a_node_that_fails_is_excluded_from_the_next_submission(runs):
    # one node x 2 tasks; the ranks fail at start-up on nodes 1-3, so each failed job excludes its node
    run_dir = start(runs["base"], "e2e-badnode", runs["env"], "cluster.nodes=1", "stages[0].global_batch=8",
                    "stages[1].global_batch=8", "cluster.env.PIXELDIFF_TEST_FAIL_NODES=node1,node2,node3")
    ev = wait_until(run_dir, lambda ev: sum(e["event"] == "job_submitted" for e in ev) >= 2, 180, "a resubmission")
    failed = [e for e in ev if e["event"] == "job_failed"][0]
    assert failed["node"] in ("node1", "node2", "node3") and "injected" in failed["message"]
    assert any(e["event"] == "node_excluded" and e["node"] == failed["node"] for e in ev)
    second = [e for e in ev if e["event"] == "job_submitted"][1]
    assert failed["node"] in second["exclude"]
    ev = wait_until(run_dir, lambda ev: any(e["event"] in ("segment_start", "run_stopped") and e.get("job_id") == second["job_id"]
                                            for e in ev) or sum(e["event"] == "job_failed" for e in ev) >= 2, 180,
                    "the second job")
    starts = [e for e in ev if e["event"] == "segment_start" and e["job_id"] == second["job_id"]]
    if starts:  # it ran, and not on the excluded node
        assert failed["node"] not in starts[0]["nodelist"]
    rec = [r for r in sacct([second["job_id"]], runs["env"]) if r.job_id == second["job_id"]]
    assert rec and failed["node"] not in rec[-1].nodelist
    out = launch(["cancel", run_dir, "--wait", "30"], runs["env"])
    assert out.returncode == 0, out.stderr


def test_cancel_checkpoints_then_cancels_and_nothing_requeues(runs):
    run_dir = start(runs["base"], "e2e-cancel", runs["env"], "cluster.nodes=1", "stages[0].global_batch=8",
                    "stages[1].global_batch=8")
    wait_until(run_dir, lambda ev: any(e["event"] == "checkpoint_saved" for e in ev), 180, "a first checkpoint")
    out = launch(["cancel", run_dir, "--wait", "60"], runs["env"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "final checkpoint at step" in out.stdout, out.stdout
    ev = events(run_dir)
    end = [e for e in ev if e["event"] == "segment_end"][-1]
    assert end["reason"] == "signal SIGUSR2"
    assert (run_dir / "checkpoints" / f"step-{end['step']:08d}" / "COMPLETE").exists()
    stopped = [e for e in ev if e["event"] == "run_stopped"]
    assert stopped and stopped[-1]["kind"] == "cancelled"
    assert not any(e["event"] == "requeue_requested" for e in ev)
    status = launch(["status", run_dir, "--json"], runs["env"])
    assert status.returncode == 4 and json.loads(status.stdout)["state"] == "cancelled", status.stdout


def current_ranks(run_dir: Path) -> dict[int, dict]:
    """The running step's ranks ({rank: {"node", "pid"}}), from what launcher.job's rank entry point writes."""
    seg = [e for e in events(run_dir) if e["event"] == "segment_start"][-1]
    d = run_dir / "jobs" / f"ranks-{seg['job_id']}-{seg.get('restart', 0)}"
    return {r["rank"]: r for r in (json.loads(f.read_text()) for f in d.glob("rank*.json"))}


def test_a_killed_rank_ends_the_step_and_the_run_finishes_without_its_node(runs):
    """SIGKILL of one rank mid-step (no Python exception, no report), on the second node in one run and rank 0 in
    another: srun --kill-on-bad-exit ends the step, the supervisor blames the node, excludes it and resubmits."""
    import os
    import signal

    sets = ("cluster.gpus_per_node=1", "stages[0].steps=100", "stages[1].steps=20")  # 2 nodes x 1 task, 120 steps
    dirs = {rank: start(runs["base"], f"e2e-kill-rank{rank}", runs["env"], *sets) for rank in (1, 0)}
    killed = {}
    for rank, run_dir in dirs.items():
        wait_until(run_dir, lambda ev: any(e["event"] == "checkpoint_saved" for e in ev), 240, "a first checkpoint")
        ranks = current_ranks(run_dir)
        assert len(ranks) == 2 and ranks[0]["node"] != ranks[1]["node"], ranks
        assert not over(events(run_dir)) and [e for e in events(run_dir) if e["event"] in ("segment_start", "segment_end")][-1]["event"] == "segment_start"
        os.kill(ranks[rank]["pid"], signal.SIGKILL)
        killed[rank] = (time.time(), ranks[rank]["node"])
    for rank, run_dir in dirs.items():
        t_kill, node = killed[rank]
        ev = wait_until(run_dir, lambda ev: any(e["event"] == "job_failed" for e in ev), 90, "the failed step's report")
        failed = [e for e in ev if e["event"] == "job_failed"][0]
        print(f"rank {rank} killed on {node}: job_failed {failed['time'] - t_kill:.1f} s later: {failed['message']}")
        assert failed["time"] - t_kill < 60, explain(run_dir)
        assert failed["node"] == node and failed["nodes"] == [node], explain(run_dir)
        assert f"rank {rank} on {node}: Killed" in failed["message"]
        assert any(e["event"] == "node_excluded" and e["node"] == node for e in ev)
    for rank, run_dir in dirs.items():
        node = killed[rank][1]
        ev = wait_until(run_dir, over, 360, "the end of the run after the failure")
        ends = [e for e in ev if e["event"] == "segment_end"]
        assert ends[-1]["reason"] == "finished" and ends[-1]["step"] == 120, explain(run_dir)
        assert any(e["reason"].startswith("failed") for e in ends)
        second = [e for e in ev if e["event"] == "job_submitted"][1]
        assert node in second["exclude"]
        starts = [e for e in ev if e["event"] == "segment_start" and e["job_id"] == second["job_id"]]
        assert starts and node not in starts[0]["nodelist"], explain(run_dir)


def test_scancel_term_of_a_shard_job_with_data_workers_requeues_and_resumes(runs, tmp_path):
    """`scancel --signal=TERM` reaches every process of the step, the DataLoader workers too: the trainer stops at a
    step boundary with a checkpoint, the supervisor requeues, and the next run resumes there."""
    from shardutil import write_shards
    from slurm.commands import Slurm

    write_shards(tmp_path / "shards", 8, 16)
    run_dir = start(runs["base"], "e2e-shards", runs["env"], "cluster.nodes=1", "stages[0].global_batch=8",
                    "stages[1].global_batch=8", "stages[0].steps=250", "stages[1].steps=50", "data.source=webdataset",
                    f"data.shards={tmp_path}/shards/train-{{000..007}}.tar", "data.workers=2")
    ev = wait_until(run_dir, lambda ev: any(e["event"] == "checkpoint_saved" for e in ev), 240, "a first checkpoint")
    job_id = [e for e in ev if e["event"] == "job_submitted"][-1]["job_id"]
    Slurm(min_interval_s=0, env=runs["env"]).cancel(job_id, signal="TERM")
    ev = wait_until(run_dir, lambda ev: any(e["event"] == "requeue_requested" for e in ev), 90, "the requeue")
    end = [e for e in ev if e["event"] == "segment_end"][0]
    assert end["reason"] == "signal SIGTERM", explain(run_dir)
    assert (run_dir / "checkpoints" / f"step-{end['step']:08d}" / "COMPLETE").exists()
    # in a 2-minute job every signal comes within lead + 90 s of the end: policy counts it as a timeout
    assert [e for e in ev if e["event"] == "requeue_requested"][0]["kind"] in ("timeout", "preemption")
    ev = wait_until(run_dir, over, 300, "the resumed run's end")
    starts = [e for e in ev if e["event"] == "segment_start"]
    assert [s["restart"] for s in starts][:2] == [0, 1] and starts[1]["step"] == end["step"], explain(run_dir)
    assert [e for e in ev if e["event"] == "segment_end"][-1]["reason"] == "finished"
    assert not any(e["event"] == "job_failed" for e in ev)


def tmux_available() -> bool:
    import os
    import shutil

    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for update in (False, True):  # a fresh machine may need its package lists first
        if shutil.which("tmux") is not None or os.geteuid() != 0:
            break
        if update:
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "tmux"], capture_output=True, env=env,
                       timeout=600)
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is missing and cannot be installed (not root)")
        return False
    return True


def test_the_dashboard_in_a_real_terminal_during_the_run(runs):
    """`pixeldiff-launch watch` in an 80x24 tmux pane while the full run trains; the captured pane is kept as
    .artifacts/dashboard-80x24.txt (what a user sees)."""
    if not tmux_available():
        pytest.skip("tmux is not installed (and this is not root): cannot capture a real terminal")
    run_dir = runs["full"]
    wait_until(run_dir, lambda ev: any(e["event"] == "checkpoint_saved" for e in ev), 240, "training")
    session = f"pixeldiff-watch-{run_dir.name}"
    env = {**runs["env"], "TERM": "xterm-256color"}
    cmd = f"{sys.executable} -m launcher.cli watch {run_dir} --interval 1"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", cmd], env=env, cwd=REPO, check=True)
    try:
        time.sleep(8)
        pane = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                              check=True).stdout
        alive = subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode == 0
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    out = REPO / ".artifacts" / "dashboard-80x24.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(pane)
    print(pane)
    lines = pane.rstrip("\n").splitlines()
    assert alive, pane  # still refreshing, not crashed
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines), pane
    assert run_dir.name in pane and "32px" in pane and "64px" in pane and "goodput" in pane, pane
    assert "RUNNING" in pane or "QUEUED" in pane, pane  # between two jobs it is queued
    assert "Traceback" not in pane


def test_the_full_run_goes_through_every_stage_across_requeued_jobs(runs):
    run_dir = runs["full"]
    ev = wait_until(run_dir, over, 600, "the end of the full run")
    ends = [e for e in ev if e["event"] == "segment_end"]
    assert ends[-1]["reason"] == "finished", explain(run_dir)
    assert ends[-1]["step"] == sum(FULL_STEPS)
    assert any(e["event"] == "stage_change" and e["stage"] == "64px" for e in ev)
    requeues = [e for e in ev if e["event"] == "requeue_requested"]
    assert len(requeues) >= 2 and all(r["kind"] == "timeout" for r in requeues), explain(run_dir)
    job_ids = {e["job_id"] for e in ev if e["event"] == "job_submitted"}
    assert len(job_ids) == 1  # requeued, not resubmitted: one job id, restart count going up
    restarts = [e["restart"] for e in ev if e["event"] == "segment_start"]
    assert restarts == list(range(len(restarts))) and len(restarts) >= 3
    # nothing trained twice, nothing lost: every segment resumes at the step the last one saved
    starts = [e for e in ev if e["event"] == "segment_start"]
    for prev_end, nxt in zip(ends, starts[1:]):
        assert nxt["step"] == prev_end["step"]
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and all(b - a == 25 for a, b in zip(steps, steps[1:]))
    # TensorBoard: one run across the requeued jobs (an event file per job), each step once, in order
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == len(restarts)
    assert [e.step for e in acc.Scalars("train/loss")] == steps
    # the ledger's billed GPU-seconds against Slurm's accounting: within 2%
    for _ in range(60):  # the job ends a moment after its last event: wait for sacct's end time
        records = sacct(sorted(job_ids), runs["env"])
        if records and all(r.end is not None for r in records):
            break
        time.sleep(1)
    assert len(records) == len(restarts)
    slurm_gpu_s = sum(r.billed_gpu_seconds() for r in records)
    assert all(r.alloc_gpus == 4 for r in records)
    ledger_gpu_s = billed_gpu_seconds(ev)
    assert abs(ledger_gpu_s - slurm_gpu_s) <= 0.02 * slurm_gpu_s, (ledger_gpu_s, slurm_gpu_s, [r for r in records])
    status = launch(["status", run_dir, "--json"], runs["env"])
    s = json.loads(status.stdout)
    assert status.returncode == 0 and s["state"] == "finished" and s["step"] == sum(FULL_STEPS)
    assert s["billed_gpu_seconds"] == pytest.approx(slurm_gpu_s, rel=1e-3)  # sacct is the authority
    assert abs(s["ledger_vs_sacct_pct"]) <= 2.0
