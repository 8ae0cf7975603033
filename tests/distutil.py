"""Helpers for tests that run real training processes: ranks as plain processes or under torchrun, waiting, killing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO
from pixeldiff import checkpoint
from pixeldiff.ledger import read_jsonl

BASE_ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PIXELDIFF_COLLECTIVE_TIMEOUT_S": "60"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(run_dir: Path, nproc: int, **env) -> list[subprocess.Popen]:
    """`python -m pixeldiff.train RUN_DIR` once per rank, with torchrun's variables and no launcher around them."""
    port, procs = str(free_port()), []
    for rank in range(nproc):
        e = {**os.environ, **BASE_ENV, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **env}
        procs.append(subprocess.Popen([sys.executable, "-m", "pixeldiff.train", str(run_dir)], cwd=REPO, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def single(run_dir: Path, **env) -> subprocess.Popen:
    """The job in one process, in its own process group (as `pixeldiff-launch run --local` runs it)."""
    return subprocess.Popen([sys.executable, "-m", "pixeldiff.train", str(run_dir)], cwd=REPO,
                            env={**os.environ, **BASE_ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def torchrun(run_dir: Path, nproc: int, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             "-m", "pixeldiff.train", str(run_dir)], cwd=REPO, env={**os.environ, **BASE_ENV, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def last_step(run_dir: Path) -> int:
    return (read_jsonl(Path(run_dir) / "metrics.jsonl") or [{}])[-1].get("step", 0)


def wait_until(cond, procs, timeout: float = 120, what: str = "the condition") -> None:
    """Poll `cond()` until true; fail with the processes' output if they end first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    outputs = "\n".join(f"--- process {i} (rc {p.poll()}):\n{collect(p)}" for i, p in enumerate(procs))
    raise AssertionError(f"waited in vain for {what}\n{outputs}")


def collect(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The process's output once it ended (killing it after `timeout`)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group_or_proc(proc)
        out, _ = proc.communicate()
    return out or ""


def kill_group_or_proc(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def weights(ckpt_root, part: str = "model", storage_options=None) -> dict:
    path = checkpoint.latest_valid(ckpt_root, storage_options=storage_options)
    return checkpoint.load(path, names=(part,), storage_options=storage_options)[part]
