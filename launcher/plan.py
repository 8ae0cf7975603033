"""The plan: what a manifest implies in steps, hours, GPU-hours and dollars.

A first version: stage by stage from the manifest's throughput estimates. The
budget-aware segment planner (job segments, checkpoint interval, signal lead
time) comes with the Slurm launcher.
"""

from __future__ import annotations

from pixeldiff.config import Manifest
from pixeldiff.schedule import budget_gpu_hours, stage_steps


def make_plan(m: Manifest) -> dict:
    gpus = m.world_size
    price = m.budget.gpu_hour_usd
    rows = []
    for s, steps in zip(m.stages, stage_steps(m)):
        images = steps * s.global_batch
        hours = images / (s.est_img_per_s_per_gpu * gpus) / 3600 if s.est_img_per_s_per_gpu else None
        gpu_hours = hours * gpus if hours is not None else None
        rows.append({
            "stage": s.name, "resolution": s.resolution, "global_batch": s.global_batch, "steps": steps,
            "images": images, "est_img_per_s_per_gpu": s.est_img_per_s_per_gpu, "hours": hours,
            "gpu_hours": gpu_hours, "usd": gpu_hours * price if gpu_hours is not None else None,
        })
    known = [r for r in rows if r["hours"] is not None]
    total_gpu_hours = sum(r["gpu_hours"] for r in known) if len(known) == len(rows) else None
    cap = budget_gpu_hours(m)
    warnings = []
    if total_gpu_hours is not None and cap is not None and total_gpu_hours > cap * (1 + 1e-9):
        warnings.append(f"the stages need {total_gpu_hours:.1f} GPU-hours but the budget allows {cap:.1f}: "
                        f"the run will stop before the last stage ends")
    if len(known) < len(rows):
        warnings.append("no throughput estimate (stages[].est_img_per_s_per_gpu) for some stages: hours and cost unknown")
    binding = None
    if m.budget.wall_hours and m.budget.usd and price:
        binding = "dollars" if m.budget.usd / price < m.budget.wall_hours * gpus else "wall clock"
    elif m.budget.wall_hours:
        binding = "wall clock"
    elif m.budget.usd and price:
        binding = "dollars"
    return {
        "name": m.name, "backend": m.cluster.backend, "gpus": gpus, "gpu_hour_usd": price, "stages": rows,
        "total_steps": sum(r["steps"] for r in rows),
        "total_hours": sum(r["hours"] for r in known) if total_gpu_hours is not None else None,
        "total_gpu_hours": total_gpu_hours,
        "total_usd": total_gpu_hours * price if total_gpu_hours is not None else None,
        "budget": {"usd": m.budget.usd, "wall_hours": m.budget.wall_hours, "gpu_hours": cap, "binding": binding},
        "warnings": warnings,
    }


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_plan(p: dict) -> str:
    lines = [f"plan for {p['name']}: {p['gpus']} GPU(s) ({p['backend']}), ${p['gpu_hour_usd']:g}/GPU-hour", ""]
    head = f"{'stage':<12}{'res':>6}{'batch':>7}{'steps':>9}{'img/s/GPU':>11}{'hours':>8}{'GPU-h':>9}{'USD':>10}"
    lines += [head, "-" * len(head)]
    for r in p["stages"]:
        lines.append(f"{r['stage']:<12}{r['resolution']:>6}{r['global_batch']:>7}{r['steps']:>9}"
                     f"{_fmt(r['est_img_per_s_per_gpu'], '.1f'):>11}{_fmt(r['hours'], '.2f'):>8}"
                     f"{_fmt(r['gpu_hours'], '.1f'):>9}{_fmt(r['usd'], '.2f'):>10}")
    lines.append("-" * len(head))
    lines.append(f"{'total':<34}{p['total_steps']:>9}{'':>11}{_fmt(p['total_hours'], '.2f'):>8}"
                 f"{_fmt(p['total_gpu_hours'], '.1f'):>9}{_fmt(p['total_usd'], '.2f'):>10}")
    b = p["budget"]
    caps = []
    if b["usd"]:
        caps.append(f"${b['usd']:g}")
    if b["wall_hours"]:
        caps.append(f"{b['wall_hours']:g} h wall clock")
    lines += ["", f"budget: {', '.join(caps) or 'none'}"
              + (f" -> {b['gpu_hours']:.1f} GPU-hours, {b['binding']} binds" if b["gpu_hours"] is not None else "")]
    lines += [f"warning: {w}" for w in p["warnings"]]
    return "\n".join(lines)
