"""Sample grids from a model, and the `pixeldiff-sample` command.

    pixeldiff-sample CHECKPOINT_OR_RUN_DIR --prompt TEXT [--prompt ...] --out grid.png
                     [--steps N] [--cfg S] [--seed N] [--sampler euler|heun] [--resolution PX | --size HxW]

One row per prompt, `--per-prompt` images each, from the EMA weights by default; square images of the stage's
resolution, or `--size HxW` (height x width, e.g. 384x672 for a landscape aspect bucket at 512 px).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixeldiff.objective import sample, tread_route


def to_grid(images: torch.Tensor, rows: int, min_cell: int = 128) -> Image.Image:
    """(B, 3, H, W) in [-1, 1] -> one PIL image, `rows` rows, small cells upscaled (nearest) for viewing."""
    B, _, H, W = images.shape
    cols = B // rows
    pad = 2
    scale = max(1, min_cell // H)
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = H * scale, W * scale
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    return Image.fromarray(grid)


def hw(resolution) -> tuple[int, int]:
    """A square side or an (h, w) pair -> (h, w)."""
    return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)


def image_noise(seed: int, index: int, resolution) -> torch.Tensor:
    """The starting noise of image `index` of a grid (resolution: a side, or (h, w)): its own generator, so a grid
    split over any number of ranks is the same grid."""
    return torch.randn(3, *hw(resolution), generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


def image_routes(seed: int, indices: list[int], tokens: int, ratio: float):
    """Self-guidance's routed tokens for model evaluation k of images `indices`: each image's own generator, like its
    noise, so the grid does not depend on how it is split over ranks. -> k -> (len(indices), kept)."""
    def routes(k: int) -> torch.Tensor:
        return torch.cat([tread_route(1, tokens, ratio, torch.Generator().manual_seed((seed * 1_000_003 + i) * 4099 + k))
                          for i in indices])
    return routes


def grid_part(model, objective, encoder, prompts, resolution, indices: list[int], per_prompt=4, steps=30,
              cfg_scale=4.0, seed=0, method="euler", guidance="cfg", tread_ratio=0.0) -> torch.Tensor:
    """Images `indices` of the grid (image i: prompt i // per_prompt), as this rank's share; `resolution` a side or
    (h, w). -> (len, 3, h, w) on the CPU, float16 (empty for no indices). guidance 'self' (a TREAD model) routes
    `tread_ratio` of the tokens."""
    if not indices:
        return torch.empty(0, 3, *hw(resolution), dtype=torch.float16)
    text, mask = encoder.encode([prompts[i // per_prompt] for i in indices])
    noise = torch.stack([image_noise(seed, i, resolution) for i in indices])
    routes = None
    if guidance == "self":
        h, w = hw(resolution)
        routes = image_routes(seed, indices, (h // model.cfg.patch_size) * (w // model.cfg.patch_size), tread_ratio)
    was_training = model.training
    model.eval()
    images = sample(model, objective, text, mask, resolution, steps=steps, cfg_scale=cfg_scale, method=method,
                    noise=noise, guidance=guidance, routes=routes)
    model.train(was_training)
    return images.to("cpu", torch.float16)


def save_grid(images: torch.Tensor, prompts, out: Path) -> Path:
    """The grid PNG (one row per prompt) and its prompts beside it (`.txt`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    to_grid(images, rows=len(prompts)).save(out)
    out.with_suffix(".txt").write_text("".join(f"row {i + 1}: {p}\n" for i, p in enumerate(prompts)))
    return out


def shared_grid(model, objective, encoder, logging, resolution: int, seed: int, out: Path, rank: int = 0,
                world: int = 1, per_prompt: int = 4, tread_ratio: float = 0.0) -> Path | None:
    """The grid of `logging.sample_prompts`, split over `world` ranks (rank r draws images r, r + world, ...) and
    assembled on rank 0, which writes it. Every rank calls this. -> the PNG on rank 0, None elsewhere."""
    from pixeldiff import distributed

    n = len(logging.sample_prompts) * per_prompt
    mine = list(range(rank, n, world))
    part = grid_part(model, objective, encoder, logging.sample_prompts, resolution, mine, per_prompt,
                     logging.sample_steps, logging.sample_cfg, seed, guidance=logging.sample_guidance,
                     tread_ratio=tread_ratio)
    parts = distributed.gather_to_main(part)
    if parts is None:
        return None
    order = [i for r in range(world) for i in range(r, n, world)]
    return save_grid(torch.cat(parts)[torch.tensor(order).argsort()], logging.sample_prompts, out)


def render_grid(model, objective, encoder, prompts, resolution, out: Path, per_prompt=4, steps=30,
                cfg_scale=4.0, seed=0, method="euler", guidance="cfg", tread_ratio=0.0) -> Path:
    """The whole grid in this process."""
    images = grid_part(model, objective, encoder, prompts, resolution, list(range(len(prompts) * per_prompt)),
                       per_prompt, steps, cfg_scale, seed, method, guidance, tread_ratio)
    return save_grid(images, prompts, out)


def parse_size(args, patch: int):
    """--size HxW or --resolution PX -> (h, w), a side, or None (the stage's); ConfigError naming the fix."""
    from pixeldiff.config import ConfigError

    if args.size is not None and args.resolution is not None:
        raise ConfigError("give --size HxW or --resolution PX, not both")
    if args.resolution is not None:
        if args.resolution <= 0 or args.resolution % patch:
            raise ConfigError(f"--resolution {args.resolution} is not a positive multiple of the patch size {patch}; "
                              f"use e.g. {max(1, args.resolution // patch) * patch}")
        return args.resolution
    if args.size is None:
        return None
    parts = args.size.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"--size {args.size!r}: expected HEIGHTxWIDTH in pixels, e.g. 384x672")
    h, w = (int(p) for p in parts)
    if min(h, w) <= 0 or h % patch or w % patch:
        fix = "x".join(str(max(1, round(v / patch)) * patch) for v in (h, w))
        raise ConfigError(f"--size {args.size}: height and width must be positive multiples of the patch size "
                          f"{patch}; use e.g. {fix}")
    return (h, w)


def main(argv=None) -> int:
    from pixeldiff import checkpoint
    from pixeldiff.config import ConfigError, load_resolved
    from pixeldiff.model import PixelDiT
    from pixeldiff.objective import XPrediction
    from pixeldiff.storage import storage_options
    from pixeldiff.text import make_text_encoder, null_caption
    from pixeldiff.train import model_options

    ap = argparse.ArgumentParser(prog="pixeldiff-sample", description="Sample a PNG grid from a checkpoint or a run directory's latest checkpoint.")
    ap.add_argument("path", help="a run directory or a checkpoint directory (step-N/)")
    ap.add_argument("--prompt", action="append", required=True, help="a caption; repeat for more rows")
    ap.add_argument("--out", required=True, help="PNG file to write")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--resolution", type=int, help="square images of this side; default: the checkpoint's stage's")
    ap.add_argument("--size", metavar="HxW", help="height x width in pixels, each a multiple of the patch size "
                                                  "(e.g. 384x672); instead of --resolution")
    ap.add_argument("--weights", choices=["ema", "model"], default="ema")
    ap.add_argument("--guidance", choices=["cfg", "self"], help="default: the run's logging.sample_guidance; self "
                    "(routed vs dense prediction) needs a TREAD-trained model")
    args = ap.parse_args(argv)

    try:
        path = Path(args.path)
        if not path.exists():
            raise checkpoint.CheckpointError(f"{path} does not exist")
        if not (path / checkpoint.MARKER).exists():
            run_root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            found = checkpoint.latest_valid(run_root, log=lambda s: print(s, file=sys.stderr))
            if found is None:
                raise checkpoint.CheckpointError(f"no complete checkpoint under {path}; pass a run directory or a step-N/ directory")
            path = found
        m = load_resolved(path / "manifest.yaml")
        parts = checkpoint.load(path, names=(args.weights,))
        parts["train_state"] = checkpoint.rank_states(path)[0]
        if args.steps <= 0 or args.per_prompt <= 0:
            raise ConfigError("--steps and --per-prompt must be > 0")
        # precomputed embeddings: the prompts go through the encoder that made them, or come from the run's file
        encoder = make_text_encoder(m.data.text, "cpu", storage_options(m.data.s3))
        null_text, null_mask = null_caption(m, encoder)
        encoder.encode(args.prompt)  # a prompt missing from a prompt embeddings file: said now, before sampling
        guidance = args.guidance or m.logging.sample_guidance
        if guidance == "self" and m.tread.ratio <= 0:
            raise ConfigError("--guidance self guides with the routed vs the dense prediction; this model was trained "
                              "without TREAD (tread.ratio 0): use --guidance cfg")
        model = PixelDiT(m.model, m.data.text.dim, **model_options(m, training=False))
        model.load_state_dict({k: v for k, v in parts[args.weights].items() if not k.startswith("repa.")})
        resolution = parse_size(args, model.cfg.patch_size) or m.stages[parts["train_state"]["stage"]].resolution
    except (ConfigError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = render_grid(model, XPrediction(m.objective, null_text, null_mask), encoder, args.prompt, resolution,
                      Path(args.out), per_prompt=args.per_prompt, steps=args.steps, cfg_scale=args.cfg, seed=args.seed,
                      method=args.sampler, guidance=guidance, tread_ratio=m.tread.ratio)
    size = resolution if isinstance(resolution, int) else "x".join(map(str, resolution))
    print(f"wrote {out} ({len(args.prompt)} prompts x {args.per_prompt}, {size} px, step {parts['train_state']['step']}, {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
