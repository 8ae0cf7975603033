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

    def sample_t(self, batch: int, resolution: float, generator: torch.Generator) -> torch.Tensor:
        c, dev = self.cfg, generator.device
        t = torch.sigmoid(c.t_mean + c.t_std * torch.randn(batch, generator=generator, device=dev))
        uniform = torch.rand(batch, generator=generator, device=dev)
        t = torch.where(torch.rand(batch, generator=generator, device=dev) < c.uniform_prob, uniform, t)
        return shift_time(t, self.shift(resolution)).clamp(1e-3, 1 - 1e-3)

    def drop_captions(self, text, mask, generator):
        B = text.shape[0]
        drop = (torch.rand(B, generator=generator, device=generator.device) < self.cfg.caption_dropout).to(text.device)
        L = text.shape[1]  # a trimmed batch (data.text.trim) takes the null caption's first L tokens
        text = torch.where(drop[:, None, None], self.null_text[:L].to(text), text)
        mask = torch.where(drop[:, None], self.null_mask[:L].to(mask.device), mask)
        return text, mask

    def noised(self, x0, text, mask, generator: torch.Generator):
        """The training input: -> (x_t, t, text, mask) with t, the noise and caption dropout drawn from `generator`
        (on x0's device), so runs are reproducible."""
        B, _, H, W = x0.shape
        t = self.sample_t(B, (H * W) ** 0.5, generator).to(x0.device)  # the side of a square of the same area
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        text, mask = self.drop_captions(text, mask.to(x0.device), generator)
        tb = t[:, None, None, None]
        return (1 - tb) * x0 + tb * eps, t, text, mask

    def velocity_mse(self, x0_hat, xt, x0, t):
        """The loss: MSE between the velocities of the prediction and of the target, the time clamped."""
        denom = t[:, None, None, None].clamp(min=self.cfg.t_clamp)
        return F.mse_loss((xt - x0_hat.float()) / denom, (xt - x0) / denom)

    def loss(self, model, x0, text, mask, generator: torch.Generator):
        """-> (loss, x0_hat, t) for `model(x_t, t, text, mask)`."""
        xt, t, text, mask = self.noised(x0, text, mask, generator)
        x0_hat = model(xt, t, text, mask)
        return self.velocity_mse(x0_hat, xt, x0, t), x0_hat, t


def tread_route(batch: int, tokens: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """TREAD: per sample, a random `ratio` of the `tokens` image tokens skip the routed span. -> (batch, kept)
    indices of the tokens that go through it, ascending, drawn from `generator` (on its device)."""
    kept = max(1, tokens - round(ratio * tokens))
    order = torch.rand(batch, tokens, generator=generator, device=generator.device).argsort(dim=1)
    return order[:, :kept].sort(dim=1).values


@torch.no_grad()
def sample(
    model,
    objective: XPrediction,
    text: torch.Tensor,
    mask: torch.Tensor,
    resolution: int | tuple[int, int],
    steps: int = 30,
    cfg_scale: float = 4.0,
    method: str = "euler",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    guidance: str = "cfg",
    routes=None,
) -> torch.Tensor:
    """Integrate from noise (t=1) to the image (t=0) on the shifted time grid. -> (B, 3, H, W) in [-1, 1].

    The starting noise is `noise` (B, 3, H, W) when given, else drawn from `generator`. `resolution` is a side or
    (height, width). guidance "cfg": uncond + s (cond - uncond) against the empty caption; "self" (a TREAD-routed
    model): routed + s (dense - routed), both with the prompt, `routes(k)` giving the (B, K) routed tokens of
    evaluation k."""
    if method not in ("euler", "heun"):
        raise ValueError(f"sampler {method!r} is unknown; use 'euler' or 'heun'")
    if guidance not in ("cfg", "self") or (guidance == "self" and routes is None):
        raise ValueError(f"guidance {guidance!r}: use 'cfg', or 'self' with the routes of a TREAD model")
    H, W = (resolution, resolution) if isinstance(resolution, int) else resolution
    B = text.shape[0]
    device = next(model.parameters()).device
    x = (noise if noise is not None else torch.randn(B, 3, H, W, generator=generator)).to(device)
    text, mask = text.to(device), mask.to(device)
    null_t = objective.null_text.to(device).expand_as(text)
    null_m = objective.null_mask.to(device).expand_as(mask)
    grid = shift_time(torch.linspace(1, 0, steps + 1), objective.shift((H * W) ** 0.5)).tolist()
    calls = iter(range(2 * steps + 1))

    def velocity(x, t):
        tt = torch.full((B,), t, device=device)
        if cfg_scale == 1.0:
            x0 = model(x, tt, text, mask).float()
        elif guidance == "self":
            dense = model(x, tt, text, mask).float()
            routed = model(x, tt, text, mask, route=routes(next(calls)).to(device)).float()
            x0 = routed + cfg_scale * (dense - routed)
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
