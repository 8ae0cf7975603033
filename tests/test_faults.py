"""Faults injected for real, and what was kept: divergence (a learning rate of 1e30; a one-step NaN)."""

import math

import pytest
import torch

from launcher.cli import main as launch_main
from pixeldiff import checkpoint
from pixeldiff.ledger import read_jsonl


def run_local(manifest, runs) -> int:
    return launch_main(["run", str(manifest), "--runs-dir", str(runs)])


def kept_checkpoints_are_finite(run_dir) -> list[int]:
    """-> the steps of the valid checkpoints kept; every one loads with finite weights, EMA and optimizer state."""
    valid, _ = checkpoint.list_checkpoints(run_dir / "checkpoints")
    steps = []
    for path in valid:
        parts = checkpoint.load(path)
        for name in ("model", "ema"):
            assert all(torch.isfinite(t).all() for t in parts[name].values()), f"{path}: {name} is not finite"
        for state in parts["optimizer"]["state"].values():
            assert all(torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t)), f"{path}: optimizer"
        steps.append(int(path.name.split("-")[1]))
    return steps


def test_a_learning_rate_of_1e30_stops_the_run_with_the_last_good_checkpoint(write_manifest, tmp_path, capsys):
    manifest = write_manifest(steps=(60, 10), optimizer={"lr": 1e30, "warmup_steps": 0, "max_skipped_steps": 3,
                                                         "on_divergence": "stop"},
                              checkpoint={"interval_steps": 2, "keep": 2})
    assert run_local(manifest, tmp_path) == 1
    run_dir = tmp_path / "tiny"
    events = read_jsonl(run_dir / "ledger.jsonl")
    diverged = [e for e in events if e["event"] == "diverged"]
    assert len(diverged) == 1 and diverged[0]["action"] == "stop"
    end = events[-1]
    assert end["event"] == "segment_end" and end["reason"].startswith("failed: diverged at step")
    out = capsys.readouterr().out
    assert "error: diverged at step" in out and "last good checkpoint" in out and "Traceback" not in out
    kept = kept_checkpoints_are_finite(run_dir)
    assert all(s <= diverged[0]["step"] for s in kept)  # nothing saved after it diverged
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert metrics[-1]["skipped_steps"] >= 3 and not math.isfinite(metrics[-1]["loss"])
    assert any(e["event"] == "step_skipped" for e in events)


def test_rollbacks_lower_the_learning_rate_until_they_are_used_up(write_manifest, tmp_path, monkeypatch, capsys):
    manifest = write_manifest(steps=(60, 10), optimizer={"max_skipped_steps": 2, "max_rollbacks": 2,
                                                         "rollback_lr_factor": 0.5},
                              checkpoint={"interval_steps": 5, "keep": 2})
    monkeypatch.setenv("PIXELDIFF_TEST_NAN_AT_STEP", "8+")  # every step from 8 on, after every rollback too
    assert run_local(manifest, tmp_path) == 1
    events = read_jsonl(tmp_path / "tiny" / "ledger.jsonl")
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert [(r["step"], r["to_step"], r["lr_scale"], r["rollback"]) for r in rollbacks] == [(9, 5, 0.5, 1), (9, 5, 0.25, 2)]
    assert [e["action"] for e in events if e["event"] == "diverged"] == ["rollback", "rollback", "stop"]
    assert events[-1]["reason"].startswith("failed: diverged at step 9:")
    assert "last good checkpoint" in capsys.readouterr().out
    assert kept_checkpoints_are_finite(tmp_path / "tiny") == [5]


def test_divergence_before_the_first_checkpoint_stops(write_manifest, tmp_path, capsys):
    manifest = write_manifest(steps=(60, 10), optimizer={"lr": 1e30, "warmup_steps": 0, "max_skipped_steps": 2})
    assert run_local(manifest, tmp_path) == 1
    out = capsys.readouterr().out
    assert "nothing to roll back to" in out and "last good checkpoint: none" in out
    assert kept_checkpoints_are_finite(tmp_path / "tiny") == []


def test_one_nan_step_is_skipped_and_the_run_goes_on(write_manifest, tmp_path, monkeypatch):
    manifest = write_manifest(steps=(20, 5))
    monkeypatch.setenv("PIXELDIFF_TEST_NAN_AT_STEP", "7")
    assert run_local(manifest, tmp_path / "nan") == 0
    monkeypatch.delenv("PIXELDIFF_TEST_NAN_AT_STEP")
    assert run_local(manifest, tmp_path / "clean") == 0
    nan, clean = (read_jsonl(tmp_path / d / "tiny" / "metrics.jsonl") for d in ("nan", "clean"))
    assert [r["skipped_steps"] for r in nan] == [0] * 6 + [1] * 19
    assert not math.isfinite(nan[6]["loss"]) and all(math.isfinite(r["loss"]) for i, r in enumerate(nan) if i != 6)
    assert [r["loss"] for r in nan[:6]] == [r["loss"] for r in clean[:6]]
    assert nan[7]["loss"] != clean[7]["loss"]  # step 7 changed nothing, so step 8 starts from step 6's weights
    skipped = [e for e in read_jsonl(tmp_path / "nan" / "tiny" / "ledger.jsonl") if e["event"] == "step_skipped"]
    assert len(skipped) == 1 and skipped[0]["step"] == 7
    kept_checkpoints_are_finite(tmp_path / "nan" / "tiny")


def test_a_nan_streak_rolls_back_with_a_lower_learning_rate_and_finishes(write_manifest, tmp_path, monkeypatch):
    manifest = write_manifest(steps=(20, 5), optimizer={"max_skipped_steps": 1, "rollback_lr_factor": 0.5},
                              checkpoint={"interval_steps": 5, "keep": 2})
    monkeypatch.setenv("PIXELDIFF_TEST_NAN_AT_STEP", "8")
    assert run_local(manifest, tmp_path) == 0
    events = read_jsonl(tmp_path / "tiny" / "ledger.jsonl")
    (rb,) = [e for e in events if e["event"] == "rollback"]
    assert rb["to_step"] == 5 and rb["lr_scale"] == 0.5 and rb["checkpoint"].endswith("step-00000005")
    assert events[-1]["reason"] == "finished"
    final = checkpoint.rank_states(checkpoint.latest_valid(tmp_path / "tiny" / "checkpoints"))[0]
    assert final["step"] == 25 and final["lr_scale"] == 0.5 and final["rollbacks"] == 1
    kept_checkpoints_are_finite(tmp_path / "tiny")


@pytest.mark.parametrize("bad, message", [
    ({"max_skipped_steps": 0}, "max_skipped_steps must be >= 1"),
    ({"rollback_lr_factor": 2.0}, r"rollback_lr_factor: must be in \(0, 1\]"),
    ({"on_divergence": "retry"}, "on_divergence"),
])
def test_bad_divergence_settings_are_refused(write_manifest, tmp_path, capsys, bad, message):
    import re

    assert launch_main(["plan", str(write_manifest(optimizer=bad))]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_nothing_a_run_writes_is_writable_by_others_even_under_umask_000(write_manifest, tmp_path):
    """Run directories, checkpoints, ledgers and samples are made under the user's umask with others' write removed:
    on a shared cluster nobody else can plant a checkpoint (umask 000 would otherwise make everything 0o777/0o666)."""
    import os
    import stat
    import subprocess
    import sys

    from conftest import REPO

    manifest = write_manifest(steps=(3, 1), checkpoint={"interval_steps": 2, "keep": 2})
    r = subprocess.run([sys.executable, "-m", "launcher.cli", "run", str(manifest), "--runs-dir", str(tmp_path / "runs")],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                       timeout=300, preexec_fn=lambda: os.umask(0))
    assert r.returncode == 0, r.stdout + r.stderr
    made = [p for p in (tmp_path / "runs").rglob("*")] + [tmp_path / "runs"]
    assert any(p.name.endswith(".distcp") for p in made) and any(p.suffix == ".png" for p in made)
    writable = [str(p) for p in made if os.stat(p).st_mode & stat.S_IWOTH]
    assert writable == []
