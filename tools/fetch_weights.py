"""Fetch the frozen weights of the perceptual losses and the evaluation, once, on a machine with internet access.

    python tools/fetch_weights.py --out weights/                       # VGG16 (LPIPS), DINOv2 ViT-B/14-reg, DINOv3 ViT-L/16
    python tools/fetch_weights.py --out weights/ --nets inception,clip # FID's Inception, CLIP ViT-L/14-336 (eval)
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
    repa   <model>.pth: the timm state dict of `--repa-model` (default vit_large_patch16_dinov3,
           REPA's teacher, losses.repa) built with num_classes=0, fetched by timm from the Hugging
           Face hub; DINOv3 weights are gated there: accept Meta's licence on the model page and
           log in (`huggingface-cli login`) first.
    inception  https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth
           torch-fidelity's Inception (FID, eval.inception; pytorch-fid's pt_inception-2015-12-05-6726825d.pth
           has the same hash suffix: the same TF graph, not checked here to be the same bytes)
    clip   <model>-<pretrained>.pth: the open_clip state dict of `--clip-model` (default
           ViT-L-14-336-quickgelu: OpenAI's ViT-L/14 at 336 px, which needs QuickGELU) with
           `--clip-pretrained` weights (default openai), fetched by open_clip (CMMD and CLIP score,
           eval.clip). The DINO-MMD of the evaluation uses the dino file above (eval.dino
           defaults to losses.dino).
    The torchvision files are checked against the SHA-256 prefix in their names (the Inception's
    is printed, and a mismatch warned about); every file is loaded back (torch.load
    weights_only=True) and checked the way the trainer loads it.
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
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
NETS = ("vgg", "alex", "dino", "repa", "inception", "clip")


class FetchError(Exception):
    pass


def save_state_dict(model, dest: Path) -> None:
    """The model's state dict to `dest`, atomically (a partial file never has the final name)."""
    import torch

    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    try:
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fetch_weights.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--out", default="weights", help="local folder for the files (default: ./weights)")
    ap.add_argument("--nets", default="vgg,dino,repa",
                    help="comma-separated, of: vgg, alex, dino, repa, inception, clip (default: vgg,dino,repa)")
    ap.add_argument("--dino-model", default="vit_base_patch14_reg4_dinov2", help="timm model name (losses.dino.net)")
    ap.add_argument("--dino-resolution", type=int, default=224, help="image side the DINO loss uses (losses.dino.resolution)")
    ap.add_argument("--repa-model", default="vit_large_patch16_dinov3", help="timm model name (losses.repa.net)")
    ap.add_argument("--clip-model", default="ViT-L-14-336-quickgelu", help="open_clip model name (eval.clip.model)")
    ap.add_argument("--clip-pretrained", default="openai", help="open_clip pretrained tag of --clip-model")
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
    for flag in ("dino_model", "repa_model", "clip_model", "clip_pretrained"):
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", getattr(args, flag)):
            ap.error(f"--{flag.replace('_', '-')}: {getattr(args, flag)!r} is not a model name")
    if (args.endpoint_url or args.profile) and not args.upload:
        ap.error("--endpoint-url/--profile only apply with --upload")
    return args


def file_name(net: str, args) -> str:
    if net in TORCHVISION:
        return TORCHVISION[net].rsplit("/", 1)[-1]
    if net == "repa":
        return f"{args.repa_model}.pth"
    if net == "inception":
        return INCEPTION_URL.rsplit("/", 1)[-1]
    if net == "clip":
        return f"{args.clip_model}-{args.clip_pretrained}.pth"
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
    if "repa" in locations:
        lines += ["  repa:", f"    net: {args.repa_model}", f"    weights: {locations['repa']}"]
    if len(lines) == 1:
        lines = []
    if "inception" in locations or "clip" in locations:
        lines.append("eval:")
        if "inception" in locations:
            lines += ["  inception:", f"    weights: {locations['inception']}"]
        if "clip" in locations:
            lines += ["  clip:", f"    model: {args.clip_model}", f"    weights: {locations['clip']}"]
        if "dino" in locations:
            lines.append("  # dino: the losses.dino network and file above (eval.dino.net/weights to change it)")
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


def check_inception(path: Path) -> None:
    from pixeldiff.evaluate import inception_fid

    prefix = expected_prefix(path.name)
    digest = sha256(path)
    if prefix and not digest.startswith(prefix):
        print(f"inception: warning: {path} SHA-256 {digest[:16]}... does not start with {prefix}", file=sys.stderr)
    inception_fid(path, str(path), str(path))


def fetch_inception(out: Path) -> Path:
    dest = out / file_name("inception", None)
    if dest.is_file():
        try:
            check_inception(dest)
            print(f"inception: {dest} already present and good")
            return dest
        except Exception as e:  # noqa: BLE001 - any problem: fetch it again
            print(f"inception: {dest} present but unusable ({e}); fetching again")
    print(f"inception: downloading {INCEPTION_URL}")
    download(INCEPTION_URL, dest)
    check_inception(dest)
    print(f"inception: {dest} ({dest.stat().st_size / 2**20:.1f} MiB), SHA-256 {sha256(dest)[:16]}...")
    return dest


def fetch_clip(args, out: Path) -> Path:
    import torch

    try:
        import open_clip
    except ImportError:
        raise FetchError("clip: needs open_clip (pip install open_clip_torch==3.3.0)") from None
    from pixeldiff.evaluate import ClipNet

    dest = out / file_name("clip", args)
    if not dest.is_file():
        print(f"clip: open_clip.create_model({args.clip_model!r}, pretrained={args.clip_pretrained!r})")
        try:
            model = open_clip.create_model(args.clip_model, pretrained=args.clip_pretrained)
        except Exception as e:  # noqa: BLE001 - hub, network or name problems
            raise FetchError(f"clip: open_clip could not fetch {args.clip_model} {args.clip_pretrained}: "
                             f"{type(e).__name__}: {e}") from None
        save_state_dict(model, dest)
    ClipNet(args.clip_model, dest, str(dest), str(dest), torch.device("cpu"), True)
    print(f"clip: {dest} ({dest.stat().st_size / 2**20:.1f} MiB), loads strictly into open_clip {args.clip_model}")
    return dest


def timm_build(net: str, args) -> tuple[str, dict]:
    """(model name, timm.create_model keyword arguments) of the DINO loss's network or REPA's teacher."""
    if net == "repa":
        return args.repa_model, {"num_classes": 0, "dynamic_img_size": True}
    return args.dino_model, {"num_classes": 0, "img_size": args.dino_resolution}


def check_timm(net: str, path: Path, args) -> None:
    """Load the file the way the trainer does (strictly, into the same network)."""
    from pixeldiff.config import DinoLossConfig, RepaLossConfig
    from pixeldiff.perceptual import DinoLoss, load_weights_file
    from pixeldiff.repa import RepaTeacher

    sd = load_weights_file(path, str(path))
    if net == "repa":
        RepaTeacher(RepaLossConfig(weight=1.0, net=args.repa_model), 32, "cpu", state_dict=sd, source=str(path),
                    key=str(path))
    else:
        DinoLoss(DinoLossConfig(weight=1.0, net=args.dino_model, resolution=args.dino_resolution), "cpu",
                 state_dict=sd, source=str(path), key=str(path))


def fetch_timm(net: str, args, out: Path) -> Path:
    try:
        import timm
    except ImportError:
        raise FetchError(f"{net}: needs timm (pip install timm huggingface_hub)") from None
    name, kwargs = timm_build(net, args)
    dest = out / file_name(net, args)
    if not dest.is_file():
        print(f"{net}: timm.create_model({name!r}, pretrained=True, {', '.join(f'{k}={v}' for k, v in kwargs.items())})")
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - hub, network, licence or name problems
            raise FetchError(f"{net}: timm could not fetch {name}: {type(e).__name__}: {e}") from None
        save_state_dict(model, dest)
    check_timm(net, dest, args)
    print(f"{net}: {dest} ({dest.stat().st_size / 2**20:.1f} MiB), loads strictly into {name}")
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
            model, kwargs = timm_build(net, args)
            source = TORCHVISION.get(net) or (f"timm.create_model({model!r}, pretrained=True, "
                                              f"{', '.join(f'{k}={v}' for k, v in kwargs.items())})  (Hugging Face hub)")
            if net == "inception":
                source = INCEPTION_URL
            elif net == "clip":
                source = f"open_clip.create_model({args.clip_model!r}, pretrained={args.clip_pretrained!r})"
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
            if net in ("dino", "repa"):
                path = fetch_timm(net, args, out)
            elif net == "inception":
                path = fetch_inception(out)
            elif net == "clip":
                path = fetch_clip(args, out)
            else:
                path = fetch_torchvision(net, out)
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
