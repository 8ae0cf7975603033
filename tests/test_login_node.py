"""The login-node commands do not import torch: importing the CLI, and `status --json` on a finished run."""

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_importing_the_login_node_commands_pulls_in_no_torch():
    out = python("-c", "import launcher.cli, launcher.status, launcher.plan, sys; print('torch' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_status_json_on_a_finished_run_never_imports_torch():
    code = ("import atexit, sys; from launcher.cli import main; "
            "atexit.register(lambda: print('TORCH', 'torch' in sys.modules, file=sys.stderr)); "
            "sys.exit(main(['status', 'tests/data/runs/finished', '--json']))")
    out = python("-c", code)
    assert out.returncode == 0, out.stderr  # finished
    assert json.loads(out.stdout)["state"] == "finished"
    assert "TORCH False" in out.stderr
    timed = python("-X", "importtime", "-m", "launcher.cli", "status", "tests/data/runs/finished", "--json")
    assert timed.returncode == 0, timed.stderr
    assert "launcher.summary" in timed.stderr and not re.search(r"\|\s+torch$", timed.stderr, re.M)


def test_plan_without_perceptual_losses_never_imports_torch():
    code = ("import sys; from launcher.cli import main; rc = main(['plan', 'manifests/dryrun.yaml']); "
            "print('TORCH', 'torch' in sys.modules, file=sys.stderr); sys.exit(rc)")
    out = python("-c", code)
    assert out.returncode == 0, out.stderr
    assert "plan for dryrun" in out.stdout and "TORCH False" in out.stderr
