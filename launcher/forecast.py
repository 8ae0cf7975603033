"""The forecast: what is left of each stage, at what speed, how long and how much it will cost, and whether a cap
comes first.

The recent step rate (pixeldiff/billing.py stage_rates: the last records of the stage in the
latest segment that trained it) prices the rest of the current stage; later stages use their own
measured rate if they ran before, else the plan's `est_img_per_s_per_gpu`. Restarts and start-up
of future segments are not forecast.
"""

from __future__ import annotations

from pixeldiff import billing
from pixeldiff.config import StageConfig


def replanned(plan: dict, events: list[dict]) -> dict:
    """The plan with the stage steps of the latest `schedule_change` (budget.policy finish_stages), if any."""
    changes = [e for e in events if e["event"] == "schedule_change"]
    if not changes:
        return plan
    ends, starts = changes[-1]["ends"], [0, *changes[-1]["ends"][:-1]]
    stages = [{**r, "steps": end - start} for r, start, end in zip(plan["stages"], starts, ends)]
    return {**plan, "stages": stages, "total_steps": ends[-1]}


def stage_bounds(plan: dict) -> list[tuple[str, int, int]]:
    """(name, first step, end step) per stage."""
    out, at = [], 0
    for r in plan["stages"]:
        out.append((r["stage"], at, at + int(r["steps"])))
        at += int(r["steps"])
    return out


def stage_rates(metrics_by_seg: list[list[dict]], plan: dict, gpus: int) -> dict[str, dict]:
    """Per stage of the plan: steps/s, img/s and where they came from (measured | plan | None)."""
    stages = [StageConfig(r["stage"], r.get("resolution", 0), r["global_batch"],
                          est_img_per_s_per_gpu=r.get("est_img_per_s_per_gpu")) for r in plan["stages"]]
    return {st.name: {"steps_per_s": r.steps_per_s, "img_per_s": r.img_per_s, "rate_source": r.source}
            for st, r in zip(stages, billing.stage_rates(metrics_by_seg, stages, gpus))}


def forecast(step: int, plan: dict, rates: dict, gpus: int, price: float, billed: float, now: float,
             gpu_seconds_cap: float | None, wall_end: float | None) -> dict:
    """Time, GPU-hours and dollars to finish every stage from `step`, and whether a cap comes first."""
    stages, t, known = [], 0.0, True
    for name, first, end in stage_bounds(plan):
        left = max(0, end - max(step, first))
        rate = rates[name]["steps_per_s"]
        secs = left / rate if left and rate else (0.0 if not left else None)
        if secs is None:
            known = False
        else:
            t += secs
        stages.append({"stage": name, "steps_left": left, "seconds": secs, "eta_s": t if secs is not None and known else None})
    seconds = t if known else None
    gpu_s = seconds * gpus if seconds is not None else None
    out = {"steps_left": sum(s["steps_left"] for s in stages), "seconds": seconds,
           "gpu_hours": gpu_s / 3600 if gpu_s is not None else None,
           "usd": gpu_s / 3600 * price if gpu_s is not None else None,
           "total_gpu_hours": (billed + gpu_s) / 3600 if gpu_s is not None else None,
           "total_usd": (billed + gpu_s) / 3600 * price if gpu_s is not None else None,
           "finish_time": now + seconds if seconds is not None else None, "stages": stages,
           "cap_hit_first": None, "cap": None, "cap_fraction": None}
    if seconds is not None and gpu_seconds_cap:
        out["cap_fraction"] = (billed + gpu_s) / gpu_seconds_cap  # < 0.8: the schedule ends far inside the budget
    if seconds is not None:
        hits = []
        if gpu_seconds_cap is not None and billed + gpu_s > gpu_seconds_cap:
            hits.append(("dollars", (gpu_seconds_cap - billed) / gpus))
        if wall_end is not None and now + seconds > wall_end:
            hits.append(("wall clock", wall_end - now))
        out["cap_hit_first"] = bool(hits)
        if hits:
            out["cap"], left_s = min(hits, key=lambda h: h[1])
            out["seconds_to_cap"] = max(0.0, left_s)
    return out
