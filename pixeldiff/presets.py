"""The model's size: its config, the size presets, and the parameter count, all without torch.

The manifest's `model:` section is a `ModelConfig`; `resolve_model_config` fills it in from a
preset. `param_count` is the network's parameter count from its shapes (pixeldiff/model.py builds
the layers; tests/test_presets.py checks the two agree for every preset), so the login node can size
checkpoints without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


@dataclass
class ModelConfig:
    preset: str = "tiny"  # one of PRESETS; the fields below override it
    width: Optional[int] = None
    depth: Optional[int] = None
    heads: Optional[int] = None
    patch_size: Optional[int] = None
    bottleneck: Optional[int] = None
    mlp_ratio: Optional[float] = None
    rope_theta: Optional[float] = None


# Size presets. "JiT-32" is the speedrun's ~1.2B model (PRX: width 1792, depth 16, 28 heads,
# patch 32 with a 256-wide bottleneck, gated MLP 3.5x).
PRESETS: dict[str, dict] = {
    "test": dict(width=32, depth=2, heads=2, patch_size=4, bottleneck=16, mlp_ratio=2.0, rope_theta=1e4),
    "tiny": dict(width=128, depth=4, heads=4, patch_size=8, bottleneck=64, mlp_ratio=3.5, rope_theta=1e4),
    "S/32": dict(width=384, depth=12, heads=6, patch_size=32, bottleneck=128, mlp_ratio=3.5, rope_theta=1e4),
    "B/32": dict(width=768, depth=12, heads=12, patch_size=32, bottleneck=128, mlp_ratio=3.5, rope_theta=1e4),
    "L/32": dict(width=1024, depth=24, heads=16, patch_size=32, bottleneck=128, mlp_ratio=3.5, rope_theta=1e4),
    "JiT-32": dict(width=1792, depth=16, heads=28, patch_size=32, bottleneck=256, mlp_ratio=3.5, rope_theta=1e4),
}


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """The preset with the overrides applied; every field filled in. Raises ValueError on a bad size."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"preset {cfg.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    base = dict(PRESETS[cfg.preset])
    for k in base:
        if getattr(cfg, k) is not None:
            base[k] = getattr(cfg, k)
    out = replace(cfg, **base)
    if min(out.width, out.depth, out.heads, out.patch_size, out.bottleneck) <= 0 or out.mlp_ratio <= 0:
        raise ValueError("width, depth, heads, patch_size, bottleneck and mlp_ratio must be > 0")
    if out.width % out.heads:
        raise ValueError(f"width {out.width} is not divisible by heads {out.heads}")
    if (out.width // out.heads) % 4:
        raise ValueError(f"head dim {out.width // out.heads} must be a multiple of 4 for 2D RoPE")
    return out


def param_count(cfg: ModelConfig, text_dim: int) -> int:
    """Parameters of PixelDiT(cfg, text_dim), layer by layer as pixeldiff/model.py builds them."""
    cfg = resolve_model_config(cfg)
    w, b, pix = cfg.width, cfg.bottleneck, cfg.patch_size ** 2 * 3
    hidden, head_dim = int(w * cfg.mlp_ratio), w // cfg.heads

    def linear(n_in: int, n_out: int, bias: bool = True) -> int:
        return n_in * n_out + (n_out if bias else 0)

    patch_embed = linear(pix, b) + linear(b, w)
    t_embed = linear(256, w) + linear(w, w)
    text_proj = linear(text_dim, w)
    attn = linear(w, 3 * w, False) + linear(w, 2 * w, False) + linear(w, w, False) + 3 * head_dim  # + 3 RMSNorms
    block = attn + linear(w, 2 * hidden, False) + linear(hidden, w, False) + linear(w, 6 * w)
    final = linear(w, 2 * w) + linear(w, pix)
    return patch_embed + t_embed + text_proj + cfg.depth * block + final


def forward_flops(cfg: ModelConfig, text_dim: int, resolution: int, text_len: int, tread=None) -> float:
    """Matmul FLOPs of one image's forward pass. `tread` (a TreadConfig with ratio > 0): the routed span's blocks
    see only the kept image tokens, as the training step runs them (sampling is dense: no `tread`). Torch-free:
    the login node's plan prices evaluations with it."""
    cfg = resolve_model_config(cfg)
    p, w, depth = cfg.patch_size, cfg.width, cfg.depth
    n = (resolution // p) ** 2
    kept, (first, last) = n, (0, -1)
    if tread is not None and tread.ratio > 0:
        kept, (first, last) = max(1, n - round(tread.ratio * n)), tread.span(depth)
    hidden = int(w * cfg.mlp_ratio)
    per_token_block = 4 * w * w + 3 * w * hidden  # qkv + proj, gated MLP
    per_text_block = 2 * w * w
    blocks = 0
    for b in range(depth):
        nb = kept if first <= b <= last else n
        blocks += nb * per_token_block + text_len * per_text_block + 2 * nb * (nb + text_len) * w  # + QK^T and AV
    embed = n * (p * p * 3 * cfg.bottleneck + cfg.bottleneck * w + w * p * p * 3) + text_len * text_dim * w
    mod = depth * 6 * w * w + 2 * w * w
    return 2.0 * (embed + blocks + mod)
