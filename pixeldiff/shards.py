"""WebDataset shards from s3:// or local paths: resumable, deterministic, and never stopped by bad data.

The pipeline, in stages:

    shard list (brace pattern / list / list file)
      -> epoch order (a permutation from (seed, epoch))
      -> streams: stream s = rank * workers + worker takes order[s::streams]
      -> read tar (retry transient errors, skip what cannot be read)
      -> decode, check, resize shorter side, centre crop, optional flip
      -> batches of `micro` samples, each carrying its stream's position

Resume guarantee: a position is (epoch, index into the stream's shard list, samples
already consumed in that shard) and is recorded for every stream from the batches the
trainer actually consumed (not what workers prefetched). Restarted with the same number
of streams (ranks x workers) a run continues exactly: no sample replayed or skipped.
With a different number, shards every old stream finished in the lowest recorded epoch are
dropped from that epoch's order and the rest are dealt to the new streams from the
start of each shard: nothing is skipped, and at most one partly read shard per old
stream is read again.
"""

from __future__ import annotations

import io
import random
import re
import signal
import sys
import tarfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pixeldiff.storage import storage_options

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BAD_KINDS = ("truncated_tar", "corrupt_image", "not_image", "missing_caption", "too_large", "too_small",
             "bad_embedding", "empty_shard", "shard_missing", "read_error")


class DataError(RuntimeError):
    """The data cannot feed the run (too many bad samples, no shards); the message says what to check."""


# ------------------------------------------------------------------ shard lists

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`train-{000..002}.tar` -> train-000.tar, train-001.tar, train-002.tar (zero padding kept);
    `{a,b}` lists; several groups multiply."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        if int(b) < int(a):
            raise DataError(f"shard pattern {pattern!r}: bad range {{{body}}}, the end is before the start")
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        options = [f"{i:0{width}d}" for i in range(int(a), int(b) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise DataError(f"shard pattern {pattern!r}: bad brace group {{{body}}}; use {{000..009}} or {{a,b}}")
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def shard_list(spec, storage_options: dict | None = None) -> list[str]:
    """A brace pattern, a list of URLs/patterns, or a file (local or s3://) listing one per line."""
    items = spec if isinstance(spec, list) else [spec]
    out: list[str] = []
    for item in items:
        if not item.endswith(".tar") and "{" not in item:
            import fsspec

            with fsspec.open(item, "rt", **_options_for(item, storage_options)) as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
            out += [u for ln in lines for u in expand_braces(ln)]
        else:
            out += expand_braces(item)
    if not out:
        raise DataError(f"data.shards {spec!r} names no shards")
    return out


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
    offset: int = 0  # samples (keys) already consumed in that shard
    remaining: list | None = None  # after a re-layout: this stream's explicit shard list for `epoch`

    def as_list(self) -> list:
        return [self.epoch, self.next, self.offset, self.remaining]


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


def _group_members(tar):
    """Yield (key, {ext: bytes}) for consecutive members sharing a key.

    A group is yielded as soon as the next member's header shows a new key, before that
    member's data is read, so a tar cut inside a member still gives every whole sample before it.
    """
    key, parts = None, {}
    for info in tar:
        if not info.isfile():
            continue
        name = info.name.rsplit("/", 1)[-1]
        if "." not in name:
            continue
        stem, ext = name.split(".", 1)
        member_key = info.name[: len(info.name) - len(name)] + stem
        if member_key != key:
            if parts:
                yield key, parts
            key, parts = member_key, {}
        data = tar.extractfile(info).read()
        if len(data) != info.size:
            raise tarfile.ReadError(f"member {info.name} is cut short")
        parts[ext.lower()] = data
    if parts:
        yield key, parts


def decode_sample(key: str, parts: dict, opt: ReadOptions, flip_seed: int):
    """-> dict(image uint8 (3,R,R), caption, key[, emb, mask]) or Bad."""
    img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if img_ext is None:
        return Bad("not_image", key)
    if "txt" not in parts:
        return Bad("missing_caption", key)
    try:
        caption = parts["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
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
    """Yield decoded samples or Bad records for every key after the first `skip` keys of the shard.

    Transient read errors are retried with backoff, reopening the shard and skipping what was
    already yielded; then the rest of the shard is given up as one `read_error`.
    """
    import fsspec

    done, attempt = skip, 0
    while True:
        try:
            fs, path = fsspec.core.url_to_fs(url, **_options_for(url, storage_options))
            with fs.open(path, "rb", block_size=opt.block_size) as f:
                raw = CountingReader(f)
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
                                yield decode_sample(*pending, opt, flip_seed)
                            pending = (key, parts)
                    except (tarfile.TarError, EOFError) as e:
                        cut = e  # raised while reading the group after `pending`: pending itself is whole
                    end = tar.offset
                if cut is None:
                    raw.drain()
                    if raw.count < end + 512:  # no end-of-archive block: cut off inside a header
                        cut, pending = f"no end-of-archive marker after {raw.count} bytes", None
                if pending is not None:
                    done += 1
                    yield decode_sample(*pending, opt, flip_seed)
                if cut is not None:
                    log(f"truncated or corrupt tar {url} after {done} samples: {cut}")
                    yield Bad("truncated_tar", url)
                elif seen == 0:
                    yield Bad("empty_shard", url)
            return
        except FileNotFoundError:
            yield Bad("shard_missing", url)
            return
        except (tarfile.TarError, EOFError, ValueError) as e:
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


class ShardDataset(torch.utils.data.IterableDataset):
    """Endless batches for one rank; each DataLoader worker is one stream."""

    def __init__(self, urls, seed, rank, world, workers, positions: dict[int, Position], micro: int,
                 opt: ReadOptions, storage_options: dict | None, rotate: int = 0):
        self.urls, self.seed, self.rank, self.world, self.workers = urls, seed, rank, world, max(1, workers)
        self.rotate = rotate  # the DataLoader starts with worker 0: give it the stream whose batch is due next
        self.positions, self.micro, self.opt, self.storage_options = positions, micro, opt, storage_options

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
            good_before = pos.offset  # a pass over a whole shard list without one good sample is fatal
            yielded = 0
            lst = pos.remaining if pos.remaining is not None else \
                stream_shards(len(self.urls), self.seed, pos.epoch, stream, n_streams)
            while pos.next < len(lst):
                url = self.urls[lst[pos.next]]
                for item in read_shard(url, self.opt, pos.offset, self.storage_options, self.seed + pos.epoch, log):
                    if isinstance(item, Bad):
                        counts[item.kind] += 1
                        if item.kind in ("shard_missing", "empty_shard", "truncated_tar", "read_error"):
                            if item.kind != "truncated_tar":
                                log(f"{item.kind}: {url}")
                            continue  # not a sample position
                        pos.offset += 1
                        if (item.kind, url) not in logged:
                            logged.add((item.kind, url))
                            log(f"skipping {item.kind} sample {item.key} in {url} (further ones in this shard counted silently)")
                        continue
                    pos.offset += 1
                    yielded += 1
                    buf.append(item)
                    if len(buf) == self.micro:
                        yield collate(buf, stream, pos, counts)
                        buf = []
                pos.next += 1
                pos.offset = 0
            if yielded == 0 and lst and not good_before:
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
        bad = sum(v for k, v in self.bad_samples().items() if k not in ("empty_shard", "shard_missing", "read_error", "truncated_tar"))
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
                          text_dim=self.text_cfg.dim)
        ds = ShardDataset(self.urls, c.seed, self.rank, self.world, self.workers, self.positions, micro, opt,
                          self.storage_options, rotate=self.batches_seen % max(1, self.workers))
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
