"""Host memory of an asynchronous checkpoint save under DDP: every rank staging the whole state vs its share.

    python tools/bench_save_memory.py                 # 1 and 2 gloo ranks on this machine, the ~106M model
    python tools/bench_save_memory.py --ranks 4 --model tiny

For each number of ranks the script runs the ranks twice with torchrun, and in each run every rank builds
the model, its EMA and AdamW state (after one step), then makes one background save through
`checkpoint.CheckpointManager` — once handing DCP the whole replicated state (what every rank did
before `pixeldiff/replicated.py`), once its share. Measured per rank: the growth of its peak resident
memory (VmHWM, reset just before the save) from the save's start until the save is complete; the
node's figure is the sum over its ranks. Same run, same machine: the ratio is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {"tiny": {"preset": "tiny"}, "106M": {"preset": "B/32", "depth": 8}}


def vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rank_main(model_name: str, root: str, mode: str) -> None:
    import torch

    from pixeldiff import checkpoint, distributed
    from pixeldiff.data import SyntheticSource
    from pixeldiff.ema import EMA
    from pixeldiff.model import ModelConfig, PixelDiT

    env = distributed.env_from()
    distributed.init(env, torch.device("cpu"), timeout_s=600)
    torch.manual_seed(0)
    model = PixelDiT(ModelConfig(**MODELS[model_name]), 64)
    ema = EMA(model, 0.999)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()

    class Train:
        def state_dict(self):
            return {"step": 1}

    mgr = checkpoint.CheckpointManager(
        Path(root), keep=2, async_save=True, rank=env.rank, world=env.world_size,
        sharded={"model": checkpoint.ModelState(model), "ema": ema, "optimizer": checkpoint.ModelState(model, opt)},
        train=Train(), data=SyntheticSource(0), files=dict, on_saved=lambda r: None,
        process_group=distributed.checkpoint_group(), barrier=distributed.barrier,
        broadcast=distributed.broadcast_object, log=lambda s: None, replicated=(mode == "share"),
        device=torch.device("cpu"))
    state_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *ema.module.parameters()]) + sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    distributed.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
    before = vm("VmRSS")
    mgr.save(1)  # in the background: staged now, written by a thread
    mgr.save(1, final=True)  # wait for it
    peak = vm("VmHWM")
    mgr.close()
    rows = distributed.gather_to_main({"rank": env.rank, "growth": peak - before, "state": state_bytes})
    if rows is not None:
        print("RESULT " + json.dumps(rows), flush=True)
    distributed.barrier()
    distributed.shutdown()


def run(ranks: int, model: str, mode: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as root:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                              "--master_addr=127.0.0.1", f"--master_port={port}", __file__, "--rank-main", model,
                              root, mode], env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{ranks} rank(s), {mode}: failed\n{out.stdout}\n{out.stderr}")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--rank-main":
        rank_main(*sys.argv[2:5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, action="append", help="default: 1 and 2")
    ap.add_argument("--model", choices=list(MODELS), default="106M")
    args = ap.parse_args(argv)
    print(f"CPU: {os.cpu_count()} cores; model {args.model}; one background save per run; MB = 2^20 bytes")
    print("| ranks | staged by each rank | state per rank MB | peak growth per rank MB (max) | node total MB | vs whole |")
    print("|---|---|---|---|---|---|")
    for n in args.ranks or [1, 2]:
        base = None
        for mode in ("whole", "share"):
            rows = run(n, args.model, mode)
            growth = [r["growth"] / 2**20 for r in rows]
            total = sum(growth)
            base = base or total
            print(f"| {n} | {mode} | {rows[0]['state'] / 2**20:.0f} | {max(growth):.0f} | {total:.0f} | "
                  f"{total / base:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
