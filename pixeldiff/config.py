"""The run manifest as a typed dataclass tree, and a strict loader for it.

Every section is a dataclass; `from_dict` builds the tree from plain YAML data and
rejects unknown keys, wrong types and missing required fields with a `ConfigError`
whose message names the key path, what was expected and what was given.
Cross-field rules (resolution divisible by patch, batch divisible by ranks, ...)
live in `validate`, so one call checks everything at the edge.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pixeldiff.buckets import bucket_sizes
from pixeldiff.presets import ModelConfig, resolve_model_config


_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A problem with the manifest a user can fix; the message says how."""


@dataclass
class ClusterConfig:
    backend: Literal["local", "slurm"] = "slurm"  # local: run on this machine
    nodes: int = 1
    gpus_per_node: int = 8
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    max_job_hours: float = 4.0  # each Slurm job's time limit; the run is cut into such jobs
    exclusive: bool = True
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load ...)
    env: dict[str, str] = field(default_factory=dict)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # ddp: replicated weights; fsdp: FSDP2, weights/grads/optimizer sharded
    compile: bool = False  # torch.compile the model (1.7x on an H200 at 512 px; minutes of compile at start)
    # bf16 on the wire, half the bytes, the optimizer still stepping fp32 weights. ddp: gradients all-reduced in
    # bf16 (a communication hook); fsdp: parameters gathered and run in bf16, gradients reduce-scattered in fp32
    bf16_comm: bool = False
    # the GPU's bf16 dense peak in TFLOP/s for MFU; 0 = from the device name (H100, H200, A100, ...: pixeldiff/model.py)
    peak_tflops: float = 0.0
    # collectives time out: generously while a job starts (restore, compile, a stage's first step), then quickly,
    # so a dead rank stops the others in bounded time (PIXELDIFF_COLLECTIVE_TIMEOUT_S overrides both)
    startup_timeout_s: float = 1800.0
    collective_timeout_s: float = 300.0
    # Slurm job control (the launcher)
    cpus_per_task: int = 0  # 0 = the smallest partition node's CPUs / tasks per node (sinfo), else data.workers + 2
    exclude: list[str] = field(default_factory=list)  # nodes never to use, e.g. ["gpu-a07"]
    signal_lead_s: int = 0  # USR2 this many seconds before the time limit; 0 = from the plan
    max_timeouts: int = 0  # requeues after a time limit; 0 = from the plan (2 x segments + 2)
    max_preemptions: int = 20  # requeues after a preemption (counted apart from timeouts)
    max_failures: int = 3  # consecutive jobs failing before any progress, then the run stops


@dataclass
class BudgetConfig:
    usd: float = 0.0  # dollar cap; 0 = no dollar cap
    wall_hours: float = 0.0  # wall-clock cap; 0 = no wall-clock cap
    gpu_hour_usd: float = 0.0  # price of one GPU-hour
    # fixed_steps: the stages' steps as planned, stop at the cap; finish_stages: at each job's start, shrink the
    # remaining stages' steps (same factor each) when the measured throughput says they would not fit the cap;
    # extend_last_stage: the same, and a schedule that would end far inside the cap gets a longer last stage
    policy: Literal["fixed_steps", "finish_stages", "extend_last_stage"] = "fixed_steps"


@dataclass
class StageConfig:
    name: str
    resolution: int
    global_batch: int
    steps: Optional[int] = None  # either steps ...
    budget_share: Optional[float] = None  # ... or a fraction of the budget's GPU-hours
    micro_batch: Optional[int] = None  # per-rank batch per forward; default global_batch / ranks
    est_img_per_s_per_gpu: Optional[float] = None  # throughput estimate for planning
    repa: Optional[bool] = None  # REPA in this stage; null = on when losses.repa.weight > 0 (the speedrun: off at 1024 px)


@dataclass
class ObjectiveConfig:
    t_mean: float = 0.0  # logit-normal time sampling: logit(t) ~ N(t_mean, t_std)
    t_std: float = 1.0
    uniform_prob: float = 0.1  # probability of a uniform t draw instead
    shift_base: float = 1.0  # time shift at shift_reference_px; grows linearly with resolution
    shift_reference_px: int = 256
    t_clamp: float = 0.05  # velocity denominator clamp
    caption_dropout: float = 0.1  # for classifier-free guidance


@dataclass
class PerceptualLossConfig:
    """Fields shared by the perceptual losses (computed on the predicted clean image x0_hat against x0)."""

    weight: float = 0.0  # 0 = off; loss = mse + weight * term
    weights: Optional[str] = None  # local path or s3:// URL of the frozen network's weights; null = random init (warned)
    max_t: Optional[float] = None  # apply only to samples with t <= max_t; null = every noise level


@dataclass
class LpipsLossConfig(PerceptualLossConfig):
    net: Literal["vgg", "alex"] = "vgg"  # backbone; weights = its torchvision state dict (vgg16-397923af.pth, ...)
    downscale: float = 1.0  # both images are resized by this factor first (PRX: 0.5)
    resolution: Optional[int] = None  # instead: the shorter side becomes this at every stage (the speedrun: 256)


@dataclass
class DinoLossConfig(PerceptualLossConfig):
    net: str = "vit_base_patch14_reg4_dinov2"  # a timm model name; weights = its timm state dict
    resolution: int = 224  # both images are resized to resolution x resolution


# Smallest image side each LPIPS backbone accepts (its pooling stages need at least one pixel).
LPIPS_MIN_SIDE = {"vgg": 16, "alex": 31}


@dataclass
class RepaLossConfig:
    """REPA: the hidden states after block `block`, through a trained 3-layer MLP projector (SiLU), aligned by cosine
    similarity to a frozen teacher's patch features of the clean image, resized so that the teacher's patch grid is
    the model's token grid. The projector is trained and checkpointed with the model, not in the EMA or samplers."""

    weight: float = 0.0  # 0 = off (the speedrun: 0.5)
    weights: Optional[str] = None  # the teacher's timm state dict: local path or s3:// URL; null = random init (warned)
    net: str = "vit_large_patch16_dinov3"  # a timm ViT name (DINOv3 ViT-L/16 in the recipe)
    block: int = 7  # 0-based index of the block whose output is aligned (the 8th)
    projector_dim: int = 1024  # hidden width of the projector; its output is the teacher's width
    until_step: int = 0  # REPA off from this step on (0 = no end); stages[i].repa switches it per stage


@dataclass
class LossesConfig:
    lpips: LpipsLossConfig = field(default_factory=LpipsLossConfig)
    dino: DinoLossConfig = field(default_factory=DinoLossConfig)
    repa: RepaLossConfig = field(default_factory=RepaLossConfig)


@dataclass
class TreadConfig:
    """TREAD token routing (training only): a random `ratio` of each sample's image tokens skip blocks
    start_block..end_block (inclusive; negative counts from the end) and rejoin unchanged after them."""

    ratio: float = 0.0  # 0 = off (the speedrun: 0.5)
    start_block: int = 1  # the blog: from the 2nd block ...
    end_block: int = -2  # ... to the penultimate

    def span(self, depth: int) -> tuple[int, int]:
        """-> (first, last) block index of the routed span, inclusive."""
        return self.start_block % depth, self.end_block % depth


@dataclass
class OptimizerConfig:
    # adamw: fused AdamW for every parameter; muon: Muon for the transformer blocks' 2-D weight matrices, AdamW (lr,
    # betas, eps, weight_decay below) for the rest (pixeldiff/optim.py)
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 1000
    grad_clip: float = 0.2  # global gradient-norm clip; 0 = off
    ema_decay: float = 0.999
    ema_every: int = 1
    # divergence: a step with a non-finite loss or gradient norm is skipped; after max_skipped_steps in a row,
    # rollback (reload the last checkpoint, learning rate x rollback_lr_factor, at most max_rollbacks times) or stop
    max_skipped_steps: int = 20
    on_divergence: Literal["rollback", "stop"] = "rollback"
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    # Muon (name: muon only): torch.optim.Muon's arguments; the schedule scales muon_lr like lr
    muon_lr: float = 1e-4
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    # the update's scale per matrix: match_rms_adamw = 0.2 x sqrt(max(rows, cols)) (AdamW-like RMS, lr carries over)
    muon_adjust_lr: Literal["match_rms_adamw", "original", "spectral_unclamped"] = "match_rms_adamw"
    muon_weight_decay: float = 0.0


@dataclass
class TextConfig:
    # builtin: the small hashed-word encoder; precomputed: emb.npy/mask.npy in the shards;
    # hf: a Hugging Face encoder run online (optional extra `transformers`), loaded from local files only
    encoder: Literal["builtin", "precomputed", "hf"] = "builtin"
    max_tokens: int = 16
    dim: int = 64  # with hf: must equal the model's hidden size
    model: Optional[str] = None  # hf only: a local folder or a model already in the Hugging Face cache
    # precomputed only, one of the two, for the sample grids' prompts: the encoder that made the shards' embeddings
    # ("builtin", or "hf:NAME" with NAME a local folder or cached model: what tools/embed_captions.py --encoder was
    # given), or a file of the prompts' embeddings (local path or s3://, from tools/embed_prompts.py)
    embedded_by: Optional[str] = None
    prompt_embeddings: Optional[str] = None
    # training batches carry text only up to the batch's longest caption, rounded up to a quarter of max_tokens
    # (4 lengths: few compiled shapes); the padding it drops is masked out, so the numbers do not change
    trim: bool = True


@dataclass
class S3Config:
    endpoint_url: Optional[str] = None  # e.g. http://127.0.0.1:9000 for MinIO; default AWS (or $AWS_ENDPOINT_URL)
    profile: Optional[str] = None  # an AWS profile name; credentials always come from the environment/profile
    anon: bool = False  # anonymous access to a public bucket


@dataclass
class DataConfig:
    source: Literal["synthetic", "webdataset"] = "synthetic"
    shards: Union[str, list[str], None] = None  # brace pattern, list of URLs, or a file listing them
    seed: int = 0
    workers: int = 4  # DataLoader worker processes per rank (0 = read in the training process)
    prefetch: int = 4  # batches prefetched per worker
    flip: bool = False  # random horizontal flips
    small_images: Literal["upscale", "skip"] = "upscale"  # images smaller than the stage resolution
    max_pixels: int = 100_000_000  # larger images are skipped (decompression bombs)
    max_bad_fraction: float = 0.05  # the run fails when more of the samples than this are bad
    retries: int = 4  # per shard, for transient read errors, with exponential backoff
    retry_backoff_s: float = 0.5
    block_size_mb: int = 8  # read size for remote shards
    shuffle_buffer: int = 1000  # samples per seeded shuffle window of each stream (0 or 1: shard order)
    caption_key: str = "txt"  # the caption's member: "txt", or "json:caption" (a field of the .json member)
    # square: every image resized and centre-cropped to the stage's resolution; aspect: to the nearest of a fixed list
    # of (h, w) buckets of about the stage's pixel area, sides multiples of the patch size, aspect up to max_aspect:1
    # either way; every micro-batch is one bucket (docs/data.md)
    buckets: Literal["square", "aspect"] = "square"
    max_aspect: float = 2.0
    # workers: every image decoded, resized and cropped in the DataLoader workers (PIL); device: JPEGs only checked from
    # their headers there and decoded, cropped and resized by the training process on its device (nvJPEG on a GPU)
    decode: Literal["workers", "device"] = "workers"
    s3: S3Config = field(default_factory=S3Config)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <run dir>/checkpoints; may be s3:// (options from data.s3)
    interval_steps: int = 1000
    keep: int = 3
    async_save: bool = True  # write in the background while training goes on; final saves are always synchronous
    retries: int = 5  # s3:// only: a failed save is tried again this many times, after retry_backoff_s, doubling
    retry_backoff_s: float = 2.0


@dataclass
class WandbConfig:
    project: str  # the W&B project; the run is named after the manifest, its id is RUN_DIR/tracking.json's
    entity: Optional[str] = None  # a team or user; default: the API key's default entity
    # online: needs WANDB_API_KEY in the environment (never in the manifest) or `wandb login`'s netrc entry;
    # offline: records under RUN_DIR/wandb/ for `wandb sync` later (compute nodes without internet)
    mode: Literal["online", "offline"] = "online"


@dataclass
class LoggingConfig:
    metrics_interval: int = 10
    sample_interval: int = 1000  # 0 = only at the end
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat"])
    sample_steps: int = 30
    sample_cfg: float = 4.0
    # cfg: classifier-free guidance (cond vs the empty caption); self: self-guidance for a TREAD-routed model (the
    # dense vs the routed conditional prediction, both with the prompt; tread.ratio > 0 needed)
    sample_guidance: Literal["cfg", "self"] = "cfg"
    tensorboard: bool = False  # rank 0 also writes TensorBoard events to RUN_DIR/tensorboard/ (one run across jobs)
    wandb: Optional[WandbConfig] = None  # rank 0 also logs to Weights & Biases (one run across jobs, resumed by id)


EVAL_METRICS = ("fid", "cmmd", "clip_score", "dino_mmd")
# torch-fidelity's Inception (the TF FID graph's weights in PyTorch; pytorch-fid's pt_inception-2015-12-05-6726825d.pth
# carries the same hash suffix, not checked here to be the same bytes)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


@dataclass
class EvalInceptionConfig:
    weights: Optional[str] = None  # torch-fidelity's Inception state dict (INCEPTION_FILE): local path or s3:// URL


@dataclass
class EvalClipConfig:
    model: str = "ViT-L-14-336-quickgelu"  # an open_clip model name (OpenAI weights need -quickgelu), or a .json config
    weights: Optional[str] = None  # its open_clip state dict: local path or s3:// URL


@dataclass
class EvalDinoConfig:
    net: Optional[str] = None  # a timm model name; null = losses.dino.net
    weights: Optional[str] = None  # null = losses.dino.weights (when net is that network)
    resolution: Optional[int] = None  # images resized to this side; null = losses.dino.resolution


@dataclass
class EvalConfig:
    """Quality metrics on a held-out set (pixeldiff/evaluate.py, docs/evaluation.md). A manifest without an `eval`
    section does not evaluate; a section given is on unless it says `enabled: false`."""

    enabled: bool = True
    interval_steps: int = 0  # every this many steps; 0 = only at each stage's end and the run's end
    samples: int = 10_000  # generated (and reference) images per evaluation; PRX: 10k
    sampling_steps: int = 50
    cfg: float = 3.5  # guidance scale of the generation
    batch: int = 32  # per-rank batch for generation and feature extraction
    shards: Union[str, list[str], None] = None  # held-out image+caption shards (the data.shards formats)
    holdout: float = 0.01  # no eval.shards: this fraction of the training keys (by key hash) is held out of training
    holdout_seed: int = 0
    metrics: list[Literal["fid", "cmmd", "clip_score", "dino_mmd"]] = field(default_factory=lambda: list(EVAL_METRICS))
    antialias: bool = True  # antialiased resizes to each network's input size (torchmetrics' FID default)
    # a metric whose network has no weights file: error (exit 2 before training), or random_features (a loud warning
    # and a fixed-seed random convolutional network's features instead; clip_score is then null)
    without_weights: Literal["error", "random_features"] = "error"
    inception: EvalInceptionConfig = field(default_factory=EvalInceptionConfig)
    clip: EvalClipConfig = field(default_factory=EvalClipConfig)
    dino: EvalDinoConfig = field(default_factory=EvalDinoConfig)


@dataclass
class Manifest:
    name: str
    stages: list[StageConfig]
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    losses: LossesConfig = field(default_factory=LossesConfig)
    tread: TreadConfig = field(default_factory=TreadConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(enabled=False))  # no section: off
    seed: int = 0

    @property
    def world_size(self) -> int:
        return 1 if self.cluster.backend == "local" else self.cluster.nodes * self.cluster.gpus_per_node


# ---------------------------------------------------------------- strict loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _got(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_got(value)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_got(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_got(value)}")
        kt, vt = typing.get_args(tp)
        return {_convert(k, kt, f"{path}.<key>"): _convert(v, vt, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool (true/false), got {_got(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {_got(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as text; everyone means the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {_got(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {_got(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in this file, not user input


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from `data`, strictly: unknown, missing or mistyped keys raise ConfigError."""
    where = path or "manifest"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_got(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"unknown key '{key}'; valid keys in {where}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{sub}' ({_type_name(hints[name])})")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def _require(path: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: must be {expected}, got {value}")


def validate(m: Manifest) -> None:
    """Cross-field checks, run once after loading. Raises ConfigError naming the field and the fix."""
    if not m.name or any(c in m.name for c in "/ \\"):
        raise ConfigError(f"name: {m.name!r} must be non-empty without spaces or slashes (it names the run directory)")
    for key in ("usd", "wall_hours", "gpu_hour_usd"):
        if getattr(m.budget, key) < 0:
            raise ConfigError(f"budget.{key}: must be >= 0, got {getattr(m.budget, key)}")
    c = m.cluster
    if c.nodes < 1 or c.gpus_per_node < 1:
        raise ConfigError(f"cluster: nodes and gpus_per_node must be >= 1, got {c.nodes} and {c.gpus_per_node}")
    if c.max_job_hours <= 0:
        raise ConfigError(f"cluster.max_job_hours: must be > 0, got {c.max_job_hours}")
    o = m.optimizer
    if o.max_skipped_steps < 1 or o.max_rollbacks < 0:
        raise ConfigError(f"optimizer: max_skipped_steps must be >= 1 and max_rollbacks >= 0, got "
                          f"{o.max_skipped_steps} and {o.max_rollbacks}")
    if not 0 < o.rollback_lr_factor <= 1:
        raise ConfigError(f"optimizer.rollback_lr_factor: must be in (0, 1] (the learning rate is multiplied by it "
                          f"at each rollback), got {o.rollback_lr_factor}")
    for key in ("startup_timeout_s", "collective_timeout_s"):
        if getattr(c, key) <= 0:
            raise ConfigError(f"cluster.{key}: must be > 0 seconds, got {getattr(c, key)}")
    for key in ("cpus_per_task", "signal_lead_s", "max_timeouts", "max_preemptions", "max_failures"):
        if getattr(c, key) < 0:
            raise ConfigError(f"cluster.{key}: must be >= 0, got {getattr(c, key)}")
    if c.signal_lead_s and c.signal_lead_s >= c.max_job_hours * 3600 / 2:
        raise ConfigError(f"cluster.signal_lead_s: {c.signal_lead_s} s is at least half the job's time limit "
                          f"(cluster.max_job_hours = {c.max_job_hours}); use a smaller lead or longer jobs")
    try:
        mc = resolve_model_config(m.model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if not m.stages:
        raise ConfigError("stages: the list is empty; give at least one stage (name, resolution, global_batch, steps)")
    world = m.world_size
    names = set()
    for i, s in enumerate(m.stages):
        p = f"stages[{i}]"
        if s.name in names:
            raise ConfigError(f"{p}.name: duplicate stage name {s.name!r}")
        names.add(s.name)
        if s.resolution <= 0 or s.resolution % mc.patch_size:
            raise ConfigError(
                f"{p}.resolution: {s.resolution} is not a positive multiple of the patch size "
                f"{mc.patch_size} (model.patch_size); use e.g. {max(1, s.resolution // mc.patch_size) * mc.patch_size}"
            )
        if s.global_batch <= 0 or s.global_batch % world:
            raise ConfigError(
                f"{p}.global_batch: {s.global_batch} is not divisible by the {world} GPUs "
                f"(cluster.nodes x cluster.gpus_per_node); use a multiple of {world}"
            )
        if (s.steps is None) == (s.budget_share is None):
            raise ConfigError(f"{p}: give exactly one of 'steps' or 'budget_share'")
        if s.steps is not None and s.steps <= 0:
            raise ConfigError(f"{p}.steps: must be > 0, got {s.steps}")
        if s.budget_share is not None:
            if not 0 < s.budget_share <= 1:
                raise ConfigError(f"{p}.budget_share: must be in (0, 1], got {s.budget_share}")
            if not s.est_img_per_s_per_gpu:
                raise ConfigError(f"{p}.est_img_per_s_per_gpu: needed to turn budget_share into steps")
            if not (m.budget.wall_hours or (m.budget.usd and m.budget.gpu_hour_usd)):
                raise ConfigError(f"{p}.budget_share: needs budget.wall_hours or budget.usd with budget.gpu_hour_usd")
        per_rank = s.global_batch // world
        if s.micro_batch is not None and (s.micro_batch <= 0 or per_rank % s.micro_batch):
            raise ConfigError(
                f"{p}.micro_batch: {s.micro_batch} must divide the per-rank batch {per_rank} "
                f"(global_batch {s.global_batch} / {world} ranks)"
            )
        if s.est_img_per_s_per_gpu is not None and s.est_img_per_s_per_gpu <= 0:
            raise ConfigError(f"{p}.est_img_per_s_per_gpu: must be > 0, got {s.est_img_per_s_per_gpu}")
    share = sum(s.budget_share or 0 for s in m.stages)
    if share > 1 + 1e-9:
        raise ConfigError(f"stages: budget_share values add up to {share:g}, more than 1")
    o = m.optimizer
    _require("optimizer.lr", o.lr, o.lr > 0, "> 0")
    _require("optimizer.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, ">= 0")
    _require("optimizer.grad_clip", o.grad_clip, o.grad_clip >= 0, ">= 0 (0: no clipping)")
    _require("optimizer.ema_decay", o.ema_decay, 0 <= o.ema_decay < 1, "in [0, 1)")
    _require("optimizer.ema_every", o.ema_every, o.ema_every >= 1, ">= 1")
    if len(o.betas) != 2:
        raise ConfigError(f"optimizer.betas: expected two numbers, got {o.betas}")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optimizer.betas: each must be in [0, 1), got {o.betas}")
    if o.eps < 0 or o.weight_decay < 0:
        raise ConfigError(f"optimizer: eps and weight_decay must be >= 0, got {o.eps} and {o.weight_decay}")
    validate_muon(o)
    ob = m.objective
    _require("objective.t_clamp", ob.t_clamp, 0 < ob.t_clamp < 1, "in (0, 1)")
    for key in ("t_std", "shift_base", "shift_reference_px"):
        _require(f"objective.{key}", getattr(ob, key), getattr(ob, key) > 0, "> 0")
    for key in ("caption_dropout", "uniform_prob"):
        if not 0 <= getattr(ob, key) <= 1:
            raise ConfigError(f"objective.{key}: must be in [0, 1], got {getattr(ob, key)}")
    if m.checkpoint.keep < 2:
        raise ConfigError(f"checkpoint.keep: must be >= 2 so a valid checkpoint survives a crash during a save, got {m.checkpoint.keep}")
    if m.checkpoint.retries < 0 or m.checkpoint.retry_backoff_s < 0:
        raise ConfigError(f"checkpoint: retries and retry_backoff_s must be >= 0, got {m.checkpoint.retries} and "
                          f"{m.checkpoint.retry_backoff_s}")
    if m.checkpoint.interval_steps <= 0:
        raise ConfigError(f"checkpoint.interval_steps: must be > 0, got {m.checkpoint.interval_steps}")
    if m.checkpoint.dir is not None:
        scheme = m.checkpoint.dir.split("://", 1)[0] if "://" in m.checkpoint.dir else ""
        if not m.checkpoint.dir.strip() or scheme not in ("", "s3"):
            raise ConfigError(f"checkpoint.dir: {m.checkpoint.dir!r} must be a local path or an s3:// URL (or null)")
    lg = m.logging
    _require("logging.metrics_interval", lg.metrics_interval, lg.metrics_interval > 0, "> 0 steps")
    _require("logging.sample_steps", lg.sample_steps, lg.sample_steps > 0, "> 0 sampler steps")
    _require("logging.sample_interval", lg.sample_interval, lg.sample_interval >= 0, ">= 0 steps (0: at the end only)")
    if not lg.sample_prompts:
        raise ConfigError("logging.sample_prompts: give at least one prompt")
    if lg.wandb is not None:
        for key in ("project", "entity"):
            value = getattr(lg.wandb, key)
            if value is not None and (not value.strip() or any(c in value for c in "/\\#?%:")):
                raise ConfigError(f"logging.wandb.{key}: {value!r} is not a W&B {key} name (letters, digits, "
                                  f"- _ . without slashes); give the team as logging.wandb.entity")
    d = m.data
    if d.source == "webdataset" and not d.shards:
        raise ConfigError("data.shards: required when data.source is 'webdataset' (e.g. s3://bucket/train-{000000..000099}.tar)")
    if d.source == "synthetic" and d.text.encoder == "precomputed":
        raise ConfigError("data.text.encoder: synthetic data has no precomputed embeddings; use 'builtin' or 'hf'")
    if d.text.encoder == "precomputed" and not (d.text.embedded_by or d.text.prompt_embeddings):
        raise ConfigError("data.text: a run on precomputed caption embeddings must embed its sample prompts the same "
                          "way; set data.text.embedded_by to the encoder that made them ('builtin' or 'hf:NAME', as "
                          "given to tools/embed_captions.py --encoder) or data.text.prompt_embeddings to a file of "
                          "the prompts' embeddings (tools/embed_prompts.py)")
    eb = d.text.embedded_by
    if eb is not None and (d.text.encoder != "precomputed" or not (eb == "builtin" or (eb.startswith("hf:") and eb[3:].strip()))):
        raise ConfigError(f"data.text.embedded_by: {eb!r}: give 'builtin' or 'hf:NAME' (a local folder or cached "
                          f"Hugging Face model), and only with data.text.encoder 'precomputed'")
    pe = d.text.prompt_embeddings
    if pe is not None and (d.text.encoder != "precomputed" or not pe.strip()):
        raise ConfigError(f"data.text.prompt_embeddings: {pe!r}: a local path or s3:// URL, and only with "
                          f"data.text.encoder 'precomputed'")
    if (d.text.encoder == "hf") != bool(d.text.model):
        raise ConfigError("data.text.model: give a Hugging Face model (local folder or cached name) exactly when "
                          "data.text.encoder is 'hf'")
    _require("data.workers", d.workers, d.workers >= 0, ">= 0 (0: read in the training process)")
    _require("data.retries", d.retries, d.retries >= 0, ">= 0")
    _require("data.prefetch", d.prefetch, d.prefetch >= 1, ">= 1")
    _require("data.block_size_mb", d.block_size_mb, d.block_size_mb >= 1, ">= 1")
    _require("data.retry_backoff_s", d.retry_backoff_s, d.retry_backoff_s >= 0, ">= 0")
    if d.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer: must be >= 0 samples (0 or 1: no shuffle), got {d.shuffle_buffer}")
    if d.buckets == "aspect" and d.source != "webdataset":
        raise ConfigError("data.buckets: 'aspect' needs data.source 'webdataset' (the synthetic data is square); "
                          "use buckets: square")
    if not 1 <= d.max_aspect <= 8:
        raise ConfigError(f"data.max_aspect: must be between 1 and 8 (the widest bucket's width / height), "
                          f"got {d.max_aspect}")
    if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*(:[^:\s]+)?", d.caption_key):
        raise ConfigError(f"data.caption_key: {d.caption_key!r} is not a member extension or extension:field; "
                          f"use 'txt' (the .txt member) or 'json:caption' (the caption field of the .json member)")
    if d.max_pixels <= 0 or not 0 <= d.max_bad_fraction <= 1:
        raise ConfigError(f"data: max_pixels must be > 0 and max_bad_fraction in [0, 1], got {d.max_pixels} and {d.max_bad_fraction}")
    if d.text.max_tokens < 1 or d.text.dim < 1:
        raise ConfigError(f"data.text: max_tokens and dim must be >= 1, got {d.text.max_tokens} and {d.text.dim}")
    for key in ("lpips", "dino"):
        w = getattr(m.losses, key).weight
        _require(f"losses.{key}.weight", w, w >= 0, ">= 0 (0: the loss is off)")
    for key in ("lpips", "dino"):
        lc = getattr(m.losses, key)
        if lc.max_t is not None and not 0 < lc.max_t <= 1:
            raise ConfigError(f"losses.{key}.max_t: must be in (0, 1] or null (every noise level), got {lc.max_t}")
        if lc.weights is not None:
            scheme = lc.weights.split("://", 1)[0] if "://" in lc.weights else ""
            if not lc.weights.strip() or scheme not in ("", "s3", "file"):
                raise ConfigError(f"losses.{key}.weights: {lc.weights!r} must be a local path or an s3:// URL (or null)")
    lp, dn = m.losses.lpips, m.losses.dino
    if not 0 < lp.downscale <= 1:
        raise ConfigError(f"losses.lpips.downscale: must be in (0, 1], got {lp.downscale}")
    if lp.resolution is not None:
        if lp.downscale != 1:
            raise ConfigError(f"losses.lpips: downscale {lp.downscale:g} and resolution {lp.resolution} both set the "
                              f"size LPIPS sees; keep one (resolution: the same size at every stage)")
        least = LPIPS_MIN_SIDE[lp.net]
        if lp.resolution < least:
            raise ConfigError(f"losses.lpips.resolution: {lp.resolution} px is smaller than the {least} px the "
                              f"{lp.net!r} backbone needs; use at least {least}")
    elif lp.weight > 0:
        least = LPIPS_MIN_SIDE[lp.net]
        patch = resolve_model_config(m.model).patch_size
        for i, s in enumerate(m.stages):
            # with aspect buckets the shortest side is the most elongated bucket's (352 of 352x704 at 512 px)
            side = min(min(b) for b in bucket_sizes(s.resolution, patch, m.data.max_aspect)) \
                if m.data.buckets == "aspect" else s.resolution
            if math.floor(side * lp.downscale) < least:
                what = f"images of {s.resolution} px" if side == s.resolution else \
                    f"images of {s.resolution} px in aspect buckets (shortest side {side} px)"
                raise ConfigError(
                    f"losses.lpips.downscale: stages[{i}] {what} become {math.floor(side * lp.downscale)} px, "
                    f"smaller than the {least} px the {lp.net!r} backbone needs; raise downscale (at most 1) or the "
                    f"stage resolution, or use losses.lpips.resolution"
                )
    if dn.resolution <= 0:
        raise ConfigError(f"losses.dino.resolution: must be > 0, got {dn.resolution}")
    if not dn.net.strip():
        raise ConfigError("losses.dino.net: give a timm model name, e.g. vit_base_patch14_reg4_dinov2")
    validate_recipe(m, mc)
    validate_eval(m)


def validate_recipe(m: Manifest, mc: ModelConfig) -> None:
    """REPA, TREAD and the guidance of the sample grids."""
    rp, tr = m.losses.repa, m.tread
    if rp.weight < 0:
        raise ConfigError(f"losses.repa.weight: must be >= 0 (0 = off), got {rp.weight}")
    if rp.weights is not None:
        scheme = rp.weights.split("://", 1)[0] if "://" in rp.weights else ""
        if not rp.weights.strip() or scheme not in ("", "s3", "file"):
            raise ConfigError(f"losses.repa.weights: {rp.weights!r} must be a local path or an s3:// URL (or null)")
    if rp.weight > 0 and not 0 <= rp.block < mc.depth:
        raise ConfigError(f"losses.repa.block: {rp.block} is not a block of a {mc.depth}-block model; use 0 to "
                          f"{mc.depth - 1} (the recipe: 7, the 8th)")
    if rp.projector_dim < 1 or rp.until_step < 0:
        raise ConfigError(f"losses.repa: projector_dim must be >= 1 and until_step >= 0 (0 = no end), got "
                          f"{rp.projector_dim} and {rp.until_step}")
    if not rp.net.strip():
        raise ConfigError("losses.repa.net: give a timm ViT name, e.g. vit_large_patch16_dinov3")
    if not 0 <= tr.ratio < 1:
        raise ConfigError(f"tread.ratio: the fraction of image tokens routed past the span must be in [0, 1) "
                          f"(0 = off; the recipe: 0.5), got {tr.ratio}")
    if tr.ratio > 0:
        if not (-mc.depth <= tr.start_block < mc.depth and -mc.depth <= tr.end_block < mc.depth):
            raise ConfigError(f"tread: start_block {tr.start_block} and end_block {tr.end_block} must be blocks of "
                              f"the {mc.depth}-block model (-{mc.depth} to {mc.depth - 1}; negative counts from the end)")
        first, last = tr.span(mc.depth)
        if first > last:
            raise ConfigError(f"tread: the span starts at block {first} after it ends at block {last}; give "
                              f"start_block <= end_block (the recipe: 1 and -2, the 2nd to the penultimate)")
    if m.logging.sample_guidance == "self" and tr.ratio <= 0:
        raise ConfigError("logging.sample_guidance: 'self' guides with the dense vs the routed prediction, which "
                          "needs tread.ratio > 0; use 'cfg' for a model trained without TREAD")


def _weights_spec_ok(spec: Optional[str]) -> bool:
    scheme = spec.split("://", 1)[0] if spec and "://" in spec else ""
    return spec is None or (bool(spec.strip()) and scheme in ("", "s3", "file"))


def validate_eval(m: Manifest) -> None:
    """The eval section (checked even when it is off, so that switching it on later cannot fail)."""
    e = m.eval
    _require("eval.interval_steps", e.interval_steps, e.interval_steps >= 0, ">= 0 (0: at stage ends and the run's end)")
    if e.samples < 2:
        raise ConfigError(f"eval.samples: must be >= 2 (FID needs two images of each set; PRX uses 10000), "
                          f"got {e.samples}")
    _require("eval.sampling_steps", e.sampling_steps, e.sampling_steps > 0, "> 0 sampler steps")
    _require("eval.cfg", e.cfg, e.cfg >= 0, ">= 0 (the guidance scale; PRX: 3.5)")
    _require("eval.batch", e.batch, e.batch >= 1, ">= 1 image per rank")
    if not 0 <= e.holdout < 1:
        raise ConfigError(f"eval.holdout: the fraction of training keys held out must be in [0, 1), got {e.holdout}")
    if not e.metrics:
        raise ConfigError(f"eval.metrics: give at least one of {', '.join(EVAL_METRICS)} (or eval.enabled: false)")
    if len(set(e.metrics)) != len(e.metrics):
        raise ConfigError(f"eval.metrics: {e.metrics} names a metric twice")
    if isinstance(e.shards, list) and not e.shards or isinstance(e.shards, str) and not e.shards.strip():
        raise ConfigError("eval.shards: empty; give held-out shards (e.g. s3://bucket/eval-{000..009}.tar) or null "
                          "to hold out eval.holdout of the training keys")
    if e.enabled and e.shards is None and m.data.source == "webdataset" and e.holdout <= 0:
        raise ConfigError("eval.holdout: 0 holds nothing out of training, so there is no reference set; give "
                          "eval.shards (held-out shards) or a holdout fraction such as 0.01")
    for key in ("inception", "clip", "dino"):
        spec = getattr(e, key).weights
        if not _weights_spec_ok(spec):
            raise ConfigError(f"eval.{key}.weights: {spec!r} must be a local path or an s3:// URL (or null)")
    if not e.clip.model.strip():
        raise ConfigError("eval.clip.model: give an open_clip model name (e.g. ViT-L-14-336-quickgelu) or the path "
                          "of an open_clip model config (.json)")
    if e.dino.net is not None and not e.dino.net.strip():
        raise ConfigError("eval.dino.net: give a timm model name (e.g. vit_base_patch14_reg4_dinov2) or null for "
                          "losses.dino.net")
    if e.dino.resolution is not None and e.dino.resolution <= 0:
        raise ConfigError(f"eval.dino.resolution: must be > 0 (or null for losses.dino.resolution), "
                          f"got {e.dino.resolution}")


def validate_muon(o: OptimizerConfig) -> None:
    """The Muon fields (checked whatever optimizer.name is, so that switching to muon later cannot fail)."""
    if o.muon_lr <= 0:
        raise ConfigError(f"optimizer.muon_lr: must be > 0, got {o.muon_lr}; the published recipe uses 1e-4")
    if not 0 <= o.muon_momentum < 1:
        raise ConfigError(f"optimizer.muon_momentum: must be in [0, 1), got {o.muon_momentum}; the published recipe "
                          f"uses 0.95")
    if not 1 <= o.muon_ns_steps < 100:
        raise ConfigError(f"optimizer.muon_ns_steps: must be in [1, 99] Newton-Schulz iterations, got "
                          f"{o.muon_ns_steps}; the published recipe uses 5")
    if o.muon_weight_decay < 0:
        raise ConfigError(f"optimizer.muon_weight_decay: must be >= 0, got {o.muon_weight_decay}")


def dump_yaml(m: Manifest) -> str:
    import yaml

    return yaml.safe_dump(to_dict(m), sort_keys=False, default_flow_style=None)


def load_resolved(path) -> Manifest:
    """Read a manifest this project wrote itself (a run directory's manifest.yaml)."""
    import yaml

    with open(path) as f:
        m = from_dict(Manifest, yaml.safe_load(f))
    validate(m)
    return m
