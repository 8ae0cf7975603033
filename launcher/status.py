"""`pixeldiff-launch status` and `pixeldiff-launch watch`: a run's state, cost and progress.

    pixeldiff-launch status RUN_DIR [--json]
    pixeldiff-launch watch  RUN_DIR [--once] [--interval S]

Both only read the run directory and, for a Slurm run, `squeue`/`sacct` (one of each per
refresh, at most every 10 s); they can be started and stopped at will. What the numbers mean:
launcher/summary.py (and the modules it names) and docs/dashboard.md.

Exit status of `status` (and of `watch` when the run reaches an end while watched):
     0  finished
    10  running or queued
     1  failed
     3  over_budget (the budget stopped it)
     4  cancelled
     2  bad input: RUN_DIR is not a run directory (the message says why)
`watch` exits 0 on Ctrl-C (the run keeps going).

`watch` on a terminal draws a live dashboard that fits the terminal (80x24 at least). Without a
terminal (stdout piped or redirected) it prints one plain line per refresh, only when something
changed, until the run ends; with `--once` it prints one whole frame as plain text (no colours).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from launcher import dashboard
from launcher.rundir import RunDirError, read_run
from launcher.slurmview import SlurmPoller
from launcher.state import TERMINAL
from launcher.summary import summary, to_json

EXIT = {"finished": 0, "running": 10, "queued": 10, "failed": 1, "over_budget": 3, "cancelled": 4}
SLURM_MIN_INTERVAL_S = 10.0


def slurm_client(run_dir: Path):
    """A Slurm client for a Slurm run (None for a local run)."""
    from slurm.commands import Slurm

    if read_run(run_dir).manifest.cluster.backend != "slurm":
        return None
    return Slurm()


def format_status(s: dict) -> str:
    """The readable one-shot summary: the dashboard's frame, full height, without colours."""
    return dashboard.render(s, width=100, height=200).rstrip() + "\n"


def cmd_status(args) -> int:
    try:
        client = None if args.no_slurm else slurm_client(Path(args.run_dir))
        s = summary(Path(args.run_dir), slurm=client, now=args.now)
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_json(s) if args.json else format_status(s), end="" if not args.json else "\n")
    return EXIT[s["state"]]


def cmd_watch(args, console=None, sleep=time.sleep, clock=time.time) -> int:
    """The live dashboard (a terminal) or plain progress lines (a pipe). `console`, `sleep`, `clock`: for tests."""
    from rich.console import Console

    run_dir = Path(args.run_dir)
    console = console or Console()
    try:
        client = None if args.no_slurm else slurm_client(run_dir)
        poller = SlurmPoller(client, min_interval_s=SLURM_MIN_INTERVAL_S, clock=clock) if client is not None else None
        now = (lambda: args.now) if args.now is not None else clock
        frame = lambda: summary(run_dir, slurm=poller, now=now())
        first = frame()
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    interval = max(0.5, args.interval)
    try:
        if not console.is_terminal:
            return _watch_plain(first, frame, args.once, interval, sleep, console)
        return _watch_live(first, frame, args.once, interval, sleep, console)
    except KeyboardInterrupt:
        return 0  # detach; the run keeps going


def _watch_plain(s: dict, frame, once: bool, interval: float, sleep, console) -> int:
    out = console.file
    if once:
        out.write(dashboard.render(s, width=80, height=200).rstrip() + "\n")
        out.flush()
        return EXIT[s["state"]]
    last = None
    while True:
        line = dashboard.plain_line(s)
        key = (s["state"], s["step"], s["notices"][:1])
        if key != last:
            out.write(line + "\n")
            out.flush()
            last = key
        if s["state"] in TERMINAL:
            return EXIT[s["state"]]
        sleep(interval)
        s = frame()


def run_with_dashboard(run_dir: Path, console=None, interval: float = 1.0) -> int:
    """A local run on a terminal: the job in a child process (its output in RUN_DIR/jobs/local-*.log) and, here, the
    dashboard `watch` draws, updated in place, until the job ends. Ctrl-C reaches both (one process group, as a
    terminal signals it): the job saves a checkpoint and stops, and the dashboard stays until it has. -> the job's
    exit status; when it failed, the end of its log is printed."""
    import subprocess

    from rich.console import Console
    from rich.live import Live

    console = console or Console()
    log = run_dir / "jobs" / f"local-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pixeldiff.train", str(run_dir)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def size():
        w, h = console.size
        return max(40, w), max(10, h - 2)

    def frame(note=""):
        s = summary(run_dir)
        if note:
            s["notices"] = [note, *s["notices"]]
        return dashboard.build(s, *size())

    interrupted = []  # the job has the same SIGINT: it checkpoints and stops, and the dashboard shows it doing so
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        with Live(frame(), console=console, auto_refresh=False, transient=False, vertical_overflow="crop") as live:
            while proc.poll() is None:
                try:
                    proc.wait(timeout=interval)
                except subprocess.TimeoutExpired:
                    pass
                note = "Ctrl-C: the job saves a checkpoint and stops (run again to resume)" if interrupted else ""
                live.update(frame(note), refresh=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    print(f"log: {log}", flush=True)
    if proc.returncode not in (0, None):
        tail = log.read_text(errors="replace").splitlines()[-20:]
        print("\n".join(tail), file=sys.stderr)
    return proc.returncode


def _watch_live(s: dict, frame, once: bool, interval: float, sleep, console) -> int:
    from rich.live import Live

    def size():
        w, h = console.size
        return max(40, w), max(10, h - 1)

    if once:
        console.print(dashboard.build(s, *size()))
        return EXIT[s["state"]]
    with Live(dashboard.build(s, *size()), console=console, auto_refresh=False, transient=False,
              vertical_overflow="crop") as live:
        while s["state"] not in TERMINAL:
            sleep(interval)
            s = frame()
            live.update(dashboard.build(s, *size()), refresh=True)
    return EXIT[s["state"]]


def add_parsers(subparsers) -> None:
    """Register `status` and `watch` on the CLI's subparsers."""
    p = subparsers.add_parser("status", help="print a run's state, cost, goodput and progress (exit 0 finished, "
                                             "10 running/queued, 1 failed, 3 over budget, 4 cancelled)")
    p.add_argument("run_dir", help="the run directory, e.g. runs/speedrun")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (keys: docs/dashboard.md)")
    _common(p)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("watch", help="a live dashboard of a run (Ctrl-C detaches; the run keeps going)")
    p.add_argument("run_dir", help="the run directory, e.g. runs/speedrun")
    p.add_argument("--once", action="store_true", help="draw one frame and exit")
    p.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="seconds between refreshes (default 2; Slurm is asked at most every 10 s)")
    _common(p)
    p.set_defaults(func=cmd_watch)


def _common(p) -> None:
    p.add_argument("--no-slurm", action="store_true", help="do not ask squeue/sacct; use the run directory only")
    p.add_argument("--now", type=float, default=None, help=argparse.SUPPRESS)  # a fixed clock, for tests and snapshots


def main(argv=None) -> int:
    """`python -m launcher.status {status,watch} ...` (the same as pixeldiff-launch's subcommands)."""
    ap = argparse.ArgumentParser(prog="pixeldiff-launch")
    add_parsers(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
