"""Checkpoints: named parts in `step-NNNNNNNN/`, valid only with a marker.

A save: one process creates a hidden temporary directory (`begin`), every rank writes its
parts into it (`write_parts`: rank 0 the weights, EMA and optimizer, each rank its train
state), and after a barrier one process fsyncs, renames it to `step-N/` and only then
writes the `COMPLETE` marker (`commit`). A crash at any point leaves
either the previous valid checkpoint or a directory without a marker, which
`latest_valid` ignores (and says so). The newest `keep` valid checkpoints stay.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

MARKER = "COMPLETE"
PARTS = ("model", "ema", "optimizer")  # plus one train_state-rankNNNNN.pt per rank


class CheckpointError(Exception):
    """A checkpoint path that cannot be used; the message says why."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


def list_checkpoints(root: Path) -> tuple[list[Path], list[Path]]:
    """-> (valid, partial) checkpoint directories, each sorted by step."""
    root = Path(root)
    if not root.is_dir():
        return [], []
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of)
    valid = [p for p in dirs if (p / MARKER).exists()]
    partial = [p for p in dirs if not (p / MARKER).exists()]
    return valid, partial


def latest_valid(root: Path, log=print) -> Path | None:
    valid, partial = list_checkpoints(root)
    newest = _step_of(valid[-1]) if valid else -1
    for p in partial:
        if _step_of(p) > newest:
            log(f"ignoring incomplete checkpoint {p} (no {MARKER} marker: the save was interrupted)")
    return valid[-1] if valid else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin(root: Path, step: int) -> Path:
    """Create the empty temporary directory of a save (one process does this; every rank writes into it)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_dir(root, step).name}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a job that died while saving
    tmp.mkdir()
    return tmp


def write_parts(tmp: Path, parts: dict, files: dict[str, str] | None = None) -> None:
    """Write named states (`name.pt`) and text files into a save's temporary directory, fsynced."""
    for name, state in parts.items():
        with open(tmp / f"{name}.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)


def commit(root: Path, step: int, keep: int) -> tuple[Path, int]:
    """After every writer finished: rename the temporary directory to step-N/, then mark it complete."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    _fsync_dir(tmp)
    if final.exists():  # a partial save of the same step from an earlier, interrupted job
        shutil.rmtree(final)
    os.rename(tmp, final)
    with open(final / MARKER, "w") as f:
        f.write(f"step {step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(root)
    nbytes = sum(p.stat().st_size for p in final.iterdir())
    prune(root, keep)
    return final, nbytes


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` valid checkpoints; drop older ones and partial ones older than the newest valid."""
    valid, partial = list_checkpoints(root)
    for p in valid[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    if valid:
        newest = _step_of(valid[-1])
        for p in partial:
            if _step_of(p) < newest:
                shutil.rmtree(p, ignore_errors=True)


def rank_states(path: Path) -> dict[int, dict]:
    """rank -> train state saved by that rank (`train_state-rankNNNNN.pt`; `train_state.pt` is rank 0's)."""
    path = Path(path)
    out = {int(p.stem.rsplit("rank", 1)[1]): torch.load(p, map_location="cpu", weights_only=True)
           for p in path.glob("train_state-rank*.pt")}
    if not out and (path / "train_state.pt").exists():
        out[0] = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    return out


def load(path: Path, names=PARTS, map_location="cpu") -> dict:
    path = Path(path)
    if not (path / MARKER).exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker); pass a run directory or a step-N/ directory that has one")
    return {n: torch.load(path / f"{n}.pt", map_location=map_location, weights_only=True) for n in names}
