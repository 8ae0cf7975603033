"""A diffusion transformer over raw pixel patches (JiT-style), read from the leaves up.

The network is pure: (noisy image x_t, time t, text tokens) -> predicted clean image.
Time sampling, noising, the loss and the samplers live in `objective.py`; the sizes (ModelConfig,
the presets, the parameter count) in `presets.py`, which the manifest imports without torch.

- patch embedding with a bottleneck: linear p*p*3 -> bottleneck -> width
- 2D RoPE on image tokens (integer patch-grid positions), QK RMSNorm
- adaLN-zero modulation from the timestep only
- text enters as extra keys/values that image queries attend to; text is never updated
- final layer predicts the clean image, zero-initialised
- TREAD (training only): `route` names, per sample, the image tokens that go through a span of
  blocks; the others skip it and rejoin unchanged, in place, after it (their RoPE positions travel
  with the kept tokens)
- REPA: an optional MLP projector on one block's output (`repa_at`), trained with the model and
  left out of the EMA and the samplers
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pixeldiff.presets import PRESETS, ModelConfig, forward_flops, resolve_model_config  # noqa: F401 (sizes, FLOPs)


# ------------------------------------------------------------------ helpers


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)  # (B, N, p*p*C)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    B, N, _ = x.shape
    x = x.reshape(B, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, 3, h * p, w * p)  # (B, 3, H, W)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 1e4) -> torch.Tensor:
    """Sinusoidal embedding of t*1000, t in [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def rope_2d(h: int, w: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for 2D RoPE: half the head dims rotate with the row, half with the column."""
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    angles = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=-1)  # (N, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (B, heads, N, head_dim) by cos/sin (N, head_dim/2), or (B, 1, N, head_dim/2)
    per sample (routed tokens). In x's own dtype: a bf16 q or k (the trainer's autocast) is rotated in bf16, with no
    fp32 copy of it; attention reads bf16 either way, and the extra rounding adds about half again to the score error
    that rounding q and k to bf16 already makes (tests/test_model.py measures it). fp32 stays fp32."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # no-ops in fp32; the model caches the tables per dtype
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


# ------------------------------------------------------------------ blocks


class Attention(nn.Module):
    """Image queries attend over [text; image] keys/values. Text gives only K/V."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.text_kv = nn.Linear(width, 2 * width, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim)
        self.k_norm = nn.RMSNorm(self.head_dim)
        self.text_k_norm = nn.RMSNorm(self.head_dim)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x, text, attn_mask, cos, sin):
        B, N, D = x.shape
        L = text.shape[1]
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, N, hd)
        tk, tv = self.text_kv(text).view(B, L, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, L, hd)
        # rotated in the projections' dtype (bf16 under autocast), also where autocast runs RMSNorm in fp32
        q = apply_rope(self.q_norm(q).to(v.dtype), cos, sin)
        k = apply_rope(self.k_norm(k).to(v.dtype), cos, sin)
        k = torch.cat([self.text_k_norm(tk), k], dim=2)  # (B, h, L+N, hd)
        v = torch.cat([tv, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class GatedMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.gelu(a, approximate="tanh") * b)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = GatedMLP(width, mlp_hidden)
        self.modulation = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x, c, text, attn_mask, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, dim=-1)  # each (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), text, attn_mask, cos, sin)
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_dim)
        for layer in (self.modulation, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class Projector(nn.Module):
    """REPA's MLP from the model's width to the teacher's: 3 linear layers, SiLU between."""

    def __init__(self, width: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out))

    def forward(self, x):
        return self.net(x)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (B, K) -> (B, K, D)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


# ------------------------------------------------------------------ network


class PixelDiT(nn.Module):
    def __init__(self, cfg: ModelConfig, text_dim: int, repa_dims: tuple[int, int] | None = None,
                 tread_span: tuple[int, int] | None = None):
        """repa_dims: (projector hidden width, teacher width) to build REPA's projector; tread_span: the (first,
        last) block that routed tokens skip, inclusive (used when forward gets a `route`)."""
        super().__init__()
        cfg = resolve_model_config(cfg)
        self.cfg, self.text_dim = cfg, text_dim
        p, w = cfg.patch_size, cfg.width
        self.patch_embed = nn.Sequential(nn.Linear(p * p * 3, cfg.bottleneck), nn.Linear(cfg.bottleneck, w))
        self.t_embed = nn.Sequential(nn.Linear(256, w), nn.SiLU(), nn.Linear(w, w))
        self.text_proj = nn.Linear(text_dim, w)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, int(w * cfg.mlp_ratio)) for _ in range(cfg.depth))
        self.final = FinalLayer(w, p * p * 3)
        self.repa = Projector(w, *repa_dims) if repa_dims else None
        self.tread_span = tread_span
        self._rope_cache: dict = {}

    def _rope(self, h: int, w: int, device: torch.device, dtype: torch.dtype):
        """The cos/sin tables of an h x w grid, computed in fp32 and kept in the dtype q and k have (bf16 under the
        trainer's autocast: see apply_rope). Compiled, they are computed in the graph and not cached: a cache is a
        dict the graph would guard on, and its first fill would compile every shape twice (a miss, then a hit)."""
        if torch.compiler.is_compiling():
            cos, sin = rope_2d(h, w, self.cfg.width // self.cfg.heads, self.cfg.rope_theta, device)
            return cos.to(dtype), sin.to(dtype)
        key = (h, w, device, dtype)
        if key not in self._rope_cache:
            cos, sin = rope_2d(h, w, self.cfg.width // self.cfg.heads, self.cfg.rope_theta, device)
            self._rope_cache[key] = (cos.to(dtype), sin.to(dtype))
        return self._rope_cache[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                route: torch.Tensor | None = None, repa_at: int | None = None):
        """x: (B, 3, H, W) noisy image; t: (B,) in [0, 1]; text: (B, L, text_dim); text_mask: (B, L) bool.
        route: (B, K) indices of the image tokens that go through the TREAD span (the rest skip it); repa_at: a block
        index whose output goes through the projector. -> x0_hat (B, 3, H, W); with repa_at, (x0_hat, projected
        (B, K', teacher dim), their token indices (B, K') or None for all tokens)."""
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        h, w = H // p, W // p
        dtype = self.patch_embed[0].weight.dtype  # bf16 while FSDP2 runs with bf16 parameters (cluster.bf16_comm)
        tokens = self.patch_embed(patchify(x.to(dtype), p))  # (B, N, D)
        c = self.t_embed(timestep_embedding(t).to(tokens.dtype))  # (B, D); from the fp32 t, whatever runs the rest
        txt = self.text_proj(text.to(dtype))  # (B, L, D)
        text_keep = text_mask.bool()

        def attn_mask(n):  # (B, 1, 1, L + n): padding text masked, every image token kept
            return torch.cat([text_keep, text_keep.new_ones(B, n)], dim=1)[:, None, None, :]

        qk_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else tokens.dtype
        cos, sin = self._rope(h, w, x.device, qk_dtype)
        dense = (attn_mask(h * w), cos, sin)
        first, last = self.tread_span if route is not None else (-1, -1)
        ctx, idx, full, aligned = dense, None, None, None
        for i, block in enumerate(self.blocks):
            if i == first:  # routed tokens wait here; the kept ones go on with their own RoPE positions
                full, idx = tokens, route
                tokens = gather_tokens(tokens, route)
                ctx = (attn_mask(route.shape[1]), cos[route][:, None], sin[route][:, None])  # rope (B, 1, K, hd/2)
            tokens = block(tokens, c, txt, *ctx)
            if i == repa_at:  # with TREAD, only the routed span's tokens are aligned, wherever the block is
                aligned = (self.repa(tokens if idx is not None or route is None else gather_tokens(tokens, route)), route)
            if i == last:  # rejoin: the routed tokens unchanged, the kept ones where they came from
                tokens = full.scatter(1, idx[..., None].expand(-1, -1, tokens.shape[-1]), tokens)
                ctx, idx = dense, None
        out = unpatchify(self.final(tokens, c), p, h, w)
        return out if repa_at is None else (out, *aligned)

    # ----- accounting, shared by metrics (MFU) and the launcher's cost forecast

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self, resolution: int, text_len: int) -> float:
        """Forward-pass FLOPs for one image (matmuls only; x3 for a training step)."""
        return forward_flops(self.cfg, self.text_dim, resolution, text_len)


# bf16 dense matmul peaks (TFLOP/s) by the CUDA device name's model, for MFU; cluster.peak_tflops overrides
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "GH200": 989.4,
               "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "B200": 2250.0}


def peak_tflops(device_name: str, override: float = 0.0) -> float | None:
    """The device's bf16 dense peak, or None when unknown (then no MFU is reported)."""
    if override > 0:
        return override
    for model, peak in PEAK_TFLOPS.items():  # in order: "H100 PCIe" and "H100 NVL" before "H100"
        if model in device_name:
            return peak
    return None


def device_peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """`peak_tflops` of this process's device (a CPU has none unless overridden)."""
    if device.type == "cuda":
        return peak_tflops(torch.cuda.get_device_name(device), override)
    return override if override > 0 else None
