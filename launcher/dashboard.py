"""Drawing a run summary (launcher.summary.summary) for a terminal: the `watch` dashboard and `status` text.

`build(summary, width, height)` makes one rich renderable that never exceeds `width` x `height`:
every line is cut to the width (no wrapping), and the jobs and events lists shrink to the
height. `render(summary, width, height)` is the same frame as plain text (for snapshots and
for `status` without colours). `plain_line(summary)` is the one-line form for pipes and logs.
"""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.text import Text

SPARK = "▁▂▃▄▅▆▇█"
STATE_STYLE = {"running": "bold green", "queued": "bold yellow", "finished": "bold cyan", "failed": "bold red",
               "over_budget": "bold magenta", "cancelled": "bold yellow"}


# ------------------------------------------------------------------ small formatters


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def money(v: float | None) -> str:
    if v is None:
        return "-"
    return f"${v:,.2f}" if v < 1000 else f"${v:,.0f}"


def num(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def bar(fraction: float, width: int) -> Text:
    fraction = min(max(fraction or 0.0, 0.0), 1.0)
    full = int(round(fraction * width))
    return Text("█" * full, style="green") + Text("░" * (width - full), style="grey37")


def sparkline(values: list[float], width: int) -> str:
    vals = [v for v in values if v is not None][-width:]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in vals)


def clock(t: float | None) -> str:
    return "-" if t is None else time.strftime("%m-%d %H:%M:%S", time.gmtime(t))


def _line(*parts, style: str | None = None) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis", style=style or "")
    for p in parts:  # one line, whatever the text holds
        if isinstance(p, Text):
            t.append(p if "\n" not in p.plain else Text(p.plain.replace("\n", " "), style=p.style))
        else:
            t.append(str(p).replace("\n", " "))
    return t


# ------------------------------------------------------------------ sections (lists of one-line Texts)


def header(s: dict) -> list[Text]:
    c = s["cluster"]
    where = (f"{c['backend']} {c['nodes']}x{c['gpus'] // max(1, c['nodes'])} GPU" if c["backend"] == "slurm"
             else f"local {c['gpus']} GPU") + (f" ({c['partition']})" if c.get("partition") else "")
    return [_line(Text(s["name"], style="bold"), "  ", Text(s["state"].upper(), style=STATE_STYLE.get(s["state"], "")),
                  f"  {where}  {clock(s['now'])}Z"),
            _line(f"{s['manifest']} — {s['state_reason']}", style="dim")]


UNDER_BUDGET = 0.8  # a forecast below this fraction of the cap says the schedule ends far inside the budget


def budget(s: dict, width: int) -> list[Text]:
    cap, spent = s["usd_cap"], s["usd_spent"]
    gh, gh_cap = s["gpu_hours"], s["gpu_hours_cap"]
    frac = (gh / gh_cap) if gh_cap else 0.0
    bw = max(10, min(40, width - 58))
    cap_text = f"{money(spent)} / {money(cap)}" if cap else f"{money(spent)} (no $ cap)"
    gh_text = f"{gh:.2f} / {gh_cap:.1f} GPU-h" if gh_cap else f"{gh:.2f} GPU-h"
    fc = s["forecast"]
    if s["state"] in ("finished",):
        fc_text = "done"
    elif s["state"] in ("failed", "over_budget", "cancelled"):
        more = f" (~{money(fc['usd'])} more to finish)" if fc["usd"] is not None and s["gpu_hour_usd"] else ""
        fc_text = f"stopped with {fc['steps_left']} steps left{more}"
    elif fc["total_usd"] is None:
        fc_text = "forecast: unknown rate"
    else:
        fc_text = f"forecast {money(fc['total_usd'])}" if s["gpu_hour_usd"] else f"forecast {fc['total_gpu_hours']:.2f} GPU-h"
        if fc["cap_hit_first"]:
            fc_text += f" — {fc['cap']} cap hits first (in {duration(fc.get('seconds_to_cap'))})"
        elif fc["seconds"] is not None:
            fc_text += f" in {duration(fc['seconds'])}"
            if (fc.get("cap_fraction") or 1.0) < UNDER_BUDGET:
                fc_text += f", {fc['cap_fraction']:.0%} of the cap"
    wall = f"wall {s['wall_hours_left']:.1f}h left" if s["wall_hours_left"] is not None else "no wall cap"
    off = s["ledger_vs_sacct_pct"]
    recon = f"  |  ledger {off:+.1f}% vs sacct" if off is not None else ""
    return [_line("budget ", bar(frac, bw), f" {frac * 100:5.1f}%  {cap_text}  {gh_text}"),
            _line(f"       {fc_text}  |  {wall}{recon}")]


def stages(s: dict, width: int) -> list[Text]:
    name_w = max(len(st["stage"]) for st in s["stages"])
    step_w = max(len(str(st["steps"])) for st in s["stages"])
    bw = max(8, min(40, width - name_w - 52))
    out = []
    for i, st in enumerate(s["stages"]):
        cur = i == s["stage_index"] and s["state"] not in ("finished",)
        mark = "▶" if cur else ("✓" if st["done"] else " ")
        rate = f"{st['steps_per_s']:.2f} st/s" if st["steps_per_s"] else "- st/s"
        img = f"{st['img_per_s']:.0f} img/s" if st["img_per_s"] else "- img/s"
        eta = "done" if st["done"] else ("stopped" if s["state"] in ("failed", "over_budget", "cancelled")
                                          else f"ETA {duration(st['eta_s'])}")
        est = "~" if st["rate_source"] == "plan" else ""
        out.append(_line(f"{mark}{st['stage']:<{name_w}} ", bar(st["fraction"], bw),
                         f" {st['step']:>{step_w}}/{st['steps']:<{step_w}} {est}{rate} {est}{img} {eta}"))
    return out


def losses(s: dict, width: int) -> list[Text]:
    lt = s["latest"]
    if lt["step"] is None:
        return [_line("loss: no metrics yet", style="dim")]
    spark = sparkline(s["loss_history"], max(8, min(60, width - 40)))
    parts = " ".join(f"{k[5:]} {v:.4g}" for k, v in lt["losses"].items() if k.startswith("loss_"))
    speed = (f"  MFU {lt['mfu'] * 100:.1f}%" if lt.get("mfu") is not None else "") + (
        f"  {lt['tflops_per_gpu']:.3g} TFLOP/s/GPU" if lt.get("tflops_per_gpu") is not None else "")
    return [_line(f"loss {lt['losses'].get('loss', float('nan')):.4f} ", Text(spark, style="cyan"),
                  f"  at step {lt['step']}"),
            _line(f"     {parts}  lr {num(lt['lr'], '.3g')}  grad norm {num(lt['grad_norm'], '.3g')}{speed}")]


def evaluation(s: dict, width: int) -> list[Text]:
    """The newest evaluation (eval.jsonl) with a sparkline per metric over the run's evaluations; nothing when the
    run has none."""
    ev = s.get("eval") or {}
    last = ev.get("latest")
    if not last:
        return []
    spark_w = max(4, min(16, (width - 30) // max(1, len(ev["history"])) - 12))
    parts = [f"{k} {last[k]:.4g} {sparkline([v for _, v in ev['history'][k]], spark_w)}" for k in ev["history"]
             if isinstance(last.get(k), (int, float))]
    return [_line(f"eval  step {last['step']} ({last.get('stage')}): ", "  ".join(parts))]


def goodput(s: dict) -> list[Text]:
    b = s["goodput_breakdown"]
    names = [("startup", "start-up"), ("checkpoint", "ckpt"), ("evaluation", "eval"), ("sampling", "sampling"), ("lost", "lost"),
             ("idle", "idle"), ("other", "other")]
    rest = "  ".join(f"{label} {b[k] * 100:.1f}%" for k, label in names if abs(b[k]) >= 0.0005)
    return [_line(Text(f"goodput {s['goodput'] * 100:.1f}%", style="bold"), f"  {rest}")]


def jobs(s: dict, rows: int, width: int) -> list[Text]:
    if not s["jobs"] or rows < 2:
        return []
    out = [_line(f"{'job':<14}{'state':<12}{'nodes':>5}{'elapsed':>9}{'left':>9}{'requeues':>9}  last end", style="bold")]
    for j in s["jobs"][-(rows - 1):]:
        out.append(_line(f"{j['job_id']:<14.14}{j['state']:<12.12}{num(j['nodes'], 'd') if j['nodes'] is not None else '-':>5}"
                         f"{duration(j['elapsed_s']):>9}{duration(j['time_left_s']):>9}{j['requeues']:>9}  "
                         f"{j['last_end_reason'] or '-'}"))
    return out


def events(s: dict, rows: int) -> list[Text]:
    if rows < 1:
        return []
    return [_line(f"{clock(e['time'])[6:]} {e['text']}", style="red" if "fail" in e["text"] else "")
            for e in s["recent_events"][-rows:]]


def frame_lines(s: dict, width: int, height: int) -> list[Text]:
    """All lines of one frame, at most `height`: the fixed sections first, then jobs and events share the rest."""
    notices = [_line(f"! {n}", style="bold yellow") for n in s["notices"]]
    sample = [_line(f"sample: {s['newest_sample'] or '(none yet)'}", style="dim")]
    fixed = header(s) + budget(s, width) + stages(s, width) + losses(s, width) + evaluation(s, width) + goodput(s)
    room = height - len(fixed) - len(notices) - len(sample)
    job_rows = min(len(s["jobs"]) + 1, max(0, room // 3 + (1 if room >= 6 else 0))) if s["jobs"] else 0
    job_lines = jobs(s, job_rows, width)
    ev_lines = events(s, room - len(job_lines))
    lines = fixed + job_lines + ev_lines + sample + notices
    if len(lines) > height:  # a very small terminal: the notice and the top matter most
        lines = lines[: max(0, height - len(notices))] + notices
        lines = lines[-height:] if len(lines) > height else lines
    return lines


def build(s: dict, width: int, height: int):
    return Group(*frame_lines(s, width, height))


def render(s: dict, width: int = 80, height: int = 24, color: bool = False) -> str:
    """One frame as text (ANSI colours only with `color`)."""
    console = Console(record=True, width=width, height=height, file=open("/dev/null", "w"), color_system="truecolor"
                      if color else None, force_terminal=color, legacy_windows=False)
    console.print(build(s, width, height))
    out = console.export_text(styles=color)
    console.file.close()
    return out


def plain_line(s: dict) -> str:
    """One line per refresh for pipes and logs."""
    st = s["stages"][s["stage_index"]]
    pct = 100 * s["step"] / s["total_steps"] if s["total_steps"] else 0.0
    cap = f"/{money(s['usd_cap'])}" if s["usd_cap"] else ""
    eta = s["forecast"]["seconds"]
    notice = f" | {s['notices'][0]}" if s["notices"] else ""
    return (f"{clock(s['now'])} {s['name']} {s['state']} stage {st['stage']} step {s['step']}/{s['total_steps']} "
            f"({pct:.1f}%) {money(s['usd_spent'])}{cap} {s['gpu_hours']:.2f} GPU-h goodput {s['goodput'] * 100:.1f}% "
            f"ETA {duration(eta) if s['state'] not in ('finished',) else 'done'}{notice}")
