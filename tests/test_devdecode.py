"""data.decode: device — JPEGs left encoded by the workers and decoded, cropped and resized by the training process
(here on the CPU through torchvision's decoder; nvJPEG on a GPU takes the same code path with device="cuda")."""

import io
import itertools

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pixeldiff.config import DataConfig, TextConfig
from pixeldiff.devdecode import decode_jpegs
from pixeldiff.shardread import ReadOptions, decode_sample, jpeg_box
from pixeldiff.shards import Position, ShardSource, collate

SIZES = [(160, 120), (120, 160), (200, 100), (96, 96), (48, 40)]  # landscape, portrait, 2:1, square, smaller than the crop


def photo(i: int, size) -> np.ndarray:
    """A smooth random texture with a left-right gradient, so a missed flip or a shifted crop shows."""
    w, h = size
    rng = np.random.default_rng(i)
    small = Image.fromarray(rng.integers(0, 255, (max(2, h // 12), max(2, w // 12), 3), dtype=np.uint8))
    arr = np.asarray(small.resize((w, h), Image.BICUBIC)).astype(int)
    arr[..., 0] = np.linspace(0, 255, w)[None, :].astype(int)
    return arr.clip(0, 255).astype(np.uint8)


def jpeg(arr, quality=95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_wds(path, samples) -> str:
    """A shard written by the real webdataset library, as users' tools write them."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for key, parts in samples:
            sink.write({"__key__": key, **parts})
    return str(path)


def source(shards, decode, **kw) -> ShardSource:
    cfg = DataConfig(source="webdataset", shards=shards, workers=kw.pop("workers", 1), prefetch=2, retries=1,
                     retry_backoff_s=0.01, shuffle_buffer=kw.pop("shuffle_buffer", 4), decode=decode, **kw)
    return ShardSource(cfg, kw.pop("text", TextConfig()), patch=8, device=torch.device("cpu"))


def take(src, n, res=64, micro=3):
    it = src.batches(res, micro)
    out = list(itertools.islice(it, n))
    it.close()
    return out


def test_device_decode_gives_the_workers_batches(tmp_path):
    samples = []
    for i in range(20):
        key = f"k{i:03d}"
        if i % 7 == 6:  # a PNG among the JPEGs: still decoded in the workers
            buf = io.BytesIO()
            Image.fromarray(photo(i, SIZES[i % 5])).save(buf, format="PNG")
            parts = {"png": buf.getvalue()}
        else:
            parts = {"jpg": jpeg(photo(i, SIZES[i % 5]))}
        samples.append((key, {**parts, "txt": f"caption {i}".encode()}))
    shard = write_wds(tmp_path / "photos.tar", samples)
    for buckets in ("square", "aspect"):
        kw = dict(flip=True, buckets=buckets, max_aspect=2.0)
        cpu, dev = take(source([shard], "workers", **kw), 6), take(source([shard], "device", **kw), 6)
        for a, b in zip(cpu, dev):
            assert a["key"] == b["key"] and a["caption"] == b["caption"] and a["position"] == b["position"]
            assert "jpeg" not in b and b["image"].dtype == torch.uint8 and b["image"].shape == a["image"].shape
            for j in range(len(a["key"])):
                diff = (a["image"][j].float() - b["image"][j].float()).abs()
                mirrored = (a["image"][j].float() - b["image"][j].flip(-1).float()).abs()
                # PIL's bicubic and torch's antialiased bicubic differ by about one level (the device's box edges are
                # whole source pixels, PIL's fractional); the workers' square path also crops at whole pixels of the
                # resized image (up to half a pixel off the centre box: about 4.5 levels on this texture)
                bound = 1.5 if buckets == "aspect" else 6.0
                assert diff.mean() < bound and diff.mean() < 0.2 * mirrored.mean(), (buckets, a["key"][j], diff.mean())
        assert sum(len(a["key"]) for a in cpu) == 18
    opt = ReadOptions(resolution=64, flip=True, jpeg_on_device=True)
    flipped = [decode_sample(k, p, opt, 0)["jpeg"][2] for k, p in samples if "jpg" in p]
    assert 0 < sum(flipped) < len(flipped)  # both orientations were compared


def test_a_jpeg_that_does_not_decode_is_counted_and_its_slot_keeps_image_and_caption_together(tmp_path):
    good = [jpeg(photo(i, (96, 80))) for i in range(8)]
    cut = good[2][: len(good[2]) // 2]  # its header reads (the workers pass it), its data do not decode
    samples = [(f"k{i}", {"jpg": cut if i == 2 else data, "txt": f"caption {i}".encode()}) for i, data in enumerate(good)]
    shard = write_wds(tmp_path / "cut.tar", samples)

    opt = ReadOptions(resolution=64, jpeg_on_device=True)
    assert "jpeg" in decode_sample("k2", {"jpg": cut, "txt": b"x"}, opt, 0)  # the header alone is fine

    src = source([shard], "device", shuffle_buffer=0, max_bad_fraction=1.0)
    batches = take(src, 2, micro=3)  # k0 k1 k2 | k3 k4 k5
    first = batches[0]
    assert first["key"] == ["k0", "k1", "k0"] and first["caption"] == ["caption 0", "caption 1", "caption 0"]
    assert torch.equal(first["image"][2], first["image"][0]) and not torch.equal(first["image"][1], first["image"][0])
    assert src.bad_samples() == {"corrupt_image": 1}
    assert src.samples == 5  # k2's slot is not counted as a trained sample
    state = src.state_dict()
    assert state["bad"] == {"corrupt_image": 1}

    again = source([shard], "device", shuffle_buffer=0, max_bad_fraction=1.0)  # resumed: the count carries over
    again.load_state_dict(state)
    nxt = take(again, 1, micro=3)[0]
    assert nxt["key"] == ["k6", "k7", "k0"] and again.bad_samples() == {"corrupt_image": 1}

    workers = source([shard], "workers", shuffle_buffer=0, max_bad_fraction=1.0)  # the workers' own rule, for contrast
    assert take(workers, 1, micro=3)[0]["key"] == ["k0", "k1", "k3"] and workers.bad_samples() == {"corrupt_image": 1}


def test_a_batch_of_which_nothing_decodes_is_dropped_and_counted(tmp_path):
    good = [jpeg(photo(i, (96, 80))) for i in range(6)]
    samples = [(f"k{i}", {"jpg": d[: len(d) // 2] if i < 3 else d, "txt": b"c"}) for i, d in enumerate(good)]
    shard = write_wds(tmp_path / "bad.tar", samples)
    src = source([shard], "device", shuffle_buffer=0, max_bad_fraction=1.0, workers=0)
    b = take(src, 1, micro=3)[0]
    assert b["key"] == ["k3", "k4", "k5"] and src.bad_samples() == {"corrupt_image": 3} and src.samples == 3
    assert src.stats()["buckets"] == {"64x64": 3}


def test_precomputed_embeddings_follow_their_images(tmp_path):
    samples = []
    for i in range(6):
        emb = np.full((2 + i, 4), i, np.float16)
        buf = io.BytesIO()
        np.save(buf, emb)
        data = jpeg(photo(i, (96, 80)))
        samples.append((f"k{i}", {"jpg": data[: len(data) // 2] if i == 1 else data, "txt": b"c", "emb.npy": buf.getvalue()}))
    shard = write_wds(tmp_path / "emb.tar", samples)
    src = source([shard], "device", shuffle_buffer=0, max_bad_fraction=1.0,
                 text=TextConfig(encoder="precomputed", max_tokens=8, dim=4))
    b = take(src, 1, micro=3)[0]
    assert b["key"] == ["k0", "k0", "k2"]
    assert b["emb"][1].tolist() == b["emb"][0].tolist() and b["mask"][1].tolist() == b["mask"][0].tolist()
    assert b["emb"][0, 0, 0] == 0 and b["emb"][2, 0, 0] == 2


def test_training_with_device_decode_runs_and_counts_what_does_not_decode(write_manifest, tmp_path):
    from launcher.cli import main as launch_main
    from pixeldiff.ledger import read_jsonl

    samples = []
    for i in range(24):  # every 8th JPEG cut in half: it passes the workers and fails on the device
        data = jpeg(photo(i, SIZES[i % 4]))
        samples.append((f"k{i:02d}", {"jpg": data[: len(data) // 2] if i % 8 == 5 else data, "txt": b"a photo"}))
    shard = write_wds(tmp_path / "train.tar", samples)
    data = {"source": "webdataset", "shards": [shard], "workers": 1, "decode": "device", "max_bad_fraction": 0.5,
            "flip": True, "text": {"max_tokens": 8, "dim": 16}}
    manifest = write_manifest(name="devdecode", steps=(12, 1), data=data)
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path / "runs")]) == 0
    rows = read_jsonl(tmp_path / "runs" / "devdecode" / "metrics.jsonl")
    last = rows[-1]
    assert last["step"] == 13 and all(np.isfinite(r["loss"]) for r in rows)
    # 13 steps x 8 samples = 104 slots over 24-key epochs, 3 bad keys per epoch: at least 12 bad decodes
    assert last["bad_samples"].get("corrupt_image", 0) >= 12 and set(last["bad_samples"]) == {"corrupt_image"}


def test_a_batch_led_by_a_png_a_cmyk_jpeg_and_a_large_reduction(tmp_path):
    """Slot 0 decoded in the worker (a PNG), a CMYK JPEG left to the workers (nvJPEG decodes no CMYK), and a JPEG
    reduced 50x (the area step before the bicubic one): the batch has the workers' pixels, and the JPEGs' bytes
    travel as one tensor."""
    big = photo(7, (2000, 1600))
    png = io.BytesIO()
    Image.fromarray(photo(1, (96, 80))).save(png, format="PNG")
    cmyk = io.BytesIO()
    Image.fromarray(photo(2, (96, 80))).convert("CMYK").save(cmyk, format="JPEG", quality=95)
    parts = [{"png": png.getvalue()}, {"jpg": cmyk.getvalue()}, {"jpg": jpeg(big)}, {"jpg": jpeg(photo(3, (90, 70)))}]
    on_device, in_workers = ReadOptions(resolution=32, jpeg_on_device=True), ReadOptions(resolution=32)
    items = [decode_sample(f"k{i}", {**p, "txt": b"c"}, on_device, 0) for i, p in enumerate(parts)]
    assert ["jpeg" in it for it in items] == [False, False, True, True]
    batch = collate(items, 0, Position(), {})
    assert batch["jpeg"]["data"].numel() == sum(len(p["jpg"]) for p in parts[2:]) and batch["jpeg"]["slots"] == [2, 3]
    assert decode_jpegs(batch, torch.device("cpu")) == 0 and batch["image"].shape == (4, 3, 32, 32)
    for j, p in enumerate(parts):
        ref = decode_sample(f"k{j}", {**p, "txt": b"c"}, in_workers, 0)["image"]
        if j < 2:  # decoded by the worker: carried as it is
            assert torch.equal(batch["image"][j], ref), j
        else:  # 50x: as close as one bicubic step (0.5 levels); 90x70: the square path's crop offset (first test)
            assert (batch["image"][j].float() - ref.float()).abs().mean() < (1.0 if j == 2 else 6.5), j


def test_the_crop_box_is_whole_pixels_centred_inside_the_image():
    assert jpeg_box(38, 1, 1, 1) == (19, 0, 20, 1)  # a 1x1 crop stays 1x1 (no 2x1 stretched into a square)
    assert jpeg_box(1002, 999, 999, 999) == (2, 0, 1001, 999)
    assert jpeg_box(200, 100, 166.67, 100) == (17, 0, 183, 100)
    for w, h, c in ((5, 7, 4.5), (1, 1, 1), (640, 480, 479.6), (33, 2000, 33)):
        left, top, right, bottom = jpeg_box(w, h, c, c)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h and abs((right - left) - min(c, w)) <= 1
