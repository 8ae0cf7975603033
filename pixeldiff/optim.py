"""The optimizer: fused AdamW for every parameter (`optimizer.name: adamw`), or Muon for the 2-D weight matrices of
the transformer blocks and AdamW for all the rest (`muon`); each group's learning rate under the schedule; and the
optimizer's checkpoint part, which refuses a checkpoint written by the other optimizer.

Muon is `torch.optim.Muon` (its parameter groups, defaults, state layout and Newton-Schulz iteration), stepped here
so that two promises of the trainer hold:

- A skipped step (`found_inf`, the divergence guard's 0-d tensor) changes nothing: not the weights, not the
  momentum buffers, and it costs no host synchronisation. The step runs as usual, on a gradient replaced by the
  momentum buffer itself (so the buffer's lerp towards it is the identity), and the weight takes the new value only
  where `found_inf` is 0 (`torch.where` on the device). The fused AdamW honours the same tensor by itself.
- The orthogonalisation needs whole matrices and its FLOPs are large (JiT-32: 47 TFLOP per step, as much as a
  GPU's 32 images of training at 512 px; tools/bench_muon.py), so each matrix is orthogonalised once, by one rank
  (`owners`: whole matrices dealt out, balanced by FLOPs), and sent to the others. Under FSDP2 each rank holds a
  row shard of every matrix: the momentum update (bf16, what Newton-Schulz works in) is all-gathered per matrix,
  its owner orthogonalises it, and scatters the rows back. Under DDP every rank has the whole matrices (the same
  reduced gradients): the owner orthogonalises and broadcasts it. The result is the one-process update, to the
  bit, on every world size (the same bf16 matrix goes in), for one bf16 all-gather (FSDP) and one scatter or
  broadcast of each block matrix per step.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from pixeldiff import checkpoint
from pixeldiff.config import OptimizerConfig

BLOCKS = "blocks."  # the transformer blocks' parameter names start with this (model.blocks)
MUON_STATE = "momentum_buffer"  # torch.optim.Muon's per-parameter state; AdamW's is exp_avg, exp_avg_sq, step


def split_params(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]]]:
    """-> (Muon's, AdamW's) named trainable parameters, in model order: Muon gets the 2-D weight matrices of the
    transformer blocks; AdamW every other one (embeddings, the patch bottleneck, the final layer, norms, biases, and
    anything outside `model.blocks`, e.g. a REPA projector)."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if name.startswith(BLOCKS) and p.ndim == 2 else adamw).append((name, p))
    return muon, adamw


def _whole(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole matrix of which `t` is this rank's part laid out like parameter `like` (a DTensor under FSDP2)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(like, DTensor):
        return t
    return DTensor.from_local(t, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()).full_tensor()


def _own_part(full: torch.Tensor, like: torch.Tensor, src: int | None) -> torch.Tensor:
    """This rank's part of `full` laid out like parameter `like`: as computed here (`src` None), or as rank `src`
    computed it (sent from there: a scatter of the rows under FSDP2, a broadcast of the whole matrix under DDP)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=src).to_local()
    if src is not None:
        dist.broadcast(full, src=src)
    return full


def owners(shapes: list[tuple[int, int]], world: int) -> list[int]:
    """The rank that orthogonalises each matrix: the costliest first, each to the least loaded rank so far (by
    Newton-Schulz FLOPs, ~ short side^2 x long side). The same answer on every rank."""
    load, out = [0.0] * world, [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-min(shapes[i]) ** 2 * max(shapes[i]), i)):
        out[i] = min(range(world), key=lambda r: (load[r], r))
        load[out[i]] += min(shapes[i]) ** 2 * max(shapes[i])
    return out


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class GuardedMuon(torch.optim.Muon):
    """`torch.optim.Muon` that honours a `found_inf` attribute (a 0-d tensor; 1 = leave everything untouched) without a
    host sync, and orthogonalises each matrix once over all ranks (`owners`) and whole (FSDP2 shards gathered). With
    `found_inf` unset or 0, in one process, its step is torch's to the bit (tests/test_muon.py). Every rank must step
    the same matrices (all have gradients, as after any backward of the whole model)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf.to(torch.bool)
        rank, world = _world()
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            owner = owners([tuple(p.shape) for p in params], world)
            for p, own in zip(params, owner):
                state = self.state[p]
                if MUON_STATE not in state:
                    state[MUON_STATE] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                w, buf, grad = _local(p), _local(state[MUON_STATE]), _local(p.grad)
                if skip is not None:  # a skipped step: the buffer's lerp towards itself leaves it exactly as it was
                    grad = torch.where(skip, buf, grad)
                buf.lerp_(grad, 1 - mu)
                update = grad.lerp(buf, mu) if group["nesterov"] else buf
                whole = _whole(update.bfloat16(), p)  # Newton-Schulz casts to bf16 first: gather half the bytes
                if own == rank:
                    whole = _zeropower_via_newtonschulz(whole, group["ns_coefficients"], group["ns_steps"], group["eps"])
                ortho = _own_part(whole.contiguous(), p, own if world > 1 else None)
                step_lr = _adjust_lr(lr, group["adjust_lr_fn"], p.shape)  # the whole matrix's shape
                if skip is None:
                    w.mul_(1 - lr * wd).add_(ortho, alpha=-step_lr)
                else:
                    w.copy_(torch.where(skip, w, w.mul(1 - lr * wd).add_(ortho, alpha=-step_lr)))
        return loss


class Optimizers:
    """The run's torch optimizers, stepped as one: `step`, `zero_grad`, `found_inf` (set on each), `param_groups`
    (all of them), and each group's base learning rate for the schedule. Iterating yields the torch optimizers, which
    is what torch.distributed.checkpoint's state-dict functions take (one state dict keyed by parameter name)."""

    def __init__(self, parts: list[torch.optim.Optimizer], name: str):
        self.parts, self.name = parts, name
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in parts]  # by position: loading replaces the dicts
        self._found_inf = None

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.parts)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts for g in o.param_groups]

    @property
    def found_inf(self) -> torch.Tensor | None:
        return self._found_inf

    @found_inf.setter
    def found_inf(self, value: torch.Tensor | None) -> None:
        self._found_inf = value
        for o in self.parts:
            o.found_inf = value

    def set_lr(self, lr_of: Callable[[float], float]) -> None:
        """Every group's learning rate = `lr_of(its base learning rate)` (the schedule, each group relative to its own)."""
        for o, bases in zip(self.parts, self.base_lrs):
            for g, base in zip(o.param_groups, bases):
                g["lr"] = lr_of(base)

    def step(self) -> None:
        for o in self.parts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> Optimizers:
    """The optimizer(s) `cfg` names over `model`'s parameters (after parallel wrapping: FSDP2 shards them in place)."""
    def adamw(params):
        # fused: one kernel, and it honours `found_inf` (a skipped step leaves weights and moments alone)
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, fused=True)

    if cfg.name == "adamw":
        return Optimizers([adamw(model.parameters())], "adamw")
    muon, rest = split_params(model)
    parts = [GuardedMuon([p for _, p in muon], lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay,
                         momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps,
                         adjust_lr_fn=cfg.muon_adjust_lr)]
    if rest:
        parts.append(adamw([p for _, p in rest]))
    return Optimizers(parts, "muon")


# ------------------------------------------------------------------ the checkpoint part


def checkpoint_optimizer(path, storage_options: dict | None = None) -> str | None:
    """-> 'muon' or 'adamw': which optimizer wrote the checkpoint at `path`, from the keys its shards hold (Muon
    keeps a momentum buffer per matrix, AdamW two moments per parameter); None when its metadata cannot be read (the
    load says why)."""
    try:
        meta = checkpoint._reader(path, storage_options).read_metadata()
    except (OSError, ValueError, EOFError, RuntimeError):
        return None
    keys = meta.state_dict_metadata
    return "muon" if any(k.startswith("optimizer.") and k.endswith("." + MUON_STATE) for k in keys) else "adamw"


class OptimizerState(checkpoint.ModelState):
    """The optimizer as a checkpoint part (`ModelState(model, optimizers)`), which first checks that a checkpoint to be
    restored was written by the same optimizer: AdamW's moments cannot become Muon's momentum, nor the reverse."""

    def __init__(self, module: torch.nn.Module, optimizer: Optimizers):
        super().__init__(module, optimizer)

    def check_checkpoint(self, path, storage_options: dict | None = None) -> None:
        have, want = checkpoint_optimizer(path, storage_options), self.optimizer.name
        if have is not None and have != want:
            raise checkpoint.CheckpointError(
                f"{path} holds {have} optimizer state, but the manifest says optimizer.name: {want}; the optimizer "
                f"cannot be switched in the middle of a run. Set optimizer.name back to {have} to resume it, or start "
                f"a new run (another name, or another checkpoint.dir) to train with {want}")
