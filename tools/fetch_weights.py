"""Fetch the frozen weights of the perceptual losses, once, on a machine with internet access.

    python tools/fetch_weights.py --out weights/                       # VGG16 (LPIPS) and DINOv2 ViT-B/14-reg
    python tools/fetch_weights.py --out weights/ --upload s3://bucket/pixeldiff/weights [--endpoint-url URL]
    python tools/fetch_weights.py --out weights/ --nets alex,dino --dino-model vit_small_patch14_reg4_dinov2
    python tools/fetch_weights.py --dry-run --upload s3://bucket/w   # print what it would do; no network

Training nodes never download anything: the trainer reads these files from a local path or
an s3:// URL (cached once per node). This tool writes them and prints the manifest lines.

Files
    vgg    https://download.pytorch.org/models/vgg16-397923af.pth   torchvision VGG16 (LPIPS, net: vgg)
    alex   https://download.pytorch.org/models/alexnet-owt-7be5be79.pth  torchvision AlexNet (LPIPS, net: alex)
    dino   <model>-<resolution>.pth: the timm state dict of `--dino-model` (default
           vit_base_patch14_reg4_dinov2) built with num_classes=0 and img_size=--dino-resolution
           (default 224), fetched by timm from the Hugging Face hub (needs timm and
           huggingface_hub); timm resamples the position embeddings to that size, so the
           trainer loads the file strictly.
    The torchvision files are checked against the SHA-256 prefix in their names; every file
    is loaded back (torch.load weights_only=True) and checked the way the trainer loads it.
    Downloads go to a temporary name and are renamed when complete; an existing good file is
    kept. The LPIPS linear layers need no download: they ship inside the `lpips` package.

Upload
    --upload s3://bucket/prefix puts each file at prefix/<file name> (skipped when an object of
    the same size is there); --endpoint-url, --profile for S3-compatible stores. Credentials
    come from the environment or the AWS profile.

Exit status: 0 done, 1 a download, check or upload failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TORCHVISION = {
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}
NETS = ("vgg", "alex", "dino")


class FetchError(Exception):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fetch_weights.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--out", default="weights", help="local folder for the files (default: ./weights)")
    ap.add_argument("--nets", default="vgg,dino", help="comma-separated, of: vgg, alex, dino (default: vgg,dino)")
    ap.add_argument("--dino-model", default="vit_base_patch14_reg4_dinov2", help="timm model name (losses.dino.net)")
    ap.add_argument("--dino-resolution", type=int, default=224, help="image side the DINO loss uses (losses.dino.resolution)")
    ap.add_argument("--upload", metavar="S3_PREFIX", help="also upload to s3://bucket/prefix")
    ap.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, ...)")
    ap.add_argument("--profile", help="AWS profile")
    ap.add_argument("--dry-run", action="store_true", help="print what would be fetched and the manifest lines; no network")
    args = ap.parse_args(argv)
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    bad = [n for n in nets if n not in NETS]
    if not nets or bad:
        ap.error(f"--nets: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(NETS)}")
    args.nets = list(dict.fromkeys(nets))
    if args.upload is not None:
        if not re.fullmatch(r"s3://[^/]+(/.*)?", args.upload):
            ap.error(f"--upload: {args.upload!r} is not an s3://bucket/prefix URL")
        args.upload = args.upload.rstrip("/")
    if args.dino_resolution <= 0:
        ap.error(f"--dino-resolution: must be > 0, got {args.dino_resolution}")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", args.dino_model):
        ap.error(f"--dino-model: {args.dino_model!r} is not a timm model name")
    if (args.endpoint_url or args.profile) and not args.upload:
        ap.error("--endpoint-url/--profile only apply with --upload")
    return args


def file_name(net: str, args) -> str:
    if net in TORCHVISION:
        return TORCHVISION[net].rsplit("/", 1)[-1]
    return f"{args.dino_model}-{args.dino_resolution}.pth"


def manifest_lines(locations: dict[str, str], args) -> str:
    lines = ["losses:"]
    lp = [n for n in ("vgg", "alex") if n in locations]
    if lp:
        lines += ["  lpips:", f"    net: {lp[0]}", f"    weights: {locations[lp[0]]}"]
        if len(lp) > 1:
            lines.append(f"    # net: {lp[1]} -> weights: {locations[lp[1]]}")
    if "dino" in locations:
        lines += ["  dino:", f"    net: {args.dino_model}", f"    resolution: {args.dino_resolution}",
                  f"    weights: {locations['dino']}"]
    return "\n".join(lines)


# ------------------------------------------------------------------ fetching


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def expected_prefix(name: str) -> str | None:
    """torchvision's convention: the hex after the last '-' of the name is a prefix of the file's SHA-256."""
    m = re.search(r"-([a-f0-9]{6,})\.", name)
    return m.group(1) if m else None


def download(url: str, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as e:
        raise FetchError(f"downloading {url} failed: {e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def check_torchvision(net: str, path: Path) -> None:
    prefix = expected_prefix(path.name)
    if prefix and not sha256(path).startswith(prefix):
        raise FetchError(f"{path}: SHA-256 does not start with {prefix} (a corrupt or different file); delete it and rerun")
    from pixeldiff.config import LpipsLossConfig
    from pixeldiff.perceptual import LpipsLoss, load_weights_file

    sd = load_weights_file(path, str(path))
    LpipsLoss(LpipsLossConfig(weight=1.0, net=net), "cpu", state_dict=sd, source=str(path), key=str(path))


def fetch_torchvision(net: str, out: Path) -> Path:
    dest = out / file_name(net, None)
    if dest.is_file():
        try:
            check_torchvision(net, dest)
            print(f"{net}: {dest} already present and good")
            return dest
        except Exception as e:  # noqa: BLE001 - any problem: fetch it again
            print(f"{net}: {dest} present but unusable ({e}); fetching again")
    print(f"{net}: downloading {TORCHVISION[net]}")
    download(TORCHVISION[net], dest)
    check_torchvision(net, dest)
    print(f"{net}: {dest} ({dest.stat().st_size / 2**20:.1f} MiB), SHA-256 {sha256(dest)[:16]}...")
    return dest


def fetch_dino(args, out: Path) -> Path:
    import torch

    try:
        import timm
    except ImportError:
        raise FetchError("dino: needs timm (pip install timm huggingface_hub)") from None
    from pixeldiff.config import DinoLossConfig
    from pixeldiff.perceptual import DinoLoss, load_weights_file

    dest = out / file_name("dino", args)
    if not dest.is_file():
        print(f"dino: timm.create_model({args.dino_model!r}, pretrained=True, num_classes=0, img_size={args.dino_resolution})")
        try:
            model = timm.create_model(args.dino_model, pretrained=True, num_classes=0, img_size=args.dino_resolution)
        except Exception as e:  # noqa: BLE001 - hub, network or name problems
            raise FetchError(f"dino: timm could not fetch {args.dino_model}: {type(e).__name__}: {e}") from None
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
        try:
            torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
    sd = load_weights_file(dest, str(dest))
    DinoLoss(DinoLossConfig(weight=1.0, net=args.dino_model, resolution=args.dino_resolution), "cpu",
             state_dict=sd, source=str(dest), key=str(dest))
    print(f"dino: {dest} ({dest.stat().st_size / 2**20:.1f} MiB), loads strictly into {args.dino_model}")
    return dest


def upload(path: Path, args) -> str:
    import fsspec

    from pixeldiff.storage import s3_options

    url = f"{args.upload}/{path.name}"
    fs, key = fsspec.core.url_to_fs(url, **s3_options(args.endpoint_url, args.profile, False))
    try:
        if fs.exists(key) and fs.info(key)["size"] == path.stat().st_size:
            print(f"{url}: already there, same size")
            return url
        fs.put_file(str(path), key)
    except Exception as e:  # noqa: BLE001
        raise FetchError(f"uploading {path} to {url} failed: {type(e).__name__}: {e}") from None
    print(f"uploaded {url}")
    return url


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.dry_run:
        locations = {}
        for net in args.nets:
            name = file_name(net, args)
            source = TORCHVISION.get(net) or (f"timm.create_model({args.dino_model!r}, pretrained=True, "
                                              f"num_classes=0, img_size={args.dino_resolution})  (Hugging Face hub)")
            print(f"would fetch {net}: {source}\n    -> {out / name}")
            if args.upload:
                print(f"    -> {args.upload}/{name}")
            locations[net] = f"{args.upload}/{name}" if args.upload else str((out / name).resolve())
        print("\nmanifest lines:\n" + manifest_lines(locations, args))
        return 0
    try:
        out.mkdir(parents=True, exist_ok=True)
        locations = {}
        for net in args.nets:
            path = fetch_dino(args, out) if net == "dino" else fetch_torchvision(net, out)
            locations[net] = upload(path, args) if args.upload else str(path.resolve())
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - e.g. a check by the trainer's own loader (ConfigError)
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("\nmanifest lines:\n" + manifest_lines(locations, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
