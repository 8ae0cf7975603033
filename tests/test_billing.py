"""pixeldiff/billing.py: stage rates from fake metrics records (the budget's re-split and the summary's forecast)."""

import pytest

from pixeldiff.billing import StageRate, billed_gpu_seconds, gpu_seconds_cap, run_started, stage_rates, trainer_stage_rates
from pixeldiff.config import BudgetConfig, StageConfig

STAGES = [StageConfig("a", 32, 8, est_img_per_s_per_gpu=10.0), StageConfig("b", 64, 4, est_img_per_s_per_gpu=4.0),
          StageConfig("c", 128, 2)]


def recs(stage, *img_per_s, t0=0.0, step0=0):
    return [{"step": step0 + 5 * k, "stage": stage, "img_per_s": v, "time": t0 + k} for k, v in enumerate(img_per_s)]


@pytest.mark.parametrize("metrics, expected", [
    ([], [10.0, 4.0, None]),  # estimates; no estimate and nothing measured: unknown
    (recs("a", 30.0, 30.0, 30.0), [15.0, 6.0, 15.0 / 16]),  # b: its estimate x 1.5 as a; c: a's, by pixels
    (recs("a", 1000.0, 1000.0, *[20.0] * 10), [10.0, 4.0, 10.0 / 16]),  # the last 10 records only
    (recs("b", 8.0), [10.0, 4.0, 4.0 / 4]),  # c: the nearest measured stage (b)
    (recs("a", 40.0) + recs("b", 4.0), [20.0, 2.0, 2.0 / 4]),  # measured wins over the estimates
    ([{"step": 5, "stage": "a", "img_per_s": 6.0}], [3.0, 1.2, 3.0 / 16]),  # a record without a time
])
def test_trainer_stage_rates(metrics, expected):
    assert trainer_stage_rates(metrics, STAGES, gpus=2) == pytest.approx(expected)


def test_stage_rates_measure_the_latest_segment_that_ran_the_stage():
    old = recs("a", 99.0, 99.0, t0=0.0)
    new = recs("a", 16.0, 24.0, t0=100.0, step0=10)  # 5 steps in 1 s
    rates = stage_rates([old, new, []], STAGES, gpus=2)
    assert rates[0] == StageRate(5.0, 24.0, 10.0, "measured")
    assert rates[1] == StageRate(4.0 * 2 / 4, 8.0, 4.0, "plan")
    assert rates[2] == StageRate(None, None, None, None)
    one = stage_rates([recs("a", 16.0)], STAGES, gpus=2)[0]  # one record: its img/s over the batch
    assert (one.steps_per_s, one.source) == (2.0, "measured")


def test_billing_caps_and_the_wall_clock_start():
    assert gpu_seconds_cap(BudgetConfig(usd=100, gpu_hour_usd=2)) == 100 / 2 * 3600
    assert gpu_seconds_cap(BudgetConfig(usd=100, gpu_hour_usd=0)) is None
    events = [{"event": "job_submitted", "time": 1.0}, {"event": "segment_start", "time": 10.0, "job_start": 4.0, "gpus": 2},
              {"event": "heartbeat", "time": 30.0}, {"event": "segment_start", "time": 50.0, "gpus": 2}]
    assert run_started(events) == 4.0 and run_started(events[:1]) is None
    assert billed_gpu_seconds(events) == 2 * 26 + 0
    assert billed_gpu_seconds(events, until=60.0) == 2 * 26 + 2 * 10


def test_a_segment_is_billed_until_its_supervisor_saw_the_step_end():
    """Slurm bills the tasks' exit and the supervisor's decision after rank 0's segment_end: its step_ended (same job
    run) moves the segment's end; another job's or another restart's does not."""
    def ev(event, t, **kw):
        return {"event": event, "time": t, **kw}

    base = [ev("segment_start", 0.0, job_id="5", restart=0, gpus=2), ev("segment_end", 100.0, reason="deadline")]
    assert billed_gpu_seconds(base) == 200.0
    assert billed_gpu_seconds(base + [ev("step_ended", 104.0, job_id="5", restart=0)]) == 208.0
    assert billed_gpu_seconds(base + [ev("step_ended", 104.0, job_id="5", restart=1)]) == 200.0
    assert billed_gpu_seconds(base + [ev("step_ended", 104.0, job_id="6", restart=0)]) == 200.0
    died = [ev("segment_start", 0.0, job_id="5", restart=0, gpus=2), ev("heartbeat", 50.0),
            ev("step_ended", 60.0, job_id="5", restart=0)]  # no segment_end: closed at the last sign of life
    assert billed_gpu_seconds(died) == 120.0
