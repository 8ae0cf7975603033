"""Non-square images end to end: the model and the samplers at h x w patch grids, training on aspect-ratio buckets,
and `pixeldiff-sample --size HxW`."""

import pytest
import torch
from PIL import Image

from conftest import run_cli
from launcher.cli import main as launch_main
from pixeldiff.config import ObjectiveConfig
from pixeldiff.ledger import read_jsonl
from pixeldiff.model import PixelDiT
from pixeldiff.objective import XPrediction, sample, shift_time
from pixeldiff.presets import ModelConfig
from shardutil import image_bytes, write_tar


def objective(dim=16, L=8):
    return XPrediction(ObjectiveConfig(shift_base=1.0, shift_reference_px=16), torch.zeros(L, dim),
                       torch.zeros(L, dtype=torch.bool))


def test_model_and_loss_at_non_square_grids():
    torch.manual_seed(0)
    model = PixelDiT(ModelConfig(preset="test"), 16)  # patch 4
    text, mask = torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.bool)
    for H, W in ((12, 20), (20, 12), (8, 32)):
        x = torch.randn(2, 3, H, W)
        assert model(x, torch.rand(2), text, mask).shape == (2, 3, H, W)
        loss, x0_hat, t = objective().loss(model, x, text, mask, torch.Generator().manual_seed(1))
        loss.backward()
        assert torch.isfinite(loss) and x0_hat.shape == x.shape
    # the 2D RoPE tells rows from columns: a tall image is not a wide one read in another order
    with torch.no_grad():
        for p in model.final.parameters():
            p.normal_(0, 0.1)
        x = torch.randn(1, 3, 12, 20)
        a = model(x, torch.full((1,), 0.5), text[:1], mask[:1])
        b = model(x.transpose(2, 3).contiguous(), torch.full((1,), 0.5), text[:1], mask[:1]).transpose(2, 3)
    assert not torch.allclose(a, b, atol=1e-4)


class Oracle(torch.nn.Module):
    def __init__(self, target):
        super().__init__()
        self.target, self.w, self.calls = target, torch.nn.Parameter(torch.zeros(())), []

    def forward(self, x, t, text, mask):
        self.calls.append(t[0].item())
        return self.target.expand(x.shape[0], -1, -1, -1)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_samplers_at_non_square_sizes(method):
    target = torch.rand(1, 3, 12, 20) * 2 - 1
    obj, text, mask = objective(), torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.bool)
    model = Oracle(target)
    out = sample(model, obj, text, mask, (12, 20), steps=3, cfg_scale=2.0, method=method,
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 12, 20)
    torch.testing.assert_close(out, target.expand(2, -1, -1, -1), rtol=0, atol=1e-5)
    grid = shift_time(torch.linspace(1, 0, 4), obj.shift((12 * 20) ** 0.5)).tolist()  # the side of equal area
    assert model.calls[0] == 1.0 and model.calls[1] == pytest.approx(grid[1] if method == "euler" else grid[1])
    assert obj.shift((12 * 20) ** 0.5) != obj.shift(12)


def aspect_shards(tmp_path, n=3, per=8):
    sizes = [(40, 20), (24, 24), (20, 40), (36, 24), (24, 36), (44, 24)]  # (w, h)
    for s in range(n):
        members = []
        for i in range(per):
            k = s * per + i
            members += [(f"{k:09d}.jpg", image_bytes(k, size=sizes[k % len(sizes)])),
                        (f"{k:09d}.txt", b"a red circle on black")]
        write_tar(tmp_path / f"{s:05d}.tar", members)
    return str(tmp_path / ("{00000..%05d}.tar" % (n - 1)))


def test_training_on_aspect_buckets_and_sampling_with_size(write_manifest, tmp_path):
    data = {"source": "webdataset", "shards": aspect_shards(tmp_path), "workers": 1, "buckets": "aspect",
            "shuffle_buffer": 10}
    manifest = write_manifest(name="buckets", steps=(6, 2), data=data)
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path / "runs")]) == 0
    rows = read_jsonl(tmp_path / "runs" / "buckets" / "metrics.jsonl")
    last = rows[-1]
    assert sum(last["buckets"].values()) == 8 * 8  # 8 steps x global batch 8, one bucket per micro-batch
    assert len(last["buckets"]) >= 3 and set(last["buckets"]) <= {"20x12", "16x16", "12x20", "40x24", "36x28",
                                                                  "32x32", "28x36", "24x40"}
    assert 0 <= last["crop_waste"]["bucket"] < last["crop_waste"]["square"]

    run = tmp_path / "runs" / "buckets"
    out = tmp_path / "wide.png"
    r = run_cli("pixeldiff.sample", str(run), "--prompt", "a red circle on black", "--out", str(out), "--steps", "2",
                "--per-prompt", "2", "--size", "12x20")
    assert r.returncode == 0, r.stderr
    assert "12x20 px" in r.stdout
    w, h = Image.open(out).size
    assert w > 3 * h  # one row of two wide cells
    for size, msg in (("13x20", "multiples of the patch size 4; use e.g. 12x20"), ("12", "expected HEIGHTxWIDTH"),
                      ("0x8", "positive multiples")):
        bad = run_cli("pixeldiff.sample", str(run), "--prompt", "x", "--out", str(out), "--size", size)
        assert bad.returncode == 2 and msg in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    both = run_cli("pixeldiff.sample", str(run), "--prompt", "x", "--out", str(out), "--size", "12x20",
                   "--resolution", "16")
    assert both.returncode == 2 and "not both" in both.stderr
