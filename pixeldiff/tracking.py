"""The run in the tools people already use: TensorBoard (W&B: not yet), as one continuous run across all of its
Slurm jobs.

A run has one tracking id, written to RUN_DIR/tracking.json at its first start and read by every later job (a
requeue, a resubmission, a local resume). A job that resumes from the checkpoint of step S logs from step S+1:
- TensorBoard: the writer opens with `purge_step=S+1`, so the steps a killed job logged after its last checkpoint
  (and which this job trains again) are hidden from the curves, not shown twice;
  the id is for trackers that name runs (W&B's resume by id).

Trackers run on rank 0 only, behind the metrics logger.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path

TRACKING_FILE = "tracking.json"
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


def trackers(run_dir: Path, m, resume_step: int) -> list:
    """Rank 0's trackers for this manifest's `logging.tensorboard`."""
    out = []
    lg = m.logging
    if lg.tensorboard:
        out.append(TensorBoardTracker(run_dir, resume_step))
    return out
