"""Write small WebDataset shards for tests: real tar files with real encoded images."""

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = [(220, 30, 30), (30, 200, 30), (30, 60, 230), (230, 220, 30)]


def image_bytes(i: int, size=(40, 32), fmt="JPEG") -> bytes:
    rng = np.random.default_rng(i)
    arr = np.zeros((size[1], size[0], 3), np.uint8) + np.array(COLORS[i % 4], np.uint8)
    arr = np.clip(arr.astype(int) + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, i: int, caption: str | None = None, ext="jpg", emb: np.ndarray | None = None):
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    out = [(f"{key}.{ext}", image_bytes(i, fmt=fmt)), (f"{key}.txt", (caption or f"sample {key}").encode())]
    if emb is not None:
        buf = io.BytesIO()
        np.save(buf, emb)
        out.append((f"{key}.emb.npy", buf.getvalue()))
    return out


def write_shards(root: Path, n_shards: int, per_shard: int, prefix="train") -> list[str]:
    """Good shards train-000.tar ... with keys s{shard}_{i}; returns their keys in file order."""
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key = f"s{s:03d}_{i:03d}"
            keys.append(key)
            members += sample_members(key, s * per_shard + i)
        write_tar(root / f"{prefix}-{s:03d}.tar", members)
    return keys
