"""Benchmark the shard pipeline against decode-only, from local disk and from S3.

    python tools/bench_data.py [--images 512] [--size 768x640] [--res 512] [--workers 1] [--shuffle-buffer 1000] [--s3]

Writes JPEG shards of random-texture images to a temporary directory, then prints
samples/s per worker for:
  decode-only   the same decode/resize/crop (`decode_sample`) on bytes already in memory,
                one process: the limit the pipeline can reach;
  local         ShardSource over the local shards with --workers DataLoader workers, in shard order
                (data.shuffle_buffer 0);
  local+shuffle the same with --shuffle-buffer windows, over two epochs so that whole windows (filled,
                then decoded in their seeded order) are inside the timing; its ratio to `local`, same run,
                is the cost of the shuffle;
  s3            the same shards uploaded to a moto S3 server on 127.0.0.1 (with --s3;
                needs moto[server] and s3fs).
and each pipeline row's ratio to decode-only, measured in the same run.
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


def decode_only(images: list[bytes], res: int, repeats: int = 2) -> float:
    """Best of `repeats` passes, so a noisy neighbour on the machine does not lower the limit."""
    opt = ReadOptions(resolution=res)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i, data in enumerate(images):
            decode_sample(f"{i}", {"jpg": data, "txt": b"x"}, opt, 0)
        best = max(best, len(images) / (time.perf_counter() - t0))
    return best


def pipeline(shards, n: int, res: int, workers: int, s3: S3Config | None = None, shuffle: int = 0) -> float:
    cfg = DataConfig(source="webdataset", shards=shards, workers=workers, prefetch=4, s3=s3 or S3Config(),
                     shuffle_buffer=shuffle)
    src = ShardSource(cfg, TextConfig())
    micro = 16
    it = src.batches(res, micro)
    next(it)  # start-up (worker processes, first shard) is not throughput
    t0 = time.perf_counter()
    got = sum(len(b["key"]) for b in itertools.islice(it, max(1, n // micro - 1)))
    dt = time.perf_counter() - t0
    it.close()
    return got / dt / max(1, workers)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", default="768x640", help="stored image size WxH")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--shuffle-buffer", type=int, default=1000, help="data.shuffle_buffer of the local+shuffle row")
    ap.add_argument("--s3", action="store_true", help="also read through a moto S3 server on 127.0.0.1")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))

    images = make_images(args.images, (w, h))
    mb = sum(map(len, images)) / 2**20
    print(f"{args.images} JPEGs {w}x{h} ({mb:.1f} MiB), crop {args.res}, {args.workers} worker(s), "
          f"{os.cpu_count()} CPUs", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(Path(tmp), images, args.per_shard)
        base = decode_only(images, args.res)
        rows.append(("decode-only", base))
        local = [str(p) for p in paths]
        rows.append(("local", pipeline(local, 2 * args.images, args.res, args.workers)))
        rows.append(("local+shuffle", pipeline(local, 2 * args.images, args.res, args.workers, shuffle=args.shuffle_buffer)))
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
    print(f"{'source':<14}{'samples/s/worker':>18}{'vs decode-only':>16}{'vs local':>10}")
    print("-" * 58)
    plain = rows[1][1]
    for name, rate in rows:
        print(f"{name:<14}{rate:>18.1f}{rate / base:>15.0%}{rate / plain:>9.0%}")


if __name__ == "__main__":
    main()
