"""Stopping on time: the job's end and the budget, with a fake clock for the arithmetic and real runs for the rest."""

import time

import pytest

from launcher.cli import main as launch_main
from pixeldiff import checkpoint
from pixeldiff.config import BudgetConfig
from pixeldiff.deadline import Limits, billed_gpu_seconds, margin_s
from pixeldiff.ledger import read_jsonl


def ev(event, t, **kw):
    return {"event": event, "time": t, **kw}


def test_billed_gpu_seconds_closes_dead_segments_at_their_last_sign_of_life():
    events = [ev("segment_start", 0, gpus=8), ev("heartbeat", 60), ev("segment_end", 100),  # 8 x 100
              ev("segment_start", 200, gpus=4), ev("heartbeat", 260), ev("heartbeat", 320),  # died: 4 x 120
              ev("segment_start", 1000, gpus=2)]  # open: 2 x (until - 1000)
    assert billed_gpu_seconds(events[:3]) == 800
    assert billed_gpu_seconds(events[:6]) == 800 + 4 * 120  # no end and no `until`: to the last heartbeat
    assert billed_gpu_seconds(events, until=1050) == 800 + 480 + 2 * 50
    # a Slurm job's allocation started before its trainer did
    assert billed_gpu_seconds([ev("segment_start", 10, gpus=2, job_start=4), ev("segment_end", 20)]) == 2 * 16


def test_limits_with_a_fake_clock():
    step, ckpt = 2.0, 20.0
    m = margin_s(step, ckpt)
    assert m == 2 * 2.0 + 1.5 * 20.0 + 30
    lim = Limits.from_run(BudgetConfig(usd=100, wall_hours=1, gpu_hour_usd=2), [ev("segment_start", 1000.0)], gpus=4,
                          environ={"PIXELDIFF_DEADLINE": "2000"})
    assert (lim.job_end, lim.wall_end, lim.gpu_seconds_cap) == (2000.0, 1000.0 + 3600, 100 / 2 * 3600)
    assert lim.check(2000 - m - 1, 0, step, ckpt) is None
    assert lim.check(2000 - m, 0, step, ckpt) == "deadline"
    assert lim.check(1500, lim.gpu_seconds_cap - 4 * m, step, ckpt) == "budget"  # dollars, counted in GPU-seconds
    assert lim.check(1500, lim.gpu_seconds_cap - 4 * m - 1, step, ckpt) is None
    far = Limits.from_run(BudgetConfig(wall_hours=1), [ev("segment_start", 0.0)], gpus=1, environ={})
    assert far.check(3600 - m, 0, step, ckpt) == "budget" and far.check(3600 - m - 1, 0, step, ckpt) is None
    assert Limits.from_run(BudgetConfig(), [], gpus=1, environ={}).check(1e12, 1e12, step, ckpt) is None


def test_the_last_job_cut_to_the_budget_stops_for_the_budget():
    step, ckpt = 1.0, 10.0
    m = margin_s(step, ckpt)
    # 4 GPUs, 400 GPU-seconds left at t=0: the budget ends at t=100; the job was given 1 minute (ends at 60)
    lim = Limits(job_end=60.0, wall_end=None, gpu_seconds_cap=1000.0, gpus=4)
    assert lim.budget_end(0.0, 600.0) == 100.0
    assert lim.check(60 - m, 600.0 + 4 * (60 - m), step, ckpt) == "budget"
    # a job ending well before the budget does is an ordinary deadline
    far = Limits(job_end=60.0, wall_end=None, gpu_seconds_cap=10_000.0, gpus=4)
    assert far.check(60 - m, 600.0 + 4 * (60 - m), step, ckpt) == "deadline"


def test_a_job_saves_and_exits_before_its_deadline(write_manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELDIFF_DEADLINE", str(time.time() + margin_s(0, 10.0) + 10))  # start-up + a few s of training
    manifest = write_manifest(steps=(1_000_000, 1))
    t0 = time.time()
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path)]) == 0
    assert time.time() - t0 < 30
    end = read_jsonl(tmp_path / "tiny" / "ledger.jsonl")[-1]
    assert end["event"] == "segment_end" and end["reason"] == "deadline" and end["step"] > 0
    assert checkpoint.latest_valid(tmp_path / "tiny" / "checkpoints").name == f"step-{end['step']:08d}"


def test_the_budget_stops_the_run_for_good(write_manifest, tmp_path):
    # $1 at $3600/GPU-hour = 1 GPU-second... plus the margin: pick a cap a few seconds past the margin
    cap_s = margin_s(0, 10.0) + 3
    manifest = write_manifest(steps=(1_000_000, 1), budget={"usd": cap_s, "gpu_hour_usd": 3600.0})
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path)]) == 0
    events = read_jsonl(tmp_path / "tiny" / "ledger.jsonl")
    assert events[-1]["reason"] == "budget" and events[-2]["event"] == "budget_stop"
    stopped = events[-1]["step"]
    assert list((tmp_path / "tiny" / "samples").glob(f"step-{stopped:08d}.png"))
    # running again does not spend more: it stops at once, at the same step
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path)]) == 0
    again = read_jsonl(tmp_path / "tiny" / "ledger.jsonl")
    assert again[-1]["reason"] == "budget" and again[-1]["step"] == stopped
    assert billed_gpu_seconds(again) <= cap_s + 5
