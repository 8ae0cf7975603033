"""What the job reports while it trains: the metrics record of each logging interval, the ledger's
events and heartbeats, and the sinks records go to.

A step's loss parts and gradient norm stay on the device as tensors; they are reduced over ranks
and read by the host once per `logging.metrics_interval`, in one collective. Rank 0 writes; the
other ranks only take part in the reduction. A sink is anything with `write(record)` and
`close()`: `metrics.jsonl` is one, and tracking adapters (TensorBoard, W&B) plug in beside it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Protocol

import torch

from pixeldiff import distributed
from pixeldiff.ledger import append_event

HEARTBEAT_S = 60.0


class Sink(Protocol):
    def write(self, record: dict) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """One JSON line per record, appended (`metrics.jsonl`)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class MetricsLogger:
    def __init__(self, run_dir: Path, is_main: bool, device: torch.device, interval: int, log=print,
                 sinks: list[Sink] | None = None):
        self.run_dir, self.is_main, self.device, self.interval = Path(run_dir), is_main, device, interval
        self.log = log
        self.sinks = sinks if sinks is not None else ([JsonlSink(self.run_dir / "metrics.jsonl")] if is_main else [])
        self._new_window()
        self._last_heartbeat = time.monotonic()
        self.trackers: list = []  # TensorBoard (pixeldiff.tracking), rank 0: every record, and the sample grids
        self.step_flops, self.world, self.peak_tflops = None, 1, None

    def _new_window(self) -> None:
        """The window since the last record: its start, images, the seconds its steps waited for their batches,
        and the text tokens and samples they trained on (trimmed text varies)."""
        self._window_t, self._window_img, self._window_data = time.perf_counter(), 0, 0.0
        self._window_text = [0, 0]

    def data_wait(self, seconds: float) -> None:
        self._window_data += seconds

    def batch_text(self, samples: int, length: int) -> None:
        """A micro-batch of `samples` with `length` text tokens each (for the FLOPs of trimmed text)."""
        self._window_text[0] += samples * length
        self._window_text[1] += samples

    def speed(self, step_flops, world: int, peak_tflops: float | None) -> None:
        """Records get `tflops_per_gpu` (the denoiser's own matmul FLOPs of a training step per image,
        `step_flops(resolution, text tokens)` at the window's mean text length, times img/s, per GPU) and `mfu`
        against the device's peak where it is known."""
        self.step_flops, self.world, self.peak_tflops = step_flops, world, peak_tflops

    def track(self, trackers: list) -> None:
        self.trackers = trackers if self.is_main else []

    def image(self, tag: str, step: int, path) -> None:
        for t in self.trackers:
            t.image(tag, step, path)

    def start(self) -> None:
        """The loop begins: the first throughput window and heartbeat interval start now."""
        self._new_window()
        self._last_heartbeat = time.monotonic()

    def event(self, kind: str, **fields) -> None:
        """A ledger event (rank 0 writes it)."""
        if self.is_main:
            append_event(self.run_dir / "ledger.jsonl", kind, **fields)

    def segment_start(self, env, device, step: int, job_start: str | None, environ=os.environ) -> None:
        """The ledger's `segment_start`: this job run, its GPUs and nodes, from Slurm's variables where there are."""
        self.event("segment_start", job_id=environ.get("SLURM_JOB_ID", f"local-{os.getpid()}"),
                   restart=int(environ.get("SLURM_RESTART_COUNT", 0)), nodes=int(environ.get("SLURM_JOB_NUM_NODES", 1)),
                   gpus=env.world_size, nodelist=environ.get("SLURM_JOB_NODELIST", socket.gethostname()),
                   device=str(device), launcher=env.launcher, step=step,
                   **({"job_start": float(job_start)} if job_start else {}))

    def heartbeat(self, step: int, **fields) -> None:
        """Every HEARTBEAT_S (by the monotonic clock: a wall clock stepped back must not silence it)."""
        if time.monotonic() - self._last_heartbeat > HEARTBEAT_S:
            self.event("heartbeat", step=step, **fields)
            self._last_heartbeat = time.monotonic()

    def step(self, step: int, stage, out: dict, step_t0: float, extra=dict) -> dict | None:
        """After optimizer step `step` (all ranks). `out`: the step's "loss" (float64 tensor), "parts" (name ->
        tensor), "grad_norm" (tensor) and "lr"; `extra()`: more fields (e.g. the data's bad-sample counts). At the
        end of a logging interval -> the record written, else None."""
        self._window_img += stage.global_batch
        if step % self.interval:
            return None
        dt = time.perf_counter() - self._window_t
        names = list(out["parts"])
        values = torch.stack([out["loss"], *(v.double() for v in out["parts"].values())])
        loss, *parts = distributed.all_mean(values)
        rec = {"step": step, "stage": stage.name, "resolution": stage.resolution, "loss": round(loss, 6),
               **{f"loss_{k}": round(v, 6) for k, v in zip(names, parts)},
               "img_per_s": round(self._window_img / dt, 2), "step_time": round(time.perf_counter() - step_t0, 4),
               "lr": out["lr"], "grad_norm": round(out["grad_norm"].item(), 4), "time": time.time(), **extra()}
        rec["data_wait"] = round(min(1.0, self._window_data / dt), 4) if dt > 0 else None
        if self.device.type == "cuda":
            rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        if self.step_flops is not None and self._window_text[1]:
            text_len = self._window_text[0] / self._window_text[1]
            tflops = self.step_flops(stage.resolution, text_len) * rec["img_per_s"] / self.world / 1e12
            rec["tflops_per_gpu"] = round(tflops, 4)
            if self.peak_tflops:
                rec["mfu"] = round(tflops / self.peak_tflops, 4)
        if self.is_main:
            for sink in self.sinks:
                sink.write(rec)
            for t in self.trackers:
                t.log("train", step, rec)
            self.log(json.dumps(rec))
        self._new_window()
        return rec

    def close(self) -> None:
        for sink in [*self.sinks, *self.trackers]:
            sink.close()
        self.trackers = []
