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

Failures (`Saver`): a local disk without room for the save is refused before anything is written; a save that fails
on any rank fails on all of them together, is retried with backoff on S3 (`checkpoint.retries`), then raises
StorageError; what it wrote has no marker and is removed. Restores (`CheckpointManager.choose`, `check`) refuse
foreign or tampered-with checkpoints (CheckpointError) and fall back past damaged ones (pixeldiff/checkpoint_verify.py).

`CheckpointManager` is what the trainer holds: a checkpoint's named parts, restored and saved together.
Loading (`load_into`) reads the shards into the current model's layout whatever the number of ranks
or the parallelism that saved them (DCP reshards); `load` reads whole state dicts in one process.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from pixeldiff import replicated
from pixeldiff.checkpoint_verify import (SafeFileSystemReader, SafeKeysLoadPlanner, SafeLoadPlanner, UnsafeCheckpoint,
                                         damage, differences, read_metadata_bytes, safe_fsspec_reader, shape_differences,
                                         state_nbytes, tensor_shapes, torch_load)

MARKER = "COMPLETE"
DAMAGED = "DAMAGED"  # written (with the reason) when a restore finds a checkpoint damaged; its marker is then removed
PARTS = ("model", "ema", "optimizer")  # in the DCP shards; plus one train_state-rankNNNNN.pt per rank
# Tests only: hold the commit of this step's checkpoint (before its marker) for a long time, so that a test can
# kill the job in the middle of a save.
HOLD_COMMIT_ENV = "PIXELDIFF_TEST_HOLD_COMMIT_AT_STEP"
# Tests only: "RANK:SECONDS": that rank's background save ends SECONDS late, after its last collective, so that a test
# sees the ranks' saves finish at different times.
LATE_SAVE_END_ENV = "PIXELDIFF_TEST_LATE_SAVE_END"


# DCP warns on every single-process save and load that it assumes one process, which is what we mean
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized",
                        category=UserWarning)


class CheckpointError(Exception):
    """A checkpoint that must not be resumed (foreign, tampered with, unreadable); the message says why. Exit 2."""


class StorageError(Exception):
    """The checkpoint storage failed (disk full, S3 unreachable after the retries); the previous checkpoint is intact
    and is the one the next start resumes from. Exit 1; under Slurm the run stops (not requeued, no node blamed: the
    storage is every node's), and `pixeldiff-launch run` resumes it once the storage is fixed."""


def describe(e: BaseException, limit: int = 400) -> str:
    """One line for an error, a DCP CheckpointException included (its str() is every rank's traceback)."""
    if isinstance(e, CheckpointException):
        parts = [f"rank {r}: {describe(exc, 200)}" for r, (exc, _) in sorted(e.failures.items())]
        return "; ".join(parts[:2]) + (f" (and {len(parts) - 2} more ranks)" if len(parts) > 2 else "")
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _errnos(e: BaseException) -> set:
    """The errno values in an error, its causes and (DCP) every rank's failure."""
    out, seen = set(), set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno:
            out.add(x.errno)
        if isinstance(x, CheckpointException):
            stack += [exc for exc, _ in x.failures.values()]
        stack += [x.__cause__, x.__context__]
    return out


NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


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
        except Exception as e:  # noqa: BLE001 - endpoint down, credentials: the user must know, nothing is lost
            raise StorageError(f"cannot list the checkpoints in {root}: {describe(e)}; check that the endpoint "
                               f"(data.s3.endpoint_url) is up and the credentials, then run again") from None
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
            if _exists(_join(p, DAMAGED), storage_options):
                log(f"ignoring damaged checkpoint {p} (see its {DAMAGED} file)")
            else:
                log(f"ignoring incomplete checkpoint {p} (no {MARKER} marker: the save was interrupted)")
    return valid[-1] if valid else None


def _exists(path, storage_options: dict | None) -> bool:
    if is_remote(path):
        fs, p = _fs(str(path), storage_options)
        return fs.exists(p)
    return Path(path).exists()


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


def checkpoint_bytes(path) -> int:
    """The size of a local checkpoint directory's files."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def space_problem(root, step: int, estimate: int) -> str | None:
    """Local roots: why the save of `step` would not fit on its disk (None when it fits, or for S3). The space needed
    is the larger of `estimate` (the state's tensor bytes) and the newest valid checkpoint's size: a save needs room
    for itself beside the kept checkpoints, which are pruned only after its marker."""
    if is_remote(root):
        return None
    root = Path(root)
    where = root if root.exists() else next(p for p in root.parents if p.exists())
    valid, _ = list_checkpoints(root)
    last = checkpoint_bytes(valid[-1]) if valid else 0
    needed = max(estimate, last)
    free = shutil.disk_usage(where).free
    if free >= needed:
        return None
    return (f"not enough space for the checkpoint of step {step} in {root}: it needs about {_mb(needed)} "
            f"({'the size of the last checkpoint' if last >= estimate else 'the model, EMA and optimizer state'}), "
            f"{_mb(free)} are free. Nothing was written; "
            f"{f'the last checkpoint, {_name(valid[-1])}, is intact and is the one a new start resumes from' if valid else 'there is no checkpoint yet'}. "
            f"Free some space or point checkpoint.dir at a larger disk (it must hold checkpoint.keep + 1 checkpoints), "
            f"then run again")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


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
    """DCP's readers, with the metadata read through the restricted unpickler (checkpoint_verify)."""
    if is_remote(path):
        return safe_fsspec_reader(str(path), **(storage_options or {}))
    return SafeFileSystemReader(str(path))


def write_state(dest, state: dict, process_group=None, storage_options: dict | None = None) -> None:
    """Every rank at once: write its shards of `state` (model, EMA, optimizer state dicts) with DCP."""
    dcp.save(state, storage_writer=_writer(dest, storage_options), process_group=process_group,
             no_dist=not torch.distributed.is_initialized())


def _hold_if_asked(step: int) -> None:
    if os.environ.get(HOLD_COMMIT_ENV) == str(step):
        time.sleep(600)


def commit(root, step: int, keep: int, storage_options: dict | None = None, log=print):
    """After every writer finished (one process): make step-N/ count by writing its marker last. -> (path, bytes)."""
    final = step_dir(root, step)
    if is_remote(root):
        fs, p = _fs(str(final), storage_options)
        _hold_if_asked(step)
        fs.pipe_file(f"{p}/{MARKER}", f"step {step}\n".encode())
        try:  # the checkpoint counts from here on: what follows must not fail the save
            nbytes = fs.du(p)
        except Exception:  # noqa: BLE001
            nbytes = 0
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
        nbytes = checkpoint_bytes(final)
    try:
        prune(root, keep, storage_options)
    except Exception as e:  # noqa: BLE001 - the new checkpoint is complete; older ones go at the next save
        log(f"WARNING: pruning old checkpoints in {root} failed ({describe(e)}); the next save tries again")
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
            try:
                out[int(name[len("train_state-rank"):-3])] = torch_load(io.BytesIO(data), f"{path}/{name}")
            except UnsafeCheckpoint as e:
                raise CheckpointError(str(e)) from None
    return out


def _require_complete(path, storage_options: dict | None) -> None:
    if not has_marker(path, storage_options):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker); pass a run directory or a "
                              f"step-N/ directory that has one")
    if not is_remote(path) and not (Path(path) / ".metadata").exists() and (Path(path) / "model.pt").exists():
        raise CheckpointError(f"{path} was written by an older pixeldiff (one torch.save file per part); this version "
                              f"reads only sharded (torch.distributed.checkpoint) checkpoints: resume with the older "
                              f"version, or start the run afresh")
    try:  # before DCP reads it (with pickle.load, and logging tracebacks when it fails)
        read_metadata_bytes(_read_bytes(_join(path, ".metadata"), storage_options), f"{path}/.metadata")
    except UnsafeCheckpoint as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path}: its .metadata cannot be read ({describe(e, 200)}); move it aside "
                              f"(the previous valid checkpoint is then resumed) or restore it from a copy") from None


def load_into(path, state: dict, process_group=None, storage_options: dict | None = None) -> None:
    """Every rank at once: fill `state` (state dicts of the current model/EMA/optimizer, sharded or not) in place."""
    _require_complete(path, storage_options)
    try:
        dcp.load(state, storage_reader=_reader(path, storage_options), planner=SafeLoadPlanner(),
                 process_group=process_group, no_dist=not torch.distributed.is_initialized())
    except (Exception, CheckpointException) as e:  # DCP raises it on every rank
        raise _read_failure(path, e) from None


def _read_failure(path, e: BaseException) -> CheckpointError:
    unsafe = _find(e, UnsafeCheckpoint)
    if unsafe is not None:
        return CheckpointError(f"checkpoint {path}: {unsafe}")
    return CheckpointError(f"reading checkpoint {path} failed: {describe(e)}; it may be damaged: move it aside (the "
                           f"previous valid checkpoint is then resumed) or restore it from a copy")


def _find(e: BaseException, kind: type):
    if isinstance(e, kind):
        return e
    if isinstance(e, CheckpointException):
        for exc, _ in e.failures.values():
            if isinstance(exc, kind):
                return exc
    return None


def load(path, names=PARTS, storage_options: dict | None = None) -> dict:
    """Whole (unsharded) state dicts of the named parts, read in this one process: name -> state dict."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    _require_complete(path, storage_options)
    if not names:
        return {}
    out: dict = {}
    try:  # what DCP's _load_state_dict_from_keys does, with the safe planner
        _load_state_dict(out, storage_reader=_reader(path, storage_options), process_group=None, no_dist=True,
                         planner=SafeKeysLoadPlanner(keys=set(names)))
    except (Exception, CheckpointException) as e:
        raise _read_failure(path, e) from None
    return out


# ------------------------------------------------------------------ may this checkpoint be resumed?


def _sizes(path, storage_options: dict | None) -> dict[str, int]:
    if is_remote(path):
        fs, p = _fs(str(path), storage_options)
        return {_name(e["name"]): e.get("size", 0) for e in fs.ls(p, detail=True) if e.get("type") == "file"}
    return {f.name: f.stat().st_size for f in Path(path).iterdir() if f.is_file()}


def check(path, manifest: dict | None, shapes: dict[str, tuple], storage_options: dict | None = None) -> str | None:
    """One process: None when checkpoint `path` can be resumed by this run, a description of its damage when it is
    damaged. Raises CheckpointError when it is foreign (its manifest or its tensors differ from this run's in what
    REFUSED names) or holds pickled code; StorageError when its storage cannot be read."""
    import yaml

    name = _name(path)
    try:
        sizes = _sizes(path, storage_options)
        if ".metadata" not in sizes:
            return ".metadata is missing"
        try:
            metadata = read_metadata_bytes(_read_bytes(_join(path, ".metadata"), storage_options), f"{path}/.metadata")
        except UnsafeCheckpoint as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
        except Exception as e:  # noqa: BLE001 - truncated or garbled
            return f".metadata cannot be read ({describe(e, 200)})"
        hurt = damage(metadata, sizes)
        if hurt:
            return hurt
        states = sorted(n for n in sizes if n.startswith("train_state-rank") and n.endswith(".pt"))
        if not states:
            return "no train_state-rankNNNNN.pt"
        for n in states:
            try:
                torch_load(io.BytesIO(_read_bytes(_join(path, n), storage_options)), f"{path}/{n}")
            except UnsafeCheckpoint as e:
                raise CheckpointError(f"checkpoint {path}: {e}") from None
            except Exception as e:  # noqa: BLE001
                return f"{n} cannot be read ({describe(e, 200)})"
        saved = None
        if manifest is not None and "manifest.yaml" in sizes:
            try:
                saved = yaml.safe_load(_read_bytes(_join(path, "manifest.yaml"), storage_options))
            except Exception as e:  # noqa: BLE001
                return f"manifest.yaml cannot be read ({describe(e, 200)})"
    except (CheckpointError, StorageError):
        raise
    except Exception as e:  # noqa: BLE001 - listing or reading the storage itself failed
        raise StorageError(f"cannot read checkpoint {path}: {describe(e)}; check the storage (and for s3:// the "
                           f"endpoint and credentials), then run again") from None
    fix = ("resume it with the manifest it was written for, or give this run its own checkpoint.dir (or a new name) "
           "to start afresh")
    if isinstance(saved, dict):
        diff = differences(saved, manifest)
        if diff:
            shown = "; ".join(f"{k} {a!r}, this manifest has {b!r}" for k, a, b in diff[:4])
            raise CheckpointError(f"checkpoint {name} (in {_parent(path)}) was written for {shown}"
                                  f"{' ...' if len(diff) > 4 else ''}: {fix}")
    diff = shape_differences(metadata, shapes)
    if diff:
        raise CheckpointError(f"checkpoint {name} (in {_parent(path)}) does not fit this model: "
                              f"{'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}: {fix}")
    return None


def _parent(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[0]


def mark_damaged(path, problem: str, storage_options: dict | None = None, log=print) -> None:
    """A damaged checkpoint stops counting: its reason in DAMAGED, then its marker removed (it is pruned later like
    any partial checkpoint older than the newest valid one)."""
    try:
        note = f"{problem}\n".encode()
        if is_remote(path):
            fs, p = _fs(str(path), storage_options)
            fs.pipe_file(f"{p}/{DAMAGED}", note)
            fs.rm_file(f"{p}/{MARKER}")
        else:
            (Path(path) / DAMAGED).write_bytes(note)
            (Path(path) / MARKER).unlink(missing_ok=True)
    except Exception as e:  # noqa: BLE001
        log(f"WARNING: could not mark {path} as damaged ({describe(e)})")


# ------------------------------------------------------------------ saving, possibly in the background


class Saver:
    """Writes checkpoints with the protocol above; at most one save in flight.

    `save(...)` returns once the loop may go on: after the write (synchronous) or after a CPU
    copy of the state was taken (background). A finished save is reported once, by `poll()`
    (non-blocking) or `wait()`, as a record for the ledger: step, checkpoint, bytes (rank 0),
    seconds_blocked (the loop's time inside `save`, waiting for the previous save included) and
    seconds_write (from the start of the save to its marker).

    Failures: before anything is written, rank 0 checks that a local disk has room for the save (`space_problem`).
    A save that fails is retried `retries` times with exponential backoff (`backoff_s`, doubling) when the checkpoints
    are on S3; locally it fails at once. All ranks agree on each attempt's outcome (one failed rank fails it for all),
    so they retry, or raise StorageError, together; what a failed save left behind has no marker and is removed."""

    def __init__(self, root, keep: int, rank: int, storage_options: dict | None = None, process_group=None,
                 barrier=lambda: None, retries: int = 0, backoff_s: float = 1.0, log=print):
        self.root, self.keep, self.rank = root, keep, rank
        self.storage_options, self.process_group, self.barrier = storage_options, process_group, barrier
        self.retries, self.backoff_s, self.log = retries, backoff_s, log
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[Future, dict] | None = None
        self._needed = 0
        from torch.distributed.checkpoint.staging import BlockingAsyncStager

        # on GPUs: pinned CPU buffers, allocated at the first save and refilled at every later one
        self._stager = BlockingAsyncStager(cache_staged_state_dict=torch.cuda.is_available())

    def save(self, step: int, state: dict, files: dict[str, bytes], background: bool, needed: int | None = None) -> list[dict]:
        """All ranks: write `state` (DCP, sharded) and this rank's `files`. -> records of saves that finished meanwhile.

        `needed`: the bytes the whole checkpoint will take (default: this rank's state and files)."""
        t0 = time.perf_counter()
        finished = self.wait()  # one save at a time: the previous one must be complete (and committed)
        problem = None
        self._needed = estimate = needed if needed is not None else state_nbytes(state) + sum(map(len, files.values()))
        if self.rank == 0:
            try:
                problem = space_problem(self.root, step, estimate)
            except Exception as e:  # noqa: BLE001
                problem = f"cannot check the free space in {self.root}: {describe(e)}"
        problem = self._agree(problem)  # all ranks raise, or none (and none writes before rank 0 looked)
        if problem:
            raise StorageError(problem)
        dest = write_dir(self.root, step)
        record = {"step": step, "async": background}
        if background:
            staged = self._stager.stage(state)  # a CPU copy: training may change the live tensors now
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixeldiff-checkpoint")
            future = self._executor.submit(self._write, dest, staged, files, step, t0, record)
        else:  # a failure raises StorageError here, in the caller
            future = Future()
            future.set_result(self._write(dest, state, files, step, t0, record))
        record["seconds_blocked"] = round(time.perf_counter() - t0, 3)
        self._pending = (future, record)
        return finished

    def _agree(self, problem):
        """Every rank's view of a step of the save -> the first problem any rank had (None: all went well)."""
        if not torch.distributed.is_initialized():
            return problem
        views = [None] * torch.distributed.get_world_size(self.process_group)
        torch.distributed.all_gather_object(views, problem, group=self.process_group)
        return next((v for v in views if v), None)

    def _attempt(self, dest, state: dict, files: dict[str, bytes], step: int, record: dict) -> str | None:
        """One try at the whole save on every rank. -> None when its marker is written, else what failed."""
        def run(what, fn):
            try:
                fn()
                return None
            except (Exception, CheckpointException) as e:
                return f"{what}: {describe(e)}" + (" [no space]" if _errnos(e) & NO_SPACE else "")

        problem = run(f"preparing {dest}", lambda: begin(self.root, step, self.storage_options)) if self.rank == 0 else None
        problem = self._agree(problem)
        if problem is None:
            problem = self._agree(run(f"writing {', '.join(files) or 'the train state'}",
                                      lambda: write_files(dest, files, self.storage_options)))
        if problem is None:
            problem = run("writing the model, EMA and optimizer shards",
                          lambda: write_state(dest, state, self.process_group, self.storage_options))
            if problem is None and self.rank == 0:  # dcp.save returned on rank 0: every rank's shards are written
                def mark():
                    path, nbytes = commit(self.root, step, self.keep, self.storage_options, self.log)
                    record.update(checkpoint=str(path), bytes=nbytes)

                problem = run("writing its marker", mark)
            problem = self._agree(problem)
        return problem

    def _write(self, dest, state: dict, files: dict[str, bytes], step: int, t0: float, record: dict) -> dict:
        try:
            return self._write_all(dest, state, files, step, t0, record)
        finally:
            rank, _, seconds = os.environ.get(LATE_SAVE_END_ENV, "").partition(":")
            if rank == str(self.rank):
                time.sleep(float(seconds))

    def _write_all(self, dest, state: dict, files: dict[str, bytes], step: int, t0: float, record: dict) -> dict:
        attempts = 1 + (self.retries if is_remote(self.root) else 0)
        for attempt in range(1, attempts + 1):
            problem = self._attempt(dest, state, files, step, record)
            if problem is None:
                record["seconds_write"] = round(time.perf_counter() - t0, 3)
                if attempt > 1:
                    record["attempts"] = attempt
                return record
            if attempt < attempts and "[no space]" not in problem:
                delay = self.backoff_s * 2 ** (attempt - 1)
                if self.rank == 0:
                    self.log(f"WARNING: saving the checkpoint of step {step} to {self.root} failed (attempt {attempt} "
                             f"of {attempts}): {problem}; retrying in {delay:g} s")
                time.sleep(delay)
            else:
                break
        local = not is_remote(self.root)
        # ENOSPC is not always an OSError by the time it reaches us (torch's zip writer: "unexpected pos"): a local
        # disk with less room left than the save needs is full whatever the error says
        # (and the free space just after the partial files were removed can still count them, while another rank's
        # writer lets go of its deleted files: torch's "unexpected pos" on a local disk is the zip writer's ENOSPC)
        full = "[no space]" in problem or (local and (shutil.disk_usage(self.root).free < self._needed
                                                      or "unexpected pos" in problem))
        problem = problem.replace(" [no space]", "")
        if self.rank == 0:
            self._discard(step)
        self._agree(None)  # the partial files are gone before any rank measures what is free
        last = latest_valid(self.root, log=lambda _: None) if local else None
        space = ""
        if full:
            free = shutil.disk_usage(self.root).free if local else None
            space = (f"; the disk is full: the checkpoint needs about {_mb(self._needed)}"
                     f"{f', {_mb(free)} are free' if free is not None else ''}; free some space or point checkpoint.dir "
                     f"at a larger disk (it must hold checkpoint.keep + 1 checkpoints)")
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        kept = (f"; the previous checkpoint{f', {_name(last)},' if last else ''} is intact and is the one a new start "
                f"resumes from") if last or not local else "; there is no earlier checkpoint: a new start begins afresh"
        raise StorageError(f"saving the checkpoint of step {step} to {self.root} failed{tries}: {problem}{space}{kept}")

    def _discard(self, step: int) -> None:
        """After a failed save: remove what it wrote (it has no marker), best effort (S3 may still be down)."""
        try:
            if is_remote(self.root):
                if not has_marker(step_dir(self.root, step), self.storage_options):
                    remove(step_dir(self.root, step), self.storage_options)
            else:
                shutil.rmtree(_tmp_dir(self.root, step), ignore_errors=True)
                if not has_marker(step_dir(self.root, step)):
                    shutil.rmtree(step_dir(self.root, step), ignore_errors=True)
        except Exception as e:  # noqa: BLE001
            self.log(f"WARNING: could not remove the partial checkpoint of step {step} ({describe(e)}); it has no "
                     f"marker, so it never counts, and the next save of that step replaces it")

    def finished(self) -> bool:
        """Whether a save in flight has finished (successfully or not) on this rank; no wait."""
        return self._pending is not None and self._pending[0].done()

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
        except (StorageError, CheckpointError):
            raise
        except (Exception, CheckpointException) as e:
            raise StorageError(f"writing the checkpoint of step {record['step']} to {self.root} failed: "
                               f"{describe(e)}") from None
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
                 broadcast=lambda obj: obj, log=print, replicated: bool = False, device=None, manifest: dict | None = None,
                 retries: int = 0, retry_backoff_s: float = 1.0, on_event=lambda event, **fields: None):
        self.root, self.async_save, self.rank, self.world = root, async_save, rank, world
        self.replicated, self.device = replicated and world > 1, device  # DDP: each rank saves and reads a share
        self.sharded, self.train, self.data, self.files, self.on_saved = sharded, train, data, files, on_saved
        self.storage_options, self.process_group, self.broadcast, self.log = storage_options, process_group, broadcast, log
        self.manifest, self.on_event = manifest, on_event  # the run's resolved manifest (config.to_dict)
        self.saver = Saver(root, keep, rank, storage_options, process_group, barrier=barrier, retries=retries,
                           backoff_s=retry_backoff_s, log=log)
        self.saved_step: int | None = None

    def choose(self, shapes: dict[str, tuple], name: str | None = None) -> str | None:
        """Rank 0: the newest valid checkpoint that is whole and was written for this run (None: start afresh).

        A damaged one (a file missing or truncated, unreadable metadata or train state) is marked DAMAGED, loudly,
        and the one before it is tried. A foreign one (written for another model, text encoder, optimizer or stage
        list), or one holding pickled code, is refused (CheckpointError): resuming anything else would be wrong."""
        newest = latest_valid(self.root, log=self.log, storage_options=self.storage_options)
        if newest is None:
            return None
        valid, _ = list_checkpoints(self.root, self.storage_options)
        if name is not None:  # that one checkpoint, or a refusal that lists the others
            named = [p for p in valid if _name(p) == name]
            if not named:
                raise CheckpointError(f"no valid checkpoint {name} in {self.root}; there are: "
                                      f"{', '.join(_name(p) for p in valid)}")
            problem = check(named[0], self.manifest, shapes, self.storage_options)
            if problem is not None:
                raise CheckpointError(f"checkpoint {named[0]} cannot be read: {problem}")
            return str(named[0])
        damaged = []
        for path in reversed(valid):
            problem = check(path, self.manifest, shapes, self.storage_options)
            if problem is None:
                if damaged:
                    self.log(f"WARNING: resuming from {path}, the newest checkpoint that is whole")
                return str(path)
            damaged.append(f"{_name(path)}: {problem}")
            self.log(f"WARNING: checkpoint {path} is damaged ({problem}); it is marked {DAMAGED} and no longer "
                     f"counts; trying the one before it (the steps since then are trained again)")
            self.on_event("checkpoint_damaged", checkpoint=str(path), problem=problem)
            mark_damaged(path, problem, self.storage_options, self.log)
        raise CheckpointError(f"no checkpoint in {self.root} can be resumed: {'; '.join(damaged)}. Restore them "
                              f"from a copy, or move {self.root} aside to start the run afresh")

    def restore(self, name: str | None = None) -> str | None:
        """Load the latest valid checkpoint (or the one called `name`, e.g. step-00001000) into every part (all
        ranks). -> its path, or None to start afresh."""
        choice = None
        if self.rank == 0:  # one decision for all ranks
            try:  # (the model's and EMA's shapes; the optimizer's state dict is made only to load into)
                shapes = tensor_shapes({n: self.sharded[n].state_dict() for n in ("model", "ema") if n in self.sharded})
                choice = ("ok", self.choose(shapes, name))
            except (CheckpointError, StorageError) as e:
                choice = (type(e).__name__, str(e))
        kind, path = self.broadcast(choice)
        if kind != "ok":
            raise (StorageError if kind == "StorageError" else CheckpointError)(path)
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
            needed = state_nbytes(state) + sum(map(len, files.values()))  # the whole state: every rank's share
            if self.replicated:  # staged and written by one rank each, not by every rank
                state = replicated.share(state, self.rank, self.world)
            self._report(self.saver.save(step, state, files, background=self.async_save and not final, needed=needed))
            self.saved_step = step
        if final:
            self._report(self.saver.wait())

    def save_finished(self) -> bool:
        """Whether a background save has finished on this rank since the last report (no wait)."""
        return self.saver.finished()

    def poll(self, wait: bool = False) -> None:
        """Report a background save that finished since the last call (`wait`: block until it has)."""
        self._report(self.saver.wait() if wait else self.saver.poll())

    def _report(self, records: list[dict]) -> None:
        for r in records:
            self.on_saved(r)

    def close(self) -> None:
        self.saver.close()
