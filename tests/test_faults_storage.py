"""Storage faults injected for real, and what was kept: a full disk (a size-limited tmpfs, mounted here as root), the S3
endpoint down (moto behind a TCP proxy that is taken off the network), truncated and foreign checkpoints, and planted
pickles that would run code."""

import os
import pickle
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli, tiny_manifest_dict
from distutil import collect, single, wait_until
from launcher.cli import main as launch_main, prepare_run_dir
from launcher.manifest import load_manifest
from pixeldiff import checkpoint
from pixeldiff.ledger import read_jsonl
from pixeldiff.storage import s3_options
from s3server import TcpProxy, create_bucket


def write(tmp_path, **kw) -> Path:
    d = tiny_manifest_dict(**kw)
    path = tmp_path / f"{d['name']}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def launch(manifest, runs) -> subprocess.CompletedProcess:
    """`pixeldiff-launch run MANIFEST` as a user runs it (a process of its own)."""
    return run_cli("launcher.cli", "run", str(manifest), "--runs-dir", str(runs))


def finite(path, storage_options=None) -> bool:
    parts = checkpoint.load(path, storage_options=storage_options)
    return all(torch.isfinite(t).all() for name in ("model", "ema") for t in parts[name].values())


def events(run_dir, kind) -> list[dict]:
    return [e for e in read_jsonl(Path(run_dir) / "ledger.jsonl") if e["event"] == kind]


# ------------------------------------------------------------------ a full disk


@pytest.fixture(scope="module")
def checkpoint_size(tmp_path_factory) -> int:
    """Bytes of one checkpoint of the tiny manifest (model, EMA, AdamW state and the small files), measured."""
    tmp = tmp_path_factory.mktemp("size")
    assert launch_main(["run", str(write(tmp, steps=(10, 1))), "--runs-dir", str(tmp / "runs")]) == 0
    (saved,) = [e for e in events(tmp / "runs" / "tiny", "checkpoint_saved") if e["step"] == 10]
    return saved["bytes"]


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` bytes (a real file system that fills up); unmounted at the end."""
    mounts = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], check=True)
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", str(where)], check=False)


def remount(where: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def test_a_full_disk_is_refused_before_the_save_and_the_last_checkpoint_resumed(tmp_path, small_disk, checkpoint_size):
    """A disk with room for two checkpoints and a half: the third save would not fit beside the two kept ones
    (pruned only after the new marker). It is refused before a byte is written, naming the path and the space
    needed; the last checkpoint stays valid and is resumed once the disk is larger."""
    disk = small_disk(int(2.5 * checkpoint_size))
    ckpts = disk / "ckpts"
    manifest = write(tmp_path, steps=(40, 5), checkpoint={"dir": str(ckpts), "interval_steps": 10, "keep": 2,
                                                          "async_save": False})
    r = launch(manifest, tmp_path / "runs")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert (f"error: not enough space for the checkpoint of step 30 in {ckpts}: it needs about "
            f"{checkpoint_size / 2**20:.1f} MiB (the size of the last checkpoint)") in r.stderr, r.stderr
    assert "the last checkpoint, step-00000020, is intact" in r.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000010", "step-00000020"]  # nothing of step 30
    assert checkpoint.latest_valid(ckpts).name == "step-00000020" and finite(ckpts / "step-00000020")
    run_dir = tmp_path / "runs" / "tiny"
    end = read_jsonl(run_dir / "ledger.jsonl")[-1]
    assert end["event"] == "segment_end" and end["reason"].startswith("failed: not enough space") and end["step"] == 30

    remount(disk, 4 * checkpoint_size)
    r = launch(manifest, tmp_path / "runs")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from {ckpts / 'step-00000020'} at step 20" in r.stdout
    assert checkpoint.latest_valid(ckpts).name == "step-00000045"


def test_a_disk_that_fills_during_the_first_save_leaves_nothing_marked_complete(tmp_path, small_disk, checkpoint_size):
    """The first save has no earlier checkpoint to size it by: the check counts the state's tensor bytes, which is
    less than DCP writes for this tiny model (about 1.5 KB per tensor on top), so this disk passes the check and
    fills up in the middle of DCP's write: ENOSPC for real. The error names the path and the size; the partial
    write is removed (no marker, no step directory); a larger disk then trains the run from the start."""
    disk = small_disk(int(0.9 * checkpoint_size) // 4096 * 4096)
    ckpts = disk / "ckpts"
    manifest = write(tmp_path, steps=(20, 2), checkpoint={"dir": str(ckpts), "interval_steps": 10, "keep": 2})
    r = launch(manifest, tmp_path / "runs")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    err = r.stderr
    assert f"error: saving the checkpoint of step 10 to {ckpts} failed: writing the model, EMA and optimizer shards" in err
    assert "No space left on device" in err and "the disk is full: the checkpoint needs about" in err, err
    assert "not enough space" not in err  # the check before the save passed: this is the write itself failing
    assert list(ckpts.iterdir()) == []  # the partial .tmp-step-00000010 was removed, nothing is marked complete
    remount(disk, 4 * checkpoint_size)
    r = launch(manifest, tmp_path / "runs")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" not in r.stdout and checkpoint.latest_valid(ckpts).name == "step-00000022"
