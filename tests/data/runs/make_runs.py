"""Write the recorded run directories the dashboard tests read (tests/data/runs/<state>/).

    .venv/bin/python tests/data/runs/make_runs.py [FINISHED_RUN_DIR]

`finished/` is a real dry run (`pixeldiff-launch run manifests/dryrun.yaml --set stages[0].steps=100
--set stages[1].steps=50`), trimmed (no checkpoints, a small sample image); give its run directory to
refresh it. The others are simulated Slurm runs: a step at a time with the trainer's own event and
metrics formats (pixeldiff/ledger.py, pixeldiff/train.py), realistic times (start-up, heartbeats
every minute, blocking checkpoints, the job's time limit), and `<name>.slurm.json` beside each: what
squeue/sacct said at `now` (in `<name>.now`).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from launcher.plan import make_plan  # noqa: E402
from pixeldiff.config import Manifest, dump_yaml, from_dict, validate  # noqa: E402

T0 = 1_795_000_000.0  # 2026-11-18 09:46:40 UTC


def manifest(name: str, nodes: int, budget: dict, stages: list[dict], max_job_hours: float = 1.0) -> Manifest:
    m = from_dict(Manifest, {
        "name": name,
        "cluster": {"backend": "slurm", "nodes": nodes, "gpus_per_node": 8, "partition": "h200",
                    "max_job_hours": max_job_hours},
        "budget": budget,
        "stages": stages,
        "model": {"preset": "B/32"},
        "losses": {"lpips": {"weight": 0.0}, "dino": {"weight": 0.0}},
        "checkpoint": {"interval_steps": 500, "keep": 2},
        "logging": {"metrics_interval": 50, "sample_interval": 1000},
    })
    validate(m)
    return m


class Sim:
    """Steps one simulated job at a time, writing what rank 0 would write."""

    def __init__(self, m: Manifest, step_time: dict[str, float], seed: int = 0):
        self.m, self.step_time, self.rng = m, step_time, random.Random(seed)
        self.events: list[dict] = []
        self.metrics: list[dict] = []
        self.gpus = m.world_size
        ends, at = [], 0
        for s in m.stages:
            at += s.steps
            ends.append(at)
        self.ends = ends

    def ev(self, event: str, t: float, **kw) -> None:
        self.events.append({"event": event, "time": round(t, 3), **kw})

    def stage_at(self, step: int) -> int:
        return min(next((i for i, e in enumerate(self.ends) if step < e), len(self.ends) - 1), len(self.ends) - 1)

    def segment(self, job_id: str, t: float, step: int, restart: int = 0, nodelist: str = "gpu-[01-02]",
                until_step: int | None = None, until_t: float | None = None, end: str | None = None,
                startup_s: float = 75.0, ckpt_s: float = 6.0, final: bool = True) -> tuple[float, int]:
        """One segment from time t at `step`; stops at until_step / until_t; `end` None = dies silently."""
        m = self.m
        self.ev("segment_start", t, job_id=job_id, restart=restart, nodes=m.cluster.nodes, gpus=self.gpus,
                nodelist=nodelist, device="cuda:0", launcher="slurm", step=step, job_start=round(t - 4.0, 1))
        t += startup_s
        window_t, window_img, beat, stage = t, 0, t, self.stage_at(step)
        saved = step
        while step < self.ends[-1] and (until_step is None or step < until_step) and (until_t is None or t < until_t):
            idx = self.stage_at(step)
            if idx != stage:
                self.ev("stage_change", t, step=step, stage=m.stages[idx].name, previous=m.stages[stage].name)
                stage = idx
            st = m.stages[idx]
            dt = self.step_time[st.name] * (1 + 0.04 * (self.rng.random() - 0.5))
            t += dt
            step += 1
            window_img += st.global_batch
            if step % m.logging.metrics_interval == 0:
                loss = 0.08 + 0.5 * math.exp(-step / 700) + 0.01 * self.rng.random() + (0.03 if idx else 0.0)
                self.metrics.append({
                    "step": step, "stage": st.name, "resolution": st.resolution, "loss": round(loss, 6),
                    "loss_mse": round(loss, 6), "img_per_s": round(window_img / (t - window_t), 2),
                    "step_time": round(dt, 4), "lr": 1e-4 if step > 100 else 1e-4 * step / 100,
                    "grad_norm": round(0.15 + 0.3 * math.exp(-step / 400) + 0.02 * self.rng.random(), 4),
                    "time": round(t, 3)})
                window_t, window_img = t, 0
            if t - beat > 60:
                self.ev("heartbeat", t, step=step)
                beat = t
            if step % m.checkpoint.interval_steps == 0:
                t += ckpt_s
                self.ev("checkpoint_saved", t, step=step, checkpoint=f"s3://ckpt/{m.name}/step-{step:08d}",
                        seconds_blocked=ckpt_s, bytes=2_400_000_000)
                saved = step
        if end is None:
            return t, step  # the job died here: no end event
        if final and saved != step:
            t += ckpt_s
            self.ev("checkpoint_saved", t, step=step, checkpoint=f"s3://ckpt/{m.name}/step-{step:08d}",
                    seconds_blocked=ckpt_s, bytes=2_400_000_000)
        if end == "budget":
            self.ev("budget_stop", t + 0.1, step=step, billed_gpu_seconds=0.0)
        if end in ("finished", "budget"):
            t += 20.0  # the final sample grid
        t += 1.0
        self.ev("segment_end", t, reason=end, step=step)
        return t, step

    def write(self, name: str, now: float, slurm: dict) -> None:
        d = HERE / name
        shutil.rmtree(d, ignore_errors=True)
        for sub in ("checkpoints", "samples", "jobs"):
            (d / sub).mkdir(parents=True)
        (d / "manifest.yaml").write_text(dump_yaml(self.m))
        (d / "plan.json").write_text(json.dumps(make_plan(self.m), indent=1))
        (d / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.events))
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.metrics))
        steps = [r["step"] for r in self.metrics if r["step"] % self.m.logging.sample_interval == 0]
        for s in sorted(set(steps))[-2:]:
            (d / "samples" / f"step-{s:08d}.png").write_bytes(TINY_PNG)
        (HERE / f"{name}.now").write_text(f"{now}\n")
        (HERE / f"{name}.slurm.json").write_text(json.dumps(slurm, indent=1) + "\n")


# a 1x1 grey PNG: the dashboard only shows the newest sample's path
def _tiny_png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (1, 1), 128).save(out, format="PNG")
    return out.getvalue()


TINY_PNG = _tiny_png()


def acct(job_id, state, start, end, gpus, nodes, elapsed=None):
    return {"job_id": job_id, "state": state, "start": start, "end": end,
            "elapsed_s": elapsed if elapsed is not None else (end - start if end else None),
            "alloc_gpus": gpus, "nodelist": nodes, "exit_code": "0:0"}


def running() -> None:
    """16 GPUs, a time-limit requeue, a crash that loses work and excludes a node, now in the second stage."""
    m = manifest("speedrun-mini", 2, {"usd": 400, "wall_hours": 12, "gpu_hour_usd": 2.5},
                 [{"name": "256px", "resolution": 256, "global_batch": 256, "steps": 10000, "est_img_per_s_per_gpu": 60},
                  {"name": "512px", "resolution": 512, "global_batch": 256, "steps": 6000, "est_img_per_s_per_gpu": 16}])
    sim = Sim(m, {"256px": 0.30, "512px": 1.1}, seed=1)
    n = ["gpu-01", "gpu-02"]
    sim.ev("job_submitted", T0, job_id="81001", nodes=2, gpus=16, exclude=[], partition="h200")
    start1 = T0 + 42
    t, step = sim.segment("81001", start1, 0, until_t=start1 + 3600 - 120, end="deadline")
    end1 = t + 3
    sim.ev("requeue_requested", end1 + 1, job_id="81001", kind="timeout", restart=1)
    start2 = end1 + 70
    t, died = sim.segment("81001", start2, step, restart=1, until_step=(step // 500 + 1) * 500 + 430)  # NCCL error: no end event
    end2 = t + 25  # Slurm noticed 25 s after the last sign of life
    sim.ev("job_failed", end2 + 5, job_id="81001", node="gpu-02", message="NCCL watchdog timeout on gpu-02", failures=1)
    sim.ev("node_excluded", end2 + 6, node="gpu-02", job_id="81001", reason="NCCL watchdog timeout")
    sim.ev("job_submitted", end2 + 8, job_id="81002", nodes=2, gpus=16, exclude=["gpu-02"], partition="h200")
    start3 = end2 + 8 + 130
    resume = max(e["step"] for e in sim.events if e["event"] == "checkpoint_saved")
    t, step = sim.segment("81002", start3, resume, nodelist="gpu-[01,03]", until_t=start3 + 1500)
    now = t + 21.0
    slurm = {"queue": {"81002": {"job_id": "81002", "state": "RUNNING", "nodes": 2, "nodelist": ["gpu-01", "gpu-03"],
                                 "elapsed_s": round(now - start3 + 4, 1), "time_left_s": round(3600 - (now - start3 + 4), 1),
                                 "reason": "gpu-[01,03]"}},
             "accounting": [acct("81001", "REQUEUED", round(start1 - 4, 1), round(end1, 1), 16, n),
                            acct("81001", "NODE_FAIL", round(start2 - 4, 1), round(end2, 1), 16, n),
                            acct("81002", "RUNNING", round(start3 - 4, 1), None, 16, ["gpu-01", "gpu-03"],
                                 elapsed=round(now - start3 + 4, 1))]}
    sim.write("running", now, slurm)
    with open(HERE / "running" / "ledger.jsonl", "a") as f:
        f.write('{"event": "heartbeat", "time": 17950')  # being written as we look: a torn last line


def over_budget() -> None:
    """8 GPUs, $40 at $2/GPU-hour (20 GPU-hours): two full jobs, then the budget stops the third."""
    m = manifest("budget-capped", 1, {"usd": 40, "wall_hours": 0, "gpu_hour_usd": 2.0},
                 [{"name": "256px", "resolution": 256, "global_batch": 256, "steps": 40000, "est_img_per_s_per_gpu": 60}],
                 max_job_hours=1.0)
    sim = Sim(m, {"256px": 0.55}, seed=2)
    sim.ev("job_submitted", T0, job_id="9100", nodes=1, gpus=8, exclude=[], partition="h200")
    t, step, recs, start = T0 + 30, 0, [], T0 + 30
    for restart in range(3):
        last = restart == 2
        cap_t = T0 + 30 + 40 / 2.0 * 3600 / 8 - 400 if last else None
        t, step = sim.segment("9100", t, step, restart=restart, nodelist="gpu-07",
                              until_t=cap_t if last else t + 3600 - 150, end="budget" if last else "deadline")
        recs.append(acct("9100", "COMPLETED" if last else "REQUEUED", round(start - 4, 1), round(t + 2, 1), 8, ["gpu-07"]))
        if not last:
            sim.ev("requeue_requested", t + 4, job_id="9100", kind="timeout", restart=restart + 1)
            t = start = t + 60
    sim.ev("run_stopped", t + 5, reason="the budget is spent", kind="budget", job_id="9100")
    sim.write("over_budget", t + 600, {"queue": {}, "accounting": recs})


def failed() -> None:
    """One job dies without an end event; the next fails on start-up three times; the launcher gives up."""
    m = manifest("flaky", 1, {"usd": 500, "wall_hours": 24, "gpu_hour_usd": 2.0},
                 [{"name": "256px", "resolution": 256, "global_batch": 256, "steps": 20000, "est_img_per_s_per_gpu": 60}])
    sim = Sim(m, {"256px": 0.55}, seed=3)
    sim.ev("job_submitted", T0, job_id="7300", nodes=1, gpus=8, exclude=[], partition="h200")
    t, step = sim.segment("7300", T0 + 35, 0, nodelist="gpu-11", until_step=1230)
    recs = [acct("7300", "NODE_FAIL", T0 + 31, round(t + 40, 1), 8, ["gpu-11"])]
    sim.ev("job_failed", t + 45, job_id="7300", node="gpu-11", message="node gpu-11 not responding", failures=1)
    sim.ev("node_excluded", t + 46, node="gpu-11", job_id="7300", reason="NODE_FAIL")
    t += 50
    for k, job in enumerate(("7301", "7302", "7303")):
        sim.ev("job_submitted", t, job_id=job, nodes=1, gpus=8, exclude=["gpu-11"], partition="h200")
        recs.append(acct(job, "FAILED", t + 20, t + 50, 8, ["gpu-12"]))
        sim.ev("job_failed", t + 55, job_id=job, node=None, message="ImportError: libnccl.so.2 not found", failures=k + 1)
        t += 60
    sim.ev("run_stopped", t, reason="3 jobs in a row failed without saving a checkpoint (cluster.max_failures = 3); "
                                   "last: ImportError: libnccl.so.2 not found", kind="failed", job_id="7303")
    sim.write("failed", t + 300, {"queue": {}, "accounting": recs})


def cancelled() -> None:
    m = manifest("cancelled", 1, {"usd": 300, "wall_hours": 0, "gpu_hour_usd": 2.0},
                 [{"name": "256px", "resolution": 256, "global_batch": 256, "steps": 20000, "est_img_per_s_per_gpu": 60}])
    sim = Sim(m, {"256px": 0.55}, seed=4)
    sim.ev("job_submitted", T0, job_id="5500", nodes=1, gpus=8, exclude=[], partition="h200")
    t, step = sim.segment("5500", T0 + 28, 0, nodelist="gpu-04", until_step=740)
    sim.ev("cancel_requested", t + 0.5, job_ids=["5500"])
    end = sim.events[-1]["time"] + 9
    sim.ev("checkpoint_saved", end - 2, step=740, checkpoint="s3://ckpt/cancelled/step-00000740", seconds_blocked=6.0,
           bytes=2_400_000_000)
    sim.ev("segment_end", end, reason="signal SIGTERM", step=740)
    sim.ev("run_stopped", end + 3, reason="cancelled by pixeldiff-launch cancel", kind="cancelled", job_id="5500")
    sim.write("cancelled", end + 120, {"queue": {}, "accounting": [acct("5500", "CANCELLED by 1000", T0 + 24, end + 1, 8, ["gpu-04"])]})


def finished(source: Path | None) -> None:
    d = HERE / "finished"
    if source is None:
        return  # keep the recorded one
    shutil.rmtree(d, ignore_errors=True)
    for sub in ("checkpoints", "samples", "jobs"):
        (d / sub).mkdir(parents=True)
    for f in ("manifest.yaml", "plan.json", "ledger.jsonl", "metrics.jsonl"):
        shutil.copy(source / f, d / f)
    for png in sorted((source / "samples").glob("*.png"))[-1:]:
        (d / "samples" / png.name).write_bytes(TINY_PNG)
    last = json.loads((d / "ledger.jsonl").read_text().splitlines()[-1])["time"]
    (HERE / "finished.now").write_text(f"{last + 300}\n")
    (HERE / "finished.slurm.json").write_text("null\n")


if __name__ == "__main__":
    finished(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    running()
    over_budget()
    failed()
    cancelled()
