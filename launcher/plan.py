"""The plan: what a manifest implies in steps, hours, GPU-hours, dollars and Slurm jobs.

Stage by stage from the manifest's throughput estimates (`stages[].est_img_per_s_per_gpu`),
then the job segments: the run is cut into Slurm jobs of `cluster.max_job_hours`, each
losing its start-up and the margin before its end; the checkpoint time is estimated from
the model's size, and sizes the USR2 lead time and the requeue limits. Evaluations (`eval`) are priced
from the model's FLOPs at the training rate of their stage, and counted in the totals.
"""

from __future__ import annotations

import math

from pixeldiff.config import Manifest
from pixeldiff.presets import forward_flops, param_count
from pixeldiff.schedule import budget_gpu_hours, eval_reason, resplit, stage_steps

STARTUP_S = 120.0  # a job's start-up before its first step (imports, NCCL, restore), an estimate
WRITE_BYTES_PER_S = 1e9  # checkpoint write speed to shared storage, an estimate


def checkpoint_bytes(m: Manifest) -> int:
    """Bytes of one checkpoint: fp32 weights, EMA, and Adam's two moments (4 copies)."""
    return 4 * 4 * param_count(m.model, m.data.text.dim)


def job_plan(m: Manifest, run_hours: float | None, stage_rows: list[dict]) -> dict:
    """Job segments, checkpoint cadence, signal lead and requeue limits."""
    c = m.cluster
    limit_min = max(1, round(c.max_job_hours * 60))
    ckpt_s = checkpoint_bytes(m) / WRITE_BYTES_PER_S / max(1, m.world_size if m.cluster.parallel != "ddp" else 1) + 5
    lead = c.signal_lead_s or int(min(300, max(60, 1.5 * ckpt_s + 30)))
    lead = min(lead, limit_min * 30)  # never more than half the job
    startup = min(STARTUP_S, 0.25 * limit_min * 60)
    usable_h = (limit_min * 60 - startup - lead) / 3600
    segments = math.ceil(run_hours / usable_h) if run_hours and usable_h > 0 else None
    every_min = []
    for r in stage_rows:
        if r["hours"] and r["steps"]:
            every_min.append(m.checkpoint.interval_steps * r["hours"] * 60 / r["steps"])
    return {
        "time_limit_min": limit_min, "segments": segments, "signal_lead_s": lead,
        "checkpoint_s_est": round(ckpt_s, 1), "checkpoint_every_min": [round(x, 1) for x in every_min],
        "max_timeouts": c.max_timeouts or (2 * segments + 2 if segments else 10),
        "max_preemptions": c.max_preemptions, "max_failures": c.max_failures,
    }


UNDER_BUDGET = 0.8  # a schedule needing less than this fraction of the budget is said to end inside it


def planned_steps(m: Manifest, reserve_gpu_hours: float = 0.0) -> tuple[list[int], int]:
    """Each stage's steps, and how many budget.policy extend_last_stage adds to the last one at the estimated speed,
    leaving `reserve_gpu_hours` of the budget (the evaluations') unspent (the trainer re-does this at every job's
    start with the measured speed)."""
    steps = stage_steps(m)
    cap = budget_gpu_hours(m)
    cap = max(0.0, cap - reserve_gpu_hours) if cap is not None else None
    rates = [s.est_img_per_s_per_gpu for s in m.stages]
    if m.budget.policy != "extend_last_stage" or cap is None or None in rates:
        return steps, 0
    ends = tuple(sum(steps[:i + 1]) for i in range(len(steps)))
    longer = resplit(ends, 0, [s.global_batch for s in m.stages], rates, m.world_size, cap * 3600 / m.world_size,
                     extend=True)
    return steps, max(0, longer[-1] - ends[-1])


def eval_steps(m: Manifest, ends: list[int]) -> list[int]:
    """The steps the trainer evaluates at: every eval.interval_steps, each stage's end and the run's end."""
    if not m.eval.enabled:
        return []
    every = m.eval.interval_steps
    candidates = set(range(every, ends[-1] + 1, every) if every else ()) | set(ends)
    return sorted(s for s in candidates if eval_reason(s, ends, every))


def eval_plan(m: Manifest, steps_each: list[int]) -> dict | None:
    """Hours of the evaluations: eval.samples images of eval.sampling_steps dense forwards (x2 with guidance) each,
    at the FLOP rate the stage trains at (img/s x 3 forwards with TREAD's tokens; the perceptual networks' share of
    a step is left out, so the rate is low and the estimate on the safe side). Feature extraction (Inception, CLIP,
    DINO) is small beside it and not counted. None when the manifest does not evaluate."""
    ends = [sum(steps_each[:i + 1]) for i in range(len(steps_each))]
    at = eval_steps(m, ends)
    if not at:
        return None
    e, text_len = m.eval, m.data.text.max_tokens
    passes = e.samples * e.sampling_steps * (1 if e.cfg == 1 else 2)
    hours = 0.0
    for step in at:
        s = m.stages[next(i for i, end in enumerate(ends) if step <= end)]
        if not s.est_img_per_s_per_gpu:
            return {"count": len(at), "hours": None}
        flop_rate = s.est_img_per_s_per_gpu * m.world_size * 3 * forward_flops(m.model, m.data.text.dim, s.resolution,
                                                                                text_len, m.tread)
        hours += passes * forward_flops(m.model, m.data.text.dim, s.resolution, text_len) / flop_rate / 3600
    return {"count": len(at), "samples": e.samples, "sampling_steps": e.sampling_steps, "hours": hours,
            "gpu_hours": hours * m.world_size}


def make_plan(m: Manifest) -> dict:
    gpus = m.world_size
    price = m.budget.gpu_hour_usd
    rows = []
    steps_each, extended = planned_steps(m)
    for _ in range(3 if extended else 0):  # the extension leaves the evaluations' share of the budget (a fixed point)
        ev = eval_plan(m, [*steps_each[:-1], steps_each[-1] + extended])
        steps_each, extended = planned_steps(m, ev["gpu_hours"] if ev and ev["hours"] is not None else 0.0)
    steps_each[-1] += extended
    for s, steps in zip(m.stages, steps_each):
        images = steps * s.global_batch
        hours = images / (s.est_img_per_s_per_gpu * gpus) / 3600 if s.est_img_per_s_per_gpu else None
        gpu_hours = hours * gpus if hours is not None else None
        rows.append({
            "stage": s.name, "resolution": s.resolution, "global_batch": s.global_batch, "steps": steps,
            "images": images, "est_img_per_s_per_gpu": s.est_img_per_s_per_gpu, "hours": hours,
            "gpu_hours": gpu_hours, "usd": gpu_hours * price if gpu_hours is not None else None,
        })
    ev = eval_plan(m, steps_each)
    if ev and ev["hours"] is not None:
        ev["usd"] = ev["gpu_hours"] * price
    # the evaluations' time is the run's too (the trainer evaluates inside its jobs): in every total below
    timed = rows + ([{"hours": ev["hours"], "gpu_hours": ev.get("gpu_hours")}] if ev else [])
    known = [r for r in timed if r["hours"] is not None]
    total_gpu_hours = sum(r["gpu_hours"] for r in known) if len(known) == len(timed) else None
    cap = budget_gpu_hours(m)
    warnings = []
    if total_gpu_hours is not None and cap is not None and total_gpu_hours > cap * (1 + 1e-9):
        warnings.append(f"the stages need {total_gpu_hours:.1f} GPU-hours but the budget allows {cap:.1f}: "
                        f"the run will stop before the last stage ends")
    notes = []
    if extended:
        notes.append(f"budget.policy extend_last_stage: {m.stages[-1].name} gets {extended} more steps (to "
                     f"{steps_each[-1]}) to spend the budget at the estimated speed; each job re-plans this from the "
                     f"measured speed")
    elif total_gpu_hours is not None and cap is not None and total_gpu_hours < UNDER_BUDGET * cap:
        spend = f"${total_gpu_hours * price:,.0f} of ${cap * price:,.0f}" if price else \
            f"{total_gpu_hours:.1f} of {cap:.1f} GPU-hours"
        notes.append(f"the schedule ends inside the budget: {sum(r['hours'] for r in known):.1f} h, {spend} "
                     f"({total_gpu_hours / cap:.0%}); budget.policy extend_last_stage would spend the rest on the "
                     f"last stage")
    need = m.data.workers + 2  # the training process, the pin-memory thread and the data workers
    if m.cluster.backend == "slurm" and m.cluster.cpus_per_task and m.cluster.cpus_per_task < need:
        warnings.append(f"cluster.cpus_per_task is {m.cluster.cpus_per_task} but each task runs {m.data.workers} data "
                        f"workers besides its training process and pin-memory thread: give it at least {need} "
                        f"(or 0 for the node's CPUs / tasks per node), or lower data.workers")
    if len(known) < len(rows):
        warnings.append("no throughput estimate (stages[].est_img_per_s_per_gpu) for some stages: hours and cost unknown")
    binding = None
    if m.budget.wall_hours and m.budget.usd and price:
        binding = "dollars" if m.budget.usd / price < m.budget.wall_hours * gpus else "wall clock"
    elif m.budget.wall_hours:
        binding = "wall clock"
    elif m.budget.usd and price:
        binding = "dollars"
    run_hours = sum(r["hours"] for r in known) if total_gpu_hours is not None else None
    if run_hours is not None and cap is not None:
        run_hours = min(run_hours, cap / gpus)
    return {
        "name": m.name, "backend": m.cluster.backend, "gpus": gpus, "gpu_hour_usd": price, "stages": rows,
        "total_steps": sum(r["steps"] for r in rows),
        "total_hours": sum(r["hours"] for r in known) if total_gpu_hours is not None else None,
        "total_gpu_hours": total_gpu_hours,
        "total_usd": total_gpu_hours * price if total_gpu_hours is not None else None,
        "budget": {"usd": m.budget.usd, "wall_hours": m.budget.wall_hours, "gpu_hours": cap, "binding": binding},
        "jobs": job_plan(m, run_hours, rows),
        "eval": ev,
        "extended_steps": extended,
        "notes": notes,
        "warnings": warnings,
    }


def number(v, spec: str, unknown: str = "-") -> str:
    return unknown if v is None else format(v, spec)


def format_plan(p: dict) -> str:
    lines = [f"plan for {p['name']}: {p['gpus']} GPU(s) ({p['backend']}), ${p['gpu_hour_usd']:g}/GPU-hour", ""]
    head = f"{'stage':<12}{'res':>6}{'batch':>7}{'steps':>9}{'img/s/GPU':>11}{'hours':>8}{'GPU-h':>9}{'USD':>10}"
    lines += [head, "-" * len(head)]
    for r in p["stages"]:
        lines.append(f"{r['stage']:<12}{r['resolution']:>6}{r['global_batch']:>7}{r['steps']:>9}"
                     f"{number(r['est_img_per_s_per_gpu'], '.1f'):>11}{number(r['hours'], '.2f'):>8}"
                     f"{number(r['gpu_hours'], '.1f'):>9}{number(r['usd'], '.2f'):>10}")
    ev = p.get("eval")
    if ev:
        lines.append(f"{'evaluation':<12}{ev['count']:>6}x{ev.get('samples', 0):>6} samples x "
                     f"{ev.get('sampling_steps', 0)} steps{'':>3}{number(ev['hours'], '.2f'):>8}"
                     f"{number(ev.get('gpu_hours'), '.1f'):>9}{number(ev.get('usd'), '.2f'):>10}")
    lines.append("-" * len(head))
    lines.append(f"{'total':<34}{p['total_steps']:>9}{'':>11}{number(p['total_hours'], '.2f'):>8}"
                 f"{number(p['total_gpu_hours'], '.1f'):>9}{number(p['total_usd'], '.2f'):>10}")
    b = p["budget"]
    caps = []
    if b["usd"]:
        caps.append(f"${b['usd']:g}")
    if b["wall_hours"]:
        caps.append(f"{b['wall_hours']:g} h wall clock")
    lines += ["", f"budget: {', '.join(caps) or 'none'}"
              + (f" -> {b['gpu_hours']:.1f} GPU-hours, {b['binding']} binds" if b["gpu_hours"] is not None else "")]
    j = p["jobs"]
    if p["backend"] == "slurm":
        seg = f"{j['segments']} job(s)" if j["segments"] else "jobs"
        lines.append(f"slurm: {seg} of {j['time_limit_min']} min, USR2 {j['signal_lead_s']} s before the limit; "
                     f"checkpoint ~{j['checkpoint_s_est']:g} s every "
                     f"{'/'.join(f'{x:g}' for x in j['checkpoint_every_min']) or '?'} min; requeue limits: "
                     f"{j['max_timeouts']} timeouts, {j['max_preemptions']} preemptions, {j['max_failures']} failures")
    lines += [f"note: {n}" for n in p.get("notes", [])]
    lines += [f"warning: {w}" for w in p["warnings"]]
    return "\n".join(lines)
