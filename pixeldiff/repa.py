"""REPA: representation alignment of one block's hidden states with a frozen teacher's patch features.

The teacher (DINOv3 ViT-L/16 through timm in the recipe) sees the clean image, mapped to [0, 1],
ImageNet-normalised and resized by teacher patch / model patch (16/32: a 512 px image becomes 256 px;
bilinear with antialias), so that its patch grid is the model's token grid, token for token in the same row-major order. The
model's projector (`model.Projector`, trained with the model) maps the hidden states of block
`losses.repa.block` to the teacher's width; the loss is the mean over the aligned tokens of
1 - cosine similarity. With TREAD on, only the tokens that went through the routed span are aligned.

The teacher is frozen and kept apart from the model, like the perceptual networks: not in the
optimizer, the EMA or the checkpoints; bf16 on CUDA; random (seeded, warned) without weights.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from pixeldiff.config import Manifest, RepaLossConfig, resolve_model_config
from pixeldiff.model import gather_tokens
from pixeldiff.perceptual import (IMAGENET_MEAN, IMAGENET_STD, load_dino_weights, load_weights_file, maybe_compile,
                                  timm_model)
from pixeldiff.weights import resolve_weights

_INIT_SEED = 7_340_035  # random-init fallback, fixed so that restarts agree


class RepaTeacher:
    def __init__(self, cfg: RepaLossConfig, patch_size: int, device: torch.device, state_dict: dict | None = None,
                 source: str = "", key: str = "losses.repa.weights", compile: bool = False):
        self.cfg, self.device = cfg, torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_INIT_SEED)
            model = timm_model(cfg.net, key="losses.repa.net", dynamic_img_size=True)
        self.teacher_patch = model.patch_embed.patch_size[0]
        if state_dict is not None:
            load_dino_weights(model, state_dict, key, source)
        model.requires_grad_(False).eval()
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, self.dtype)
        self.forward_features = maybe_compile(self.model.forward_features, compile)
        self.dim = model.embed_dim
        self.patch_size = patch_size
        self.prefix = getattr(model, "num_prefix_tokens", 1)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) clean images in [-1, 1] -> (B, (H/p)(W/p), teacher width) patch features, float32."""
        x = ((x0.float() + 1) / 2 - self.mean) / self.std
        H, W = x.shape[-2:]
        grid = (H // self.patch_size * self.teacher_patch, W // self.patch_size * self.teacher_patch)
        x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False, antialias=True)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            out = self.forward_features(x.to(self.dtype))
        return out[:, self.prefix:].float()

    def loss(self, projected: torch.Tensor, x0: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """Mean over the aligned tokens of 1 - cos(projected, teacher features). projected (B, K, D) for the tokens
        `tokens` (B, K) of the grid (None: all of them)."""
        target = self.features(x0)
        if tokens is not None:
            target = gather_tokens(target, tokens)
        return (1 - F.cosine_similarity(projected.float(), target, dim=-1, eps=1e-6)).mean()

    def parameters(self):
        return self.model.parameters()


def build_teacher(m: Manifest, device, storage_options: dict | None = None, log=None) -> RepaTeacher | None:
    """The frozen teacher with its weights (local or s3://, cached), or random init (warned at every start) when
    losses.repa.weights is null; None when REPA is off."""
    cfg = m.losses.repa
    if cfg.weight <= 0:
        return None
    key, sd, source = "losses.repa.weights", None, ""
    if cfg.weights is not None:
        path = resolve_weights(cfg.weights, key, storage_options, log=log)
        source = cfg.weights if cfg.weights == str(path) else f"{cfg.weights} ({path})"
        sd = load_weights_file(path, key)
    return RepaTeacher(cfg, resolve_model_config(m.model).patch_size, device, state_dict=sd, source=source, key=key,
                       compile=m.cluster.compile)


def repa_active(m: Manifest, stage_index: int, step: int) -> bool:
    """REPA at this step: on in the manifest, not switched off for the stage, before losses.repa.until_step."""
    cfg, stage = m.losses.repa, m.stages[stage_index]
    return cfg.weight > 0 and stage.repa is not False and (cfg.until_step == 0 or step < cfg.until_step)
