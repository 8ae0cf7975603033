"""A real Slurm cluster for tests: slurm.dev.cluster on 127.0.0.1 (4 nodes x 8 fake GPUs, partition `dev`).

    def test_submit(slurm_cluster):                       # registered in conftest.py
        subprocess.run(["sbatch", ...], env=slurm_cluster.env, ...)
        Slurm(min_interval_s=0, env=slurm_cluster.env).queue([...])

The session-scoped `slurm_cluster` fixture starts the cluster once per session (installing the Debian
packages first when run as root), or reuses one already running at the same base ($PIXELDIFF_SLURM_DEV,
default /tmp/pixeldiff-slurm). It yields a SlurmDevCluster with `.env` (os.environ plus SLURM_CONF, for
subprocess), `.slurm_env` (just {"SLURM_CONF": ...}), `.base`, `.partition`, `.nodes`, `.gpus_per_node`.

Sessions that overlap (two pytest runs at once) share one cluster: each registers itself under
BASE/users/, and the last one to leave stops the cluster, and only if a fixture started it (a cluster you
started by hand is never stopped by tests).

When the cluster cannot start (not root and Slurm not installed, ...), tests that use it are SKIPPED with
the reason -- except when $CI or PIXELDIFF_REQUIRE_SLURM=1 is set: then they FAIL.
Job ids restart at 1 only for a fresh base; within one base they keep counting across sessions.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slurm.dev.cluster import GPUS_PER_NODE, NODES, PARTITION, DevCluster, pid_alive


@dataclass
class SlurmDevCluster:
    base: Path
    slurm_env: dict[str, str]
    env: dict[str, str] = field(repr=False)
    partition: str = PARTITION
    nodes: tuple[str, ...] = NODES
    gpus_per_node: int = GPUS_PER_NODE


def slurm_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("PIXELDIFF_REQUIRE_SLURM") == "1"


@contextmanager
def _locked(base: Path):
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".fixture-lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _live_users(users: Path) -> list[Path]:
    live = []
    for f in users.glob("*") if users.is_dir() else []:
        if f.name.isdigit() and pid_alive(int(f.name)):
            live.append(f)
        else:
            f.unlink(missing_ok=True)  # a session that died without cleaning up
    return live


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = DevCluster()
    users, marker = cluster.base / "users", cluster.base / "started-by-tests"
    me = users / str(os.getpid())
    try:
        with _locked(cluster.base):
            if not cluster.is_running():
                marker.unlink(missing_ok=True)
                cluster.start(timeout=120)
                marker.write_text(f"{os.getpid()}\n")
            else:
                cluster.wait_ready(timeout=60)
            users.mkdir(exist_ok=True)
            me.write_text("")
    except Exception as e:  # noqa: BLE001  (any reason it cannot start: say it, then skip or fail)
        msg = f"Slurm dev cluster could not start at {cluster.base}: {type(e).__name__}: {e}"
        if slurm_required():
            pytest.fail(msg + "\n(CI or PIXELDIFF_REQUIRE_SLURM=1 is set, so this fails instead of skipping)")
        pytest.skip(msg)
    try:
        yield SlurmDevCluster(base=cluster.base, slurm_env=cluster.env(), env=cluster.client_env())
    finally:
        with _locked(cluster.base):
            me.unlink(missing_ok=True)
            if not _live_users(users) and marker.exists():
                cluster.stop()
                marker.unlink(missing_ok=True)
