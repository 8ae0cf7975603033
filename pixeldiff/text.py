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

from pixeldiff.config import ConfigError


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


class TextEncoderError(ValueError):
    """The text encoder cannot be built; the message says why and what to install or fix."""


class HFTextEncoder:
    """A Hugging Face encoder (the optional `transformers` extra), loaded from local files only.

    `name` is a local folder or a model already in the Hugging Face cache: nothing is
    downloaded at run time. For encoder-decoder models (T5, T5Gemma) only the encoder runs.
    """

    def __init__(self, name: str, max_tokens: int, device="cpu", local_files_only: bool = True,
                 dtype: str = "float32"):
        try:
            import transformers
        except ImportError as e:
            raise TextEncoderError(f"the Hugging Face encoder {name!r} needs transformers, which is not installed "
                                   f"({e}): pip install transformers") from None
        device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        try:
            self.tok = transformers.AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
            model = transformers.AutoModel.from_pretrained(name, local_files_only=local_files_only,
                                                           torch_dtype=getattr(torch, dtype))
        except (OSError, ValueError) as e:
            raise TextEncoderError(f"cannot load the Hugging Face model {name!r}: {e}") from None
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token or self.tok.unk_token
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.max_tokens, self.name = device, max_tokens, name
        self.dim = self.encode([""])[0].shape[-1]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> embeddings (B, max_tokens, D) float32 and mask (B, max_tokens) bool, on the CPU."""
        batch = self.tok(captions, padding="max_length", truncation=True, max_length=self.max_tokens,
                         return_tensors="pt")
        ids, attn = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=attn).last_hidden_state
        return hidden.float().cpu(), attn.bool().cpu()


def make_text_encoder(cfg, device):
    """The encoder captions go through (unused with precomputed embeddings). Its empty-caption
    embedding, the null text for caption dropout and CFG, is computed once by the trainer."""
    if cfg.encoder != "hf":
        return BuiltinTextEncoder(cfg.dim, cfg.max_tokens)
    try:
        enc = HFTextEncoder(cfg.model, cfg.max_tokens, device=str(device), local_files_only=True)
    except TextEncoderError as e:
        raise ConfigError(f"data.text.model: {e}") from None
    if enc.dim != cfg.dim:
        raise ConfigError(f"data.text.dim: {cfg.dim}, but {cfg.model!r} produces {enc.dim}-wide embeddings; "
                          f"set data.text.dim={enc.dim}")
    return enc
