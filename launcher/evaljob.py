"""`pixeldiff-launch eval RUN_DIR` of a Slurm run: one evaluation of a checkpoint as its own Slurm job.

The job takes one node of the run's kind (cluster.gpus_per_node tasks, one GPU each, the manifest's partition,
account, setup and env). Its batch step (`EvalJob`, pickled by submitit) starts the evaluation step with srun; each
task is one rank (`python -m launcher.evaljob RUN_DIR ...`), the ranks split the generation by sample index and
reduce the features, so the numbers are the one-process numbers (tests/test_eval_slurm.py). Rank 0 appends the
record to eval.jsonl with the job's id; the ledger has `eval_submitted` and the job's log is
jobs/JOB/JOB_0_log.out. The training run is not touched: its checkpoints are only read.

The job's GPU time is not part of the run's budget (the ledger's segments bill the training jobs only).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from pathlib import Path

from launcher.rundir import ledger_path
from launcher.submit import SubmitError, job_environment_scrubbed, make_executor
from pixeldiff.config import Manifest
from pixeldiff.ledger import append_event, read_jsonl

RANK_MODULE = "launcher.evaljob"


def eval_argv(run_dir: Path, checkpoint: str | None, samples: int | None) -> list[str]:
    return [str(run_dir)] + (["--checkpoint", checkpoint] if checkpoint else []) + (
        ["--samples", str(samples)] if samples else [])


def srun_command(m: Manifest, run_dir: Path, checkpoint: str | None, samples: int | None,
                 python: str = sys.executable) -> list[str]:
    c = m.cluster
    out = Path(run_dir) / "jobs" / "%j" / "%j_%t_log.out"
    return ["srun", "--kill-on-bad-exit=1", "--unbuffered", "--nodes=1", f"--ntasks={c.gpus_per_node}",
            f"--ntasks-per-node={c.gpus_per_node}", "--gpus-per-task=1", f"--output={out}", "--open-mode=append",
            python, "-u", "-m", RANK_MODULE, *eval_argv(run_dir, checkpoint, samples)]


class EvalJob:
    """The evaluation job's batch step: srun the ranks, then -> rank 0's record (submitit's result)."""

    def __init__(self, run_dir: str, checkpoint: str | None, samples: int | None):
        self.run_dir, self.checkpoint, self.samples = run_dir, checkpoint, samples

    def __call__(self) -> dict:
        import os

        from pixeldiff.config import load_resolved

        sys.stdout.reconfigure(line_buffering=True)
        run_dir = Path(self.run_dir)
        m = load_resolved(run_dir / "manifest.yaml")
        argv = srun_command(m, run_dir, self.checkpoint, self.samples)
        print(f"pixeldiff: starting the evaluation step: {' '.join(argv)}", flush=True)
        rc = subprocess.run(argv, stdin=subprocess.DEVNULL).returncode
        rec = record_of(run_dir, os.environ.get("SLURM_JOB_ID", ""))
        if rc or rec is None:
            raise RuntimeError(f"the evaluation step ended with exit status {rc}"
                               + ("" if rec else " and wrote no record"))
        return rec


def record_of(run_dir: Path, job_id: str) -> dict | None:
    recs = [r for r in read_jsonl(Path(run_dir) / "eval.jsonl") if str(r.get("job_id")) == str(job_id)]
    return recs[-1] if recs else None


def submit_eval(run_dir: Path, m: Manifest, checkpoint: str | None, samples: int | None, minutes: int) -> str:
    """One evaluation job for the run; recorded in the ledger (`eval_submitted`). -> the job id."""
    ex = make_executor(m, run_dir, minutes, [], None, comment=f"pixeldiff-eval:{uuid.uuid4().hex[:16]}", job_nodes=1,
                       job_name=f"{m.name}-eval")
    try:
        with job_environment_scrubbed():
            job = ex.submit(EvalJob(str(Path(run_dir).resolve()), checkpoint, samples))
    except Exception as e:  # submitit wraps sbatch's failure; the message is sbatch's
        raise SubmitError(f"sbatch refused the evaluation job: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}") from None
    append_event(ledger_path(run_dir), "eval_submitted", job_id=str(job.job_id), checkpoint=checkpoint,
                 samples=samples, time_limit_min=minutes, gpus=m.cluster.gpus_per_node)
    return str(job.job_id)


def wait_for(run_dir: Path, job_id: str, timeout_s: float, poll_s: float = 2.0, slurm=None) -> tuple[dict | None, bool]:
    """Until the job has left the queue (or `timeout_s`): -> (its record in eval.jsonl or None, whether it left)."""
    from slurm.commands import Slurm, SlurmError

    slurm = slurm or Slurm(min_interval_s=0)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec = record_of(run_dir, job_id)
        try:
            gone = job_id not in slurm.queue([job_id])
        except SlurmError:
            gone = False
        if gone:
            return rec or record_of(run_dir, job_id), True
        time.sleep(poll_s)
    return record_of(run_dir, job_id), False


def rank_main(argv: list[str]) -> int:
    """One rank of the evaluation step."""
    import os

    ap = argparse.ArgumentParser(prog="python -m launcher.evaljob")
    ap.add_argument("run_dir")
    ap.add_argument("--checkpoint")
    ap.add_argument("--samples", type=int)
    args = ap.parse_args(argv)
    from pixeldiff.checkpoint import CheckpointError, StorageError
    from pixeldiff.config import ConfigError
    from pixeldiff.shards import DataError
    from pixeldiff.train import evaluate_checkpoint

    try:
        evaluate_checkpoint(Path(args.run_dir), args.checkpoint, args.samples, log=lambda s: print(s, flush=True),
                            job_id=os.environ.get("SLURM_JOB_ID"))
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (DataError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    from pixeldiff.process import leave

    leave(rank_main(sys.argv[1:]))
