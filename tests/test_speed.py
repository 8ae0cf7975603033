"""Speed accounting of the real trainer (issue 17): MFU in metrics.jsonl from the model's own FLOP count."""

from __future__ import annotations

import pytest

from pathlib import Path

from conftest import run_cli
from launcher.manifest import load_manifest
from pixeldiff.ledger import read_jsonl
from pixeldiff.model import forward_flops

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("peak", [0.0, 0.002])
def test_metrics_carry_the_denoisers_tflops_and_mfu_against_the_peak(write_manifest, tmp_path, peak):
    manifest = write_manifest(steps=(10, 4), cluster={"backend": "local", "device": "cpu", "peak_tflops": peak},
                              tread={"ratio": 0.5, "start_block": 0, "end_block": -1},
                              logging={"metrics_interval": 2, "sample_interval": 0})
    m = load_manifest(manifest)
    r = run_cli("launcher.cli", "run", str(manifest), "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stdout + r.stderr
    recs = [x for x in read_jsonl(tmp_path / "runs" / "tiny" / "metrics.jsonl") if "loss" in x]
    assert len(recs) == 7
    for x in recs:
        step_flops = 3 * forward_flops(m.model, m.data.text.dim, x["resolution"], m.data.text.max_tokens, m.tread)
        assert x["tflops_per_gpu"] == pytest.approx(step_flops * x["img_per_s"] / 1e12, abs=1e-4)
        if peak:  # a CPU has no peak unless the manifest gives one
            assert x["mfu"] * peak == pytest.approx(x["tflops_per_gpu"], abs=1e-4)
        else:
            assert "mfu" not in x
    dense = forward_flops(m.model, m.data.text.dim, 16, m.data.text.max_tokens)
    assert forward_flops(m.model, m.data.text.dim, 16, m.data.text.max_tokens, m.tread) < dense  # TREAD counted


def test_text_buckets_are_quarters_of_max_tokens():
    from pixeldiff.data import text_bucket

    assert [text_bucket(n, 256) for n in (0, 1, 64, 65, 130, 256)] == [64, 64, 64, 128, 192, 256]
    assert [text_bucket(n, 16) for n in (0, 3, 9, 16)] == [8, 8, 16, 16]
    assert text_bucket(5, 8) == 8  # a quarter under 8 tokens: one shape, max_tokens


@pytest.mark.parametrize("data, ranks", [
    ({"text": {"max_tokens": 64, "dim": 16}}, 1),  # builtin encoder: captions of a few words
    ("precomputed", 1),
    ("precomputed", 2),  # each rank's batches from other shards, trimmed to their own lengths (eager)
])
def test_trimmed_text_trains_to_the_same_losses(write_manifest, tmp_path, data, ranks):
    """data.text.trim cuts the masked padding: every loss of a short run is what the padded run gives, to 1e-6
    relative (a shorter key length can change the order of the attention kernel's float sums: 3e-8 seen here)."""
    if data == "precomputed":  # shards embedded by the real tool, as a user makes them
        import subprocess
        import sys

        from shardutil import write_shards

        write_shards(tmp_path / "raw", 2, 16)
        subprocess.run([sys.executable, str(REPO / "tools" / "embed_captions.py"), str(tmp_path / "raw" / "train-{000..001}.tar"),
                        "--out", str(tmp_path / "shards" / "train"), "--dim", "16", "--max-tokens", "64", "--quiet"],
                       check=True, capture_output=True)
        data = {"source": "webdataset", "shards": str(tmp_path / "shards" / "train-{000..001}.tar"), "workers": 0,
                "shuffle_buffer": 0, "text": {"encoder": "precomputed", "max_tokens": 64, "dim": 16,
                                              "embedded_by": "builtin"}}
    losses = {}
    for trim in (False, True):
        d = {**data, "text": {**data["text"], "trim": trim}}
        manifest = write_manifest(name=f"trim-{trim}", steps=(6, 2), data=d,
                                  logging={"metrics_interval": 1, "sample_interval": 0})
        if ranks == 1:
            r = run_cli("launcher.cli", "run", str(manifest), "--runs-dir", str(tmp_path / "runs"))
            assert r.returncode == 0, r.stdout + r.stderr
        else:
            from distutil import collect, torchrun
            from launcher.cli import prepare_run_dir

            run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "runs")
            proc = torchrun(run_dir, ranks)
            out = collect(proc, timeout=300)
            assert proc.returncode == 0, out
        recs = [x for x in read_jsonl(tmp_path / "runs" / f"trim-{trim}" / "metrics.jsonl") if "loss" in x]
        losses[trim] = [(x["step"], x["loss"], x["grad_norm"]) for x in recs]
        m = load_manifest(manifest)
        for x in recs[-2:]:  # the FLOPs count the text the steps ran: 16 tokens trimmed (captions of 2-3), 64 not
            flops = 3 * forward_flops(m.model, 16, x["resolution"], 16 if trim else 64, m.tread)
            assert x["tflops_per_gpu"] == pytest.approx(flops * x["img_per_s"] / ranks / 1e12, rel=0.05, abs=2e-4)
    assert len(losses[True]) == 8
    assert [s for s, _, _ in losses[True]] == [s for s, _, _ in losses[False]]
    for (_, a, ga), (_, b, gb) in zip(losses[True], losses[False]):
        assert a == pytest.approx(b, rel=1e-6) and ga == pytest.approx(gb, rel=1e-5), (losses[True], losses[False])


def test_to_device_takes_the_ranks_agreed_text_length():
    import torch

    from pixeldiff.data import to_device
    from pixeldiff.text import BuiltinTextEncoder

    enc = BuiltinTextEncoder(dim=16, max_tokens=64)
    b = {"image": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "caption": ["a cat", "a red dog"]}
    _, text, mask = to_device(b, enc, torch.device("cpu"), trim=64)
    assert text.shape[1] == 16 and mask[:, :3].any()
    _, text, mask = to_device(b, enc, torch.device("cpu"), trim=64, agree=lambda n: max(n, 48))
    assert text.shape == (2, 48, 16) and not mask[:, 16:].any()
    emb = {"image": b["image"], "emb": torch.ones(2, 5, 16, dtype=torch.float16),
           "mask": torch.ones(2, 5, dtype=torch.bool), "text_len": 64}
    assert to_device(emb, None, torch.device("cpu"))[1].shape[1] == 64  # untrimmed: max_tokens
    assert to_device(emb, None, torch.device("cpu"), trim=64)[1].shape[1] == 16
    assert to_device(emb, None, torch.device("cpu"), trim=64, agree=lambda n: 32)[1].shape[1] == 32
