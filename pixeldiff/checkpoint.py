"""Checkpoints: `step-NNNNNNNN/` directories, sharded with torch.distributed.checkpoint, valid only with a marker.

Layout of one checkpoint (a local directory or an s3:// prefix):

    step-00012000/
      .metadata, __R_0.distcp        model, EMA and optimizer state (DCP: each rank writes its own shards;
                                     under DDP its share of the replicated state, pixeldiff/replicated.py)
      train_state-rankNNNNN.pt       one per rank: step, stage, re-split schedule, data position
      manifest.yaml, provenance.json the resolved manifest and code/package versions (rank 0)
      COMPLETE                       written last, by rank 0, after every rank finished

A save (`Saver.save`): rank 0 prepares the destination (`begin`), every rank writes its train
state, then all ranks write their shards together (`dcp.save`, in a background thread when
asynchronous), then rank 0 `commit`s: locally it renames `.tmp-step-N/` to `step-N/`, then
writes the marker; on S3 (no rename) the shards were written to `step-N/` directly and the
marker alone makes it count. Either way a crash at any moment leaves the previous valid
checkpoint plus at most one directory without a marker, which `latest_valid` ignores (and
says so). DCP's save returns on rank 0 only after every rank's write finished, so the marker
follows them all. The newest `keep` valid checkpoints stay; pruning deletes a checkpoint's
marker first, so a half-deleted one is never mistaken for a valid one.

`CheckpointManager` is what the trainer holds: a checkpoint's named parts, restored and saved together.
Loading (`load_into`) reads the shards into the current model's layout whatever the number of ranks
or the parallelism that saved them (DCP reshards); `load` reads whole state dicts in one process.
"""

from __future__ import annotations

import io
import os
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from pixeldiff import replicated

MARKER = "COMPLETE"
PARTS = ("model", "ema", "optimizer")  # in the DCP shards; plus one train_state-rankNNNNN.pt per rank
# Tests only: hold the commit of this step's checkpoint (before its marker) for a long time, so that a test can
# kill the job in the middle of a save.
HOLD_COMMIT_ENV = "PIXELDIFF_TEST_HOLD_COMMIT_AT_STEP"


# DCP warns on every single-process save and load that it assumes one process, which is what we mean
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized",
                        category=UserWarning)


class CheckpointError(Exception):
    """A checkpoint path that cannot be used; the message says why."""


# ------------------------------------------------------------------ where checkpoints live


def is_remote(root) -> bool:
    return "://" in str(root)


def _join(root, name: str):
    return f"{str(root).rstrip('/')}/{name}" if is_remote(root) else Path(root) / name


def _fs(url: str, storage_options: dict | None):
    """-> (fsspec filesystem, path without the scheme) for an s3:// URL."""
    from fsspec.core import url_to_fs

    return url_to_fs(url, **(storage_options or {}))


def step_dir(root, step: int):
    return _join(root, f"step-{step:08d}")


def _name(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def _step_of(path) -> int | None:
    name = _name(path)
    if not name.startswith("step-"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


def list_checkpoints(root, storage_options: dict | None = None) -> tuple[list, list]:
    """-> (valid, partial) checkpoint directories, each sorted by step (Paths, or s3:// URLs for a remote root)."""
    if is_remote(root):
        fs, base = _fs(str(root), storage_options)
        fs.invalidate_cache()  # another process (a rank, an earlier job) may have written since the last listing
        try:
            entries = fs.ls(base, detail=True)
        except FileNotFoundError:
            return [], []
        scheme = str(root).split("://", 1)[0]
        dirs = sorted((f"{scheme}://{e['name'].rstrip('/')}" for e in entries
                       if e.get("type") == "directory" and _step_of(e["name"]) is not None), key=_step_of)
        done = [fs.exists(f"{_fs_path(d)}/{MARKER}") for d in dirs]
    else:
        root = Path(root)
        if not root.is_dir():
            return [], []
        dirs = sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of)
        done = [(p / MARKER).exists() for p in dirs]
    return [d for d, ok in zip(dirs, done) if ok], [d for d, ok in zip(dirs, done) if not ok]


def _fs_path(url: str) -> str:
    return url.split("://", 1)[1]


def latest_valid(root, log=print, storage_options: dict | None = None):
    valid, partial = list_checkpoints(root, storage_options)
    newest = _step_of(valid[-1]) if valid else -1
    for p in partial:
        if _step_of(p) > newest:
            log(f"ignoring incomplete checkpoint {p} (no {MARKER} marker: the save was interrupted)")
    return valid[-1] if valid else None


def has_marker(path, storage_options: dict | None = None) -> bool:
    if is_remote(path):
        fs, p = _fs(str(path), storage_options)
        return fs.exists(f"{p}/{MARKER}")
    return (Path(path) / MARKER).exists()


# ------------------------------------------------------------------ the save protocol


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_dir(root: Path, step: int) -> Path:
    return Path(root) / f".tmp-step-{step:08d}"


def write_dir(root, step: int):
    """Where the ranks write a save: a hidden temporary directory locally, step-N/ itself on S3."""
    return step_dir(root, step) if is_remote(root) else _tmp_dir(root, step)


def begin(root, step: int, storage_options: dict | None = None):
    """Prepare an empty destination for a save (one process, before any rank writes). -> write_dir(root, step)."""
    dest = write_dir(root, step)
    if is_remote(root):  # left by a job that died while saving this step: never valid (no marker), clear it
        fs, p = _fs(str(dest), storage_options)
        if fs.exists(p):
            _remove_remote(fs, p)
        return dest
    Path(root).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    return dest


def write_files(dest, files: dict[str, bytes], storage_options: dict | None = None) -> None:
    """Write small files (train state, manifest) into a save's destination; fsynced locally."""
    for name, data in files.items():
        if is_remote(dest):
            fs, p = _fs(str(dest), storage_options)
            fs.pipe_file(f"{p}/{name}", data)
        else:
            with open(Path(dest) / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _writer(dest, storage_options: dict | None):
    if is_remote(dest):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(str(dest), sync_files=False, **(storage_options or {}))
    return dcp.FileSystemWriter(str(dest), sync_files=True)


def _reader(path, storage_options: dict | None):
    if is_remote(path):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(str(path), **(storage_options or {}))
    return dcp.FileSystemReader(str(path))


def write_state(dest, state: dict, process_group=None, storage_options: dict | None = None) -> None:
    """Every rank at once: write its shards of `state` (model, EMA, optimizer state dicts) with DCP."""
    dcp.save(state, storage_writer=_writer(dest, storage_options), process_group=process_group,
             no_dist=not torch.distributed.is_initialized())


def _hold_if_asked(step: int) -> None:
    if os.environ.get(HOLD_COMMIT_ENV) == str(step):
        time.sleep(600)


def commit(root, step: int, keep: int, storage_options: dict | None = None):
    """After every writer finished (one process): make step-N/ count by writing its marker last. -> (path, bytes)."""
    final = step_dir(root, step)
    if is_remote(root):
        fs, p = _fs(str(final), storage_options)
        _hold_if_asked(step)
        fs.pipe_file(f"{p}/{MARKER}", f"step {step}\n".encode())
        nbytes = fs.du(p)
    else:
        root, tmp = Path(root), _tmp_dir(root, step)
        for f in tmp.iterdir():  # DCP fsyncs its shard files; the small files and the directory itself here
            if f.is_file() and not f.name.endswith(".distcp"):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a partial save of the same step from an earlier, interrupted job
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _hold_if_asked(step)
        with open(final / MARKER, "w") as f:
            f.write(f"step {step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(final)
        nbytes = sum(p.stat().st_size for p in final.iterdir())
    prune(root, keep, storage_options)
    return final, nbytes


def _remove_remote(fs, p: str) -> None:
    if fs.exists(f"{p}/{MARKER}"):
        fs.rm_file(f"{p}/{MARKER}")  # first: from here on it is a partial checkpoint, never a valid one
    fs.rm(p, recursive=True)


def remove(path, storage_options: dict | None = None) -> None:
    """Delete one checkpoint, its marker first."""
    if is_remote(path):
        fs, p = _fs(str(path), storage_options)
        _remove_remote(fs, p)
        return
    path = Path(path)
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def prune(root, keep: int, storage_options: dict | None = None) -> None:
    """Keep the newest `keep` valid checkpoints; drop older ones and partial ones older than the newest valid."""
    valid, partial = list_checkpoints(root, storage_options)
    for p in valid[:-keep] if keep > 0 else []:
        remove(p, storage_options)
    if valid:
        newest = _step_of(valid[-1])
        for p in partial:
            if _step_of(p) < newest:
                remove(p, storage_options)


# ------------------------------------------------------------------ reading


def _read_bytes(path, storage_options: dict | None) -> bytes:
    if is_remote(path):
        fs, p = _fs(str(path), storage_options)
        return fs.cat_file(p)
    return Path(path).read_bytes()


def _list_names(path, storage_options: dict | None) -> list[str]:
    if is_remote(path):
        fs, p = _fs(str(path), storage_options)
        return [_name(n) for n in fs.ls(p, detail=False)]
    return [p.name for p in Path(path).iterdir()]


def rank_states(path, storage_options: dict | None = None) -> dict[int, dict]:
    """rank -> train state saved by that rank (`train_state-rankNNNNN.pt`)."""
    out = {}
    for name in _list_names(path, storage_options):
        if name.startswith("train_state-rank") and name.endswith(".pt"):
            data = _read_bytes(_join(path, name), storage_options)
            out[int(name[len("train_state-rank"):-3])] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return out


def _require_complete(path, storage_options: dict | None) -> None:
    if not has_marker(path, storage_options):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker); pass a run directory or a "
                              f"step-N/ directory that has one")
    if not is_remote(path) and not (Path(path) / ".metadata").exists() and (Path(path) / "model.pt").exists():
        raise CheckpointError(f"{path} was written by an older pixeldiff (one torch.save file per part); this version "
                              f"reads only sharded (torch.distributed.checkpoint) checkpoints: resume with the older "
                              f"version, or start the run afresh")


def load_into(path, state: dict, process_group=None, storage_options: dict | None = None) -> None:
    """Every rank at once: fill `state` (state dicts of the current model/EMA/optimizer, sharded or not) in place."""
    _require_complete(path, storage_options)
    dcp.load(state, storage_reader=_reader(path, storage_options), process_group=process_group,
             no_dist=not torch.distributed.is_initialized())


def load(path, names=PARTS, storage_options: dict | None = None) -> dict:
    """Whole (unsharded) state dicts of the named parts, read in this one process: name -> state dict."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    _require_complete(path, storage_options)
    return _load_state_dict_from_keys(set(names), storage_reader=_reader(path, storage_options),
                                      process_group=None) if names else {}


# ------------------------------------------------------------------ saving, possibly in the background


class Saver:
    """Writes checkpoints with the protocol above; at most one save in flight.

    `save(...)` returns once the loop may go on: after the write (synchronous) or after a CPU
    copy of the state was taken (background). A finished save is reported once, by `poll()`
    (non-blocking) or `wait()`, as a record for the ledger: step, checkpoint, bytes (rank 0),
    seconds_blocked (the loop's time inside `save`, waiting for the previous save included) and
    seconds_write (from the start of the save to its marker)."""

    def __init__(self, root, keep: int, rank: int, storage_options: dict | None = None, process_group=None,
                 barrier=lambda: None):
        self.root, self.keep, self.rank = root, keep, rank
        self.storage_options, self.process_group, self.barrier = storage_options, process_group, barrier
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[Future, dict] | None = None
        from torch.distributed.checkpoint.staging import BlockingAsyncStager

        # on GPUs: pinned CPU buffers, allocated at the first save and refilled at every later one
        self._stager = BlockingAsyncStager(cache_staged_state_dict=torch.cuda.is_available())

    def save(self, step: int, state: dict, files: dict[str, bytes], background: bool) -> list[dict]:
        """All ranks: write `state` (DCP, sharded) and this rank's `files`. -> records of saves that finished meanwhile."""
        t0 = time.perf_counter()
        finished = self.wait()  # one save at a time: the previous one must be complete (and committed)
        if self.rank == 0:
            begin(self.root, step, self.storage_options)
        self.barrier()
        dest = write_dir(self.root, step)
        write_files(dest, files, self.storage_options)
        record = {"step": step, "async": background}
        if background:
            staged = self._stager.stage(state)  # a CPU copy: training may change the live tensors now
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixeldiff-checkpoint")
            future = self._executor.submit(self._write, dest, staged, step, t0, record)
        else:
            future = Future()
            future.set_result(self._write(dest, state, step, t0, record))
        record["seconds_blocked"] = round(time.perf_counter() - t0, 3)
        self._pending = (future, record)
        return finished

    def _write(self, dest, state: dict, step: int, t0: float, record: dict) -> dict:
        write_state(dest, state, self.process_group, self.storage_options)
        if self.rank == 0:  # dcp.save returned on rank 0: every rank's shards and the metadata are written
            path, nbytes = commit(self.root, step, self.keep, self.storage_options)
            record.update(checkpoint=str(path), bytes=nbytes)
        record["seconds_write"] = round(time.perf_counter() - t0, 3)
        return record

    def poll(self) -> list[dict]:
        """-> [record] when the save in flight has finished (raising its error if it failed), else []."""
        if self._pending is None or not self._pending[0].done():
            return []
        return self.wait()

    def wait(self) -> list[dict]:
        """Block until the save in flight (if any) is complete. -> its record, or []."""
        if self._pending is None:
            return []
        future, record = self._pending
        self._pending = None
        try:
            future.result()
        except Exception as e:
            raise CheckpointError(f"writing the checkpoint of step {record['step']} to {self.root} failed: {e}") from e
        return [record]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


# ------------------------------------------------------------------ the trainer's named parts


class ModelState:
    """A module (and, when given, its optimizer) as a checkpoint part, keyed by parameter name: this rank's shards
    under FSDP, so it reshards on load. `ModelState(m)` is the module's part, `ModelState(m, opt)` the optimizer's."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint import state_dict as sd

        if self.optimizer is None:
            return sd.get_model_state_dict(self.module)
        return sd.get_optimizer_state_dict(self.module, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint import state_dict as sd

        if self.optimizer is None:
            sd.set_model_state_dict(self.module, state)
        else:
            sd.set_optimizer_state_dict(self.module, self.optimizer, state)


class CheckpointManager:
    """Restores and saves a checkpoint's named parts on every rank.

    `sharded`: name -> part (state_dict/load_state_dict) written with DCP (PARTS: model, optimizer, ema).
    `train`: the train state, the top level of each rank's `train_state-rankNNNNN.pt`; `data`: the data position,
    under its "data" key (its load_state_dict also gets every rank's, for a restart on another number of ranks).
    `files()`: extra files rank 0 writes (resolved manifest, provenance). `on_saved(record)`: called once for each
    finished save (the ledger record)."""

    def __init__(self, root, keep: int, async_save: bool, rank: int, world: int, sharded: dict, train, data,
                 files, on_saved, storage_options: dict | None = None, process_group=None, barrier=lambda: None,
                 broadcast=lambda obj: obj, log=print, replicated: bool = False, device=None):
        self.root, self.async_save, self.rank, self.world = root, async_save, rank, world
        self.replicated, self.device = replicated and world > 1, device  # DDP: each rank saves and reads a share
        self.sharded, self.train, self.data, self.files, self.on_saved = sharded, train, data, files, on_saved
        self.storage_options, self.process_group, self.broadcast, self.log = storage_options, process_group, broadcast, log
        self.saver = Saver(root, keep, rank, storage_options, process_group, barrier=barrier)
        self.saved_step: int | None = None

    def restore(self) -> str | None:
        """Load the latest valid checkpoint into every part (all ranks). -> its path, or None to start afresh."""
        path = None
        if self.rank == 0:  # one decision for all ranks
            path = latest_valid(self.root, log=self.log, storage_options=self.storage_options)
        path = self.broadcast(None if path is None else str(path))
        if path is None:
            return None
        if not is_remote(path):
            path = Path(path)
        for part in self.sharded.values():  # a part may refuse a checkpoint before anything is read (optim.py)
            getattr(part, "check_checkpoint", lambda *_: None)(path, self.storage_options)
        state = {name: part.state_dict() for name, part in self.sharded.items()}  # the layout DCP fills
        mine = replicated.share(state, self.rank, self.world) if self.replicated else state
        load_into(path, mine, self.process_group, self.storage_options)
        if self.replicated:  # the checkpoint is read once: each share goes to the other ranks
            state = replicated.broadcast_shares(state, mine, self.rank, self.world, self.device)
        for name, part in self.sharded.items():
            part.load_state_dict(state[name])
        ranks = rank_states(path, self.storage_options)  # rank -> what that rank saved
        own = ranks.get(self.rank, ranks[0])
        self.train.load_state_dict(own)
        self.data.load_state_dict(own["data"], [r["data"] for r in ranks.values()])
        self.saved_step = self.train.step
        return str(path)

    def save(self, step: int, final: bool = False) -> None:
        """Save at `step` (all ranks): in the background when checkpoint.async_save, except a `final` save, which is
        complete (marker written) when this returns. A step already saved is not saved again."""
        if self.saved_step != step:
            files = {f"train_state-rank{self.rank:05d}.pt": torch_bytes({**self.train.state_dict(), "data": self.data.state_dict()})}
            if self.rank == 0:
                files.update(self.files())
            state = {name: part.state_dict() for name, part in self.sharded.items()}
            if self.replicated:  # staged and written by one rank each, not by every rank
                state = replicated.share(state, self.rank, self.world)
            self._report(self.saver.save(step, state, files, background=self.async_save and not final))
            self.saved_step = step
        if final:
            self._report(self.saver.wait())

    def poll(self, wait: bool = False) -> None:
        """Report a background save that finished since the last call (`wait`: block until it has)."""
        self._report(self.saver.wait() if wait else self.saver.poll())

    def _report(self, records: list[dict]) -> None:
        for r in records:
            self.on_saved(r)

    def close(self) -> None:
        self.saver.close()
