"""Run by torchrun from tests/test_distributed.py: FSDP2 with cluster.bf16_comm on 2 gloo ranks. Records the dtypes
the model sees in one forward and backward: t fp32 at the timestep embedding, the blocks' parameters gathered in
bf16, the output fp32, the gradients fp32 shards."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixeldiff import distributed  # noqa: E402
from pixeldiff.config import ClusterConfig  # noqa: E402
from pixeldiff.ema import EMA  # noqa: E402
from pixeldiff.model import ModelConfig, PixelDiT  # noqa: E402
from pixeldiff.parallel import parallelize  # noqa: E402


def main() -> None:
    env = distributed.env_from()
    distributed.init(env, torch.device("cpu"), timeout_s=60)
    torch.manual_seed(0)
    model = PixelDiT(ModelConfig(preset="test"), text_dim=16)
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = [a.dtype for a in args if torch.is_tensor(a)]
            seen[name + ".weight"] = next(module.parameters()).dtype
        return hook

    model.t_embed.register_forward_pre_hook(record("t_embed"))
    model.blocks[0].register_forward_pre_hook(record("block0"))
    par = parallelize(model, EMA(model, 0.9), ClusterConfig(backend="local", device="cpu", parallel="fsdp",
                                                            bf16_comm=True), env.world_size, torch.device("cpu"))
    t = torch.rand(2)
    seen["t_in"] = t.dtype
    t_pre = []
    model.register_forward_pre_hook(lambda m, args: t_pre.append(args[1].dtype))
    out = par.net(torch.randn(2, 3, 16, 16), t, torch.randn(2, 4, 16), torch.ones(2, 4, dtype=torch.bool))
    out.float().pow(2).mean().backward()
    grads = {p.grad.dtype for p in model.parameters() if p.grad is not None}
    print(f"rank {env.rank} dtypes t_in={seen['t_in']} root_t={t_pre[0]} t_embed_weight={seen['t_embed.weight']} "
          f"block0_in={seen['block0'][0]} block0_weight={seen['block0.weight']} out={out.dtype} grads={sorted(map(str, grads))}",
          flush=True)
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    from pixeldiff.process import leave

    main()
    leave(0)
