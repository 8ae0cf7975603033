"""All torch.distributed setup, from the environment, with a single-process fallback.

Recognised launchers, in order:
- torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- Slurm (srun, one task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is
  the first host of SLURM_JOB_NODELIST and the port is derived from SLURM_JOB_ID, so it is
  the same after a requeue (the job id is kept) and differs between jobs sharing a node;
- otherwise one process.
NCCL on GPUs, gloo on the CPU. Collectives time out (`timeout_s`), so a rank that dies
makes the others fail in bounded time instead of hanging until the Slurm limit.

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


def port_for_job(job_id: str) -> int:
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def env_from(environ=os.environ) -> DistEnv:
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)),
                       environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", 29500)), "torchrun")
    if int(environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in environ:
        nodes = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "127.0.0.1"
        return DistEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0)),
                       first_host(nodes), port_for_job(environ.get("SLURM_JOB_ID", "0")), "slurm")
    return DistEnv()


def init(env: DistEnv, device: torch.device, timeout_s: float = 600) -> None:
    """Join the process group (no-op for one process)."""
    if env.world_size == 1 or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=timeout_s),
                            **({"device_id": device} if device.type == "cuda" else {}))
    global _checkpoint_group
    _checkpoint_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


_checkpoint_group = None


def checkpoint_group():
    """The process group of checkpoint collectives (None for one process)."""
    return _checkpoint_group if dist.is_initialized() else None


def shutdown() -> None:
    global _checkpoint_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _checkpoint_group = None


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


def agree_max(value: int, device: torch.device) -> int:
    """The largest value over ranks, on every rank: how ranks agree at a step boundary to stop (a signal number or
    a stop code) or to take the last job's exit."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
