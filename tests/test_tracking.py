"""TensorBoard as one continuous run across the jobs of a run: a job killed after its last checkpoint logged steps
that the next job trains again, and the curves must show each step once."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distutil import collect, kill_group_or_proc, last_step, single, wait_until
from launcher.cli import prepare_run_dir
from launcher.manifest import load_manifest
from pixeldiff.ledger import read_jsonl
from pixeldiff.tracking import scalars
from wandbread import history, run_ids

REPO = Path(__file__).resolve().parents[1]

WANDB_KEY = "wandbKey0pixeldiff0002feedfacecafe"  # a fake key: online would refuse it, offline never sends it


def events(run_dir):
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_a_killed_job_and_its_resume_are_one_tensorboard_run(write_manifest, tmp_path):
    manifest = write_manifest(steps=(30, 10), logging={"tensorboard": True, "metrics_interval": 1, "sample_interval": 0},
                              checkpoint={"interval_steps": 10, "keep": 2})
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "runs")
    first = single(run_dir, PIXELDIFF_TEST_HOLD_COMMIT_AT_STEP="20")  # the save of step 20 never completes
    wait_until(lambda: last_step(run_dir) >= 24, [first], what="step 24")
    first.send_signal(signal.SIGKILL)  # steps 11..24 are logged, the checkpoint of step 10 is the last complete one
    collect(first)
    logged = [e.step for e in events(run_dir).Scalars("train/loss")]
    assert logged[:24] == list(range(1, 25)), logged
    second = single(run_dir)
    out = collect(second, timeout=240)
    assert second.returncode == 0 and "resumed from" in out and "step-00000010" in out, out
    acc = events(run_dir)
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, 41)), steps  # each step once, strictly increasing: 11..24 of the killed job purged
    assert {"train/lr", "train/img_per_s", "train/grad_norm", "train/loss_mse"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Images("samples")] == [40]


def test_scalars_flatten_nested_numbers_and_drop_the_rest():
    rec = {"step": 3, "time": 1.0, "stage": "16px", "loss": 0.5, "crop_waste": {"bucket": 0.1, "square": 0.3},
           "buckets": {"32x32": 7}, "lr": float("nan"), "ok": True, "note": "x"}
    assert scalars(rec) == {"loss": 0.5, "crop_waste/bucket": 0.1, "crop_waste/square": 0.3, "buckets/32x32": 7.0}


def wandb_runs(run_dir):
    """Each job's offline W&B directory, oldest first -> [(run ids, history rows)]."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    return [(run_ids(f), history(f)) for f in files]


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("_runtime", "_timestamp")} for r in rows]


def test_a_signalled_job_and_its_resume_are_one_wandb_run(write_manifest, tmp_path):
    """W&B offline, as on a compute node without internet: the first job is stopped by SIGTERM to its whole process
    group (W&B's service process gets it too, as Slurm signals every process of a step), the second resumes. Both
    write the one run id of tracking.json; the second directory holds the whole run (the first job's steps again,
    from metrics.jsonl, then its own); the key in the environment is written nowhere."""
    manifest = write_manifest(steps=(40, 10), checkpoint={"interval_steps": 10, "keep": 2},
                              logging={"wandb": {"project": "pixeldiff-test", "mode": "offline"},
                                       "metrics_interval": 1, "sample_interval": 0})
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "runs")
    first = single(run_dir, WANDB_API_KEY=WANDB_KEY)
    wait_until(lambda: last_step(run_dir) >= 14, [first], what="step 14")
    kill_group_or_proc(first, signal.SIGTERM)
    out = collect(first, timeout=180)
    assert first.returncode == 128 + signal.SIGTERM and "stopped by signal SIGTERM" in out, out
    stopped = last_step(run_dir)
    second = single(run_dir, WANDB_API_KEY=WANDB_KEY)
    out = collect(second, timeout=240)
    assert second.returncode == 0 and "resumed from" in out, out
    rid = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    (ids1, rows1), (ids2, rows2) = wandb_runs(run_dir)
    assert ids1 == ids2 == [rid]
    losses = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}
    assert [r["_step"] for r in rows1] == list(range(1, stopped + 1))  # the signalled job's rows all reached the file
    assert [r["_step"] for r in rows2] == list(range(1, 51))  # each step once, increasing
    assert all(r["train/loss"] == pytest.approx(losses[r["_step"]]) for r in rows1 + rows2)
    assert untimed(rows2[:stopped]) == untimed(rows1)  # the first job's rows again, each value as it was
    assert {"train/lr", "train/img_per_s", "train/grad_norm"} <= set().union(*rows2)
    images = [r for r in rows2 if "samples/_type" in r]
    assert [(r["_step"], r["samples/_type"]) for r in images] == [(50, "image-file")]  # the final grid
    grid = (run_dir / "samples" / "step-00000050.png").read_bytes()
    assert images[0]["samples/sha256"] == hashlib.sha256(grid).hexdigest()
    leaked = [str(p) for p in run_dir.rglob("*") if p.is_file() and WANDB_KEY.encode() in p.read_bytes()]
    assert leaked == []


def test_a_killed_job_loses_its_wandb_buffer_and_the_next_job_logs_the_record_again(write_manifest, tmp_path):
    """SIGKILL after the last complete checkpoint (step 10): W&B's service had buffered the job's rows, and the
    next job logs steps 1..10 again from metrics.jsonl (the values of the branch it continues), then 11.. as it
    trains them again."""
    manifest = write_manifest(steps=(30, 10), checkpoint={"interval_steps": 10, "keep": 2},
                              logging={"wandb": {"project": "pixeldiff-test", "mode": "offline"},
                                       "metrics_interval": 1, "sample_interval": 0})
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "runs")
    first = single(run_dir, PIXELDIFF_TEST_HOLD_COMMIT_AT_STEP="20")
    wait_until(lambda: last_step(run_dir) >= 24, [first], what="step 24")
    kill_group_or_proc(first, signal.SIGKILL)
    collect(first)
    killed = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}
    second = single(run_dir)
    out = collect(second, timeout=240)
    assert second.returncode == 0 and "step-00000010" in out, out
    runs = wandb_runs(run_dir)
    assert len(runs) == 2 and runs[1][0] == [json.loads((run_dir / "tracking.json").read_text())["run_id"]]
    steps1 = [r["_step"] for r in runs[0][1]]
    assert steps1 == list(range(1, len(steps1) + 1)), steps1  # whatever reached the file: a prefix
    rows = runs[1][1]
    assert [r["_step"] for r in rows] == list(range(1, 41))
    again = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}
    assert [r["train/loss"] for r in rows[:10]] == pytest.approx([killed[s] for s in range(1, 11)])
    assert [r["train/loss"] for r in rows[10:]] == pytest.approx([again[s] for s in range(11, 41)])


HIDE_WANDB = ("import runpy, sys; sys.modules['wandb'] = None; sys.argv[0] = 'pixeldiff-launch'; "
              "runpy.run_module('launcher.cli', run_name='__main__')")


@pytest.mark.parametrize("mode, hide, message", [
    ("online", False, "logging.wandb.mode: online needs a W&B API key: export WANDB_API_KEY"),
    ("offline", True, "logging.wandb: the wandb package is not installed"),
])
def test_wandb_without_a_key_or_the_package_is_refused_before_anything_starts(tmp_path, mode, hide, message):
    m = tmp_path / "m.yaml"
    d = yaml.safe_load((REPO / "manifests" / "dryrun.yaml").read_text())
    d.setdefault("logging", {})["wandb"] = {"project": "p", "mode": mode}
    m.write_text(yaml.safe_dump(d))
    base = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "NETRC")}
    run = ["-c", HIDE_WANDB] if hide else ["-m", "launcher.cli"]
    out = subprocess.run([sys.executable, *run, "plan", str(m)], cwd=REPO,
                         env={**base, "NETRC": str(tmp_path / "no-netrc"), "HOME": str(tmp_path)},
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith(f"error: {message}") and "Traceback" not in out.stderr, (
        out.stdout + out.stderr)


def test_a_wandb_that_fails_or_hangs_never_stops_the_training(write_manifest, tmp_path):
    """The service gone mid-run: one warning, then no more logging; a finish that never returns: the job's end
    waits a bounded time. (The real wandb, offline; its methods made to fail, the only way to fail it here.)"""
    import threading
    import time

    from pixeldiff.tracking import WandbTracker

    manifest = write_manifest(logging={"wandb": {"project": "p", "mode": "offline"}})
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "runs")
    said = []
    t = WandbTracker(run_dir, load_manifest(manifest), 0, log=said.append)
    assert said == [f"W&B run {t.run.id} (p), offline in {run_dir}/wandb (`wandb sync` it later)"]  # wandb's own: silent
    said.clear()
    t.log("train", 1, {"loss": 1.0})
    real_finish = t.run.finish

    def gone(*a, **k):
        raise ConnectionResetError("the service is gone")

    t.run.log = gone
    t.log("train", 2, {"loss": 0.5})
    t.log("train", 3, {"loss": 0.25})
    assert t.failed and len(said) == 1 and "W&B logging stopped at step 2" in said[0], said
    release = threading.Event()
    t.run.finish = lambda *a, **k: release.wait(30)
    t0 = time.monotonic()
    t.close(wait_s=1.0)
    assert time.monotonic() - t0 < 5 and "W&B did not finish within 1 s" in said[-1], said
    release.set()
    real_finish()
