"""Shards through a real S3 protocol endpoint (moto's server on 127.0.0.1), including an outage."""

import itertools
import threading
import time

from pixeldiff.config import DataConfig, S3Config, TextConfig
from pixeldiff.shards import ShardSource
from s3server import TcpProxy, create_bucket, s3_client
from shardutil import write_shards


def upload(endpoint: str, bucket: str, root) -> None:
    create_bucket(endpoint, bucket)
    client = s3_client(endpoint)
    for p in sorted(root.glob("*.tar")):
        client.upload_file(str(p), bucket, f"shards/{p.name}")


def s3_source(endpoint, pattern, workers=0, **kw) -> ShardSource:
    cfg = DataConfig(source="webdataset", shards=pattern, workers=workers, s3=S3Config(endpoint_url=endpoint), **kw)
    return ShardSource(cfg, TextConfig())


def keys_of(src, n, micro=4):
    it = src.batches(16, micro)
    out = [k for b in itertools.islice(it, n) for k in b["key"]]
    it.close()
    return out


def test_s3_reads_the_same_samples_in_the_same_order_as_local(s3_endpoint, tmp_path):
    keys = write_shards(tmp_path, n_shards=4, per_shard=6)
    upload(s3_endpoint, "same-order", tmp_path)
    local = ShardSource(DataConfig(source="webdataset", shards=str(tmp_path / "train-{000..003}.tar"), workers=2), TextConfig())
    remote = s3_source(s3_endpoint, "s3://same-order/shards/train-{000..003}.tar", workers=2)
    got = keys_of(remote, 6)
    assert sorted(got) == sorted(keys)
    assert got == keys_of(local, 6)
    # a list file on S3 names the shards too
    s3_client(s3_endpoint).put_object(Bucket="same-order", Key="list.txt",
                                      Body="\n".join(f"s3://same-order/shards/train-{i:03d}.tar" for i in range(4)).encode())
    assert keys_of(s3_source(s3_endpoint, "s3://same-order/list.txt", workers=2), 6) == got


def test_s3_outage_mid_epoch_is_retried_and_nothing_is_lost(s3_endpoint, tmp_path):
    """Take the S3 endpoint off the network in the middle of an epoch, bring it back: every sample once."""
    keys = write_shards(tmp_path, n_shards=6, per_shard=4)
    upload(s3_endpoint, "outage", tmp_path)
    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1])).up()
    # shuffle windows of one shard, so the outage falls on shards not read yet
    src = s3_source(proxy.url, "s3://outage/shards/train-{000..005}.tar", retries=6, retry_backoff_s=0.3, shuffle_buffer=4)
    it = src.batches(16, 2)
    got = [k for b in itertools.islice(it, 3) for k in b["key"]]  # 6 samples: mid-epoch
    proxy.down()
    timer = threading.Timer(2.0, proxy.up)
    timer.start()
    t0 = time.monotonic()
    try:
        got += [k for b in itertools.islice(it, 9) for k in b["key"]]  # the other 18
    finally:
        it.close()
        timer.join()
        proxy.down()
    assert time.monotonic() - t0 >= 1.0, "the outage was not seen"
    assert sorted(got) == sorted(keys)
    assert src.bad_samples() == {}


def test_training_streams_from_s3(s3_endpoint, tmp_path, write_manifest):
    """A run whose manifest names s3:// shards and an endpoint; credentials only in the environment."""
    from launcher.cli import main as launch_main
    from pixeldiff.ledger import read_jsonl

    write_shards(tmp_path / "shards", n_shards=4, per_shard=8)
    upload(s3_endpoint, "train-s3", tmp_path / "shards")
    data = {"source": "webdataset", "shards": "s3://train-s3/shards/train-{000..003}.tar", "workers": 2,
            "s3": {"endpoint_url": s3_endpoint}, "text": {"max_tokens": 8, "dim": 16}}
    manifest = write_manifest(name="s3run", steps=(6, 2), data=data)
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path / "runs")]) == 0
    run_dir = tmp_path / "runs" / "s3run"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows[-1]["step"] == 8 and rows[-1]["bad_samples"] == {}
    written = "".join(p.read_text(errors="ignore") for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".jsonl"))
    assert "testing" not in written  # the dummy credentials never reach the run directory
