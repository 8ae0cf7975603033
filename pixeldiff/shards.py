"""WebDataset shards from s3:// or local paths: resumable, deterministic, and never stopped by bad data.

The pipeline, in stages:

    shard list (braceexpand-style patterns, `::` joins, list files; .tar, .tar.gz, .tgz)
      -> epoch order (a permutation from (seed, epoch))
      -> streams: stream s = rank * workers + worker takes order[s::streams]
      -> read tar (retry transient errors, skip what cannot be read), group members into samples by key
         (the webdataset library's rule; `__*` metadata and `._*` AppleDouble members skipped)
      -> shuffle windows of `data.shuffle_buffer` consecutive keys, each emitted in a seeded order
      -> decode, check, resize shorter side, centre crop, optional flip
      -> batches of `micro` samples, each carrying its stream's position

Resume guarantee: a position is (epoch, index into the stream's shard list and key index in that shard where
the current shuffle window starts, slots of that window consumed) and is recorded for every stream from the
batches the trainer actually consumed (not what workers prefetched). Restarted with the same number of streams
(ranks x workers) a run reads the window again and continues exactly: no sample replayed or skipped. With a
different number, shards every old stream finished before its current window in the lowest recorded epoch are
dropped from that epoch's order and the rest are dealt to the new streams from the start of each shard: nothing
is skipped, and only the shards of each old stream's current window are read again.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import random
import re
import signal
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pixeldiff.storage import storage_options

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BAD_KINDS = ("truncated_tar", "corrupt_image", "not_image", "missing_caption", "too_large", "too_small",
             "bad_embedding", "duplicate_member", "empty_shard", "shard_missing", "read_error")
SHARD_KINDS = ("empty_shard", "shard_missing", "read_error", "truncated_tar")  # whole-shard problems, not samples


class DataError(RuntimeError):
    """The data cannot feed the run (too many bad samples, no shards); the message says what to check."""


# ------------------------------------------------------------------ shard lists

SHARD_EXTS = (".tar", ".tar.gz", ".tgz")
LIST_EXTS = (".txt", ".list", ".lst")
_INT_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?")
_CHAR_RANGE = re.compile(r"([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion with the `braceexpand` package's semantics (the webdataset library uses it):
    `{000..002}` (zero padding when an end has a leading zero), `{1..9..2}` steps, `{5..1}` descending, `{a..e}`,
    `{a,b}` lists, nested groups, several groups multiply, `\\{` a literal brace; `{x}` (no comma, no range) stays
    literal. Unbalanced braces are a DataError."""
    return [re.sub(r"\\(.)", r"\1", s) for s in _expand(pattern, pattern)]


def _split_top(text: str, sep: str) -> list[str]:
    """`text` split at `sep` characters outside braces (backslash escapes respected)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        depth += ch == "{"
        depth -= ch == "}"
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    return parts + [text[start:]]


def _expand(text: str, whole: str) -> list[str]:
    """Expansions of `text` (escapes kept, removed by the caller)."""
    pieces: list[list[str]] = []  # a product of alternatives
    depth, start, i = 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            if depth == 0:
                pieces.append([text[start:i]])
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                break
            if depth == 0:
                pieces.append(_group(text[start + 1:i], whole))
                start = i + 1
        i += 1
    if depth != 0:
        raise DataError(f"shard pattern {whole!r}: unbalanced braces; every '{{' needs its '}}' (write \\{{ for a "
                        f"literal brace)")
    pieces.append([text[start:]])
    out = [""]
    for alts in pieces:
        out = [a + b for a in out for b in alts]
    return out


def _group(body: str, whole: str) -> list[str]:
    """The alternatives of one top-level `{body}`."""
    m = _INT_RANGE.fullmatch(body)
    if m:
        a, b, step = m.group(1), m.group(2), int(m.group(3) or 1) or 1
        pad = any(s.lstrip("-").startswith("0") for s in (a, b) if s not in ("0", "-0"))
        width = max(len(a), len(b)) if pad else 0
        lo, hi = int(a), int(b)
        values = range(lo, hi + 1, step) if lo < hi else range(lo, hi - 1, -step)
        return [f"{v:0{width}d}" for v in values]
    m = _CHAR_RANGE.fullmatch(body)
    if m:
        lo, hi, step = _LETTERS.index(m.group(1)), _LETTERS.index(m.group(2)), int(m.group(3) or 1) or 1
        values = range(lo, hi + 1, step) if lo < hi else range(lo, hi - 1, -step)
        return [_LETTERS[v] for v in values]
    alts = _split_top(body, ",")
    if len(alts) == 1:  # no comma, no range: the braces are literal, what is inside still expands
        return ["{" + s + "}" for s in _expand(body, whole)]
    return [s for alt in alts for s in _expand(alt, whole)]


def _check_spec(item: str, where: str) -> None:
    if item.startswith("pipe:"):
        raise DataError(f"{where}: {item!r}: pipe: URLs (a shell command per shard) are not supported, as the reader "
                        f"must reopen a shard at a sample to resume and retry; name the shard itself "
                        f"(s3://bucket/train-{{000..099}}.tar, or a local path)")


def is_shard_url(url: str) -> bool:
    return url.lower().endswith(SHARD_EXTS)


def shard_list(spec, storage_options: dict | None = None) -> list[str]:
    """Shard URLs from `data.shards`: a spec, or a list of specs. A spec is a shard URL with brace patterns
    (`train-{000..099}.tar`, also `.tar.gz`/`.tgz`), several such joined by `::`, or a list file (`.txt`, `.list`,
    `.lst`; local or s3://) naming one spec per line (`#` comments)."""
    items = spec if isinstance(spec, list) else [spec]
    out: list[str] = []
    for item in items:
        for part in item.split("::"):
            part = part.strip()
            _check_spec(part, "data.shards")
            if not part:
                raise DataError(f"data.shards: {item!r} has an empty part between '::' separators")
            if part.lower().endswith(LIST_EXTS) and "{" not in part:
                out += _read_list_file(part, storage_options)
                continue
            urls = expand_braces(part)
            bad = [u for u in urls if not is_shard_url(u)]
            if bad:
                raise DataError(f"data.shards: {bad[0]!r} (from {part!r}) is neither a shard ({', '.join(SHARD_EXTS)}) "
                                f"nor a list file ({', '.join(LIST_EXTS)}); name the tar files, e.g. "
                                f"s3://bucket/train-{{000..099}}.tar")
            out += urls
    if not out:
        raise DataError(f"data.shards {spec!r} names no shards")
    return out


def _read_list_file(url: str, storage_options: dict | None) -> list[str]:
    import fsspec

    check_protocols([url])
    try:
        with fsspec.open(url, "rt", **_options_for(url, storage_options)) as f:
            lines = [ln.strip() for ln in f]
    except FileNotFoundError:
        raise DataError(f"data.shards: the list file {url} does not exist") from None
    out: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line or line.startswith("#"):
            continue
        for part in line.split("::"):
            _check_spec(part, f"data.shards list file {url}, line {n}")
            urls = expand_braces(part.strip())
            bad = [u for u in urls if not is_shard_url(u)]
            if bad:
                raise DataError(f"data.shards list file {url}, line {n}: {bad[0]!r} is not a shard "
                                f"({', '.join(SHARD_EXTS)}); a list file names shards, not other list files")
            out += urls
    return out


def check_protocols(urls) -> None:
    """Every storage protocol the shards use has its package installed, or a DataError naming the package."""
    import importlib

    from fsspec.registry import known_implementations

    for proto in sorted({u.split("://", 1)[0] for u in urls if "://" in u} - {"file"}):
        impl = known_implementations.get(proto)
        if impl is None:
            raise DataError(f"data.shards: no filesystem for {proto}:// URLs; use s3:// or local paths")
        module = impl["class"].rsplit(".", 1)[0]
        try:
            importlib.import_module(module)
        except ImportError as e:
            package = module.split(".", 1)[0]
            raise DataError(f"data.shards: reading {proto}:// needs the Python package {package!r}, which is not "
                            f"installed ({e}); pip install {package} (s3fs is part of pixeldiff's install: "
                            f"reinstall with pip install -e .)") from None


def _options_for(url: str, storage_options: dict | None) -> dict:
    return dict(storage_options or {}) if url.startswith("s3://") else {}


# ------------------------------------------------------------------ order and positions


def epoch_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n_shards))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def stream_shards(n_shards: int, seed: int, epoch: int, stream: int, n_streams: int) -> list[int]:
    return epoch_order(n_shards, seed, epoch)[stream::n_streams]


@dataclass
class Position:
    epoch: int = 0
    next: int = 0  # index into this stream's shard list for `epoch`
    offset: int = 0  # key index in that shard where the current shuffle window starts
    remaining: list | None = None  # after a re-layout: this stream's explicit shard list for `epoch`
    taken: int = 0  # slots of the window starting at (next, offset) already consumed (good or bad)

    def as_list(self) -> list:
        return [self.epoch, self.next, self.offset, self.remaining, self.taken]


def relayout(old: dict[int, list], old_streams: int, new_streams: int, n_shards: int, seed: int) -> dict[int, Position]:
    """Positions for `new_streams` streams from positions recorded with `old_streams` (see module docstring)."""
    if old_streams == new_streams and len(old) == new_streams:
        return {s: Position(*p) for s, p in old.items()}
    pos = {s: Position(*p) for s, p in old.items()}
    e = min(p.epoch for p in pos.values()) if pos else 0
    done: set[int] = set()
    for s in range(old_streams):
        p = pos.get(s, Position(e))
        lst = p.remaining if p.remaining is not None else stream_shards(n_shards, seed, p.epoch, s, old_streams)
        if p.epoch > e:
            lst_e = stream_shards(n_shards, seed, e, s, old_streams)
            done.update(lst_e)  # this stream finished its whole list of epoch e
        elif p.epoch == e:
            done.update(lst[: p.next])
    left = [i for i in epoch_order(n_shards, seed, e) if i not in done]
    return {s: Position(e, 0, 0, left[s::new_streams]) for s in range(new_streams)}


# ------------------------------------------------------------------ reading


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


def decode_sample(key: str, parts: dict, opt: ReadOptions, flip_seed: int):
    """-> dict(image uint8 (3,R,R), caption, key[, emb, mask]) or Bad."""
    if DUPLICATE in parts:
        return Bad("duplicate_member", key)
    img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if img_ext is None:
        return Bad("not_image", key)
    caption = read_caption(parts, opt.caption_key)
    if caption is None:
        return Bad("missing_caption", key)
    R = opt.resolution
    try:
        img = Image.open(io.BytesIO(parts[img_ext]))
        w, h = img.size
        if w * h > opt.max_pixels:
            return Bad("too_large", key)
        if min(w, h) < R and opt.small_images == "skip":
            return Bad("too_small", key)
        if img.format == "JPEG":  # decode at a reduced size when the image is much larger than needed
            scale = min(w, h) / R
            img.draft("RGB", (max(R, int(w / scale)), max(R, int(h / scale))))
        img = img.convert("RGB")
        w, h = img.size
        s = R / min(w, h)
        nw, nh = max(R, round(w * s)), max(R, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0 if s < 1 else None)
        left, top = (nw - R) // 2, (nh - R) // 2
        img = img.crop((left, top, left + R, top + R))
    except Exception:  # noqa: BLE001 - anything PIL raises on bad bytes is a corrupt image
        return Bad("corrupt_image", key)
    if opt.flip and random.Random(f"{flip_seed}:{key}").random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    out = {"image": torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), "caption": caption, "key": key}
    if opt.text_len:
        try:
            emb = np.load(io.BytesIO(parts["emb.npy"]), allow_pickle=False)
            if emb.ndim != 2 or emb.shape[1] != opt.text_dim:
                raise ValueError(emb.shape)
            mask = np.load(io.BytesIO(parts["mask.npy"]), allow_pickle=False).astype(bool) if "mask.npy" in parts \
                else np.ones(emb.shape[0], bool)
        except Exception:  # noqa: BLE001 - missing or malformed embedding
            return Bad("bad_embedding", key)
        L = opt.text_len
        e = np.zeros((L, opt.text_dim), np.float32)
        mk = np.zeros(L, bool)
        n = min(L, emb.shape[0])
        e[:n], mk[:n] = emb[:n], mask[:n]
        out["emb"], out["mask"] = torch.from_numpy(e), torch.from_numpy(mk)
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


# ------------------------------------------------------------------ the dataset


def window_order(n: int, seed: int, epoch: int, shard: int, offset: int) -> list[int]:
    """The emission order of a shuffle window: a permutation seeded by where the window starts (the shard's index
    in the shard list, the key's index in the shard), so a restart that reads the window again gets the same one,
    whatever the stream layout and wherever the shards are stored."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}:{shard}:{offset}").shuffle(order)
    return order


class ShardDataset(torch.utils.data.IterableDataset):
    """Endless batches for one rank; each DataLoader worker is one stream.

    A stream cuts its epoch's keys into shuffle windows of `window` consecutive keys (crossing shards, never
    epochs), holds a window's undecoded members in memory and decodes them in a seeded order (`window_order`).
    The position is the window's start and how many of its slots were consumed, so a restart reads that window
    again (undecoded, from its start) and continues at the same slot."""

    def __init__(self, urls, seed, rank, world, workers, positions: dict[int, Position], micro: int,
                 opt: ReadOptions, storage_options: dict | None, rotate: int = 0, window: int = 1):
        self.urls, self.seed, self.rank, self.world, self.workers = urls, seed, rank, world, max(1, workers)
        self.rotate = rotate  # the DataLoader starts with worker 0: give it the stream whose batch is due next
        self.positions, self.micro, self.opt, self.storage_options = positions, micro, opt, storage_options
        self.window = max(1, window)

    def _keys(self, lst, pos: Position, counts: dict, quiet: list, log):
        """(shard index in `lst`, key index in that shard, url, key, parts) for the epoch's keys from `pos`'s window
        start; whole-shard problems are counted (unless quiet[0]: a restart reading a window whose problems the
        checkpoint counted already)."""
        for i in range(pos.next, len(lst)):
            url = self.urls[lst[i]]
            k = pos.offset if i == pos.next else 0
            for item in read_shard_raw(url, self.opt, k, self.storage_options, log):
                if isinstance(item, Bad):
                    if not quiet[0]:
                        counts[item.kind] += 1
                        if item.kind != "truncated_tar":
                            log(f"{item.kind}: {url}")
                    continue
                yield (i, k, url, *item)
                k += 1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        stream = self.rank * self.workers + (wid + self.rotate) % self.workers
        n_streams = self.world * self.workers
        pos = Position(*self.positions[stream].as_list())
        counts = dict.fromkeys(BAD_KINDS, 0)
        logged: set = set()

        def log(msg):
            print(f"[data stream {stream}] {msg}", file=sys.stderr, flush=True)

        buf = []
        while True:
            resumed = bool(pos.next or pos.offset or pos.taken)  # a pass over a whole shard list without one good sample is fatal
            yielded, taken = 0, pos.taken
            lst = pos.remaining if pos.remaining is not None else \
                stream_shards(len(self.urls), self.seed, pos.epoch, stream, n_streams)
            quiet = [taken > 0]
            keys = self._keys(lst, pos, counts, quiet, log)
            while True:
                window = list(itertools.islice(keys, self.window))
                quiet[0] = False
                if not window:
                    break
                first, start = window[0][0], window[0][1]
                order = window_order(len(window), self.seed, pos.epoch, lst[first], start) if len(window) > 1 else [0]
                for slot in range(taken, len(window)):
                    _, _, url, key, parts = window[order[slot]]
                    window[order[slot]] = None  # decoded once: let the bytes go
                    item = decode_sample(key, parts, self.opt, self.seed + pos.epoch)
                    here = Position(pos.epoch, first, start, pos.remaining, slot + 1)
                    if isinstance(item, Bad):
                        counts[item.kind] += 1
                        if (item.kind, url) not in logged:
                            logged.add((item.kind, url))
                            log(f"skipping {item.kind} sample {item.key} in {url} (further ones in this shard counted silently)")
                        continue
                    yielded += 1
                    buf.append(item)
                    if len(buf) == self.micro:
                        yield collate(buf, stream, here, counts)
                        buf = []
                taken = 0
            if yielded == 0 and lst and not resumed:
                raise DataError(f"data stream {stream}: not one readable sample in {len(lst)} shard(s) "
                                f"(e.g. {self.urls[lst[0]]}): {dict((k, v) for k, v in counts.items() if v)}; "
                                f"check data.shards, the credentials and data.s3.endpoint_url")
            pos = Position(pos.epoch + 1, 0, 0, None)


def collate(items: list[dict], stream: int, pos: Position, counts: dict) -> dict:
    batch = {
        "image": torch.stack([it["image"] for it in items]),  # (B, 3, R, R) uint8
        "caption": [it["caption"] for it in items],
        "key": [it["key"] for it in items],
        "stream": stream,
        "position": pos.as_list(),
        "bad": dict(counts),
    }
    if "emb" in items[0]:
        batch["emb"] = torch.stack([it["emb"] for it in items])
        batch["mask"] = torch.stack([it["mask"] for it in items])
    return batch


def merge_data_states(states: list[dict], own: dict, same_world: bool, rank: int = 0) -> dict:
    """One rank's data state for a restart, from every rank's saved state: all streams' positions
    (so a different layout can be dealt fairly), and this rank's counts (rank 0 takes all of them
    when the number of ranks changed)."""
    positions: dict = {}
    for st in states:
        positions.update(st["positions"])
    out = {**own, "positions": positions}
    if not same_world:
        bad: dict = {}
        for st in states:
            for k, v in st.get("bad", {}).items():
                bad[k] = bad.get(k, 0) + v
        out["bad"] = bad if rank == 0 else {}
        out["samples"] = sum(st.get("samples", 0) for st in states) if rank == 0 else 0
    return out


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker ignores the signals that stop a job: Slurm (scancel, preemption, the time limit's USR2) and
    Ctrl-C signal every process of a step or a terminal's process group, workers included, and a worker that died
    of one would fail the main process mid-step. The main process decides; its loader stops the workers."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class ShardSource:
    """The trainer's view: batches for a stage, the position to checkpoint, bad-sample counts."""

    def __init__(self, data_cfg, text_cfg, rank: int = 0, world: int = 1, pin_memory: bool = False):
        self.cfg, self.text_cfg, self.rank, self.world = data_cfg, text_cfg, rank, world
        self.workers = data_cfg.workers
        self.storage_options = storage_options(data_cfg.s3)
        self.urls = shard_list(data_cfg.shards, self.storage_options)
        check_protocols(self.urls)
        self.n_streams = world * max(1, self.workers)
        if len(self.urls) < self.n_streams:
            raise DataError(
                f"{len(self.urls)} shard(s) for {self.n_streams} data streams (ranks x data.workers); "
                f"every stream needs at least one shard: lower data.workers or add shards")
        self.positions = {s: Position() for s in range(self.n_streams)}
        self.bad_base: dict = dict.fromkeys(BAD_KINDS, 0)  # counts restored from the checkpoint
        self.bad_live: dict = {}  # stream -> cumulative counts of this job's workers
        self.samples = 0
        self.batches_seen = 0  # batches consumed: the DataLoader deals them round-robin over the streams
        self.pin_memory = pin_memory
        self._loader = None

    # positions of this rank's streams
    def state_dict(self) -> dict:
        return {"n_streams": self.n_streams, "positions": {s: p.as_list() for s, p in self.positions.items()},
                "bad": self.bad_samples(), "samples": self.samples, "batches": self.batches_seen}

    def load_state_dict(self, state: dict, every_rank: list[dict] | None = None) -> None:
        """`state`: this rank's saved state; `every_rank`: all ranks' (their streams' positions, and the counts rank
        0 takes over when the number of ranks changed)."""
        if every_rank is not None:
            state = merge_data_states(every_rank, own=state, same_world=len(every_rank) == self.world, rank=self.rank)
        old = {int(s): p for s, p in state["positions"].items()}
        new = relayout(old, state["n_streams"], self.n_streams, len(self.urls), self.cfg.seed)
        self.positions = {s: new[s] for s in self.positions}
        self.bad_base = {**self.bad_base, **state.get("bad", {})}
        self.samples = state.get("samples", 0)
        self.batches_seen = state.get("batches", 0) if state["n_streams"] == self.n_streams else 0

    def bad_samples(self) -> dict:
        out = dict(self.bad_base)
        for counts in self.bad_live.values():
            for k, v in counts.items():
                out[k] = out.get(k, 0) + v
        return {k: v for k, v in out.items() if v}

    def check_bad_fraction(self) -> None:
        bad = sum(v for k, v in self.bad_samples().items() if k not in SHARD_KINDS)
        total = bad + self.samples
        if total >= 100 and bad / total > self.cfg.max_bad_fraction:
            raise DataError(
                f"{bad} of {total} samples were bad ({bad / total:.1%} > data.max_bad_fraction "
                f"{self.cfg.max_bad_fraction:g}): {self.bad_samples()}; check the shards named in the log")

    def stats(self) -> dict:
        return {"bad_samples": self.bad_samples()}

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()  # the generator's exit shuts the DataLoader's workers down
            self._loader = None

    def batches(self, resolution: int, micro: int, accum: int = 1):
        """Endless iterator of batches at `resolution`, starting from the recorded positions (`accum`: unused, a
        rank's stream is the same however its batches are grouped into steps)."""
        self.close()
        self._loader = self._batches(resolution, micro)
        return self._loader

    def _batches(self, resolution: int, micro: int):
        c = self.cfg
        opt = ReadOptions(resolution=resolution, flip=c.flip, small_images=c.small_images, max_pixels=c.max_pixels,
                          retries=c.retries, backoff_s=c.retry_backoff_s, block_size=c.block_size_mb << 20,
                          text_len=self.text_cfg.max_tokens if self.text_cfg.encoder == "precomputed" else 0,
                          text_dim=self.text_cfg.dim, caption_key=c.caption_key)
        ds = ShardDataset(self.urls, c.seed, self.rank, self.world, self.workers, self.positions, micro, opt,
                          self.storage_options, rotate=self.batches_seen % max(1, self.workers),
                          window=c.shuffle_buffer)
        kw = dict(num_workers=self.workers, prefetch_factor=c.prefetch, persistent_workers=False,
                  worker_init_fn=ignore_stop_signals) if self.workers else {}
        loader = torch.utils.data.DataLoader(ds, batch_size=None, pin_memory=self.pin_memory, **kw)
        self.bad_base = self.bad_samples()  # fold the previous loader's worker counts in
        self.bad_live = {}
        try:
            yield from self._consume(loader)
        except DataError as e:  # raised in a worker: the DataLoader wraps it with the worker's traceback
            raise DataError(str(e).strip().splitlines()[-1].removeprefix("pixeldiff.shards.DataError: ")) from None

    def _consume(self, loader):
        for batch in loader:
            s = batch["stream"]
            self.positions[s] = Position(*batch["position"])
            self.bad_live[s] = batch["bad"]
            self.samples += len(batch["key"])
            self.batches_seen += 1
            self.check_bad_fraction()
            yield batch
