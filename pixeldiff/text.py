"""The built-in small text encoder, for dry runs and tests.

Words are lower-cased, hashed (crc32, stable across processes) into a fixed
vocabulary and looked up in a frozen table drawn from a fixed seed, plus a
sinusoidal position code. It has no weights file and needs no network; the
model's text projection learns what to make of it. Real runs use precomputed
caption embeddings from the shards instead.
"""

from __future__ import annotations

import re
import zlib

import torch


class BuiltinTextEncoder:
    VOCAB = 4096

    def __init__(self, dim: int = 64, max_tokens: int = 16, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.max_tokens = dim, max_tokens
        self.table = torch.randn(self.VOCAB, dim, generator=g)
        pos = torch.arange(max_tokens, dtype=torch.float32)[:, None]
        freqs = torch.exp(-torch.arange(0, dim, 2, dtype=torch.float32) / dim * 9.2)
        self.pos = torch.zeros(max_tokens, dim)
        self.pos[:, 0::2] = torch.sin(pos * freqs) * 0.5
        self.pos[:, 1::2] = torch.cos(pos * freqs[: dim // 2]) * 0.5

    def token_ids(self, caption: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+", caption.lower())[: self.max_tokens]
        return [zlib.crc32(w.encode()) % self.VOCAB for w in words]

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> embeddings (B, L, dim) float32 and mask (B, L) bool (True = real token)."""
        B, L = len(captions), self.max_tokens
        emb = torch.zeros(B, L, self.dim)
        mask = torch.zeros(B, L, dtype=torch.bool)
        for i, c in enumerate(captions):
            ids = self.token_ids(c)
            if ids:
                emb[i, : len(ids)] = self.table[ids] + self.pos[: len(ids)]
                mask[i, : len(ids)] = True
        return emb, mask
