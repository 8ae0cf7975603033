"""The training job: restore, train through the stage schedule, checkpoint, stop cleanly.

`run_job(run_dir)` is what every launcher (in-process, detached, Slurm) calls.
Everything the job needs is in the run directory: `manifest.yaml` (resolved) and
the latest valid checkpoint. Signals (SIGINT, SIGTERM, SIGUSR2) only set a flag;
the loop notices it at the next step boundary, saves, and returns.
"""

from __future__ import annotations

import copy
import fcntl
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pixeldiff import checkpoint, distributed
from pixeldiff.config import ConfigError, Manifest, dump_yaml, load_resolved
from pixeldiff.data import SyntheticShapes
from pixeldiff.budget import Limits, billed_gpu_seconds, margin_s, next_job_possible
from pixeldiff.ledger import append_event, read_jsonl
from pixeldiff.model import PixelDiT
from pixeldiff.objective import XPrediction
from pixeldiff.perceptual import PerceptualLosses, forward_flops, storage_options_for
from pixeldiff.sample import render_grid
from pixeldiff.schedule import StageSchedule, lr_at, resplit
from pixeldiff.shards import DataError, ShardSource, merge_data_states
from pixeldiff.text import make_text_encoder


DEADLINE_STOP, BUDGET_STOP = 1000, 1001  # stop codes above every signal number


class RunLocked(Exception):
    """Another process is already running this run directory."""


# ------------------------------------------------------------------ pieces


class StopFlag:
    """Set by signal handlers; read by the loop at step boundaries. Nothing else happens in a handler."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def install(self):
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)

    def __bool__(self):
        return self.signum is not None


def code_version() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown"


def lock_run(run_dir: Path):
    """Hold an exclusive lock on the run directory for the life of the job; RunLocked if taken."""
    f = open(run_dir / "run.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise RunLocked(f"run {run_dir} is already running ({f.read().strip() or 'another process'})") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def pick_device(m: Manifest, env: distributed.DistEnv) -> torch.device:
    if m.cluster.device == "cuda" or (m.cluster.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def chunk_generator(seed: int, step: int, chunk: int, device: torch.device) -> torch.Generator:
    """All randomness of one micro-batch: a function of (step, its place in the global batch).

    Chunk k of the global batch gets the same draws whether it runs as rank k's micro-batch
    or as the k-th accumulation step of one process, so runs on different world sizes see
    the same noise, and resuming needs only the step."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 4099 + chunk)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):  # FSDP: both are DTensors sharded alike, a local op
        e.lerp_(p, 1 - decay)


def shard_like(ema: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """Make `ema`'s parameters copies of `model`'s FSDP2 shards (DTensors): each rank keeps its shard of the EMA.

    The EMA gets no FSDP hooks (it never runs forward sharded); sampling gathers its full state dict first."""
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        setattr(ema.get_submodule(owner) if owner else ema, leaf, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
    return ema


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm`; -> the norm before clipping (also with sharded DTensor grads)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):  # FSDP: partial norms of the shards; reduce over ranks
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm.item()


@dataclass
class TrainState:
    step: int = 0
    stage: int = 0
    samples_seen: int = 0  # data position: samples consumed so far (all ranks)
    rng: dict = field(default_factory=dict)
    stage_ends: list | None = None  # the stage schedule when the budget re-split it (budget.policy: finish_stages)

    def to_dict(self) -> dict:
        return {"step": self.step, "stage": self.stage, "samples_seen": self.samples_seen, "rng": self.rng,
                "stage_ends": self.stage_ends}


# ------------------------------------------------------------------ the job


class Trainer:
    def __init__(self, run_dir: Path, env: distributed.DistEnv | None = None, log=print):
        self.run_dir = Path(run_dir)
        self.env = env = env or distributed.DistEnv()
        self.log = log if env.is_main else (lambda *_: None)
        self.m = m = load_resolved(self.run_dir / "manifest.yaml")
        for i, s in enumerate(m.stages):
            if s.global_batch % env.world_size or (s.global_batch // env.world_size) % (s.micro_batch or 1):
                raise ConfigError(f"stages[{i}].global_batch: {s.global_batch} cannot be split over {env.world_size} "
                                  f"ranks in micro-batches of {s.micro_batch}; use a multiple of {env.world_size} "
                                  f"x micro_batch")
        self.device = pick_device(m, env)
        self.schedule = StageSchedule.from_manifest(m)
        d = m.checkpoint.dir
        self.ckpt_root = (d if checkpoint.is_remote(d) else Path(d)) if d else self.run_dir / "checkpoints"
        self.ckpt_options = storage_options_for(m) if checkpoint.is_remote(self.ckpt_root) else None
        self.encoder = make_text_encoder(m.data.text, self.device)
        if m.data.text.encoder == "precomputed":  # the null caption: no text tokens at all
            null_text, null_mask = torch.zeros(1, m.data.text.max_tokens, m.data.text.dim), torch.zeros(1, m.data.text.max_tokens, dtype=torch.bool)
        else:
            null_text, null_mask = self.encoder.encode([""])
        self.objective = XPrediction(m.objective, null_text[0], null_mask[0])
        if m.data.source == "synthetic":
            self.data = SyntheticShapes(m.data.seed)
        else:
            self.data = ShardSource(m.data, m.data.text, rank=env.rank, world=env.world_size,
                                    pin_memory=self.device.type == "cuda")
        self._batches, self._batches_key = None, None
        # Frozen perceptual networks: separate objects (not in the model, optimizer, EMA or checkpoints). Their
        # weights are checked (and s3:// ones fetched) here, before any training.
        self.perceptual = PerceptualLosses(m.losses, self.device, storage_options_for(m), log=self.log)

        torch.manual_seed(m.seed)
        self.model = PixelDiT(m.model, m.data.text.dim).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.net, self.ddp, self.fsdp = self.wrap()
        o = m.optimizer
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.state = TrainState()
        self.stop_code = 0  # a signal number, or DEADLINE_STOP / BUDGET_STOP
        self.step_s, self.checkpoint_s = 0.0, 10.0  # measured as the job runs; 10 s until the first save
        self._saved_step = -1
        self._measured_save = False
        self.saver = checkpoint.Saver(self.ckpt_root, m.checkpoint.keep, env.rank, self.ckpt_options,
                                      distributed.checkpoint_group(), barrier=distributed.barrier)
        self.provenance = {"code_version": code_version(), "torch": torch.__version__,  # once, not per save
                           "python": platform.python_version(), "host": socket.gethostname()}
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        )

    # ----- checkpoints

    def wrap(self):
        """The one place the single-device model is wrapped: data parallelism (DDP or FSDP2), then compilation.

        -> (the module the loop calls, the DDP wrapper or None, whether FSDP2 shards the model)."""
        env, c = self.env, self.m.cluster
        ddp, fsdp = None, False
        if env.world_size > 1 and c.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            mesh = distributed.device_mesh(self.device)
            for block in self.model.blocks:  # each block's parameters are gathered just before it runs
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)  # the rest: embeddings, final layer
            shard_like(self.ema, self.model)
            fsdp = True
        elif env.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        net = ddp or self.model
        if c.compile:
            net = torch.compile(net)
        return net, ddp, fsdp

    def no_sync(self, sync: bool):
        """Gradient accumulation: reduce gradients over ranks only on the last micro-batch of a step."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)
            return nullcontext()
        return nullcontext() if sync or self.ddp is None else self.ddp.no_sync()

    # ----- checkpoints

    def state_dicts(self) -> dict:
        """Model, EMA and optimizer state keyed by parameter name: this rank's shards (FSDP) or whole tensors."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        model, optimizer = get_state_dict(self.model, self.opt)
        return {"model": model, "ema": get_model_state_dict(self.ema), "optimizer": optimizer}

    def load_state_dicts(self, parts: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.opt, model_state_dict=parts["model"], optim_state_dict=parts["optimizer"])
        self.ema.load_state_dict(parts["ema"])

    def restore(self) -> bool:
        path = None
        if self.env.is_main:  # one decision for all ranks
            path = checkpoint.latest_valid(self.ckpt_root, log=self.log, storage_options=self.ckpt_options)
        path = distributed.broadcast_object(None if path is None else str(path))
        if path is None:
            return False
        if not checkpoint.is_remote(path):
            path = Path(path)
        parts = self.state_dicts()  # the layout to fill: DCP reads whatever shards this rank needs
        checkpoint.load_into(path, parts, distributed.checkpoint_group(), self.ckpt_options)
        self.load_state_dicts(parts)
        ranks = checkpoint.rank_states(path, self.ckpt_options)  # rank -> train_state, as saved by each rank
        ts = ranks.get(self.env.rank, ranks[0])
        self.state = TrainState(ts["step"], ts["stage"], ts["samples_seen"], ts["rng"], ts.get("stage_ends"))
        if self.state.stage_ends:
            self.schedule = StageSchedule(tuple(self.state.stage_ends))
        if isinstance(self.data, ShardSource):
            self.data.load_state_dict(merge_data_states([r["data"] for r in ranks.values()], own=ts["data"],
                                                        same_world=len(ranks) == self.env.world_size,
                                                        rank=self.env.rank))
        self._saved_step = self.state.step
        if len(ranks) == self.env.world_size:
            torch.set_rng_state(ts["rng"]["torch"])
        self.log(f"resumed from {path} at step {self.state.step} (stage {self.m.stages[self.state.stage].name})")
        return True

    def save(self, final: bool = False) -> None:
        """Save at this step (all ranks). In the background when checkpoint.async_save, except a `final` save,
        which is complete (marker written) when this returns."""
        if self._saved_step != self.state.step:  # else e.g. a signal right after an interval save
            self.state.rng = {"torch": torch.get_rng_state()}
            train_state = {**self.state.to_dict(), **({"data": self.data.state_dict()} if isinstance(self.data, ShardSource) else {})}
            files = {f"train_state-rank{self.env.rank:05d}.pt": checkpoint.torch_bytes(train_state)}
            if self.env.is_main:
                files.update({"manifest.yaml": dump_yaml(self.m).encode(),
                              "provenance.json": json.dumps(self.provenance, indent=1).encode()})
            background = self.m.checkpoint.async_save and not final
            self.report_saves(self.saver.save(self.state.step, self.state_dicts(), files, background))
            self._saved_step = self.state.step
        if final:
            self.report_saves(self.saver.wait())

    def report_saves(self, records: list[dict]) -> None:
        """Finished saves: the ledger event (rank 0), and the save time the deadline margin plans for."""
        for r in records:
            write_s = r["seconds_write"]  # a final save is synchronous: it takes the whole write time
            self.checkpoint_s = max(self.checkpoint_s if self._measured_save else 0.0, write_s)
            self._measured_save = True
            self.event("checkpoint_saved", **{k: r[k] for k in ("step", "checkpoint", "seconds_blocked",
                                                                 "seconds_write", "bytes", "async") if k in r})

    # ----- outputs

    def event(self, kind: str, **fields) -> None:
        if self.env.is_main:
            append_event(self.run_dir / "ledger.jsonl", kind, **fields)

    def write_metrics(self, record: dict) -> None:
        if not self.env.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def sampling_ema(self) -> torch.nn.Module | None:
        """The EMA as one whole module on rank 0 (None elsewhere); with FSDP every rank takes part in gathering it."""
        if not self.fsdp:
            return self.ema if self.env.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.ema, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.env.is_main:
            return None
        ema = PixelDiT(self.m.model, self.m.data.text.dim)
        ema.load_state_dict(full)
        return ema.to(self.device)

    def write_samples(self) -> Path | None:
        lg, stage = self.m.logging, self.m.stages[self.state.stage]
        out = self.run_dir / "samples" / f"step-{self.state.step:08d}.png"
        ema = self.sampling_ema()
        if ema is None:
            return None
        render_grid(ema, self.objective, self.encoder, lg.sample_prompts, stage.resolution, out,
                    per_prompt=4, steps=lg.sample_steps, cfg_scale=lg.sample_cfg, seed=self.m.seed)
        return out

    # ----- data

    def next_batch(self, resolution: int, micro: int, chunk: int):
        """Micro-batch `chunk` of the current global batch.

        -> images (B, 3, R, R) in [-1, 1], text (B, L, D), mask (B, L), all on the device."""
        st, dev = self.state, self.device
        if isinstance(self.data, SyntheticShapes):
            images, captions = self.data.batch(st.samples_seen + chunk * micro, micro, resolution)
            text, mask = self.encoder.encode(captions)
            return images.to(dev), text.to(dev), mask.to(dev)
        if self._batches_key != (resolution, micro):  # a new stage: new loader from the consumed position
            self.close_data()
            self._batches, self._batches_key = self.data.batches(resolution, micro), (resolution, micro)
        b = next(self._batches)
        images = b["image"].to(dev, non_blocking=True).float().div_(127.5).sub_(1)
        if "emb" in b:
            return images, b["emb"].to(dev, non_blocking=True), b["mask"].to(dev, non_blocking=True)
        text, mask = self.encoder.encode(b["caption"])
        return images, text.to(dev), mask.to(dev)

    def close_data(self) -> None:
        if self._batches is not None:
            self._batches.close()
            self._batches, self._batches_key = None, None

    # ----- one optimizer step

    def train_step(self) -> dict:
        m, st = self.m, self.state
        stage = m.stages[st.stage]
        per_rank = stage.global_batch // self.env.world_size
        micro = stage.micro_batch or per_rank
        accum = per_rank // micro  # global batch = micro x ranks x accum
        lr = lr_at(st.step, m.optimizer)
        for group in self.opt.param_groups:
            group["lr"] = lr
        total, parts = 0.0, {}
        for a in range(accum):
            chunk = self.env.rank * accum + a  # this micro-batch's place in the global batch
            images, text, mask = self.next_batch(stage.resolution, micro, chunk)
            gen = chunk_generator(m.seed, st.step, chunk, self.device)
            with self.autocast, self.no_sync(a == accum - 1):  # reduce gradients once per step
                loss, x0_hat, t = self.objective.loss(self.net, images, text, mask, gen)
                if self.perceptual:
                    terms = {"mse": loss, **self.perceptual.compute(x0_hat, images, t)}
                    loss = loss + sum(self.perceptual.weight(k) * v for k, v in terms.items() if k != "mse")
                    for k, v in terms.items():  # summed on the device: one sync per step, below
                        parts[k] = parts.get(k, 0.0) + v.detach().float() / accum
                (loss / accum).backward()
            total += loss.item() / accum
        st.samples_seen += stage.global_batch
        clip = m.optimizer.grad_clip if m.optimizer.grad_clip > 0 else float("inf")
        grad_norm = clip_gradients(list(self.model.parameters()), clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        st.step += 1
        if st.step % m.optimizer.ema_every == 0:
            ema_update(self.ema, self.model, m.optimizer.ema_decay)
        parts = {k: v.item() for k, v in parts.items()} if parts else {"mse": total}
        return {"loss": total, "lr": lr, "grad_norm": grad_norm, "parts": parts}

    # ----- the loop

    def run(self, stop: StopFlag) -> str:
        if not self.restore():
            self.state.stage = self.schedule.stage_at(0)
        st = self.state
        past = read_jsonl(self.run_dir / "ledger.jsonl")  # earlier segments: what the budget already paid for
        self.segment_t0 = float(os.environ.get("PIXELDIFF_JOB_START") or time.time())  # billing starts with the allocation
        self.limits = Limits.from_run(self.m.budget, past, gpus=self.env.world_size, now=self.segment_t0)
        if self.under_slurm:  # another job follows this one only if the budget can pay for it
            self.limits.next_job_s = self.m.cluster.max_job_hours * 3600
        self.billed_before = billed_gpu_seconds(past)
        self.carry_timings(past)
        self.event("segment_start", job_id=os.environ.get("SLURM_JOB_ID", f"local-{os.getpid()}"),
                   restart=int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                   nodes=int(os.environ.get("SLURM_JOB_NUM_NODES", 1)), gpus=self.env.world_size,
                   nodelist=os.environ.get("SLURM_JOB_NODELIST", socket.gethostname()), device=str(self.device),
                   launcher=self.env.launcher, step=st.step,
                   **({"job_start": float(os.environ["PIXELDIFF_JOB_START"])} if os.environ.get("PIXELDIFF_JOB_START") else {}))
        if self.m.budget.policy == "finish_stages":
            self.resplit_stages()
        self.log(f"{self.m.name}: {self.model.num_params() / 1e6:.2f}M parameters on {self.device}, "
                 f"steps {st.step}/{self.schedule.total_steps}")
        for message in self.perceptual.warnings:  # on every start, and in the ledger
            self.log(f"WARNING: {message}")
            self.event("warning", message=message, step=st.step)
        if self.perceptual:
            res = self.m.stages[st.stage].resolution
            flops = forward_flops(self.m.losses, res)
            self.log(f"perceptual losses (forward FLOPs per image for {res} px images; a step runs ~3x): " + ", ".join(
                f"{k} {getattr(self.m.losses, k).net} weight {self.perceptual.weight(k):g} "
                f"{flops[k] / 1e9:.2f} GFLOP" for k in self.perceptual.terms))
        try:
            self.loop(stop)
        except DataError as e:
            self.event("segment_end", reason=f"failed: {e}", step=st.step)
            raise
        finally:
            self.close_data()
        if 0 < self.stop_code < DEADLINE_STOP and self.under_slurm:
            # a timeout or preemption signal in a job that the budget cannot follow with another: the run ends here,
            # for the budget (all ranks take rank 0's answer)
            last = self.env.is_main and not self.next_job_affordable()
            if distributed.max_int(int(last), self.device):
                self.stop_code = BUDGET_STOP
        self.save(final=True)  # complete, marker written, before anything else: a signal's deadline may be near
        self.saver.close()
        if self.stop_code == DEADLINE_STOP:
            reason = "deadline"
            self.log(f"stopped at step {st.step} before the job's end time; run again (or requeue) to resume")
        elif self.stop_code == BUDGET_STOP:
            reason = "budget"
            self.event("budget_stop", step=st.step, billed_gpu_seconds=round(self.billed(), 1))
            self.log(f"budget spent: stopped at step {st.step} of {self.schedule.total_steps}; "
                     f"samples: {self.write_samples()}")
        elif self.stop_code:
            reason = f"signal {signal.Signals(self.stop_code).name}"
            self.log(f"stopped by {reason} at step {st.step}; run the same command again to resume")
        else:
            reason = "finished"
            self.log(f"finished at step {st.step}; samples: {self.write_samples()}")
        self.event("segment_end", reason=reason, step=st.step)
        return reason

    def carry_timings(self, past: list[dict]) -> None:
        """Start the stop margin from the step and save times earlier jobs measured, not from nothing: a job that
        starts with a few seconds of budget left must see that it has none."""
        saves = [e.get("seconds_write", e.get("seconds_blocked", 0.0)) for e in past if e["event"] == "checkpoint_saved"]
        if saves:
            self.checkpoint_s, self._measured_save = max(saves[-5:]), True
        recent = [r["step_time"] for r in read_jsonl(self.run_dir / "metrics.jsonl")[-5:] if r.get("step_time")]
        if recent:
            self.step_s = sum(recent) / len(recent)

    def resplit_stages(self, now: float | None = None) -> None:
        """budget.policy finish_stages: shrink the remaining stages when the measured throughput says they would not
        fit the budget (rank 0 decides from metrics.jsonl and the ledger; every rank takes its answer)."""
        ends = None
        if self.env.is_main:
            now = now or time.time()
            budget_end = self.limits.budget_end(now, self.billed(now))
            if budget_end is not None:
                ends = resplit(self.schedule.ends, self.state.step, [s.global_batch for s in self.m.stages],
                               self.stage_rates(), self.env.world_size, self.seconds_left(now, budget_end))
        ends = distributed.broadcast_object(ends)
        if ends is None or tuple(ends) == self.schedule.ends:
            return
        self.event("schedule_change", step=self.state.step, ends=list(ends), previous=list(self.schedule.ends))
        self.log(f"budget.policy finish_stages: stage ends {list(self.schedule.ends)} -> {list(ends)} to fit the budget")
        self.schedule = StageSchedule(tuple(ends))
        self.state.stage_ends = list(ends)

    def stage_rates(self) -> list[float | None]:
        """img/s per GPU for each stage: measured (recent metrics) where the stage ran, else its estimate scaled by how
        the measured stages compared with their estimates."""
        recs = read_jsonl(self.run_dir / "metrics.jsonl")
        measured, ratio = [], []
        for s in self.m.stages:
            rates = [r["img_per_s"] / self.env.world_size for r in recs if r.get("stage") == s.name][-10:]
            measured.append(sum(rates) / len(rates) if rates else None)
            if rates and s.est_img_per_s_per_gpu:
                ratio.append(measured[-1] / s.est_img_per_s_per_gpu)
        q = sum(ratio) / len(ratio) if ratio else 1.0
        out = [r if r is not None else (s.est_img_per_s_per_gpu * q if s.est_img_per_s_per_gpu else None)
               for r, s in zip(measured, self.m.stages)]
        known = [i for i, r in enumerate(measured) if r is not None]
        for i, s in enumerate(self.m.stages):  # no estimate either: the nearest measured stage, scaled by pixels
            if out[i] is None and known:
                k = min(known, key=lambda j: abs(j - i))
                out[i] = measured[k] * (self.m.stages[k].resolution / s.resolution) ** 2
        return out

    def seconds_left(self, now: float, budget_end: float) -> float:
        """Training seconds before the budget ends: less this job's start-up (as measured) for each job still to come,
        and the stop margin."""
        per_job = max(0.0, now - self.segment_t0) + margin_s(0.0, self.checkpoint_s)
        left = budget_end - now
        job_s = self.m.cluster.max_job_hours * 3600 if self.m.cluster.backend == "slurm" else left
        jobs = max(1, math.ceil(left / max(job_s, 1.0)))
        return left - jobs * per_job

    @property
    def under_slurm(self) -> bool:
        """A Slurm job (of any size), whose end the launcher follows with another job or not."""
        return bool(os.environ.get("SLURM_JOB_ID")) and self.m.cluster.backend == "slurm"

    def next_job_affordable(self, now: float | None = None) -> bool:
        now = now or time.time()
        budget_end = self.limits.budget_end(now, self.billed(now))
        return budget_end is None or next_job_possible(budget_end - now, self.m.cluster.max_job_hours * 3600)

    def billed(self, now: float | None = None) -> float:
        return self.billed_before + self.env.world_size * ((now or time.time()) - self.segment_t0)

    def limit_reached(self, now: float | None = None) -> int:
        """Rank 0: DEADLINE_STOP or BUDGET_STOP when the job's end or the budget is within the margin, else 0."""
        if not self.env.is_main:
            return 0
        now = now or time.time()
        hit = self.limits.check(now, self.billed(now), self.step_s, self.checkpoint_s)
        return {"deadline": DEADLINE_STOP, "budget": BUDGET_STOP}.get(hit, 0)

    def loop(self, stop: StopFlag) -> None:
        """Train until the schedule ends or a stop is requested (checked at step boundaries)."""
        m, st = self.m, self.state
        window_t, window_img, last_heartbeat = time.perf_counter(), 0, time.time()
        while st.step < self.schedule.total_steps:
            # a signal may reach one rank only, and rank 0 watches the clock: all ranks agree at this
            # step boundary (one small collective)
            self.stop_code = distributed.max_int(max(stop.signum or 0, self.limit_reached()), self.device)
            if self.stop_code:
                break
            stage_idx = self.schedule.stage_at(st.step)
            if stage_idx != st.stage:
                self.event("stage_change", step=st.step, stage=m.stages[stage_idx].name, previous=m.stages[st.stage].name)
                self.log(f"step {st.step}: stage {m.stages[st.stage].name} -> {m.stages[stage_idx].name}")
                st.stage = stage_idx
            stage = m.stages[st.stage]
            t0 = time.perf_counter()
            out = self.train_step()
            dt_step = time.perf_counter() - t0
            self.step_s = dt_step if not self.step_s else 0.9 * self.step_s + 0.1 * dt_step
            window_img += stage.global_batch
            if st.step % m.logging.metrics_interval == 0:
                dt = time.perf_counter() - window_t
                names = list(out["parts"])
                loss, *values = distributed.all_mean([out["loss"], *out["parts"].values()], self.device)
                rec = {"step": st.step, "stage": stage.name, "resolution": stage.resolution, "loss": round(loss, 6),
                       **{f"loss_{k}": round(v, 6) for k, v in zip(names, values)}, "img_per_s": round(window_img / dt, 2),
                       "step_time": round(time.perf_counter() - t0, 4), "lr": out["lr"], "grad_norm": round(out["grad_norm"], 4),
                       "time": time.time()}
                if isinstance(self.data, ShardSource):
                    rec["bad_samples"] = self.data.bad_samples()
                self.write_metrics(rec)
                self.log(json.dumps(rec))
                window_t, window_img = time.perf_counter(), 0
            if time.time() - last_heartbeat > 60:
                self.event("heartbeat", step=st.step)
                last_heartbeat = time.time()
            self.report_saves(self.saver.poll())  # a background save that finished since the last step
            if st.step % m.checkpoint.interval_steps == 0:
                self.save()
            if m.logging.sample_interval and st.step % m.logging.sample_interval == 0:
                self.write_samples()


def run_job(run_dir: Path, log=print, restore_signals: bool = True) -> str:
    """Entry point of a job on every rank. -> 'finished' or 'signal SIGTERM' etc.

    `restore_signals=False` (a process that exits right after) keeps the flag-setting handlers to the end, so that
    a signal arriving late (e.g. Slurm's to this rank, after another rank's signal already stopped the job) does not
    kill the process with its checkpoint already complete."""
    run_dir = Path(run_dir)
    env = distributed.env_from()
    lock = lock_run(run_dir) if env.is_main else None
    stop = StopFlag().install()
    try:
        device = pick_device(load_resolved(run_dir / "manifest.yaml"), env)
        distributed.init(env, device, timeout_s=float(os.environ.get("PIXELDIFF_COLLECTIVE_TIMEOUT_S", 600)))
        return Trainer(run_dir, env, log=log).run(stop)
    finally:
        if restore_signals:
            stop.restore()
        distributed.shutdown()
        if lock is not None:
            lock.close()


def main(argv=None) -> int:
    """`python -m pixeldiff.train RUN_DIR`: the detached local job."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pixeldiff.train RUN_DIR", file=sys.stderr)
        return 2
    try:
        reason = run_job(Path(argv[0]), log=lambda s: print(s, flush=True), restore_signals=False)
    except (ConfigError, RunLocked, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: the data cannot feed the run: {e}", file=sys.stderr)
        return 1
    return exit_code(reason)


def exit_code(reason: str) -> int:
    """0 when the job ended as planned (finished, budget spent, or saved before its deadline); 128+N after signal N."""
    if reason in ("finished", "budget", "deadline"):
        return 0
    return 128 + int(signal.Signals[reason.split()[-1]])


if __name__ == "__main__":
    sys.exit(main())
