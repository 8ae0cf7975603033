"""Shards as users have them, written by the real `webdataset` library (ShardWriter, TarWriter) and in
img2dataset's layout: our reader yields the samples `wds.WebDataset` yields (keys and bytes); shard specs expand
as `braceexpand` expands them."""

import io
import itertools
import json
import sys
import tarfile

import braceexpand
import pytest
import webdataset as wds

from pixeldiff.config import DataConfig, TextConfig
from pixeldiff.shardlist import DataError, expand_braces, shard_list
from pixeldiff.shardread import Bad, ReadOptions, read_shard, read_shard_raw
from pixeldiff.shards import ShardSource
from shardutil import image_bytes


def source(shards, workers=0, **kw) -> ShardSource:
    cfg = DataConfig(source="webdataset", shards=shards, workers=workers, prefetch=2, retries=1, retry_backoff_s=0.01, **kw)
    return ShardSource(cfg, TextConfig())


def ours(urls) -> list[dict]:
    """Every sample our reader groups, raw: {"__key__", ext: bytes}."""
    out = []
    for url in urls:
        for item in read_shard_raw(url, ReadOptions(resolution=16), 0, None, print):
            assert not isinstance(item, Bad), (url, item.kind)
            key, parts = item
            out.append({"__key__": key, **parts})
    return out


def theirs(urls) -> list[dict]:
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return [{k: v for k, v in s.items() if k not in ("__url__", "__local_path__")} for s in ds]


# ------------------------------------------------------------------ shard specs

PATTERNS = [
    "train-{000..004}.tar", "t-{0..12}.tar", "t-{8..10}.tar", "t-{1..010}.tar", "t-{01..3}.tar", "t-{-2..2}.tar",
    "t-{-05..3}.tar", "t-{0..10..3}.tar", "t-{10..0..4}.tar", "t-{5..1}.tar", "t-{3..3}.tar", "t-{0..4..0}.tar",
    "t-{a..e}.tar", "t-{Y..b}.tar", "t-{e..a..2}.tar", "{a,b}-{1..2}.tar", "{a,{b,c}{1..2}}.tar", "x{,y}.tar",
    "{a,b{1..2},c}-{x,y}.tar", "{solo}.tar", "{}.tar", "{a{b,c}}.tar", "s3://b/p/{00000..00003}.tar",
    "plain.tar", r"lit\{1,2\}.tar", r"{a\,b,c}.tar", "d{0..1}/{x,y}.tgz",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_brace_expansion_matches_braceexpand(pattern):
    assert expand_braces(pattern) == list(braceexpand.braceexpand(pattern))


@pytest.mark.parametrize("pattern", ["t-{1..3.tar", "t-1..3}.tar", "t-{a,{b}.tar"])
def test_unbalanced_braces_are_refused_as_braceexpand_refuses_them(pattern):
    with pytest.raises(braceexpand.UnbalancedBracesError):
        list(braceexpand.braceexpand(pattern))
    with pytest.raises(DataError, match="unbalanced braces"):
        expand_braces(pattern)


def test_shard_specs_join_with_double_colons_and_refuse_what_is_not_a_shard(tmp_path):
    spec = "/d/a-{0..1}.tar::/d/b-{00..01}.tar.gz::s3://bk/c.tgz"
    assert shard_list(spec) == ["/d/a-0.tar", "/d/a-1.tar", "/d/b-00.tar.gz", "/d/b-01.tar.gz", "s3://bk/c.tgz"]
    assert shard_list(spec) == wds.shardlists.expand_urls(spec)  # the library's own reading of the same spec
    listing = tmp_path / "shards.lst"
    listing.write_text("/d/x-{0..1}.tar::/d/y.tar\n")
    assert shard_list(str(listing)) == ["/d/x-0.tar", "/d/x-1.tar", "/d/y.tar"]
    with pytest.raises(DataError, match=r"pipe: URLs .* not supported.*s3://bucket"):
        shard_list("pipe:aws s3 cp s3://b/train-{0..3}.tar -")
    with pytest.raises(DataError, match=r"'/d/train.parquet'.* neither a shard .* nor a list file"):
        shard_list("/d/train.parquet")  # never read as a list file
    with pytest.raises(DataError, match=r"line 1: '/d/other.txt' is not a shard"):
        (tmp_path / "nested.txt").write_text("/d/other.txt\n")
        shard_list(str(tmp_path / "nested.txt"))
    with pytest.raises(DataError, match="list file .*missing.txt does not exist"):
        shard_list(str(tmp_path / "missing.txt"))


def test_a_missing_s3_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
    with pytest.raises(DataError, match=r"s3:// needs the Python package 's3fs'.*pip install s3fs") as e:
        source("s3://bucket/train-{0..1}.tar")
    assert "credentials" not in str(e.value)


# ------------------------------------------------------------------ the library's own shards


def wds_samples(n, start=0):
    return [{"__key__": f"sample{i:05d}", "jpg": image_bytes(i), "txt": f"caption {i}".encode(),
             "json": json.dumps({"i": i}).encode(), "cls": str(i % 3).encode()} for i in range(start, start + n)]


@pytest.mark.parametrize("mtime", [None, 1_700_000_000])  # None: the library's float time.time(), a PAX header each
def test_shardwriter_shards_read_like_the_library_reads_them(tmp_path, mtime):
    with wds.ShardWriter(str(tmp_path / "w-%03d.tar"), maxcount=4, verbose=0, encoder=False, mtime=mtime) as sink:
        for s in wds_samples(10):
            sink.write(s)
    urls = shard_list(str(tmp_path / "w-{000..002}.tar"))
    raw = open(urls[0], "rb").read()
    assert (b"mtime=" in raw) == (mtime is None)  # the float mtimes really are PAX records
    got, want = ours(urls), theirs(urls)
    assert len(got) == 10 and got == want  # same keys, same extensions, same bytes, same order
    src = source(str(tmp_path / "w-{000..002}.tar"), shuffle_buffer=0)
    keys = [k for b in itertools.islice(src.batches(16, 5), 2) for k in b["key"]]
    assert sorted(keys) == [s["__key__"] for s in want] and src.bad_samples() == {}  # shards in the epoch's order


def test_gzipped_shards_read(tmp_path):
    for i, name in enumerate(["g-0.tar.gz", "g-1.tgz"]):
        with wds.TarWriter(str(tmp_path / name), encoder=False, compress=True) as sink:
            for s in wds_samples(3, start=3 * i):
                sink.write(s)
    assert (tmp_path / "g-1.tgz").read_bytes()[:2] == b"\x1f\x8b"
    urls = [str(tmp_path / "g-0.tar.gz"), str(tmp_path / "g-1.tgz")]
    assert ours(urls) == theirs(urls) and len(ours(urls)) == 6
    data = (tmp_path / "g-0.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) * 2 // 3])  # a gzip stream cut short
    kinds = [x.kind if isinstance(x, Bad) else x["key"] for x in
             read_shard(str(tmp_path / "cut.tar.gz"), ReadOptions(resolution=16), 0, None, 0, print)]
    assert kinds[-1] == "truncated_tar" and all(k.startswith("sample") for k in kinds[:-1])


def write_img2dataset(root, shard: int, keys_with_txt: list[tuple[int, bool]]):
    """img2dataset's output: {shard:05d}.tar with 9-digit keys (shard * 10000 + index, with gaps where downloads
    failed), .jpg + .json (+ .txt when captions are written as files), a parquet and a stats file beside it."""
    root.mkdir(exist_ok=True)
    with wds.TarWriter(str(root / f"{shard:05d}.tar"), encoder=False) as sink:
        for k, with_txt in keys_with_txt:
            key = f"{shard * 10000 + k:09d}"
            meta = {"url": f"https://example.com/{key}.jpg", "caption": f"a photo number {key}", "key": key,
                    "status": "success", "error_message": None, "width": 40, "height": 32}
            s = {"__key__": key, "jpg": image_bytes(k, size=(40, 32)), "json": json.dumps(meta).encode()}
            if with_txt:
                s["txt"] = meta["caption"].encode()
            sink.write(s)
    (root / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read")
    (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(keys_with_txt), "successes": len(keys_with_txt)}))


def test_img2dataset_layout_with_captions_from_the_json(tmp_path):
    root = tmp_path / "i2d"
    write_img2dataset(root, 0, [(0, True), (1, False), (3, True), (7, False), (8, True)])
    write_img2dataset(root, 1, [(2, False), (4, True), (5, False)])
    spec = str(root / "{00000..00001}.tar")
    urls = shard_list(spec)
    assert ours(urls) == theirs(urls)
    src = source(spec, caption_key="json:caption", shuffle_buffer=0)
    b = next(src.batches(16, 8))
    assert sorted(b["key"]) == [s["__key__"] for s in theirs(urls)] and src.bad_samples() == {}
    assert b["caption"][1] == "a photo number 000000001"  # a sample with no .txt: the caption is the JSON's
    txt_only = source(spec, max_bad_fraction=1.0, shuffle_buffer=0)  # captions from .txt: the others lack one
    b = next(txt_only.batches(16, 4))
    assert sorted(b["key"]) == ["000000000", "000000003", "000000008", "000010004"]
    assert txt_only.bad_samples() == {"missing_caption": 3}


def test_metadata_and_appledouble_members_are_skipped_duplicates_are_bad(tmp_path):
    members = [("__meta__", b"shard metadata"), ("__index__.json", b"{}"), ("._a.jpg", b"\x00\x05\x16\x07 resource fork"),
               ("a.jpg", image_bytes(1)), ("a.txt", b"cap a"), ("dir/._b.jpg", b"fork"), (".DS_Store", b"x"),
               ("b.jpg", image_bytes(2)), ("b.txt", b"cap b"), ("b.txt", b"cap b again"),
               ("c.jpg", image_bytes(3)), ("c.TXT", b"cap c")]
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="duplicate"):  # the library refuses the duplicate outright
        theirs([str(path)])
    src = source([str(path)], max_bad_fraction=1.0, shuffle_buffer=0)
    b = next(src.batches(16, 2))
    assert b["key"] == ["a", "c"] and b["caption"] == ["cap a", "cap c"]  # extensions lower-cased, as the library does
    assert src.bad_samples() == {"duplicate_member": 1}  # the metadata and AppleDouble members are not samples


def test_training_on_shardwriter_shards_in_img2dataset_layout(write_manifest, tmp_path):
    """The dry run's model trains on webdataset-written img2dataset shards, captions from the JSON."""
    from launcher.cli import main as launch_main
    from pixeldiff.ledger import read_jsonl

    root = tmp_path / "i2d"
    for shard in range(4):
        write_img2dataset(root, shard, [(k, k % 2 == 0) for k in range(12) if k % 5 != 4])
    data = {"source": "webdataset", "shards": str(root / "{00000..00003}.tar"), "workers": 2,
            "caption_key": "json:caption", "text": {"max_tokens": 8, "dim": 16}}
    manifest = write_manifest(name="i2drun", steps=(12, 2), data=data)
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path / "runs")]) == 0
    rows = read_jsonl(tmp_path / "runs" / "i2drun" / "metrics.jsonl")
    print("last metrics line:", json.dumps(rows[-1]))
    assert rows[-1]["step"] == 14 and rows[-1]["bad_samples"] == {}


@pytest.mark.parametrize("data, pattern", [
    ({"caption_key": "json caption"}, r"data.caption_key: 'json caption' .* use 'txt' .* or 'json:caption'"),
    ({"shuffle_buffer": -1}, r"data.shuffle_buffer: must be >= 0"),
])
def test_bad_data_settings_are_config_errors(write_manifest, data, pattern):
    from pixeldiff.config import ConfigError
    from launcher.manifest import load_manifest

    manifest = write_manifest(name="badcfg", data={"source": "webdataset", "shards": "/d/x.tar", **data})
    with pytest.raises(ConfigError, match=pattern):
        load_manifest(manifest)
