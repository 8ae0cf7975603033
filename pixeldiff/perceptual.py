"""Perceptual losses on the predicted clean image, with frozen networks whose weights load offline.

Two losses compare the network's prediction x0_hat with the clean image x0 (both in [-1, 1]):

- LPIPS (the `lpips` package): a VGG16 (or AlexNet) backbone and the package's calibrated
  linear layers, which ship inside the package (`lpips/weights/v0.1/<net>.pth`). The backbone
  comes from a torchvision state dict (`features.N.weight`, e.g. `vgg16-397923af.pth`) named
  by the manifest. Both images are first resized by `downscale`, or to a fixed `resolution` (the shorter
  side, at every stage); the distance is spatially averaged per sample.
- DINO: a timm ViT (DINOv2 ViT-B/14 with registers by default). Both images are mapped to
  [0, 1], ImageNet-normalised and resized to `resolution`; the loss per sample is the mean
  over patch tokens of 1 - cosine similarity (in [0, 2]); the target branch runs without grad.

The frozen networks are separate objects, never attributes of the model: requires_grad off,
eval mode, not in the optimizer, the EMA or the checkpoints. On CUDA their weights are bf16. The LPIPS
backbone runs channels-last (cuDNN's fast convolution layout); with `cluster.compile` each network's
forward is compiled with static shapes (one graph per input size), like the denoiser.

Weights: a local path or an s3:// URL, found or fetched by `pixeldiff.weights` (torch-free, so the
login node can check them). Files are read with torch.load(weights_only=True). With no weights and weight > 0 the network is
randomly initialised (seeded, so resumes stay bit-exact) and the trainer warns on every start.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixeldiff.config import ConfigError, DinoLossConfig, LossesConfig, LpipsLossConfig
from pixeldiff.weights import random_init_warning, resolve_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INIT_SEED = {"lpips": 7_340_033, "dino": 7_340_034}  # random-init fallback: fixed per loss, so restarts agree


def load_weights_file(path: Path, key: str) -> dict:
    """torch.load(weights_only=True) -> a flat dict of tensors; ConfigError naming the field on failure."""
    from pixeldiff.checkpoint_verify import UnsafeCheckpoint, torch_load

    try:
        sd = torch_load(path, str(path))
    except UnsafeCheckpoint as e:  # tampered with, or not a weights file: it is never unpickled
        raise ConfigError(f"{key}: {e}; fetch the weights again with tools/fetch_weights.py") from None
    except Exception as e:
        raise ConfigError(f"{key}: cannot load {path} as a state dict ({type(e).__name__}: {e})") from None
    for wrapper in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict) and not torch.is_tensor(sd.get(wrapper)):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ConfigError(f"{key}: {path} is not a state dict (a mapping of names to tensors)")
    return sd


# ------------------------------------------------------------------ LPIPS


def _quiet_import_lpips():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import lpips
    return lpips


def _lpips_on_meta(net: str) -> nn.Module:
    """The lpips.LPIPS module structure on the meta device: no torchvision init, no download, no file read."""
    lpips = _quiet_import_lpips()
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation notices
        return lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)


def lpips_backbone_map(module: nn.Module) -> dict[str, str]:
    """{lpips name: torchvision name}: lpips keeps torchvision's `features` indices as the module names
    inside its slices, so net.slice3.10.weight is features.10.weight."""
    out = {}
    for i in range(1, module.net.N_slices + 1):
        for name, _ in getattr(module.net, f"slice{i}").named_parameters():
            out[f"net.slice{i}.{name}"] = f"features.{name}"
    return out


def load_lpips_backbone(module: nn.Module, sd: dict, key: str, source: str) -> None:
    """Copy a torchvision state dict (features.N.*; the classifier is ignored) into lpips' backbone slices."""
    if not any(k.startswith("features.") for k in sd) and any(k[:1].isdigit() for k in sd):
        sd = {f"features.{k}": v for k, v in sd.items()}  # a saved `.features` module
    mapping = lpips_backbone_map(module)
    missing = [tv for tv in mapping.values() if tv not in sd]
    if missing:
        raise ConfigError(f"{key}: {source} is not a torchvision {module.pnet_type} state dict: missing "
                          f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                          f"(expected e.g. {'vgg16-397923af.pth' if module.pnet_type == 'vgg' else 'alexnet-owt-7be5be79.pth'})")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for ours, theirs in mapping.items():
            p, v = params[ours], sd[theirs]
            if tuple(p.shape) != tuple(v.shape):
                raise ConfigError(f"{key}: {source}: {theirs} has shape {tuple(v.shape)}, the {module.pnet_type} "
                                  f"backbone needs {tuple(p.shape)}; is it the weights of another network?")
            p.copy_(v)


def _lpips_linear_layers(net: str) -> dict:
    """The calibrated linear layers that ship inside the lpips package (no network)."""
    lpips = _quiet_import_lpips()
    path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in sd.items() if k.startswith("lin") and not k.startswith("lins.")}


class LpipsLoss:
    """LPIPS(x0_hat, x0) per sample, with x0 under no_grad. Frozen; bf16 backbone on CUDA."""

    def __init__(self, cfg: LpipsLossConfig, device: torch.device, state_dict: dict | None = None,
                 source: str = "", key: str = "losses.lpips.weights", compile: bool = False):
        lpips = _quiet_import_lpips()
        self.cfg, self.device = cfg, torch.device(device)
        m = _lpips_on_meta(cfg.net).to_empty(device="cpu")
        m.scaling_layer = lpips.ScalingLayer()  # its constant buffers were not materialised on meta
        lins = _lpips_linear_layers(cfg.net)
        want = {k for k in m.state_dict() if k.startswith("lin") and not k.startswith("lins.")}  # lins.N aliases linN
        if set(lins) != want:
            raise RuntimeError(f"lpips package: {cfg.net}.pth has layers {sorted(lins)}, expected {sorted(want)}")
        m.load_state_dict(lins, strict=False)
        if state_dict is not None:
            load_lpips_backbone(m, state_dict, key, source)
        else:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.default_generator.manual_seed(_INIT_SEED["lpips"])
                for mod in m.net.modules():
                    if isinstance(mod, nn.Conv2d):
                        nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                        nn.init.zeros_(mod.bias)
        m.requires_grad_(False).eval()
        self.module = m.to(self.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # the backbone; scaling and the linear layers stay fp32
        self.module.net.to(self.dtype, memory_format=torch.channels_last)
        self.backbone = maybe_compile(self.module.net, compile)

    def input_size(self, H: int, W: int) -> tuple[int, int]:
        """The size both images are resized to: the shorter side at `resolution` (aspect kept), else x downscale."""
        if self.cfg.resolution is not None:
            scale = self.cfg.resolution / min(H, W)
            return (self.cfg.resolution, max(1, round(W * scale))) if H <= W else (max(1, round(H * scale)), self.cfg.resolution)
        return math.floor(H * self.cfg.downscale), math.floor(W * self.cfg.downscale)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = self.input_size(*x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        x = self.module.scaling_layer(x.float()).to(self.dtype).contiguous(memory_format=torch.channels_last)
        return list(self.backbone(x))

    def __call__(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-> (B,) LPIPS distances, differentiable in x_hat."""
        f_hat = self.features(x_hat)
        with torch.no_grad():
            f_ref = self.features(x)
        total = 0
        with torch.autocast(self.device.type, enabled=False):
            for lin, a, b in zip(self.module.lins, f_hat, f_ref):
                a, b = a.float(), b.float()
                # unit-normalise over channels; vector_norm's gradient is defined (0) where a feature is all zero
                a = a / (torch.linalg.vector_norm(a, dim=1, keepdim=True) + 1e-10)
                b = b / (torch.linalg.vector_norm(b, dim=1, keepdim=True) + 1e-10)
                total = total + lin((a - b) ** 2).mean(dim=(1, 2, 3))
        return total

    def parameters(self):
        return self.module.parameters()


# ------------------------------------------------------------------ DINO


def timm_model(name: str, resolution: int | None = None, device: str = "cpu", key: str = "losses.dino.net",
               dynamic_img_size: bool = False) -> nn.Module:
    """A timm model without its head, built offline (no weights): at `resolution`, or for any input size."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"{key}: {name!r} is not a timm model name (e.g. vit_base_patch14_reg4_dinov2)")
    kwargs = {"img_size": resolution} if resolution else {}
    with torch.device(device):
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=dynamic_img_size, **kwargs)
        except TypeError as e:
            raise ConfigError(f"{key}: {name!r} cannot be built {f'at img_size {resolution}' if resolution else ''} "
                              f"({e})") from None


def load_dino_weights(model: nn.Module, sd: dict, key: str, source: str) -> None:
    """Load a timm-format (or original DINOv2-format) state dict, strictly; position embeddings saved at another
    image size are resampled by timm's own checkpoint filter."""
    try:
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        if isinstance(model, VisionTransformer):
            sd = checkpoint_filter_fn(sd, model)
    except Exception as e:
        raise ConfigError(f"{key}: {source} does not fit {type(model).__name__} ({type(e).__name__}: {e})") from None
    if not any(n.startswith("head.") for n, _ in model.named_parameters()):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # a classifier head we do not use
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"{key}: {source} is not a state dict of this model: "
                          f"{' '.join(first[1:3]) if len(first) > 1 else first[0]}"[:600]) from None


class DinoLoss:
    """Mean over patch tokens of 1 - cos(features(x0_hat), features(x0)) per sample, in [0, 2]."""

    def __init__(self, cfg: DinoLossConfig, device: torch.device, state_dict: dict | None = None,
                 source: str = "", key: str = "losses.dino.weights", compile: bool = False):
        self.cfg, self.device = cfg, torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_INIT_SEED["dino"])
            model = timm_model(cfg.net, cfg.resolution)
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if patch is not None and cfg.resolution % patch[0]:
            raise ConfigError(f"losses.dino.resolution: {cfg.resolution} is not a multiple of {cfg.net}'s patch size "
                              f"{patch[0]}; use e.g. {max(1, cfg.resolution // patch[0]) * patch[0]}")
        if state_dict is not None:
            load_dino_weights(model, state_dict, key, source)
        model.requires_grad_(False).eval()
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, self.dtype)
        self.forward_features = maybe_compile(self.model.forward_features, compile)
        self.prefix = getattr(model, "num_prefix_tokens", 1)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x.float() + 1) / 2 - self.mean) / self.std
        r = self.cfg.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            out = self.forward_features(x.to(self.dtype))
        return out[:, self.prefix:].float()

    def __call__(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-> (B,) losses in [0, 2], differentiable in x_hat."""
        a = self.tokens(x_hat)
        with torch.no_grad():
            b = self.tokens(x)
        return (1 - F.cosine_similarity(a, b, dim=-1, eps=1e-6)).mean(dim=1).clamp(0, 2)  # clamp: rounding only

    def parameters(self):
        return self.model.parameters()


# ------------------------------------------------------------------ together


def maybe_compile(fn, enabled: bool):
    """`fn` compiled with static shapes when `enabled` (cluster.compile), else `fn`: a frozen network's forward."""
    return torch.compile(fn, dynamic=False) if enabled else fn


def build_loss(name: str, cfg, device, storage_options: dict | None = None, log=None, compile: bool = False):
    """-> LpipsLoss or DinoLoss with its weights loaded (local or s3://, cached), or random init when weights is null."""
    key = f"losses.{name}.weights"
    sd = source = None
    if cfg.weights is not None:
        path = resolve_weights(cfg.weights, key, storage_options, log=log)
        source = cfg.weights if cfg.weights == str(path) else f"{cfg.weights} ({path})"
        sd = load_weights_file(path, key)
    cls = LpipsLoss if name == "lpips" else DinoLoss
    # with max_t the network sees a varying number of samples: static-shape graphs would recompile for each count
    return cls(cfg, device, state_dict=sd, source=source or "", key=key, compile=compile and cfg.max_t is None)


class PerceptualLosses:
    """The enabled perceptual terms. `compute(x0_hat, x0, t)` -> {'lpips': scalar, 'dino': scalar} (unweighted)."""

    def __init__(self, losses: LossesConfig, device, storage_options: dict | None = None, log=None,
                 compile: bool = False):
        self.cfg = losses
        self.terms: dict[str, LpipsLoss | DinoLoss] = {}
        self.warnings: list[str] = []
        for name in ("lpips", "dino"):
            cfg = getattr(losses, name)
            if cfg.weight <= 0:
                continue
            if cfg.weights is None:
                self.warnings.append(random_init_warning(name, cfg))
            self.terms[name] = build_loss(name, cfg, device, storage_options, log=log, compile=compile)

    def __bool__(self) -> bool:
        return bool(self.terms)

    def announce(self, m, state, log, event) -> None:
        """At every start: the random-init warnings (in the log and the ledger), and what the losses cost."""
        for message in self.warnings:
            log(f"WARNING: {message}")
            event("warning", message=message, step=state.step)
        if self.terms:
            log(self.describe(m.losses, m.stages[state.stage].resolution))

    def describe(self, losses: LossesConfig, resolution: int) -> str:
        """One log line: each term's network, weight and forward FLOPs per image at `resolution`."""
        flops = forward_flops(losses, resolution)
        return (f"perceptual losses (forward FLOPs per image for {resolution} px images; a step runs ~3x): "
                + ", ".join(f"{k} {getattr(losses, k).net} weight {self.weight(k):g} {flops[k] / 1e9:.2f} GFLOP"
                            for k in self.terms))

    def weight(self, name: str) -> float:
        return getattr(self.cfg, name).weight

    def compute(self, x0_hat: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch means of the per-sample terms; samples with t > max_t count as 0 (and are not computed)."""
        out = {}
        B = x0.shape[0]
        for name, fn in self.terms.items():
            max_t = getattr(self.cfg, name).max_t
            if max_t is None:
                out[name] = fn(x0_hat, x0).mean()
                continue
            keep = (t <= max_t).nonzero().flatten()
            if keep.numel() == 0:
                out[name] = x0_hat.new_zeros((), dtype=torch.float32)
            else:
                out[name] = fn(x0_hat[keep], x0[keep]).sum() / B
        return out


# ------------------------------------------------------------------ FLOPs


def forward_flops(losses: LossesConfig, resolution: int) -> dict[str, float]:
    """Forward FLOPs of one pass of each enabled frozen network for one image of `resolution` px (measured with
    torch's FlopCounterMode on the meta device: no weights, no memory). A training step runs each network twice
    per image (x0_hat and x0) and back-propagates to the input once (about one more forward): ~3x this."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    if losses.lpips.weight > 0:
        m = _lpips_on_meta(losses.lpips.net)
        side = losses.lpips.resolution or math.floor(resolution * losses.lpips.downscale)
        x = torch.empty(1, 3, side, side, device="meta")
        with FlopCounterMode(display=False) as fc:
            feats = m.net(x)
            for lin, f in zip(m.lins, feats):
                lin(f)
        out["lpips"] = float(fc.get_total_flops())
    if losses.dino.weight > 0:
        model = timm_model(losses.dino.net, losses.dino.resolution, device="meta")
        x = torch.empty(1, 3, losses.dino.resolution, losses.dino.resolution, device="meta")
        with FlopCounterMode(display=False) as fc:
            model.forward_features(x)
        out["dino"] = float(fc.get_total_flops())
    return out


__all__ = ["LpipsLoss", "DinoLoss", "PerceptualLosses", "build_loss", "forward_flops", "load_weights_file",
           "lpips_backbone_map", "maybe_compile"]
