"""Perceptual losses (LPIPS, DINO) and their frozen weights: values, gradients, loading offline, S3 cache, training."""

import copy
import importlib.util
import threading

import pytest
import torch
import yaml

from conftest import REPO
from launcher.cli import main as launch_main
from pixeldiff import checkpoint
from pixeldiff.config import ConfigError, DinoLossConfig, LossesConfig, LpipsLossConfig
from pixeldiff.ledger import read_jsonl
from pixeldiff.perceptual import DinoLoss, LpipsLoss, PerceptualLosses, build_loss, forward_flops, lpips_backbone_map
from pixeldiff.weights import cached_name
from pixeldiff.storage import s3_options
from s3server import create_bucket, s3_client

TINY_VIT = "vit_tiny_patch16_224"  # a small timm ViT standing in for DINOv2 on the CPU


def images(n=2, side=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g) * 2 - 1


def alexnet_features_file(path, seed=0):
    """A torchvision-format AlexNet state dict (features.N.*), randomly initialised, as fetch_weights would give."""
    import torchvision

    torch.manual_seed(seed)
    sd = {f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}
    torch.save(sd, path)
    return sd


def tiny_vit_file(path, resolution=32, seed=0):
    import timm

    torch.manual_seed(seed)
    sd = timm.create_model(TINY_VIT, pretrained=False, num_classes=0, img_size=resolution).state_dict()
    torch.save(sd, path)
    return sd


def dino_cfg(**kw):
    return DinoLossConfig(**{"weight": 1.0, "net": TINY_VIT, "resolution": 32, **kw})


# ------------------------------------------------------------------ values


def test_lpips_is_zero_for_the_same_image_and_grows_with_distortion(tmp_path):
    sd = alexnet_features_file(tmp_path / "alex.pth")
    lp = build_loss("lpips", LpipsLossConfig(weight=1.0, net="alex", weights=str(tmp_path / "alex.pth")), "cpu")
    params = dict(lp.module.named_parameters())
    for ours, theirs in lpips_backbone_map(lp.module).items():  # the file's tensors landed in the right slices
        assert torch.equal(params[ours], sd[theirs]), ours
    x = images()
    assert torch.equal(lp(x, x), torch.zeros(2))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    values = [lp(x + s * noise, x).mean().item() for s in (0.02, 0.05, 0.1, 0.2, 0.4)]
    assert values == sorted(values) and values[0] > 0, values


def test_lpips_vgg_slices_match_torchvision_feature_indices():
    """lpips' relu1_2 ... relu5_3 equal torchvision's vgg16.features outputs at indices 3, 8, 15, 22, 29."""
    from torchvision.models import vgg

    torch.manual_seed(0)
    features = vgg.make_layers(vgg.cfgs["D"]).eval()
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    lp = LpipsLoss(LpipsLossConfig(weight=1.0, net="vgg"), "cpu", state_dict=sd)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        outs = lp.module.net(x)
        h, ref = x, []
        for i, layer in enumerate(features):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                ref.append(h)
    assert len(outs) == len(ref) == 5
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match=r"losses\.lpips\.weights: .*has shape"):  # an AlexNet file for VGG
        import torchvision

        alex = {f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}
        LpipsLoss(LpipsLossConfig(weight=1.0, net="vgg"), "cpu", state_dict={**sd, **alex}, source="x.pth")


def test_dino_loss_is_zero_for_identical_inputs_and_within_0_2():
    d = DinoLoss(dino_cfg(), "cpu")
    x = images(3)
    same = d(x, x)
    assert torch.all(same.abs() < 1e-6)
    for y in (images(3, seed=5), -x, x + 0.3 * torch.randn_like(x), torch.zeros_like(x)):
        v = d(y, x)
        assert v.shape == (3,) and torch.all(v >= 0) and torch.all(v <= 2)
    assert torch.all(d(images(3, seed=5), x) > 0)
    near, far = d(x + 0.05 * torch.randn_like(x), x).mean(), d(x + 0.5 * torch.randn_like(x), x).mean()
    assert 0 < near < far


def test_gradients_reach_the_prediction_and_never_the_frozen_networks():
    losses = [LpipsLoss(LpipsLossConfig(weight=1.0, net="alex"), "cpu"), DinoLoss(dino_cfg(), "cpu")]
    for fn in losses:
        x = images()
        x_hat = (x + 0.2 * torch.randn_like(x)).requires_grad_(True)
        target = x.clone().requires_grad_(True)
        fn(x_hat, target).sum().backward()
        assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
        assert target.grad is None  # the target branch runs without grad
        for p in fn.parameters():
            assert not p.requires_grad and p.grad is None


def test_max_t_applies_the_loss_only_at_low_noise():
    cfg = LossesConfig(lpips=LpipsLossConfig(weight=1.0, net="alex", max_t=0.5))
    pl = PerceptualLosses(cfg, "cpu")
    x = images(4)
    x_hat = x + 0.2 * torch.randn_like(x)
    per = pl.terms["lpips"](x_hat, x)
    t = torch.tensor([0.1, 0.9, 0.5, 0.7])
    got = pl.compute(x_hat, x, t)["lpips"]
    torch.testing.assert_close(got, (per[0] + per[2]) / 4)
    assert pl.compute(x_hat, x, torch.full((4,), 0.9))["lpips"].item() == 0.0


def test_forward_flops_are_counted_per_network():
    cfg = LossesConfig(lpips=LpipsLossConfig(weight=0.1, downscale=0.5), dino=DinoLossConfig(weight=0.01))
    f512, f1024 = forward_flops(cfg, 512), forward_flops(cfg, 1024)
    # VGG16 conv layers at 256 px: ~2 x 15.5 GMAC x (256/224)^2 = ~40 GFLOP; ViT-B/14 at 224 px: ~47 GFLOP
    assert 35e9 < f512["lpips"] < 45e9 and 40e9 < f512["dino"] < 55e9
    assert f1024["lpips"] == pytest.approx(4 * f512["lpips"], rel=0.02)
    assert f1024["dino"] == f512["dino"]  # DINO always sees `resolution` px
    assert forward_flops(LossesConfig(), 512) == {}


# ------------------------------------------------------------------ weights


def test_dino_weights_load_strictly_from_a_local_file(tmp_path):
    sd = tiny_vit_file(tmp_path / "vit.pth")
    d = build_loss("dino", dino_cfg(weights=str(tmp_path / "vit.pth")), "cpu")
    got = d.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    del sd["blocks.0.attn.qkv.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ConfigError, match=r"losses\.dino\.weights: .*broken\.pth.*blocks\.0\.attn\.qkv\.weight"):
        build_loss("dino", dino_cfg(weights=str(tmp_path / "broken.pth")), "cpu")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"losses\.dino\.weights: cannot load .*junk\.pth"):
        build_loss("dino", dino_cfg(weights=str(tmp_path / "junk.pth")), "cpu")


def test_a_missing_weights_file_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope" / "vgg16-397923af.pth"
    with pytest.raises(ConfigError, match=r"^losses\.lpips\.weights: no such file .*vgg16-397923af\.pth"):
        build_loss("lpips", LpipsLossConfig(weight=0.1, weights=str(missing)), "cpu")
    manifest = tmp_path / "m.yaml"
    from conftest import tiny_manifest_dict

    manifest.write_text(yaml.safe_dump(tiny_manifest_dict(losses={"lpips": {"weight": 0.1, "weights": str(missing)}})))
    assert launch_main(["plan", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: losses.lpips.weights: no such file") and "Traceback" not in err
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()  # refused before the run directory is made


def test_weights_from_s3_are_fetched_once_into_the_cache(s3_endpoint, tmp_path, monkeypatch):
    create_bucket(s3_endpoint, "weights")
    sd = alexnet_features_file(tmp_path / "alexnet-owt-7be5be79.pth", seed=3)
    s3_client(s3_endpoint).upload_file(str(tmp_path / "alexnet-owt-7be5be79.pth"), "weights", "w/alexnet-owt-7be5be79.pth")
    cache = tmp_path / "cache"
    monkeypatch.setenv("PIXELDIFF_CACHE", str(cache))
    url = "s3://weights/w/alexnet-owt-7be5be79.pth"
    cfg = LpipsLossConfig(weight=0.1, net="alex", weights=url)
    opts = s3_options(s3_endpoint, None, False)

    fetches, errors = [], []

    def build():  # four 'ranks' start together: one download
        try:
            build_loss("lpips", cfg, "cpu", opts, log=fetches.append)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(fetches) == 1, (errors, fetches)
    files = [p.name for p in cache.iterdir() if not p.name.startswith(".")]
    assert files == [cached_name(url)]
    # second load: S3 is not asked again (the endpoint is gone), the cached file is used
    lp = build_loss("lpips", cfg, "cpu", s3_options("http://127.0.0.1:9", None, False), log=fetches.append)
    assert len(fetches) == 1
    assert torch.equal(dict(lp.module.named_parameters())["net.slice1.0.weight"], sd["features.0.weight"])
    # a missing object is a clear error at job start
    with pytest.raises(ConfigError, match=r"^losses\.lpips\.weights: s3://weights/w/missing\.pth does not exist"):
        build_loss("lpips", LpipsLossConfig(weight=0.1, net="alex", weights="s3://weights/w/missing.pth"), "cpu", opts)


def test_lpips_at_a_fixed_resolution_sees_the_same_size_at_every_stage(monkeypatch):
    """losses.lpips.resolution: the shorter side becomes it (aspect kept), whatever the stage's image size; the
    backbone gets channels-last input; and a 64 px image at resolution 32 is the 64 px image at downscale 0.5."""
    fixed = LpipsLossConfig(weight=1.0, net="alex", resolution=32)
    torch.manual_seed(0)
    lp = LpipsLoss(fixed, "cpu")
    seen = []
    backbone = lp.backbone
    monkeypatch.setattr(lp, "backbone", lambda x: seen.append((tuple(x.shape[-2:]), x.is_contiguous(
        memory_format=torch.channels_last))) or backbone(x))
    for side in (64, 128):
        lp(images(side=side), images(side=side, seed=1))
    lp(torch.rand(2, 3, 64, 96) * 2 - 1, torch.rand(2, 3, 64, 96) * 2 - 1)
    assert seen == [((32, 32), True)] * 4 + [((32, 48), True)] * 2
    torch.manual_seed(0)
    half = LpipsLoss(LpipsLossConfig(weight=1.0, net="alex", downscale=0.5), "cpu")
    x, y = images(side=64), images(side=64, seed=1)
    torch.testing.assert_close(lp(x, y), half(x, y), rtol=0, atol=0)
    flops = forward_flops(LossesConfig(lpips=fixed), 1024)["lpips"]
    assert flops == forward_flops(LossesConfig(lpips=fixed), 64)["lpips"] == forward_flops(
        LossesConfig(lpips=LpipsLossConfig(weight=1.0, net="alex", downscale=0.5)), 64)["lpips"]


def test_channels_last_lpips_gives_the_contiguous_values():
    """The backbone runs channels-last; the same weights in the default layout give the same distances (to float
    rounding: the convolution's summation order may differ)."""
    torch.manual_seed(0)
    lp = LpipsLoss(LpipsLossConfig(weight=1.0, net="alex"), "cpu")
    x, y = images(side=64), images(side=64, seed=1)
    ours = lp(x, y)
    conv = next(m for m in lp.module.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    plain = copy.deepcopy(lp.module.net).to(memory_format=torch.contiguous_format)
    lp.backbone = lambda t: plain(t.contiguous())
    torch.testing.assert_close(ours, lp(x, y), rtol=1e-5, atol=1e-6)


def test_compiled_perceptual_networks_match_eager():
    """cluster.compile compiles the frozen networks too (static shapes): the same values and the same gradient into
    x0_hat as eager. LPIPS only (the DINO loss and REPA's teacher go through the same maybe_compile; a ViT's CPU
    compile costs CI half a minute)."""
    for name, cfg in (("lpips", LpipsLossConfig(weight=1.0, net="alex")),):
        torch.manual_seed(0)
        eager = build_loss(name, cfg, "cpu")
        torch.manual_seed(0)
        compiled = build_loss(name, cfg, "cpu", compile=True)
        assert (compiled.backbone if name == "lpips" else compiled.forward_features) is not (
            compiled.module.net if name == "lpips" else compiled.model.forward_features)
        x = images(side=64)
        grads = []
        for fn in (eager, compiled):
            x_hat = images(side=64, seed=1).requires_grad_(True)
            value = fn(x_hat, x)
            value.sum().backward()
            grads.append((value.detach(), x_hat.grad))
        torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-3, atol=1e-6)
    dino = build_loss("dino", dino_cfg(), "cpu", compile=True)
    assert getattr(dino.forward_features, "_torchdynamo_orig_callable", None) == dino.model.forward_features
    for plain in (build_loss("dino", dino_cfg(), "cpu"), build_loss("dino", dino_cfg(max_t=0.5), "cpu", compile=True)):
        assert plain.forward_features == plain.model.forward_features  # max_t: a varying batch, not compiled


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("losses, message", [
    ({"lpips": {"weight": 0.1, "downscale": 0}}, r"losses\.lpips\.downscale: must be in \(0, 1\]"),
    ({"lpips": {"weight": 0.1, "max_t": 1.5}}, r"losses\.lpips\.max_t: must be in \(0, 1\] or null"),
    ({"lpips": {"weight": 0.1, "net": "squeeze"}}, r"losses\.lpips\.net: expected one of 'vgg' \| 'alex'"),
    ({"lpips": {"weight": 0.1, "net": "alex"}}, r"losses\.lpips\.downscale: stages\[0\] images of 16 px become 16 px, "
                                                r"smaller than the 31 px the 'alex' backbone needs"),
    ({"lpips": {"weight": 0.1, "net": "alex", "resolution": 24}},
     r"losses\.lpips\.resolution: 24 px is smaller than the 31 px the 'alex' backbone needs; use at least 31"),
    ({"lpips": {"weight": 0.1, "downscale": 0.5, "resolution": 64}},
     r"losses\.lpips: downscale 0\.5 and resolution 64 both set the size LPIPS sees; keep one"),
    ({"dino": {"weight": 0.1, "resolution": 0}}, r"losses\.dino\.resolution: must be > 0"),
    ({"dino": {"weight": 0.1, "weights": "https://x/y.pth"}}, r"losses\.dino\.weights: .* local path or an s3:// URL"),
])
def test_bad_loss_settings_are_refused(tmp_path, capsys, losses, message):
    from conftest import tiny_manifest_dict

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(tiny_manifest_dict(losses=losses)))
    assert launch_main(["plan", str(path)]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_lpips_downscale_is_checked_against_the_shortest_aspect_bucket(tmp_path, capsys):
    """40 px with the test preset's patch 4: the 2:1 buckets are 28x56, below the 31 px alex needs; square 40 px is
    fine, and so is a fixed losses.lpips.resolution."""
    from conftest import tiny_manifest_dict

    stages = [{"name": "40px", "resolution": 40, "global_batch": 8, "steps": 2}]
    lp = {"lpips": {"weight": 0.1, "net": "alex"}}
    shards = {"source": "webdataset", "shards": str(tmp_path / "train-{000..003}.tar")}
    for data, code in (({**shards, "buckets": "square"}, 0), ({**shards, "buckets": "aspect"}, 2)):
        path = tmp_path / "m.yaml"
        path.write_text(yaml.safe_dump(tiny_manifest_dict(stages=stages, losses=lp, data=data)))
        assert launch_main(["plan", str(path)]) == code
    err = capsys.readouterr().err
    assert "stages[0] images of 40 px in aspect buckets (shortest side 28 px) become 28 px, smaller than the 31 px" in err
    fixed = {"lpips": {"weight": 0.1, "net": "alex", "resolution": 32}}
    path.write_text(yaml.safe_dump(tiny_manifest_dict(stages=stages, losses=fixed, data={**shards, "buckets": "aspect"})))
    assert launch_main(["plan", str(path)]) == 0


def test_unknown_dino_model_is_refused_at_plan(tmp_path, capsys):
    from conftest import tiny_manifest_dict

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(tiny_manifest_dict(losses={"dino": {"weight": 0.1, "net": "vit_nope"}})))
    assert launch_main(["plan", str(path)]) == 2
    assert "losses.dino.net: 'vit_nope' is not a timm model name" in capsys.readouterr().err


# ------------------------------------------------------------------ training


def test_training_logs_each_loss_and_warns_about_random_weights(write_manifest, tmp_path, capsys):
    manifest = write_manifest(steps=(2, 1), losses={
        "lpips": {"weight": 0.5},  # VGG, random init (no weights)
        "dino": {"weight": 0.2, "net": TINY_VIT, "resolution": 32, "weights": str(tmp_path / "vit.pth")},
    })
    tiny_vit_file(tmp_path / "vit.pth")
    runs = tmp_path / "runs"
    assert launch_main(["run", str(manifest), "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr()
    # said once, by the job starting in this terminal (the launcher says it for a Slurm or detached run, and plan)
    assert out.out.count("losses.lpips: weight 0.5 but no weights file") == 1 and "losses.lpips" not in out.err
    assert "WARNING: losses.lpips: weight 0.5 but no weights file" in out.out
    assert "losses.dino" not in out.out + out.err  # dino has its weights
    assert launch_main(["plan", str(manifest)]) == 0
    assert "warning: losses.lpips: weight 0.5 but no weights file" in capsys.readouterr().err
    run_dir = runs / "tiny"
    recs = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert r["loss"] == pytest.approx(r["loss_mse"] + 0.5 * r["loss_lpips"] + 0.2 * r["loss_dino"], rel=1e-4, abs=1e-5)
        assert r["loss_lpips"] > 0 and 0 < r["loss_dino"] <= 2
    warnings = [e for e in read_jsonl(run_dir / "ledger.jsonl") if e["event"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["message"].startswith("losses.lpips: weight 0.5 but no weights file")
    # the frozen networks are not part of the checkpoint (model, EMA, optimizer hold the DiT only)
    parts = checkpoint.load(checkpoint.latest_valid(run_dir / "checkpoints"))
    from pixeldiff.config import load_resolved
    from pixeldiff.model import PixelDiT

    m = load_resolved(run_dir / "manifest.yaml")
    dit = PixelDiT(m.model, m.data.text.dim)
    assert set(parts["model"]) == set(parts["ema"]) == set(dit.state_dict())
    assert sum(len(g["params"]) for g in parts["optimizer"]["param_groups"]) == len(list(dit.parameters()))
    # every start warns again
    assert launch_main(["run", str(manifest), "--runs-dir", str(runs)]) == 0
    warnings = [e for e in read_jsonl(run_dir / "ledger.jsonl") if e["event"] == "warning"]
    assert len(warnings) == 2


def test_training_without_perceptual_losses_logs_no_extra_terms(write_manifest, tmp_path):
    assert launch_main(["run", str(write_manifest(steps=(1, 1))), "--runs-dir", str(tmp_path)]) == 0
    for r in read_jsonl(tmp_path / "tiny" / "metrics.jsonl"):
        assert r["loss"] == r["loss_mse"] and "loss_lpips" not in r and "loss_dino" not in r
    assert not [e for e in read_jsonl(tmp_path / "tiny" / "ledger.jsonl") if e["event"] == "warning"]


# ------------------------------------------------------------------ tools/fetch_weights.py (no network here)


def fetch_tool():
    spec = importlib.util.spec_from_file_location("fetch_weights", REPO / "tools" / "fetch_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fetch_weights_dry_run_prints_sources_and_manifest_lines(tmp_path, capsys):
    tool = fetch_tool()
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0 and "--dry-run" in capsys.readouterr().out
    assert tool.main(["--dry-run", "--out", str(tmp_path / "w"), "--nets", "vgg,alex,dino", "--upload", "s3://bkt/weights/"]) == 0
    out = capsys.readouterr().out
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in out
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in out
    assert "vit_base_patch14_reg4_dinov2" in out and "img_size=224" in out
    lines = out.split("manifest lines:\n", 1)[1]
    parsed = yaml.safe_load(lines)
    assert parsed["losses"]["lpips"] == {"net": "vgg", "weights": "s3://bkt/weights/vgg16-397923af.pth"}
    assert parsed["losses"]["dino"] == {"net": "vit_base_patch14_reg4_dinov2", "resolution": 224,
                                        "weights": "s3://bkt/weights/vit_base_patch14_reg4_dinov2-224.pth"}
    assert not (tmp_path / "w").exists()  # a dry run writes nothing


@pytest.mark.parametrize("argv, message", [
    (["--nets", "vgg,resnet"], "--nets: unknown resnet"),
    (["--upload", "https://bucket/x"], "is not an s3://bucket/prefix URL"),
    (["--dino-resolution", "0"], "--dino-resolution: must be > 0"),
    (["--endpoint-url", "http://127.0.0.1:9000"], "only apply with --upload"),
])
def test_fetch_weights_bad_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        fetch_tool().main(["--dry-run", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_eight_processes_starting_together_fetch_the_weights_once(s3_endpoint, tmp_path):
    """As 8 ranks of a node do: separate processes, one download into the shared cache."""
    import subprocess
    import sys

    from conftest import REPO

    create_bucket(s3_endpoint, "weights8")
    (tmp_path / "w.pth").write_bytes(b"x" * 3_000_000)
    s3_client(s3_endpoint).upload_file(str(tmp_path / "w.pth"), "weights8", "w.pth")
    code = ("import sys; from pixeldiff.weights import fetch_weights; from pixeldiff.storage import s3_options; "
            "p = fetch_weights('s3://weights8/w.pth', 'k', s3_options(sys.argv[1], None, False), "
            "log=lambda m: print('FETCH', m)); print('SIZE', p.stat().st_size)")
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "PIXELDIFF_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code, s3_endpoint], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(o.count("FETCH") for o in outs) == 1
    assert all("SIZE 3000000" in o for o in outs)
