"""Checkpoints: the save protocol on local disk and on S3 (moto), asynchronous saves, resume equivalence, and a kill
in the middle of a save."""

import os
import random
import signal
import uuid

import pytest
import torch

from distutil import collect, single, spawn_ranks, wait_until
from launcher.cli import main as launch_main, prepare_run_dir
from launcher.manifest import load_manifest
from pixeldiff import checkpoint
from pixeldiff.ledger import read_jsonl
from pixeldiff.storage import s3_options
from s3server import create_bucket, list_keys


def new_bucket(endpoint: str) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:10]}"
    create_bucket(endpoint, name)
    return name


def tiny_state(value: float) -> dict:
    return {"model": {"w": torch.full((5, 3), value), "b": torch.arange(4.0) + value},
            "ema": {"w": torch.full((5, 3), -value)}}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_save_protocol_keeps_the_newest_and_ignores_a_partial_save(tmp_path, s3_endpoint, where):
    if where == "s3":
        root, so = f"s3://{new_bucket(s3_endpoint)}/run/checkpoints", s3_options(s3_endpoint, None, False)
    else:
        root, so = tmp_path / "checkpoints", None
    saver = checkpoint.Saver(root, keep=2, rank=0, storage_options=so)
    records = []
    for step, background in [(1, True), (2, True), (3, False), (4, True)]:
        state = tiny_state(float(step))
        records += saver.save(step, state, {"train_state-rank00000.pt": checkpoint.torch_bytes({"step": step})}, background)
        state["model"]["w"].add_(100)  # training goes on at once: a background save wrote a copy
    records += saver.wait()
    saver.close()
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["async"] for r in records] == [True, True, False, True]
    for r in records:
        assert r["bytes"] > 0 and 0 <= r["seconds_blocked"] <= r["seconds_write"]
    valid, partial = checkpoint.list_checkpoints(root, so)
    assert [checkpoint._name(p) for p in valid] == ["step-00000003", "step-00000004"] and partial == []  # keep 2
    newest = valid[-1]
    parts = checkpoint.load(newest, names=("model", "ema"), storage_options=so)
    assert torch.equal(parts["model"]["w"], torch.full((5, 3), 4.0)) and torch.equal(parts["ema"]["w"], torch.full((5, 3), -4.0))
    assert checkpoint.rank_states(newest, so) == {0: {"step": 4}}

    # a save that died after its shards were written and (locally) renamed, before its marker
    dest = checkpoint.begin(root, 9, so)
    checkpoint.write_files(dest, {"train_state-rank00000.pt": checkpoint.torch_bytes({"step": 9})}, so)
    checkpoint.write_state(dest, tiny_state(9.0), storage_options=so)
    if where == "local":
        os.rename(dest, checkpoint.step_dir(root, 9))
    said = []
    assert checkpoint.latest_valid(root, said.append, so) == newest
    assert len(said) == 1 and "ignoring incomplete checkpoint" in said[0] and "step-00000009" in said[0]
    with pytest.raises(checkpoint.CheckpointError, match="no COMPLETE marker"):
        checkpoint.load(checkpoint.step_dir(root, 9), storage_options=so)
    # the same step saved again by a later job replaces the partial one; the older checkpoints are pruned
    saver = checkpoint.Saver(root, keep=2, rank=0, storage_options=so)
    saver.save(9, tiny_state(9.5), {}, background=False)
    valid, partial = checkpoint.list_checkpoints(root, so)
    assert [checkpoint._name(p) for p in valid] == ["step-00000004", "step-00000009"] and partial == []
    assert torch.equal(checkpoint.load(valid[-1], ("model",), so)["model"]["b"], torch.arange(4.0) + 9.5)
    if where == "s3":  # the step directory holds the DCP shards, the metadata, the train state and the marker
        keys = list_keys(s3_endpoint, root.split("/")[2], "run/checkpoints/step-00000009/")
        names = {k.rsplit("/", 1)[1] for k in keys}
        assert {".metadata", "COMPLETE", "__0_0.distcp"} <= names and "train_state-rank00000.pt" not in names


def same_state(a, b) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for name, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][name][k]), f"optimizer state {name}.{k} differs"


def stop_with_sigterm_after(run_dir, step: int, env=None) -> dict:
    proc = single(run_dir, **(env or {}))
    wait_until(lambda: (read_jsonl(run_dir / "metrics.jsonl") or [{}])[-1].get("step", 0) >= step, [proc],
               what=f"step {step}")
    proc.send_signal(signal.SIGTERM)
    out = collect(proc)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in out, out
    end = read_jsonl(run_dir / "ledger.jsonl")[-1]
    assert end["event"] == "segment_end" and end["reason"] == "signal SIGTERM", out
    return end


def test_interrupted_twice_to_s3_with_async_saves_equals_one_straight_run(write_manifest, tmp_path, s3_endpoint):
    """SIGTERM at two random steps, checkpoints in the background to S3; vs one uninterrupted run saving
    synchronously to local disk: the same losses and bit-identical weights, EMA and optimizer state."""
    bucket = new_bucket(s3_endpoint)
    s3 = {"endpoint_url": s3_endpoint}
    cut_m = write_manifest(name="cut", steps=(30, 6), data={"s3": s3},
                           checkpoint={"dir": f"s3://{bucket}/cut", "interval_steps": 7, "async_save": True})
    whole_m = write_manifest(name="whole", steps=(30, 6), data={"s3": s3},
                             checkpoint={"interval_steps": 7, "async_save": False})
    run_dir, _ = prepare_run_dir(load_manifest(cut_m), tmp_path / "runs")
    first, second = sorted(random.sample(range(5, 29), 2))
    end1 = stop_with_sigterm_after(run_dir, first)
    end2 = stop_with_sigterm_after(run_dir, min(max(second, end1["step"] + 2), 32))
    proc = single(run_dir)
    out = collect(proc)
    assert proc.returncode == 0, out
    assert f"resumed from s3://{bucket}/cut/step-{end2['step']:08d}" in out, (first, second, out)
    assert launch_main(["run", str(whole_m), "--runs-dir", str(tmp_path / "runs")]) == 0

    so = s3_options(s3_endpoint, None, False)
    cut = checkpoint.load(checkpoint.latest_valid(f"s3://{bucket}/cut", storage_options=so), storage_options=so)
    whole = checkpoint.load(checkpoint.latest_valid(tmp_path / "runs" / "whole" / "checkpoints"))
    same_state(cut, whole)
    losses = lambda name: {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "runs" / name / "metrics.jsonl")}  # noqa: E731
    assert losses("cut") == losses("whole") and len(losses("cut")) == 36
    saves = [e for e in read_jsonl(run_dir / "ledger.jsonl") if e["event"] == "checkpoint_saved"]
    assert {e["step"] for e in saves} >= {7, 14, end1["step"], end2["step"], 36}
    for e in saves:  # interval saves ran in the background; the stop and end saves were complete before exit
        assert e["async"] == (e["step"] % 7 == 0), e
        assert e["checkpoint"].startswith(f"s3://{bucket}/cut/step-") and e["bytes"] > 0
        # both from the save's start, rounded to ms: a complete save blocks for its whole write (and a moment more)
        assert 0 <= e["seconds_blocked"] <= e["seconds_write"] + (0 if e["async"] else 0.002), e
    assert len(checkpoint.list_checkpoints(f"s3://{bucket}/cut", so)[0]) == 2  # checkpoint.keep


def test_a_kill_during_a_save_resumes_from_the_previous_valid_checkpoint(write_manifest, tmp_path):
    """2 FSDP ranks; the save of step 20 is held before its marker (a test hook), then every process is SIGKILLed.
    The next start ignores step 20 and resumes from step 10."""
    stages = [{"name": "16px", "resolution": 16, "global_batch": 8, "micro_batch": 4, "steps": 40},
              {"name": "32px", "resolution": 32, "global_batch": 8, "micro_batch": 4, "steps": 5}]
    manifest = write_manifest(name="killed", stages=stages, cluster={"parallel": "fsdp"})
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "runs")
    ckpts = run_dir / "checkpoints"
    procs = spawn_ranks(run_dir, 2, **{checkpoint.HOLD_COMMIT_ENV: "20"})
    held = checkpoint.step_dir(ckpts, 20)
    wait_until(lambda: held.is_dir() and (held / ".metadata").exists(), procs, what="the held save of step 20")
    assert not (held / checkpoint.MARKER).exists()
    for p in procs:  # the whole job dies at once (a node failure, scancel --signal=KILL)
        p.kill()
    for p in procs:
        collect(p)
    again = spawn_ranks(run_dir, 2)
    out, out1 = collect(again[0], timeout=240), collect(again[1], timeout=60)
    assert again[0].returncode == 0 and again[1].returncode == 0, out + out1
    assert "ignoring incomplete checkpoint" in out and "step-00000020" in out
    assert f"resumed from {checkpoint.step_dir(ckpts, 10)} at step 10" in out
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows][-35:] == list(range(11, 46))
    assert checkpoint.latest_valid(ckpts).name == "step-00000045"
