"""Speed accounting of the real trainer (issue 17): MFU in metrics.jsonl from the model's own FLOP count."""

from __future__ import annotations

import pytest

from conftest import run_cli
from launcher.manifest import load_manifest
from pixeldiff.ledger import read_jsonl
from pixeldiff.model import forward_flops


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
