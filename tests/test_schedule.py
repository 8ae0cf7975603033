import pytest
"""Stage boundaries and the budget re-split (pure functions)."""

from pixeldiff.schedule import StageSchedule, resplit


def test_stage_at_boundaries():
    s = StageSchedule((100, 150))
    assert [s.stage_at(k) for k in (0, 99, 100, 149, 150, 10_000)] == [0, 0, 1, 1, 1, 1]


def test_resplit_keeps_the_schedule_when_it_fits():
    # 100 steps x 32 images at 8 img/s/GPU on 4 GPUs = 100 s, then 50 x 32 at 4 = 100 s: 200 s needed
    assert resplit((100, 150), 0, [32, 32], [8.0, 4.0], 4, seconds_left=200) == (100, 150)
    assert resplit((100, 150), 0, [32, 32], [8.0, 4.0], 4, seconds_left=1e9) == (100, 150)  # never lengthens


def test_resplit_shrinks_every_remaining_stage_by_the_same_factor():
    # at step 40 of stage 0: 60 steps left (60 s) + 50 steps of stage 1 (100 s) = 160 s needed, 80 s left: half
    ends = resplit((100, 150), 40, [32, 32], [8.0, 4.0], 4, seconds_left=80)
    assert ends == (40 + 30, 40 + 30 + 25)
    need = (ends[0] - 40) * 32 / (8.0 * 4) + (ends[1] - ends[0]) * 32 / (4.0 * 4)
    assert need <= 80


def test_resplit_keeps_finished_stages_and_every_stage_runs():
    # in stage 1 already: stage 0 keeps its 100 steps; a budget that is all but gone still leaves one step
    assert resplit((100, 150), 120, [32, 32], [8.0, 4.0], 4, seconds_left=0) == (100, 121)
    assert resplit((100, 150), 10, [32, 32], [8.0, 4.0], 4, seconds_left=0) == (11, 12)


def test_resplit_without_a_rate_changes_nothing():
    assert resplit((100, 150), 10, [32, 32], [8.0, None], 4, seconds_left=1) == (100, 150)


def test_extend_lengthens_only_the_last_stage_to_fill_the_budget():
    from pixeldiff.schedule import FILL

    # 60 + 100 steps left at 1 + 0.5 steps/s need 260 s of 1000: the last stage grows to fill 98% of it
    ends = resplit((100, 150), 40, [32, 32], [8.0, 4.0], 4, seconds_left=1000, extend=True)
    assert ends[0] == 100 and (ends[0] - 40) / 1.0 + (ends[1] - 100) / 0.5 == pytest.approx(FILL * 1000, abs=2)
    assert resplit((100, 150), 40, [32, 32], [8.0, 4.0], 4, seconds_left=165, extend=True) == (100, 150)  # close: kept
    assert resplit((100, 150), 40, [32, 32], [8.0, 4.0], 4, seconds_left=80, extend=True) == \
        resplit((100, 150), 40, [32, 32], [8.0, 4.0], 4, seconds_left=80)  # too long: shrunk as finish_stages does
    assert resplit((100, 150), 40, [32, 32], [8.0, None], 4, seconds_left=1000, extend=True) == (100, 150)  # no rate


def test_eval_reason_is_the_one_rule_the_plan_and_the_trainer_share():
    from conftest import tiny_manifest_dict
    from launcher.plan import eval_steps
    from pixeldiff.config import Manifest, from_dict
    from pixeldiff.schedule import eval_reason

    ends = [300, 450]
    assert [eval_reason(s, ends, 100) for s in (99, 100, 300, 400, 450, 500)] == \
        [None, "interval", "stage_end", "interval", "end", None]
    assert [eval_reason(s, ends, 0) for s in (100, 300, 450)] == [None, "stage_end", "end"]
    assert eval_reason(200, ends, 200) == "interval" and eval_reason(450, ends, 150) == "end"
    m = from_dict(Manifest, tiny_manifest_dict(steps=(300, 150), eval={"enabled": True, "interval_steps": 100}))
    assert eval_steps(m, ends) == [100, 200, 300, 400, 450]
