"""Stopping on time: the job's end and the budget, with a fake clock for the arithmetic and real runs for the rest."""

import time

import pytest

from launcher.cli import main as launch_main
from pixeldiff import checkpoint
from pixeldiff.config import BudgetConfig
from pixeldiff.billing import billed_gpu_seconds
from pixeldiff.budget import JobClock, Limits, margin_s
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
    # a job that died is closed at its trainer's last sign of life, not at the launcher's next event hours later
    dead = [ev("segment_start", 0, gpus=8), ev("heartbeat", 60), ev("job_submitted", 7 * 3600, job_id="9")]
    assert billed_gpu_seconds(dead) == 8 * 60
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
    assert events[-1]["reason"] == "budget"
    assert [e["event"] for e in events[-3:]] == ["budget_stop", "samples_written", "segment_end"]
    stopped = events[-1]["step"]
    assert list((tmp_path / "tiny" / "samples").glob(f"step-{stopped:08d}.png"))
    # the first job planned for a 10 s save before it measured one; the next starts from the measured times (a
    # shorter margin), so it may use what is left -- and then the budget is spent: another start stops at once
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path)]) == 0
    second = read_jsonl(tmp_path / "tiny" / "ledger.jsonl")
    assert second[-1]["reason"] == "budget" and second[-1]["step"] >= stopped
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path)]) == 0
    third = read_jsonl(tmp_path / "tiny" / "ledger.jsonl")
    assert third[-1]["reason"] == "budget" and third[-1]["step"] == second[-1]["step"]
    assert billed_gpu_seconds(third) <= cap_s + 5


def test_finish_stages_shrinks_the_remaining_stages_from_the_measured_speed(write_manifest, tmp_path):
    """budget.policy finish_stages: at a job's start the trainer re-splits what the budget has left (a fake clock,
    a recorded ledger and metrics; the real Trainer and its files)."""
    import json

    from launcher.cli import prepare_run_dir
    from launcher.manifest import load_manifest
    from pixeldiff.train import Trainer

    # $1 = 1 GPU-second; 1000 GPU-s. Planned: 100k steps at 16 px, then 50k at 32 px, 8 images a step.
    path = write_manifest(steps=(100_000, 50_000), budget={"usd": 1000, "gpu_hour_usd": 3600.0, "policy": "finish_stages"})
    run_dir, _ = prepare_run_dir(load_manifest(path, []), tmp_path)
    t0 = 1_000_000.0
    # the first job: 400 s, 2000 steps at 16 px, measured at 40 img/s (5 steps/s)
    (run_dir / "ledger.jsonl").write_text(json.dumps({"event": "segment_start", "time": t0, "gpus": 1, "step": 0}) + "\n"
                                          + json.dumps({"event": "segment_end", "time": t0 + 400, "reason": "deadline", "step": 2000}) + "\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "stage": "16px", "img_per_s": 40.0}) + "\n"
                                                   for k in range(100, 2001, 100)))
    tr = Trainer(run_dir, log=lambda s: None)
    tr.state.step = 2000
    # this job started at t0 + 500 (the fake clock); the clock reads the ledger and metrics as the job would
    tr.clock = JobClock(tr.m, read_jsonl(run_dir / "ledger.jsonl"), read_jsonl(run_dir / "metrics.jsonl"), gpus=1,
                        start=t0 + 500, under_slurm=False, environ={})
    tr.resplit_stages(now=t0 + 510)  # this job started 10 s ago: 590 GPU-s left, 10 s + the margin per job
    ends = tr.schedule.ends
    assert ends[0] > 2000 and ends[1] > ends[0]  # both stages still run
    # 16 px at 5 steps/s, 32 px at a quarter of that (4x the pixels, no estimate): the remaining steps take what
    # is left after this job's start-up and the stop margin, and not much less
    need = (ends[0] - 2000) / 5.0 + (ends[1] - ends[0]) / 1.25
    left = 590 - 10 - margin_s(0.0, 10.0)
    assert left * 0.97 <= need <= left
    assert tr.state.stage_ends == list(ends)
    change = read_jsonl(run_dir / "ledger.jsonl")[-1]
    assert change["event"] == "schedule_change" and change["previous"] == [100_000, 150_000] and change["ends"] == list(ends)


@pytest.mark.parametrize("policy", ["fixed_steps", "extend_last_stage"])
def test_a_schedule_far_inside_the_budget_is_said_and_extend_last_stage_spends_the_rest(write_manifest, tmp_path,
                                                                                        policy):
    """The same fake-clock setting at 4x the speed: 2000 + 500 steps left need ~100 s of the 580 left."""
    import json

    from launcher.cli import prepare_run_dir
    from launcher.manifest import load_manifest
    from pixeldiff.schedule import FILL
    from pixeldiff.train import Trainer

    path = write_manifest(name=policy, steps=(4000, 500), budget={"usd": 1000, "gpu_hour_usd": 3600.0, "policy": policy})
    run_dir, _ = prepare_run_dir(load_manifest(path, []), tmp_path)
    t0 = 1_000_000.0
    (run_dir / "ledger.jsonl").write_text(json.dumps({"event": "segment_start", "time": t0, "gpus": 1, "step": 0}) + "\n"
                                          + json.dumps({"event": "segment_end", "time": t0 + 400, "reason": "deadline", "step": 2000}) + "\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "stage": "16px", "img_per_s": 160.0}) + "\n"
                                                   for k in range(100, 2001, 100)))
    logged = []
    tr = Trainer(run_dir, log=logged.append)
    tr.state.step = 2000
    tr.clock = JobClock(tr.m, read_jsonl(run_dir / "ledger.jsonl"), read_jsonl(run_dir / "metrics.jsonl"), gpus=1,
                        start=t0 + 500, under_slurm=False, environ={})
    tr.budget_outlook(now=t0 + 510)
    tr.resplit_stages(now=t0 + 510)
    events = read_jsonl(run_dir / "ledger.jsonl")
    (under,) = [e for e in events if e["event"] == "under_budget"]
    need = 2000 / 20.0 + 500 / 5.0  # 16 px at 20 steps/s; 32 px at a quarter of that (4x the pixels)
    assert under["seconds_needed"] == pytest.approx(need, rel=1e-6)
    assert under["projected_end"] == pytest.approx(t0 + 510 + need)
    assert under["projected_usd"] == pytest.approx(400 + 10 + need, rel=1e-3)  # $1 per GPU-s: both jobs + the rest
    assert any("the schedule ends in" in line and "unused" in line for line in logged)
    if policy == "fixed_steps":
        assert tr.schedule.ends == (4000, 4500) and not any(e["event"] == "schedule_change" for e in events)
        return
    left = under["seconds_left"]
    ends = tr.schedule.ends
    assert ends[0] == 4000 and ends[1] > 4500  # the last stage is lengthened, the first kept
    assert 2000 / 20.0 + (ends[1] - 4000) / 5.0 == pytest.approx(FILL * left, abs=0.5)
    assert events[-1]["event"] == "schedule_change" and events[-1]["ends"] == list(ends)


def test_the_final_sample_grid_is_inside_the_stop_margin(write_manifest, tmp_path):
    """A measured grid time (this job's, or earlier jobs' samples_written events) moves the stop earlier by 1.5x it."""
    from launcher.manifest import load_manifest

    path = write_manifest(budget={"wall_hours": 1.0})
    m = load_manifest(path, [])
    t0 = 1_000_000.0
    past = [ev("segment_start", t0, gpus=1), ev("samples_written", t0 + 50, seconds=40.0), ev("segment_end", t0 + 60)]
    clock = JobClock(m, past, [], gpus=1, start=t0 + 100, under_slurm=False, environ={})
    assert clock.samples_s == 40.0
    end = t0 + 3600
    just_before = end - margin_s(0.0, 10.0) - 1  # outside the margin without a grid
    assert Limits.from_run(m.budget, past, 1, environ={}).check(just_before, 0.0, 0.0, 10.0) is None
    assert clock.stop_reason(now=just_before) == "budget"
    assert clock.stop_reason(now=end - margin_s(0.0, 10.0, 40.0) - 1) is None
    fresh = JobClock(m, [], [], gpus=1, start=t0, under_slurm=False, environ={})
    fresh.observe_step(0.5)
    assert fresh.samples_s == 0.0 and fresh.samples_estimate() > 0  # before any grid: an estimate from the step time
    fresh.observe_samples(12.0)
    assert fresh.samples_s == 12.0
