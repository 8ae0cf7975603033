"""Capture real command output from a dev cluster into tests/data/slurm/ (the parsers' golden inputs).

    python -m slurm.dev.cluster start --base /tmp/capture && SLURM_CONF=/tmp/capture/etc/slurm.conf \
        python -m slurm.dev.capture tests/data/slurm

Runs a completed 2-node GPU job, a failed one, a cancelled one, one that hits its 1-minute limit, and one
requeued by hand that then completes; holds a pending one; then writes squeue, sacct -D, sinfo and scontrol
output (about 90 s, mostly waiting for the time limit). Uses the exact formats slurm.commands asks for.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slurm.commands import SACCT_FIELDS, SINFO_FORMAT, SQUEUE_FORMAT


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    return r.stdout


def sbatch(*args: str, script: str) -> str:
    return sh("sbatch", "--parsable", *args, "--wrap", script).strip().split(";")[0]


def state(job: str) -> str:
    return sh("squeue", "--noheader", "--format=%T", "--jobs", job).strip() or "GONE"


def wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(1)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logs = tempfile.mkdtemp(prefix="slurm-capture-")
    o = f"--output={logs}/%j.out"
    done = sbatch("-N2", "--ntasks-per-node=1", "--gpus-per-node=8", "-J", "done", o, script="srun sleep 1")
    failed = sbatch("-J", "failed", o, script="exit 3")
    timeout = sbatch("-N1", "--gpus-per-node=2", "-t", "1", "-J", "timeout", o, script="sleep 300")
    cancelled = sbatch("-J", "cancelled", o, script="sleep 300")
    requeued = sbatch("-N2", "--gpus-per-node=1", "--requeue", "-J", "requeued", o, script="sleep 15")
    held = sbatch("--hold", "-J", "held", o, script="true")
    wait(lambda: state(cancelled) == "RUNNING" and state(requeued) == "RUNNING", 30, "jobs to run")
    time.sleep(2)
    (out / "squeue.txt").write_text(sh("squeue", "--noheader", f"--format={SQUEUE_FORMAT}", "--jobs",
                                       ",".join([timeout, cancelled, requeued, held])))
    (out / "scontrol_show_job_running.txt").write_text(sh("scontrol", "show", "job", timeout))
    (out / "scontrol_show_job_pending.txt").write_text(sh("scontrol", "show", "job", held))
    (out / "sinfo.txt").write_text(sh("sinfo", "--noheader", "--Node", f"--format={SINFO_FORMAT}"))
    (out / "scontrol_show_node.txt").write_text(sh("scontrol", "show", "node"))
    sh("scancel", cancelled)
    sh("scontrol", "requeue", requeued)
    wait(lambda: state(timeout) == "GONE" and state(requeued) == "GONE", 150, "the time limit and the requeued job")
    sh("scancel", held)
    time.sleep(3)
    (out / "scontrol_show_job_timeout.txt").write_text(sh("scontrol", "show", "job", timeout))
    ids = ",".join([done, failed, timeout, cancelled, requeued, held])
    (out / "sacct.txt").write_text(sh("sacct", "--parsable2", "--noheader", "--duplicates", "--allocations",
                                      f"--format={','.join(SACCT_FIELDS)}", "--jobs", ids))
    (out / "sacct_steps.txt").write_text(sh("sacct", "--parsable2", "--noheader", "--duplicates",
                                            f"--format={','.join(SACCT_FIELDS)}", "--jobs", ids))
    (out / "jobs.txt").write_text(f"done={done} failed={failed} timeout={timeout} cancelled={cancelled} "
                                  f"requeued={requeued} held={held}\n")
    print(f"wrote {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/slurm")
