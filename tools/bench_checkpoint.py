"""Benchmark checkpoint save and load: sharded DCP (synchronous and asynchronous) vs a plain torch.save.

    python tools/bench_checkpoint.py                       # tiny preset and a ~106M-parameter model, CPU, /tmp
    python tools/bench_checkpoint.py --model tiny --repeat 5 --dir /scratch/bench

For each model the state is what a job saves: model, EMA and AdamW state (after one step). One
process, so DCP writes one shard file. Rows, measured in the same run:
- `torch.save`: the baseline, one file of the whole state dict, fsynced (the pre-DCP format);
- `dcp sync`: `checkpoint.Saver` with the full protocol (train state file, shards, fsync, rename, marker);
- `dcp async`: the same in the background: `blocked` is the time the training loop waits (CPU copy of
  the state), `write` the time until the marker is written;
- loads: `torch.load` + `load_state_dict` vs DCP `load_into` + `set_state_dict` (what a resume does).
Times are medians over --repeat runs; ratios are against the torch.save / torch.load baseline.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict  # noqa: E402

from pixeldiff import checkpoint  # noqa: E402
from pixeldiff.model import ModelConfig, PixelDiT  # noqa: E402

MODELS = {
    "tiny": ModelConfig(preset="tiny"),
    "106M": ModelConfig(preset="B/32", depth=8),  # width 768, 8 blocks
}


def build(cfg: ModelConfig):
    torch.manual_seed(0)
    model = PixelDiT(cfg, 64)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, ema, opt


def state_of(model, ema, opt) -> dict:
    m, o = get_state_dict(model, opt)
    return {"model": m, "ema": get_model_state_dict(ema), "optimizer": o}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_model(name: str, cfg: ModelConfig, root: Path, repeat: int) -> dict:
    model, ema, opt = build(cfg)
    files = {"train_state-rank00000.pt": checkpoint.torch_bytes({"step": 1})}
    out = {"model": name, "params": model.num_params()}
    base, sync, blocked, write, tload, dload = [], [], [], [], [], []
    for i in range(repeat):
        plain = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict()}
        path = root / f"plain-{i}.pt"

        def torch_save():
            with open(path, "wb") as f:
                torch.save(plain, f)
                f.flush()
                os.fsync(f.fileno())

        base.append(timed(torch_save))
        out["bytes"] = path.stat().st_size
        tload.append(timed(lambda: (lambda s: (model.load_state_dict(s["model"]), ema.load_state_dict(s["ema"]),
                                               opt.load_state_dict(s["optimizer"])))(torch.load(path, weights_only=True))))
        path.unlink()

        saver = checkpoint.Saver(root / "dcp", keep=2, rank=0)
        sync.append(timed(lambda: saver.save(2 * i + 1, state_of(model, ema, opt), files, background=False)))
        saver.wait()
        t0 = time.perf_counter()
        saver.save(2 * i + 2, state_of(model, ema, opt), files, background=True)
        blocked.append(time.perf_counter() - t0)
        (record,) = saver.wait()
        write.append(record["seconds_write"])
        saver.close()

        def dcp_load():
            parts = state_of(model, ema, opt)
            checkpoint.load_into(checkpoint.latest_valid(root / "dcp", log=lambda _: None), parts)
            set_state_dict(model, opt, model_state_dict=parts["model"], optim_state_dict=parts["optimizer"])
            ema.load_state_dict(parts["ema"])

        dload.append(timed(dcp_load))
    med = statistics.median
    out.update(torch_save=med(base), dcp_sync=med(sync), async_blocked=med(blocked), async_write=med(write),
               torch_load=med(tload), dcp_load=med(dload))
    shutil.rmtree(root / "dcp", ignore_errors=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", choices=list(MODELS), help="default: all")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench-ckpt-"))
    rows = []
    try:
        for name in args.model or list(MODELS):
            root = base / name
            root.mkdir(parents=True, exist_ok=True)
            rows.append(bench_model(name, MODELS[name], root, args.repeat))
            print(f"measured {name}", file=sys.stderr, flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)

    def r(x, b):
        return f"{x:.3f} s ({x / b:.2f}x)"

    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, median of {args.repeat}; ratios vs torch.save / torch.load")
    print("| model | params | state MB | torch.save | dcp sync save | dcp async: loop blocked | dcp async: write | torch.load | dcp load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['model']} | {x['params'] / 1e6:.1f}M | {x['bytes'] / 2**20:.0f} | {x['torch_save']:.3f} s | "
              f"{r(x['dcp_sync'], x['torch_save'])} | {r(x['async_blocked'], x['torch_save'])} | "
              f"{r(x['async_write'], x['torch_save'])} | {x['torch_load']:.3f} s | {r(x['dcp_load'], x['torch_load'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
