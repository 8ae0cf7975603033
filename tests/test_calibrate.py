"""`pixeldiff-launch calibrate` on the CPU with the dry-run manifest (issue 17): the real trainer for a few steps of
every stage, a checkpoint across the stage switch, a grid and a short evaluation, the measured table, the plan
priced with it, and the calibration file that `plan` and `run` then use; bad input stops it with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from pixeldiff.ledger import read_jsonl

REPO = Path(__file__).resolve().parents[1]
DRYRUN = str(REPO / "manifests" / "dryrun.yaml")


def test_calibrate_the_dry_run_on_the_cpu_then_plan_with_it(tmp_path):
    runs = tmp_path / "runs"
    r = run_cli("launcher.cli", "calibrate", DRYRUN, "--steps", "3", "--runs-dir", str(runs), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = runs / "dryrun-calibrate"
    cal = json.loads((run_dir / "calibration.json").read_text())
    assert [(s["stage"], s["resolution"], s["batch_per_gpu"]) for s in cal["stages"]] == [("32px", 32, 32),
                                                                                       ("64px", 64, 32)]
    assert set(cal["img_per_s_per_gpu"]) == {"32", "64"} and all(v > 0 for v in cal["img_per_s_per_gpu"].values())
    for s in cal["stages"]:
        assert s["records"] >= 1 and s["tflops_per_gpu"] > 0 and 0 <= s["data_wait"] < 1 and s["startup_s"] > 0
        assert s["mfu"] is None and s["peak_mem_gib"] is None  # a CPU: no peak to measure against, no GPU memory
    assert cal["device"].startswith("CPU") and cal["checkpoint_resumed_across_stage_switch"]
    starts = [e for e in read_jsonl(run_dir / "ledger.jsonl") if e["event"] == "segment_start"]
    assert [e["step"] for e in starts] == [0, 3]  # the second job resumed from the first one's checkpoint
    assert [(e["step"], e["why"]) for e in cal["eval"]] == [(3, "stage_end"), (6, "end")]
    assert all(e["samples"] == 32 and e["fid"] > 0 for e in cal["eval"])
    assert cal["samples"] == [str(run_dir / "samples" / "step-00000006.png")]
    out = r.stdout
    assert "calibration of dryrun on CPU" in out and "img/s/GPU" in out and "start-up s" in out
    assert "resumed by a second job across the stage switch" in out and "the plan of dryrun at these rates" in out
    rate32 = cal["img_per_s_per_gpu"]["32"]
    plan = run_cli("launcher.cli", "plan", DRYRUN, "--json", "--runs-dir", str(runs))
    assert plan.returncode == 0 and "using the calibration" in plan.stderr, plan.stderr
    assert json.loads(plan.stdout)["stages"][0]["est_img_per_s_per_gpu"] == pytest.approx(rate32)
    # another model or micro-batch is another calibration: not used for it
    other = run_cli("launcher.cli", "plan", DRYRUN, "--json", "--runs-dir", str(runs), "--set", "stages[0].micro_batch=16")
    assert other.returncode == 0 and "calibrated another version of dryrun" in other.stderr, other.stderr
    assert json.loads(other.stdout)["stages"][0]["est_img_per_s_per_gpu"] != pytest.approx(rate32)
    (run_dir / "calibration.json").write_text("{not json")
    broken = run_cli("launcher.cli", "plan", DRYRUN, "--runs-dir", str(runs))
    assert broken.returncode == 2 and "not a calibration file" in broken.stderr and "Traceback" not in broken.stderr
    assert (run_dir / "calibration.json").read_text() == "{not json"  # left for the user to look at, not replaced


@pytest.mark.parametrize("args, message", [
    (["--steps", "1"], "error: --steps: at least 2 steps per stage"),
    (["--set", "stages[0].micro_batch=5"], "error: stages[0].micro_batch: 5 must divide the per-rank batch 32"),
    (["--set", "losses.lpips.weight=0.1", "--set", "losses.lpips.weights=/nonexistent/vgg.pth"],
     "error: losses.lpips.weights: no such file '/nonexistent/vgg.pth'"),
])
def test_calibrate_refuses_bad_input_before_training(tmp_path, args, message):
    r = run_cli("launcher.cli", "calibrate", DRYRUN, "--runs-dir", str(tmp_path / "runs"), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


def test_calibrate_reports_a_job_that_cannot_read_its_data(tmp_path):
    r = run_cli("launcher.cli", "calibrate", DRYRUN, "--runs-dir", str(tmp_path / "runs"), "--steps", "2",
                "--set", "data.source=webdataset", "--set", "data.workers=0",
                "--set", f"data.shards={tmp_path}/missing-{{000..001}}.tar")
    assert r.returncode == 1 and "error: the calibration job stopping at step 2 failed" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_micro_batch_that_does_not_fit_names_the_largest_that_does(tmp_path):
    """GPU memory cannot run out here: PIXELDIFF_TEST_OOM_ABOVE=8 makes the trainer raise torch's OutOfMemoryError
    for micro-batches above 8 (the one fake: the device's memory). One GPU's batch is 32: 32 fails in the real
    calibration job, then the probes try 16 (fails) and 8 (fits)."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "launcher.cli", "calibrate", DRYRUN, "--steps", "2", "--runs-dir",
                        str(tmp_path / "runs")], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO), "PIXELDIFF_TEST_OOM_ABOVE": "8"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert ("error: stages[0].micro_batch: 32 images per micro-batch do not fit in this device's memory; the "
            "largest that fits is 8: set stages[0].micro_batch: 8") in r.stderr, r.stderr
    assert "a micro-batch of 32 ran out of memory; trying 16" in r.stdout and "trying 8" in r.stdout
    assert "trying 4" not in r.stdout
    oom = [e for e in read_jsonl(tmp_path / "runs" / "dryrun-calibrate" / "ledger.jsonl")
           if e["event"] == "out_of_memory"]
    assert [(e["stage"], e["micro_batch"]) for e in oom] == [(0, 32)]
    assert not (tmp_path / "runs" / "dryrun-calibrate-probe").exists()  # the probes clean up


def test_out_of_memory_in_a_slurm_task_is_fatal_and_blames_no_node(write_manifest, tmp_path):
    """Every node's GPUs are the same: a rank out of memory reports a fatal failure (no requeue that would run out
    again, no node excluded), with the stage and the fix in its one line."""
    import os
    import subprocess
    import sys

    from launcher.cli import prepare_run_dir
    from launcher.job import failed_nodes
    from launcher.manifest import load_manifest

    run_dir, _ = prepare_run_dir(load_manifest(write_manifest(steps=(4, 2))), tmp_path / "runs")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PIXELDIFF_TEST_OOM_ABOVE": "2", "SLURM_JOB_ID": "77",
           "SLURMD_NODENAME": "node3"}
    r = subprocess.run([sys.executable, "-m", "launcher.job", str(run_dir)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "OutOfMemory: stage 16px: a micro-batch of 8 does not fit" in r.stdout, r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    nodes, first, fatal = failed_nodes(run_dir, 1, {"SLURM_JOB_ID": "77"})
    assert fatal and nodes == [] and "set stages[0].micro_batch smaller" in first, (nodes, first, fatal)


def test_a_stopped_calibrate_stops_its_job(tmp_path):
    """SIGTERM to calibrate alone (a `timeout`, a closed terminal): the trainer job it started, in its own process
    group, is stopped too and does not hold the device."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "calibrate", DRYRUN, "--steps", "400",
                             "--runs-dir", str(tmp_path / "runs")], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ledger = tmp_path / "runs" / "dryrun-calibrate" / "ledger.jsonl"
    deadline = time.time() + 180
    starts = []
    while time.time() < deadline and not starts:
        starts = [e for e in read_jsonl(ledger) if e["event"] == "segment_start"] if ledger.exists() else []
        time.sleep(0.5)
    assert starts, "the calibration job did not start"
    job = int(starts[0]["job_id"].split("-")[1])  # local-<pid>
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "its job was stopped with it" in err and "Traceback" not in err, err
    try:
        os.kill(job, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, f"the calibration job {job} is still running"
