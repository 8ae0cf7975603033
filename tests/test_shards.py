"""The shard pipeline with real tar files: order, resume, and every kind of bad data."""

import itertools
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

from pixeldiff.config import DataConfig, TextConfig
from pixeldiff.shardlist import DataError, expand_braces, shard_list
from pixeldiff.shardread import Bad, ReadOptions, read_shard
from pixeldiff.shards import Position, ShardSource, epoch_order, relayout, stream_shards
from conftest import REPO
from shardutil import image_bytes, sample_members, write_shards, write_tar


def source(shards, workers=0, world=1, rank=0, text=None, **kw) -> ShardSource:
    cfg = DataConfig(source="webdataset", shards=shards, workers=workers, prefetch=2, retries=1, retry_backoff_s=0.01, **kw)
    return ShardSource(cfg, text or TextConfig(), rank=rank, world=world)


def take_keys(src: ShardSource, n_batches: int, res=16, micro=4) -> list[str]:
    it = src.batches(res, micro)
    keys = [k for b in itertools.islice(it, n_batches) for k in b["key"]]
    it.close()
    return keys


def test_brace_patterns_and_list_files(tmp_path):
    assert expand_braces("s3://b/train-{000..002}.tar") == [f"s3://b/train-00{i}.tar" for i in range(3)]
    assert expand_braces("a{1..2}-{08..10}.tar") == ["a1-08.tar", "a1-09.tar", "a1-10.tar", "a2-08.tar", "a2-09.tar", "a2-10.tar"]
    listing = tmp_path / "shards.txt"
    listing.write_text("# comment\n/x/a.tar\n/x/b-{0..1}.tar\n\n")
    assert shard_list(str(listing)) == ["/x/a.tar", "/x/b-0.tar", "/x/b-1.tar"]
    assert shard_list(["/y/{1..2}.tar", "/z.tar"]) == ["/y/1.tar", "/y/2.tar", "/z.tar"]
    assert expand_braces("x{3..1}.tar") == ["x3.tar", "x2.tar", "x1.tar"]  # braceexpand: a range may descend
    with pytest.raises(DataError, match="unbalanced braces"):
        expand_braces("x{1..3.tar")


def test_streams_partition_each_epoch_and_epochs_differ():
    n, streams = 23, 4
    for epoch in range(3):
        parts = [stream_shards(n, 7, epoch, s, streams) for s in range(streams)]
        assert sorted(i for p in parts for i in p) == list(range(n))
    assert epoch_order(n, 7, 0) != epoch_order(n, 7, 1)
    assert epoch_order(n, 7, 0) == epoch_order(n, 7, 0)


def test_reads_every_sample_once_per_epoch_resized_and_deterministic(tmp_path):
    keys = write_shards(tmp_path, n_shards=4, per_shard=6)
    pattern = str(tmp_path / "train-{000..003}.tar")
    src = source(pattern, workers=2)
    it = src.batches(16, 4)
    batch = next(it)
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.uint8
    assert batch["caption"][0].startswith("sample s")
    got = batch["key"] + [k for b in itertools.islice(it, 5) for k in b["key"]]
    it.close()
    assert sorted(got) == sorted(keys)  # 24 samples = one epoch, each exactly once
    assert got == take_keys(source(pattern, workers=2), 6)  # same manifest, same order


def test_resume_continues_exactly_with_same_layout(tmp_path):
    write_shards(tmp_path, n_shards=4, per_shard=5)
    pattern = str(tmp_path / "train-{000..003}.tar")
    whole = take_keys(source(pattern, workers=2), 12)  # 48 samples: into the third epoch
    first = source(pattern, workers=2)
    head = take_keys(first, 5)
    state = first.state_dict()
    second = source(pattern, workers=2)
    second.load_state_dict(state)
    tail = take_keys(second, 7)
    assert head + tail == whole


def test_resume_with_a_different_layout_skips_nothing(tmp_path):
    keys = write_shards(tmp_path, n_shards=6, per_shard=4)
    pattern = str(tmp_path / "train-{000..005}.tar")
    first = source(pattern, workers=2, shuffle_buffer=0)
    head = take_keys(first, 3, micro=2)  # 6 samples, in the middle of a shard per stream
    state = first.state_dict()
    second = source(pattern, workers=3, shuffle_buffer=0)  # 3 streams instead of 2
    second.load_state_dict(state)
    # the epoch's remaining shards, dealt to 3 streams from the start of each shard
    left = [i for p in second.positions.values() for i in p.remaining]
    assert len(left) <= 6 and len(set(left)) == len(left)
    epoch0 = (24 - len(head)) + 2 * 4  # worst case: the rest plus one partial shard per old stream
    tail = take_keys(second, (epoch0 + 1) // 2 + 6, micro=2)
    seen = set(head) | set(tail)
    assert seen == set(keys), "a sample of the epoch was skipped"
    replayed = {k for k in tail[: 4 * len(left)] if k in head}
    assert len(replayed) <= 2 * 3  # only the partly read shards of the 2 old streams are read again


def test_relayout_drops_finished_shards():
    old = {0: Position(0, 2, 1).as_list(), 1: Position(1, 0, 0).as_list()}  # stream 1 finished epoch 0
    new = relayout(old, 2, 3, 10, seed=0)
    left = sorted(i for p in new.values() for i in p.remaining)
    s0 = stream_shards(10, 0, 0, 0, 2)
    expected = sorted(set(s0[2:]))  # stream 0 still owes its shards from index 2 (incl. the partial one)
    assert left == expected and all(p.epoch == 0 for p in new.values())


def test_bad_data_is_skipped_counted_and_logged_once(tmp_path, capfd):
    good = write_shards(tmp_path, n_shards=1, per_shard=4, prefix="good")
    members = []
    members += sample_members("ok1", 1)
    members += [("corrupt.jpg", b"\xff\xd8 not a jpeg"), ("corrupt.txt", b"x")]
    members += [("corrupt2.jpg", b"garbage"), ("corrupt2.txt", b"x")]
    members += [("nocap.jpg", image_bytes(2))]
    members += [("notimg.txt", b"just text"), ("notimg.json", b"{}")]
    members += [("bomb.png", image_bytes(3, size=(400, 300), fmt="PNG")), ("bomb.txt", b"big")]
    members += sample_members("ok2", 4, ext="png")
    write_tar(tmp_path / "mixed.tar", members)
    write_tar(tmp_path / "empty.tar", [])
    trunc = write_tar(tmp_path / "trunc.tar", sample_members("t1", 5) + sample_members("t2", 6) + sample_members("t3", 7))
    trunc.write_bytes(trunc.read_bytes()[:2000])
    shards = [str(tmp_path / n) for n in ("good-000.tar", "mixed.tar")]
    src = source(shards, workers=0, max_pixels=100_000, max_bad_fraction=1.0, shuffle_buffer=0)
    keys = take_keys(src, 3, micro=2)  # the 6 good samples: exactly one epoch
    assert src.bad_samples() == {"corrupt_image": 2, "missing_caption": 1, "not_image": 1, "too_large": 1}
    assert set(keys) == set(good) | {"ok1", "ok2"}
    err = capfd.readouterr().err
    assert err.count("corrupt_image") == 1 and "mixed.tar" in err  # logged once per shard and kind

    # whole-shard problems: one Bad record each, and the good samples before a cut are kept
    opt = ReadOptions(resolution=16)
    def kinds(name):
        return [x.kind if isinstance(x, Bad) else x["key"] for x in read_shard(str(tmp_path / name), opt, 0, None, 0, print)]
    assert kinds("empty.tar") == ["empty_shard"]
    assert kinds("missing.tar") == ["shard_missing"]
    assert kinds("trunc.tar") == ["truncated_tar"]  # the cut falls inside t1's caption: nothing whole survives
    whole = write_tar(tmp_path / "whole.tar", sample_members("w1", 1) + sample_members("w2", 2) + sample_members("w3", 3))
    with tarfile.open(whole) as tar:
        cut_at = tar.getmember("w3.jpg").offset_data + 10
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[:cut_at])  # cut inside w3's image
    assert kinds("cut.tar") == ["w1", "w2", "truncated_tar"]


def test_too_many_bad_samples_fail_with_a_clear_error(tmp_path):
    members = []
    for i in range(120):
        members += [(f"k{i}.jpg", b"broken"), (f"k{i}.txt", b"x")] if i % 2 else sample_members(f"k{i}", i)
    write_tar(tmp_path / "half.tar", members)
    src = source([str(tmp_path / "half.tar")], workers=0, max_bad_fraction=0.2)
    with pytest.raises(DataError, match=r"samples were bad .*max_bad_fraction 0.2"):
        take_keys(src, 100, micro=2)


def test_small_images_upscaled_or_skipped(tmp_path):
    members = []
    for i in range(6):  # alternately 40x32 (small for 64 px) and 100x80
        size = (40, 32) if i % 2 else (100, 80)
        members += [(f"k{i}.jpg", image_bytes(i, size=size)), (f"k{i}.txt", b"c")]
    write_tar(tmp_path / "sizes.tar", members)
    pat = [str(tmp_path / "sizes.tar")]
    up = source(pat, shuffle_buffer=0)
    b = next(up.batches(64, 6))
    assert b["image"].shape == (6, 3, 64, 64) and up.bad_samples() == {}
    skip = source(pat, small_images="skip", max_bad_fraction=1.0, shuffle_buffer=0)
    b = next(skip.batches(64, 3))
    assert b["key"] == ["k0", "k2", "k4"] and skip.bad_samples() == {"too_small": 2}  # k1, k3 (k5 not read yet)


def test_precomputed_embeddings_padded_and_masked(tmp_path):
    members = []
    for i in range(4):
        members += sample_members(f"e{i}", i, emb=np.full((3 + i, 8), i, np.float16))
    members += sample_members("noemb", 9)  # no emb.npy: a bad sample when embeddings are required
    write_tar(tmp_path / "emb.tar", members)
    src = source([str(tmp_path / "emb.tar")], text=TextConfig(encoder="precomputed", max_tokens=5, dim=8), max_bad_fraction=1.0,
                 shuffle_buffer=0)
    b = next(src.batches(16, 4))
    assert b["emb"].shape == (4, 5, 8) and b["mask"].dtype == torch.bool
    assert b["mask"].sum(1).tolist() == [3, 4, 5, 5]
    assert torch.all(b["emb"][1, :4] == 1) and torch.all(b["emb"][1, 4] == 0)


def test_training_counts_bad_samples_in_metrics_and_fails_past_the_limit(write_manifest, tmp_path, capsys):
    from launcher.cli import main as launch_main
    from pixeldiff.ledger import read_jsonl

    members = []
    for i in range(40):  # every 4th sample has a corrupt image
        members += [(f"k{i:02d}.jpg", b"broken"), (f"k{i:02d}.txt", b"x")] if i % 4 == 3 else sample_members(f"k{i:02d}", i)
    write_tar(tmp_path / "mixed.tar", members)
    data = {"source": "webdataset", "shards": [str(tmp_path / "mixed.tar")], "workers": 0, "max_bad_fraction": 0.5,
            "text": {"max_tokens": 8, "dim": 16}}
    manifest = write_manifest(name="badrun", steps=(30, 1), data=data)
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path / "runs")]) == 0
    rows = read_jsonl(tmp_path / "runs" / "badrun" / "metrics.jsonl")
    counts = [r["bad_samples"].get("corrupt_image", 0) for r in rows]
    assert counts == sorted(counts) and counts[-1] >= 60  # cumulative: 31 steps x 8 samples, a quarter bad
    assert set(rows[-1]["bad_samples"]) == {"corrupt_image"}

    capsys.readouterr()
    strict = write_manifest(name="strict", steps=(30, 1), data={**data, "max_bad_fraction": 0.1})
    assert launch_main(["run", str(strict), "--runs-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "samples were bad" in err and "max_bad_fraction 0.1" in err
    end = read_jsonl(tmp_path / "runs" / "strict" / "ledger.jsonl")[-1]
    assert end["event"] == "segment_end" and end["reason"].startswith("failed")


def test_a_stream_with_no_readable_sample_fails_cleanly_from_a_worker(tmp_path):
    write_tar(tmp_path / "bad.tar", [(f"k{i}.jpg", b"broken") for i in range(5)])
    src = source([str(tmp_path / "bad.tar")], workers=1, max_bad_fraction=1.0)
    with pytest.raises(DataError) as e:
        next(src.batches(16, 2))
    msg = str(e.value)
    assert msg.startswith("data stream 0: not one readable sample in 1 shard(s)") and "bad.tar" in msg
    assert "Traceback" not in msg and "\n" not in msg


def test_shuffle_windows_mix_shards_and_resume_exactly(tmp_path):
    keys = write_shards(tmp_path, n_shards=4, per_shard=4)
    pattern = str(tmp_path / "train-{000..003}.tar")
    plain = take_keys(source(pattern, workers=2, shuffle_buffer=0), 4)  # 2 streams x 8 keys: one epoch
    mixed = take_keys(source(pattern, workers=2, shuffle_buffer=7), 4)  # windows of 7 keys cross shard ends
    assert sorted(mixed) == sorted(plain) == sorted(keys) and mixed != plain  # one epoch, each sample once
    batches = [mixed[i:i + 4] for i in range(0, 16, 4)]
    assert any(len({k[:4] for k in b}) > 1 for b in batches)  # a micro-batch holds samples of several shards
    assert mixed == take_keys(source(pattern, workers=2, shuffle_buffer=7), 4)  # seeded: the same every time
    whole = take_keys(source(pattern, workers=2, shuffle_buffer=7), 12)  # three epochs
    assert whole[16:32] != whole[:16]  # each epoch its own order
    for cut in (1, 3, 4, 7):  # stop inside windows, at an epoch's end, across epochs
        first = source(pattern, workers=2, shuffle_buffer=7)
        head = take_keys(first, cut)
        second = source(pattern, workers=2, shuffle_buffer=7)
        second.load_state_dict(first.state_dict())
        assert head + take_keys(second, 12 - cut) == whole, f"resume after {cut} batches"


def test_shuffled_two_ranks_resumed_on_one_see_every_sample_of_the_epoch(tmp_path):
    keys = write_shards(tmp_path, n_shards=8, per_shard=6)
    pattern = str(tmp_path / "train-{000..007}.tar")
    ranks = [source(pattern, workers=2, world=2, rank=r, shuffle_buffer=5) for r in range(2)]
    head = [k for src in ranks for k in take_keys(src, 3, micro=2)]  # 12 of the epoch's 48, mid-window
    states = [src.state_dict() for src in ranks]
    one = source(pattern, workers=2, world=1, rank=0, shuffle_buffer=5)
    one.load_state_dict(states[0], every_rank=states)
    left = [i for p in one.positions.values() for i in p.remaining]
    tail = take_keys(one, 6 * len(left) // 2, micro=2)  # the rest of the epoch: the remaining shards, whole
    assert set(head) | set(tail) == set(keys), "a sample of the epoch was skipped"
    assert len(tail) == len(set(tail))  # within the resumed epoch, once each
    assert len(set(head) & set(tail)) <= 4 * 2 * 6  # replays only from the 4 old streams' current windows' shards


# ------------------------------------------------------------------ aspect-ratio buckets

ASPECT_SIZES = [(80, 40), (48, 48), (40, 80), (64, 48), (48, 64), (60, 40), (36, 72)]  # (w, h) of the stored images


def write_aspect_shards(root, n_shards, per_shard, sizes=ASPECT_SIZES):
    """Shards of images of mixed aspects; -> {key: (w, h)}."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key, size = f"s{s:03d}_{i:03d}", sizes[(s * per_shard + i) % len(sizes)]
            out[key] = size
            members += [(f"{key}.jpg", image_bytes(s * per_shard + i, size=size)), (f"{key}.txt", f"sample {key}".encode())]
        write_tar(root / f"train-{s:03d}.tar", members)
    return out


def expected_bucket(w, h, sizes):
    import math
    return min(sizes, key=lambda b: abs(math.log(w / h) - math.log(b[1] / b[0])))


def test_bucket_sizes_at_the_stage_area_multiples_of_the_patch():
    from pixeldiff.buckets import bucket_sizes

    b512 = bucket_sizes(512, 32)
    assert b512[0] == (704, 352) and b512[-1] == (352, 704) and (512, 512) in b512 and len(b512) == 11  # 1:2 .. 2:1
    for res, patch, aspect in ((512, 32, 2.0), (1024, 32, 2.0), (64, 8, 2.0), (512, 16, 3.0)):
        sizes = bucket_sizes(res, patch, aspect)
        assert len(set(sizes)) == len(sizes) and (res, res) in sizes
        assert sizes == tuple(sorted(sizes, key=lambda s: s[1] / s[0]))
        for h, w in sizes:
            assert h % patch == 0 and w % patch == 0 and (w, h) in sizes
            assert 0.9 * res * res <= h * w <= res * res and max(h, w) / min(h, w) <= aspect


def test_aspect_buckets_one_bucket_per_batch_every_sample_once_and_crop_stats(tmp_path):
    from pixeldiff.buckets import bucket_sizes, kept_fraction

    sizes = write_aspect_shards(tmp_path, n_shards=4, per_shard=7)
    pattern = str(tmp_path / "train-{000..003}.tar")
    buckets = bucket_sizes(32, 8)
    assert buckets == ((40, 24), (32, 32), (24, 40))
    src = source(pattern, workers=2, shuffle_buffer=5, buckets="aspect")
    src.patch = 8
    it = src.batches(32, 3)
    batches = list(itertools.islice(it, 12))
    it.close()
    seen = []
    for b in batches:
        shape = tuple(b["image"].shape[-2:])
        assert shape in buckets and b["image"].shape[0] == 3
        for k in b["key"]:  # each image went to the bucket nearest its aspect
            assert expected_bucket(*sizes[k], buckets) == shape, (k, sizes[k], shape)
        seen += b["key"]
    assert len({tuple(b["image"].shape[-2:]) for b in batches}) == 3  # all three buckets were used
    epoch = len(sizes)
    assert len(seen) == 36 and len(set(seen[: epoch - 3 * 2 * 3])) == epoch - 18  # no key twice in an epoch's start
    stats = src.stats()
    assert sum(stats["buckets"].values()) == 36 and set(stats["buckets"]) == {"40x24", "32x32", "24x40"}
    counts = {}
    for k in seen:
        h, w = expected_bucket(*sizes[k], buckets)
        counts[f"{h}x{w}"] = counts.get(f"{h}x{w}", 0) + 1
    assert stats["buckets"] == counts
    # the waste of square cropping avoided, measured on these mixed aspects (1:2 to 2:1)
    bucket_waste = sum(1 - kept_fraction(*sizes[k], *expected_bucket(*sizes[k], buckets)[::-1]) for k in seen) / 36
    square_waste = sum(1 - min(sizes[k]) ** 2 / (sizes[k][0] * sizes[k][1]) for k in seen) / 36
    assert stats["crop_waste"] == {"bucket": round(bucket_waste, 4), "square": round(square_waste, 4)}
    assert stats["crop_waste"]["bucket"] < 0.5 * stats["crop_waste"]["square"]
    print(f"crop waste on mixed aspects: square {square_waste:.1%}, buckets {bucket_waste:.1%}")

    square = source(pattern, workers=2, shuffle_buffer=5)  # today's behaviour: all square, one bucket
    b = next(square.batches(32, 3))
    assert b["image"].shape == (3, 3, 32, 32)
    assert take_keys(source(pattern, workers=2, shuffle_buffer=5, buckets="aspect"), 4, res=32, micro=3) != \
        take_keys(source(pattern, workers=2, shuffle_buffer=5), 4, res=32, micro=3)


def bucket_source(pattern, **kw):
    src = source(pattern, buckets="aspect", **kw)
    src.patch = 8
    return src


def test_aspect_buckets_resume_exactly(tmp_path):
    write_aspect_shards(tmp_path, n_shards=4, per_shard=7)
    pattern = str(tmp_path / "train-{000..003}.tar")
    whole_src = bucket_source(pattern, workers=2, shuffle_buffer=5)
    it = whole_src.batches(32, 3)
    whole = [(b["key"], tuple(b["image"].shape)) for b in itertools.islice(it, 24)]  # about 2.5 epochs
    it.close()
    assert bucket_source(pattern, workers=2, shuffle_buffer=5) is not None
    pendings = 0
    for cut in (1, 4, 9, 13):
        first = bucket_source(pattern, workers=2, shuffle_buffer=5)
        it = first.batches(32, 3)
        head = [(b["key"], tuple(b["image"].shape)) for b in itertools.islice(it, cut)]
        it.close()
        state = first.state_dict()
        pendings += sum(bool(p[5]) for p in state["positions"].values())
        second = bucket_source(pattern, workers=2, shuffle_buffer=5)
        second.load_state_dict(state)
        it = second.batches(32, 3)
        tail = [(b["key"], tuple(b["image"].shape)) for b in itertools.islice(it, 24 - cut)]
        it.close()
        assert head + tail == whole, f"resume after {cut} batches"
        assert second.stats()["buckets"] == whole_src.stats()["buckets"]  # counts carried across the restart
    assert pendings >= 4, "the test must stop with samples waiting in buckets"


def test_aspect_buckets_two_ranks_resumed_on_one_skip_nothing(tmp_path):
    rare = [(48, 48), (80, 40), (48, 48), (64, 48), (48, 48), (80, 40), (36, 72), (48, 48), (60, 40), (48, 48), (80, 40)]
    sizes = write_aspect_shards(tmp_path, n_shards=8, per_shard=6, sizes=rare)  # 1:2 images are rare: they wait long
    pattern = str(tmp_path / "train-{000..007}.tar")
    ranks = [bucket_source(pattern, workers=2, world=2, rank=r, shuffle_buffer=4) for r in range(2)]
    head = [k for src in ranks for k in take_keys(src, 8, res=32, micro=2)]
    states = [src.state_dict() for src in ranks]
    # the case that matters: a sample waits in a bucket from a shard its stream has finished
    old = [(s, p) for r, st in enumerate(states) for s, p in st["positions"].items() if s // 2 == r]
    assert any(u in stream_shards(8, 0, 0, s, 4)[: p[1]] for s, p in old for u, _, _ in p[5] or [])
    one = bucket_source(pattern, workers=2, world=1, rank=0, shuffle_buffer=4)
    one.load_state_dict(states[0], every_rank=states)
    assert all(p.pending is None for p in one.positions.values())  # their shards are read again instead
    # read until both streams are in the next epoch; count the epoch's samples consumed and those still waiting
    name = lambda ref: f"s{ref[0]:03d}_{ref[1]:03d}"  # noqa: E731 - shard u, key k (no bad samples here)
    waiting, later, tail, done = {0: set(), 1: set()}, set(), [], set()
    it = one.batches(32, 2)
    for b in it:
        s, pos = b["stream"], b["position"]
        if pos[0] == 0 or s not in done:  # the epoch's batches, and each stream's first of the next (whose samples
            tail += b["key"]              # read last in the epoch may share it with the next epoch's first ones)
        else:  # later: the epoch's samples that were left waiting
            tail += [k for k in b["key"] if k in waiting[s]]
        done.update([s] if pos[0] >= 1 else [])
        waiting[s] = {name(r) for r in pos[5] or [] if r[2] == 0}
        later.update(b["key"])
        if all(one.positions[x].epoch >= 1 for x in waiting):
            break
    assert set(head) | set(tail) | waiting[0] | waiting[1] == set(sizes), "a sample of the epoch was skipped"
    assert len(tail) <= len(set(tail)) + 2 * 2  # within the resumed epoch once each (but the first batches of the next)
    for b in itertools.islice(it, 30):  # the samples left waiting come out in later batches
        later.update(b["key"])
    it.close()
    assert waiting[0] | waiting[1] <= later


@pytest.mark.parametrize("collected", [False, True], ids=["left-at-exit", "garbage-collected"])
def test_the_interpreter_exits_while_a_forgotten_stream_has_workers(tmp_path, collected):
    """A stream left open in a reference cycle (a source and its generator; a traceback's frames) is collected by
    the garbage collector at some point, or not before the interpreter's exit. Its workers ignore SIGTERM, which is
    how multiprocessing's exit handler and torch's last resort stop them, and by the time the collector runs the
    generator's `finally` it has closed the queues torch's shutdown message goes through. Either way the workers
    must go, and the process exit at once (it used to wait for them forever)."""
    write_shards(tmp_path, n_shards=2, per_shard=20)
    urls = sorted(str(p) for p in tmp_path.glob("train-*.tar"))
    script = (
        "import time\n"
        "from pixeldiff.config import DataConfig, TextConfig\n"
        "from pixeldiff.shards import ShardSource\n"
        f"cfg = DataConfig(source='webdataset', shards={urls!r}, workers=2, prefetch=2)\n"
        "it = ShardSource(cfg, TextConfig()).batches(16, 4)\n"
        "next(it)\n"
        "cycle = [it]; cycle.append(cycle)\n"
        "del it, cycle\n"
        f"if {collected}:\n"
        "    import gc, multiprocessing; t0 = time.time(); gc.collect()\n"
        "    print('left', len(multiprocessing.active_children()), round(time.time() - t0, 1))\n"
        "print(time.time(), flush=True)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.time() - float(r.stdout.split()[-1]) < 20, "the exit waited for the workers"
    if collected:  # the collection stopped the workers, quickly (not torch's 5 s timeouts per worker)
        _, left, seconds = r.stdout.split("\n")[0].split()
        assert left == "0" and float(seconds) < 4, r.stdout
