"""x-prediction with the loss in velocity space (JiT), and the samplers.

Convention (PRX): x_t = (1 - t) * x0 + t * eps, t = 1 is pure noise. The network
predicts the clean image x0_hat; prediction and target are turned into velocities
with the time clamped, v = (x_t - x0) / max(t, t_clamp), and the loss is the MSE
between them.

Noise level and resolution: the same noise hides less of a larger image, so the
time distribution must move toward noise as resolution grows. We use a time shift
t' = s t / (1 + (s - 1) t) with s = shift_base * resolution / shift_reference_px.
With x_t = (1-t) x0 + t eps, the signal-to-noise ratio after the shift is exactly
the one JiT gets by multiplying the noise by s (noise std res/256), so
shift_base = 1 at 256 px reproduces JiT's schedule (s = 2 at 512 px, 4 at 1024 px)
while the sampler's ODE stays the plain flow between image and unit noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pixeldiff.config import ObjectiveConfig


def shift_time(t: torch.Tensor, s: float) -> torch.Tensor:
    return s * t / (1 + (s - 1) * t)


class XPrediction:
    def __init__(self, cfg: ObjectiveConfig, null_text: torch.Tensor, null_mask: torch.Tensor):
        """null_text (L, D) / null_mask (L,): the empty caption, used for caption dropout and CFG."""
        self.cfg = cfg
        self.null_text, self.null_mask = null_text, null_mask

    def shift(self, resolution: int) -> float:
        return self.cfg.shift_base * resolution / self.cfg.shift_reference_px

    def sample_t(self, batch: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
        c, dev = self.cfg, generator.device
        t = torch.sigmoid(c.t_mean + c.t_std * torch.randn(batch, generator=generator, device=dev))
        uniform = torch.rand(batch, generator=generator, device=dev)
        t = torch.where(torch.rand(batch, generator=generator, device=dev) < c.uniform_prob, uniform, t)
        return shift_time(t, self.shift(resolution)).clamp(1e-3, 1 - 1e-3)

    def drop_captions(self, text, mask, generator):
        B = text.shape[0]
        drop = (torch.rand(B, generator=generator, device=generator.device) < self.cfg.caption_dropout).to(text.device)
        text = torch.where(drop[:, None, None], self.null_text.to(text), text)
        mask = torch.where(drop[:, None], self.null_mask.to(mask.device), mask)
        return text, mask

    def loss(self, model, x0, text, mask, generator: torch.Generator):
        """-> (loss, x0_hat, t). Random draws come from `generator` (on x0's device) so runs are reproducible."""
        B, _, H, W = x0.shape
        t = self.sample_t(B, (H * W) ** 0.5, generator).to(x0.device)  # a non-square image: its side at equal area
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        text, mask = self.drop_captions(text, mask.to(x0.device), generator)
        tb = t[:, None, None, None]
        xt = (1 - tb) * x0 + tb * eps
        x0_hat = model(xt, t, text, mask)
        denom = tb.clamp(min=self.cfg.t_clamp)
        v_hat = (xt - x0_hat.float()) / denom
        v = (xt - x0) / denom
        return F.mse_loss(v_hat, v), x0_hat, t


@torch.no_grad()
def sample(
    model,
    objective: XPrediction,
    text: torch.Tensor,
    mask: torch.Tensor,
    resolution: int,
    steps: int = 30,
    cfg_scale: float = 4.0,
    method: str = "euler",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate from noise (t=1) to the image (t=0) on the shifted time grid. -> (B, 3, H, W) in [-1, 1].

    `resolution`: the side of a square image, or (H, W); the time shift uses the side of the square of equal area.

    The starting noise is `noise` (B, 3, H, W) when given, else drawn from `generator`."""
    if method not in ("euler", "heun"):
        raise ValueError(f"sampler {method!r} is unknown; use 'euler' or 'heun'")
    B = text.shape[0]
    device = next(model.parameters()).device
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution  # or (h, w)
    x = (noise if noise is not None else torch.randn(B, 3, h, w, generator=generator)).to(device)
    text, mask = text.to(device), mask.to(device)
    null_t = objective.null_text.to(device).expand_as(text)
    null_m = objective.null_mask.to(device).expand_as(mask)
    grid = shift_time(torch.linspace(1, 0, steps + 1), objective.shift((h * w) ** 0.5)).tolist()

    def velocity(x, t):
        tt = torch.full((B,), t, device=device)
        if cfg_scale == 1.0:
            x0 = model(x, tt, text, mask).float()
        else:
            both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([text, null_t]), torch.cat([mask, null_m])).float()
            cond, uncond = both.chunk(2)
            x0 = uncond + cfg_scale * (cond - uncond)
        return (x - x0) / t

    for t, t_next in zip(grid[:-1], grid[1:]):
        v = velocity(x, t)
        x_euler = x + (t_next - t) * v
        if method == "heun" and t_next > 0:
            x = x + (t_next - t) * 0.5 * (v + velocity(x_euler, t_next))
        else:
            x = x_euler
    return x.clamp(-1, 1)
