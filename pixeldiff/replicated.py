"""A replicated (DDP) checkpoint state dealt over the ranks: each rank stages and writes only its share, and a
restore reads each share once and broadcasts it.

Under DDP every rank holds the whole model, EMA and optimizer state. Handed to DCP whole, every rank
would copy all of it to CPU memory for a background save (about 19 GB per rank, 150 GB per node of 8,
for the 1.2B-parameter model), and on restore every rank would read the whole checkpoint from storage.
Instead the tensors are dealt to the ranks by size, largest first to the least loaded rank; the deal
depends only on the names and sizes, so every rank computes the same one, on any number of ranks.
Values that are not tensors (the optimizer's param_groups) belong to rank 0. DCP then saves a
checkpoint whose metadata names every tensor once, readable by any layout (one process, FSDP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Path = tuple  # a leaf's keys from the top of the nested state dict


def flatten(state: dict, prefix: Path = ()) -> dict[Path, object]:
    """Nested dicts -> {keys path: leaf}; a leaf is anything that is not a dict (a tensor, a list, a number)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(leaves: dict[Path, object]) -> dict:
    out: dict = {}
    for path, v in leaves.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def deal(leaves: dict[Path, object], world: int) -> dict[Path, int]:
    """Owner rank of every leaf: tensors by size, largest first, to the rank with the fewest bytes so far (ties by
    rank); everything else to rank 0."""
    load = [0] * world
    owners = {p: 0 for p, v in leaves.items() if not torch.is_tensor(v)}
    tensors = sorted((p for p, v in leaves.items() if torch.is_tensor(v)),
                     key=lambda p: (-leaves[p].numel() * leaves[p].element_size(), str(p)))
    for p in tensors:
        r = min(range(world), key=lambda i: (load[i], i))
        owners[p] = r
        load[r] += leaves[p].numel() * leaves[p].element_size()
    return owners


def share(state: dict, rank: int, world: int) -> dict:
    """The part of `state` that `rank` saves and reads (the same tensor objects: loading into it fills `state`)."""
    leaves = flatten(state)
    owners = deal(leaves, world)
    return unflatten({p: v for p, v in leaves.items() if owners[p] == rank})


def broadcast_shares(state: dict, mine: dict, rank: int, world: int, device: torch.device) -> dict:
    """After each rank loaded its share (`mine`, from `share(state, ...)`): every rank gets every leaf from its owner.
    -> the whole state (the tensors of `state`, filled in place; the other leaves from rank 0)."""
    leaves, own = flatten(state), flatten(mine)
    owners = deal(leaves, world)
    box = [{p: v for p, v in own.items() if not torch.is_tensor(v)} if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    out = dict(leaves)
    out.update(box[0])
    for p in sorted((p for p in leaves if torch.is_tensor(leaves[p])), key=str):
        t = leaves[p]
        if owners[p] == rank and own[p] is not t:
            t.copy_(own[p])  # a loader that replaced the tensor instead of filling it
        moved = t if t.device.type == device.type else t.to(device)  # NCCL broadcasts device tensors only
        dist.broadcast(moved, src=owners[p])
        if moved is not t:
            t.copy_(moved)
    return unflatten(out)
