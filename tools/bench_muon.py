"""What Muon costs per training step against AdamW (the baseline), measured in one process.

    python tools/bench_muon.py --preset tiny --res 32:32 --res 64:32          # CPU, the dry run's model
    python tools/bench_muon.py --preset JiT-32 --res 512:32 --text-len 256 --text-dim 2304 --trials 10
    python tools/bench_muon.py --preset JiT-32 --res 512:32 --res 1024:16 --text-len 256 --text-dim 2304 --flops-only

Two copies of the same model train side by side, one with `optimizer.name: adamw`, one with `muon`
(pixeldiff/optim.py), their steps interleaved (AdamW, Muon, AdamW, ...) so that load from other
processes falls on both alike. Each row is the median over the trials of a full step (x-prediction
loss, backward, clip, optimizer; bf16 autocast on GPU) and of the optimizer step alone, and the
Muon / AdamW ratio of each. It then prints, for the preset, the Newton-Schulz FLOPs of one step
(each matrix is orthogonalised by one rank, the matrices dealt out over --gpus ranks) against the
model's training FLOPs per GPU per step: an estimate of the cost on GPUs, not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pixeldiff.config import ObjectiveConfig, OptimizerConfig  # noqa: E402
from pixeldiff.model import ModelConfig, PixelDiT  # noqa: E402
from pixeldiff.objective import XPrediction  # noqa: E402
from pixeldiff.optim import build_optimizer, owners, split_params  # noqa: E402


def newton_schulz_flops(shapes, steps: int = 5) -> float:
    """Matmul FLOPs of `steps` quintic Newton-Schulz iterations on each (rows, cols) matrix (torch's Muon: on the
    short side, m <= n: X X^T (2 m^2 n), A A (2 m^3), B X (2 m^2 n) per iteration)."""
    total = 0.0
    for r, c in shapes:
        m, n = min(r, c), max(r, c)
        total += steps * (4 * m * m * n + 2 * m ** 3)
    return total


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--res", action="append", default=None, help="RESOLUTION:BATCH, repeatable")
    ap.add_argument("--text-len", type=int, default=8)
    ap.add_argument("--text-dim", type=int, default=64)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gpus", type=int, default=32, help="for the FLOPs estimate (speedrun: 32)")
    ap.add_argument("--flops-only", action="store_true", help="only the FLOPs estimate (no steps run)")
    args = ap.parse_args(argv)
    pairs = [tuple(int(v) for v in r.split(":")) for r in (args.res or ["32:32", "64:32"])]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; preset {args.preset}" +
          ("" if args.flops_only else f"; median of {args.trials} interleaved steps each"), flush=True)
    if not args.flops_only:
        measure(args, pairs, device, autocast)
    estimate(args, pairs)


def measure(args, pairs, device, autocast) -> None:
    torch.manual_seed(0)
    base = PixelDiT(ModelConfig(args.preset), args.text_dim).to(device)
    models = {"adamw": base, "muon": copy.deepcopy(base)}
    opts = {k: build_optimizer(m, OptimizerConfig(name=k)) for k, m in models.items()}
    objective = XPrediction(ObjectiveConfig(), torch.zeros(args.text_len, args.text_dim, device=device),
                            torch.zeros(args.text_len, dtype=torch.bool, device=device))
    header = f"{'res':>5}{'batch':>6}{'AdamW step s':>14}{'Muon step s':>13}{'Muon/AdamW':>12}" \
             f"{'AdamW opt ms':>14}{'Muon opt ms':>13}{'opt ratio':>11}"
    print(header)
    print("-" * len(header), flush=True)
    for res, batch in pairs:
        g = torch.Generator(device=device).manual_seed(0)
        x0 = torch.rand(batch, 3, res, res, generator=g, device=device).mul(2).sub(1)
        text = torch.randn(batch, args.text_len, args.text_dim, generator=g, device=device)
        mask = torch.ones(batch, args.text_len, dtype=torch.bool, device=device)
        times = {k: ([], []) for k in models}
        for trial in range(args.warmup + args.trials):
            for k, model in models.items():
                sync(device)
                t0 = time.perf_counter()
                with autocast:
                    loss, _, _ = objective.loss(model, x0, text, mask, g)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
                sync(device)
                t1 = time.perf_counter()
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                sync(device)
                t2 = time.perf_counter()
                if trial >= args.warmup:
                    times[k][0].append(t2 - t0)
                    times[k][1].append(t2 - t1)
        (sa, oa), (sm, om) = ((statistics.median(v) for v in times[k]) for k in ("adamw", "muon"))
        print(f"{res:>5}{batch:>6}{sa:>14.4f}{sm:>13.4f}{sm / sa:>11.2f}x{oa * 1e3:>14.2f}{om * 1e3:>13.2f}"
              f"{om / oa:>10.2f}x", flush=True)


def estimate(args, pairs) -> None:
    with torch.device("meta"):
        meta = PixelDiT(ModelConfig(args.preset), args.text_dim)
        shapes = [tuple(p.shape) for _, p in split_params(meta)[0]]
        ns = newton_schulz_flops(shapes)
        dealt = owners(shapes, args.gpus)
        most = max(sum(newton_schulz_flops([s]) for s, o in zip(shapes, dealt) if o == r) for r in range(args.gpus))
        print(f"{len(shapes)} Muon matrices, {sum(r * c for r, c in shapes) / 1e6:.1f}M of "
              f"{meta.num_params() / 1e6:.1f}M parameters; Newton-Schulz: {ns / 1e12:.3f} TFLOP per step in all, "
              f"{most / 1e12:.3f} on the busiest of {args.gpus} GPUs")
        for res, batch in pairs:  # batch: images per GPU (the speedrun: 1024 / 32 at 512 px, 512 / 32 at 1024 px)
            train = 3 * meta.flops_per_sample(res, args.text_len) * batch
            print(f"  at {res} px, {batch} images per GPU: training {train / 1e12:.2f} TFLOP per GPU per "
                  f"step; Newton-Schulz adds {most / train:.1%} over {args.gpus} GPUs ({ns / train:.0%} if every GPU "
                  f"did all of it) (estimate, at the same FLOP rate)")


if __name__ == "__main__":
    main()
