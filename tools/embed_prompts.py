"""Embed a manifest's sample prompts with the encoder that embedded its shards' captions.

    python tools/embed_prompts.py MANIFEST --out FILE [--encoder builtin|hf:NAME] [--max-tokens L] [--dim D]

    python tools/embed_prompts.py manifests/speedrun.yaml --out s3://your-bucket/t2i/sample-prompts.pt \\
        --encoder hf:google/t5gemma-2b-2b-ul2

A run on precomputed caption embeddings (data.text.encoder: precomputed) must give its sample
grids the prompts' embeddings from the same encoder; with this file (data.text.prompt_embeddings)
the training nodes need no text encoder at all. The prompts are the manifest's
logging.sample_prompts (and any `--prompt TEXT`, for pixeldiff-sample later); --max-tokens and --dim
default to the manifest's data.text. FILE is a local path or an s3:// URL (written whole, from a local
temporary file). The encoders are tools/embed_captions.py's, with its options.

Exit status: 0 done, 1 runtime error, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from embed_captions import Storage, UsageError, is_remote, make_encoder  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embed_prompts.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("manifest", help="the run's manifest (its logging.sample_prompts and data.text)")
    p.add_argument("--out", required=True, help="the file to write, local or s3:// (data.text.prompt_embeddings)")
    p.add_argument("--prompt", action="append", default=[], help="another prompt to embed; repeatable")
    p.add_argument("--encoder", default="builtin", help="'builtin' or 'hf:<model name or local folder>'")
    p.add_argument("--dim", type=int, default=None, help="default: the manifest's data.text.dim")
    p.add_argument("--max-tokens", type=int, default=None, help="default: the manifest's data.text.max_tokens")
    p.add_argument("--device", default="auto", help="hf encoder device: auto, cpu, cuda, ...")
    p.add_argument("--model-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--local-files-only", action="store_true", help="hf: load only from the local cache/folder")
    p.add_argument("--endpoint-url", help="S3 endpoint (MinIO, Ceph, ...)")
    p.add_argument("--profile", help="AWS profile for S3 credentials")
    p.add_argument("--anon", action="store_true", help="anonymous S3 access")
    return p


def run(args) -> int:
    import torch

    from pixeldiff.config import ConfigError
    from launcher.manifest import load_manifest

    try:
        m = load_manifest(Path(args.manifest), [])
    except (ConfigError, OSError) as e:
        raise UsageError(f"{args.manifest}: {e}") from None
    args.dim = args.dim or m.data.text.dim
    args.max_tokens = args.max_tokens or m.data.text.max_tokens
    if (args.dim, args.max_tokens) != (m.data.text.dim, m.data.text.max_tokens):
        raise UsageError(f"--dim {args.dim} --max-tokens {args.max_tokens}, but the manifest's data.text has dim "
                         f"{m.data.text.dim} and max_tokens {m.data.text.max_tokens}: the run could not read them")
    prompts = list(dict.fromkeys([*m.logging.sample_prompts, *args.prompt]))
    encoder = make_encoder(args)
    emb, mask = encoder(prompts)
    table = {"prompts": prompts, "emb": torch.from_numpy(emb).to(torch.float16), "mask": torch.from_numpy(mask).bool()}
    storage = Storage(args.endpoint_url, args.profile, args.anon)
    try:
        if is_remote(args.out):
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, "prompts.pt")
                torch.save(table, local)
                storage.fs(args.out).put_file(local, args.out)
        else:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            partial = f"{args.out}.partial"
            torch.save(table, partial)
            os.replace(partial, args.out)
    finally:
        storage.close()
    print(f"done: {len(prompts)} prompts embedded with {encoder.name} into {args.out}")
    print(f"data.text.prompt_embeddings: {args.out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the network, S3, the encoder
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
