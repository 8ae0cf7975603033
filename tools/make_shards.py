"""Pack images and captions into WebDataset tar shards for `data.source: webdataset`.

    python tools/make_shards.py SRC OUT_PREFIX [options]

    python tools/make_shards.py photos/ data/train --max-samples 10000 --resize 1024
    python tools/make_shards.py photos/ s3://bucket/t2i/train --captions captions.jsonl --shard-size 1GB

Input
    SRC is a folder of images. By default every image (jpg, jpeg, png, webp; also bmp,
    gif, tif, tiff, which are re-encoded) found under SRC, recursively, takes its caption
    from a sidecar text file with the same stem: `cats/a.jpg` + `cats/a.txt`.
    `--captions FILE` instead reads a CSV with a header `file,caption` or JSON lines
    `{"file": ..., "caption": ...}` (by the name: .csv, or .jsonl/.json); `file` is
    relative to SRC. Captions are UTF-8 and stripped of surrounding whitespace. Inputs are
    packed in a seeded shuffled order (`--seed`, default 0), so neighbouring files (one
    folder, one source, one day) spread over all the shards; the order is a pure function of
    the seed and the sorted list of inputs, so the same inputs and options always give
    byte-identical shards. `--no-shuffle` packs in sorted path order.

Output
    Shards OUT_PREFIX-000000.tar, OUT_PREFIX-000001.tar, ... Each shard holds samples
    whose members are adjacent: `<key>.<jpg|png|webp>` and `<key>.txt`, with keys
    `<shard>_<sample>` (e.g. `000003_000017`). A shard is closed before it would exceed
    `--shard-size` bytes (500MB, 1GB, 1.5GB, 2GiB, ...: KB/MB/GB are powers of 1000,
    KiB/MiB/GiB of 1024; a single sample larger than that gets a shard of its own) or
    reach `--max-samples` samples. `--resize N` makes the shorter side at most N pixels
    (aspect kept, EXIF rotation applied) and re-encodes those images as JPEG quality 95;
    images already small enough, and every image without `--resize`, keep their original
    bytes.

    OUT_PREFIX is a local path or a URL (s3://bucket/prefix, or any fsspec protocol).
    For a URL each shard is written to a local temporary folder and uploaded once
    complete; `--endpoint-url` (MinIO, Ceph, ...), `--profile` and `--anon` configure S3;
    credentials come from the environment or AWS profile as usual. Locally a shard is
    written to `<name>.partial` and renamed when complete.

Resume
    OUT_PREFIX.progress.json (next to the shards, on S3 too) records every finished shard:
    the inputs it holds, the inputs that were skipped while it was written, a hash of
    that input range, and its size. A rerun with the same options checks the recorded
    shards (present, right size, same inputs) and continues after the last good one;
    `--restart` discards the record and starts over. Inputs that sort after the packed
    ones are appended as new shards (with `--no-shuffle`; shuffled, a new input moves the
    order, so the shards from the first one whose inputs changed are written again).
    `--stop-after-shards N` stops after N new shards (for tests and for splitting the work
    into time slots).

Skipped inputs
    Images that cannot be decoded (or have more than `--max-pixels` pixels), images
    without a caption (no sidecar, empty, not UTF-8) and files listed in `--captions`
    that do not exist are skipped, counted and listed at the end. The summary prints the
    line to put into the manifest: `data.shards: OUT_PREFIX-{000000..00000N}.tar`.

Exit status: 0 done (or stopped by --stop-after-shards), 1 runtime error such as a
failed upload (rerun to resume), 2 bad arguments or input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

NATIVE_EXTS = {".jpg", ".jpeg", ".png", ".webp"}  # stored as they are
CONVERT_EXTS = {".bmp", ".gif", ".tif", ".tiff"}  # re-encoded (PNG, or JPEG when resized)
IMAGE_EXTS = NATIVE_EXTS | CONVERT_EXTS
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> member extension
JPEG_QUALITY = 95
STATE_VERSION = 1
SKIP_KINDS = ("unreadable", "no_caption", "missing")
SKIP_LABELS = {"unreadable": "unreadable images", "no_caption": "images without a caption",
               "missing": "listed files that do not exist"}
BLOCK, RECORD = 512, 10240  # tar block and record sizes (Python's tarfile pads to whole records)


class UsageError(Exception):
    """Bad arguments or input: message on stderr, exit status 2."""


# --------------------------------------------------------------------------- arguments

_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i)?)?b?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000, '2GiB' -> 2 * 1024**3, '4096' -> 4096."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 500MB, 1GB, 2GiB, 1000000)")
    number, unit, binary = m.groups()
    power = "kmgt".index(unit.lower()) + 1 if unit else 0
    value = int(float(number) * (1024 if binary else 1000) ** power)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be more than 0 bytes")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_shards.py", description="Pack images and captions into WebDataset tar shards.",
        epilog="See the module docstring (tools/make_shards.py) for the format, resume and S3 details.")
    p.add_argument("src", metavar="SRC", help="folder of images (with sidecar .txt captions unless --captions)")
    p.add_argument("out_prefix", metavar="OUT_PREFIX", help="local path prefix or s3://bucket/prefix")
    p.add_argument("--captions", metavar="FILE", help="CSV (file,caption) or JSONL ({file, caption}); paths relative to SRC")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"), metavar="SIZE",
                   help="maximum bytes per shard (500MB, 1GB, 2GiB, ...; default 1GB)")
    p.add_argument("--max-samples", type=positive_int, default=None, metavar="N", help="maximum samples per shard")
    p.add_argument("--resize", type=positive_int, default=None, metavar="N",
                   help="shrink so the shorter side is at most N px (re-encoded as JPEG q95)")
    p.add_argument("--max-pixels", type=positive_int, default=100_000_000, metavar="N",
                   help="skip images with more pixels than this (decompression bombs; default 100M)")
    p.add_argument("--workers", type=non_negative_int, default=min(8, os.cpu_count() or 1), metavar="N",
                   help="processes decoding/resizing images (0 or 1: in this process; default min(8, CPUs))")
    p.add_argument("--endpoint-url", help="S3 endpoint (MinIO, Ceph, ...); default AWS or $AWS_ENDPOINT_URL")
    p.add_argument("--profile", help="AWS profile for S3 credentials")
    p.add_argument("--anon", action="store_true", help="anonymous S3 access")
    p.add_argument("--seed", type=non_negative_int, default=0, metavar="N",
                   help="seed of the shuffled packing order (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="pack in sorted path order instead")
    p.add_argument("--restart", action="store_true", help="ignore the progress file and start from the first shard")
    p.add_argument("--stop-after-shards", type=positive_int, default=None, metavar="N",
                   help="stop after writing N new shards (rerun to continue)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# --------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Entry:
    rel: str  # path relative to SRC, '/'-separated
    caption: Optional[str]  # from --captions; None: read the sidecar .txt


def scan_folder(src: Path) -> list[Entry]:
    entries = []
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if path.suffix.lower() in IMAGE_EXTS and not any(part.startswith(".") for part in rel.parts) and path.is_file():
            entries.append(Entry(rel.as_posix(), None))
    return sorted(entries, key=lambda e: e.rel)


def read_captions_file(path: Path) -> list[Entry]:
    if not path.is_file():
        raise UsageError(f"--captions: {path} not found")
    kind = path.suffix.lower()
    entries = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if kind == ".csv":
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
                    raise UsageError(f"--captions: {path} needs a header line with the columns 'file' and 'caption', "
                                     f"found {reader.fieldnames}")
                for row in reader:
                    if row["file"]:
                        entries.append(Entry(row["file"], row["caption"] or ""))
            elif kind in (".jsonl", ".json"):
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UsageError(f"--captions: {path}:{n}: not JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("file"), str):
                        raise UsageError(f"--captions: {path}:{n}: expected an object with a string 'file'")
                    cap = obj.get("caption")
                    entries.append(Entry(obj["file"], cap if isinstance(cap, str) else ""))
            else:
                raise UsageError(f"--captions: {path}: unknown kind {kind!r}; use .csv (file,caption) or .jsonl")
    except UnicodeDecodeError as e:
        raise UsageError(f"--captions: {path} is not UTF-8 ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise UsageError(f"--captions: {path}: {e}") from None
    # Sorted by file, stable for the same file listed twice (both are kept).
    return sorted(entries, key=lambda e: e.rel)


def shuffled(entries: list[Entry], seed: int) -> list[Entry]:
    """The packing order: `entries` (sorted by path) ordered by a hash of (seed, position in the sorted list, path),
    a pure function of the seed and the sorted list, the same on every machine and Python version, so a resumed run
    continues the same order."""
    def rank(item):
        i, e = item
        return hashlib.sha256(f"{seed}\0{i}\0{e.rel}".encode()).digest()
    return [e for _, e in sorted(enumerate(entries), key=rank)]


def entries_digest(entries: list[Entry]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps([e.rel, e.caption], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------- images (run in worker processes)

def _to_rgb(im):
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        flat = Image.new("RGB", im.size, (255, 255, 255))
        flat.paste(im, mask=im.getchannel("A"))
        return flat
    return im.convert("RGB")


def encode_image(data: bytes, resize: Optional[int], max_pixels: int) -> tuple[bytes, str]:
    """Image file bytes -> (bytes to store, extension). Raises on anything PIL cannot decode."""
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = None  # our own limit below, without PIL's warnings
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"{w}x{h} has more than --max-pixels {max_pixels} pixels")
        im.load()  # a full decode: catches truncated and corrupt files
        if resize and min(w, h) > resize:  # the shorter side does not change with EXIF rotation
            im = _to_rgb(ImageOps.exif_transpose(im))
            w, h = im.size
            size = (resize, max(1, round(h * resize / w))) if w <= h else (max(1, round(w * resize / h)), resize)
            out = io.BytesIO()
            im.resize(size, Image.LANCZOS).save(out, format="JPEG", quality=JPEG_QUALITY)
            return out.getvalue(), "jpg"
        if im.format in FORMAT_EXT:
            return data, FORMAT_EXT[im.format]
        if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        out = io.BytesIO()
        im.save(out, format="PNG")
        return out.getvalue(), "png"


def prepare(job: tuple) -> dict:
    """One input -> {'status': 'ok', 'image', 'ext', 'caption'} or {'status': <skip kind>, 'reason'}."""
    src, entry, resize, max_pixels = job
    path = Path(src) / entry.rel
    if not path.is_file():
        return {"status": "missing", "reason": "no such file"}
    caption = entry.caption
    if caption is None:
        sidecar = path.with_suffix(".txt")
        if not sidecar.is_file():
            return {"status": "no_caption", "reason": f"no {sidecar.name}"}
        try:
            caption = sidecar.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            return {"status": "no_caption", "reason": f"{sidecar.name} is not UTF-8"}
        except OSError as e:
            return {"status": "no_caption", "reason": f"{sidecar.name}: {e.strerror or e}"}
    caption = caption.strip()
    if not caption:
        return {"status": "no_caption", "reason": "empty caption"}
    try:
        data = path.read_bytes()
        image, ext = encode_image(data, resize, max_pixels)
    except Exception as e:  # noqa: BLE001 - any decoder failure means: skip this image
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", f"{type(e).__name__}: {e}")
        return {"status": "unreadable", "reason": reason[:300]}
    return {"status": "ok", "image": image, "ext": ext, "caption": caption}


# --------------------------------------------------------------------------- output (local or fsspec)

def _tar_bytes(payload_sizes: list[int]) -> int:
    """The size of the tar archive Python's tarfile writes for members of these sizes."""
    body = sum(BLOCK + -(-n // BLOCK) * BLOCK for n in payload_sizes) + 2 * BLOCK
    return -(-body // RECORD) * RECORD


class Output:
    def __init__(self, prefix: str, endpoint_url=None, profile=None, anon=False):
        self.prefix = prefix
        self.remote = "://" in prefix and not prefix.startswith("file://")
        if prefix.startswith("file://"):
            self.prefix = prefix = prefix[len("file://"):]
        if prefix.endswith("/") or prefix.endswith(os.sep) or not prefix:
            raise UsageError(f"OUT_PREFIX {prefix!r} names a folder; give a file prefix such as out/train")
        if any(c in prefix for c in "{}"):
            raise UsageError(f"OUT_PREFIX {prefix!r} must not contain braces")
        self.fs = None
        self.tmpdir = None
        if self.remote:
            protocol = prefix.split("://", 1)[0]
            opts = {}
            if protocol in ("s3", "s3a"):
                if endpoint_url:
                    opts["endpoint_url"] = endpoint_url
                if profile:
                    opts["profile"] = profile
                if anon:
                    opts["anon"] = True
            elif endpoint_url or profile or anon:
                raise UsageError("--endpoint-url, --profile and --anon apply to s3:// outputs only")
            try:
                import fsspec

                self.fs, _ = fsspec.core.url_to_fs(prefix, **opts)
            except ImportError as e:
                need = "pip install s3fs" if protocol in ("s3", "s3a") else f"fsspec and its {protocol}:// backend"
                raise UsageError(f"writing to {protocol}:// needs {need} ({e})") from None
            except ValueError as e:
                raise UsageError(f"OUT_PREFIX {prefix!r}: {e}") from None
            self.tmpdir = tempfile.mkdtemp(prefix="make_shards-")
        else:
            parent = Path(prefix).parent
            if parent.exists() and not parent.is_dir():
                raise UsageError(f"OUT_PREFIX: {parent} is not a folder")
            parent.mkdir(parents=True, exist_ok=True)

    def shard_url(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    @property
    def state_url(self) -> str:
        return f"{self.prefix}.progress.json"

    def pattern(self, count: int) -> str:
        return f"{self.prefix}-{{000000..{count - 1:06d}}}.tar"

    def local_path(self, index: int) -> str:
        """Where to write shard `index` before it is complete."""
        if self.remote:
            return os.path.join(self.tmpdir, f"shard-{index:06d}.tar")
        return self.shard_url(index) + ".partial"

    def publish(self, index: int, local: str) -> None:
        if self.remote:
            self.fs.put_file(local, self.shard_url(index))
            os.remove(local)
        else:
            os.replace(local, self.shard_url(index))

    def size(self, url: str) -> Optional[int]:
        try:
            if self.remote:
                return int(self.fs.info(url)["size"])
            return os.path.getsize(url)
        except FileNotFoundError:
            return None

    def read_state(self) -> Optional[dict]:
        try:
            if self.remote:
                self.fs.invalidate_cache()
                raw = self.fs.cat_file(self.state_url)
            else:
                raw = Path(self.state_url).read_bytes()
        except FileNotFoundError:
            return None
        try:
            state = json.loads(raw)
        except json.JSONDecodeError:
            raise UsageError(f"{self.state_url} is not valid JSON; fix or delete it, or pass --restart") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise UsageError(f"{self.state_url}: unknown progress file version; delete it or pass --restart")
        return state

    def write_state(self, state: dict) -> None:
        raw = (json.dumps(state, indent=1, ensure_ascii=False) + "\n").encode()
        if self.remote:
            self.fs.pipe_file(self.state_url, raw)
        else:
            tmp = self.state_url + ".partial"
            Path(tmp).write_bytes(raw)
            os.replace(tmp, self.state_url)

    def close(self) -> None:
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


class ShardWriter:
    """One tar shard being written, with deterministic headers."""

    def __init__(self, out: Output, index: int, start: int):
        self.out, self.index, self.start = out, index, start
        self.path = out.local_path(index)
        self.tar = tarfile.open(self.path, "w", format=tarfile.USTAR_FORMAT)
        self.files: list[str] = []
        self.skipped: dict[str, list] = {k: [] for k in SKIP_KINDS}
        self.payload: list[int] = []

    def projected(self, sizes: list[int]) -> int:
        return _tar_bytes(self.payload + sizes)

    def add(self, rel: str, image: bytes, ext: str, caption: str) -> None:
        key = f"{self.index:06d}_{len(self.files):06d}"
        text = caption.encode("utf-8")
        for name, data in ((f"{key}.{ext}", image), (f"{key}.txt", text)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))
            self.payload.append(len(data))
        self.files.append(rel)

    def finish(self, end: int, entries: list[Entry]) -> dict:
        self.tar.close()
        size = os.path.getsize(self.path)
        self.out.publish(self.index, self.path)
        return {"index": self.index, "name": self.out.shard_url(self.index), "samples": len(self.files),
                "bytes": size, "start": self.start, "end": end,
                "inputs_sha256": entries_digest(entries[self.start:end]), "files": self.files,
                "skipped": {k: v for k, v in self.skipped.items()}}

    def abandon(self) -> None:
        try:
            self.tar.close()
        finally:
            if os.path.exists(self.path):
                os.remove(self.path)


# --------------------------------------------------------------------------- progress

class Progress:
    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.quiet, self.bar = total, 0, quiet, None
        self.last = 0.0
        if not quiet:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="img", desc="packing", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, shards: int, samples: int, skipped: int) -> None:
        self.done += 1
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(1)
            if self.done % 64 == 0 or self.done == self.total:
                self.bar.set_postfix(shards=shards, samples=samples, skipped=skipped, refresh=False)
        elif time.monotonic() - self.last > 2 or self.done == self.total:
            self.last = time.monotonic()
            print(f"packing: {self.done}/{self.total} inputs, {shards} shards, {samples} samples, {skipped} skipped",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- the run

def options_of(args) -> dict:
    """The options that change the bytes of the shards; a resume must use the same."""
    return {"shard_size": args.shard_size, "max_samples": args.max_samples, "resize": args.resize,
            "max_pixels": args.max_pixels, "captions": "file" if args.captions else "sidecar",
            "jpeg_quality": JPEG_QUALITY, "order": "sorted" if args.no_shuffle else f"shuffled, seed {args.seed}"}


def verified_shards(out: Output, state: dict, entries: list[Entry]) -> list[dict]:
    """The prefix of the recorded shards that is still valid; reports why the rest is dropped."""
    good, end = [], 0
    for i, rec in enumerate(state.get("shards", [])):
        problem = None
        if rec.get("index") != i or rec.get("start") != end or not isinstance(rec.get("end"), int):
            problem = "the progress record is inconsistent"
        elif rec["end"] > len(entries) or entries_digest(entries[rec["start"]:rec["end"]]) != rec.get("inputs_sha256"):
            problem = "its inputs changed since it was written"
        elif rec.get("name") != out.shard_url(i):
            problem = f"it was written as {rec.get('name')}"
        else:
            size = out.size(out.shard_url(i))
            if size is None:
                problem = "the file is missing"
            elif size != rec.get("bytes"):
                problem = f"the file has {size} bytes, {rec.get('bytes')} expected"
        if problem:
            print(f"note: redoing shards from {out.shard_url(i)} on: {problem}", file=sys.stderr)
            break
        good.append(rec)
        end = rec["end"]
    return good


def summarize(out: Output, shards: list[dict], total_inputs: int, complete: bool, stopped: bool) -> None:
    samples = sum(r["samples"] for r in shards)
    size = sum(r["bytes"] for r in shards)
    skipped = {k: [s for r in shards for s in r["skipped"][k]] for k in SKIP_KINDS}
    print(f"{'done' if complete else 'stopped'}: {samples} samples in {len(shards)} shards "
          f"({size / 1e6:.1f} MB) from {total_inputs} inputs")
    for kind in SKIP_KINDS:
        items = skipped[kind]
        if kind == "missing" and not items:
            continue
        print(f"skipped {SKIP_LABELS[kind]}: {len(items)}")
        for rel, reason in items[:10]:
            print(f"  {rel}: {reason}")
        if len(items) > 10:
            print(f"  ... and {len(items) - 10} more (all listed in {out.state_url})")
    if stopped:
        done = shards[-1]["end"] if shards else 0
        print(f"stopped after --stop-after-shards; {total_inputs - done} inputs left: rerun the same command to continue")
    if shards:
        print(f"data.shards: {out.pattern(len(shards))}")


def run(args) -> int:
    src = Path(args.src)
    if not src.exists():
        raise UsageError(f"SRC {src} not found")
    if not src.is_dir():
        raise UsageError(f"SRC {src} is not a folder")
    entries = read_captions_file(Path(args.captions)) if args.captions else scan_folder(src)
    if not entries:
        raise UsageError(f"no images found in {src}" if not args.captions else f"--captions {args.captions} lists no files")
    if not args.no_shuffle:
        entries = shuffled(entries, args.seed)

    out = Output(args.out_prefix, args.endpoint_url, args.profile, args.anon)
    try:
        return _run(args, src, entries, out)
    finally:
        out.close()


def _run(args, src: Path, entries: list[Entry], out: Output) -> int:
    options = options_of(args)
    state = None if args.restart else out.read_state()
    if state is not None and state.get("options") != options:
        old = state.get("options", {})
        diff = ", ".join(f"{k}: {old.get(k)!r} then, {v!r} now" for k, v in options.items() if old.get(k) != v)
        raise UsageError(f"{out.state_url} was written with other options ({diff}); "
                         "rerun with the same options to resume, or pass --restart to start over")
    shards = verified_shards(out, state, entries) if state else []
    pos = shards[-1]["end"] if shards else 0
    if shards:
        print(f"resuming: {len(shards)} shards done, {len(entries) - pos} of {len(entries)} inputs left", file=sys.stderr)

    def save(complete: bool) -> None:
        out.write_state({"version": STATE_VERSION, "tool": "make_shards", "options": options,
                         "inputs": len(entries), "complete": complete, "shards": shards})

    if pos == len(entries):
        save(True)
        summarize(out, shards, len(entries), complete=True, stopped=False)
        return 0

    jobs = ((str(src), e, args.resize, args.max_pixels) for e in entries[pos:])
    pool = multiprocessing.Pool(args.workers) if args.workers > 1 else None
    results = pool.imap(prepare, jobs, chunksize=4) if pool else map(prepare, jobs)
    progress = Progress(len(entries) - pos, args.quiet)
    writer: Optional[ShardWriter] = None
    new_shards, stopped, oversize = 0, False, 0
    n_samples = sum(r["samples"] for r in shards)
    n_skipped = sum(len(v) for r in shards for v in r["skipped"].values())
    pending_skips: list[tuple[str, str, str]] = []  # skips seen before the first sample of this run
    try:
        for i, res in enumerate(results, start=pos):
            entry = entries[i]
            if res["status"] != "ok":
                n_skipped += 1
                if writer is not None:
                    writer.skipped[res["status"]].append([entry.rel, res["reason"]])
                else:
                    pending_skips.append((res["status"], entry.rel, res["reason"]))
            else:
                sizes = [len(res["image"]), len(res["caption"].encode("utf-8"))]
                if writer is not None and writer.files and (
                        (args.max_samples and len(writer.files) >= args.max_samples)
                        or writer.projected(sizes) > args.shard_size):
                    shards.append(writer.finish(i, entries))
                    save(False)
                    writer, new_shards = None, new_shards + 1
                    if args.stop_after_shards and new_shards >= args.stop_after_shards:
                        stopped = True
                        break
                if writer is None:
                    writer = ShardWriter(out, len(shards), i if not pending_skips else pos)
                    for kind, rel, reason in pending_skips:
                        writer.skipped[kind].append([rel, reason])
                    pending_skips = []
                if _tar_bytes(sizes) > args.shard_size:
                    oversize += 1
                    if oversize <= 5:
                        print(f"warning: {entry.rel} alone is larger than --shard-size; it gets a shard of its own"
                              + ("; not warning about more" if oversize == 5 else ""), file=sys.stderr)
                writer.add(entry.rel, res["image"], res["ext"], res["caption"])
                n_samples += 1
            progress.update(len(shards) + (writer is not None), n_samples, n_skipped)
        else:
            if writer is not None:
                shards.append(writer.finish(len(entries), entries))
                writer = None
            elif pending_skips:
                if not shards:
                    raise UsageError(f"none of the {len(entries)} inputs is usable "
                                     f"(first: {pending_skips[0][1]}: {pending_skips[0][2]})")
                # Only skipped inputs after the last shard: they belong to it (its file is unchanged).
                last = shards[-1]
                for kind, rel, reason in pending_skips:
                    last["skipped"][kind].append([rel, reason])
                last["end"] = len(entries)
                last["inputs_sha256"] = entries_digest(entries[last["start"]:last["end"]])
            save(True)
    finally:
        progress.close()
        if writer is not None:
            writer.abandon()
        if pool is not None:
            pool.terminate()
            pool.join()

    summarize(out, shards, len(entries), complete=not stopped, stopped=stopped)
    if oversize:
        print(f"{oversize} samples were larger than --shard-size {args.shard_size} bytes on their own")
    if not stopped and not out.remote and os.path.exists(out.shard_url(len(shards))):
        print(f"warning: {out.shard_url(len(shards))} and later files are left from an earlier run "
              "and are not part of this set", file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("make_shards: interrupted; finished shards are kept, rerun the same command to continue",
              file=sys.stderr)
        return 130
    except OSError as e:
        print(f"make_shards: error: {type(e).__name__}: {e}; finished shards are kept, rerun to continue",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
