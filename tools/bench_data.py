"""Benchmark the shard pipeline against decode-only, from local disk and from S3.

    python tools/bench_data.py [--images 512] [--size 768x640 | --mixed [--scale 2]] [--res 512] [--workers 1]
                               [--shuffle-buffer 1000] [--s3] [--embeddings 256x2304] [--device cpu]

Writes JPEG shards of random-texture images to a temporary directory, then prints
samples/s per worker for:
  decode-only   the same decode/resize/crop (`decode_sample`) on bytes already in memory,
                one process: the limit the pipeline can reach;
  decode+buckets the same with the aspect buckets of --res (patch 32): what the buckets' own resampling costs;
  local         ShardSource over the local shards with --workers DataLoader workers, in shard order
                (data.shuffle_buffer 0);
  local+shuffle the same with --shuffle-buffer windows, over two epochs so that whole windows (filled,
                then decoded in their seeded order) are inside the timing; its ratio to `local`, same run,
                is the cost of the shuffle;
  local+buckets `local` with data.buckets aspect (patch 32): each image to its aspect bucket, one bucket
                per micro-batch; its ratio to `local` is the cost of the buckets (use --mixed: images of
                five aspects from 1:1.75 to 1.75:1 at about the same pixel count);
  header-only   data.decode: device, a worker's share: `decode_sample` reading only each JPEG's header (checks,
                bucket, crop box), one process: the worker-side limit when the device decodes;
  device-decode data.decode: device, the training process's share: `devdecode.decode_jpegs` on micro-batches of
                16 on --device (nvJPEG on cuda; torchvision's libjpeg-turbo on the CPU);
  local+device  `local` with data.decode: device, end to end (the decode on --device in the main process);
  s3            the same shards uploaded to a moto S3 server on 127.0.0.1 (with --s3;
                needs moto[server] and s3fs).
and each pipeline row's ratio to decode-only, measured in the same run.

--embeddings LxD instead measures the bytes of one micro-batch of precomputed caption embeddings through the
DataLoader worker queue (the batch's tensors, which the worker writes into shared memory): as sent now (float16,
trimmed to the batch's longest caption; captions of 20 to 120 real tokens) and as the trainer takes it on the
device (float32, padded to L tokens), which is what crossed the queue before.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pixeldiff.config import DataConfig, S3Config, TextConfig  # noqa: E402
from pixeldiff.buckets import bucket_sizes  # noqa: E402
from pixeldiff.shardread import ReadOptions, decode_sample  # noqa: E402
from pixeldiff.shards import ShardSource  # noqa: E402


def make_images(n: int, size: tuple[int, int]) -> list[bytes]:
    rng = np.random.default_rng(0)
    w, h = size
    out = []
    for i in range(n):
        # smooth random texture: compresses like a photo, not like noise or a flat colour
        small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(root: Path, images: list[bytes], per_shard: int) -> list[Path]:
    paths = []
    for s in range(0, len(images), per_shard):
        path = root / f"bench-{s // per_shard:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, data in enumerate(images[s: s + per_shard], start=s):
                for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.txt", f"image {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def decode_only(images: list[bytes], res: int, repeats: int = 2, buckets: bool = False, header: bool = False) -> float:
    """Best of `repeats` passes, so a noisy neighbour on the machine does not lower the limit."""
    opt = ReadOptions(resolution=res, buckets=bucket_sizes(res, 32) if buckets else (), jpeg_on_device=header)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i, data in enumerate(images):
            decode_sample(f"{i}", {"jpg": data, "txt": b"x"}, opt, 0)
        best = max(best, len(images) / (time.perf_counter() - t0))
    return best


def device_decode(images: list[bytes], res: int, device: str, micro: int = 16, repeats: int = 2) -> float:
    """Samples/s of the training process's decode (`devdecode.decode_jpegs`) of micro-batches already read."""
    import torch

    from pixeldiff.devdecode import decode_jpegs
    from pixeldiff.shards import Position, collate

    opt = ReadOptions(resolution=res, jpeg_on_device=True)
    items = [decode_sample(f"{i}", {"jpg": data, "txt": b"x"}, opt, 0) for i, data in enumerate(images)]
    dev = torch.device(device)
    best = 0.0
    for _ in range(repeats + 1):  # the first pass warms the decoder up (nvJPEG's handles, CUDA's context)
        batches = [collate(items[i: i + micro], 0, Position(), {}) for i in range(0, len(items) - micro + 1, micro)]
        t0 = time.perf_counter()
        for b in batches:
            decode_jpegs(b, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, len(batches) * micro / (time.perf_counter() - t0))
    return best


def pipeline(shards, n: int, res: int, workers: int, s3: S3Config | None = None, shuffle: int = 0,
             buckets: str = "square", decode: str = "workers", device: str = "cpu") -> float:
    import torch

    cfg = DataConfig(source="webdataset", shards=shards, workers=workers, prefetch=4, s3=s3 or S3Config(),
                     shuffle_buffer=shuffle, buckets=buckets, decode=decode)
    src = ShardSource(cfg, TextConfig(), patch=32, device=torch.device(device))
    micro = 16
    it = src.batches(res, micro)
    next(it)  # start-up (worker processes, first shard) is not throughput
    t0 = time.perf_counter()
    got = sum(len(b["key"]) for b in itertools.islice(it, max(1, n // micro - 1)))
    dt = time.perf_counter() - t0
    it.close()
    return got / dt / max(1, workers)


MIXED = [(768, 640), (640, 768), (896, 512), (512, 896), (704, 704)]


def embedding_bytes(L: int, D: int, micro: int = 16) -> None:
    import torch

    from pixeldiff.data import to_device

    rng = np.random.default_rng(0)
    img = make_images(1, (64, 64))[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "emb-0000.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(4 * micro):
                n = int(rng.integers(20, 121))  # real tokens: stored trimmed, as tools/embed_captions.py writes them
                buf = io.BytesIO()
                np.save(buf, rng.standard_normal((n, D)).astype(np.float16))
                for name, payload in ((f"{i:06d}.jpg", img), (f"{i:06d}.txt", b"x"), (f"{i:06d}.emb.npy", buf.getvalue())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        cfg = DataConfig(source="webdataset", shards=[str(path)], workers=1, prefetch=2, shuffle_buffer=0)
        src = ShardSource(cfg, TextConfig(encoder="precomputed", max_tokens=L, dim=D))
        it = src.batches(64, micro)
        sent, device = [], []
        for b in itertools.islice(it, 4):
            sent.append(sum(b[k].numel() * b[k].element_size() for k in ("emb", "mask")))
            _, text, mask = to_device(b, None, torch.device("cpu"))
            device.append(text.numel() * text.element_size() + mask.numel() * mask.element_size())
        it.close()
    now, before = sum(sent) / len(sent), sum(device) / len(device)
    print(f"caption embeddings {L}x{D}, micro-batch {micro}, 20-120 real tokens per caption")
    print(f"{'through the worker queue':<34}{'MB per micro-batch':>20}{'per sample':>12}")
    print("-" * 66)
    print(f"{'before: float32, padded to ' + str(L):<34}{before / 1e6:>20.2f}{before / micro / 1e6:>11.2f}M")
    print(f"{'now: float16, trimmed':<34}{now / 1e6:>20.2f}{now / micro / 1e6:>11.2f}M")
    print(f"ratio now / before: {now / before:.1%}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", default="768x640", help="stored image size WxH")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--shuffle-buffer", type=int, default=1000, help="data.shuffle_buffer of the local+shuffle row")
    ap.add_argument("--s3", action="store_true", help="also read through a moto S3 server on 127.0.0.1")
    ap.add_argument("--mixed", action="store_true", help="images of five aspects (768x640, 640x768, 896x512, "
                                                          "512x896, 704x704) instead of --size")
    ap.add_argument("--scale", type=float, default=1.0, help="with --mixed: multiply the five sizes by this (1.0: "
                                                               "the short side of three of them is the crop or less, "
                                                               "as in shards pre-resized to it; 2.0: photos larger "
                                                               "than the crop, which every pipeline must resample)")
    ap.add_argument("--embeddings", metavar="LxD", help="measure the bytes of embedding batches instead")
    ap.add_argument("--device", default="cpu", help="where data.decode: device decodes (cpu, cuda)")
    args = ap.parse_args(argv)
    if args.embeddings:
        return embedding_bytes(*(int(v) for v in args.embeddings.split("x")))
    w, h = (int(v) for v in args.size.split("x"))

    if args.mixed:  # the aspects interleaved, as in a real shard
        sizes = [(round(w * args.scale / 8) * 8, round(h * args.scale / 8) * 8) for w, h in MIXED]
        per = [make_images(-(-args.images // len(MIXED)), size) for size in sizes]
        images = [per[j % len(MIXED)][j // len(MIXED)] for j in range(args.images)]
    else:
        images = make_images(args.images, (w, h))
    mb = sum(map(len, images)) / 2**20
    what = f"of mixed aspects ({', '.join(f'{a}x{b}' for a, b in sizes)})" if args.mixed else f"{w}x{h}"
    print(f"{args.images} JPEGs {what} ({mb:.1f} MiB), crop {args.res}, {args.workers} worker(s), "
          f"{os.cpu_count()} CPUs", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(Path(tmp), images, args.per_shard)
        base = decode_only(images, args.res)
        rows.append(("decode-only", base))
        rows.append(("decode+buckets", decode_only(images, args.res, buckets=True)))
        local = [str(p) for p in paths]
        rows.append(("local", pipeline(local, 2 * args.images, args.res, args.workers)))
        rows.append(("local+shuffle", pipeline(local, 2 * args.images, args.res, args.workers, shuffle=args.shuffle_buffer)))
        rows.append(("local+buckets", pipeline(local, 2 * args.images, args.res, args.workers, buckets="aspect")))
        rows.append(("header-only", decode_only(images, args.res, header=True)))
        rows.append(("device-decode", device_decode(images, args.res, args.device)))
        rows.append(("local+device", pipeline(local, 2 * args.images, args.res, args.workers, decode="device",
                                              device=args.device)))
        if args.s3:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from s3server import DUMMY_ENV, create_bucket, s3_client, start_moto

            os.environ.update(DUMMY_ENV)
            url, stop = start_moto()
            try:
                create_bucket(url, "bench")
                client = s3_client(url)
                for p in paths:
                    client.upload_file(str(p), "bench", p.name)
                urls = [f"s3://bench/{p.name}" for p in paths]
                rows.append(("s3 (moto)", pipeline(urls, args.images, args.res, args.workers, S3Config(endpoint_url=url))))
            finally:
                stop()
    print(f"{'source':<16}{'samples/s/worker':>18}{'vs decode-only':>16}{'vs local':>10}   (device-decode: "
          f"samples/s of the main process on {args.device})")
    print("-" * 60)
    plain = rows[2][1]
    for name, rate in rows:
        print(f"{name:<16}{rate:>18.1f}{rate / base:>15.0%}{rate / plain:>9.0%}")


if __name__ == "__main__":
    main()
