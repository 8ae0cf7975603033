"""Run by tests/test_muon.py, in one process or by torchrun on gloo ranks: the test model under `parallel` (none, ddp,
fsdp), the run's Muon + AdamW, fed the same whole gradients on every rank for a few steps (one of them skipped through
`found_inf`); rank 0 writes the whole weights and Muon momentum buffers to OUT, and how many matrices each rank
orthogonalised.

    python tests/muon_ranks.py none|ddp|fsdp OUT
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixeldiff import distributed, optim  # noqa: E402
from pixeldiff.config import ClusterConfig, OptimizerConfig  # noqa: E402
from pixeldiff.ema import EMA  # noqa: E402
from pixeldiff.model import PixelDiT  # noqa: E402
from pixeldiff.optim import MUON_STATE, build_optimizer  # noqa: E402
from pixeldiff.parallel import parallelize  # noqa: E402
from pixeldiff.presets import ModelConfig  # noqa: E402

STEPS, SKIPPED = 4, 2  # step 2 (0-based) has found_inf = 1


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def count_orthogonalisations() -> list:
    calls, ns = [], optim._zeropower_via_newtonschulz

    def counted(*args):
        calls.append(tuple(args[0].shape))
        return ns(*args)

    optim._zeropower_via_newtonschulz = counted
    return calls


def main(parallel: str, out: str) -> None:
    calls = count_orthogonalisations()
    env = distributed.env_from()
    device = torch.device("cpu")
    distributed.init(env, device)
    torch.manual_seed(0)
    model = PixelDiT(ModelConfig(preset="test"), 16)
    par = parallelize(model, EMA(model, 0.9), ClusterConfig(parallel="ddp" if parallel == "none" else parallel),
                      env.world_size, device)
    opt = build_optimizer(par.model, OptimizerConfig(name="muon", lr=1e-3, muon_lr=1e-2, muon_weight_decay=0.1))
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        for p in par.model.parameters():  # the same whole gradient on every rank, this rank's part of it
            full = torch.randn(p.shape, generator=g)
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            p.grad = full if step != SKIPPED else full * float("nan")
        opt.found_inf = torch.tensor(float(step == SKIPPED))
        opt.step()
        opt.zero_grad(set_to_none=True)
    muon = opt.parts[0]
    names = {id(p): n for n, p in par.model.named_parameters()}
    state = {"weights": {n: whole(p) for n, p in par.model.named_parameters()},
             "momentum": {names[id(p)]: whole(s[MUON_STATE]) for p, s in muon.state.items()}}
    every = [None] * env.world_size
    if dist.is_initialized():
        dist.all_gather_object(every, len(calls))
    state["orthogonalised"] = every if dist.is_initialized() else [len(calls)]  # matrices, per rank
    if env.rank == 0:
        torch.save(state, out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    from pixeldiff.process import leave

    main(sys.argv[1], sys.argv[2])
    leave(0)  # as the trainer's ranks leave: the interpreter's teardown can abort in gloo's threads (SIGABRT)
