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

The stages live in three files: the shard list in `pixeldiff/shardlist.py`, reading one shard in
`pixeldiff/shardread.py`, and here the order, positions, the dataset the workers run and `ShardSource`.
"""

from __future__ import annotations

import atexit
import itertools
import random
import signal
import sys
import weakref
from dataclasses import dataclass

import torch

from pixeldiff.devdecode import decode_jpegs
from pixeldiff.evaluate import held_out
from pixeldiff.shardlist import DataError, check_protocols, shard_list
from pixeldiff.buckets import bucket_sizes
from pixeldiff.shardread import BAD_KINDS, SHARD_KINDS, Bad, ReadOptions, decode_sample, read_shard_raw
from pixeldiff.storage import storage_options



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
    pending: list | None = None  # aspect buckets: [shard, key index, epoch] of samples read but not yet batched

    def as_list(self) -> list:
        return [self.epoch, self.next, self.offset, self.remaining, self.taken, self.pending]


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
    for p in pos.values():  # samples waiting in a bucket were never trained on: their shards are read again
        done.difference_update(u for u, _, ep in (p.pending or []) if ep == e)
    left = [i for i in epoch_order(n_shards, seed, e) if i not in done]
    return {s: Position(e, 0, 0, left[s::new_streams]) for s in range(new_streams)}


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

    def _replay(self, pending: list, log) -> dict[int, list]:
        """The bucket buffers a position left: its pending samples, read again from their shards (each shard scanned
        from its start to the last one needed, undecoded) and decoded, each bucket in its recorded order."""
        want: dict[int, set] = {}
        for u, k, _ in pending:
            want.setdefault(u, set()).add(k)
        raw: dict = {}
        for u, keys in want.items():
            k = min(keys)
            for item in read_shard_raw(self.urls[u], self.opt, k, self.storage_options, log):
                if isinstance(item, Bad):
                    continue  # counted when first read
                if k in keys:
                    raw[u, k] = item
                k += 1
                if k > max(keys):
                    break
        buffers: dict[int, list] = {}
        for u, k, ep in pending:
            if (u, k) not in raw:  # the shard changed or cannot be read now: that sample is lost, the rest kept
                log(f"could not read again a sample waiting in a bucket ({self.urls[u]}, key {k})")
                continue
            item = decode_sample(*raw[u, k], self.opt, self.seed + ep)
            if not isinstance(item, Bad):
                buffers.setdefault(item["bucket"], []).append((item, [u, k, ep]))
        return buffers

    def _keys(self, lst, pos: Position, counts: dict, quiet: list, log, stream: int = 0):
        """(shard index in `lst`, key index in that shard, url, key, parts) for the epoch's keys from `pos`'s window
        start; whole-shard problems are counted (unless quiet[0]: a restart reading a window whose problems the
        checkpoint counted already)."""
        gave_up = 0  # shards given up on after data.retries in this pass: skipped data, within data.max_bad_fraction
        for i in range(pos.next, len(lst)):
            url = self.urls[lst[i]]
            k = pos.offset if i == pos.next else 0
            for item in read_shard_raw(url, self.opt, k, self.storage_options, log):
                if isinstance(item, Bad):
                    if not quiet[0]:
                        counts[item.kind] += 1
                        if item.kind != "truncated_tar":
                            log(f"{item.kind}: {url}")
                    if item.kind == "read_error":
                        gave_up += 1
                        if gave_up > self.opt.max_unreadable * len(lst):
                            raise DataError(
                                f"data stream {stream}: {gave_up} of the {len(lst)} shards of this pass could not be "
                                f"read after data.retries ({self.opt.retries}), more than data.max_bad_fraction "
                                f"{self.opt.max_unreadable:g} of them (e.g. {url}): not skipped further; check the "
                                f"storage endpoint (data.s3.endpoint_url), the credentials and the network, then "
                                f"run again to resume")
                    continue
                if self.opt.holdout is not None and held_out(item[0], *self.opt.holdout):
                    k += 1  # held out for evaluation: counted in the shard's key index, never decoded or trained on
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

        # one buffer per bucket: a batch is `micro` samples of one bucket, emitted when its buffer fills; the rest
        # wait, and the position lists them (`pending`) so a restart reads them again
        buffers: dict[int, list] = self._replay(pos.pending, log) if pos.pending else {}
        while True:
            resumed = bool(pos.next or pos.offset or pos.taken)  # a pass over a whole shard list without one good sample is fatal
            yielded, taken = 0, pos.taken
            lst = pos.remaining if pos.remaining is not None else \
                stream_shards(len(self.urls), self.seed, pos.epoch, stream, n_streams)
            quiet = [taken > 0]
            keys = self._keys(lst, pos, counts, quiet, log, stream)
            while True:
                window = list(itertools.islice(keys, self.window))
                quiet[0] = False
                if not window:
                    break
                first, start = window[0][0], window[0][1]
                order = window_order(len(window), self.seed, pos.epoch, lst[first], start) if len(window) > 1 else [0]
                for slot in range(taken, len(window)):
                    i, k, url, key, parts = window[order[slot]]
                    window[order[slot]] = None  # decoded once: let the bytes go
                    item = decode_sample(key, parts, self.opt, self.seed + pos.epoch)
                    if isinstance(item, Bad):
                        counts[item.kind] += 1
                        if (item.kind, url) not in logged:
                            logged.add((item.kind, url))
                            log(f"skipping {item.kind} sample {item.key} in {url} (further ones in this shard counted silently)")
                        continue
                    yielded += 1
                    buf = buffers.setdefault(item["bucket"], [])
                    buf.append((item, [lst[i], k, pos.epoch]))
                    if len(buf) == self.micro:
                        del buffers[item["bucket"]]
                        pending = [ref for b in sorted(buffers) for _, ref in buffers[b]] or None
                        here = Position(pos.epoch, first, start, pos.remaining, slot + 1, pending)
                        yield collate([it for it, _ in buf], stream, here, counts, self.opt)
                taken = 0
            if yielded == 0 and lst and not resumed:
                raise DataError(f"data stream {stream}: not one readable sample in {len(lst)} shard(s) "
                                f"(e.g. {self.urls[lst[0]]}): {dict((k, v) for k, v in counts.items() if v)}; "
                                f"check data.shards, the credentials and data.s3.endpoint_url")
            pos = Position(pos.epoch + 1, 0, 0, None)


def collate(items: list[dict], stream: int, pos: Position, counts: dict, opt: ReadOptions | None = None) -> dict:
    """One micro-batch of one bucket. Embeddings (float16) are padded to the longest in the batch only; `to_device`
    pads them to data.text.max_tokens (`text_len`) and makes them float on the device."""
    jpegs = [j for j, it in enumerate(items) if "jpeg" in it]  # data.decode: device
    if jpegs:  # the slots of the JPEGs left encoded stay zero until `devdecode.decode_jpegs` fills them
        image = torch.zeros(len(items), 3, *items[jpegs[0]]["size"], dtype=torch.uint8)
        for j, it in enumerate(items):
            if "image" in it:
                image[j] = it["image"]
    else:
        image = torch.stack([it["image"] for it in items])
    batch = {
        "image": image,  # (B, 3, h, w) uint8, one bucket
        "caption": [it["caption"] for it in items],
        "key": [it["key"] for it in items],
        "stream": stream,
        "position": pos.as_list(),
        "bad": dict(counts),
        "kept": sum(it["kept"] for it in items),  # pixels kept by the bucket crop, summed over the batch
        "kept_square": sum(it["kept_square"] for it in items),  # ... and by a square crop
    }
    if jpegs:  # one tensor of all their bytes: one shared-memory file per batch, not one per JPEG
        data = [items[j]["jpeg"][0] for j in jpegs]
        batch["jpeg"] = {"data": torch.frombuffer(bytearray(b"".join(data)), dtype=torch.uint8),
                         "ends": list(itertools.accumulate(map(len, data))), "slots": jpegs,
                         "boxes": [items[j]["jpeg"][1] for j in jpegs], "flips": [items[j]["jpeg"][2] for j in jpegs],
                         "kept": [(items[j]["kept"], items[j]["kept_square"]) for j in jpegs]}
    if "emb" in items[0]:
        B, D, n = len(items), items[0]["emb"].shape[1], max(it["emb"].shape[0] for it in items)
        emb, mask = torch.zeros(B, n, D, dtype=torch.float16), torch.zeros(B, n, dtype=torch.bool)
        for j, it in enumerate(items):
            emb[j, : len(it["emb"])], mask[j, : len(it["mask"])] = it["emb"], it["mask"]
        batch["emb"], batch["mask"], batch["text_len"] = emb, mask, opt.text_len if opt else n
    return batch


def merge_data_states(states: list[dict], own: dict, same_world: bool, rank: int = 0) -> dict:
    """One rank's data state for a restart, from every rank's saved state: all streams' positions
    (so a different layout can be dealt fairly), and this rank's counts (rank 0 takes all of them
    when the number of ranks changed)."""
    positions: dict = {}
    for r, st in enumerate(states):  # each rank's own streams (a rank's state also lists the others', never advanced)
        per_rank = max(1, st["n_streams"] // len(states))
        positions.update({s: p for s, p in st["positions"].items() if int(s) // per_rank == r})
    out = {**own, "positions": positions}
    if not same_world:
        bad: dict = {}
        for st in states:
            for k, v in st.get("bad", {}).items():
                bad[k] = bad.get(k, 0) + v
        out["bad"] = bad if rank == 0 else {}
        out["samples"] = sum(st.get("samples", 0) for st in states) if rank == 0 else 0
        buckets: dict = {}
        for st in states:
            for k, v in st.get("buckets", {}).items():
                buckets[k] = buckets.get(k, 0) + v
        out["buckets"] = buckets if rank == 0 else {}
        out["kept"] = [sum(st.get("kept", [0.0, 0.0])[i] for st in states) for i in (0, 1)] if rank == 0 else [0.0, 0.0]
    return out


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker ignores the signals that stop a job: Slurm (scancel, preemption, the time limit's USR2) and
    Ctrl-C signal every process of a step or a terminal's process group, workers included, and a worker that died
    of one would fail the main process mid-step. The main process decides; its loader stops the workers."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


_LIVE_LOADERS: weakref.WeakSet = weakref.WeakSet()  # DataLoader iterators whose workers may still run
_AT_EXIT = False


def _stop_at_exit(batches) -> None:
    """Stop this loader's workers when the interpreter exits, if nothing stopped them before. An iterator held in a
    reference cycle (a traceback's frames) is not collected before the exit, and multiprocessing's exit handler
    sends the workers SIGTERM, which they ignore, then waits for them: forever. This handler, registered after
    multiprocessing's, runs before it and lets the workers finish as the DataLoader does it (no signal)."""
    global _AT_EXIT
    if not hasattr(batches, "_shutdown_workers"):
        return
    if not _AT_EXIT:  # at the first loader with workers: multiprocessing registered its handler when they started
        atexit.register(lambda: [stop_workers(b) for b in list(_LIVE_LOADERS)])
        _AT_EXIT = True
    _LIVE_LOADERS.add(batches)


def _queue_usable(q) -> bool:
    """Whether a multiprocessing queue can still deliver: not closed, and its finalizer (a weakref callback, which the
    garbage collector runs when it collects the queue's cycle) has not told its feeder thread to stop."""
    fin = getattr(q, "_close", None)
    return not getattr(q, "_closed", False) and (fin is None or fin.still_active())


def stop_workers(batches) -> None:
    """Stop a DataLoader iterator's workers, now, whatever state it is in. torch's own shutdown puts None on each
    worker's index queue, then falls back to SIGTERM, which our workers ignore. That is enough when the stream is
    closed, or left open at the interpreter's exit. But when the garbage collector finalizes a forgotten stream (a
    cycle), it has already closed those queues (their finalizers are weakref callbacks, run before the generator's
    `finally`): the None never arrives, and the workers would run, and the exit wait for them, forever. Then, and
    for any worker still alive after torch's shutdown, SIGKILL (its pid first taken out of torch's SIGCHLD check)."""
    workers = list(getattr(batches, "_workers", ()))

    def kill_left():
        if getattr(batches, "_worker_pids_set", False):  # else torch's SIGCHLD handler reports the kill as a failure
            torch.utils.data._utils.signal_handling._remove_worker_pids(id(batches))
            batches._worker_pids_set = False
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(5)

    if workers and not all(_queue_usable(q) for q in getattr(batches, "_index_queues", ())):
        kill_left()
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    kill_left()


class ShardSource:
    """The trainer's view: batches for a stage, the position to checkpoint, bad-sample counts."""

    def __init__(self, data_cfg, text_cfg, rank: int = 0, world: int = 1, pin_memory: bool = False, patch: int = 1,
                 holdout: tuple | None = None, device: torch.device | None = None):
        self.cfg, self.text_cfg, self.rank, self.world = data_cfg, text_cfg, rank, world
        self.holdout = holdout  # (fraction, seed) of the keys held out for evaluation (evaluate.training_holdout)
        self.patch = patch  # bucket sides are multiples of the model's patch size
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
        self.buckets: dict[str, int] = {}  # "HxW" -> samples consumed from that bucket (this rank, the whole run)
        self.kept = [0.0, 0.0]  # sums over consumed samples: fraction of pixels kept by the bucket crop, by a square one
        self.batches_seen = 0  # batches consumed: the DataLoader deals them round-robin over the streams
        self.pin_memory = pin_memory
        self.device = device or torch.device("cpu")  # where data.decode: device decodes the JPEGs
        self._loader = None

    # positions of this rank's streams
    def state_dict(self) -> dict:
        return {"n_streams": self.n_streams, "positions": {s: p.as_list() for s, p in self.positions.items()},
                "bad": self.bad_samples(), "samples": self.samples, "batches": self.batches_seen,
                "buckets": dict(self.buckets), "kept": list(self.kept)}

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
        self.buckets, self.kept = dict(state.get("buckets", {})), list(state.get("kept", [0.0, 0.0]))
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
        """For metrics.jsonl: bad-sample counts; samples per bucket ("HxW", this rank's, cumulative); and the mean
        fraction of each image's pixels the crops threw away: `bucket` (the crop done) and `square` (what a square
        centre crop of the same images would have thrown away)."""
        n = sum(self.buckets.values())
        waste = {"bucket": round(1 - self.kept[0] / n, 4), "square": round(1 - self.kept[1] / n, 4)} if n else {}
        return {"bad_samples": self.bad_samples(), "buckets": dict(self.buckets), "crop_waste": waste}

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
                          text_dim=self.text_cfg.dim, caption_key=c.caption_key,
                          buckets=bucket_sizes(resolution, self.patch, c.max_aspect) if c.buckets == "aspect" else (),
                          max_unreadable=c.max_bad_fraction, holdout=self.holdout,
                          jpeg_on_device=c.decode == "device")
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
            raise DataError(str(e).strip().splitlines()[-1].removeprefix(f"{DataError.__module__}.DataError: ")) from None

    def _consume(self, loader):
        batches = iter(loader)
        _stop_at_exit(batches)
        try:
            yield from self._account(batches)
        finally:
            # the workers go now, whatever ended the stream: an exception's traceback keeps this frame (and the
            # iterator) alive, and the workers ignore SIGTERM (Slurm's), so the interpreter's exit, which joins
            # them after a SIGTERM, would wait for them forever
            stop_workers(batches)

    def _account(self, batches):
        for batch in batches:
            n = len(batch["key"])
            failed = decode_jpegs(batch, self.device) if "jpeg" in batch else 0  # data.decode: device
            if failed != 0:  # counted as the training process's own "stream" -1; None: not one image decoded
                failed = n if failed is None else failed
                here = self.bad_live.setdefault(-1, dict.fromkeys(BAD_KINDS, 0))
                here["corrupt_image"] += failed
            s = batch["stream"]
            self.positions[s] = Position(*batch["position"])
            self.bad_live[s] = batch["bad"]
            self.batches_seen += 1  # a dropped batch too: the DataLoader deals batches round-robin over the streams
            self.samples += n - failed
            if failed < n:
                name = "x".join(map(str, batch["image"].shape[-2:]))
                self.buckets[name] = self.buckets.get(name, 0) + n - failed  # as `samples`: not the copies
                self.kept = [self.kept[0] + batch["kept"], self.kept[1] + batch["kept_square"]]
            self.check_bad_fraction()
            if failed < n:
                yield batch
