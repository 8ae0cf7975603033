"""`pixeldiff-launch run` of a local manifest on a real terminal (a pseudo-terminal): the live dashboard, updated in
place, instead of one JSON dict per logging interval; Ctrl-C from the terminal checkpoints and stops the job."""

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

from conftest import REPO
from pixeldiff.ledger import read_jsonl


def on_a_terminal(args, cols=110, rows=36):
    """`python -m launcher.cli ARGS` with a pseudo-terminal as stdin, stdout and stderr, in its own process group
    (the terminal's foreground group). -> (the process, the master fd)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm-256color", "OMP_NUM_THREADS": "1"}
    env.pop("COLUMNS", None), env.pop("LINES", None)
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, env=env, stdin=slave,
                            stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    return proc, master


def read_terminal(proc, master, timeout: float, until=None) -> str:
    """What the terminal showed until the process ended (or `until(text)` held, or the time ran out)."""
    out, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process and its children closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
        if until is not None and until(out.decode(errors="replace")):
            break
    return out.decode(errors="replace")


def test_a_local_run_on_a_terminal_shows_the_live_dashboard(write_manifest, tmp_path):
    manifest = write_manifest(steps=(30, 10))
    proc, master = on_a_terminal(["run", str(manifest), "--runs-dir", str(tmp_path / "runs")])
    shown = read_terminal(proc, master, timeout=240)
    assert proc.wait(timeout=60) == 0, shown
    os.close(master)
    run_dir = tmp_path / "runs" / "tiny"
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == 40
    # the dashboard, redrawn in place (rich's cursor-up and erase-line), not the job's JSON lines
    assert "\x1b[1A" in shown and "\x1b[2K" in shown, shown[-2000:]
    assert '{"step"' not in shown
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)
    last = plain[plain.rindex("tiny  "):]  # the final frame: from its header line on
    for text in ("FINISHED", "16px", "32px", "✓", "loss", "img/s", "goodput", "log: "):
        assert text in last, (text, last)
    log = next((run_dir / "jobs").glob("local-*.log"))
    assert f"log: {log}" in plain
    assert json.loads(next(line for line in log.read_text().splitlines() if line.startswith('{"step"')))["step"] >= 1


def test_ctrl_c_on_the_terminal_checkpoints_and_the_dashboard_waits_for_it(write_manifest, tmp_path):
    manifest = write_manifest(steps=(2000, 10), checkpoint={"interval_steps": 1000, "keep": 2})
    proc, master = on_a_terminal(["run", str(manifest), "--runs-dir", str(tmp_path / "runs")])
    run_dir = tmp_path / "runs" / "tiny"
    shown = read_terminal(proc, master, timeout=180,
                          until=lambda _: (read_jsonl(run_dir / "metrics.jsonl") or [{}])[-1].get("step", 0) >= 5)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole foreground group
    shown += read_terminal(proc, master, timeout=180)
    rc = proc.wait(timeout=60)
    os.close(master)
    assert rc == 128 + signal.SIGINT, shown[-3000:]
    assert "Traceback" not in shown and "Ctrl-C: the job saves a checkpoint and stops" in shown
    ends = [e for e in read_jsonl(run_dir / "ledger.jsonl") if e["event"] == "segment_end"]
    assert ends and "SIGINT" in ends[-1]["reason"], ends
    saved = [e["step"] for e in read_jsonl(run_dir / "ledger.jsonl") if e["event"] == "checkpoint_saved"]
    assert saved and saved[-1] >= 5 and (run_dir / "checkpoints").exists()
