"""TensorBoard as one continuous run across the jobs of a run: a job killed after its last checkpoint logged steps
that the next job trains again, and the curves must show each step once."""

import signal

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distutil import collect, last_step, single, wait_until
from launcher.cli import prepare_run_dir
from launcher.manifest import load_manifest
from pixeldiff.tracking import scalars


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
