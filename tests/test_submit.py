"""The launcher's decisions after a job segment (launcher/policy.py), failure reports (launcher/job.py), and the plan's
job segments (pure; a fake clock)."""

import json
from pathlib import Path

import pytest

from launcher.manifest import load_manifest
from launcher.plan import make_plan
from launcher.job import failed_nodes, is_collective_error, rank_nodes, report_failure
from launcher.policy import SubmitError, next_action, time_limit_min

NOW = 1_800_000_000.0


def manifest(**budget):
    sets = [f"budget.{k}={v}" for k, v in budget.items()]
    return load_manifest(Path("manifests/devcluster.yaml"), sets)


def ev(event, t, **kw):
    return {"event": event, "time": t, **kw}


def started(t0=NOW - 100, gpus=4):
    return [ev("job_submitted", t0 - 10, job_id="7"), ev("segment_start", t0, job_id="7", gpus=gpus, step=0)]


def decide(m, events, reason, now=NOW, job_end=NOW + 600, max_timeouts=6, nodes=()):
    return next_action(m, events, reason, now, job_end, max_timeouts, lead_s=15, failed_nodes=nodes)


def test_finished_and_budget_end_the_run():
    m = manifest()
    assert decide(m, started(), "finished").kind == "none"
    assert decide(m, started(), "budget").kind == "none"


def test_a_diverged_run_stops_instead_of_requeueing():
    a = decide(manifest(), started(), "diverged")
    assert (a.kind, a.stop_kind) == ("stop", "failed") and "diverged" in a.message


def test_deadline_requeues_as_a_timeout():
    m = manifest()
    a = decide(m, started(), "deadline")
    assert (a.kind, a.requeue_kind) == ("requeue", "timeout")


@pytest.mark.parametrize("seconds_before_end, kind", [(600, "preemption"), (200, "preemption"), (100, "timeout"), (20, "timeout")])
def test_a_signal_is_a_timeout_near_the_limit_else_a_preemption(seconds_before_end, kind):
    m = manifest()
    a = decide(m, started(), "signal SIGUSR2", job_end=NOW + seconds_before_end)
    assert (a.kind, a.requeue_kind) == ("requeue", kind)


def test_requeue_limits_count_timeouts_and_preemptions_apart():
    m = manifest()
    ev_ = started() + [ev("requeue_requested", NOW - 50 + i, kind="timeout") for i in range(6)]
    a = decide(m, ev_, "deadline", max_timeouts=6)
    assert a.kind == "stop" and "max_timeouts" in a.message
    assert decide(m, ev_, "signal SIGUSR2", job_end=NOW + 3600).kind == "requeue"  # a preemption still may
    ev_ += [ev("requeue_requested", NOW - 40 + i, kind="preemption") for i in range(m.cluster.max_preemptions)]
    assert decide(m, ev_, "signal SIGTERM", job_end=NOW + 3600).kind == "stop"


def test_cancel_stops_requeueing_until_the_next_submission():
    m = manifest()
    ev_ = started() + [ev("cancel_requested", NOW - 5, job_ids=["7"])]
    assert decide(m, ev_, "signal SIGUSR2").kind == "stop"
    ev_ += [ev("job_submitted", NOW - 1, job_id="8")]  # resumed later with `run`
    assert decide(m, ev_, "signal SIGUSR2").kind == "requeue"


def test_failures_exclude_the_node_and_stop_after_max_failures_in_a_row():
    m = manifest()  # max_failures 3
    a = decide(m, started(), "failed: boom", nodes=("node2",))
    assert (a.kind, a.exclude) == ("resubmit", ["node2"])
    two = started() + [ev("job_failed", NOW - 60, job_id="7"), ev("job_failed", NOW - 30, job_id="8")]
    a = decide(m, two, "failed: boom")
    assert a.kind == "stop" and "3 jobs in a row" in a.message
    reset = two + [ev("checkpoint_saved", NOW - 20, step=50)]  # progress in between: the count starts again
    assert decide(m, reset, "failed: boom").kind == "resubmit"


def test_budget_shrinks_the_last_job_then_stops():
    # $1/GPU-hour, 4 GPUs: $0.4 = 1440 GPU-s = 360 s of the run
    m = manifest(usd=0.4)
    ev_ = started(t0=NOW - 100)  # 400 GPU-s billed so far (to the last event): 260 s left, more than 2 min
    a = decide(m, ev_ + [ev("segment_end", NOW, reason="deadline")], "deadline")
    assert a.kind == "requeue"
    ev2 = started(t0=NOW - 250) + [ev("segment_end", NOW, reason="deadline")]  # 1000 GPU-s: 110 s left < 2 min
    a = decide(m, ev2, "deadline")
    assert (a.kind, a.stop_kind) == ("stop", "budget")
    with pytest.raises(SubmitError, match="budget"):
        time_limit_min(m, ev2, NOW)


def test_time_limit_is_cut_to_the_wall_clock_budget():
    m = load_manifest(Path("manifests/speedrun.yaml"), ["budget.usd=0"])
    first = NOW - 22 * 3600
    assert time_limit_min(m, [ev("segment_start", first, gpus=32)], NOW) == 120  # 2 h of the 24 left
    assert time_limit_min(m, [ev("segment_start", NOW, gpus=32)], NOW) == 240


def test_plan_sizes_segments_lead_and_requeue_limits():
    plan = make_plan(load_manifest(Path("manifests/speedrun.yaml"), []))
    p = plan["jobs"]
    assert p["time_limit_min"] == 240 and 60 <= p["signal_lead_s"] <= 300
    assert p["segments"] >= plan["total_hours"] * 60 / 240 and p["max_timeouts"] == 2 * p["segments"] + 2
    spend = make_plan(load_manifest(Path("manifests/speedrun.yaml"), ["budget.policy=extend_last_stage"]))
    assert spend["jobs"]["segments"] >= 0.95 * 24 * 60 / 240 > p["segments"]  # the whole budget: more jobs
    dev = make_plan(load_manifest(Path("manifests/devcluster.yaml"), []))["jobs"]
    assert dev["time_limit_min"] == 2 and dev["signal_lead_s"] == 15


def test_collective_errors_are_told_apart_from_own_errors():
    assert is_collective_error(RuntimeError("[../third_party/gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert is_collective_error(RuntimeError("Timed out waiting 30000ms for recv operation to complete"))
    assert not is_collective_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_collective_error(ValueError("injected start-up failure on node2"))


def test_failed_nodes_blames_the_rank_with_its_own_error(tmp_path):
    env = {"SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": "0", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NTASKS": "4"}
    assert rank_nodes(env) == ["node1", "node1", "node2", "node2"]
    report_failure(tmp_path, 2, RuntimeError("CUDA error: an illegal memory access"), {**env, "SLURMD_NODENAME": "node2"})
    for r in (0, 1):
        report_failure(tmp_path, r, RuntimeError("Connection closed by peer"), {**env, "SLURMD_NODENAME": "node1"})
    nodes, first, fatal = failed_nodes(tmp_path, 4, env)  # rank 3 reported nothing, rank 2 its own error
    assert nodes == ["node2"] and "illegal memory access" in first and not fatal


def test_failed_nodes_blames_a_rank_that_died_silently(tmp_path):
    env = {"SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": "1", "SLURM_JOB_NODELIST": "node[3-4]", "SLURM_NTASKS": "4"}
    for r in (0, 1, 2):
        report_failure(tmp_path, r, RuntimeError("Connection reset by peer"), env)
    nodes, first, fatal = failed_nodes(tmp_path, 4, env)
    assert nodes == ["node4"] and "3" in first and "died" in first and not fatal
    assert json.loads((tmp_path / "jobs" / "failures-9-1" / "rank00000.json").read_text())["collective"] is True


def test_plan_takes_measured_throughput_from_a_calibration_file(tmp_path):
    from conftest import run_cli

    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"device": "test", "img_per_s_per_gpu": {"512": 89.0}}))  # half the estimate
    out = run_cli("launcher.cli", "plan", "manifests/speedrun.yaml", "--json", "--calibration", str(calib))
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    s512, s1024 = p["stages"]
    assert s512["est_img_per_s_per_gpu"] == 89.0 and s1024["est_img_per_s_per_gpu"] == 36.0
    assert "no 1024 px measurement" in out.stderr
    # the published steps at half the speed: the same steps in twice the GPU-hours
    planned = make_plan(load_manifest(Path("manifests/speedrun.yaml"), []))["stages"][0]
    assert s512["steps"] == planned["steps"] == 100_000 and abs(s512["gpu_hours"] - 2 * planned["gpu_hours"]) < 0.1
    calib.write_text("{}")
    bad = run_cli("launcher.cli", "plan", "manifests/speedrun.yaml", "--calibration", str(calib))
    assert bad.returncode == 2 and "not a calibration file" in bad.stderr and "Traceback" not in bad.stderr


def test_an_error_on_every_node_or_a_fatal_one_blames_no_node(tmp_path):
    env = {"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "0", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NTASKS": "2"}
    for r, node in ((0, "node1"), (1, "node2")):  # e.g. a micro-batch too large for every GPU
        report_failure(tmp_path, r, RuntimeError("CUDA out of memory"), {**env, "SLURMD_NODENAME": node})
    assert failed_nodes(tmp_path, 2, env) == ([], "RuntimeError: CUDA out of memory", False)
    env["SLURM_RESTART_COUNT"] = "1"  # a rank's data error is the data's, not its node's: stop, blame no one
    report_failure(tmp_path, 0, RuntimeError("Connection closed by peer"), {**env, "SLURMD_NODENAME": "node1"})
    report_failure(tmp_path, 1, ValueError("too many bad samples"), {**env, "SLURMD_NODENAME": "node2"}, fatal=True)
    nodes, first, fatal = failed_nodes(tmp_path, 2, env)
    assert (nodes, fatal) == ([], True) and "bad samples" in first


def test_a_submission_from_inside_a_job_does_not_carry_the_job_environment(monkeypatch):
    from launcher.submit import job_environment_scrubbed
    import os

    for k, v in {"SLURM_JOB_ID": "7", "SLURM_CONF": "/etc/slurm.conf", "MASTER_ADDR": "node1", "MASTER_PORT": "20007",
                 "PIXELDIFF_DEADLINE": "1", "SLURMD_NODENAME": "node1", "HOME_KEPT": "yes"}.items():
        monkeypatch.setenv(k, v)
    with job_environment_scrubbed():
        assert os.environ.get("SLURM_CONF") == "/etc/slurm.conf" and os.environ.get("HOME_KEPT") == "yes"
        assert not any(k in os.environ for k in ("SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT", "PIXELDIFF_DEADLINE",
                                                 "SLURMD_NODENAME"))
    assert os.environ["SLURM_JOB_ID"] == "7" and os.environ["MASTER_ADDR"] == "node1"  # restored afterwards


def test_the_training_step_is_one_srun_that_a_dead_task_ends(tmp_path):
    from launcher.job import srun_command, step_environment

    m = manifest()  # 2 nodes x 2 tasks
    argv = srun_command(m, tmp_path, 4, python="/venv/bin/python")
    assert argv[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert {"--nodes=2", "--ntasks=4", "--ntasks-per-node=2", "--gpus-per-task=1", "--cpus-per-task=4",
            f"--output={tmp_path}/jobs/%j/%j_%t_log.out"} <= set(argv)
    assert argv[-5:] == ["/venv/bin/python", "-u", "-m", "launcher.job", str(tmp_path)]
    assert "--cpus-per-task" not in " ".join(srun_command(m, tmp_path, 0))
    env = step_environment(m, {"PATH": "/bin"}, 100.0, 200.0, 8)
    assert (env["PIXELDIFF_JOB_START"], env["PIXELDIFF_DEADLINE"]) == ("100.0", "200.0")
    assert env["OMP_NUM_THREADS"] == str(8 - m.data.workers - 1) and env["PATH"] == "/bin"
    assert step_environment(m, {"OMP_NUM_THREADS": "3"}, None, None, 8)["OMP_NUM_THREADS"] == "3"  # the manifest's
    assert "PIXELDIFF_DEADLINE" not in step_environment(m, {}, None, None, 1)


def test_cpus_per_task_defaults_to_the_nodes_share_or_workers_plus_two():
    from launcher.policy import cpus_per_task
    from slurm.parse import parse_sinfo

    m = load_manifest(Path("manifests/speedrun.yaml"), ["cluster.cpus_per_task=0"])  # 8 tasks per node
    nodes = parse_sinfo("gpu-a[01-03]|idle|128|gpu:h200:8|none\ngpu-a04|mix|96|gpu:h200:8|none\n")
    assert cpus_per_task(m, nodes) == 12  # the smallest node: 96 / 8
    assert cpus_per_task(m, nodes, exclude=["gpu-a04"]) == 16  # an excluded node does not count
    assert cpus_per_task(m, None) == cpus_per_task(m, []) == m.data.workers + 2  # sinfo could not say
    m1 = load_manifest(Path("manifests/speedrun.yaml"), ["cluster.cpus_per_task=3"])
    assert cpus_per_task(m1, nodes) == 3  # the manifest's own number wins


def test_failed_nodes_blames_the_first_task_srun_saw_die(tmp_path):
    from slurm.types import TaskEnd

    env = {"SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": "2", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NTASKS": "4"}
    report_failure(tmp_path, 0, RuntimeError("Connection closed by peer"), {**env, "SLURMD_NODENAME": "node1"})
    dead = (TaskEnd("node1", [0], "Exited with exit code 1"),  # a victim (it reported a collective error) ...
            TaskEnd("node2", [3], "Killed"), TaskEnd("node1", [1], "Terminated"), TaskEnd("node2", [2], "Terminated"))
    nodes, first, fatal = failed_nodes(tmp_path, 4, env, dead=dead)  # ... listed before the task that died
    assert nodes == ["node2"] and "rank 3 on node2: Killed" in first and not fatal
    assert failed_nodes(tmp_path, 4, env, dead=(TaskEnd("node1", [1], "Killed"),))[0] == ["node1"]


def test_a_signal_during_a_ranks_start_up_reaches_the_trainers_handler_once_it_is_installed():
    import signal
    import subprocess
    import sys

    code = ("import os, signal, time, sys\n"
            "from launcher.job import EarlySignals\n"
            "EarlySignals()\n"
            "os.kill(os.getpid(), signal.SIGUSR2)\n"  # a cancel's USR2 before the trainer is ready: not fatal
            "time.sleep(0.5)\n"
            "got = []\n"
            "signal.signal(signal.SIGUSR2, lambda s, f: got.append(s))\n"  # the trainer's flag-setting handler
            "time.sleep(1.5)\n"
            "print(got)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == f"[{int(signal.SIGUSR2)}]", out.stdout + out.stderr


def test_plan_warns_when_a_task_gets_fewer_cpus_than_its_data_workers_need():
    def warns(*sets):
        p = make_plan(load_manifest(Path("manifests/speedrun.yaml"), list(sets)))
        return [w for w in p["warnings"] if "cpus_per_task" in w]

    assert warns("cluster.cpus_per_task=0") == []  # the node's share, known at submission
    assert warns("cluster.cpus_per_task=6", "data.workers=4") == []
    (w,) = warns("cluster.cpus_per_task=1", "data.workers=4")
    assert "is 1" in w and "at least 6" in w
