"""`pixeldiff-launch`: plan and run a manifest.

    pixeldiff-launch plan   MANIFEST [--json] [--set key=value ...]
    pixeldiff-launch run    MANIFEST [--local] [--detach] [--plain] [--runs-dir DIR] [--set key=value ...]
    pixeldiff-launch status RUN_DIR [--json]
    pixeldiff-launch watch  RUN_DIR [--once]
    pixeldiff-launch eval   RUN_DIR [--checkpoint step-N] [--samples N]
    pixeldiff-launch cancel RUN_DIR [--wait SECONDS]

Exit codes: 0 done, 2 bad input (message says what and how to fix), 128+N when a
local run was stopped by signal N (it saved a checkpoint; run again to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from launcher.manifest import load_manifest
from launcher.plan import format_plan, make_plan, number
from pixeldiff.config import ConfigError, Manifest, dump_yaml, load_resolved, to_dict


CANCEL_GONE_S = 30.0  # how long `cancel` waits for its cancelled jobs to leave squeue


class UsageError(Exception):
    """A user mistake outside the manifest (paths, a busy run directory)."""


def _flatten(d, prefix="") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    elif isinstance(d, list) and d and isinstance(d[0], dict):
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = d
    return out


def make_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the run directory {path} ({e.strerror}); choose another --runs-dir or "
                         f"--set name=...") from None
    return path


def prepare_run_dir(m: Manifest, runs_dir: Path) -> tuple[Path, bool]:
    """Create runs/<name>/ with the resolved manifest and plan, or check an existing one. -> (dir, resuming)."""
    run_dir = runs_dir / m.name
    existing = run_dir / "manifest.yaml"
    if existing.exists():
        old = _flatten(to_dict(load_resolved(existing)))
        new = _flatten(to_dict(m))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:5])
            raise UsageError(
                f"{run_dir} already holds run {m.name!r} with a different manifest: {shown}"
                f"{' ...' if len(changed) > 5 else ''}. To resume it, use the same manifest; to start a new run, "
                f"change 'name' (e.g. --set name={m.name}-2) or --runs-dir"
            )
        return run_dir, True
    make_dir(run_dir)
    for sub in ("checkpoints", "samples", "jobs"):
        (run_dir / sub).mkdir(exist_ok=True)
    for name, text in (("plan.json", json.dumps(make_plan(m), indent=1)), ("manifest.yaml", dump_yaml(m))):
        tmp = run_dir / f".{name}.{os.getpid()}.tmp"  # the manifest last: its presence says the directory is whole
        tmp.write_text(text)
        os.replace(tmp, run_dir / name)
    return run_dir, False


def check_weights(m: Manifest, tracking: bool = True, warn: bool = True) -> None:
    """Local perceptual-loss weights must exist before anything starts (s3:// ones are checked when the job starts);
    random-init perceptual networks are announced on stderr (`warn`: False where the trainer, starting in this
    terminal, says the same). W&B (logging.wandb) is installed and has a key."""
    from pixeldiff import tracking as trackers
    from pixeldiff.weights import preflight

    if tracking:
        trackers.preflight(m)
    for message in preflight(m):
        if warn:
            print(f"warning: {message}", file=sys.stderr)


def apply_calibration(m: Manifest, path: Path) -> Manifest:
    """Stages' throughput from a calibration file (tools/bench_step.py --calibration): img/s/GPU by resolution."""
    try:
        data = json.loads(path.read_text())
        rates = {int(k): float(v) for k, v in data["img_per_s_per_gpu"].items()}
        bad = [f"{k} px: {v}" for k, v in rates.items() if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(f"throughput must be a finite number > 0 ({', '.join(bad)})")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--calibration {path}: not a calibration file ({type(e).__name__}: {e}); write one with "
                         f"tools/bench_step.py --calibration FILE") from None
    stages = []
    for s in m.stages:
        if s.resolution not in rates:
            print(f"warning: {path} has no {s.resolution} px measurement; stage {s.name} keeps its estimate",
                  file=sys.stderr)
        stages.append(dataclasses.replace(s, est_img_per_s_per_gpu=rates.get(s.resolution, s.est_img_per_s_per_gpu)))
    return dataclasses.replace(m, stages=stages)


def cmd_plan(args) -> int:
    m = load_manifest(Path(args.manifest), args.set)
    check_weights(m)
    calibration = found_calibration(args, m)
    if calibration:
        m = apply_calibration(m, calibration)
    p = make_plan(m)
    print(json.dumps(p, indent=1) if args.json else format_plan(p))
    return 0


def cmd_run_slurm(args, m: Manifest) -> int:
    from launcher.policy import SubmitError, submitted_jobs
    from launcher.rundir import events_of
    from launcher.state import run_over
    from launcher.submit import recover_submissions, submission_lock, submit
    from slurm.commands import Slurm, SlurmError

    calibration = found_calibration(args, m)
    if calibration is None:
        print(f"warning: no calibration of {m.name} (runs-dir/{m.name}-calibrate/calibration.json): its hours and "
              f"cost are the manifest's estimates; `pixeldiff-launch calibrate {args.manifest}` on one GPU measures "
              f"them (and finds bad input in minutes)", file=sys.stderr)
    else:
        priced = make_plan(apply_calibration(m, calibration))
        rates = ", ".join(f"{r['stage']} {number(r['est_img_per_s_per_gpu'], '.1f', '?')}" for r in priced["stages"])
        print(f"calibrated plan: {number(priced['total_hours'], '.2f', '?')} h, ${number(priced['total_usd'], ',.0f', '?')} "
              f"(img/s per GPU: {rates})", file=sys.stderr)
    run_dir = make_dir(Path(args.runs_dir) / m.name)
    try:
        # two `run`s of one run directory at the same moment: one creates it and submits, the other waits here,
        # then sees the job in the ledger and squeue; the job's own resubmission takes the same lock
        with submission_lock(run_dir):
            run_dir, resuming = prepare_run_dir(m, Path(args.runs_dir))
            events = events_of(run_dir)
            over = run_over(events)
            if over:
                print(f"run {m.name} in {run_dir} is {over[0].replace('_', ' ')}; nothing to submit")
                return 0
            slurm = Slurm(min_interval_s=0)
            try:
                adopted, abandoned = recover_submissions(run_dir, m, events, slurm)
                jobs = submitted_jobs(events) + adopted
                active = slurm.queue(jobs) if jobs else {}
            except SlurmError as e:
                raise UsageError(f"cannot ask Slurm whether run {m.name} is already queued: {e}") from None
            for job_id in adopted:
                print(f"job {job_id} of run {m.name} was submitted by a pixeldiff-launch that was killed before it "
                      f"recorded it; recorded now")
            for job_id in abandoned:
                print(f"job {job_id} of run {m.name} was left by a pixeldiff-launch killed while it submitted "
                      f"(it could not have started); cancelled it")
            if active:
                job_id, q = next(iter(active.items()))
                print(f"run {m.name} is already {q.state.lower()} as job {job_id}: not submitting a second copy")
            else:
                job_id = submit(run_dir, m, why="resume" if resuming else "start")
                print(f"{'resuming' if resuming else 'starting'} {m.name} in {run_dir}: submitted Slurm job {job_id}")
    except SubmitError as e:
        raise UsageError(str(e)) from None
    if args.detach:
        print(f"follow it with: pixeldiff-launch watch {run_dir}")
        print(f"stop it cleanly with: pixeldiff-launch cancel {run_dir}")
        return 0
    from launcher import status

    print("attaching the dashboard (Ctrl-C detaches; the jobs keep going)", flush=True)
    return status.cmd_watch(argparse.Namespace(run_dir=str(run_dir), once=False, interval=2.0, no_slurm=False, now=None))


def cmd_run(args) -> int:
    m = load_manifest(Path(args.manifest), args.set)
    local = args.local or m.cluster.backend == "local"
    check_weights(m, warn=not local or args.detach)  # a local run's trainer warns in this terminal itself
    if not local:
        return cmd_run_slurm(args, m)
    if m.cluster.backend != "local":  # a dry run of a cluster manifest: its own run directory
        m = dataclasses.replace(m, name=f"{m.name}-local", cluster=dataclasses.replace(m.cluster, backend="local"))
    run_dir, resuming = prepare_run_dir(m, Path(args.runs_dir))
    print(f"{'resuming' if resuming else 'starting'} {m.name} in {run_dir}", flush=True)
    if args.detach:
        log = run_dir / "jobs" / f"local-{time.strftime('%Y%m%d-%H%M%S')}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "pixeldiff.train", str(run_dir)], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        time.sleep(1.0)
        if proc.poll() is not None and proc.returncode != 0:
            print(log.read_text(), file=sys.stderr)
            return proc.returncode
        print(f"job running in the background: pid {proc.pid}, log {log}")
        print(f"stop it cleanly with: kill -TERM {proc.pid}   (it saves a checkpoint; run again to resume)")
        return 0
    if sys.stdout.isatty() and not args.plain:  # a terminal: the job beside a live dashboard
        from launcher.status import run_with_dashboard

        return run_with_dashboard(run_dir)
    from pixeldiff.checkpoint import CheckpointError, StorageError
    from pixeldiff.shards import DataError
    from pixeldiff.train import OUT_OF_MEMORY_EXIT, OutOfMemory, RunLocked, exit_code, run_job

    try:
        reason = run_job(run_dir, log=lambda s: print(s, flush=True))
    except RunLocked as e:
        raise UsageError(f"{e}; wait for it or stop it first") from None
    except CheckpointError as e:  # torch is imported only here, where a local run trains
        raise UsageError(str(e)) from None
    except DataError as e:
        print(f"error: the data cannot feed the run: {e}", file=sys.stderr)
        return 1
    except StorageError as e:  # disk full, S3 down: the previous checkpoint is intact
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OutOfMemory as e:
        print(f"error: {e}", file=sys.stderr)
        return OUT_OF_MEMORY_EXIT
    return exit_code(reason)


def cmd_calibrate(args) -> int:
    from launcher.calibrate import CalibrationError, calibrate, report

    m = load_manifest(Path(args.manifest), args.set)
    check_weights(m, tracking=False)  # the calibration run logs to no tracker
    try:
        result = calibrate(m, Path(args.runs_dir), args.steps, log=lambda s: print(s, flush=True))
    except CalibrationError as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("calibration stopped; its job was stopped with it", file=sys.stderr)
        return 130
    print(report(m, result, args.manifest))
    return 0


def found_calibration(args, m: Manifest) -> Path | None:
    """--calibration FILE, or the one `calibrate` wrote for this manifest under --runs-dir (announced)."""
    from launcher.calibrate import default_calibration

    if getattr(args, "calibration", None):
        return Path(args.calibration)
    from launcher.calibrate import fingerprint

    path = default_calibration(Path(getattr(args, "runs_dir", "runs")), m.name)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a calibration file ({e}); run `pixeldiff-launch calibrate` again or delete "
                         f"it") from None
    if data.get("fingerprint") != fingerprint(m):
        print(f"warning: {path} calibrated another version of {m.name} (its model, stages, losses or switches "
              f"differ): not used; run `pixeldiff-launch calibrate` again", file=sys.stderr)
        return None
    print(f"using the calibration {path} ({data.get('device')}, {data.get('date')}, commit {data.get('commit')})",
          file=sys.stderr)
    return path


def cmd_eval(args) -> int:
    """One evaluation of a checkpoint: for a Slurm run, as a Slurm job on one node (waited for unless --detach);
    otherwise, or with --local, in this process (one GPU or the CPU)."""
    run_dir = Path(args.run_dir)
    if not (run_dir / "manifest.yaml").exists():
        raise UsageError(f"{run_dir} is not a run directory (no manifest.yaml); give the path printed by `run`")
    if args.samples is not None and args.samples < 2:
        raise UsageError(f"--samples: at least 2 images, got {args.samples}")
    m = load_resolved(run_dir / "manifest.yaml")
    if m.cluster.backend == "slurm" and not args.local:
        return eval_on_slurm(args, run_dir, m)
    from pixeldiff.checkpoint import CheckpointError, StorageError
    from pixeldiff.shards import DataError
    from pixeldiff.train import evaluate_checkpoint

    try:
        rec = evaluate_checkpoint(run_dir, args.checkpoint, args.samples, log=lambda s: print(s, flush=True))
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    except (DataError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in rec.items() if k not in ("preprocess",)}))
    return 0


def eval_on_slurm(args, run_dir: Path, m: Manifest) -> int:
    from launcher.evaljob import submit_eval, wait_for
    from launcher.policy import SubmitError
    from pixeldiff.checkpoint import list_checkpoints
    from pixeldiff.storage import storage_options
    from pixeldiff.train import checkpoint_root

    if args.time_min < 1:
        raise UsageError(f"--time-min: at least 1 minute, got {args.time_min}")
    from pixeldiff.checkpoint import StorageError

    root = checkpoint_root(m, run_dir)
    try:
        found = list_checkpoints(root, storage_options(m.data.s3))[0]
    except StorageError as e:
        print(f"error: cannot list the checkpoints in {root}: {e}", file=sys.stderr)
        return 1
    names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in found]
    if not names:
        raise UsageError(f"{run_dir} has no checkpoint yet: nothing to evaluate")
    if args.checkpoint is not None and args.checkpoint not in names:  # found here, not in a queued job
        raise UsageError(f"no valid checkpoint {args.checkpoint} in {root}; there are: {', '.join(names)}")
    minutes = min(args.time_min, max(1, int(m.cluster.max_job_hours * 60)))
    try:
        job_id = submit_eval(run_dir, m, args.checkpoint, args.samples, minutes)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    log = run_dir / "jobs" / job_id / f"{job_id}_0_log.out"
    print(f"submitted evaluation job {job_id} (1 node, {m.cluster.gpus_per_node} GPUs, {minutes} min); log: {log}",
          flush=True)
    if args.detach:
        print(f"its record is appended to {run_dir / 'eval.jsonl'} with job_id {job_id}")
        return 0
    rec, gone = wait_for(run_dir, job_id, timeout_s=minutes * 60 + args.queue_wait)
    if rec is None and not gone:
        print(f"evaluation job {job_id} is still queued or running after {minutes * 60 + args.queue_wait:.0f} s; "
              f"its record will be appended to {run_dir / 'eval.jsonl'} (job_id {job_id})", file=sys.stderr)
        return 10
    if rec is None:
        print(f"error: evaluation job {job_id} ended without a record; see {log}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in rec.items() if k not in ("preprocess",)}))
    return 0


def cmd_cancel(args) -> int:
    from launcher.policy import submitted_jobs
    from launcher.rundir import events_of, ledger_path
    from pixeldiff.ledger import append_event
    from slurm.commands import Slurm, SlurmError

    run_dir = Path(args.run_dir)
    if not (run_dir / "manifest.yaml").exists():
        raise UsageError(f"{run_dir} is not a run directory (no manifest.yaml); give the path printed by `run`")
    events = events_of(run_dir)
    slurm = Slurm(min_interval_s=0)
    try:
        active = slurm.queue(submitted_jobs(events))
    except SlurmError as e:
        raise UsageError(f"cannot reach Slurm to cancel the run: {e}") from None
    t0, waited = time.time(), time.monotonic()  # t0 picks the ledger's later events; waits count monotonic seconds
    append_event(ledger_path(run_dir), "cancel_requested", job_ids=sorted(active))
    if not active:
        print(f"no job of {run_dir.name} is queued or running; marked as cancelled")
        return 0
    for job_id, q in active.items():
        if q.state == "RUNNING":
            print(f"job {job_id}: asking every task to checkpoint and stop (USR2)")
            try:
                slurm.cancel(job_id, signal="USR2")
            except SlurmError as e:  # e.g. it ended in between
                print(f"job {job_id}: could not signal it ({e})")
    # the trainer saves and writes segment_end; then rank 0 records that it will not requeue, and the job ends
    while time.monotonic() - waited < args.wait:
        if any(e["event"] in ("run_stopped", "requeue_requested") and e["time"] >= t0 for e in events_of(run_dir)):
            break
        try:
            still = slurm.queue(list(active))
        except SlurmError:
            still = active
        if not any(q.state == "RUNNING" for q in still.values()):
            break
        time.sleep(1.0)
    else:
        print(f"no checkpoint after {args.wait:g} s; cancelling anyway (the run resumes from its last checkpoint)")
    # and any job the run submitted meanwhile (a resubmission racing the cancel)
    late = [j for j in submitted_jobs([e for e in events_of(run_dir) if e["time"] >= t0]) if j not in active]
    for job_id in [*active, *late]:
        try:
            slurm.cancel(job_id)
        except SlurmError as e:
            print(f"job {job_id}: scancel failed ({e}); check with squeue")
    gone_by = time.monotonic() + CANCEL_GONE_S  # scancel returns while the jobs are still COMPLETING: wait until
    while time.monotonic() < gone_by:          # squeue no longer lists them, so that `status` right after says cancelled
        try:
            if not slurm.queue([*active, *late]):
                break
        except SlurmError:
            break
        time.sleep(0.5)
    ends = [e for e in events_of(run_dir) if e["event"] == "segment_end" and e["time"] >= t0]
    print(f"cancelled job(s) {', '.join(sorted([*active, *late]))}"
          + (f"; final checkpoint at step {ends[-1]['step']}" if ends and "failed" not in ends[-1]["reason"] else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pixeldiff-launch", description="Plan and run pixeldiff training manifests.")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("manifest", help="the run manifest (YAML)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a manifest field, e.g. --set budget.usd=100 (repeatable)")

    p = sub.add_parser("plan", help="print the stages, steps, GPU-hours and dollars a manifest implies")
    common(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--calibration", metavar="FILE",
                   help="measured img/s per GPU by resolution (`calibrate`, or tools/bench_step.py --calibration) "
                        "instead of the manifest's estimates (default: runs/<name>-calibrate/calibration.json if "
                        "`calibrate` wrote one)")
    p.add_argument("--runs-dir", default="runs", help="where `calibrate` wrote its run (default: ./runs)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("calibrate", help="run the real trainer here (one GPU or the CPU) for a few steps of every "
                                         "stage, then price the plan with the measured speed")
    common(p)
    p.add_argument("--steps", type=int, default=50, help="steps per stage (default 50)")
    p.add_argument("--runs-dir", default="runs", help="where the calibration run goes (default: ./runs)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("run", help="start or resume a run")
    common(p)
    p.add_argument("--local", action="store_true", help="run on this machine (one GPU or the CPU), in runs/<name>-local")
    p.add_argument("--detach", action="store_true", help="return once the job has started")
    p.add_argument("--plain", action="store_true", help="a local run on a terminal: print the job's lines (one JSON "
                                                        "dict per logging interval) instead of the live dashboard")
    p.add_argument("--runs-dir", default="runs", help="where run directories live (default: ./runs)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="evaluate a checkpoint of a run (FID, CMMD, ...; eval.jsonl): a Slurm run's as "
                                    "a Slurm job on one node, a local run's on this machine")
    p.add_argument("run_dir", help="the run directory (runs/<name>)")
    p.add_argument("--checkpoint", metavar="step-N", help="which checkpoint (default: the newest valid one)")
    p.add_argument("--samples", type=int, help="images to generate and compare (default: the manifest's eval.samples)")
    p.add_argument("--local", action="store_true", help="a Slurm run's checkpoint, evaluated on this machine instead")
    p.add_argument("--detach", action="store_true", help="Slurm: return once the job is submitted")
    p.add_argument("--time-min", type=int, default=60,
                   help="Slurm: the job's time limit in minutes (default 60, at most cluster.max_job_hours)")
    p.add_argument("--queue-wait", type=float, default=3600.0,
                   help="Slurm: seconds to wait for the job to start, beyond its time limit (default 3600)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("cancel", help="ask a Slurm run to checkpoint and stop, then cancel its jobs")
    p.add_argument("run_dir", help="the run directory (runs/<name>)")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the final checkpoint (default 300)")
    p.set_defaults(func=cmd_cancel)
    from launcher import status

    status.add_parsers(sub)
    return ap


def main(argv=None) -> int:
    from pixeldiff.process import no_world_write

    no_world_write()  # run directories, plans, ledgers: never writable by others
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
