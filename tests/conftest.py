import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from s3server import s3_endpoint  # noqa: F401  (one loopback S3 server per test session)
from slurmdev import slurm_cluster  # noqa: F401  (one loopback Slurm cluster per test session)

REPO = Path(__file__).resolve().parents[1]


def tiny_manifest_dict(name="tiny", steps=(30, 10), **sections) -> dict:
    """A manifest small enough for many runs per test: 'test' preset, 16 px then 32 px."""
    m = {
        "name": name,
        "cluster": {"backend": "local", "device": "cpu"},
        "stages": [
            {"name": "16px", "resolution": 16, "global_batch": 8, "steps": steps[0]},
            {"name": "32px", "resolution": 32, "global_batch": 8, "micro_batch": 4, "steps": steps[1]},
        ],
        "model": {"preset": "test"},
        "optimizer": {"lr": 1e-3, "warmup_steps": 5, "grad_clip": 1.0, "ema_decay": 0.9},
        "data": {"text": {"max_tokens": 8, "dim": 16}},
        "checkpoint": {"interval_steps": 10, "keep": 2},
        "logging": {"metrics_interval": 1, "sample_interval": 0, "sample_steps": 2, "sample_prompts": ["a red circle on black"]},
    }
    for key, value in sections.items():
        m[key] = {**m.get(key, {}), **value} if isinstance(value, dict) else value
    return m


@pytest.fixture
def write_manifest(tmp_path):
    def write(**kw) -> Path:
        d = tiny_manifest_dict(**kw)
        path = tmp_path / f"{d['name']}.yaml"
        path.write_text(yaml.safe_dump(d, sort_keys=False))
        return path

    return write


def run_cli(*args, cwd=None, timeout=300, **popen) -> subprocess.CompletedProcess:
    """Run `python -m <module> args` with the repo on the path, as a user would from a shell."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd or REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)



def pytest_unconfigure(config):
    """After the summary: name what could keep the interpreter from exiting (live child processes, non-daemon
    threads), and if its exit still takes more than 5 minutes, print every thread's stack and exit 1: a test run
    that cannot end is a failure to read, not a CI timeout."""
    import faulthandler
    import multiprocessing
    import threading

    kids = multiprocessing.active_children()
    threads = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
    if kids or threads:
        print(f"still alive after the tests: child processes {kids}, threads {threads}", file=sys.__stderr__, flush=True)
    faulthandler.dump_traceback_later(300, exit=True, file=sys.__stderr__)
