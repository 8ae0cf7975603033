"""All torch.distributed setup, from the environment, with a single-process fallback.

Recognised launchers, in order:
- torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- Slurm (srun, one task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is
  the first host of SLURM_JOB_NODELIST and the port is derived from SLURM_JOB_ID, so it is
  the same after a requeue (the job id is kept) and differs between jobs sharing a node
  (`port_for_job`; PIXELDIFF_MASTER_PORT overrides);
- otherwise one process.
NCCL on GPUs, gloo on the CPU; a task's GPU is its local rank, or 0 when it sees only one
(`pick_device`). Collectives time out (`set_timeout`: long while a job starts, short after),
so a rank that dies makes the others fail in bounded time instead of hanging.

Besides the default group, `init` makes a second, gloo group for checkpoint writes
(`checkpoint_group()`): a checkpoint written in a background thread runs its collectives
there, never interleaved with the training loop's collectives on the default group.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from slurm.nodelist import expand as nodelist_expand


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ('gpu[03-05,9],cpu1' -> 'gpu03'), by `slurm.nodelist`'s one parser."""
    hosts = nodelist_expand(nodelist)
    if not hosts:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    return hosts[0]


PORT_BASE, PORT_SPAN = 20000, 12000  # 20000-31999: below Linux's ephemeral range (32768-60999)


def port_for_job(job_id: str, environ=os.environ) -> int:
    """The rendezvous port of a Slurm job: PIXELDIFF_MASTER_PORT if set, else one derived from the job id (the same
    after a requeue, which keeps the id; different for jobs that run at the same time unless their ids are 12000
    apart), outside the ephemeral range, so no outgoing connection on the node can hold it already."""
    if environ.get("PIXELDIFF_MASTER_PORT"):
        return int(environ["PIXELDIFF_MASTER_PORT"])
    return PORT_BASE + int(re.sub(r"\D", "", job_id) or 0) % PORT_SPAN


def local_device_index(local_rank: int, visible_gpus: int) -> int:
    """The CUDA device of a task: its local rank when it sees all of the node's GPUs, 0 when the site binds one GPU
    per task (it sees exactly one)."""
    if visible_gpus == 1:
        return 0
    if local_rank >= visible_gpus:
        raise RuntimeError(f"local rank {local_rank} but this task sees {visible_gpus} GPU(s) "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                           f"give each task one GPU, or all of the node's")
    return local_rank


def pick_device(requested: str, env: DistEnv) -> torch.device:
    """cluster.device ('auto', 'cpu', 'cuda') -> this rank's device; on CUDA also made the current device, before
    anything else touches CUDA (NCCL and every `.cuda()` then use the right GPU)."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    index = local_device_index(env.local_rank, torch.cuda.device_count())
    torch.cuda.set_device(index)
    # TF32 for what stays fp32 outside bf16 autocast (the frozen networks' fp32 parts, fp32 matmuls), as
    # tools/bench_step.py measures
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda", index)


def env_from(environ=os.environ) -> DistEnv:
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)),
                       environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", 29500)), "torchrun")
    if int(environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in environ:
        nodes = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "127.0.0.1"
        return DistEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0)),
                       first_host(nodes), port_for_job(environ.get("SLURM_JOB_ID", "0"), environ), "slurm")
    return DistEnv()


def init(env: DistEnv, device: torch.device, timeout_s: float = 600, steady_s: float | None = None) -> None:
    """Join the process group (no-op for one process). `timeout_s`: collectives' timeout while a job starts;
    `steady_s`: once it trains (`set_timeout` switches)."""
    if env.world_size == 1 or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=timeout_s),
                            **({"device_id": device} if device.type == "cuda" else {}))
    global _checkpoint_group, _control_group
    _checkpoint_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    # a gloo group's timeout is fixed when it is made: one control group per phase, chosen by set_timeout
    _control_groups.clear()
    for seconds in dict.fromkeys([timeout_s, steady_s or timeout_s]):
        _control_groups[seconds] = dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
    _control_group = _control_groups[timeout_s]


_checkpoint_group = None
# the step boundary's agreements (host integers): CPU tensors over gloo, so that agreeing never waits for the GPU's
# queued work (on NCCL a device tensor and its .tolist() synchronised the host with the stream at every step)
_control_group = None
_control_groups: dict = {}


def set_timeout(seconds: float) -> None:
    """How long a training collective may wait: long while a job starts or ends, short in steady state (the
    default group on NCCL, and the step boundary's control group). The checkpoint group keeps its start-up
    timeout: a save waits for the slowest rank's write."""
    global _control_group
    if dist.is_initialized() and dist.get_backend() == "nccl":  # on gloo it aborted a rank at exit (torch 2.14)
        dist.set_timeout(timedelta(seconds=seconds))
    _control_group = _control_groups.get(seconds, _control_group)


def checkpoint_group():
    """The process group of checkpoint collectives (None for one process)."""
    return _checkpoint_group if dist.is_initialized() else None


def shutdown() -> None:
    global _checkpoint_group, _control_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _checkpoint_group = _control_group = None
    _control_groups.clear()


def device_mesh(device: torch.device):
    """A 1-D mesh over all ranks (FSDP2 shards parameters along it)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (e.g. the checkpoint all ranks restore from)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_checkpoint_group)
    return box[0]


def all_mean(values: torch.Tensor) -> list[float]:
    """Mean over ranks of a few values (a 1-d tensor on this rank's device), in one collective, in float64."""
    t = values.to(torch.float64)
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return t.tolist()


def agree_max(value):
    """The largest value over ranks, on every rank: how ranks agree at a step boundary to stop (a signal number or
    a stop code) or to take the last job's exit. `value`: an int, or a tuple of ints agreed element-wise in the same
    collective (-> a tuple). Over the gloo control group, on the CPU: no GPU synchronisation."""
    many = isinstance(value, tuple)
    if not dist.is_initialized():
        return value
    t = torch.tensor(list(value) if many else [value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    out = t.tolist()
    return tuple(out) if many else out[0]


def agree_max_later(value):
    """`agree_max(value)` issued now without waiting (gloo runs it in the background): -> a function that gives
    the result, waiting if it is not there yet. The step boundary issues its agreement after a step's work is
    queued and reads it before the next step, so the round trip overlaps the host's logging, saving and the GPU's
    queued work. Every rank must call the returned function, once, before the group's next collective is read."""
    many = isinstance(value, tuple)
    if not dist.is_initialized():
        return lambda: value
    t = torch.tensor(list(value) if many else [value], dtype=torch.int64)
    work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group, async_op=True)

    def result():
        work.wait()
        out = t.tolist()
        return tuple(out) if many else out[0]
    return result


def gather_to_main(obj):
    """Every rank's `obj` (small, picklable: e.g. a CPU tensor) as a list on rank 0, None elsewhere (the default group:
    the checkpoint group may be busy with a background save)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
