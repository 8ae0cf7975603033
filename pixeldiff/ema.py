"""The exponential moving average of the model's weights: its update, its state dict, and the whole
module gathered for sampling.

The EMA is a frozen copy of the single-device model, without REPA's projector (`model.repa`):
only training runs it. Under FSDP2 its parameters are made copies
of the model's shards (`shard_like`), so each rank keeps and updates only its shard (a local
operation) and checkpoints it like the model; sampling gathers the full state first.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (the same storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


TRAINING_ONLY = "repa"  # the submodule left out of the EMA


def averaged(model: torch.nn.Module):
    """(name, parameter) of `model` that the EMA follows."""
    return [(n, p) for n, p in model.named_parameters() if not n.startswith(TRAINING_ONLY + ".")]


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, every: int = 1):
        self.module = copy.deepcopy(model).requires_grad_(False)
        if getattr(self.module, TRAINING_ONLY, None) is not None:
            setattr(self.module, TRAINING_ONLY, None)
        self.decay, self.every = decay, every
        self.sharded = False

    def shard_like(self, model: torch.nn.Module) -> None:
        """Make the EMA's parameters copies of `model`'s FSDP2 shards (DTensors), without FSDP hooks: the EMA
        never runs forward sharded."""
        for name, p in averaged(model):
            owner, _, leaf = name.rpartition(".")
            parent = self.module.get_submodule(owner) if owner else self.module
            setattr(parent, leaf, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
        self.sharded = True

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """After optimizer step `step`: every `every` steps, ema <- ema + (1 - decay) (model - ema)."""
        if step % self.every:
            return
        ema = [_local(e) for e in self.module.parameters()]
        live = [_local(p.detach()) for _, p in averaged(model)]
        torch._foreach_lerp_(ema, live, 1 - self.decay)

    def state_dict(self) -> dict:
        """Keyed by parameter name: this rank's shards (FSDP) or whole tensors."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module)

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)

    def whole(self, build: Callable[[], torch.nn.Module], device: torch.device) -> torch.nn.Module:
        """The EMA as one whole module on every rank (for sampling). Sharded, every rank must call this: the gather
        is a collective. `build` makes an empty single-device model to load the gathered weights into."""
        if not self.sharded:
            return self.module
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
        whole = build()
        whole.load_state_dict(full)
        return whole.to(device)
