"""Data parallelism for the single-device model: the one place it is wrapped (DDP or FSDP2, then
compile), the switch that turns the gradient reduction off between accumulated micro-batches,
and gradient clipping that also works on sharded gradients.

The model code never knows it runs on many ranks; `parallelize` returns what the loop calls.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from pixeldiff import distributed
from pixeldiff.config import ClusterConfig
from pixeldiff.ema import EMA


@dataclass
class Parallel:
    net: torch.nn.Module  # what the loop calls: the model, wrapped and/or compiled
    model: torch.nn.Module  # the single-device module (FSDP2 shards it in place): parameters, state dicts
    ddp: torch.nn.parallel.DistributedDataParallel | None = None
    fsdp: bool = False

    def reduce_gradients(self, enabled: bool):
        """Context for one micro-batch's backward: `enabled=False` keeps its gradients local (accumulated on this
        rank); the last micro-batch of a step runs with `enabled=True` and reduces the sum over ranks."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(enabled)
            return nullcontext()
        return nullcontext() if enabled or self.ddp is None else self.ddp.no_sync()


def parallelize(model: torch.nn.Module, ema: EMA, cluster: ClusterConfig, world_size: int,
                device: torch.device, unused_parameters: bool = False) -> Parallel:
    """Wrap `model` for `world_size` ranks as `cluster.parallel` says (FSDP2 shards each block, then the rest,
    and the EMA alike), then compile when `cluster.compile`. `unused_parameters`: some steps leave parameters
    without gradients (REPA's projector once REPA is off), which DDP must look for."""
    ddp, fsdp = None, False
    if world_size > 1 and cluster.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = distributed.device_mesh(device)
        # bf16_comm: parameters gathered (and the forward run) in bf16, half the bytes; gradients reduce-scattered in
        # fp32 into the fp32 shards the optimizer steps; the output back in fp32 for the losses. The root's inputs are
        # not cast: t stays fp32 for the timestep embedding (the model casts x and text to its weights' dtype)
        bf16 = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cluster.bf16_comm else {}
        for block in model.blocks:  # each block's parameters are gathered just before it runs
            fully_shard(block, mesh=mesh, mp_policy=MixedPrecisionPolicy(**bf16))
        root = MixedPrecisionPolicy(**bf16, output_dtype=torch.float32, cast_forward_inputs=False) if bf16 \
            else MixedPrecisionPolicy()
        fully_shard(model, mesh=mesh, mp_policy=root)  # the rest: embeddings, final layer
        ema.shard_like(model)
        fsdp = True
    elif world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused_parameters)
        if cluster.bf16_comm:  # gradients all-reduced in bf16 (half the bytes), then back to fp32 for the optimizer
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    net = ddp or model
    if cluster.compile:
        # static shapes: the 512 -> 1024 px switch compiles once more instead of recompiling with symbolic sizes;
        # the compiled graphs persist in TORCHINDUCTOR_CACHE_DIR (RUN_DIR/compile-cache: pixeldiff/train.py)
        # graphs: resolutions x trimmed text lengths (4, data.text.trim) x aspect buckets, beyond dynamo's default
        # limit of 8 recompiles (past it, silently eager)
        import torch._dynamo as dynamo  # (not `import torch._dynamo`: that would make `torch` local here)

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(64, getattr(dynamo.config, knob)))
        net = torch.compile(net, dynamic=False)
    return Parallel(net, model, ddp, fsdp)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` (inf: measure only). -> the norm before clipping, a 0-d tensor on
    the device (also with sharded DTensor gradients, whose partial norms are reduced over ranks)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm
