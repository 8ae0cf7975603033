"""The training job: restore, train through the stage schedule, checkpoint, stop cleanly.

`run_job(run_dir)` is what every launcher (in-process, detached, Slurm) calls. Everything the job
needs is in the run directory: `manifest.yaml` (resolved) and the latest valid checkpoint. The
`Trainer` builds the parts (model and its parallel wrapping, EMA, optimizer, data, checkpoints,
the job's clock, metrics) and runs the loop; each part is its own module. Signals (SIGINT,
SIGTERM, SIGUSR2) only set a flag; the loop notices it at the next step boundary, saves, and
returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import signal
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from pixeldiff import checkpoint, distributed, tracking
from pixeldiff.budget import JobClock
from pixeldiff.config import ConfigError, Manifest, dump_yaml, load_resolved, resolve_model_config, to_dict
from pixeldiff.evaluate import training_holdout
from pixeldiff.data import BatchSource, SyntheticSource, text_bucket, to_device
from pixeldiff.ema import EMA
from pixeldiff.guard import DivergenceGuard
from pixeldiff.ledger import read_jsonl
from pixeldiff.metrics import MetricsLogger
from pixeldiff.model import PixelDiT, device_peak_tflops, forward_flops
from pixeldiff.objective import XPrediction, tread_route
from pixeldiff.optim import OptimizerState, build_optimizer
from pixeldiff.parallel import clip_gradients, parallelize
from pixeldiff.perceptual import PerceptualLosses
from pixeldiff.repa import build_teacher, repa_active
from pixeldiff.process import LOCK_WAIT_S, RunLocked, StopFlag, code_version, leave, lock_run, no_world_write
from pixeldiff.sample import shared_grid
from pixeldiff.schedule import StageSchedule, eval_reason, lr_at
from pixeldiff.shards import DataError, ShardSource
from pixeldiff.storage import storage_options
from pixeldiff.text import make_text_encoder, null_caption
from pixeldiff.weights import random_init_warning


DEADLINE_STOP, BUDGET_STOP, DIVERGED = 1000, 1001, 1002  # stop codes above every signal number
OUT_OF_MEMORY_EXIT = 3  # `python -m pixeldiff.train`: a micro-batch did not fit in the GPU's memory


class OutOfMemory(RuntimeError):
    """A stage's micro-batch does not fit in this device's memory (the ledger's `out_of_memory` says which)."""

    def __init__(self, stage_index: int, stage: str, micro: int, device: str):
        self.stage_index, self.micro = stage_index, micro
        super().__init__(f"stage {stage}: a micro-batch of {micro} does not fit in the memory of {device}; set "
                         f"stages[{stage_index}].micro_batch smaller (gradient accumulation keeps the global batch; "
                         f"`pixeldiff-launch calibrate` finds the largest that fits)")
UNDER_BUDGET = 0.8  # a schedule needing less than this fraction of the budget's time left is said to end inside it
NAN_AT_STEP_ENV = "PIXELDIFF_TEST_NAN_AT_STEP"  # tests only: the loss of step N (1-based), or from N on ("N+"), is NaN


# ------------------------------------------------------------------ pieces


def build_evaluator(m: Manifest, encoder, device: torch.device, log):
    """The quality metrics' networks when the manifest evaluates (eval.enabled), else None. Its warnings (random
    substitute features) are logged at every start."""
    if not m.eval.enabled:
        return None
    from pixeldiff.evaluate import Evaluator
    from pixeldiff.text import PromptTable

    if isinstance(encoder, PromptTable):
        raise ConfigError("eval: the held-out captions must be embedded to generate from them, and this run has "
                          "only the grid prompts' embeddings (data.text.prompt_embeddings); set data.text.embedded_by "
                          "to the encoder that made the shards' embeddings, or eval.enabled: false")
    ev = Evaluator(m.eval, m, device, storage_options(m.data.s3), log=log)
    for w in ev.warnings:
        log(f"WARNING: {w}")
    return ev


def chunk_generator(seed: int, step: int, chunk: int, device: torch.device) -> torch.Generator:
    """All randomness of one micro-batch: a function of (step, its place in the global batch).

    Chunk k of the global batch gets the same draws whether it runs as rank k's micro-batch
    or as the k-th accumulation step of one process, so runs on different world sizes see
    the same noise, and resuming needs only the step."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 4099 + chunk)


@dataclass
class TrainState:
    """Where the run is: the step, its stage, and the stage schedule when the budget re-split it."""

    step: int = 0
    stage: int = 0
    stage_ends: list | None = None  # budget.policy finish_stages
    lr_scale: float = 1.0  # rollbacks after a divergence multiply it by optimizer.rollback_lr_factor
    rollbacks: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "stage": self.stage, "stage_ends": self.stage_ends, "lr_scale": self.lr_scale,
                "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.stage, self.stage_ends = state["step"], state["stage"], state.get("stage_ends")
        self.lr_scale, self.rollbacks = state.get("lr_scale", 1.0), state.get("rollbacks", 0)


def build_data(m: Manifest, env: distributed.DistEnv, device: torch.device) -> BatchSource:
    if m.data.source == "synthetic":
        return SyntheticSource(m.data.seed, env.rank, env.world_size)
    return ShardSource(m.data, m.data.text, rank=env.rank, world=env.world_size, pin_memory=device.type == "cuda",
                       patch=resolve_model_config(m.model).patch_size, holdout=training_holdout(m), device=device)


def collective_timeouts(m: Manifest, environ=os.environ) -> tuple[float, float]:
    """(while starting or ending, in steady state) in seconds; PIXELDIFF_COLLECTIVE_TIMEOUT_S overrides both."""
    if environ.get("PIXELDIFF_COLLECTIVE_TIMEOUT_S"):
        return (float(environ["PIXELDIFF_COLLECTIVE_TIMEOUT_S"]),) * 2
    return m.cluster.startup_timeout_s, m.cluster.collective_timeout_s


def checkpoint_root(m: Manifest, run_dir: Path):
    """checkpoint.dir (an s3:// URL or a local path), or RUN_DIR/checkpoints."""
    d = m.checkpoint.dir
    return (d if checkpoint.is_remote(d) else Path(d)) if d else Path(run_dir) / "checkpoints"


def build_checkpoints(t: "Trainer") -> checkpoint.CheckpointManager:
    """The trainer's checkpoint parts: model, EMA and optimizer in the DCP shards (a share each under DDP); the
    train state and data position in each rank's file; the resolved manifest and provenance beside them."""
    m, env, root = t.m, t.env, checkpoint_root(t.m, t.run_dir)
    return checkpoint.CheckpointManager(
        root, m.checkpoint.keep, m.checkpoint.async_save, env.rank, env.world_size,
        sharded={"model": checkpoint.ModelState(t.model), "ema": t.ema, "optimizer": OptimizerState(t.model, t.opt)},
        train=t.state, data=t.data, files=t.provenance_files, on_saved=t.on_saved,
        storage_options=storage_options(m.data.s3) if checkpoint.is_remote(root) else None,
        process_group=distributed.checkpoint_group(), barrier=distributed.barrier,
        broadcast=distributed.broadcast_object, log=t.log, replicated=t.par.ddp is not None, device=t.device,
        manifest=to_dict(m), retries=m.checkpoint.retries, retry_backoff_s=m.checkpoint.retry_backoff_s,
        on_event=t.metrics.event)


def check_batches(m: Manifest, world_size: int) -> None:
    for i, s in enumerate(m.stages):
        if s.global_batch % world_size or (s.global_batch // world_size) % (s.micro_batch or 1):
            raise ConfigError(f"stages[{i}].global_batch: {s.global_batch} cannot be split over {world_size} "
                              f"ranks in micro-batches of {s.micro_batch}; use a multiple of {world_size} x micro_batch")


def model_options(m: Manifest, teacher=None, training: bool = True) -> dict:
    """PixelDiT's optional parts: TREAD's routed span, and REPA's projector (training only: not in the EMA)."""
    depth = resolve_model_config(m.model).depth
    return {"tread_span": m.tread.span(depth) if m.tread.ratio > 0 else None,
            "repa_dims": (m.losses.repa.projector_dim, teacher.dim) if teacher is not None and training else None}


def micro_layout(stage, world_size: int) -> tuple[int, int]:
    """-> (micro-batch size, micro-batches per step) of one rank: global batch = micro x ranks x accumulation."""
    per_rank = stage.global_batch // world_size
    micro = stage.micro_batch or per_rank
    return micro, per_rank // micro


# ------------------------------------------------------------------ the job


class Trainer:
    def __init__(self, run_dir: Path, env: distributed.DistEnv | None = None, log=print):
        self.run_dir = Path(run_dir)
        self.env = env = env or distributed.DistEnv()
        self.log = log if env.is_main else (lambda *_: None)
        self.m = m = load_resolved(self.run_dir / "manifest.yaml")
        check_batches(m, env.world_size)
        self.device = distributed.pick_device(m.cluster.device, env)
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "the CPU"
        self.schedule = StageSchedule.from_manifest(m)
        self.encoder = make_text_encoder(m.data.text, self.device, storage_options(m.data.s3))
        null_text, null_mask = null_caption(m, self.encoder)
        # kept on the device: caption dropout and guidance use them every step
        self.objective = XPrediction(m.objective, null_text.to(self.device), null_mask.to(self.device))
        real = null_mask.nonzero()
        trim = m.data.text.trim and text_bucket(0, m.data.text.max_tokens) < m.data.text.max_tokens  # > 1 length
        self.trim = (m.data.text.max_tokens, int(real.max()) + 1 if real.numel() else 0) if trim else (0, 0)
        # compiled (static shapes): the ranks agree on each micro-batch's text length, so that a new length
        # recompiles on all ranks at once; eager ranks may differ (the gradients' shapes do not)
        self.agree_text = distributed.agree_max if trim and m.cluster.compile and env.world_size > 1 else None
        self.data = build_data(m, env, self.device)
        # Frozen perceptual networks: not in the model, optimizer, EMA or checkpoints. Their weights are checked (and
        # s3:// ones fetched) here, before any training.
        self.perceptual = PerceptualLosses(m.losses, self.device, storage_options(m.data.s3), log=self.log,
                                           compile=m.cluster.compile)

        self.teacher = build_teacher(m, self.device, storage_options(m.data.s3), log=self.log)  # REPA's, frozen
        self.weights = {k: getattr(m.losses, k).weight for k in ("lpips", "dino", "repa")}

        torch.manual_seed(m.seed)
        self.model = PixelDiT(m.model, m.data.text.dim, **model_options(m, self.teacher)).to(self.device)
        self.ema = EMA(self.model, m.optimizer.ema_decay, m.optimizer.ema_every)
        # REPA switched off later (per stage or from a step): DDP must expect the projector without gradients
        repa_ends = self.teacher is not None and (m.losses.repa.until_step > 0 or any(s.repa is False for s in m.stages))
        self.par = parallelize(self.model, self.ema, m.cluster, env.world_size, self.device, unused_parameters=repa_ends)
        o = m.optimizer
        self.opt = build_optimizer(self.model, o)  # both honour `found_inf`: a skipped step leaves all state alone
        self.guard = DivergenceGuard(self.device, o.max_skipped_steps)
        nan = os.environ.get(NAN_AT_STEP_ENV, "")  # "N": step N's loss once; "N+": every step from N on
        self.nan_at, self.nan_from = int(nan.rstrip("+") or 0), nan.endswith("+")
        self.state = TrainState()
        self.stop_code = 0  # a signal number, or DEADLINE_STOP / BUDGET_STOP
        # a job that saves and stops at this step as at its deadline (pixeldiff-launch calibrate: a stage switch
        # across two jobs)
        self.stop_at = int(os.environ.get("PIXELDIFF_STOP_AT_STEP") or 0)
        self.oom_above = int(os.environ.get("PIXELDIFF_TEST_OOM_ABOVE") or 0)
        self.metrics = MetricsLogger(self.run_dir, env.is_main, self.device, m.logging.metrics_interval, log=self.log)
        self.metrics.speed(lambda res, text_len: 3 * forward_flops(m.model, m.data.text.dim, res, text_len, m.tread),
                           env.world_size, device_peak_tflops(self.device, m.cluster.peak_tflops))
        self.clock: JobClock | None = None  # made when the job starts (run)
        self.timeouts = collective_timeouts(m)
        self.provenance = {"code_version": code_version(), "torch": torch.__version__,  # once, not per save
                           "python": platform.python_version(), "host": socket.gethostname()}
        self.ckpt = build_checkpoints(self)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        self.evaluator = build_evaluator(m, self.encoder, self.device, self.log)  # None: eval off
        self.references: dict = {}  # resolution -> the held-out set's statistics (evaluate.Reference)

    def provenance_files(self) -> dict[str, bytes]:
        return {"manifest.yaml": dump_yaml(self.m).encode(), "provenance.json": json.dumps(self.provenance, indent=1).encode()}

    def on_saved(self, record: dict) -> None:
        """A finished save: the save time the stop margin plans for, and the ledger event."""
        if self.clock is not None:
            self.clock.observe_save(record["seconds_write"])
        self.metrics.event("checkpoint_saved", **{k: record[k] for k in ("step", "checkpoint", "seconds_blocked",
                                                                         "seconds_write", "bytes", "async", "attempts") if k in record})

    def restore(self) -> bool:
        path = self.ckpt.restore()
        if path is None:
            self.state.stage = self.schedule.stage_at(0)
            return False
        if self.state.stage_ends:
            self.schedule = StageSchedule(tuple(self.state.stage_ends))
        self.log(f"resumed from {path} at step {self.state.step} (stage {self.m.stages[self.state.stage].name})")
        return True

    def write_samples(self) -> Path | None:
        """The EMA's sample grid at this step, split over all ranks (bf16 on GPUs), assembled by rank 0. Every rank
        calls this. Its time is measured: the final grid is part of the stop margin."""
        t0, lg, stage = time.perf_counter(), self.m.logging, self.m.stages[self.state.stage]
        ema = self.ema.whole(lambda: PixelDiT(self.m.model, self.m.data.text.dim, **model_options(self.m, training=False)),
                             self.device)
        with self.autocast:
            out = shared_grid(ema, self.objective, self.encoder, lg, stage.resolution, self.m.seed,
                              self.run_dir / "samples" / f"step-{self.state.step:08d}.png", self.env.rank,
                              self.env.world_size, tread_ratio=self.m.tread.ratio)
        seconds = time.perf_counter() - t0
        if self.clock is not None:
            self.clock.observe_samples(seconds)
        if out is not None:
            self.metrics.event("samples_written", step=self.state.step, grid=str(out), seconds=round(seconds, 3))
            self.metrics.image("samples", self.state.step, out)
        return out

    def evaluate(self, why: str, **extra) -> dict | None:
        """The EMA's quality on the held-out set (every rank calls this; pixeldiff/evaluate.py, docs/evaluation.md):
        eval.samples images generated from the held-out captions at the stage's resolution (eval.sampling_steps,
        eval.cfg, the grids' guidance), split over the ranks by index, scored against the held-out images'
        statistics (computed once per resolution and cached in RUN_DIR/eval/). Rank 0 appends the result to
        eval.jsonl. Its time counts as evaluation in goodput and in the stop margin."""
        if self.evaluator is None:
            return None
        from pixeldiff.evaluate import reference_batches, to_uint8
        from pixeldiff.sample import grid_part

        t0, e, st = time.perf_counter(), self.m.eval, self.state
        stage = self.m.stages[st.stage]
        res, opts = stage.resolution, storage_options(self.m.data.s3)
        ref = self.references.get(res)
        if ref is None:
            ref = self.evaluator.reference(reference_batches(self.m, res, storage_options=opts, log=self.log), res,
                                           cache_dir=self.run_dir / "eval", storage_options=opts)
            self.references[res] = ref
        ema = self.ema.whole(lambda: PixelDiT(self.m.model, self.m.data.text.dim, **model_options(self.m, training=False)),
                             self.device)
        mine = ref.prompts(self.env.rank, self.env.world_size)
        lg = self.m.logging

        def generated():
            for i in range(0, len(mine), e.batch):
                idx, caps = [j for j, _ in mine[i:i + e.batch]], [c for _, c in mine[i:i + e.batch]]
                with self.autocast:
                    images = grid_part(ema, self.objective, self.encoder, ref.captions, res, idx, per_prompt=1,
                                       steps=e.sampling_steps, cfg_scale=e.cfg, seed=self.m.seed + 1,
                                       guidance=lg.sample_guidance, tread_ratio=self.m.tread.ratio)
                yield to_uint8(images), caps

        result = self.evaluator.score(generated(), ref)
        seconds = time.perf_counter() - t0
        rec = {"step": st.step, "stage": stage.name, "resolution": res, "why": why,
               **{k: result.get(k) for k in e.metrics}, "samples": result["samples"],
               "reference_samples": result["reference_samples"], "sampling_steps": e.sampling_steps, "cfg": e.cfg,
               "guidance": lg.sample_guidance, "seconds": round(seconds, 3), "time": time.time(),
               "features": result["features"], "preprocess": result["preprocess"], **extra}
        if self.clock is not None:
            self.clock.observe_eval(seconds)
        if self.env.is_main:
            with open(self.run_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            self.metrics.event("evaluated", step=st.step, stage=stage.name, seconds=rec["seconds"],
                               **{k: rec[k] for k in e.metrics})
            for t in self.metrics.trackers:
                t.log("eval", st.step, rec)
            shown = "  ".join(f"{k} {rec[k]:.4g}" for k in e.metrics if rec[k] is not None)
            self.log(f"eval at step {st.step} ({stage.name}, {why}): {shown}  ({result['samples']} samples, "
                     f"{seconds:.1f} s)")
        return rec

    # ----- one optimizer step

    def train_step(self, batches) -> dict:
        """One optimizer step over this rank's micro-batches. -> the step's loss and parts (device tensors), lr,
        gradient norm (a device tensor)."""
        m, st = self.m, self.state
        micro, accum = micro_layout(m.stages[st.stage], self.env.world_size)
        lr = lr_at(st.step, m.optimizer) * st.lr_scale
        self.opt.set_lr(lambda base: lr_at(st.step, m.optimizer, base) * st.lr_scale)  # each group from its own base
        repa_at = m.losses.repa.block if self.teacher is not None and repa_active(m, st.stage, st.step) else None
        try:
            return self._accumulate(batches, micro, accum, lr, repa_at)
        except torch.OutOfMemoryError:
            raise OutOfMemory(st.stage, m.stages[st.stage].name, micro, self.device_name) from None

    def _accumulate(self, batches, micro: int, accum: int, lr: float, repa_at) -> dict:
        """train_step's work: the micro-batches' forward and backward, then the optimizer step."""
        m, st = self.m, self.state
        total, parts = 0.0, {}
        for a in range(accum):
            if self.oom_above and micro > self.oom_above:  # PIXELDIFF_TEST_OOM_ABOVE: the GPU memory's limit, faked
                raise torch.OutOfMemoryError(f"CUDA out of memory (test: micro-batch {micro} > {self.oom_above})")
            t_data = time.perf_counter()
            images, text, mask = to_device(next(batches), self.encoder, self.device, *self.trim, agree=self.agree_text)
            self.metrics.data_wait(time.perf_counter() - t_data)
            self.metrics.batch_text(images.shape[0], text.shape[1])
            gen = chunk_generator(m.seed, st.step, self.env.rank * accum + a, self.device)
            with self.autocast, self.par.reduce_gradients(a == accum - 1):  # reduce gradients once per step
                loss, terms = self.forward_loss(images, text, mask, gen, repa_at)
                if len(terms) > 1:
                    for k, v in terms.items():
                        parts[k] = parts.get(k, 0.0) + v.detach().float() / accum
                (loss / accum).backward()
            total = total + loss.detach().double() / accum
        if self.nan_at and (st.step + 1 == self.nan_at or (self.nan_from and st.step + 1 >= self.nan_at)):
            total = total * float("nan")
            self.nan_at = self.nan_at if self.nan_from else 0  # "N": once per process (a rollback replays it)
        clip = m.optimizer.grad_clip if m.optimizer.grad_clip > 0 else float("inf")
        grad_norm = clip_gradients(list(self.model.parameters()), clip)
        self.opt.found_inf = self.guard.found_inf(total, grad_norm)  # skipped on the device when not finite
        self.opt.step()
        self.guard.observe(self.opt.found_inf, st.step + 1)
        self.opt.zero_grad(set_to_none=True)
        st.step += 1
        self.ema.update(self.model, st.step)
        return {"loss": total, "lr": lr, "grad_norm": grad_norm, "parts": parts or {"mse": total}}

    def forward_loss(self, images, text, mask, gen: torch.Generator, repa_at: int | None):
        """One micro-batch: TREAD's routing (drawn first from the micro-batch's generator, so a resumed run routes
        the same tokens), the noised input, the forward, and the loss terms. -> (weighted loss, {term: value})."""
        route = None
        if self.m.tread.ratio > 0:
            B, _, H, W = images.shape
            p = self.model.cfg.patch_size
            route = tread_route(B, (H // p) * (W // p), self.m.tread.ratio, gen)
        xt, t, text, mask = self.objective.noised(images, text, mask, gen)
        out = self.par.net(xt, t, text, mask, route=route, repa_at=repa_at)
        x0_hat, aligned = (out[0], out[1:]) if repa_at is not None else (out, None)
        terms = {"mse": self.objective.velocity_mse(x0_hat, xt, images, t)}
        if self.perceptual:
            terms.update(self.perceptual.compute(x0_hat, images, t))
        if aligned is not None:
            terms["repa"] = self.teacher.loss(aligned[0], images, aligned[1])
        loss = terms["mse"] + sum(self.weights[k] * v for k, v in terms.items() if k != "mse")
        return loss, terms

    # ----- the loop

    def limit_code(self) -> int:
        """Rank 0 watches the clock: DEADLINE_STOP or BUDGET_STOP when the job's end or the budget is near, else 0."""
        hit = self.clock.stop_reason() if self.env.is_main else None
        if self.stop_at and self.state.step >= self.stop_at:  # PIXELDIFF_STOP_AT_STEP (calibrate's first job)
            hit = "deadline"
        return {"deadline": DEADLINE_STOP, "budget": BUDGET_STOP}.get(hit, 0)

    def loop(self, stop: StopFlag) -> None:
        """Train until the schedule ends or a stop is requested (checked at step boundaries)."""
        self.agreed = None  # the stop agreement issued after the last step, read before the next one
        self.metrics.start()
        self._loop(stop)
        if self.agreed is not None:  # issued after the last step: read by every rank (an error leaves it unread)
            self.agreed()
            self.agreed = None

    def boundary(self, stop: StopFlag) -> tuple[int, int]:
        """This step boundary's values: the stop code (a signal, or rank 0's clock) and whether a background save
        has finished on this rank."""
        return max(stop.signum or 0, self.limit_code()), int(self.ckpt.save_finished())

    def _loop(self, stop: StopFlag) -> None:
        m, st = self.m, self.state
        batches, layout = None, None
        while st.step < self.schedule.total_steps:
            # a signal may reach one rank only, and rank 0 watches the clock: all ranks agree at this step boundary;
            # in the same collective, whether a background save has finished on some rank: it ends in a collective,
            # so it has finished (or is about to) on every rank, and all report it, or raise its error, at this step.
            # The agreement was issued right after the previous step (the first step of a job waits for its own):
            # a signal or deadline that comes later is seen one step later (Slurm's signals come >= 60 s early)
            agreed, self.agreed = self.agreed or distributed.agree_max_later(self.boundary(stop)), None
            self.stop_code, saved = agreed()
            if saved:
                self.ckpt.poll(wait=True)
            if self.stop_code:
                break
            stage_idx = self.schedule.stage_at(st.step)
            if stage_idx != st.stage:
                self.metrics.event("stage_change", step=st.step, stage=m.stages[stage_idx].name, previous=m.stages[st.stage].name)
                self.log(f"step {st.step}: stage {m.stages[st.stage].name} -> {m.stages[stage_idx].name}")
                st.stage = stage_idx
            stage = m.stages[st.stage]
            first = layout != (stage.resolution, *micro_layout(stage, self.env.world_size))
            if first:  # a new stage: a new stream from the consumed position, and a first step that may compile
                layout = (stage.resolution, *micro_layout(stage, self.env.world_size))
                batches = self.data.batches(*layout)
                if self.device.type == "cuda":  # peak_mem_gib in metrics.jsonl: this stage's own
                    torch.cuda.reset_peak_memory_stats(self.device)
                distributed.set_timeout(self.timeouts[0])
            t0 = time.perf_counter()
            out = self.train_step(batches)
            if first:
                distributed.set_timeout(self.timeouts[1])  # steady state: a dead rank stops the others soon
            if not first:  # a stream's first step includes the data's start-up (workers, shards) and compiling: its
                # time would inflate the stop margin (two steps, and the final grid's estimate) and stop a short job at once
                self.clock.observe_step(time.perf_counter() - t0)
            save = st.step % m.checkpoint.interval_steps == 0
            grid = bool(m.logging.sample_interval) and st.step % m.logging.sample_interval == 0
            why = self.eval_due(st.step)
            busy = save or grid or why is not None
            if not busy:  # read at the next boundary: the round trip overlaps the logging below
                self.agreed = distributed.agree_max_later(self.boundary(stop))
            self.metrics.step(st.step, stage, out, t0, lambda: {**self.data.stats(), "skipped_steps": self.skipped()})
            self.metrics.heartbeat(st.step, elapsed_s=round(self.clock.elapsed(), 3))
            if (save or st.step % m.logging.metrics_interval == 0) and self.guard.diverged(self.model, check_weights=save):
                if not self.roll_back():
                    self.stop_code = DIVERGED
                    break
                layout = None  # the data position went back too
                continue
            if save:
                self.ckpt.save(st.step)
            if grid:
                self.write_samples()
            if why is not None:
                self.evaluate(why)
            if busy:  # issued after the save, grid or evaluation: a deadline or signal that came during them, and
                # whether the save started here has finished, are this boundary's (no stale "a save finished")
                self.agreed = distributed.agree_max_later(self.boundary(stop))

    def eval_due(self, step: int) -> str | None:
        """Why the trainer evaluates after `step` in the loop ('stage_end', 'interval'), or None; the run's end is
        evaluated after the loop."""
        if self.evaluator is None:
            return None
        why = eval_reason(step, self.schedule.ends, self.m.eval.interval_steps)
        return None if why == "end" else why

    def skipped(self) -> int:
        """Steps skipped in this job (read at logging intervals); the ledger hears of the first."""
        n, first = self.guard.new_skips()
        if first is not None:
            self.metrics.event("step_skipped", step=first, skipped=n)
            self.log(f"WARNING: step {first} had a non-finite loss or gradient norm: skipped")
        return n

    def roll_back(self) -> bool:
        """optimizer.on_divergence rollback: reload the last valid checkpoint, learning rate x rollback_lr_factor.
        -> False when the run must stop instead (stop, rollbacks used up, no checkpoint yet)."""
        st, o = self.state, self.m.optimizer
        at, scale, count = st.step, st.lr_scale * o.rollback_lr_factor, st.rollbacks + 1
        self.metrics.event("diverged", step=at, skipped_in_a_row=int(self.guard.streak.item()), rollbacks=st.rollbacks,
                           action="rollback" if o.on_divergence == "rollback" and st.rollbacks < o.max_rollbacks else "stop")
        if o.on_divergence == "stop" or st.rollbacks >= o.max_rollbacks:
            return False
        self.ckpt.poll(wait=True)
        self.data.close()
        path = self.ckpt.restore()
        if path is None:
            self.log(f"diverged at step {at} before the first checkpoint: nothing to roll back to")
            return False
        st.lr_scale, st.rollbacks = scale, count
        self.guard.reset_streak()
        self.metrics.event("rollback", step=at, checkpoint=path, to_step=st.step, lr_scale=scale, rollback=count)
        self.log(f"diverged at step {at}: rolled back to {path} (step {st.step}), learning rate x{scale:g} "
                 f"(rollback {count} of {o.max_rollbacks})")
        return True

    def run(self, stop: StopFlag) -> str:
        self.restore()
        st, m = self.state, self.m
        past = read_jsonl(self.run_dir / "ledger.jsonl")  # earlier segments: what the budget already paid for
        job_start = os.environ.get("PIXELDIFF_JOB_START")  # billing starts with Slurm's allocation
        under_slurm = bool(os.environ.get("SLURM_JOB_ID")) and m.cluster.backend == "slurm"
        self.clock = JobClock(m, past, read_jsonl(self.run_dir / "metrics.jsonl"), self.env.world_size,
                              float(job_start or time.time()), under_slurm)
        self.metrics.segment_start(self.env, self.device, st.step, job_start)
        if self.env.is_main:
            self.metrics.track(tracking.trackers(self.run_dir, m, st.step, self.log))
        self.budget_outlook()
        if m.budget.policy in ("finish_stages", "extend_last_stage"):
            self.resplit_stages()
        self.log(f"{m.name}: {self.model.num_params() / 1e6:.2f}M parameters on {self.device}, "
                 f"steps {st.step}/{self.schedule.total_steps}")
        self.perceptual.announce(self.m, self.state, self.log, self.metrics.event)
        if self.teacher is not None and m.losses.repa.weights is None:
            message = random_init_warning("repa", m.losses.repa)
            self.log(f"WARNING: {message}")
            self.metrics.event("warning", message=message, step=st.step)
        try:
            self.loop(stop)
        except OutOfMemory as e:
            self.metrics.event("out_of_memory", step=st.step, stage=e.stage_index, micro_batch=e.micro)
            self.end_segment(f"failed: {e}", step=st.step)
            raise
        except (DataError, checkpoint.StorageError, checkpoint.CheckpointError) as e:
            self.end_segment(f"failed: {e}", step=st.step)
            raise
        finally:
            self.data.close()
        if 0 < self.stop_code < DEADLINE_STOP and under_slurm:
            # a timeout or preemption signal in a job that the budget cannot follow with another: the run ends here,
            # for the budget (all ranks take rank 0's answer)
            last = self.env.is_main and not self.clock.next_job_affordable()
            if distributed.agree_max(int(last)):
                self.stop_code = BUDGET_STOP
        distributed.set_timeout(self.timeouts[0])  # the final save and grid may wait for the slowest rank
        if self.stop_code != DIVERGED and self.guard.diverged(self.model, check_weights=True):
            self.stop_code = DIVERGED
        if self.stop_code == DIVERGED:  # nothing saved: the last good checkpoint stays the one to resume from
            self.ckpt.close()
            last = checkpoint.latest_valid(self.ckpt.root, log=lambda _: None, storage_options=self.ckpt.storage_options)
            reason = (f"diverged at step {st.step}: {self.m.optimizer.max_skipped_steps} steps in a row had a "
                      f"non-finite loss or gradient norm (or the weights were not finite); last good checkpoint: "
                      f"{last or 'none'}")
            self.log(f"error: {reason}; lower optimizer.lr or raise optimizer.max_rollbacks, then run again")
            self.end_segment(f"failed: {reason}", step=st.step)
            return "diverged"
        self.ckpt.save(st.step, final=True)  # complete, marker written, before anything else: a deadline may be near
        self.ckpt.close()
        reason = self.finish()
        self.end_segment(reason, step=st.step)
        return reason

    def end_segment(self, reason: str, step: int) -> None:
        """The ledger's segment_end, with this job's monotonic seconds since its allocation (what billing uses)."""
        self.metrics.event("segment_end", reason=reason, step=step, elapsed_s=round(self.clock.elapsed(), 3))
        self.metrics.close()

    def finish(self) -> str:
        """The end of the job after its final save: the samples, the log line. -> the segment's end reason."""
        st = self.state
        if self.stop_code == DEADLINE_STOP:
            self.log(f"stopped at step {st.step} before the job's end time; run again (or requeue) to resume")
            return "deadline"
        if self.stop_code == BUDGET_STOP:
            self.metrics.event("budget_stop", step=st.step, billed_gpu_seconds=round(self.clock.billed(), 1))
            grid = self.write_samples()  # a collective under FSDP: every rank calls it
            self.log(f"budget spent: stopped at step {st.step} of {self.schedule.total_steps}; samples: {grid}")
            return "budget"
        if self.stop_code:
            reason = f"signal {signal.Signals(self.stop_code).name}"
            self.log(f"stopped by {reason} at step {st.step}; run the same command again to resume")
            return reason
        grid = self.write_samples()
        self.evaluate("end")
        self.log(f"finished at step {st.step}; samples: {grid}")
        return "finished"

    def budget_outlook(self, now: float | None = None) -> None:
        """At the job's start (rank 0): a schedule that will end far inside the budget at the measured speed is said,
        in the log and the ledger (`under_budget`: the projected end and cost), not left to stop early unremarked."""
        seen = self.clock.projection(self.schedule.ends, self.state.step, now) if self.env.is_main else None
        if seen is None or seen[0] >= UNDER_BUDGET * seen[1]:
            return
        need, left = seen
        gpu_h = (self.clock.billed(now) + need * self.env.world_size) / 3600
        now = self.clock.now() if now is None else now
        price, cap = self.m.budget.gpu_hour_usd, self.clock.limits.gpu_seconds_cap
        self.metrics.event("under_budget", step=self.state.step, projected_end=round(now + need, 1),
                           projected_gpu_hours=round(gpu_h, 3), projected_usd=round(gpu_h * price, 2) if price else None,
                           seconds_needed=round(need, 1), seconds_left=round(left, 1), policy=self.m.budget.policy)
        spend = f"${gpu_h * price:,.0f}" if price else f"{gpu_h:.1f} GPU-hours"
        of = f" of ${cap / 3600 * price:,.0f}" if cap is not None and price else ""
        more = ("; budget.policy extend_last_stage lengthens the last stage to spend the rest"
                if self.m.budget.policy == "extend_last_stage" else
                "; set budget.policy extend_last_stage to spend the rest on the last stage")
        self.log(f"the schedule ends in {need / 3600:.2f} h at the measured speed, {spend}{of}, with "
                 f"{(left - need) / 3600:.2f} h of the budget unused{more}")

    def resplit_stages(self, now: float | None = None) -> None:
        """budget.policy finish_stages: shrink the remaining stages when the measured throughput says they would not
        fit the budget; extend_last_stage: also lengthen the last stage when they would end far inside it (rank 0
        decides; every rank takes its answer)."""
        extend = self.m.budget.policy == "extend_last_stage"
        ends = self.clock.resplit(self.schedule.ends, self.state.step, now, extend=extend) if self.env.is_main else None
        ends = distributed.broadcast_object(ends)
        if ends is None or tuple(ends) == self.schedule.ends:
            return
        self.metrics.event("schedule_change", step=self.state.step, ends=list(ends), previous=list(self.schedule.ends))
        self.log(f"budget.policy {self.m.budget.policy}: stage ends {list(self.schedule.ends)} -> {list(ends)} to fit "
                 f"the budget")
        self.schedule = StageSchedule(tuple(ends))
        self.state.stage_ends = list(ends)


def evaluate_checkpoint(run_dir: Path, name: str | None = None, samples: int | None = None, log=print,
                        job_id: str | None = None) -> dict:
    """`pixeldiff-launch eval`: one evaluation (the manifest's eval section, or its defaults; `samples` instead of
    eval.samples) of a checkpoint of a run (`name`, e.g. step-00001000; default the newest) with its EMA weights, by
    this process or by every rank of a process group (an evaluation job: launcher/evaljob.py); appended to
    eval.jsonl with why "checkpoint" (and the Slurm job's id). -> the record."""
    run_dir = Path(run_dir)
    env = distributed.env_from()
    m = load_resolved(run_dir / "manifest.yaml")
    distributed.init(env, distributed.pick_device(m.cluster.device, env), timeout_s=collective_timeouts(m)[0])
    try:
        t = Trainer(run_dir, env, log=log)
        e = dataclasses.replace(t.m.eval, enabled=True, **({"samples": samples} if samples else {}))
        t.m = dataclasses.replace(t.m, eval=e)
        t.evaluator = build_evaluator(t.m, t.encoder, t.device, t.log)
        path = t.ckpt.restore(name)
        if path is None:
            raise checkpoint.CheckpointError(f"{run_dir} has no checkpoint yet: nothing to evaluate")
        log(f"evaluating {path} (step {t.state.step}, stage {t.m.stages[t.state.stage].name}) on {e.samples} samples")
        return t.evaluate("checkpoint", checkpoint=str(path).rstrip("/").rsplit("/", 1)[-1],
                          **({"job_id": job_id} if job_id else {}))
    finally:
        distributed.shutdown()


def run_job(run_dir: Path, log=print, restore_signals: bool = True) -> str:
    """Entry point of a job on every rank. -> 'finished' or 'signal SIGTERM' etc.

    `restore_signals=False` (a process that exits right after) keeps the flag-setting handlers to the end, so that
    a signal arriving late (e.g. Slurm's to this rank, after another rank's signal already stopped the job) does not
    kill the process with its checkpoint already complete."""
    no_world_write()
    run_dir = Path(run_dir)
    env = distributed.env_from()
    # torch.compile's graphs, kept with the run (shared storage under Slurm): the jobs after the first start from
    # the cache instead of compiling for minutes; a user's own setting wins
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(run_dir.resolve() / "compile-cache"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    wait = float(os.environ.get("PIXELDIFF_LOCK_WAIT_S", LOCK_WAIT_S)) if os.environ.get("SLURM_JOB_ID") else 0.0
    lock = lock_run(run_dir, wait_s=wait, log=log) if env.is_main else None
    stop = StopFlag().install()
    try:
        m = load_resolved(run_dir / "manifest.yaml")
        device = distributed.pick_device(m.cluster.device, env)
        distributed.init(env, device, *collective_timeouts(m))
        try:
            reason = Trainer(run_dir, env, log=log).run(stop)
        except (DataError, checkpoint.StorageError, checkpoint.CheckpointError, ConfigError):
            # a failure the ranks agreed on (a failed save, refused checkpoint): each leaves only once all are here,
            # so none is left waiting in a collective for one that has gone (a dead peer fails the barrier at once)
            with contextlib.suppress(Exception):
                distributed.barrier()
            raise
        distributed.barrier()  # every rank done with every collective before any tears its groups down
        return reason
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
        return failed(f"error: {e}", 2)
    except DataError as e:
        return failed(f"error: the data cannot feed the run: {e}", 1)
    except checkpoint.StorageError as e:
        return failed(f"error: {e}", 1)
    except OutOfMemory as e:
        return failed(f"error: {e}", OUT_OF_MEMORY_EXIT)
    return exit_code(reason)


def failed(message: str, code: int) -> int:
    print(message, file=sys.stderr, flush=True)
    return code


def exit_code(reason: str) -> int:
    """0 when the job ended as planned (finished, budget spent, or saved before its deadline); 128+N after signal N."""
    if reason in ("finished", "budget", "deadline"):
        return 0
    if reason == "diverged":
        return 1
    return 128 + int(signal.Signals[reason.split()[-1]])


if __name__ == "__main__":
    leave(main())
