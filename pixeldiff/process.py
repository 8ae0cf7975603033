"""A training job's process, around the trainer: the flag its stop signals set, the run directory's lock,
the code version it records, and the umask its files are made under.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class RunLocked(Exception):
    """Another process is already running this run directory."""


class StopFlag:
    """Set by signal handlers; read by the loop at step boundaries. Nothing else happens in a handler."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def install(self):
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)

    def __bool__(self):
        return self.signum is not None


def ignore_late_stop_signals() -> None:
    """The job is over: a stop signal that comes now (Slurm signals every task; another rank's signal already
    stopped this one) has nothing left to stop. Ignored, not left to the flag handler: at interpreter exit Python
    resets its handlers to the default, and a SIGTERM in that window would kill a process whose work is complete
    (exit -15, which srun --kill-on-bad-exit takes for a failed task)."""
    for s in StopFlag.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def leave(code: int) -> None:
    """The end of a rank's process, its work done and reported: late stop signals ignored, stdout and stderr flushed,
    and in a job of several ranks the process leaves without the interpreter's teardown, which has aborted in the
    process group's native threads after a clean `destroy_process_group` ("terminate called without an active
    exception": SIGABRT, exit -6 instead of `code`, about one exit in 20 with 2 gloo ranks here). Every file the job
    writes is closed by then (ledger and metrics lines are appended and closed one by one, checkpoints complete)."""
    ignore_late_stop_signals()
    sys.stdout.flush()
    sys.stderr.flush()
    if max(int(os.environ.get(k) or 1) for k in ("WORLD_SIZE", "SLURM_NTASKS")) > 1:
        os._exit(code)
    sys.exit(code)


def code_version() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown"


LOCK_WAIT_S = 180.0  # a Slurm job waits this long for a lock a dead node's job may still hold


def lock_run(run_dir: Path, wait_s: float = 0.0, poll_s: float = 2.0, log=print):
    """Hold an exclusive lock on the run directory for the life of the job; RunLocked if it stays taken for `wait_s`.

    A job requeued onto other nodes can find the lock still held by the dead node's job: network file systems keep a
    lock until its lease expires (tens of seconds to minutes), so a Slurm job retries before giving up."""
    f = open(run_dir / "run.lock", "a+")
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if time.monotonic() >= deadline:
                f.close()
                waited = f" (waited {wait_s:.0f} s for it)" if wait_s else ""
                raise RunLocked(f"run {run_dir} is already running ({holder}){waited}") from None
            if not said:
                log(f"run.lock is held ({holder}); waiting up to {wait_s:.0f} s: a lock of a dead node's job lasts "
                    f"until the file system's lease expires")
                said = True
            time.sleep(poll_s)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def no_world_write() -> None:
    """Whatever the user's umask, nothing this process creates (run directories, checkpoints, caches, logs) is
    writable by others: a shared cluster's other users must not be able to plant a checkpoint or a weights file."""
    os.umask(os.umask(0) | 0o002)
