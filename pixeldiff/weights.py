"""Weights files of the frozen networks, without torch: where a manifest's `weights` value points (a local
path or an s3:// URL, fetched once per node into a cache), and the checks `plan` and `run` make before
anything starts.

A remote file is fetched into $PIXELDIFF_CACHE (default ~/.cache/pixeldiff/weights), under a file lock,
to a temporary name then renamed, so eight ranks starting together download it once. Loading the file
(torch.load, weights_only) is `pixeldiff.perceptual`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Callable

from pixeldiff.config import INCEPTION_FILE, ConfigError, Manifest


def cache_dir() -> Path:
    """Where remote weights are cached on this node: $PIXELDIFF_CACHE, else ~/.cache/pixeldiff/weights."""
    env = os.environ.get("PIXELDIFF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pixeldiff" / "weights"


def cached_name(url: str) -> str:
    """The cache file name of a URL: a hash of the whole URL (different buckets never collide) + its base name."""
    base = url.rstrip("/").rsplit("/", 1)[-1] or "weights"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"


def _local_path(spec: str) -> Path:
    return Path(spec[len("file://"):] if spec.startswith("file://") else spec).expanduser()


def fetch_weights(url: str, key: str, storage_options: dict | None = None, cache: Path | None = None,
                  log: Callable[[str], None] | None = None) -> Path:
    """-> a local file holding `url` (s3://). Downloads once per cache directory; ConfigError if it does not exist.

    The cache is trusted: a file present there is used without asking S3 again (a new version
    of the weights needs a new URL, or deleting the cached file). `key` names the manifest field
    in error messages.
    """
    import fsspec

    root = Path(cache) if cache is not None else cache_dir()
    dest = root / cached_name(url)
    if dest.is_file():
        return dest
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}: cannot create the weights cache {root} ({e}); set PIXELDIFF_CACHE to a writable directory") from None
    with open(root / f".{dest.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other ranks of this node wait here, then find the file
        try:
            if dest.is_file():
                return dest
            fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
            try:
                size = fs.info(path)["size"]
            except FileNotFoundError:
                raise ConfigError(f"{key}: {url} does not exist; upload it (tools/fetch_weights.py --upload) "
                                  f"or fix the URL") from None
            except Exception as e:  # credentials, endpoint, permissions: all need the user
                raise ConfigError(f"{key}: cannot read {url} ({type(e).__name__}: {e}); check the URL, "
                                  f"data.s3 settings and credentials") from None
            if log:
                log(f"{key}: fetching {url} ({size / 2**20:.1f} MiB) into {dest}")
            tmp = root / f".{dest.name}.{os.getpid()}.tmp"
            try:
                fs.get_file(path, str(tmp))
                got = tmp.stat().st_size
                if got != size:
                    raise ConfigError(f"{key}: downloaded {got} bytes of {url}, expected {size}; run again")
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
                dir_fd = os.open(root, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError(f"{key}: downloading {url} failed ({type(e).__name__}: {e})") from None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return dest


def resolve_weights(spec: str, key: str, storage_options: dict | None = None, log=None) -> Path:
    """A manifest `weights` value -> an existing local file (fetching s3:// into the cache)."""
    if spec.startswith("s3://"):
        return fetch_weights(spec, key, storage_options, log=log)
    path = _local_path(spec)
    if not path.is_file():
        raise ConfigError(f"{key}: no such file {str(path)!r}"
                          f"{' (relative to ' + os.getcwd() + ')' if not path.is_absolute() else ''}; "
                          f"fetch it with tools/fetch_weights.py, or set it to null for random weights (not for real runs)")
    return path


def random_init_warning(name: str, cfg) -> str:
    what = {"lpips": f"{cfg.net} backbone", "repa": f"{cfg.net} teacher"}.get(name, f"{cfg.net} network")
    loss = "REPA aligns to random features, not the recipe's" if name == "repa" else \
        "this loss is not the perceptual loss of the recipe"
    return (f"losses.{name}: weight {cfg.weight:g} but no weights file (losses.{name}.weights is null): the frozen "
            f"{what} is RANDOMLY initialised, so {loss}; "
            f"fetch the weights with tools/fetch_weights.py and set losses.{name}.weights")


# ------------------------------------------------------------------ evaluation networks

EVAL_NETWORK = {"fid": "inception", "cmmd": "clip", "clip_score": "clip", "dino_mmd": "dino"}  # metric -> network
_EVAL_FILE = {"inception": f"torch-fidelity's Inception ({INCEPTION_FILE})", "clip": "the CLIP weights",
              "dino": "the DINO weights"}


def eval_networks(m: Manifest) -> dict[str, dict]:
    """The frozen networks the enabled eval metrics need: {network: {net, weights, key, metrics[, resolution]}},
    `weights` the manifest's spec or None, `key` the field that names it. eval.dino inherits losses.dino's network,
    resolution and (for that network) weights file."""
    e, out = m.eval, {}
    if not e.enabled:
        return out
    for metric in e.metrics:
        net = EVAL_NETWORK[metric]
        if net not in out:
            if net == "inception":
                out[net] = {"net": "inception-v3-compat", "weights": e.inception.weights, "key": "eval.inception.weights"}
            elif net == "clip":
                out[net] = {"net": e.clip.model, "weights": e.clip.weights, "key": "eval.clip.weights"}
            else:
                name = e.dino.net or m.losses.dino.net
                inherit = e.dino.weights is None and name == m.losses.dino.net and m.losses.dino.weights is not None
                out[net] = {"net": name, "weights": m.losses.dino.weights if inherit else e.dino.weights,
                            "key": "losses.dino.weights" if inherit else "eval.dino.weights",
                            "resolution": e.dino.resolution or m.losses.dino.resolution}
            out[net]["metrics"] = []
        out[net]["metrics"].append(metric)
    return out


def missing_eval_weights(net: str, info: dict) -> str:
    """The message for an enabled metric whose network has no weights file (the error, or the warning's start)."""
    metrics = info["metrics"]
    names = " and ".join(repr(x) for x in metrics)
    return (f"eval.{net}.weights: {'metric' if len(metrics) == 1 else 'metrics'} {names} need{'s' if len(metrics) == 1 else ''} "
            f"{_EVAL_FILE[net]} and none is given; fetch them with tools/fetch_weights.py --nets {net} and set "
            f"eval.{net}.weights{' (or losses.dino.weights)' if net == 'dino' else ''}, or set "
            f"eval.without_weights: random_features (features of a random network, comparable only to themselves), "
            f"or remove {names} from eval.metrics")


def random_features_warning(net: str, info: dict) -> str:
    what = "clip_score is null and " if "clip_score" in info["metrics"] else ""
    image = [x for x in info["metrics"] if x != "clip_score"]
    sub = f"{' and '.join(image)} use{'s' if len(image) == 1 else ''} a fixed-seed random convolutional network's " \
          f"features instead" if image else ""
    return (f"eval.{net}.weights: none given and eval.without_weights is random_features: {what}{sub}; these "
            f"numbers are comparable only to each other, not to any published one; fetch the weights with "
            f"tools/fetch_weights.py --nets {net}")


def eval_preflight(m: Manifest) -> list[str]:
    """The eval networks' checks before anything starts: a metric without weights is an error (or a warning with
    eval.without_weights: random_features), local files exist, the model names are known. -> warnings."""
    out = []
    for net, info in eval_networks(m).items():
        if info["weights"] is None:
            if m.eval.without_weights == "error":
                raise ConfigError(missing_eval_weights(net, info))
            out.append(random_features_warning(net, info))
            continue
        if not info["weights"].startswith("s3://"):
            resolve_weights(info["weights"], info["key"])
        if net == "dino":
            import timm

            if not timm.is_model(info["net"]):
                raise ConfigError(f"eval.dino.net: {info['net']!r} is not a timm model name "
                                  f"(e.g. vit_base_patch14_reg4_dinov2)")
        if net == "clip":
            clip_model_name(info["net"])
    return out


def clip_model_name(model: str) -> str:
    """eval.clip.model -> an open_clip model name, registering a .json model config file first."""
    import open_clip

    if model.endswith(".json"):
        path = _local_path(model)
        if not path.is_file():
            raise ConfigError(f"eval.clip.model: no such open_clip model config {str(path)!r}; give an open_clip "
                              f"model name (e.g. ViT-L-14-336-quickgelu) or an existing .json config")
        open_clip.add_model_config(path)
        model = path.stem
    if model not in open_clip.list_models():
        raise ConfigError(f"eval.clip.model: {model!r} is not an open_clip model "
                          f"(e.g. ViT-L-14-336-quickgelu, the OpenAI ViT-L/14 at 336 px with QuickGELU)")
    return model


def preflight(m: Manifest) -> list[str]:
    """Checks that need no network, for `plan` and `run` before anything starts: local weights files exist and the
    DINO model name is known; the same for the eval networks (`eval_preflight`). s3:// files are checked when the
    job starts. -> warnings (random init)."""
    out = []
    for name in ("lpips", "dino", "repa"):
        cfg = getattr(m.losses, name)
        if cfg.weight <= 0:
            continue
        if cfg.weights is None:
            out.append(random_init_warning(name, cfg))
        elif not cfg.weights.startswith("s3://"):
            resolve_weights(cfg.weights, f"losses.{name}.weights")
    for name, example in (("dino", "vit_base_patch14_reg4_dinov2"), ("repa", "vit_large_patch16_dinov3")):
        cfg = getattr(m.losses, name)
        if cfg.weight > 0:
            import timm

            if not timm.is_model(cfg.net):
                raise ConfigError(f"losses.{name}.net: {cfg.net!r} is not a timm model name (e.g. {example})")
    return out + eval_preflight(m)


