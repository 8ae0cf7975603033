"""`status` and `watch` on recorded run directories (tests/data/runs/, written by make_runs.py there).

Snapshots of the rendered frames live in tests/data/snapshots/; after an intended change to the
dashboard, regenerate them with

    PIXELDIFF_UPDATE_SNAPSHOTS=1 .venv/bin/pytest tests/test_dashboard.py

and read the diff before committing.
"""

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from launcher import status
from launcher.dashboard import render
from launcher.slurmview import SlurmView
from launcher.summary import summary
from slurm.commands import SlurmError
from slurm.types import AcctRecord, QueueEntry

REPO = Path(__file__).resolve().parents[1]
RUNS = Path("tests/data/runs")  # relative to the repository: the paths in the frames do not depend on the checkout
SNAPSHOTS = REPO / "tests" / "data" / "snapshots"
NAMES = ["finished", "running", "failed", "over_budget", "cancelled"]
EXIT = {"finished": 0, "running": 10, "failed": 1, "over_budget": 3, "cancelled": 4}


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def recorded_now(name: str) -> float:
    return float((REPO / RUNS / f"{name}.now").read_text())


def recorded_slurm(name: str) -> SlurmView | None:
    data = json.loads((REPO / RUNS / f"{name}.slurm.json").read_text())
    if data is None:
        return None
    return SlurmView({k: QueueEntry(**v) for k, v in data["queue"].items()},
                     [AcctRecord(**r) for r in data["accounting"]], None, recorded_now(name))


def recorded(name: str) -> dict:
    return summary(RUNS / name, slurm=recorded_slurm(name), now=recorded_now(name))


def check_snapshot(text: str, name: str) -> None:
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("PIXELDIFF_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no snapshot {path}; make it with PIXELDIFF_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text(), f"{name}: the frame differs from {path} (PIXELDIFF_UPDATE_SNAPSHOTS=1 to accept)"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(80, 24), (200, 50)])
def test_frames_fit_the_terminal_and_match_their_snapshots(name, size):
    s = recorded(name)
    w, h = size
    text = render(s, w, h)
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= h and max(len(line) for line in lines) <= w
    check_snapshot(text, f"{name}-{w}x{h}")
    assert s["state"].upper() in lines[0]
    assert f"goodput {s['goodput'] * 100:.1f}%" in text
    if s["usd_cap"]:
        assert f"${s['usd_spent']:,.2f} / ${s['usd_cap']:,.2f}" in text
    current = s["stages"][s["stage_index"]]
    assert f"{current['step']}/{current['steps']}" in text
    if s["latest"]["step"] is not None:
        assert f"at step {s['latest']['step']}" in text


def test_the_recorded_runs_say_what_happened():
    r = recorded("running")
    assert r["state"] == "running" and r["stage"] == "512px" and 10_000 < r["step"] < 16_000
    assert r["billed_source"] == "sacct" and abs(r["ledger_vs_sacct_pct"]) < 2
    assert r["goodput_breakdown"]["lost"] > 0.05  # the NCCL crash: 430 steps trained twice
    assert [j["job_id"] for j in r["jobs"]] == ["81001", "81002"] and r["jobs"][0]["requeues"] == 1
    assert r["jobs"][1]["time_left_s"] is not None and r["forecast"]["cap_hit_first"] is False
    assert r["newest_sample"].endswith("step-00011000.png")
    o = recorded("over_budget")
    assert o["state"] == "over_budget" and o["usd_spent"] <= o["usd_cap"] and o["usd_spent"] > 0.9 * o["usd_cap"]
    assert o["forecast"]["cap_hit_first"] is True and o["jobs"][0]["requeues"] == 2
    f = recorded("failed")
    assert f["state"] == "failed" and "failed without saving a checkpoint" in f["state_reason"]
    assert f["ledger_vs_sacct_pct"] < -5  # three jobs that failed before the trainer wrote anything
    assert recorded("cancelled")["state"] == "cancelled" and recorded("finished")["state"] == "finished"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "launcher.status", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


@pytest.mark.parametrize("name", NAMES)
def test_status_json_keys_and_exit_codes(name, capsys):
    argv = ["status", str(RUNS / name), "--json", "--no-slurm", "--now", str(recorded_now(name))]
    if name == "running":  # once through a real process: the entry point, stdout a pipe
        out = cli(*argv)
        code, stdout = out.returncode, out.stdout
    else:
        code, stdout = status.main(argv), capsys.readouterr().out
    assert code == EXIT[name]
    s = json.loads(stdout)
    for key in ("state", "stage", "step", "total_steps", "billed_gpu_seconds", "usd_spent", "usd_forecast", "usd_cap",
                "goodput", "goodput_breakdown", "wall_hours_left", "jobs", "recent_events", "newest_sample", "latest",
                "stages", "ledger_vs_sacct_pct", "forecast", "notices"):
        assert key in s, key
    assert s["state"] == name
    assert set(s["goodput_breakdown"]) == {"training", "startup", "checkpoint", "evaluation", "sampling", "lost", "idle",
                                           "other"}
    assert s["eval"] == {"latest": None, "history": {}}  # the recorded runs did not evaluate
    for j in s["jobs"]:
        assert set(j) >= {"job_id", "state", "nodes", "elapsed_s", "time_left_s", "requeues", "last_end_reason"}
    for st in s["stages"]:
        assert set(st) >= {"stage", "step", "steps", "steps_per_s", "img_per_s", "eta_s"}


def test_status_text_and_a_bad_run_dir():
    out = cli("status", str(RUNS / "finished"), "--no-slurm", "--now", str(recorded_now("finished")))
    assert out.returncode == 0 and "FINISHED" in out.stdout and "goodput 67.8%" in out.stdout
    out = cli("status", "tests/data/runs/no-such-run")
    assert out.returncode == 2 and "error:" in out.stderr and "no such directory" in out.stderr
    assert "Traceback" not in out.stderr
    out = cli("watch", "tests/data", "--once")
    assert out.returncode == 2 and "no manifest.yaml" in out.stderr and "Traceback" not in out.stderr


def test_add_parsers_registers_status_and_watch():
    ap = argparse.ArgumentParser()
    status.add_parsers(ap.add_subparsers(dest="command", required=True))
    a = ap.parse_args(["watch", "runs/x", "--once", "--interval", "5"])
    assert a.func is status.cmd_watch and a.once and a.interval == 5.0
    a = ap.parse_args(["status", "runs/x", "--json"])
    assert a.func is status.cmd_status and a.json


def watch_args(name, **kw):
    return argparse.Namespace(run_dir=str(RUNS / name), once=kw.get("once", False), interval=kw.get("interval", 2.0),
                              no_slurm=kw.get("no_slurm", False), now=recorded_now(name))


def test_piped_watch_prints_plain_lines_not_a_live_display():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    assert not console.is_terminal
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    assert status.cmd_watch(watch_args("running", no_slurm=True), console=console, sleep=sleep) == 0  # Ctrl-C: 0
    text = out.getvalue()
    assert "\x1b[" not in text  # no cursor movement or colours
    lines = text.splitlines()
    assert len(lines) == 1  # nothing changed (a fixed clock): one line, not one per refresh
    assert "running" in lines[0] and "step 11755/16000" in lines[0] and "goodput" in lines[0]

    out = io.StringIO()
    assert status.cmd_watch(watch_args("over_budget", no_slurm=True), console=Console(file=out, force_terminal=False),
                            sleep=sleep) == 3  # the run is over: the line, then the status exit code
    assert len(out.getvalue().splitlines()) == 1 and "over_budget" in out.getvalue()

    out = io.StringIO()
    assert status.cmd_watch(watch_args("finished", once=True), console=Console(file=out, force_terminal=False)) == 0
    frame = out.getvalue()
    assert "FINISHED" in frame and "\x1b[" not in frame and len(frame.splitlines()) > 10  # --once: one plain frame


def test_piped_watch_once_through_the_entry_point():
    out = cli("watch", str(RUNS / "cancelled"), "--once", "--no-slurm", "--now", str(recorded_now("cancelled")))
    assert out.returncode == 4 and "CANCELLED" in out.stdout and "\x1b[" not in out.stdout


class FlakySlurm:
    """Answers from the recorded squeue/sacct, or raises SlurmError while `down`."""

    def __init__(self, name, down=True):
        self.view, self.down, self.calls = recorded_slurm(name), down, 0

    def queue(self, ids):
        self.calls += 1
        if self.down:
            raise SlurmError("squeue: error: slurm_load_jobs error: Unable to contact slurm controller")
        return self.view.queue

    def accounting(self, ids):
        return self.view.accounting


def test_a_slurm_error_during_refresh_shows_a_notice_and_the_dashboard_keeps_going(monkeypatch):
    flaky = FlakySlurm("running", down=False)
    monkeypatch.setattr(status, "slurm_client", lambda run_dir: flaky)
    clock = [recorded_now("running")]
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80, height=24, color_system=None)
    frames = []

    def sleep(s):
        clock[0] += s
        frames.append(out.getvalue())
        if len(frames) == 2:
            flaky.down = True  # the controller goes away between refreshes
        if len(frames) == 12:
            raise KeyboardInterrupt

    args = watch_args("running", interval=2.0)
    args.now = None
    assert status.cmd_watch(args, console=console, sleep=sleep, clock=lambda: clock[0]) == 0
    text = out.getvalue()
    assert "Slurm did not answer" in text and "(showing its answer from before): squeue" in text
    assert "RUNNING" in text and "81002" in text  # still drawing the run, from the last answer
    assert flaky.calls == 3  # 22 s of refreshes every 2 s: squeue at most every 10 s


def test_a_slurm_error_with_once_still_draws_the_frame(monkeypatch):
    monkeypatch.setattr(status, "slurm_client", lambda run_dir: FlakySlurm("running"))
    out = io.StringIO()
    code = status.cmd_watch(watch_args("running", once=True), console=Console(file=out, force_terminal=False))
    assert code == 10  # no squeue: running from the last sign of life, 21 s old
    assert "! Slurm did not answer" in out.getvalue() and "showing the ledger only" in out.getvalue()


def test_a_multi_line_slurm_error_stays_on_one_line(monkeypatch):
    class Broken(FlakySlurm):
        def queue(self, ids):
            raise SlurmError("squeue ... failed with exit status 1: squeue: error: fetch_config: DNS SRV lookup failed\n"
                             "squeue: fatal: Could not establish a configuration source")

    s = summary(RUNS / "running", slurm=Broken("running"), now=recorded_now("running"))
    assert "DNS SRV" in s["slurm"]["error"]  # the whole error in the JSON
    assert s["notices"][0].endswith("squeue: fatal: Could not establish a configuration source")  # its last line
    text = render(s, 80, 24)
    assert len(text.rstrip("\n").split("\n")) <= 24 and "! Slurm did not answer" in text
