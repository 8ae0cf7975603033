"""`pixeldiff-launch calibrate MANIFEST [--steps N]`: the real trainer on this machine (one GPU, or the CPU) for N
steps of every stage, then the plan priced with what it measured.

The calibration run is the manifest itself with only what one device needs changed: the local backend, one GPU,
each stage's batch cut to one GPU's share (global_batch / the manifest's GPUs: the per-GPU shapes the real run
has), N steps per stage, no budget caps, checkpoints in its own run directory (never the manifest's
checkpoint.dir), a short evaluation where the manifest evaluates. Its data, frozen weights, losses and recipe
switches are the manifest's. It runs as two jobs, like a requeued run: the first stops at the end of the first
stage with a checkpoint, the second resumes from it across the stage switch and runs the rest, ending with a
sample grid and an evaluation. What goes wrong (missing weights, unreadable shards, a batch that does not
divide, a micro-batch that does not fit in memory: the error names the largest that does) goes wrong here, in
minutes, not at hour 3.

Per stage it reports img/s per GPU, MFU (the denoiser's FLOPs against the device's peak), peak GPU memory, the
share of step time spent waiting for data and the job's start-up to its first step; the plan of the real
manifest re-priced with those rates; and writes RUN_DIR/calibration.json (the format `plan --calibration`
reads). `run` of a Slurm manifest finds it at <runs-dir>/<name>-calibrate/calibration.json and says so, or
warns that the plan is the manifest's estimate. One device cannot measure the data-parallel communication of
32 GPUs: the re-priced plan leaves it out and says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pixeldiff.config import Manifest, load_resolved
from pixeldiff.ledger import read_jsonl

OUT_OF_MEMORY_EXIT = 3  # pixeldiff.train's exit status for a micro-batch that does not fit (not imported: torch)

CALIBRATION_FILE = "calibration.json"
EVAL_SAMPLES, EVAL_STEPS = 32, 10  # the short evaluation: enough to run every metric's path once


def calibration_dir(runs_dir: Path, name: str) -> Path:
    return Path(runs_dir) / f"{name}-calibrate"


def default_calibration(runs_dir: Path, name: str) -> Path:
    return calibration_dir(runs_dir, name) / CALIBRATION_FILE


class CalibrationError(ValueError):
    """The manifest cannot be calibrated as given (exit 2)."""


def fingerprint(m: Manifest) -> str:
    """What a calibration's numbers depend on: the model, text, stages' shapes per GPU, losses, recipe switches,
    parallelism and compile; not the budget, the cluster's size or the names. -> a short hash."""
    import hashlib

    from pixeldiff.config import to_dict

    d = to_dict(m)
    world = m.world_size
    key = {"model": d["model"], "text": d["data"]["text"], "objective": d["objective"], "losses": d["losses"],
           "tread": d["tread"], "optimizer": d["optimizer"]["name"], "buckets": d["data"].get("buckets"),
           "cluster": {k: d["cluster"][k] for k in ("parallel", "compile", "bf16_comm", "device")},
           "stages": [(s.resolution, s.global_batch // world, s.micro_batch, s.repa) for s in m.stages]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def calibration_manifest(m: Manifest, steps: int) -> Manifest:
    """The manifest on one device for `steps` steps per stage (see the module's docstring)."""
    if steps < 2:
        raise CalibrationError(f"--steps: at least 2 steps per stage (the first includes start-up), got {steps}")
    world = m.world_size
    stages = []
    for i, s in enumerate(m.stages):
        if s.global_batch % world:
            raise CalibrationError(f"stages[{i}].global_batch: {s.global_batch} does not divide over the manifest's "
                                   f"{world} GPUs")
        per_gpu = s.global_batch // world
        if s.micro_batch and per_gpu % s.micro_batch:
            raise CalibrationError(f"stages[{i}].micro_batch: {s.micro_batch} does not divide one GPU's batch "
                                   f"{per_gpu} (global_batch {s.global_batch} / {world} GPUs)")
        stages.append(dataclasses.replace(s, global_batch=per_gpu, steps=steps, budget_share=None))
    c = dataclasses.replace(m.cluster, backend="local", nodes=1, gpus_per_node=1)
    budget = dataclasses.replace(m.budget, usd=0, wall_hours=0, policy="fixed_steps")
    ckpt = dataclasses.replace(m.checkpoint, dir=None, interval_steps=steps, keep=2)
    lg = dataclasses.replace(m.logging, metrics_interval=max(1, steps // 10), sample_interval=0, tensorboard=False,
                             wandb=None)
    e = m.eval
    if e.enabled:
        e = dataclasses.replace(e, interval_steps=0, samples=min(e.samples, EVAL_SAMPLES),
                                sampling_steps=min(e.sampling_steps, EVAL_STEPS), batch=min(e.batch, EVAL_SAMPLES))
    return dataclasses.replace(m, name=f"{m.name}-calibrate", cluster=c, stages=stages, budget=budget,
                               checkpoint=ckpt, logging=lg, eval=e)


def run_job(run_dir: Path, stop_at: int | None, log) -> tuple[int, float, str]:
    """One local job of the calibration run. -> (exit status, its start time, its output). The job runs in its own
    process group; if this process is stopped (Ctrl-C, SIGTERM, a timeout) the job is stopped with it, never left
    holding the GPU."""
    import os
    import signal

    env = {**os.environ, **({"PIXELDIFF_STOP_AT_STEP": str(stop_at)} if stop_at else {})}
    env.pop("SLURM_JOB_ID", None)
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "-u", "-m", "pixeldiff.train", str(run_dir)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if not line.startswith("{"):  # the job's news, not its per-interval dicts
                log(f"  | {line.rstrip()}")
        return p.wait(), t0, "".join(lines)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if p.poll() is None:  # stopped before the job ended: end it too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)  # it saves and exits
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def stage_rows(m: Manifest, cm: Manifest, run_dir: Path, job_starts: list[float]) -> list[dict]:
    """Per stage, from metrics.jsonl: the steady state (each job's first record of a stage left out: start-up and
    compiling), and the start-up of the job that began the stage."""
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "img_per_s" in r]
    rows = []
    for i, (s, cs) in enumerate(zip(m.stages, cm.stages)):
        mine = [r for r in recs if r["stage"] == s.name]
        steady = mine[1:] if len(mine) > 1 else mine

        def med(key: str, rows=steady):
            values = [r.get(key) for r in rows]
            return statistics.median(values) if values and None not in values else None

        startup = None  # stage i < 2 began job i: its first record came after the job's start-up
        if i < len(job_starts) and mine and med("step_time") is not None:
            startup = max(0.0, mine[0]["time"] - job_starts[i] - (cm.logging.metrics_interval - 1) * med("step_time"))
        peak = max((r["peak_mem_gib"] for r in mine if r.get("peak_mem_gib") is not None), default=None)
        rows.append({"stage": s.name, "resolution": s.resolution, "batch_per_gpu": cs.global_batch,
                     "records": len(steady), "img_per_s_per_gpu": med("img_per_s"), "step_time_s": med("step_time"),
                     "tflops_per_gpu": med("tflops_per_gpu"), "mfu": med("mfu"), "data_wait": med("data_wait"),
                     "peak_mem_gib": peak, "startup_s": None if startup is None else round(startup, 1)})
    return rows


def fmt(v, spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "-" if v is None else f"{v * scale:{spec}}{unit}"


def table(rows: list[dict]) -> str:
    head = (f"{'stage':<12}{'res':>6}{'batch/GPU':>10}{'img/s/GPU':>11}{'step s':>9}{'MFU':>7}{'TFLOP/s':>9}"
            f"{'peak GiB':>10}{'data wait':>11}{'start-up s':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['stage']:<12}{r['resolution']:>6}{r['batch_per_gpu']:>10}"
                     f"{fmt(r['img_per_s_per_gpu'], '.1f'):>11}{fmt(r['step_time_s'], '.3f'):>9}"
                     f"{fmt(r['mfu'], '.1f', 100, '%'):>7}{fmt(r['tflops_per_gpu'], '.3g'):>9}"
                     f"{fmt(r['peak_mem_gib'], '.1f'):>10}{fmt(r['data_wait'], '.1f', 100, '%'):>11}"
                     f"{fmt(r['startup_s'], '.1f'):>12}")
    return "\n".join(lines)


def device_name(run_dir: Path) -> str:
    starts = [e for e in read_jsonl(run_dir / "ledger.jsonl") if e["event"] == "segment_start"]
    dev = starts[0].get("device", "?") if starts else "?"
    if dev.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(0)} ({dev})"
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"


def calibrate(m: Manifest, runs_dir: Path, steps: int, log=print) -> dict:
    """Run the calibration; -> the calibration (also written to its run directory). Raises CalibrationError for a
    manifest that cannot be calibrated, RuntimeError when a job fails (its output is in the message)."""
    from launcher.cli import prepare_run_dir
    from pixeldiff.process import code_version

    cm = calibration_manifest(m, steps)
    run_dir = calibration_dir(runs_dir, m.name)
    if (run_dir / "manifest.yaml").exists() and load_resolved(run_dir / "manifest.yaml").name == cm.name:
        shutil.rmtree(run_dir)  # an earlier calibration: disposable
    run_dir, _ = prepare_run_dir(cm, Path(runs_dir))
    log(f"calibrating {m.name}: {steps} steps of each of {len(m.stages)} stage(s) on this machine, in {run_dir}")
    starts = []
    jobs = [steps, None] if len(m.stages) > 1 else [None]  # the second job resumes across the stage switch
    for stop_at in jobs:
        rc, t0, out = run_job(run_dir, stop_at, log)
        starts.append(t0)
        if rc == OUT_OF_MEMORY_EXIT:
            oom = [e for e in read_jsonl(run_dir / "ledger.jsonl") if e["event"] == "out_of_memory"][-1]
            raise CalibrationError(too_big(cm, oom["stage"], oom["micro_batch"], Path(runs_dir), log))
        if rc != 0:
            tail = "\n".join(out.strip().splitlines()[-15:])
            raise RuntimeError(f"the calibration job {'stopping at step ' + str(stop_at) if stop_at else 'to the end'}"
                               f" failed with exit status {rc}:\n{tail}")
    ev = read_jsonl(run_dir / "ledger.jsonl")
    resumed = [e for e in ev if e["event"] == "segment_start"]
    if len(m.stages) > 1 and (len(resumed) < 2 or resumed[1].get("step") != steps):
        raise RuntimeError(f"the second calibration job did not resume from step {steps}: {resumed}")
    rows = stage_rows(m, cm, run_dir, starts)
    evals = read_jsonl(run_dir / "eval.jsonl")
    result = {
        "manifest": m.name, "fingerprint": fingerprint(m), "device": device_name(run_dir), "steps_per_stage": steps,
        "commit": code_version(),
        "date": time.strftime("%Y-%m-%d"), "stages": rows,
        "img_per_s_per_gpu": {str(r["resolution"]): r["img_per_s_per_gpu"] for r in rows
                              if r["img_per_s_per_gpu"]},
        "checkpoint_resumed_across_stage_switch": len(m.stages) > 1,
        "samples": sorted(str(p) for p in (run_dir / "samples").glob("*.png")),
        "eval": [{k: e.get(k) for k in ("step", "stage", "why", *m.eval.metrics, "samples", "seconds")}
                 for e in evals],
    }
    path = run_dir / CALIBRATION_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    result["path"] = str(path)
    return result


def too_big(cm: Manifest, i: int, micro: int, runs_dir: Path, log) -> str:
    """A stage's micro-batch ran out of memory: probe the smaller ones that divide one GPU's batch, largest first,
    each a 2-step run of that stage alone. -> the error naming the largest that fits."""
    from launcher.cli import prepare_run_dir

    stage = cm.stages[i]
    for cand in sorted((d for d in range(1, micro) if stage.global_batch % d == 0), reverse=True):
        probe = dataclasses.replace(cm, name=f"{cm.name}-probe", stages=[dataclasses.replace(
            stage, micro_batch=cand, steps=2)], eval=dataclasses.replace(cm.eval, enabled=False),
            checkpoint=dataclasses.replace(cm.checkpoint, interval_steps=2))
        probe_dir = Path(runs_dir) / probe.name
        shutil.rmtree(probe_dir, ignore_errors=True)
        probe_dir, _ = prepare_run_dir(probe, Path(runs_dir))
        log(f"stage {stage.name}: a micro-batch of {micro} ran out of memory; trying {cand}")
        rc, _, out = run_job(probe_dir, None, log)
        shutil.rmtree(probe_dir, ignore_errors=True)
        if rc == 0:
            return (f"stages[{i}].micro_batch: {micro} images per micro-batch do not fit in this device's memory; "
                    f"the largest that fits is {cand}: set stages[{i}].micro_batch: {cand}")
        if rc != OUT_OF_MEMORY_EXIT:
            raise RuntimeError(f"the memory probe with micro_batch {cand} failed with exit status {rc}:\n"
                               + "\n".join(out.strip().splitlines()[-10:]))
    return (f"stages[{i}]: not even a micro-batch of 1 fits in this device's memory; use a smaller model or a "
            f"larger GPU (or cluster.parallel: fsdp)")


def report(m: Manifest, result: dict, manifest_path: str) -> str:
    from launcher.cli import apply_calibration
    from launcher.plan import format_plan, make_plan

    lines = [f"calibration of {m.name} on {result['device']}, {result['steps_per_stage']} steps per stage, "
             f"commit {result['commit']}, {result['date']}", "", table(result["stages"]), ""]
    if result["checkpoint_resumed_across_stage_switch"]:
        lines.append(f"checkpoint: saved at step {result['steps_per_stage']}, resumed by a second job across the "
                     f"stage switch")
    if result["samples"]:
        lines.append(f"sample grid: {result['samples'][-1]}")
    for e in result["eval"]:
        shown = ", ".join(f"{k} {e[k]:.4g}" for k in m.eval.metrics if isinstance(e.get(k), (int, float)))
        lines.append(f"eval at step {e['step']} ({e['stage']}, {e['why']}): {shown} ({e['samples']} samples, "
                     f"{e['seconds']:.1f} s)")
    priced = apply_calibration(m, Path(result["path"]))
    comm = (f" (one device measured: the data-parallel communication of {m.world_size} GPUs is not in them)"
            if m.world_size > 1 else "")
    lines += ["", f"the plan of {m.name} at these rates{comm}:", format_plan(make_plan(priced)), "",
              f"wrote {result['path']}; `pixeldiff-launch plan {manifest_path} --calibration {result['path']}` "
              f"uses it, and `run` of the manifest finds it there"]
    return "\n".join(lines)
