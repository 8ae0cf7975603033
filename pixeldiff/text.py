"""The built-in small text encoder, for dry runs and tests.

Words are lower-cased, hashed (crc32, stable across processes) into a fixed
vocabulary and looked up in a frozen table drawn from a fixed seed, plus a
sinusoidal position code. It has no weights file and needs no network; the
model's text projection learns what to make of it. Real runs use precomputed
caption embeddings from the shards instead, and embed their sample prompts with the
encoder that made them (or read the prompts' embeddings from a file).
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


class PromptTable:
    """Precomputed embeddings of the sample prompts (data.text.prompt_embeddings): a torch file of {"prompts": [str],
    "emb": (P, L, D), "mask": (P, L) bool}, as tools/embed_prompts.py writes it."""

    def __init__(self, path, key: str, max_tokens: int, dim: int):
        try:
            table = torch.load(path, map_location="cpu", weights_only=True)
            prompts, emb, mask = table["prompts"], table["emb"], table["mask"]
        except Exception as e:  # noqa: BLE001 - not a file of ours
            raise ConfigError(f"{key}: {path} is not a prompt embeddings file ({type(e).__name__}: {e}); write one "
                              f"with tools/embed_prompts.py") from None
        if tuple(emb.shape) != (len(prompts), max_tokens, dim) or tuple(mask.shape) != (len(prompts), max_tokens):
            raise ConfigError(f"{key}: {path} holds embeddings of shape {tuple(emb.shape)}, this run takes "
                              f"({len(prompts)}, {max_tokens}, {dim}) (data.text.max_tokens, data.text.dim)")
        self.key, self.rows = key, {p: i for i, p in enumerate(prompts)}
        self.emb, self.mask, self.dim = emb.float(), mask.bool(), dim

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [c for c in captions if c not in self.rows]
        if missing:
            raise ConfigError(f"{self.key}: no embedding for the prompt {missing[0]!r}; it has "
                              f"{sorted(self.rows)[:4]}; embed the prompts you sample with tools/embed_prompts.py "
                              f"--prompt TEXT, or set data.text.embedded_by")
        idx = torch.tensor([self.rows[c] for c in captions], dtype=torch.long)
        return self.emb[idx], self.mask[idx]


def make_text_encoder(cfg, device, storage_options: dict | None = None):
    """The encoder that captions and prompts go through. With precomputed embeddings in the shards, it embeds the
    sample prompts: the encoder that made the shards' embeddings (data.text.embedded_by) or a file of the prompts'
    embeddings (data.text.prompt_embeddings). The trainer computes the null text for caption dropout and CFG once."""
    if cfg.encoder == "precomputed":
        if cfg.prompt_embeddings and not cfg.embedded_by:
            from pixeldiff.weights import resolve_weights

            key = "data.text.prompt_embeddings"
            return PromptTable(resolve_weights(cfg.prompt_embeddings, key, storage_options), key, cfg.max_tokens, cfg.dim)
        if cfg.embedded_by and cfg.embedded_by.startswith("hf:"):
            return hf_encoder(cfg.embedded_by[3:], cfg, device, "data.text.embedded_by")
        return BuiltinTextEncoder(cfg.dim, cfg.max_tokens)
    if cfg.encoder != "hf":
        return BuiltinTextEncoder(cfg.dim, cfg.max_tokens)
    return hf_encoder(cfg.model, cfg, device, "data.text.model")


def hf_encoder(name: str, cfg, device, key: str):
    try:
        enc = HFTextEncoder(name, cfg.max_tokens, device=str(device), local_files_only=True)
    except TextEncoderError as e:
        raise ConfigError(f"{key}: {e}") from None
    if enc.dim != cfg.dim:
        raise ConfigError(f"data.text.dim: {cfg.dim}, but {name!r} produces {enc.dim}-wide embeddings; "
                          f"set data.text.dim={enc.dim}")
    return enc


def null_caption(m, encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """The text of the empty caption (dropout, guidance): no tokens at all for precomputed embeddings."""
    t = m.data.text
    if t.encoder == "precomputed":
        return torch.zeros(t.max_tokens, t.dim), torch.zeros(t.max_tokens, dtype=torch.bool)
    text, mask = encoder.encode([""])
    return text[0], mask[0]


def save_prompt_table(encoder, prompts: list[str], path) -> None:
    """The file data.text.prompt_embeddings reads: `prompts` through `encoder` (what made the shards' embeddings)."""
    emb, mask = encoder.encode(list(prompts))
    torch.save({"prompts": list(prompts), "emb": emb.to(torch.float16), "mask": mask.bool()}, path)
