"""The run in the tools people already use: TensorBoard and Weights & Biases, as one continuous run across all of
its Slurm jobs.

A run has one tracking id, written to RUN_DIR/tracking.json at its first start and read by every later job (a
requeue, a resubmission, a local resume). A job that resumes from the checkpoint of step S logs from step S+1:
- TensorBoard: the writer opens with `purge_step=S+1`, so the steps a killed job logged after its last checkpoint
  (and which this job trains again) are hidden from the curves, not shown twice;
- W&B: `wandb.init(id=<the run's id>, resume="allow")` continues the same run. W&B keeps a run's steps increasing:
  online, the server's last step comes back at init and records below it are not sent (the killed job's values for
  those steps stay, none is shown twice); offline, each job writes its own directory under RUN_DIR/wandb/ and
  `wandb sync` applies the same rule when it uploads them in order.
  W&B buffers in its service process, so a job killed outright (SIGKILL, a node gone) can lose records it had
  logged, even before its checkpoint. The next job therefore first logs again, from metrics.jsonl and eval.jsonl
  (the record), every step from W&B's last one up to its checkpoint's: online that is the gap W&B lost; offline
  W&B's last step is unknown (0), so every job's directory holds the whole history up to its own steps.

Trackers run on rank 0 only, behind the metrics logger.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

TRACKING_FILE = "tracking.json"
FINISH_WAIT_S = 60.0  # the longest a job's end waits for W&B to finish sending
SKIP = {"step", "time", "stage"}


def run_id(run_dir: Path, name: str) -> str:
    """The run's tracking id: made once (rank 0, at the first start), then read by every later job."""
    path = Path(run_dir) / TRACKING_FILE
    if path.exists():
        return json.loads(path.read_text())["run_id"]
    rid = f"{''.join(c if c.isalnum() or c in '-_' else '-' for c in name)[:40]}-{secrets.token_hex(4)}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"run_id": rid}) + "\n")
    os.replace(tmp, path)
    return rid


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a record, nested dicts flattened with '/': {"crop_waste": {"bucket": 0.1}} ->
    {"crop_waste/bucket": 0.1}."""
    out = {}
    for k, v in record.items():
        if k in SKIP and not prefix:
            continue
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


class TensorBoardTracker:
    """Event files under RUN_DIR/tensorboard/ (`tensorboard --logdir RUN_DIR/tensorboard`)."""

    def __init__(self, run_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step else None)

    def log(self, group: str, step: int, record: dict) -> None:
        for k, v in scalars(record).items():
            self.writer.add_scalar(f"{group}/{k}", v, step, walltime=record.get("time"))
        self.writer.flush()

    def image(self, tag: str, step: int, path: Path) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run for the whole run: the id from tracking.json, resumed by every job. The manifest goes in as the
    run's config (without cluster.env); the API key stays in the environment, where wandb reads it. A tracker that
    fails (no network on the node, the service gone) warns once and stops logging: it never stops the training."""

    def __init__(self, run_dir: Path, m, resume_step: int, log=print):
        import wandb

        from pixeldiff.config import to_dict

        self.say, self.wandb = log, wandb
        cfg = m.logging.wandb
        config = to_dict(m)
        config.get("cluster", {}).pop("env", None)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, id=run_id(run_dir, m.name),
                              name=m.name, resume="allow", dir=str(run_dir), config=config,
                              settings=wandb.Settings(console="off", quiet=True, silent=True, init_timeout=120))
        # silent: wandb's own banner (offline notice, sync hints) would interleave with every rank-0 log; one line
        where = f"offline in {run_dir}/wandb (`wandb sync` it later)" if cfg.mode == "offline" else "online"
        log(f"W&B run {self.run.id} ({cfg.project}), {where}")
        self.first_step = resume_step + 1  # records below this belong to the checkpoint's past
        self.failed = False
        # W&B's next step, read once (asking the service each time costs a round trip, and a slow or gone service
        # would raise outside the guard): online, the resumed run's last step + 1; offline, 0
        self.next_step = int(self.run.step or 0)
        self.backfill(Path(run_dir), resume_step)

    def backfill(self, run_dir: Path, resume_step: int) -> None:
        """Log the recorded steps W&B lacks below this job's first: metrics.jsonl's and eval.jsonl's records from
        W&B's own last step through `resume_step`, each step's last record (a step logged twice, by a killed job
        and again after its resume, was last written by the branch the checkpoint continues)."""
        from pixeldiff.ledger import read_jsonl

        rows: dict[int, dict] = {}
        for name, group in (("metrics.jsonl", "train"), ("eval.jsonl", "eval")):
            latest = {r["step"]: r for r in read_jsonl(run_dir / name) if isinstance(r.get("step"), int)}
            for step, rec in latest.items():
                if self.next_step <= step <= resume_step:
                    rows.setdefault(step, {}).update({f"{group}/{k}": v for k, v in scalars(rec).items()})
        first, self.first_step = self.first_step, 0
        for step in sorted(rows):
            self._send("backfill", step, rows[step])
        self.first_step = first

    def _send(self, what: str, step: int, data: dict) -> None:
        if self.failed or step < max(self.first_step, self.next_step) or not data:
            return
        try:
            self.run.log(data, step=step)
            self.next_step = step  # the same step may take more (an evaluation, the grid); a lower one may not
        except Exception as e:  # the training goes on without W&B
            self.failed = True
            self.say(f"WARNING: W&B logging stopped at step {step} ({what}: {type(e).__name__}: {e}); "
                     f"metrics.jsonl keeps the record")

    def log(self, group: str, step: int, record: dict) -> None:
        self._send(group, step, {f"{group}/{k}": v for k, v in scalars(record).items()})

    def image(self, tag: str, step: int, path: Path) -> None:
        self._send(tag, step, {tag: self.wandb.Image(str(path))})

    def close(self, wait_s: float = FINISH_WAIT_S) -> None:
        """Finish the run, waiting at most `wait_s`: the job's end (its final checkpoint is already written) must
        not wait on a slow network; what W&B has not sent stays in RUN_DIR/wandb/ for `wandb sync`."""
        import threading

        def finish():
            try:
                self.run.finish()
            except Exception as e:
                self.say(f"WARNING: W&B run did not finish cleanly ({type(e).__name__}: {e})")

        t = threading.Thread(target=finish, name="wandb-finish", daemon=True)
        t.start()
        t.join(wait_s)
        if t.is_alive():
            self.say(f"WARNING: W&B did not finish within {wait_s:.0f} s; the job ends without waiting (its files "
                     f"are in RUN_DIR/wandb/: `wandb sync` sends the rest)")


def preflight(m) -> None:
    """`plan` and `run`, before anything starts: the wandb package is there, and an online run has a key to use.
    Raises ConfigError naming the fix."""
    from pixeldiff.config import ConfigError

    cfg = m.logging.wandb
    if cfg is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("logging.wandb: the wandb package is not installed; pip install wandb (or remove "
                          "logging.wandb)") from None
    if cfg.mode == "online" and not os.environ.get("WANDB_API_KEY") and not _netrc_has_wandb():
        raise ConfigError("logging.wandb.mode: online needs a W&B API key: export WANDB_API_KEY in the environment "
                          "the jobs inherit (never in the manifest), or run `wandb login`; or set mode: offline and "
                          "`wandb sync RUN_DIR/wandb/offline-run-*` later")


def _netrc_has_wandb() -> bool:
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def trackers(run_dir: Path, m, resume_step: int, log=print) -> list:
    """Rank 0's trackers for this manifest's `logging.tensorboard` and `logging.wandb`."""
    out = []
    lg = m.logging
    if lg.tensorboard:
        out.append(TensorBoardTracker(run_dir, resume_step))
    if lg.wandb is not None:
        try:
            out.append(WandbTracker(run_dir, m, resume_step, log))
        except Exception as e:  # e.g. an online run on a node without internet: train without W&B
            log(f"WARNING: W&B did not start ({type(e).__name__}: {e}); training goes on without it, metrics.jsonl "
                f"keeps the record (logging.wandb.mode: offline writes RUN_DIR/wandb/ for `wandb sync` later)")
    return out
