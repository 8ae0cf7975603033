"""The trainer end to end on the CPU: determinism, the stage switch, outputs, and resume after real signals."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, run_cli
from shardutil import write_shards
from launcher.cli import main as launch_main
from pixeldiff import checkpoint
from pixeldiff.ledger import read_jsonl


def run_local(manifest: Path, runs: Path, *extra) -> int:
    return launch_main(["run", str(manifest), "--runs-dir", str(runs), *extra])


def final_state(run_dir: Path) -> dict:
    path = checkpoint.latest_valid(run_dir / "checkpoints")
    return {**checkpoint.load(path), "train_state": checkpoint.rank_states(path)[0]}


def assert_same_state(a: dict, b: dict):
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer state {i}.{k} differs"
    assert a["train_state"]["step"] == b["train_state"]["step"]
    assert a["train_state"]["data"] == b["train_state"]["data"]


def test_two_fresh_runs_log_identical_losses_and_switch_stage(write_manifest, tmp_path):
    manifest = write_manifest(steps=(12, 6))
    assert run_local(manifest, tmp_path / "a") == 0
    assert run_local(manifest, tmp_path / "b") == 0
    la = read_jsonl(tmp_path / "a" / "tiny" / "metrics.jsonl")
    lb = read_jsonl(tmp_path / "b" / "tiny" / "metrics.jsonl")
    assert [r["step"] for r in la] == list(range(1, 19))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert len(set(r["loss"] for r in la)) > 10  # the losses really vary from step to step
    for r in la:
        assert {"step", "stage", "loss", "img_per_s", "lr"} <= r.keys()
    assert [r["stage"] for r in la] == ["16px"] * 12 + ["32px"] * 6
    assert [r["resolution"] for r in la][11:13] == [16, 32]

    run_dir = tmp_path / "a" / "tiny"
    events = read_jsonl(run_dir / "ledger.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "segment_start" and kinds[-1] == "segment_end"
    assert events[-1]["reason"] == "finished"
    (change,) = [e for e in events if e["event"] == "stage_change"]
    assert change["step"] == 12 and change["stage"] == "32px"
    saved = [e["step"] for e in events if e["event"] == "checkpoint_saved"]
    assert saved == [10, 18]
    grid = Image.open(run_dir / "samples" / "step-00000018.png")
    assert grid.size[1] > 32 and grid.mode == "RGB"  # one row of 4 upscaled 32 px samples
    assert "a red circle on black" in (run_dir / "samples" / "step-00000018.txt").read_text()


def test_different_seed_gives_different_losses(write_manifest, tmp_path):
    assert run_local(write_manifest(steps=(3, 1)), tmp_path / "a") == 0
    assert run_local(write_manifest(steps=(3, 1), seed=1), tmp_path / "b") == 0
    la = read_jsonl(tmp_path / "a" / "tiny" / "metrics.jsonl")
    lb = read_jsonl(tmp_path / "b" / "tiny" / "metrics.jsonl")
    assert [r["loss"] for r in la] != [r["loss"] for r in lb]


def start_and_interrupt(manifest: Path, runs: Path, stop_at: int, how: str) -> dict:
    """Start a real `pixeldiff-launch run`, signal it once it logged step `stop_at`; -> its last ledger event."""
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "run", str(manifest), "--runs-dir", str(runs)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    name = manifest.stem
    metrics = runs / name / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        rows = read_jsonl(metrics)
        if rows and rows[-1]["step"] >= stop_at:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stdout.read()
    if how.endswith("-to-group"):  # SIGINT: what Ctrl-C in a terminal does; SIGTERM: what Slurm does to a step
        sig = signal.Signals[how.removesuffix("-to-group")]
        os.killpg(proc.pid, sig)  # the DataLoader's workers too
        expected = 128 + sig
    else:
        proc.send_signal(signal.SIGTERM)
        if how == "SIGTERM-twice":
            proc.send_signal(signal.SIGTERM)
        expected = 128 + signal.SIGTERM
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == expected, out
    assert "Traceback" not in out
    stopped = read_jsonl(runs / name / "ledger.jsonl")[-1]
    assert stopped["event"] == "segment_end" and stopped["reason"].startswith("signal")
    assert stopped["step"] >= stop_at
    assert checkpoint.latest_valid(runs / name / "checkpoints").name == f"step-{stopped['step']:08d}"
    return stopped


def resume_and_compare(manifest: Path, tmp_path: Path, stopped: dict):
    """Run the same command again; it must end with the weights and losses of an uninterrupted run."""
    name = manifest.stem
    again = run_cli("launcher.cli", "run", str(manifest), "--runs-dir", str(tmp_path / "cut"))
    assert "Traceback" not in again.stdout + again.stderr
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in again.stdout and f"at step {stopped['step']}" in again.stdout
    assert run_local(manifest, tmp_path / "whole") == 0
    assert_same_state(final_state(tmp_path / "cut" / name), final_state(tmp_path / "whole" / name))
    cut = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "cut" / name / "metrics.jsonl")}
    whole = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "whole" / name / "metrics.jsonl")}
    assert cut == whole


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT-to-group", "SIGTERM-twice"])
def test_interrupted_run_resumes_to_bit_identical_weights(write_manifest, tmp_path, how):
    """Stop a real `pixeldiff-launch run` process at a random step, run again: same weights as uninterrupted."""
    manifest = write_manifest(steps=(150, 40))
    stopped = start_and_interrupt(manifest, tmp_path / "cut", random.Random(how).randint(15, 120), how)
    assert stopped["step"] < 190
    resume_and_compare(manifest, tmp_path, stopped)


def test_training_from_shards_resumes_bit_identical(write_manifest, tmp_path):
    """WebDataset shards read by 2 worker processes: the data position survives the restart exactly."""
    write_shards(tmp_path / "shards", n_shards=6, per_shard=10)
    data = {"source": "webdataset", "shards": str(tmp_path / "shards" / "train-{000..005}.tar"), "workers": 2,
            "text": {"max_tokens": 8, "dim": 16}}
    manifest = write_manifest(name="shardrun", steps=(60, 20), data=data)
    stopped = start_and_interrupt(manifest, tmp_path / "cut", 25, "SIGTERM")
    resume_and_compare(manifest, tmp_path, stopped)
    rows = read_jsonl(tmp_path / "whole" / "shardrun" / "metrics.jsonl")
    assert rows[-1]["bad_samples"] == {}


def test_resume_ignores_a_partial_checkpoint(write_manifest, tmp_path, capsys):
    manifest = write_manifest(steps=(20, 5))
    assert run_local(manifest, tmp_path) == 0
    ckpts = tmp_path / "tiny" / "checkpoints"
    valid, _ = checkpoint.list_checkpoints(ckpts)
    assert [p.name for p in valid] == ["step-00000020", "step-00000025"]  # keep 2
    # a save that died before its marker, newer than every valid one
    partial = checkpoint.step_dir(ckpts, 99)
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"torn")
    capsys.readouterr()
    assert run_local(manifest, tmp_path) == 0
    out = capsys.readouterr().out
    assert "ignoring incomplete checkpoint" in out and "step-00000099" in out
    assert "resumed from" in out and "step-00000025" in out


def test_rerun_with_a_changed_manifest_is_refused(write_manifest, tmp_path, capsys):
    assert run_local(write_manifest(steps=(2, 1)), tmp_path) == 0
    capsys.readouterr()
    assert run_local(write_manifest(steps=(2, 1)), tmp_path, "--set", "optimizer.lr=0.5") == 2
    err = capsys.readouterr().err
    assert "optimizer.lr" in err and "--set name=tiny-2" in err


def test_a_running_run_is_not_started_twice(write_manifest, tmp_path):
    manifest = write_manifest(steps=(2, 1))
    assert run_local(manifest, tmp_path) == 0
    from pixeldiff.process import lock_run

    held = lock_run(tmp_path / "tiny")  # as a running job holds it
    try:
        r = run_cli("launcher.cli", "run", str(manifest), "--runs-dir", str(tmp_path))
    finally:
        held.close()
    assert r.returncode == 2 and "already running" in r.stderr and "Traceback" not in r.stderr


def test_a_stale_lock_is_waited_for_then_refused_with_the_holder_named(tmp_path):
    """A requeued job can find run.lock held by the dead node's job until the file system's lease expires: it retries
    for `wait_s` instead of failing at once."""
    from pixeldiff.process import RunLocked, lock_run

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from pixeldiff.process import lock_run; f = lock_run(__import__('pathlib').Path(sys.argv[2])); "
                               "print('held', flush=True); time.sleep(float(sys.argv[3]))", str(REPO), str(tmp_path), "3"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0, said = time.monotonic(), []
    with pytest.raises(RunLocked, match=r"already running \(pid \d+ on .*\) \(waited 1 s"):
        lock_run(tmp_path, wait_s=1.0, poll_s=0.1, log=said.append)
    assert said and "waiting up to 1 s" in said[0]
    lock = lock_run(tmp_path, wait_s=30.0, poll_s=0.1, log=said.append)  # the holder lets go after 3 s
    assert 1.5 < time.monotonic() - t0 < 20
    assert (tmp_path / "run.lock").read_text().startswith(f"pid {os.getpid()} ")
    lock.close()
    holder.wait(timeout=10)


def test_detached_run_finishes_in_the_background(write_manifest, tmp_path):
    manifest = write_manifest(steps=(5, 2))
    r = run_cli("launcher.cli", "run", str(manifest), "--runs-dir", str(tmp_path), "--detach")
    assert r.returncode == 0, r.stderr
    assert "job running in the background" in r.stdout
    ledger = tmp_path / "tiny" / "ledger.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        events = read_jsonl(ledger)
        if events and events[-1]["event"] == "segment_end":
            break
        time.sleep(0.2)
    assert events[-1]["reason"] == "finished"
    assert list((tmp_path / "tiny" / "jobs").glob("local-*.log"))


def test_sample_command_writes_a_grid(write_manifest, tmp_path):
    assert run_local(write_manifest(steps=(3, 1)), tmp_path) == 0
    out = tmp_path / "grid.png"
    r = run_cli("pixeldiff.sample", str(tmp_path / "tiny"), "--prompt", "a red circle on black", "--prompt",
                "a blue square on white", "--out", str(out), "--steps", "3", "--cfg", "2", "--per-prompt", "3",
                "--sampler", "heun")
    assert r.returncode == 0, r.stderr
    img = Image.open(out)
    w, h = img.size
    assert w > h  # 2 rows x 3 columns
    assert "32 px" in r.stdout and "step 4" in r.stdout
    bad = run_cli("pixeldiff.sample", str(tmp_path / "nope"), "--prompt", "x", "--out", str(out))
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_shipped_dryrun_manifest_runs_shortened(tmp_path):
    """The quick-start manifest itself, with fewer steps so the suite stays fast."""
    r = run_cli("launcher.cli", "run", str(REPO / "manifests" / "dryrun.yaml"), "--runs-dir", str(tmp_path),
                "--set", "stages[0].steps=4", "--set", "stages[1].steps=2", "--set", "logging.sample_steps=2",
                "--set", "eval.samples=16", "--set", "eval.sampling_steps=2")
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = tmp_path / "dryrun"
    evals = read_jsonl(run_dir / "eval.jsonl")  # its eval section: at the end of each stage
    assert [(e["step"], e["why"], e["samples"]) for e in evals] == [(4, "stage_end", 16), (6, "end", 16)]
    assert evals[0]["features"]["fid"].startswith("random-conv") and "fid" in evals[0] and "cmmd" in evals[0]
    assert (run_dir / "manifest.yaml").exists() and (run_dir / "plan.json").exists()
    assert json.loads((run_dir / "plan.json").read_text())["total_steps"] == 6
    assert (run_dir / "samples" / "step-00000006.png").exists()
    assert checkpoint.latest_valid(run_dir / "checkpoints").name == "step-00000006"


def test_compiled_training_logs_the_losses_of_eager_training(write_manifest, tmp_path):
    """cluster.compile: the same run through torch.compile (the one compiled trainer test; ~1 min on 2 cores)."""
    assert run_local(write_manifest(steps=(3, 1)), tmp_path / "eager") == 0
    assert run_local(write_manifest(steps=(3, 1), cluster={"compile": True}), tmp_path / "compiled") == 0
    eager = [r["loss"] for r in read_jsonl(tmp_path / "eager" / "tiny" / "metrics.jsonl")]
    compiled = [r["loss"] for r in read_jsonl(tmp_path / "compiled" / "tiny" / "metrics.jsonl")]
    assert len(compiled) == 4 and compiled == pytest.approx(eager, rel=1e-3)


def test_shard_run_signalled_as_a_process_group_resumes_bit_identical(write_manifest, tmp_path):
    """Slurm signals every process of a step, DataLoader workers included: SIGTERM and then SIGINT to the whole
    process group of a run fed by 2 workers each stop it at a step boundary with a complete checkpoint and the
    signal's exit status; the resumed run ends bit-identical to an uninterrupted one."""
    write_shards(tmp_path / "shards", n_shards=6, per_shard=10)
    data = {"source": "webdataset", "shards": str(tmp_path / "shards" / "train-{000..005}.tar"), "workers": 2,
            "text": {"max_tokens": 8, "dim": 16}}
    manifest = write_manifest(name="groupsig", steps=(60, 20), data=data)
    rng = random.Random(12)
    first = start_and_interrupt(manifest, tmp_path / "cut", rng.randint(5, 25), "SIGTERM-to-group")
    assert first["reason"] == "signal SIGTERM"
    second = start_and_interrupt(manifest, tmp_path / "cut", rng.randint(first["step"] + 3, 70), "SIGINT-to-group")
    assert second["reason"] == "signal SIGINT" and second["step"] > first["step"]
    resume_and_compare(manifest, tmp_path, second)
