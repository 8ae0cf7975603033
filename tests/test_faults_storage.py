"""Storage faults injected for real, and what was kept: a full disk (a size-limited tmpfs, mounted here as root), the S3
endpoint down (moto behind a TCP proxy that is taken off the network), truncated and foreign checkpoints, and planted
pickles that would run code."""

import pickle
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



def test_two_ranks_stop_together_when_the_disk_fills_during_a_save(tmp_path, small_disk, checkpoint_size):
    """2 DDP ranks, each writing its share of the first checkpoint to a disk too small for it: the write fails
    (ENOSPC) on one rank or both, the ranks agree on it, and both exit 1 with the message at once (neither waits in a
    collective for the other), even when one rank's save ends seconds after the other's; on a larger disk both
    resume the run."""
    from distutil import spawn_ranks

    disk = small_disk(int(0.9 * checkpoint_size) // 4096 * 4096)
    ckpts = disk / "ckpts"
    manifest = write(tmp_path, steps=(20, 2), checkpoint={"dir": str(ckpts), "interval_steps": 10, "keep": 2})
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "runs")
    procs = spawn_ranks(run_dir, 2, **{checkpoint.LATE_SAVE_END_ENV: "1:3"})
    outs = [collect(p, timeout=240) for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 1 and "Traceback" not in out, out
        assert f"saving the checkpoint of step 10 to {ckpts} failed" in out and "the disk is full" in out, out
    assert list(ckpts.iterdir()) == []
    remount(disk, 4 * checkpoint_size)
    procs = spawn_ranks(run_dir, 2)
    outs = [collect(p, timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert checkpoint.latest_valid(ckpts).name == "step-00000022" and finite(ckpts / "step-00000022")


# ------------------------------------------------------------------ damaged and foreign checkpoints


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_newest_checkpoint_is_marked_damaged_and_the_one_before_resumed(tmp_path):
    """Storage lost half of the newest checkpoint's shard file after its marker: the restore sees it (the metadata
    says how long each file must be), warns, marks it DAMAGED and resumes the one before; the steps since are trained
    again, to the same weights. When no checkpoint is whole, the run is refused (exit 2), never started afresh."""
    manifest = write(tmp_path, steps=(20, 5), checkpoint={"interval_steps": 10, "keep": 2})
    r = launch(manifest, tmp_path / "runs")
    assert r.returncode == 0, r.stdout + r.stderr
    ckpts = tmp_path / "runs" / "tiny" / "checkpoints"
    newest = ckpts / "step-00000025"
    before = checkpoint.load(newest, names=("model",))["model"]
    truncate(newest / "__0_0.distcp")

    r = launch(manifest, tmp_path / "runs")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"WARNING: checkpoint {newest} is damaged (__0_0.distcp is truncated (" in r.stdout, r.stdout
    assert f"resumed from {ckpts / 'step-00000020'} at step 20" in r.stdout
    (damaged,) = events(tmp_path / "runs" / "tiny", "checkpoint_damaged")
    assert damaged["checkpoint"] == str(newest) and "truncated" in damaged["problem"]
    assert [row["step"] for row in read_jsonl(tmp_path / "runs" / "tiny" / "metrics.jsonl")][-5:] == [21, 22, 23, 24, 25]
    after = checkpoint.load(checkpoint.latest_valid(ckpts), names=("model",))["model"]
    assert checkpoint.latest_valid(ckpts) == newest and all(torch.equal(before[k], after[k]) for k in before)

    truncate(ckpts / "step-00000020" / "__0_0.distcp")
    (newest / ".metadata").write_bytes(b"\x80\x04garbage")
    r = launch(manifest, tmp_path / "runs")
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert f"no checkpoint in {ckpts} can be resumed: step-00000025: .metadata cannot be read" in r.stderr, r.stderr
    assert "step-00000020: __0_0.distcp is truncated" in r.stderr and "move" in r.stderr


FOREIGN = {
    "model size": ({"model": {"preset": "test", "width": 48, "heads": 2}}, "model.width 32, this manifest has 48"),
    "text dim": ({"data": {"text": {"max_tokens": 8, "dim": 24}}}, "data.text.dim 16, this manifest has 24"),
    "stages": ({"stages": [{"name": "16px", "resolution": 16, "global_batch": 8, "steps": 30},
                           {"name": "64px", "resolution": 64, "global_batch": 8, "micro_batch": 4, "steps": 10}]},
               "stages[1].name '32px', this manifest has '64px'; stages[1].resolution 32, this manifest has 64"),
    "model size, no manifest.yaml in it": ({"model": {"preset": "test", "depth": 3}},
                                           "does not fit this model: model.blocks.2."),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_checkpoint_written_for_another_model_or_manifest_is_refused_naming_the_difference(tmp_path, case):
    """Run b's checkpoint.dir is run a's: a's checkpoints were written for another network, text encoder or stage
    list. `run` refuses with exit 2 and names the field (or, without a manifest.yaml in the checkpoint, the tensor);
    a's checkpoints are left as they were."""
    change, message = FOREIGN[case]
    assert launch_main(["run", str(write(tmp_path, name="a", steps=(10, 1))), "--runs-dir", str(tmp_path / "runs")]) == 0
    theirs = tmp_path / "runs" / "a" / "checkpoints"
    if "no manifest.yaml" in case:
        for p in theirs.glob("step-*/manifest.yaml"):
            p.unlink()
    r = launch(write(tmp_path, name="b", checkpoint={"dir": str(theirs)}, **change), tmp_path / "runs")
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert f"checkpoint step-00000011 (in {theirs})" in r.stderr and message in r.stderr, r.stderr
    assert "resume it with the manifest it was written for" in r.stderr
    assert [p.name for p in checkpoint.list_checkpoints(theirs)[0]] == ["step-00000010", "step-00000011"]
    assert not list(theirs.glob("*/DAMAGED"))


def test_what_may_change_between_jobs_of_a_run_still_resumes(tmp_path):
    """Budget, logging, checkpoint cadence, the learning rate and loss weights, the cluster (and so the number of
    ranks) are not what a checkpoint was written for: a checkpoint of run a resumes under a manifest that changes
    them (run b pointing at a's checkpoints, as a forked run would)."""
    assert launch_main(["run", str(write(tmp_path, name="a", steps=(10, 1))), "--runs-dir", str(tmp_path / "runs")]) == 0
    theirs = tmp_path / "runs" / "a" / "checkpoints"
    b = write(tmp_path, name="b", steps=(20, 1), checkpoint={"dir": str(theirs), "interval_steps": 7, "keep": 3},
              optimizer={"lr": 5e-4, "warmup_steps": 2, "grad_clip": 0.5, "ema_decay": 0.99},
              logging={"metrics_interval": 2}, budget={"usd": 5.0}, seed=3,
              cluster={"backend": "local", "device": "cpu", "parallel": "fsdp"})
    r = launch(b, tmp_path / "runs")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from {theirs / 'step-00000011'} at step 11" in r.stdout


# ------------------------------------------------------------------ pickles that would run code


class RunsCode:
    """Unpickled, it writes a file: what a tampered checkpoint or weights file would do."""

    def __init__(self, witness: Path):
        self.witness = str(witness)

    def __reduce__(self):
        return exec, (f"open({self.witness!r}, 'w').write('the pickle ran')",)


@pytest.mark.parametrize("planted", [".metadata", "train_state-rank00000.pt"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path, planted):
    manifest = write(tmp_path, steps=(10, 1))
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path / "runs")]) == 0
    newest = tmp_path / "runs" / "tiny" / "checkpoints" / "step-00000011"
    witness = tmp_path / "witness"
    if planted == ".metadata":
        (newest / planted).write_bytes(pickle.dumps(RunsCode(witness)))
    else:
        torch.save({"step": 11, "stage": 1, "data": RunsCode(witness)}, newest / planted)
    r = launch(manifest, tmp_path / "runs")
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert f"checkpoint {newest}: {newest / planted}" in r.stderr, r.stderr
    assert "builtins.exec" in r.stderr and "loading it could run code, so it is refused" in r.stderr
    assert not witness.exists()
    # the one-process reader (pixeldiff-sample) refuses it too
    with pytest.raises(checkpoint.CheckpointError, match="could run code"):
        (checkpoint.load(newest) if planted == ".metadata" else checkpoint.rank_states(newest))
    assert not witness.exists()


def test_a_planted_pickle_among_the_non_tensor_items_is_refused_and_never_runs(tmp_path):
    """DCP writes non-tensor items (the optimizer's param_groups) with torch.save and reads them back with
    weights_only=False; ours read them with weights_only=True."""
    witness = tmp_path / "witness"
    saver = checkpoint.Saver(tmp_path / "ckpts", keep=2, rank=0)
    state = {"model": {"w": torch.ones(3)}, "optimizer": {"param_groups": [{"lr": RunsCode(witness), "params": ["w"]}]}}
    saver.save(1, state, {"train_state-rank00000.pt": checkpoint.torch_bytes({"step": 1})}, background=False)
    path = checkpoint.latest_valid(tmp_path / "ckpts")
    for read in (lambda: checkpoint.load(path),
                 lambda: checkpoint.load_into(path, {"model": {"w": torch.zeros(3)},
                                                     "optimizer": {"param_groups": [{"lr": 0.0, "params": ["w"]}]}})):
        with pytest.raises(checkpoint.CheckpointError, match=r"optimizer\.param_groups\.0\.lr holds a pickled object "
                                                             r"that is not plain data \(builtins\.exec\)"):
            read()
        assert not witness.exists()
    assert torch.equal(checkpoint.load(path, names=("model",))["model"]["w"], torch.ones(3))  # tensors still load


def test_a_planted_pickle_as_perceptual_weights_is_refused_and_never_runs(tmp_path):
    witness = tmp_path / "witness"
    weights = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": RunsCode(witness)}, weights)
    manifest = write(tmp_path, steps=(2, 1), losses={"lpips": {"weight": 0.1, "weights": str(weights)}})
    r = launch(manifest, tmp_path / "runs")
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert f"losses.lpips.weights: {weights} holds a pickled object that is not plain data (builtins.exec)" in r.stderr
    assert not witness.exists()


# ------------------------------------------------------------------ the S3 endpoint down


@pytest.fixture
def s3_behind_proxy(s3_endpoint):
    """(a new bucket, a TCP proxy in front of moto: `down()` takes S3 off the network, `up()` brings it back)."""
    bucket = f"faults-{uuid.uuid4().hex[:10]}"
    create_bucket(s3_endpoint, bucket)
    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1])).up()
    yield bucket, proxy
    proxy.down()


# botocore's own retries off: the retries seen are the checkpoint's (checkpoint.retries), and the test is quick
NO_BOTO_RETRIES = {"AWS_MAX_ATTEMPTS": "1"}


def s3_run(tmp_path, bucket, proxy, retries: int):
    manifest = write(tmp_path, steps=(80, 5), data={"s3": {"endpoint_url": proxy.url}},
                     checkpoint={"dir": f"s3://{bucket}/ck", "interval_steps": 10, "keep": 2, "retries": retries,
                                 "retry_backoff_s": 0.5})
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "runs")
    return run_dir


def saved_steps(run_dir) -> list[int]:
    return [e["step"] for e in events(run_dir, "checkpoint_saved")]


def test_s3_down_for_longer_than_the_retries_fails_the_save_cleanly_and_the_last_checkpoint_resumes(tmp_path, s3_behind_proxy):
    bucket, proxy = s3_behind_proxy
    run_dir = s3_run(tmp_path, bucket, proxy, retries=2)
    proc = single(run_dir, **NO_BOTO_RETRIES)
    wait_until(lambda: 10 in saved_steps(run_dir), [proc], what="the checkpoint of step 10")
    proxy.down()
    out = collect(proc, timeout=180)
    assert proc.returncode == 1 and "Traceback" not in out, out
    last = max(saved_steps(run_dir))
    failed = last + 10
    assert f"saving the checkpoint of step {failed} to s3://{bucket}/ck failed (attempt 1 of 3)" in out, out
    assert "retrying in 0.5 s" in out and "retrying in 1 s" in out
    assert f"error: saving the checkpoint of step {failed} to s3://{bucket}/ck failed after 3 attempts: " in out
    assert "the previous checkpoint is intact and is the one a new start resumes from" in out
    end = read_jsonl(run_dir / "ledger.jsonl")[-1]
    assert end["event"] == "segment_end" and end["reason"].startswith("failed: saving the checkpoint")

    proxy.up()
    so = s3_options(proxy.url, None, False)
    newest = checkpoint.latest_valid(f"s3://{bucket}/ck", storage_options=so)
    assert newest == f"s3://{bucket}/ck/step-{last:08d}" and finite(newest, so)
    proc = single(run_dir, **NO_BOTO_RETRIES)
    out = collect(proc, timeout=240)
    assert proc.returncode == 0, out
    assert f"resumed from s3://{bucket}/ck/step-{last:08d} at step {last}" in out
    assert checkpoint.latest_valid(f"s3://{bucket}/ck", storage_options=so).endswith("step-00000085")


def test_a_short_s3_outage_during_a_save_is_retried_and_the_save_completes(tmp_path, s3_behind_proxy):
    """S3 goes away after the first checkpoint and comes back once the next save has failed once: the retry writes
    it, the run finishes, and every checkpoint it kept is whole."""
    bucket, proxy = s3_behind_proxy
    run_dir = s3_run(tmp_path, bucket, proxy, retries=6)
    proc = single(run_dir, **NO_BOTO_RETRIES)
    wait_until(lambda: 10 in saved_steps(run_dir), [proc], what="the checkpoint of step 10")
    proxy.down()
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "retrying in" in line and len([x for x in lines if "retrying in" in x]) == 1:
                proxy.up()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.wait(timeout=300)
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 0, out
    retried = [e for e in events(run_dir, "checkpoint_saved") if e.get("attempts", 1) > 1]
    assert len(retried) == 1 and retried[0]["step"] > 10, out
    assert f"saving the checkpoint of step {retried[0]['step']} to s3://{bucket}/ck failed (attempt 1 of 7)" in out
    so = s3_options(proxy.url, None, False)
    valid, partial = checkpoint.list_checkpoints(f"s3://{bucket}/ck", so)
    assert [v.rsplit("-", 1)[1] for v in valid] == ["00000080", "00000085"] and partial == []
    assert all(finite(v, so) for v in valid)


# ------------------------------------------------------------------ S3 down while reading shards


def upload_shards(tmp_path, bucket: str, endpoint: str, n_shards=6, per_shard=8) -> str:
    from s3server import s3_client
    from shardutil import write_shards

    root = tmp_path / "shards"
    write_shards(root, n_shards=n_shards, per_shard=per_shard)
    client = s3_client(endpoint)
    for p in sorted(root.glob("*.tar")):
        client.upload_file(str(p), bucket, f"shards/{p.name}")
    return f"s3://{bucket}/shards/train-{{000..{n_shards - 1:03d}}}.tar"


def test_s3_down_for_longer_than_the_retries_while_reading_shards_stops_the_run_clearly(tmp_path, s3_behind_proxy,
                                                                                       s3_endpoint):
    """The shards' endpoint goes away mid-run and stays away: after data.retries per shard the run stops with exit 1
    and a message naming the endpoint setting, without saving (the last checkpoint stays the one resumed)."""
    bucket, proxy = s3_behind_proxy
    pattern = upload_shards(tmp_path, bucket, s3_endpoint)
    manifest = write(tmp_path, steps=(200, 5), checkpoint={"interval_steps": 5, "keep": 2},
                     data={"source": "webdataset", "shards": pattern, "workers": 0, "retries": 1,
                           "retry_backoff_s": 0.1, "s3": {"endpoint_url": proxy.url}})
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "runs")
    proc = single(run_dir, **NO_BOTO_RETRIES)
    wait_until(lambda: 5 in saved_steps(run_dir), [proc], what="the checkpoint of step 5")
    proxy.down()
    out = collect(proc, timeout=180)
    assert proc.returncode == 1 and "Traceback" not in out, out
    assert "error: the data cannot feed the run: " in out and "could not be read after data.retries" in out, out
    assert "read_error" in out and "data.s3.endpoint_url" in out
    end = read_jsonl(run_dir / "ledger.jsonl")[-1]
    assert end["event"] == "segment_end" and end["reason"].startswith("failed: data stream 0")
    newest = checkpoint.latest_valid(run_dir / "checkpoints")  # (a background save may have finished unreported)
    assert max(saved_steps(run_dir)) <= int(newest.name[5:]) <= end["step"] and finite(newest)


def test_a_long_s3_outage_skips_no_more_than_max_bad_fraction_of_the_shards(tmp_path, s3_behind_proxy, s3_endpoint,
                                                                            monkeypatch, capfd):
    """The stream fails only after a whole pass over its shard list without one good sample; the shards it gave up on
    before that pass (the rest of the epoch) are skipped data, and must stay within data.max_bad_fraction."""
    from pixeldiff.config import DataConfig, S3Config, TextConfig
    from pixeldiff.shards import DataError, ShardSource

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    bucket, proxy = s3_behind_proxy
    n = 6
    pattern = upload_shards(tmp_path, bucket, s3_endpoint, n_shards=n, per_shard=4)
    cfg = DataConfig(source="webdataset", shards=pattern, workers=0, retries=1, retry_backoff_s=0.1, shuffle_buffer=4,
                     s3=S3Config(endpoint_url=proxy.url))
    it = ShardSource(cfg, TextConfig()).batches(16, 2)
    for _ in range(3):
        next(it)
    proxy.down()
    with pytest.raises(DataError, match="could not be read after data.retries .* more than data.max_bad_fraction"):
        for _ in it:
            pass
    gave_up = capfd.readouterr().err.count("giving up on ")
    assert 1 <= gave_up <= 1 + cfg.max_bad_fraction * n, f"{gave_up} of {n} shards given up on before the stream failed"
