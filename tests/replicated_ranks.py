"""Run by torchrun from tests/test_parts.py: DDP-replicated model, EMA and optimizer saved by
CheckpointManager(replicated=True) on 2 gloo ranks, then restored into fresh objects on the same ranks."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixeldiff import checkpoint, distributed  # noqa: E402
from pixeldiff.data import SyntheticSource  # noqa: E402
from pixeldiff.ema import EMA  # noqa: E402


class Train:
    step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, s):
        self.step = s["step"]


def build(seed: int, root: Path):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8), torch.nn.Linear(8, 8))
    ema = EMA(model, 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    mgr = checkpoint.CheckpointManager(
        root, keep=2, async_save=True, rank=dist.get_rank(), world=dist.get_world_size(),
        sharded={"model": checkpoint.ModelState(model), "ema": ema, "optimizer": checkpoint.ModelState(model, opt)},
        train=Train(), data=SyntheticSource(0), files=dict, on_saved=lambda r: None,
        process_group=distributed.checkpoint_group(), barrier=distributed.barrier,
        broadcast=distributed.broadcast_object, log=lambda s: None, replicated=True, device=torch.device("cpu"))
    return model, ema, opt, mgr


def main(root: str) -> None:
    env = distributed.env_from()
    distributed.init(env, torch.device("cpu"), timeout_s=60)
    root = Path(root)
    model, ema, opt, mgr = build(0, root)
    model(torch.ones(2, 64)).sum().backward()
    opt.step()
    ema.update(model, 1)
    mgr.save(1, final=True)
    mgr.close()
    fresh, fresh_ema, fresh_opt, mgr2 = build(1 + dist.get_rank(), root)  # different weights on each rank
    assert mgr2.restore() is not None
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ema.module.parameters(), fresh_ema.module.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict(), fresh_opt.state_dict()
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), (i, k)
    assert sb["param_groups"][0]["lr"] == 0.1
    print(f"rank {dist.get_rank()} restored", flush=True)
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    from pixeldiff.process import leave

    main(sys.argv[1])
    leave(0)  # as the trainer's ranks leave: the interpreter's teardown can abort in gloo's threads (SIGABRT)
