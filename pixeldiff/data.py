"""Built-in synthetic data: coloured shapes named in the caption.

No files, no network, learnable in minutes on a CPU and text-conditioned: the
caption says the shape, its colour and the background, so samples visibly follow
the prompt. Sample `i` of seed `s` is always the same image, so the data position
is just the number of samples consumed, and resume needs nothing else.
"""

from __future__ import annotations

import torch

COLORS = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.15, 0.25, 1.0),
    "yellow": (1.0, 0.95, 0.1),
    "magenta": (0.95, 0.1, 0.95),
    "cyan": (0.1, 0.95, 0.95),
}
BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5), "white": (1.0, 1.0, 1.0)}
SHAPES = ("circle", "square", "triangle")


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on {background}"


def render(shape: str, fg, bg, cx: float, cy: float, size: float, resolution: int) -> torch.Tensor:
    """One image (3, R, R) in [-1, 1]; cx, cy, size are fractions of the side."""
    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy, r = x - cx, y - cy, size / 2
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":
        inside = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    else:  # triangle, apex up
        inside = (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.6)
    fg_t, bg_t = torch.tensor(fg)[:, None, None], torch.tensor(bg)[:, None, None]
    img = torch.where(inside[None], fg_t, bg_t)
    return img * 2 - 1


class SyntheticShapes:
    def __init__(self, seed: int = 0):
        self.seed = seed

    def sample(self, index: int, resolution: int) -> tuple[torch.Tensor, str]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        ci, si, bi = (torch.randint(n, (1,), generator=g).item() for n in (len(COLORS), len(SHAPES), len(BACKGROUNDS)))
        size, cx, cy = (torch.rand(3, generator=g) * torch.tensor([0.3, 0.4, 0.4]) + torch.tensor([0.4, 0.3, 0.3])).tolist()
        color, shape, bg = list(COLORS)[ci], SHAPES[si], list(BACKGROUNDS)[bi]
        return render(shape, COLORS[color], BACKGROUNDS[bg], cx, cy, size, resolution), caption(color, shape, bg)

    def batch(self, start: int, size: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
        """Samples start .. start+size-1 -> images (size, 3, R, R) in [-1, 1] and their captions."""
        items = [self.sample(i, resolution) for i in range(start, start + size)]
        return torch.stack([im for im, _ in items]), [c for _, c in items]
