"""Add precomputed caption embeddings (emb.npy, mask.npy) to WebDataset tar shards.

    python tools/embed_captions.py SHARDS... (--out PREFIX | --in-place) [options]

    python tools/embed_captions.py 'data/train-{000000..000009}.tar' --out data/train-emb --encoder builtin
    python tools/embed_captions.py 's3://bucket/t2i/train-{000000..000999}.tar' --in-place \\
        --encoder hf:google/t5gemma-2b-2b-ul2 --max-tokens 256 --batch-size 128

SHARDS are local paths or URLs (s3://... through fsspec/s3fs), with brace patterns
(`{000000..000009}`, `{a,b}`) expanded here, as in `data.shards`. Every sample's `txt`
caption is encoded and stored next to its other members as
    <key>.emb.npy   np.save of (n, dim), float16 (or --dtype float32)
    <key>.mask.npy  np.save of (n,) bool, True for real tokens
where n <= max_tokens is the caption's real length (up to its last real token): the padding
is not stored, the trainer pads to data.text.max_tokens on the GPU.
replacing embeddings already there; all other members are copied unchanged, in order.
A sample without a caption gets the embedding of the empty caption (mask all False) and
is counted in the summary.

Output: `--out PREFIX` writes PREFIX-NNNNNN.tar, where NNNNNN is the number at the end of
the input name (`train-000042.tar` -> `PREFIX-000042.tar`), or the input's position when
it has none; outputs that exist are skipped unless `--force`, so a rerun continues.
`--in-place` replaces each input instead; shards whose samples all carry emb.npy and
mask.npy already are skipped unless `--force`. Either way a shard appears only complete:
written to `<name>.partial` and renamed locally, uploaded whole to S3 from a local
temporary file.

Encoders
    builtin     pixeldiff.text.BuiltinTextEncoder(--dim, --max-tokens): the small hashed-word
                encoder, no weights, for dry runs and tests.
    hf:NAME     a Hugging Face model name or local folder, through `transformers`
                (AutoTokenizer + AutoModel; the encoder half of encoder-decoder models such
                as T5/T5Gemma): last hidden state, captions padded and truncated to
                --max-tokens. `--local-files-only` never touches the network.
The manifest then reads `data.text: {encoder: precomputed, max_tokens: L, dim: D}`.

Exit status: 0 done, 1 runtime error (rerun to continue), 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from pixeldiff import shardlist  # noqa: E402

EMB_EXTS = ("emb.npy", "mask.npy")


class UsageError(Exception):
    """Bad arguments or input: message on stderr, exit status 2."""


# --------------------------------------------------------------------------- names

def expand_braces(pattern: str) -> list[str]:
    """Brace patterns exactly as `data.shards` reads them ('{000..009}', '{a,b}')."""
    try:
        return shardlist.expand_braces(pattern)
    except shardlist.DataError as e:
        raise UsageError(str(e)) from None


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_of(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


class Storage:
    """Reads and writes local paths and fsspec URLs; one filesystem per protocol."""

    def __init__(self, endpoint_url=None, profile=None, anon=False):
        self.s3_opts = {k: v for k, v in (("endpoint_url", endpoint_url), ("profile", profile),
                                          ("anon", True if anon else None)) if v is not None}
        self.fss: dict[str, object] = {}
        self.tmpdir = tempfile.mkdtemp(prefix="embed_captions-")

    def fs(self, url: str):
        protocol = url.split("://", 1)[0]
        if protocol not in self.fss:
            opts = self.s3_opts if protocol in ("s3", "s3a") else {}
            try:
                import fsspec

                self.fss[protocol] = fsspec.core.url_to_fs(url, **opts)[0]
            except ImportError as e:
                need = "pip install s3fs" if protocol in ("s3", "s3a") else f"fsspec and its {protocol}:// backend"
                raise UsageError(f"{protocol}:// needs {need} ({e})") from None
        return self.fss[protocol]

    def missing(self, urls: list[str]) -> list[str]:
        """The URLs that do not exist; one listing per remote folder, not one request per shard."""
        absent, folders = [], {}
        for url in urls:
            if is_remote(url):
                folders.setdefault(url.rsplit("/", 1)[0], []).append(url)
            elif not os.path.isfile(local_of(url)):
                absent.append(url)
        for folder, group in folders.items():
            try:
                names = {n.rstrip("/").rsplit("/", 1)[-1] for n in self.fs(folder).ls(folder, detail=False)}
            except FileNotFoundError:
                names = set()
            absent += [u for u in group if u.rsplit("/", 1)[-1] not in names]
        return absent

    def exists(self, url: str) -> bool:
        if is_remote(url):
            return self.fs(url).exists(url)
        return os.path.exists(local_of(url))

    def fetch(self, url: str) -> str:
        """A local file with the content of `url` (the path itself when local)."""
        if not is_remote(url):
            return local_of(url)
        local = os.path.join(self.tmpdir, "in.tar")
        self.fs(url).get_file(url, local)
        return local

    def staging(self, url: str) -> str:
        """Where to write `url` before it is complete."""
        if is_remote(url):
            return os.path.join(self.tmpdir, "out.tar")
        Path(local_of(url)).parent.mkdir(parents=True, exist_ok=True)
        return local_of(url) + ".partial"

    def publish(self, staged: str, url: str) -> None:
        if is_remote(url):
            self.fs(url).put_file(staged, url)
            os.remove(staged)
        else:
            os.replace(staged, local_of(url))

    def close(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def output_names(inputs: list[str], out_prefix: Optional[str]) -> list[str]:
    if out_prefix is None:
        return list(inputs)
    if out_prefix.endswith("/") or any(c in out_prefix for c in "{}"):
        raise UsageError(f"--out {out_prefix!r}: give a file prefix without braces, such as data/train-emb")
    outs = []
    for i, url in enumerate(inputs):
        m = re.search(r"(\d+)\.tar$", url)
        outs.append(f"{out_prefix}-{m.group(1) if m else f'{i:06d}'}.tar")
    seen = {}
    for url, out in zip(inputs, outs):
        if out in seen:
            raise UsageError(f"{seen[out]} and {url} would both be written to {out}")
        if out == url:
            raise UsageError(f"--out would overwrite the input {url}; use --in-place for that")
        seen[out] = url
    return outs


def shards_pattern(urls: list[str]) -> str:
    """['p-000003.tar', 'p-000004.tar'] -> 'p-{000003..000004}.tar' when numbered consecutively."""
    parts = [re.fullmatch(r"(.*-)(\d+)(\.tar)", u) for u in urls]
    if len(urls) > 1 and all(parts) and len({(m.group(1), len(m.group(2))) for m in parts}) == 1:
        numbers = [int(m.group(2)) for m in parts]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            head, first, last = parts[0].group(1), parts[0].group(2), parts[-1].group(2)
            return f"{head}{{{first}..{last}}}.tar"
    return urls[0] if len(urls) == 1 else str(urls)


# --------------------------------------------------------------------------- encoders

class BuiltinEncoder:
    def __init__(self, dim: int, max_tokens: int):
        from pixeldiff.text import BuiltinTextEncoder

        self.enc = BuiltinTextEncoder(dim, max_tokens)
        self.dim, self.max_tokens = dim, max_tokens
        self.name = f"builtin (dim {dim}, max_tokens {max_tokens})"

    def __call__(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        emb, mask = self.enc.encode(captions)
        return emb.numpy(), mask.numpy()


class HFEncoder:
    def __init__(self, name: str, max_tokens: int, dim: Optional[int], device: str, local_files_only: bool,
                 model_dtype: str):
        from pixeldiff.text import HFTextEncoder, TextEncoderError

        try:
            self.enc = HFTextEncoder(name, max_tokens, device, local_files_only, model_dtype)
        except TextEncoderError as e:
            raise UsageError(f"--encoder hf:{name}: {e}") from None
        self.max_tokens, self.dim = max_tokens, self.enc.dim
        if dim is not None and dim != self.dim:
            raise UsageError(f"--dim {dim} but the model's hidden size is {self.dim}")
        self.name = f"hf:{name} (max_tokens {max_tokens}, {self.enc.device})"

    def __call__(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        emb, mask = self.enc.encode(captions)
        return emb.numpy(), mask.numpy()


def make_encoder(args):
    if args.encoder == "builtin":
        return BuiltinEncoder(args.dim or 64, args.max_tokens)
    if args.encoder.startswith("hf:") and len(args.encoder) > 3:
        return HFEncoder(args.encoder[3:], args.max_tokens, args.dim, args.device, args.local_files_only,
                         args.model_dtype)
    raise UsageError(f"--encoder {args.encoder!r}: use 'builtin' or 'hf:<model name or folder>'")


# --------------------------------------------------------------------------- shards

def split_name(name: str) -> tuple[str, str]:
    """WebDataset naming: 'dir/000001_000002.emb.npy' -> ('dir/000001_000002', 'emb.npy')."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext if dot else "")


def read_samples(tar: tarfile.TarFile):
    """Yields (key, [(TarInfo, bytes or None)]) for adjacent members with the same key."""
    key, members = None, []
    for info in tar:
        data = tar.extractfile(info).read() if info.isfile() else None
        k = split_name(info.name)[0] if info.isfile() else None
        if members and k != key:
            yield key, members
            members = []
        key = k
        members.append((info, data))
    if members:
        yield key, members


def has_embeddings(path: str) -> bool:
    with tarfile.open(path) as tar:
        found = {}
        for info in tar:
            if info.isfile():
                key, ext = split_name(info.name)
                found.setdefault(key, set()).add(ext)
    return bool(found) and all(set(EMB_EXTS) <= exts for exts in found.values())


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class Stats:
    def __init__(self):
        self.samples = self.no_caption = self.shards = self.skipped_shards = 0
        self.shape = None


def embed_shard(src: str, dst: str, encoder, args, stats: Stats) -> None:
    out_dtype = np.float16 if args.dtype == "float16" else np.float32
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        pending: list[tuple[Optional[str], list]] = []

        def flush():
            groups = [(k, m) for k, m in pending if k is not None]
            if groups:
                captions = []
                for key, members in groups:
                    txt = [d for info, d in members if split_name(info.name)[1] == "txt"]
                    if not txt:
                        stats.no_caption += 1
                    captions.append(txt[0].decode("utf-8", errors="replace").strip() if txt else "")
                emb, mask = encoder(captions)
                cast = emb.astype(out_dtype)
                if not np.isfinite(cast).all():
                    raise UsageError(f"{src}: embeddings overflow {args.dtype} (or are not finite); "
                                     "try --dtype float32")
                stats.shape = cast.shape[1:]
            row = 0
            for key, members in pending:
                for info, data in members:
                    if key is not None and split_name(info.name)[1] in EMB_EXTS:
                        continue  # replaced below
                    tout.addfile(info, io.BytesIO(data) if data is not None else None)
                if key is None:
                    continue
                real = np.flatnonzero(mask[row])
                n = int(real[-1]) + 1 if real.size else 0  # trimmed to the real tokens: no padding on disk
                for ext, arr in (("emb.npy", cast[row, :n]), ("mask.npy", mask[row, :n].astype(bool))):
                    data = npy_bytes(np.ascontiguousarray(arr))
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tout.addfile(info, io.BytesIO(data))
                row += 1
                stats.samples += 1
            pending.clear()

        for key, members in read_samples(tin):
            pending.append((key, members))
            if sum(k is not None for k, _ in pending) >= args.batch_size:
                flush()
        flush()


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embed_captions.py",
                                description="Add caption embeddings (emb.npy, mask.npy) to WebDataset shards.",
                                epilog="See the module docstring (tools/embed_captions.py) for details.")
    p.add_argument("shards", nargs="+", metavar="SHARDS", help="shard paths or URLs; brace patterns are expanded")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="PREFIX", help="write PREFIX-NNNNNN.tar (local or s3://)")
    where.add_argument("--in-place", action="store_true", help="replace the input shards")
    p.add_argument("--encoder", default="builtin", help="'builtin' or 'hf:<model name or local folder>'")
    p.add_argument("--dim", type=int, default=None, help="embedding width (builtin: default 64; hf: checked)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per caption, padded/truncated (default 16)")
    p.add_argument("--batch-size", type=int, default=64, help="captions per encoder call (default 64)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored dtype of emb.npy")
    p.add_argument("--device", default="auto", help="hf encoder device: auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--model-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="hf encoder weights dtype (default float32)")
    p.add_argument("--local-files-only", action="store_true", help="hf: load only from the local cache/folder")
    p.add_argument("--force", action="store_true", help="redo shards that are done already")
    p.add_argument("--endpoint-url", help="S3 endpoint (MinIO, Ceph, ...)")
    p.add_argument("--profile", help="AWS profile for S3 credentials")
    p.add_argument("--anon", action="store_true", help="anonymous S3 access")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    for name in ("max_tokens", "batch_size"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.dim is not None and args.dim <= 0:
        raise UsageError("--dim must be positive")
    if args.encoder == "builtin" and (args.dim or 64) % 2:
        raise UsageError("--dim must be even for the builtin encoder")
    inputs = [u for s in args.shards for u in expand_braces(s)]
    if len(set(inputs)) != len(inputs):
        raise UsageError("a shard is listed twice")
    outputs = output_names(inputs, args.out)
    storage = Storage(args.endpoint_url, args.profile, args.anon)
    try:
        missing = storage.missing(inputs)
        if missing:
            raise UsageError(f"{len(missing)} shards not found, first: {missing[0]}")
        return _run(args, inputs, outputs, storage)
    finally:
        storage.close()


def _run(args, inputs, outputs, storage: Storage) -> int:
    encoder = make_encoder(args)
    stats = Stats()
    bar = None
    if not args.quiet:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(inputs), unit="shard", desc="embedding", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass
    try:
        for n, (src_url, dst_url) in enumerate(zip(inputs, outputs), 1):
            if args.out and not args.force and storage.exists(dst_url):
                stats.skipped_shards += 1
            else:
                try:
                    src = storage.fetch(src_url)
                except FileNotFoundError:
                    raise UsageError(f"shard {src_url} not found") from None
                if args.in_place and not args.force and has_embeddings(src):
                    stats.skipped_shards += 1
                else:
                    staged = storage.staging(dst_url)
                    try:
                        embed_shard(src, staged, encoder, args, stats)
                    except BaseException as e:
                        if os.path.exists(staged):
                            os.remove(staged)
                        if isinstance(e, tarfile.TarError):
                            raise UsageError(f"{src_url} is not a readable tar file ({e})") from None
                        raise
                    storage.publish(staged, dst_url)
                    stats.shards += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(samples=stats.samples, refresh=False)
            elif not args.quiet:
                print(f"embedding: {n}/{len(inputs)} shards, {stats.samples} samples", file=sys.stderr, flush=True)
    finally:
        if bar is not None:
            bar.close()

    print(f"done: {stats.samples} captions embedded in {stats.shards} shards with {encoder.name}; "
          f"{stats.skipped_shards} shards done already (--force to redo)")
    if stats.no_caption:
        print(f"warning: {stats.no_caption} samples had no caption (txt); they got the empty caption's embedding")
    if stats.shape is not None:
        L, D = stats.shape
        print(f"emb.npy: ({L}, {D}) {args.dtype}, mask.npy: ({L},) bool")
        print(f"data.text: {{encoder: precomputed, max_tokens: {L}, dim: {D}}}")
    if args.out:
        print(f"data.shards: {shards_pattern(outputs)}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"embed_captions: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("embed_captions: interrupted; finished shards are kept, rerun to continue", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"embed_captions: error: {type(e).__name__}: {e}; finished shards are kept, rerun to continue",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
