"""Built-in synthetic data (coloured shapes named in the caption), and the batch-source interface that it
and the shard reader (`pixeldiff.shards.ShardSource`) implement for the trainer.

No files, no network, learnable in minutes on a CPU and text-conditioned: the
caption says the shape, its colour and the background, so samples visibly follow
the prompt. Sample `i` of seed `s` is always the same image, so the data position
is just the number of samples consumed, and resume needs nothing else.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch


class BatchSource(Protocol):
    """What the trainer asks of its data, whichever source it is.

    `batches(resolution, micro, accum)`: this rank's micro-batches in order, `accum` per optimizer step, each a dict
    with "image" (B, 3, R, R) (float in [-1, 1], or uint8) and either "caption" (B strings) or "emb" (B, L, D) and
    "mask" (B, L). `state_dict()` is this rank's data position; `load_state_dict(state, every_rank)` restores it
    (`every_rank`: all ranks' saved states, as the number of ranks may have changed). `stats()` adds to the metrics
    record; `close()` stops the current iterator's workers."""

    def batches(self, resolution: int, micro: int, accum: int = 1) -> Iterator[dict]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict, every_rank: list[dict] | None = None) -> None: ...
    def stats(self) -> dict: ...
    def close(self) -> None: ...

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


def text_bucket(n: int, max_tokens: int) -> int:
    """The text length a batch whose longest caption has `n` tokens is cut or padded to: the next quarter of
    `max_tokens` (rounded up to a multiple of 8), so a run sees at most 4 text shapes."""
    quarter = -(-max_tokens // 4)
    quarter = -(-quarter // 8) * 8
    return min(max_tokens, max(quarter, -(-n // quarter) * quarter))


def to_device(b: dict, encoder, device: torch.device, trim: int = 0, min_len: int = 0, agree=None):
    """A batch as the model takes it: -> images (B, 3, H, W) in [-1, 1], text (B, L, D) float, mask (B, L), on
    `device` (captions embedded by `encoder`; precomputed embeddings padded to L = the batch's `text_len`).
    `trim` (max_tokens): L is instead `text_bucket` of the batch's longest real caption (and `min_len`, the null
    caption's), decided on the host before the copy: no device synchronisation. `agree(L)`: the ranks' largest L
    (every rank runs the same text shape, so a compiled step recompiles on all ranks at once, never on one while
    the others wait in its collectives)."""
    images = b["image"].to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.float().div_(127.5).sub_(1)
    if "emb" in b:  # precomputed: float16 (B, l, D) up to the batch's longest caption -> float (B, text_len, D)
        emb, mask = b["emb"], b["mask"]
        full = b.get("text_len", emb.shape[1])
        if trim:
            full = text_bucket(max(emb.shape[1], min_len), trim)
            full = agree(full) if agree else full
        emb, mask = emb.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        pad = full - emb.shape[1]
        text = torch.nn.functional.pad(emb.float(), (0, 0, 0, pad))
        return images, text, torch.nn.functional.pad(mask, (0, pad), value=False)
    text, mask = encoder.encode(b["caption"])
    if trim:
        real = mask.any(dim=0).nonzero()  # the CPU's mask: no device sync
        n = int(real.max()) + 1 if real.numel() else 0
        L = text_bucket(max(n, min_len), trim)
        L = agree(L) if agree else L
        text, mask = text[:, :L], mask[:, :L]
    return images, text.to(device), mask.to(device)


class SyntheticSource:
    """SyntheticShapes as a batch source. The position is the number of samples the whole run consumed (the same on
    every rank); micro-batch k of a step's global batch starts at position + k * micro, whichever rank runs it, so
    runs on different numbers of ranks see the same samples."""

    def __init__(self, seed: int, rank: int = 0, world: int = 1):
        self.shapes, self.rank, self.world = SyntheticShapes(seed), rank, world
        self.samples = 0

    def batches(self, resolution: int, micro: int, accum: int = 1):
        while True:
            start = self.samples
            self.samples += micro * accum * self.world  # the step's global batch
            for a in range(accum):
                chunk = self.rank * accum + a  # this micro-batch's place in the global batch
                images, captions = self.shapes.batch(start + chunk * micro, micro, resolution)
                yield {"image": images, "caption": captions}

    def state_dict(self) -> dict:
        return {"samples": self.samples}

    def load_state_dict(self, state: dict, every_rank: list[dict] | None = None) -> None:
        self.samples = state["samples"]

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass
