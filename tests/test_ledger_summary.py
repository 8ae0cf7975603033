"""The run summary's arithmetic with a fake clock: segments and cost (pixeldiff/billing.py), goodput, forecast, state
(launcher/summary.py and the modules it is built from)."""

import fcntl
import json

import pytest

from launcher.forecast import forecast
from launcher.plan import make_plan
from launcher.rundir import RunDirError, lock_held
from launcher.slurmview import SlurmPoller, SlurmView, match_acct
from launcher.summary import summary
from pixeldiff.billing import billed_gpu_seconds, build_segments, close_segments
from pixeldiff.config import Manifest, dump_yaml, from_dict, validate
from slurm.commands import SlurmError
from slurm.types import AcctRecord, QueueEntry


def ev(event, t, **kw):
    return {"event": event, "time": t, **kw}


def rec(step, t, step_time=1.0, stage="a", loss=0.5, **kw):
    return {"step": step, "stage": stage, "resolution": 32, "loss": loss, "loss_mse": loss, "img_per_s": 8.0,
            "step_time": step_time, "lr": 1e-3, "grad_norm": 0.3, "time": t, **kw}


def acct(job_id, start, end, gpus=2, state="COMPLETED"):
    return AcctRecord(job_id, state, start, end, (end or start) - start, gpus, ["n1"], "0:0")


def make_run(tmp_path, events=(), metrics=(), backend="slurm", usd=100.0, wall_hours=0.0, price=2.0,
             steps=(100, 50), torn=None):
    m = from_dict(Manifest, {
        "name": "t", "cluster": {"backend": backend, "nodes": 1, "gpus_per_node": 2},
        "budget": {"usd": usd, "wall_hours": wall_hours, "gpu_hour_usd": price},
        "stages": [{"name": "a", "resolution": 32, "global_batch": 8, "steps": steps[0], "est_img_per_s_per_gpu": 4.0},
                   {"name": "b", "resolution": 64, "global_batch": 8, "steps": steps[1], "est_img_per_s_per_gpu": 2.0}],
        "model": {"preset": "test"}, "losses": {"lpips": {"weight": 0.0}, "dino": {"weight": 0.0}},
        "logging": {"metrics_interval": 10}})
    validate(m)
    d = tmp_path / "runs" / "t"
    d.mkdir(parents=True)
    (d / "manifest.yaml").write_text(dump_yaml(m))
    (d / "plan.json").write_text(json.dumps(make_plan(m)))
    (d / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + (torn or ""))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return d


# one segment, 2 GPUs, 1 s steps, metrics every 10 steps:
#   1000 start .. 1020 first step (start-up 20 s) .. 1030 step 10 .. 1041 checkpoint (2 s) .. 1042 step 20
#   .. 1053 step 30 (1 s unexplained: sampling) .. 1060 end (7 s idle)
ONE = [ev("segment_start", 1000.0, job_id="11", restart=0, nodes=1, gpus=2, step=0),
       ev("heartbeat", 1035.0, step=15),
       ev("checkpoint_saved", 1041.0, step=20, seconds_blocked=2.0),
       ev("segment_end", 1060.0, reason="finished", step=30)]
ONE_METRICS = [rec(10, 1030.0), rec(20, 1042.0), rec(30, 1053.0)]


def test_goodput_breakdown_adds_up_to_the_billed_gpu_seconds(tmp_path):
    d = make_run(tmp_path, ONE, ONE_METRICS, steps=(30, 10))
    s = summary(d, now=5000.0)
    assert s["billed_gpu_seconds"] == pytest.approx(2 * 60)
    gs = s["goodput_gpu_seconds"]
    assert gs["training"] == pytest.approx(2 * 30)
    assert gs["startup"] == pytest.approx(2 * 20)
    assert gs["checkpoint"] == pytest.approx(2 * 2)
    assert gs["sampling"] == pytest.approx(2 * 1)
    assert gs["idle"] == pytest.approx(2 * 7)
    assert gs["lost"] == 0 and gs["other"] == pytest.approx(0, abs=1e-9)
    assert s["goodput"] == pytest.approx(0.5)
    assert sum(s["goodput_breakdown"].values()) == pytest.approx(1.0, abs=1e-4)


def test_cost_is_gpu_hours_times_price_with_the_caps(tmp_path):
    d = make_run(tmp_path, ONE, ONE_METRICS, usd=0.5, wall_hours=2.0, price=3.6)
    s = summary(d, now=1000.0 + 1800)
    assert s["usd_spent"] == pytest.approx(120 / 3600 * 3.6)  # 120 GPU-s = 1/30 GPU-hour
    assert s["usd_cap"] == 0.5
    assert s["gpu_hours_cap"] == pytest.approx(0.5 / 3.6)
    assert s["wall_hours_left"] == pytest.approx(1.5)  # the wall clock counts from the first segment start


def test_segments_end_at_their_end_event_at_now_at_sacct_end_or_at_their_last_sign_of_life():
    events = [ev("segment_start", 0.0, job_id="1", gpus=8, step=0), ev("heartbeat", 60.0, step=5),
              ev("segment_end", 100.0, reason="deadline", step=9),  # 8 x 100
              ev("segment_start", 200.0, job_id="1", restart=1, gpus=4, step=9), ev("heartbeat", 260.0, step=15),
              ev("job_failed", 400.0, job_id="1", message="x"),  # launcher event: not a sign of the segment's life
              ev("segment_start", 1000.0, job_id="2", gpus=2, step=9), ev("heartbeat", 1060.0, step=20)]
    metrics = [rec(20, 1070.0)]
    segs = build_segments(events, metrics)
    close_segments(segs, now=1100.0, live=False)
    assert [(s.end_source, s.end) for s in segs] == [("segment_end", 100.0), ("last_seen", 260.0), ("last_seen", 1070.0)]
    assert [s.billed for s in segs] == [800.0, 4 * 60.0, 2 * 70.0]
    # with only trainer events, the same total as the budget guard's own count (billed_gpu_seconds)
    trainer_only = [e for e in events if e["event"] != "job_failed"]
    plain = build_segments(trainer_only, [])
    close_segments(plain, now=0.0, live=False)
    assert sum(s.billed for s in plain) == billed_gpu_seconds(trainer_only)

    segs = build_segments(events, metrics)  # sacct knows when the dead run really ended; the last is live
    unmatched = match_acct(segs, [acct("1", -5.0, 101.0, 8), acct("1", 195.0, 290.0, 4, "NODE_FAIL"),
                                  acct("2", 990.0, None, 2, "RUNNING"), acct("3", 500.0, 530.0, 2, "FAILED")])
    close_segments(segs, now=1100.0, live=True)
    assert [(s.end_source, s.end) for s in segs] == [("segment_end", 100.0), ("sacct", 290.0), ("now", 1100.0)]
    assert [r.job_id for r in unmatched] == ["3"]  # a run that never started the trainer


def test_a_job_that_died_without_an_end_event_is_closed_at_sacct_end_and_sacct_bills(tmp_path):
    events = [ev("job_submitted", 990.0, job_id="11", nodes=1, gpus=2), *ONE[:3]]  # no segment_end: died
    d = make_run(tmp_path, events, ONE_METRICS[:2])
    alone = summary(d, now=9000.0)
    assert alone["segments"][0]["end_source"] == "last_seen"
    assert alone["billed_gpu_seconds"] == pytest.approx(2 * 42)  # closed at the last metrics record (1042)
    assert alone["state"] == "failed" and alone["billed_source"] == "ledger"

    view = SlurmView({}, [acct("11", 995.0, 1050.0, state="NODE_FAIL")], None, 9000.0)
    s = summary(d, slurm=view, now=9000.0)
    assert s["segments"][0]["end_source"] == "sacct" and s["segments"][0]["end"] == 1050.0
    assert s["ledger_gpu_seconds"] == pytest.approx(2 * 50)
    assert s["billed_gpu_seconds"] == pytest.approx(2 * 55)  # sacct is the authority (it saw 5 s more start-up)
    assert s["billed_source"] == "sacct"
    assert s["ledger_vs_sacct_pct"] == pytest.approx((100 - 110) / 110 * 100)
    assert s["goodput_gpu_seconds"]["startup"] == pytest.approx(2 * 5 + 2 * 20)  # sacct start -> segment start, too
    assert s["state"] == "failed" and "NODE_FAIL" in s["state_reason"]


def test_a_segment_bills_from_slurms_allocation_start_when_the_trainer_knows_it(tmp_path):
    events = [{**ONE[0], "job_start": 990.0}, *ONE[1:]]  # allocated 10 s before the trainer's segment_start
    d = make_run(tmp_path, events, ONE_METRICS, steps=(30, 10))
    s = summary(d, now=5000.0)
    assert s["billed_gpu_seconds"] == pytest.approx(2 * 70) == billed_gpu_seconds(events)  # as the budget guard counts
    assert s["goodput_gpu_seconds"]["startup"] == pytest.approx(2 * 30)


def test_ledger_within_two_percent_of_sacct():
    """The reconciliation arithmetic: the ledger misses the allocation's first seconds, about 1%."""
    ledger, sacct_ = 8 * (3600 - 40), 8 * 3600  # segment_start 40 s after Slurm's Start
    pct = (ledger - sacct_) / sacct_ * 100
    assert pct == pytest.approx(-1.111, abs=1e-3) and abs(pct) < 2


def test_sacct_reconciliation_on_a_recorded_run_is_within_two_percent(tmp_path):
    events = [*ONE]
    d = make_run(tmp_path, events, ONE_METRICS)
    s = summary(d, slurm=SlurmView({}, [acct("11", 999.0, 1060.5)], None, 0.0), now=5000.0)
    assert s["billed_gpu_seconds"] == pytest.approx(2 * 61.5)
    assert abs(s["ledger_vs_sacct_pct"]) < 2.5 and s["ledger_vs_sacct_pct"] == pytest.approx((120 - 123) / 123 * 100)


def test_lost_work_is_the_steps_the_next_segment_trains_again(tmp_path):
    events = [ev("segment_start", 1000.0, job_id="11", gpus=2, step=0),
              ev("checkpoint_saved", 1021.0, step=10, seconds_blocked=1.0),
              ev("heartbeat", 1045.0, step=30),  # died after step 30: steps 11..30 are redone
              ev("requeue_requested", 1100.0, job_id="11", kind="preemption", restart=1),
              ev("segment_start", 1200.0, job_id="11", restart=1, gpus=2, step=10),
              ev("segment_end", 1260.0, reason="finished", step=40)]
    metrics = [rec(10, 1020.0), rec(20, 1032.0), rec(30, 1044.0),
               rec(20, 1225.0), rec(30, 1235.0), rec(40, 1245.0)]  # steps 20 and 30 appear twice
    d = make_run(tmp_path, events, metrics, steps=(30, 10))
    s = summary(d, now=5000.0)
    gs = s["goodput_gpu_seconds"]
    assert gs["lost"] == pytest.approx(2 * 20 * 1.0)
    assert gs["training"] == pytest.approx(2 * (30 - 20) + 2 * 30)
    assert s["billed_gpu_seconds"] == pytest.approx(2 * 45 + 2 * 60)
    assert s["jobs"][0]["requeues"] == 1 and s["jobs"][0]["segments"] == 2
    assert s["state"] == "finished" and s["step"] == 40


def test_a_torn_last_line_is_ignored(tmp_path):
    d = make_run(tmp_path, ONE[:3], ONE_METRICS[:2], torn='{"event": "segment_end", "time": 10')
    s = summary(d, now=1043.0)
    assert s["state"] == "running"  # no squeue for this run: its last sign of life is 1 s old
    assert s["billed_gpu_seconds"] == pytest.approx(2 * 43)
    assert s["step"] == 20


def test_forecast_from_the_recent_step_rate_and_whether_the_cap_comes_first():
    plan = {"stages": [{"stage": "a", "steps": 100, "global_batch": 8}, {"stage": "b", "steps": 50, "global_batch": 8}]}
    rates = {"a": {"steps_per_s": 2.0}, "b": {"steps_per_s": 0.5}}
    f = forecast(60, plan, rates, gpus=4, price=3.6, billed=1000.0, now=0.0, gpu_seconds_cap=None, wall_end=None)
    assert [x["steps_left"] for x in f["stages"]] == [40, 50]
    assert f["seconds"] == pytest.approx(40 / 2 + 50 / 0.5)  # 120 s
    assert [x["eta_s"] for x in f["stages"]] == [20.0, 120.0]
    assert f["usd"] == pytest.approx(120 * 4 / 3600 * 3.6) and f["total_usd"] == pytest.approx(1480 / 3600 * 3.6)
    assert f["cap_hit_first"] is False
    f = forecast(60, plan, rates, 4, 3.6, 1000.0, 0.0, gpu_seconds_cap=1400.0, wall_end=None)
    assert f["cap_hit_first"] and f["cap"] == "dollars" and f["seconds_to_cap"] == pytest.approx(100.0)
    f = forecast(60, plan, rates, 4, 3.6, 1000.0, 0.0, gpu_seconds_cap=1e9, wall_end=50.0)
    assert f["cap"] == "wall clock" and f["seconds_to_cap"] == 50.0
    unknown = forecast(60, plan, {"a": {"steps_per_s": 2.0}, "b": {"steps_per_s": None}}, 4, 3.6, 0.0, 0.0, None, None)
    assert unknown["seconds"] is None and unknown["cap_hit_first"] is None


def test_the_summary_forecast_uses_the_last_records_rate(tmp_path):
    d = make_run(tmp_path, ONE[:3], [rec(10, 1030.0), rec(20, 1040.0), rec(30, 1045.0)], steps=(100, 50))
    s = summary(d, now=1046.0)
    a, b = s["stages"]
    assert a["steps_per_s"] == pytest.approx(20 / 15)  # steps 10 -> 30 in 15 s
    assert b["steps_per_s"] == pytest.approx(2.0 * 2 / 8) and b["rate_source"] == "plan"  # 2 img/s/GPU x 2 GPUs / 8
    assert a["eta_s"] == pytest.approx(70 / (20 / 15))
    assert s["forecast"]["seconds"] == pytest.approx(70 / (20 / 15) + 50 / 0.5)
    assert s["usd_forecast"] == pytest.approx((s["billed_gpu_seconds"] + 2 * s["forecast"]["seconds"]) / 3600 * 2.0)


QUEUED = QueueEntry("11", "PENDING", 1, [], 0.0, 3600.0, "Priority")
RUNNING = QueueEntry("11", "RUNNING", 1, ["n1"], 30.0, 3570.0, "n1")
SUB = ev("job_submitted", 900.0, job_id="11", nodes=1, gpus=2)


@pytest.mark.parametrize("events, view, state", [
    ([], None, "queued"),
    ([SUB], None, "queued"),
    ([SUB], SlurmView({"11": QUEUED}, [], None, 0), "queued"),
    ([SUB, ONE[0]], SlurmView({"11": RUNNING}, [], None, 0), "running"),
    ([SUB, *ONE], SlurmView({}, [], None, 0), "finished"),
    ([SUB, ONE[0], ev("budget_stop", 1050.0, step=25), ev("segment_end", 1060.0, reason="budget", step=25)], None, "over_budget"),
    ([SUB, ONE[0], ev("segment_end", 1060.0, reason="failed: shards unreadable", step=25)], None, "failed"),
    ([SUB, ONE[0], ev("heartbeat", 1050.0, step=1)], SlurmView({}, [acct("11", 990.0, 1070.0, state="NODE_FAIL")], None, 0), "failed"),
    ([SUB, ONE[0], ev("heartbeat", 1050.0, step=1)], SlurmView({}, [], None, 0), "failed"),  # vanished from squeue
    ([SUB, ONE[0], ev("cancel_requested", 1040.0, job_ids=["11"]), ev("segment_end", 1045.0, reason="signal SIGTERM", step=9)],
     SlurmView({}, [], None, 0), "cancelled"),
    ([SUB, ONE[0], ev("segment_end", 1045.0, reason="deadline", step=9), ev("requeue_requested", 1046.0, job_id="11")],
     SlurmView({"11": QUEUED}, [], None, 0), "queued"),
    ([SUB, ONE[0], ev("segment_end", 1045.0, reason="signal SIGUSR2", step=9)], None, "queued"),  # preempted: requeue
    ([SUB, ev("job_failed", 950.0, job_id="11", message="boom", failures=3), ev("run_stopped", 951.0, reason="3 start-up failures")],
     None, "failed"),
    ([SUB, ONE[0], ev("segment_end", 1045.0, reason="deadline", step=9),
      ev("run_stopped", 1046.0, reason="3 requeues after a timeout already", kind="limits")], None, "failed"),
    ([SUB, ONE[0], ev("segment_end", 1045.0, reason="deadline", step=9),
      ev("run_stopped", 1046.0, reason="the next job would not fit in the budget", kind="budget")], None, "over_budget"),
    ([SUB, ONE[0], ev("segment_end", 1045.0, reason="deadline", step=9),
      ev("run_stopped", 1046.0, reason="cancelled by pixeldiff-launch cancel", kind="cancelled")], None, "cancelled"),
    ([SUB, ev("run_stopped", 951.0, reason="x", kind="failed"), ev("job_submitted", 2000.0, job_id="12")],
     None, "queued"),  # run again after it stopped: the new job is what counts
])
def test_state_from_events_and_slurm(tmp_path, events, view, state):
    d = make_run(tmp_path, events)
    assert summary(d, slurm=view, now=10_000.0)["state"] == state


def test_a_local_run_is_running_exactly_while_its_lock_is_held(tmp_path):
    d = make_run(tmp_path, ONE[:2], backend="local")
    assert summary(d, now=50_000.0)["state"] == "failed"  # no lock, no end event: it died
    with open(d / "run.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert lock_held(d)
        s = summary(d, now=50_000.0)
        assert s["state"] == "running" and s["billed_gpu_seconds"] == pytest.approx(2 * 49_000)  # open: counts to now
    assert not lock_held(d)
    sigint = make_run(tmp_path / "x", [*ONE[:2], ev("segment_end", 1040.0, reason="signal SIGINT", step=12)], backend="local")
    assert summary(sigint, now=50_000.0)["state"] == "cancelled"


class FakeSlurm:
    def __init__(self):
        self.calls, self.fail = [], False

    def queue(self, ids):
        self.calls.append("squeue")
        if self.fail:
            raise SlurmError("squeue: slurm_load_jobs error: Socket timed out")
        return {"11": RUNNING}

    def accounting(self, ids):
        self.calls.append("sacct")
        return [acct("11", 995.0, None, state="RUNNING")]


def test_the_poller_asks_slurm_at_most_every_ten_seconds_and_keeps_the_last_answer_when_it_fails(tmp_path):
    d = make_run(tmp_path, [SUB, ONE[0]])
    fake, t = FakeSlurm(), [2000.0]
    poller = SlurmPoller(fake, min_interval_s=10.0, clock=lambda: t[0])
    for dt in (0, 3, 6, 9.9):
        s = summary(d, slurm=poller, now=2000.0 + dt)
    assert fake.calls == ["squeue", "sacct"] and s["state"] == "running"
    fake.fail, t[0] = True, 2011.0
    s = summary(d, slurm=poller, now=2011.0)
    assert fake.calls == ["squeue", "sacct", "squeue"]
    assert s["state"] == "running" and s["billed_source"] == "sacct"  # the last answer, 11 s old
    assert any("Slurm did not answer" in n and "Socket timed out" in n for n in s["notices"])
    fake.fail = False
    s = summary(d, slurm=poller, now=2022.0)
    assert s["notices"] == [] and fake.calls[-2:] == ["squeue", "sacct"]


def test_not_a_run_directory(tmp_path):
    with pytest.raises(RunDirError, match="no such directory"):
        summary(tmp_path / "nope")
    with pytest.raises(RunDirError, match="no manifest.yaml"):
        summary(tmp_path)
