"""Benchmark one training step of the pixel DiT: eager (the baseline) vs torch.compile.

    python tools/bench_step.py --preset JiT-32 --res 512:32 --res 1024:8 --text-len 256 --text-dim 2304
    python tools/bench_step.py --preset tiny --res 32:32 --res 64:32          # CPU

Each row times full optimizer steps (x-prediction loss, backward, grad clip, the trainer's
fused AdamW; bf16 autocast on GPU) after warm-up, and prints img/s per device, the ratio to the
eager baseline measured in the same run, and model FLOPs utilisation against --peak-tflops.
Modes `eager+lpips`, `eager+dino`, `eager+lpips+dino` add the speedrun's perceptual losses
(LPIPS VGG at 0.5x, DINOv2 ViT-B/14 at 224 px); `+muon` (e.g. `eager+muon`, `compile+muon`)
trains the blocks' matrices with Muon instead (optimizer.name: muon); `+tread` routes 50% of the
image tokens past blocks 2..penultimate (TREAD); `+repa` adds REPA (block 8's projector against
--repa-net, a DINOv3 ViT-L/16 by default); components combine, and each mode's "vs eager" ratio is
what it costs (or saves). `--calibration FILE` writes the
measured img/s per GPU per resolution as JSON for the planner.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pixeldiff.config import DinoLossConfig, LossesConfig, LpipsLossConfig, ObjectiveConfig, OptimizerConfig  # noqa: E402
from pixeldiff.model import ModelConfig, PixelDiT, resolve_model_config  # noqa: E402
from pixeldiff.objective import XPrediction, tread_route  # noqa: E402
from pixeldiff.optim import build_optimizer  # noqa: E402


def bench(model, objective, opt, res, batch, text_len, text_dim, device, steps, warmup, autocast, perceptual=None,
          tread=False, teacher=None):
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch, 3, res, res, generator=g, device=device).mul(2).sub(1)
    text = torch.randn(batch, text_len, text_dim, generator=g, device=device)
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
    mask[:, text_len // 2:] = False  # half padding, as real captions have

    def step():
        with autocast:
            if tread or teacher is not None:  # the trainer's forward with TREAD / REPA
                p = model.cfg.patch_size
                route = tread_route(batch, (res // p) ** 2, 0.5, g) if tread else None
                xt, t, tx, mk = objective.noised(x0, text, mask, g)
                out = model(xt, t, tx, mk, route=route, repa_at=min(7, len(model.blocks) - 1) if teacher else None)
                x0_hat = out[0] if teacher is not None else out
                loss = objective.velocity_mse(x0_hat, xt, x0, t)
                if teacher is not None:
                    loss = loss + 0.5 * teacher.loss(out[1], x0, out[2])
            else:
                loss, x0_hat, t = objective.loss(model, x0, text, mask, g)
            if perceptual:
                terms = perceptual.compute(x0_hat, x0, t)
                loss = loss + sum(perceptual.weight(k) * v for k, v in terms.items())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return batch / dt, dt, warm_s, mem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--res", action="append", default=None, help="RESOLUTION:MICRO_BATCH, repeatable")
    ap.add_argument("--text-len", type=int, default=8)
    ap.add_argument("--text-dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="eager,compile", help="eager, compile, eager+lpips, eager+dino, eager+lpips+dino, "
                    "eager+muon, compile+muon, eager+tread, eager+repa, eager+tread+repa (components combine)")
    ap.add_argument("--repa-net", default="vit_large_patch16_dinov3", help="REPA's teacher (a timm name) for +repa")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device bf16 dense peak, for MFU (H100 989, H200 989)")
    ap.add_argument("--calibration", help="write measured img/s per GPU per resolution here (JSON)")
    args = ap.parse_args(argv)
    pairs = [tuple(int(v) for v in r.split(":")) for r in (args.res or ["32:32", "64:32"])]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; preset {args.preset}", flush=True)
    header = f"{'mode':<18}{'res':>6}{'batch':>6}{'img/s':>10}{'step s':>9}{'vs eager':>9}{'MFU':>7}{'warmup s':>9}{'GiB':>7}"
    print(header)
    print("-" * len(header), flush=True)
    base: dict = {}
    calib: dict = {}
    sizes = resolve_model_config(ModelConfig(args.preset))
    for mode in args.modes.split(","):
        names = mode.split("+")[1:]
        compiled = mode.split("+")[0] == "compile"  # the frozen networks too, as the trainer with cluster.compile
        teacher = None
        if "repa" in names:  # random frozen weights: the cost is the same
            from pixeldiff.config import RepaLossConfig
            from pixeldiff.repa import RepaTeacher

            teacher = RepaTeacher(RepaLossConfig(weight=0.5, net=args.repa_net), sizes.patch_size, device,
                                  compile=compiled)
        depth = sizes.depth if "tread" in names else 0
        torch.manual_seed(0)
        model = PixelDiT(ModelConfig(args.preset), args.text_dim, repa_dims=(1024, teacher.dim) if teacher else None,
                         tread_span=(1, depth - 2) if depth else None).to(device)
        opt = build_optimizer(model, OptimizerConfig(name="muon" if "muon" in names else "adamw"))  # lr 1e-4 each
        objective = XPrediction(ObjectiveConfig(), torch.zeros(args.text_len, args.text_dim), torch.zeros(args.text_len, dtype=torch.bool))
        net = torch.compile(model, dynamic=False) if compiled else model
        perceptual = None
        if {"lpips", "dino"} & set(names):  # the speedrun's perceptual losses (random frozen weights: same cost)
            from pixeldiff.perceptual import PerceptualLosses

            losses = LossesConfig(lpips=LpipsLossConfig(weight=0.1 if "lpips" in names else 0.0, resolution=256),
                                  dino=DinoLossConfig(weight=0.01 if "dino" in names else 0.0))
            perceptual = PerceptualLosses(losses, device, log=lambda *_: None, compile=compiled)
        for res, batch in pairs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ips, dt, warm_s, mem = bench(net, objective, opt, res, batch, args.text_len, args.text_dim, device,
                                         args.steps, args.warmup, autocast, perceptual, "tread" in names, teacher)
            if mode == "eager":
                base[res, batch] = ips
            ratio = f"{ips / base[res, batch]:.2f}x" if (res, batch) in base else "-"
            mfu = "-"
            if args.peak_tflops:
                mfu = f"{3 * model.flops_per_sample(res, args.text_len) * ips / (args.peak_tflops * 1e12):.1%}"
            calib[str(res)] = max(calib.get(str(res), 0), ips)
            print(f"{mode:<18}{res:>6}{batch:>6}{ips:>10.1f}{dt:>9.3f}{ratio:>9}{mfu:>7}{warm_s:>9.1f}{mem:>7.1f}", flush=True)
        del model, net, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with torch.device("meta"):
        print(f"params: {PixelDiT(ModelConfig(args.preset), args.text_dim).num_params() / 1e6:.1f}M")
    if args.calibration:
        Path(args.calibration).write_text(json.dumps({"device": name, "preset": args.preset, "img_per_s_per_gpu": calib}, indent=1))


if __name__ == "__main__":
    main()
