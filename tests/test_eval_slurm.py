"""`pixeldiff-launch eval` of a Slurm run on the dev cluster: the evaluation is a Slurm job of one node (2 tasks,
2 gloo ranks), and its numbers are the one-process numbers of `eval --local` on the same checkpoint (issue 16:
2 ranks equal 1, through the trainer's own evaluation: generation split by sample index, features reduced)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distutil import collect, single
from launcher.cli import prepare_run_dir
from launcher.manifest import load_manifest
from pixeldiff.ledger import read_jsonl

REPO = Path(__file__).resolve().parents[1]
EVAL = {"samples": 12, "sampling_steps": 2, "cfg": 2.0, "batch": 4, "metrics": ["fid", "cmmd"],
        "without_weights": "random_features"}


def launch(args: list, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_eval_of_a_slurm_run_is_a_one_node_job_with_the_one_process_numbers(slurm_cluster, tmp_path):
    sets = {"name": "evaljob", "stages[0].steps": 6, "stages[1].steps": 4, "checkpoint.interval_steps": 5,
            "cluster.cpus_per_task": 1, "cluster.max_job_hours": 0.05, "eval": json.dumps(EVAL)}
    m = load_manifest(REPO / "manifests" / "devcluster.yaml", [f"{k}={v}" for k, v in sets.items()])
    run_dir, _ = prepare_run_dir(m, tmp_path / "runs")
    trained = single(run_dir)  # the checkpoints, trained here in one process (the run itself is not the subject)
    out = collect(trained, timeout=300)
    assert trained.returncode == 0, out
    env = slurm_cluster.env
    bad = launch(["eval", run_dir, "--checkpoint", "step-00000004"], env)
    assert bad.returncode == 2 and "no valid checkpoint step-00000004" in bad.stderr and "step-00000010" in bad.stderr
    assert "Traceback" not in bad.stderr and not [e for e in read_jsonl(run_dir / "ledger.jsonl")
                                                 if e["event"] == "eval_submitted"]
    job = launch(["eval", run_dir, "--checkpoint", "step-00000005"], env, timeout=600)
    assert job.returncode == 0 and "submitted evaluation job" in job.stdout, job.stdout + job.stderr
    job_id = job.stdout.split("submitted evaluation job ", 1)[1].split()[0]
    on_slurm = json.loads(job.stdout.strip().splitlines()[-1])
    assert (on_slurm["job_id"], on_slurm["step"], on_slurm["checkpoint"], on_slurm["samples"]) == (
        job_id, 5, "step-00000005", 12), on_slurm
    submitted = [e for e in read_jsonl(run_dir / "ledger.jsonl") if e["event"] == "eval_submitted"]
    assert [(e["job_id"], e["gpus"]) for e in submitted] == [(job_id, 2)]
    logs = sorted((run_dir / "jobs" / job_id).glob(f"{job_id}_*_log.out"))
    assert [p.name for p in logs] == [f"{job_id}_0_log.out", f"{job_id}_1_log.out"]  # two ranks did it
    local = launch(["eval", run_dir, "--checkpoint", "step-00000005", "--local"], env)
    assert local.returncode == 0, local.stdout + local.stderr
    here = json.loads(local.stdout.strip().splitlines()[-1])
    assert "job_id" not in here and here["samples"] == 12
    for k in ("fid", "cmmd"):
        assert on_slurm[k] == pytest.approx(here[k], rel=1e-4, abs=1e-6), (k, on_slurm[k], here[k])
    recs = read_jsonl(run_dir / "eval.jsonl")
    assert [(r["why"], r.get("job_id")) for r in recs][-2:] == [("checkpoint", job_id), ("checkpoint", None)]
