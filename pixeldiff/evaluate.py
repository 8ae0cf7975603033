"""Quality metrics of generated images against a held-out set: FID, CMMD, CLIP score and DINO-MMD, on every rank.

    ev = Evaluator(m.eval, m, device, storage_options, log)          # the frozen networks, weights from files
    ref = ev.reference(reference_batches(m, 512, ...), 512, cache_dir)  # statistics of the held-out images (cached)
    ev.score(generated_batches, ref)  # {"fid", "cmmd", "clip_score", "dino_mmd", "samples", "features", "preprocess"}

- FID: torchmetrics' FrechetInceptionDistance (2048-d pool features of torch-fidelity's Inception, loaded from
  `eval.inception.weights`); the reference keeps its sums (mean and covariance sufficient statistics).
- CMMD (Jayasumana et al. 2024): the MMD of L2-normalised CLIP image embeddings (open_clip, `eval.clip`) with the
  paper's Gaussian kernel, sigma 10, times 1000 (its `mmd`: the biased estimator, means over all pairs).
- CLIP score: mean over generated images of 100 * max(cos(image embedding, caption embedding), 0).
- DINO-MMD: the same MMD on L2-normalised DINO class tokens (timm, `eval.dino`, by default the DINO loss's network).
- Without a weights file and `eval.without_weights: random_features`: a fixed-seed random convolutional network's
  features stand in for the image networks (a random Inception is degenerate: FID ~1e-13 for any images), and
  clip_score is None; the result's `features` names what was used.

Images come in as uint8 (B, 3, H, W) (`to_uint8` rounds the model's [-1, 1] output). Features and statistics are
reduced over torch.distributed ranks when it is initialised: every rank returns the same numbers, and any split of
the images over ranks gives the single-process value. Heavy libraries are imported when a network is built, so the
data reader can import `held_out` cheaply.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pixeldiff.config import INCEPTION_FILE, ConfigError, EvalConfig, Manifest

MMD_SIGMA = 10.0  # the CMMD paper's Gaussian kernel bandwidth ...
MMD_SCALE = 1000.0  # ... and its scale
SUBSTITUTE_SEED = 0
# held-out synthetic samples: indices training never reaches (3.2 billion samples in). Below 2^32: torch's CPU generator
# keeps only the low 32 bits of a seed, so 2^40 + j would be training sample j again
SYNTHETIC_OFFSET = 3 << 30
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_VERSION = 1


# ------------------------------------------------------------------ the held-out set


def held_out(key: str, fraction: float, seed: int = 0) -> bool:
    """Whether sample `key` belongs to the held-out set: a hash of (seed, key) below `fraction`. Pure and stable
    across processes and machines, so the data reader leaves exactly these keys out of training."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def training_holdout(m: Manifest) -> tuple[float, int] | None:
    """(fraction, seed) of the training keys the data reader must skip, or None when nothing is held out (eval off,
    eval.shards given, or synthetic data, whose held-out samples are indices training never reaches)."""
    e = m.eval
    if not e.enabled or e.shards is not None or m.data.source != "webdataset" or e.holdout <= 0:
        return None
    return e.holdout, e.holdout_seed


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255] by rounding (not truncation: that would darken every image by half a
    level), clamped."""
    return ((x.float() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reference_batches(m: Manifest, resolution: int, batch: int | None = None, storage_options: dict | None = None,
                      log: Callable[[str], None] = print, rank: int | None = None, world: int | None = None):
    """This rank's share of the held-out images: yields (images uint8 (B, 3, R, R) on the CPU, captions, indices),
    `indices` their places in the held-out order. The set does not depend on the number of ranks.

    - synthetic data without eval.shards: samples SYNTHETIC_OFFSET + j of the data seed (j < eval.samples; rank j % W),
      which training never reaches.
    - eval.shards, or the training shards' held-out keys (`held_out`, eval.holdout): the first eval.samples samples
      in shard-list order, key order; in rounds, rank r reads shard round x W + r (the keys' bytes; only the kept
      samples are decoded: resized and centre-cropped to R like training data), all ranks agree on the counts, and
      the rounds stop once enough were found. A bad sample or shard is skipped and counted in the log.
    """
    from pixeldiff.shardlist import shard_list
    from pixeldiff.shardread import Bad, ReadOptions, decode_sample, read_shard_raw

    e = m.eval
    batch = batch or e.batch
    if rank is None or world is None:
        rank, world = _world()
    if e.shards is None and m.data.source == "synthetic":
        from pixeldiff.data import SyntheticShapes

        shapes = SyntheticShapes(m.data.seed)
        mine = list(range(rank, e.samples, world))
        for i in range(0, len(mine), batch):
            idx = mine[i:i + batch]
            items = [shapes.sample(SYNTHETIC_OFFSET + j, resolution) for j in idx]
            yield to_uint8(torch.stack([im for im, _ in items])), [c for _, c in items], idx
        return
    urls = shard_list(e.shards if e.shards is not None else m.data.shards, storage_options)
    fraction = None if e.shards is not None else e.holdout
    d = m.data
    opt = ReadOptions(resolution=resolution, max_pixels=d.max_pixels, retries=d.retries, backoff_s=d.retry_backoff_s,
                      block_size=d.block_size_mb << 20, caption_key=d.caption_key)
    found, bad, pending = 0, 0, []
    for start in range(0, len(urls), world):
        kept = []  # this round's held-out samples of my shard, still encoded
        if start + rank < len(urls):
            for item in read_shard_raw(urls[start + rank], opt, 0, storage_options, log):
                if isinstance(item, Bad):
                    bad += 1
                elif fraction is None or held_out(item[0], fraction, e.holdout_seed):
                    kept.append(item)
        counts = _gather_objects(len(kept))
        first = found + sum(counts[:rank])  # the held-out index of my first sample this round
        for i, (key, parts) in enumerate(kept[:max(0, e.samples - first)]):
            s = decode_sample(key, parts, opt, 0)
            if isinstance(s, Bad):
                bad += 1
                continue
            pending.append((s["image"], s["caption"], first + i))
            if len(pending) == batch:
                yield _collate(pending)
                pending = []
        found += sum(counts)
        if found >= e.samples:
            break
    if pending:
        yield _collate(pending)
    if found == 0:  # the same on every rank
        from pixeldiff.shardlist import DataError

        where = "eval.shards" if fraction is None else f"the training shards' held-out keys (eval.holdout {fraction:g})"
        raise DataError(f"eval: no held-out samples in {len(urls)} shards of {where}; check eval.shards, or raise "
                        f"eval.holdout")
    if found < e.samples and rank == 0:
        log(f"eval: only {found} held-out samples in {len(urls)} shards, fewer than eval.samples = {e.samples}; "
            f"add shards to eval.shards or raise eval.holdout")
    if bad:
        log(f"eval: rank {rank} skipped {bad} bad held-out samples or shards")


def _collate(items):
    return torch.stack([im for im, _, _ in items]), [c for _, c, _ in items], [i for _, _, i in items]


# ------------------------------------------------------------------ MMD and the substitute features


def mmd(x: torch.Tensor, y: torch.Tensor, sigma: float = MMD_SIGMA, scale: float = MMD_SCALE,
        chunk: int = 2048) -> float:
    """scale x (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)), k(a, b) = exp(-|a - b|^2 / (2 sigma^2)), means
    over all pairs (the CMMD paper's estimator), in float64, in blocks of `chunk` rows (10k x 10k never whole)."""
    x, y = x.double(), y.double()
    gamma = 1 / (2 * sigma**2)

    def mean_kernel(a, b):
        total, bn = 0.0, (b * b).sum(1)
        for i in range(0, a.shape[0], chunk):
            ai = a[i:i + chunk]
            d2 = ((ai * ai).sum(1)[:, None] + bn[None, :] - 2 * ai @ b.T).clamp_min_(0)
            total += torch.exp(-gamma * d2).sum().item()
        return total / (a.shape[0] * b.shape[0])

    return scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y))


class RandomConvFeatures(nn.Module):
    """Features informative without pretraining: three stride-2 3x3 convolutions with ReLU (He-normal weights from a
    fixed seed, no biases) on the image resized to 64 x 64 in [-1, 1]; per channel the mean and the standard deviation
    over positions of the last layer (2 x 128 = 256 values). uint8 (B, 3, H, W) in, (B, 256) float out."""

    SIZE = 64

    def __init__(self, seed: int = SUBSTITUTE_SEED, antialias: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        widths = (3, 32, 64, 128)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False) for a, b in zip(widths, widths[1:]))
        with torch.no_grad():
            for c in self.convs:
                c.weight.copy_(torch.randn(c.weight.shape, generator=g) * math.sqrt(2 / c.weight[0].numel()))
        self.requires_grad_(False).eval()
        self.antialias, self.seed = antialias, seed
        self.num_features = 2 * widths[-1]
        self.name = f"random-conv-seed{seed}-{self.num_features}d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1
        x = F.interpolate(x, size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False, antialias=self.antialias)
        for c in self.convs:
            x = F.relu(c(x))
        x = x.flatten(2)  # (B, C, positions)
        return torch.cat([x.mean(2), x.std(2)], dim=1)


def _square(x: torch.Tensor, size: int, mode: str, antialias: bool) -> torch.Tensor:
    """Float images (B, 3, H, W): the shorter side resized to `size`, then the centre size x size crop."""
    H, W = x.shape[-2:]
    if (H, W) != (size, size):
        s = size / min(H, W)
        h, w = max(size, round(H * s)), max(size, round(W * s))
        x = F.interpolate(x, size=(h, w), mode=mode, align_corners=False, antialias=antialias)
        top, left = (h - size) // 2, (w - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x


# ------------------------------------------------------------------ the networks


def inception_fid(path: Path, source: str, key: str, antialias: bool = True):
    """torchmetrics' FrechetInceptionDistance on torch-fidelity's Inception from `path` (2048-d pool features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from pixeldiff.perceptual import load_weights_file

    load_weights_file(path, key)  # plain tensors only, checked before torch-fidelity unpickles it
    try:
        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path), antialias=antialias,
                                        sync_on_compute=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:2]
        raise ConfigError(f"{key}: {source} is not torch-fidelity's Inception ({INCEPTION_FILE}): "
                          f"{' '.join(first)}"[:600]) from None


class ClipNet:
    """open_clip, weights from a file: L2-normalised image embeddings and caption embeddings."""

    def __init__(self, model: str, path: Path, source: str, key: str, device: torch.device, antialias: bool):
        import open_clip

        from pixeldiff.weights import clip_model_name

        name = clip_model_name(model)
        try:
            # an absolute path: a relative one named like a pretrained tag ('openai') would be downloaded
            net = open_clip.create_model(name, pretrained=str(Path(path).resolve()), device="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a wrong, truncated or pickled file: the user's to fix
            first = str(e).strip().splitlines()[:3]
            raise ConfigError(f"{key}: {source} does not load into open_clip {name} ({type(e).__name__}: "
                              f"{' '.join(first)})"[:600] + "; fetch it with tools/fetch_weights.py --nets clip") from None
        self.model = net.requires_grad_(False).eval().to(device)
        self.tokenizer = open_clip.get_tokenizer(name)
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = self.model.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), device=device).view(1, 3, 1, 1)
        self.device, self.antialias, self.name = device, antialias, name
        self.quick_gelu = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))

    def images(self, x: torch.Tensor) -> torch.Tensor:
        x = _square(x.float() / 255, self.size, "bicubic", self.antialias).clamp_(0, 1)
        return F.normalize(self.model.encode_image((x - self.mean) / self.std).float(), dim=-1)

    def texts(self, captions: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(captions).to(self.device)).float(), dim=-1)

    def preprocess(self) -> dict:
        return {"input": self.size, "resize": f"bicubic{', antialias' if self.antialias else ''}, shorter side to "
                f"{self.size}, centre crop, clamped to [0, 1]", "normalize": "the model's mean/std",
                "features": "image embedding, L2-normalised"}


class DinoNet:
    """A timm ViT (the DINO loss's network by default), weights from a file: L2-normalised class tokens."""

    def __init__(self, name: str, resolution: int, sd: dict, source: str, key: str, device: torch.device,
                 antialias: bool):
        from pixeldiff.perceptual import load_dino_weights, timm_model

        model = timm_model(name, resolution, key="eval.dino.net")
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if patch is not None and resolution % patch[0]:
            raise ConfigError(f"eval.dino.resolution: {resolution} is not a multiple of {name}'s patch size "
                              f"{patch[0]}; use e.g. {max(1, resolution // patch[0]) * patch[0]}")
        load_dino_weights(model, sd, key, source)
        self.model = model.requires_grad_(False).eval().to(device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.resolution, self.antialias, self.name = resolution, antialias, name

    def images(self, x: torch.Tensor) -> torch.Tensor:
        x = _square(x.float() / 255, self.resolution, "bilinear", self.antialias)
        out = self.model.forward_head(self.model.forward_features((x - self.mean) / self.std), pre_logits=True)
        return F.normalize(out.float(), dim=-1)

    def preprocess(self) -> dict:
        return {"input": self.resolution, "resize": f"bilinear{', antialias' if self.antialias else ''}, shorter side "
                f"to {self.resolution}, centre crop", "normalize": "ImageNet mean/std",
                "features": "class token (timm forward_head pre_logits), L2-normalised"}


class SubstituteNet:
    """RandomConvFeatures for the MMD metrics: L2-normalised like the real embeddings."""

    def __init__(self, device: torch.device, antialias: bool):
        self.net = RandomConvFeatures(antialias=antialias).to(device)
        self.name = self.net.name

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)

    def preprocess(self) -> dict:
        return _substitute_preprocess(self.net)


def _substitute_preprocess(net: RandomConvFeatures) -> dict:
    return {"input": net.SIZE, "resize": f"bilinear{', antialias' if net.antialias else ''} to {net.SIZE} x {net.SIZE}",
            "normalize": "x / 127.5 - 1", "features": f"{net.name}: per-channel mean and std of the last layer"}


def _library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("torch", "torchmetrics", "torch-fidelity", "open_clip_torch", "timm"):
        with contextlib.suppress(PackageNotFoundError):
            out[p] = version(p)
    return out


# ------------------------------------------------------------------ the evaluator


@dataclass
class Reference:
    """Statistics of the held-out images at one resolution (identical on every rank)."""

    settings: dict
    samples: int
    captions: list[str] = field(default_factory=list)  # in held-out order: the prompts to generate from
    fid: dict | None = None  # torchmetrics' real_features_sum, real_features_cov_sum, real_features_num_samples
    clip: torch.Tensor | None = None  # (n, D) L2-normalised embeddings, CPU
    dino: torch.Tensor | None = None

    def prompts(self, rank: int | None = None, world: int | None = None) -> list[tuple[int, str]]:
        """This rank's share of the prompts to generate from: (index, caption) for index % world == rank (an image's
        noise can then be seeded by its index, so the generated set does not depend on the number of ranks)."""
        if rank is None or world is None:
            rank, world = _world()
        return [(i, self.captions[i]) for i in range(rank, len(self.captions), world)]

    def state(self) -> dict:
        return {"settings": json.dumps(self.settings, sort_keys=True), "samples": self.samples,
                "captions": self.captions, "fid": self.fid, "clip": self.clip, "dino": self.dino}

    @classmethod
    def from_state(cls, s: dict) -> Reference:
        return cls(json.loads(s["settings"]), int(s["samples"]), list(s["captions"]), s["fid"], s["clip"], s["dino"])


class Evaluator:
    """The enabled metrics' frozen networks on `device`. Build it on every rank; `reference` and `score` are
    collective (every rank calls them, with its own share of the images)."""

    def __init__(self, cfg: EvalConfig, manifest: Manifest, device, storage_options: dict | None = None,
                 log: Callable[[str], None] = print):
        from pixeldiff.perceptual import load_weights_file
        from pixeldiff.weights import eval_networks, missing_eval_weights, random_features_warning, resolve_weights

        self.cfg, self.m, self.device, self.log = cfg, manifest, torch.device(device), log
        self.metrics = list(cfg.metrics)
        self.warnings: list[str] = []
        self.features: dict[str, str | None] = {}
        self.weights: dict[str, dict] = {}
        nets = eval_networks(_with_eval(manifest, cfg))  # whether or not the manifest evaluates during training
        files = {}
        for net, info in nets.items():
            if info["weights"] is None:
                if cfg.without_weights == "error":
                    raise ConfigError(missing_eval_weights(net, info))
                self.warnings.append(random_features_warning(net, info))
                continue
            path = resolve_weights(info["weights"], info["key"], storage_options, log=log)
            source = info["weights"] if info["weights"] == str(path) else f"{info['weights']} ({path})"
            files[net] = (path, source, info)
            self.weights[net] = {"spec": info["weights"], "bytes": path.stat().st_size}
        self.fid_metric = self.clip = self.dino = self.substitute = self._dim_cache = None
        if "fid" in self.metrics:
            self.fid_metric, self.features["fid"] = self._fid(files.get("inception"))
        if "inception" not in files and "fid" in self.metrics or "clip" not in files and "cmmd" in self.metrics \
                or "dino" not in files and "dino_mmd" in self.metrics:
            self.substitute = SubstituteNet(self.device, cfg.antialias)
        if "clip" in files:
            path, source, info = files["clip"]
            self.clip = ClipNet(info["net"], path, source, info["key"], self.device, cfg.antialias)
            if "openai" in info["weights"].lower() and not self.clip.quick_gelu:
                self.warnings.append(f"eval.clip.model: {info['net']!r} uses GELU, but {info['weights']} looks like "
                                     f"OpenAI's weights, which were trained with QuickGELU: the embeddings are off; "
                                     f"use the -quickgelu model (e.g. ViT-L-14-336-quickgelu)")
        if "dino" in files:
            path, source, info = files["dino"]
            self.dino = DinoNet(info["net"], info["resolution"], load_weights_file(path, info["key"]), source,
                                info["key"], self.device, cfg.antialias)
        if "cmmd" in self.metrics:
            self.features["cmmd"] = f"clip-{self.clip.name}" if self.clip else self.substitute.name
        if "clip_score" in self.metrics:
            self.features["clip_score"] = f"clip-{self.clip.name}" if self.clip else None
        if "dino_mmd" in self.metrics:
            self.features["dino_mmd"] = f"dino-{self.dino.name}-{self.dino.resolution}px" if self.dino \
                else self.substitute.name

    def _fid(self, file):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if file is None:
            net = RandomConvFeatures(antialias=self.cfg.antialias)
            metric = FrechetInceptionDistance(feature=net, sync_on_compute=False)
            return metric.to(self.device), net.name
        path, source, info = file
        return inception_fid(path, source, info["key"], self.cfg.antialias).to(self.device), "inception-v3-2048"

    # -------------------------------------------------------------- what the numbers are

    def preprocess(self, image_size=None) -> dict:
        out = {"uint8": "round((x + 1) * 127.5), clamped to [0, 255]"}
        if image_size is not None:
            out["image"] = list(image_size)
        if self.fid_metric is not None:
            if self.features["fid"].startswith("inception"):
                out["fid"] = {"input": 299, "resize": "bilinear, antialias (torch)" if self.cfg.antialias else
                              "bilinear as TF1 (torch-fidelity), no antialias", "normalize": "(x - 128) / 128",
                              "features": "2048-d pool"}
            else:
                out["fid"] = _substitute_preprocess(self.fid_metric.inception)
        if "cmmd" in self.metrics or "clip_score" in self.metrics:
            out["clip"] = self.clip.preprocess() if self.clip else None
        if "cmmd" in self.metrics and not self.clip or "dino_mmd" in self.metrics and not self.dino:
            out["substitute"] = self.substitute.preprocess()
        if "dino_mmd" in self.metrics and self.dino:
            out["dino"] = self.dino.preprocess()
        if "cmmd" in self.metrics or "dino_mmd" in self.metrics:
            out["mmd"] = f"Gaussian kernel, sigma {MMD_SIGMA:g}, x {MMD_SCALE:g}, means over all pairs"
        return out

    def settings(self, resolution: int) -> dict:
        """What the reference statistics depend on: the held-out set, the networks, their files, the preprocessing."""
        e, d = self.cfg, self.m.data
        data = {"source": d.source if e.shards is None else "webdataset", "shards": e.shards if e.shards is not None
                else d.shards, "holdout": None if e.shards is not None or d.source == "synthetic" else e.holdout,
                "holdout_seed": e.holdout_seed,
                "seed": d.seed if d.source == "synthetic" and e.shards is None else None,
                "synthetic_offset": SYNTHETIC_OFFSET if d.source == "synthetic" and e.shards is None else None,
                "caption_key": d.caption_key, "max_pixels": d.max_pixels}
        image_metrics = sorted(x for x in self.metrics if x != "clip_score")
        return {"version": CACHE_VERSION, "resolution": resolution, "samples": e.samples, "data": data,
                "metrics": image_metrics, "features": {k: self.features[k] for k in image_metrics},
                "weights": self.weights, "preprocess": self.preprocess(), "libraries": _library_versions()}

    # -------------------------------------------------------------- features

    def _fp32(self):
        """Float32 features even when called inside the trainer's bf16 autocast."""
        return torch.autocast(self.device.type, enabled=False)

    @staticmethod
    def _wanted(metrics) -> list[str]:
        return [k for metric, k in (("cmmd", "clip"), ("dino_mmd", "dino")) if metric in metrics]

    def _image_features(self, images: torch.Tensor, metrics=None) -> dict[str, torch.Tensor]:
        """{"clip": (B, D), "dino": (B, D)} for the MMD metrics among `metrics` (default: all of this evaluator's)."""
        wanted = self._wanted(self.metrics if metrics is None else metrics)
        out = {}
        if "clip" in wanted:
            out["clip"] = (self.clip or self.substitute).images(images)
        if "dino" in wanted:
            out["dino"] = (self.dino or self.substitute).images(images) if self.dino or "clip" not in out \
                or self.clip else out["clip"]
        return out

    def _dims(self) -> dict[str, int]:
        if self._dim_cache is None:
            probe = torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=self.device)
            with torch.no_grad(), self._fp32():
                self._dim_cache = {k: v.shape[1] for k, v in self._image_features(probe).items()}
        return self._dim_cache

    @staticmethod
    def _unpack(b):
        images, captions = b[0], list(b[1])
        return images, captions, (list(b[2]) if len(b) > 2 else None)

    def _check(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"eval: images must be uint8 (B, 3, H, W) (pixeldiff.evaluate.to_uint8), got "
                             f"{images.dtype} {tuple(images.shape)}")

    # -------------------------------------------------------------- reference

    def cache_path(self, resolution: int, cache_dir) -> str:
        digest = hashlib.sha256(json.dumps(self.settings(resolution), sort_keys=True).encode()).hexdigest()[:12]
        return f"{str(cache_dir).rstrip('/')}/reference-{resolution}px-{digest}.pt"

    def reference(self, batches: Iterable, resolution: int, cache_dir=None, storage_options: dict | None = None
                  ) -> Reference:
        """Statistics of the held-out images (`batches`: this rank's (images, captions[, indices]), e.g.
        `reference_batches`), read from `cache_dir` (local or s3://) when a file made with the same settings is there,
        else computed (every rank its share, then reduced) and written there by rank 0. `batches` is not iterated
        on a cache hit."""
        settings = self.settings(resolution)
        rank, _ = _world()
        path = self.cache_path(resolution, cache_dir) if cache_dir is not None else None
        cached = None
        if path is not None and rank == 0:
            cached = self._read_cache(path, settings, storage_options)
        from pixeldiff.distributed import broadcast_object

        cached = broadcast_object(cached.state() if cached is not None else None)
        if cached is not None:
            ref = Reference.from_state(cached)
            self.log(f"eval: reference statistics for {resolution} px from {path} ({ref.samples} images)")
            return ref
        ref = self._compute_reference(batches, settings)
        if path is not None and rank == 0:
            self._write_cache(path, ref, storage_options)
        return ref

    def _compute_reference(self, batches, settings) -> Reference:
        feats = {k: [] for k in self._dims()}
        captions, n = [], 0
        if self.fid_metric is not None:
            self.fid_metric.reset()
        with torch.no_grad(), self._fp32():
            for b in batches:
                images, caps, idx = self._unpack(b)
                self._check(images)
                images = images.to(self.device)
                if self.fid_metric is not None:
                    self.fid_metric.update(images, real=True)
                for k, v in self._image_features(images).items():
                    feats[k].append(v)
                captions += list(zip(idx if idx is not None else [None] * len(caps), caps))
                n += images.shape[0]
        dims = self._dims()
        gathered = {k: _gather_rows(torch.cat(v) if v else torch.zeros(0, dims[k], device=self.device))
                    for k, v in feats.items()}
        every = [c for part in _gather_objects(captions) for c in part]
        if every and all(i is not None for i, _ in every):
            every.sort(key=lambda t: t[0])
        total = int(_sum(torch.tensor([n], dtype=torch.float64, device=self.device))[0])
        fid = None
        if self.fid_metric is not None:
            fid = {}
            for k in ("real_features_sum", "real_features_cov_sum", "real_features_num_samples"):
                fid[k] = _sum(getattr(self.fid_metric, k)).cpu()
        return Reference(settings, total, [c for _, c in every], fid,
                         gathered["clip"].cpu() if "clip" in gathered else None,
                         gathered["dino"].cpu() if "dino" in gathered else None)

    def _read_cache(self, path: str, settings: dict, storage_options) -> Reference | None:
        import fsspec

        from pixeldiff.checkpoint_verify import torch_load

        try:
            with fsspec.open(path, "rb", **(storage_options or {} if path.startswith("s3://") else {})) as f:
                state = torch_load(io.BytesIO(f.read()), path)
            ref = Reference.from_state(state)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed, never fatal
            self.log(f"eval: cannot read the cached reference {path} ({type(e).__name__}: {e}); computing it again")
            return None
        if json.loads(json.dumps(settings, sort_keys=True)) != ref.settings:
            self.log(f"eval: {path} was made with other settings; computing it again")
            return None
        return ref

    def _write_cache(self, path: str, ref: Reference, storage_options) -> None:
        import fsspec

        buf = io.BytesIO()
        torch.save(ref.state(), buf)
        try:
            if path.startswith("s3://"):
                with fsspec.open(path, "wb", **(storage_options or {})) as f:
                    f.write(buf.getvalue())
            else:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "wb") as f:
                    f.write(buf.getvalue())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            self.log(f"eval: reference statistics of {ref.samples} images saved to {path}")
        except Exception as e:  # noqa: BLE001 - the next evaluation computes them again
            self.log(f"eval: could not save the reference statistics to {path} ({type(e).__name__}: {e})")

    # -------------------------------------------------------------- score

    def score(self, batches: Iterable, reference: Reference, metrics: Iterable[str] | None = None) -> dict:
        """The metrics of the generated images (`batches`: this rank's (images uint8 (B, 3, H, W), captions)) against
        `reference`: all of eval.metrics, or the subset `metrics`; every rank returns the same dict."""
        use = list(metrics) if metrics is not None else self.metrics
        unknown = [x for x in use if x not in self.metrics]
        if unknown:
            raise ValueError(f"eval: {unknown} not among this evaluator's metrics {self.metrics}")
        dims = self._dims()
        feats = {k: [] for k in self._wanted(use)}
        clip_sum, n, size = 0.0, 0, None
        fid = self.fid_metric if "fid" in use else None
        if fid is not None:
            fid.reset()
            for k, v in reference.fid.items():
                setattr(fid, k, v.to(self.device))
        with torch.no_grad(), self._fp32():
            for b in batches:
                images, caps, _ = self._unpack(b)
                self._check(images)
                images = images.to(self.device)
                size = tuple(images.shape[-2:])
                if fid is not None:
                    fid.update(images, real=False)
                f = self._image_features(images, use)
                for k, v in f.items():
                    feats[k].append(v)
                if "clip_score" in use and self.clip is not None:
                    emb = f["clip"] if "clip" in f and self.features.get("cmmd", "").startswith("clip-") \
                        else self.clip.images(images)
                    cos = (emb * self.clip.texts(caps)).sum(-1)
                    clip_sum += (100 * cos.clamp_min(0)).double().sum().item()
                n += images.shape[0]
        sums = _sum(torch.tensor([clip_sum, n], dtype=torch.float64, device=self.device)).tolist()
        total = int(sums[1])
        out: dict = {}
        if fid is not None:
            for k in ("fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples"):
                setattr(fid, k, _sum(getattr(fid, k)))
            out["fid"] = float(fid.compute()) if total >= 2 and reference.samples >= 2 else None
        for metric, k in (("cmmd", "clip"), ("dino_mmd", "dino")):
            if metric in use:
                mine = torch.cat(feats[k]) if feats[k] else torch.zeros(0, dims[k], device=self.device)
                gen = _gather_rows(mine)
                ref = getattr(reference, k).to(self.device)
                out[metric] = mmd(ref, gen) if gen.shape[0] and ref.shape[0] else None
        if "clip_score" in use:
            out["clip_score"] = sums[0] / total if self.clip is not None and total else None
        sizes = [s for s in _gather_objects(size) if s is not None]
        out.update(samples=total, reference_samples=reference.samples,
                   features={k: v for k, v in self.features.items() if k in use},
                   preprocess=self.preprocess(sizes[0] if sizes else None))
        return out


def _with_eval(m: Manifest, cfg: EvalConfig) -> Manifest:
    import dataclasses

    return dataclasses.replace(m, eval=dataclasses.replace(cfg, enabled=True))


def _sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (a copy), on every rank."""
    t = t.clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (n_r, D), concatenated in rank order, on every rank."""
    if not dist.is_initialized():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    most = int(max(c.item() for c in counts))
    padded = torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])]) if x.shape[0] < most else x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:int(c.item())] for p, c in zip(parts, counts)])


__all__ = ["Evaluator", "Reference", "RandomConvFeatures", "held_out", "mmd", "reference_batches", "to_uint8",
           "training_holdout"]
