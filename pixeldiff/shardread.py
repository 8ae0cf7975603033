"""Reading one shard: tar members grouped into samples by key (the webdataset library's rule), decoded, checked,
resized and cropped; a broken sample is a `Bad` of its kind, never an exception. Used inside DataLoader workers.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import random
import tarfile
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pixeldiff.buckets import kept_fraction, nearest_bucket
from pixeldiff.shardlist import _options_for

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BAD_KINDS = ("truncated_tar", "corrupt_image", "not_image", "missing_caption", "too_large", "too_small",
             "bad_embedding", "duplicate_member", "empty_shard", "shard_missing", "read_error")
SHARD_KINDS = ("empty_shard", "shard_missing", "read_error", "truncated_tar")  # whole-shard problems, not samples


@dataclass
class ReadOptions:
    resolution: int
    flip: bool = False
    small_images: str = "upscale"  # or "skip"
    max_pixels: int = 100_000_000
    retries: int = 4
    backoff_s: float = 0.5
    block_size: int = 8 << 20
    text_len: int = 0  # > 0: precomputed embeddings are required and padded/truncated to this
    text_dim: int = 0
    caption_key: str = "txt"  # "txt", or "json:caption": a field of the .json member
    buckets: tuple = ()  # (h, w) sizes (`bucket_sizes`); () = one square bucket of `resolution`
    max_unreadable: float = 1.0  # fraction of a stream's shards per pass that may be given up on (data.max_bad_fraction)
    holdout: tuple | None = None  # (fraction, seed): keys `evaluate.held_out` names are the eval set, never trained on
    jpeg_on_device: bool = False  # data.decode: device: a JPEG is checked from its header and left encoded (devdecode)

    @property
    def sizes(self) -> tuple:
        return self.buckets or ((self.resolution, self.resolution),)


class CountingReader:
    """A read-only file wrapper that counts bytes, so a tar cut short can be told from a whole one."""

    def __init__(self, f):
        self.f, self.count = f, 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.count += len(data)
        return data

    def drain(self, limit: int = 1 << 20) -> None:
        while limit > 0:
            data = self.read(min(limit, 1 << 16))
            if not data:
                return
            limit -= len(data)


class Bad:
    __slots__ = ("kind", "key")

    def __init__(self, kind: str, key: str = ""):
        self.kind, self.key = kind, key


def split_member(name: str):
    """A member name -> (key, extension), or None for a member that is not part of a sample: the webdataset
    library's rule (the key is the name up to the first dot of its last path part, the extension the rest,
    lower-cased), plus: names starting with `__` (metadata such as `__index__.json`) and with `.` (AppleDouble
    `._x.jpg`, `.DS_Store`) are skipped."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base or base.startswith(("__", ".")):
        return None
    stem, ext = base.split(".", 1)
    return name[: len(name) - len(base)] + stem, ext.lower()


def _group_members(tar):
    """Yield (key, {ext: bytes}) for consecutive members sharing a key (a key with two members of one extension
    carries DUPLICATE: the extension).

    A group is yielded as soon as the next member's header shows a new key, before that
    member's data is read, so a tar cut inside a member still gives every whole sample before it.
    """
    key, parts = None, {}
    for info in tar:
        if not info.isfile():
            continue
        split = split_member(info.name)
        if split is None:
            continue
        member_key, ext = split
        if member_key != key:
            if parts:
                yield key, parts
            key, parts = member_key, {}
        data = tar.extractfile(info).read()
        if len(data) != info.size:
            raise tarfile.ReadError(f"member {info.name} is cut short")
        if ext in parts:
            parts[DUPLICATE] = ext
        parts[ext] = data
    if parts:
        yield key, parts


DUPLICATE = "\0duplicate"  # never an extension


def read_caption(parts: dict, caption_key: str) -> str | None:
    """The caption from the member `caption_key` names ("txt"), or from a field of a JSON member ("json:caption");
    None when it is missing, not UTF-8, or not a string."""
    ext, _, fld = caption_key.partition(":")
    raw = parts.get(ext)
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8")
        if fld:
            value = json.loads(text).get(fld)
            text = value if isinstance(value, str) else None
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    return text.strip() if text is not None else None


def flipped(opt: ReadOptions, flip_seed: int, key: str) -> bool:
    """Whether `key`'s image is flipped (data.flip): seeded by the key, whichever process decodes it."""
    return opt.flip and random.Random(f"{flip_seed}:{key}").random() < 0.5


def jpeg_box(w: int, h: int, cw: float, ch: float) -> tuple[int, int, int, int]:
    """The centre cw x ch box of a w x h image in whole pixels (left, top, right, bottom): each edge rounded half up
    (the centre stays where PIL's fractional box has it; a side may be a pixel longer or shorter), at least 1 pixel,
    inside the image."""
    def edges(n, c):
        lo = max(0, min(n - 1, math.floor((n - c) / 2 + 0.5)))
        return lo, max(lo + 1, min(n, math.floor((n + c) / 2 + 0.5)))

    (left, right), (top, bottom) = edges(w, cw), edges(h, ch)
    return left, top, right, bottom


def decode_sample(key: str, parts: dict, opt: ReadOptions, flip_seed: int):
    """-> dict(image uint8 (3, h, w) of its bucket, bucket (its index), kept, kept_square (fractions of the image's
    pixels the crop keeps, and a square crop would), caption, key[, emb (l, D) float16, mask (l,)]) or Bad.
    With `opt.jpeg_on_device` an RGB or greyscale JPEG's sample has instead jpeg: (its bytes, the crop box (left, top,
    right, bottom) in its pixels, flip) and size: (h, w), for `devdecode.decode_jpegs` in the training process."""
    if DUPLICATE in parts:
        return Bad("duplicate_member", key)
    img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if img_ext is None:
        return Bad("not_image", key)
    caption = read_caption(parts, opt.caption_key)
    if caption is None:
        return Bad("missing_caption", key)
    sizes = opt.sizes
    try:
        img = Image.open(io.BytesIO(parts[img_ext]))
        w, h = img.size
        if w * h > opt.max_pixels:
            return Bad("too_large", key)
        b = nearest_bucket(w, h, sizes) if len(sizes) > 1 else 0
        bh, bw = sizes[b]
        s = max(bw / w, bh / h)  # resize to cover the bucket
        if s > 1 and opt.small_images == "skip":
            return Bad("too_small", key)
        kept, kept_square = kept_fraction(w, h, bw, bh), min(w, h) ** 2 / (w * h)
        if opt.jpeg_on_device and img.format == "JPEG" and img.mode in ("RGB", "L"):  # (nvJPEG decodes no CMYK)
            out = {"jpeg": (parts[img_ext], jpeg_box(w, h, bw / s, bh / s), flipped(opt, flip_seed, key)),
                   "size": (bh, bw)}
            return _with_text(out, parts, opt, caption, key, b, kept, kept_square)  # decoded by the training process
        if img.format == "JPEG":  # decode at a reduced size when the image is much larger than needed
            img.draft("RGB", (max(bw, int(w * s)), max(bh, int(h * s))))
        img = img.convert("RGB")
        w, h = img.size
        s = max(bw / w, bh / h)
        if len(sizes) > 1:  # buckets: resample only the centre box that is kept (the same crop, less work)
            cw, ch = bw / s, bh / s
            box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
            img = img.resize((bw, bh), Image.BICUBIC, box=box, reducing_gap=3.0 if s < 1 else None)
        else:
            nw, nh = max(bw, round(w * s)), max(bh, round(h * s))
            img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0 if s < 1 else None)
            left, top = (nw - bw) // 2, (nh - bh) // 2
            img = img.crop((left, top, left + bw, top + bh))
    except Exception:  # noqa: BLE001 - anything PIL raises on bad bytes is a corrupt image
        return Bad("corrupt_image", key)
    if flipped(opt, flip_seed, key):
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return _with_text({"image": torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)}, parts, opt, caption, key,
                      b, kept, kept_square)


def _with_text(out: dict, parts: dict, opt: ReadOptions, caption: str, key: str, b: int, kept: float,
               kept_square: float):
    """A decoded (or device-bound) image's sample: its caption, bucket, crop fractions and embeddings, or Bad."""
    out.update(caption=caption, key=key, bucket=b, kept=kept, kept_square=kept_square)
    if opt.text_len:
        try:
            emb = np.load(io.BytesIO(parts["emb.npy"]), allow_pickle=False)
            if emb.ndim != 2 or emb.shape[1] != opt.text_dim or emb.dtype.kind != "f":
                raise ValueError(emb.shape)
            mask = np.load(io.BytesIO(parts["mask.npy"]), allow_pickle=False).astype(bool) if "mask.npy" in parts \
                else np.ones(emb.shape[0], bool)
            if mask.shape != emb.shape[:1]:
                raise ValueError(mask.shape)
            emb = emb[: opt.text_len].astype(np.float16, copy=False)  # float16 to the device, float there
            if not np.isfinite(emb).all():
                raise ValueError("not finite in float16")
        except Exception:  # noqa: BLE001 - missing or malformed embedding
            return Bad("bad_embedding", key)
        real = np.flatnonzero(mask[: opt.text_len])
        n = int(real[-1]) + 1 if real.size else 0  # trailing padding is not sent: to_device pads to text_len
        out["emb"], out["mask"] = torch.from_numpy(np.ascontiguousarray(emb[:n])), torch.from_numpy(mask[:n].copy())
    return out


def read_shard(url: str, opt: ReadOptions, skip: int, storage_options: dict | None, flip_seed: int, log):
    """Yield decoded samples or Bad records for every key after the first `skip` keys of the shard."""
    for item in read_shard_raw(url, opt, skip, storage_options, log):
        yield item if isinstance(item, Bad) else decode_sample(*item, opt, flip_seed)


def read_shard_raw(url: str, opt: ReadOptions, skip: int, storage_options: dict | None, log):
    """Yield (key, {ext: bytes}) for every key after the first `skip` keys of the shard, or a Bad record for a
    problem with the whole shard (missing, empty, truncated, unreadable). `.tar.gz`/`.tgz` are decompressed.

    Transient read errors are retried with backoff, reopening the shard and skipping what was
    already yielded; then the rest of the shard is given up as one `read_error`.
    """
    import fsspec

    done, attempt = skip, 0
    while True:
        try:
            fs, path = fsspec.core.url_to_fs(url, **_options_for(url, storage_options))
            with fs.open(path, "rb", block_size=opt.block_size) as f:
                raw = CountingReader(gzip.GzipFile(fileobj=f) if url.lower().endswith((".gz", ".tgz")) else f)
                seen, pending, cut = 0, None, None  # pending: the last group, whole only if the archive ends properly
                with tarfile.open(fileobj=raw, mode="r|*") as tar:
                    try:
                        for key, parts in _group_members(tar):
                            seen += 1
                            if seen <= done:
                                continue
                            if pending is not None:
                                done += 1
                                attempt = 0
                                yield pending
                            pending = (key, parts)
                    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
                        cut = e  # raised while reading the group after `pending`: pending itself is whole
                    end = tar.offset
                if cut is None:
                    try:
                        raw.drain()
                    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                        cut = e
                if cut is None:
                    if raw.count < end + 512:  # no end-of-archive block: cut off inside a header
                        cut, pending = f"no end-of-archive marker after {raw.count} bytes", None
                if pending is not None:
                    done += 1
                    yield pending
                if cut is not None:
                    log(f"truncated or corrupt tar {url} after {done} samples: {cut}")
                    yield Bad("truncated_tar", url)
                elif seen == 0:
                    yield Bad("empty_shard", url)
            return
        except FileNotFoundError:
            yield Bad("shard_missing", url)
            return
        except (tarfile.TarError, EOFError, ValueError, gzip.BadGzipFile, zlib.error) as e:
            log(f"truncated or corrupt tar {url} after {done} samples: {e}")
            yield Bad("truncated_tar", url)
            return
        except Exception as e:  # noqa: BLE001 - network/S3 errors: retry, then skip the shard
            attempt += 1
            if attempt > opt.retries:
                log(f"giving up on {url} after {opt.retries} retries: {type(e).__name__}: {e}")
                yield Bad("read_error", url)
                return
            time.sleep(opt.backoff_s * 2 ** (attempt - 1))
