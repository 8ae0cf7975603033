"""Evaluation metrics (pixeldiff/evaluate.py) with small feature networks the tests write themselves: a tiny open_clip
model registered from a JSON config, a tiny timm ViT for DINO, torch-fidelity's Inception randomly initialised and
saved; weights from a path and from s3:// (moto); 2 gloo ranks against one process; the manifest's and preflight's
errors. Run as a script (`python tests/test_evaluate.py rank OUT`) it is one rank of the 2-rank test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pixeldiff.config import INCEPTION_FILE, ConfigError, Manifest, from_dict, validate  # noqa: E402
from pixeldiff.data import SyntheticShapes  # noqa: E402
from pixeldiff.evaluate import (Evaluator, held_out, mmd, reference_batches, to_uint8,  # noqa: E402
                                training_holdout)

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = {
    "embed_dim": 16, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
DINO_NET, DINO_RES = "test_vit", 32  # timm's tiny test ViT (patch 16)


# ------------------------------------------------------------------ the networks the tests write


def write_clip(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """-> (model config .json, random weights .pth) of a tiny open_clip model."""
    import open_clip

    root.mkdir(parents=True, exist_ok=True)
    config = root / "pixeldiff-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model("pixeldiff-tiny-clip")
    weights = root / "tiny-clip.pth"
    torch.save(model.state_dict(), weights)
    return config, weights


def write_dino(root: Path, seed: int = 0) -> Path:
    from pixeldiff.perceptual import timm_model

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    path = root / "tiny-dino.pth"
    torch.save(timm_model(DINO_NET, DINO_RES).state_dict(), path)
    return path


def write_random_inception(path: Path) -> Path:
    """torch-fidelity's Inception with its random initialisation, saved: its constructor would download the real
    weights (no network here), so the download is replaced, at that boundary only, by an empty dict that is not
    loaded."""
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    class RandomInception(fi.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initialisation

    saved = fi.load_state_dict_from_url
    fi.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        net = RandomInception("random-inception", ["2048"])
    finally:
        fi.load_state_dict_from_url = saved
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("nets")
    config, clip = write_clip(root)
    return {"clip_model": str(config), "clip": str(clip), "dino": str(write_dino(root)),
            "inception": str(write_random_inception(root / INCEPTION_FILE))}


def manifest(eval_section: dict, data: dict | None = None, dino_loss: dict | None = None) -> Manifest:
    m = from_dict(Manifest, {
        "name": "t", "cluster": {"backend": "local", "device": "cpu"},
        "stages": [{"name": "a", "resolution": 32, "global_batch": 8, "steps": 1}],
        "model": {"preset": "test"}, "data": data or {}, "losses": {"dino": dino_loss or {}},
        "eval": {"batch": 16, **eval_section}})
    validate(m)
    return m


def random_eval(**kw) -> dict:
    return {"without_weights": "random_features", **kw}


def real_eval(nets, **kw) -> dict:
    return {"inception": {"weights": nets["inception"]}, "clip": {"model": nets["clip_model"], "weights": nets["clip"]},
            "dino": {"net": DINO_NET, "weights": nets["dino"], "resolution": DINO_RES}, **kw}


def synthetic(start: int, n: int, batch: int = 32, shift: str | None = None, resolution: int = 32):
    """(uint8 images, captions) batches of synthetic shapes start .. start+n-1, optionally shifted."""
    shapes = SyntheticShapes(0)
    for i in range(start, start + n, batch):
        x, captions = shapes.batch(i, min(batch, start + n - i), resolution)
        if shift == "dark":
            x = (x - 0.5).clamp(-1, 1)
        yield to_uint8(x), captions


# ------------------------------------------------------------------ pure parts


def test_held_out_is_a_stable_seeded_fraction():
    keys = [f"{i:09d}" for i in range(20_000)]
    picked = [k for k in keys if held_out(k, 0.1, 0)]
    assert 0.09 < len(picked) / len(keys) < 0.11
    assert picked == [k for k in keys if held_out(k, 0.1, 0)]  # deterministic
    other = {k for k in keys if held_out(k, 0.1, 1)}
    assert len(other & set(picked)) < 0.2 * len(picked)  # another seed, another set
    assert not any(held_out(k, 0.0, 0) for k in keys[:1000])
    assert {k for k in keys if held_out(k, 0.05, 0)} <= set(picked)  # a smaller fraction is a subset
    # a known value, so that a change of the hash (which would move keys between training and evaluation) is caught
    # pinned: sha256("0:" + key)[:8] < 0.1 x 2^64
    assert [int(k) for k in keys[:200] if held_out(k, 0.1, 0)] == [3, 14, 47, 53, 55, 63, 90, 97, 101, 121, 122, 142,
                                                                 154, 156, 163, 174, 188, 194, 199]


def test_the_data_reader_can_import_held_out_without_the_feature_libraries():
    code = ("import sys; from pixeldiff.evaluate import held_out, training_holdout; "
            "print([m for m in ('torchmetrics', 'torch_fidelity', 'open_clip', 'timm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_training_holdout_only_when_the_training_shards_give_the_reference():
    shards = {"source": "webdataset", "shards": "/data/train-{000..009}.tar"}
    assert training_holdout(manifest({"holdout": 0.02, "holdout_seed": 3}, data=shards)) == (0.02, 3)
    assert training_holdout(manifest({"shards": "/data/eval-000.tar"}, data=shards)) is None
    assert training_holdout(manifest({"enabled": False}, data=shards)) is None
    assert training_holdout(manifest({})) is None  # synthetic data: held-out indices training never reaches
    m = from_dict(Manifest, {"name": "t", "stages": [{"name": "a", "resolution": 32, "global_batch": 8, "steps": 1}],
                             "data": shards})
    assert not m.eval.enabled and training_holdout(m) is None  # no eval section: nothing held out


def test_synthetic_held_out_samples_are_not_training_samples():
    """(torch's CPU generator keeps only a seed's low 32 bits: an offset of 2^40 gave training samples 0, 1, ...)"""
    m = manifest({"samples": 64})
    held = torch.cat([x for x, _, _ in reference_batches(m, 32, batch=32)])
    train = to_uint8(SyntheticShapes(0).batch(0, 1000, 32)[0])
    assert held.shape == (64, 3, 32, 32)
    assert not any(torch.equal(held[j], train[j]) for j in range(64))
    same = (held.flatten(1)[:, None] == train.flatten(1)[None]).all(-1).any(1)  # equal to any of 1000 (a coincidence)
    assert same.sum() <= 3, same.sum()


def test_to_uint8_rounds():
    x = torch.tensor([-1.0, -0.99, 0.0, 0.999, 1.0, 1.5, -2.0])
    assert to_uint8(x).tolist() == [0, 1, 128, 255, 255, 255, 0]  # truncation would give 0, 1, 127, 254, ...


def test_mmd_is_the_papers_estimator():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=g), torch.randn(70, 8, generator=g) + 2.0

    def k(a, b):
        return torch.exp(-torch.cdist(a.double(), b.double()) ** 2 / (2 * 10.0**2)).mean()

    direct = 1000 * (k(x, x) + k(y, y) - 2 * k(x, y))
    assert mmd(x, y, chunk=7) == pytest.approx(direct.item(), rel=1e-9)
    assert abs(mmd(x, x)) < 1e-9
    assert mmd(x, y) > 5 * abs(mmd(x[:25], x[25:]))  # the biased estimator: > 0 even for one distribution


# ------------------------------------------------------------------ separation


def test_substitute_features_separate_distributions():
    m = manifest(random_eval(samples=128, metrics=["fid", "cmmd", "dino_mmd"]))
    logs = []
    ev = Evaluator(m.eval, m, "cpu", log=logs.append)
    assert ev.features == {"fid": "random-conv-seed0-256d", "cmmd": "random-conv-seed0-256d",
                           "dino_mmd": "random-conv-seed0-256d"}
    assert len(ev.warnings) == 3 and all("comparable only to each other" in w for w in ev.warnings)
    ref = ev.reference(reference_batches(m, 32), 32)
    assert ref.samples == 128 and len(ref.captions) == 128
    shapes = SyntheticShapes(0)
    assert ref.captions[:3] == [shapes.sample((3 << 30) + j, 32)[1] for j in range(3)]  # held-out order
    assert ref.prompts(1, 3)[:2] == [(1, ref.captions[1]), (4, ref.captions[4])]
    assert sorted(p for r in range(3) for p in ref.prompts(r, 3)) == list(enumerate(ref.captions))
    same = ev.score(synthetic(10_000, 128), ref)
    shifted = ev.score(synthetic(10_000, 128, shift="dark"), ref)
    assert same["samples"] == shifted["samples"] == 128
    # 128 images: FID's floor (two samples of one distribution) is ~0.5-1.3 here
    assert same["fid"] < 2 and shifted["fid"] > 4 * same["fid"], (same, shifted)
    assert same["cmmd"] < 0.15 and shifted["cmmd"] > 3 * same["cmmd"], (same, shifted)
    assert same["features"]["fid"] == "random-conv-seed0-256d"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer's bf16 regions: features stay float32
        assert ev.score(synthetic(10_000, 128), ref)["fid"] == pytest.approx(same["fid"], rel=1e-6)
    pre = same["preprocess"]
    assert pre["uint8"].startswith("round(") and pre["image"] == [32, 32] and pre["fid"]["input"] == 64
    assert "sigma 10" in pre["mmd"]


def test_a_random_inception_does_not_separate(nets):
    """Why the substitute exists: torch-fidelity's Inception with random weights maps every image to nearly the same
    features (its activations shrink layer after layer), so FID is ~0 whatever the images. (4 images a set: this
    Inception takes about a second an image on 2 CPU cores.)"""
    m = manifest(real_eval(nets, samples=4, metrics=["fid"]))
    ev = Evaluator(m.eval, m, "cpu", log=lambda s: None)
    assert ev.features == {"fid": "inception-v3-2048"}
    ref = ev.reference(synthetic(0, 4), 32)
    noise = [(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)),
              ["x"] * 4)]
    fid_noise = ev.score(noise, ref)["fid"]
    assert abs(fid_noise) < 1e-6, fid_noise
    sub = manifest(random_eval(samples=4, metrics=["fid"]))
    ev2 = Evaluator(sub.eval, sub, "cpu", log=lambda s: None)
    assert ev2.score(noise, ev2.reference(synthetic(0, 4), 32))["fid"] > 1  # the substitute tells noise from shapes


def test_every_metric_from_weights_files(nets):
    m = manifest(real_eval(nets, samples=4))
    ev = Evaluator(m.eval, m, "cpu", log=lambda s: None)
    assert ev.warnings == []
    assert ev.features == {"fid": "inception-v3-2048", "cmmd": "clip-pixeldiff-tiny-clip",
                           "clip_score": "clip-pixeldiff-tiny-clip", "dino_mmd": f"dino-{DINO_NET}-{DINO_RES}px"}
    images = list(synthetic(0, 4, batch=2))
    ref = ev.reference(images, 32)
    assert ref.clip.shape == (4, 16) and ref.dino.shape == (4, 64) and ref.fid["real_features_num_samples"] == 4
    assert torch.allclose(ref.clip.norm(dim=1), torch.ones(4))
    r = ev.score(images, ref)  # the reference images themselves
    assert abs(r["fid"]) < 1e-3 and abs(r["cmmd"]) < 1e-6 and abs(r["dino_mmd"]) < 1e-6, r
    assert 0 <= r["clip_score"] <= 100 and r["samples"] == 4
    pre = r["preprocess"]
    assert pre["fid"]["input"] == 299 and "antialias" in pre["fid"]["resize"]
    assert pre["clip"]["input"] == 32 and pre["dino"]["input"] == DINO_RES
    cheap = ["cmmd", "clip_score", "dino_mmd"]  # the rest without the (slow) Inception
    other = ev.score(synthetic(500, 4, shift="dark"), ref, metrics=cheap)
    assert other["cmmd"] > 1e-4 and other["dino_mmd"] > 1e-4 and "fid" not in other, other
    assert set(other["features"]) == set(cheap)
    # the CLIP score reads the captions: other prompts, another score
    swapped = ev.score([(x, list(reversed(c))) for x, c in images], ref, metrics=["clip_score"])["clip_score"]
    assert swapped != pytest.approx(r["clip_score"], abs=1e-6)


def test_the_dino_network_and_file_default_to_the_dino_loss(nets):
    m = manifest({"metrics": ["dino_mmd"], "dino": {"resolution": DINO_RES}},
                 dino_loss={"net": DINO_NET, "weights": nets["dino"]})
    ev = Evaluator(m.eval, m, "cpu", log=lambda s: None)
    assert ev.features == {"dino_mmd": f"dino-{DINO_NET}-{DINO_RES}px"} and ev.weights["dino"]["spec"] == nets["dino"]


def test_weights_from_s3(nets, s3_endpoint, tmp_path, monkeypatch):
    from s3server import create_bucket, s3_client

    from pixeldiff.storage import s3_options

    create_bucket(s3_endpoint, "eval-weights")
    for name in ("clip", "dino"):
        s3_client(s3_endpoint).upload_file(nets[name], "eval-weights", f"w/{Path(nets[name]).name}")
    monkeypatch.setenv("PIXELDIFF_CACHE", str(tmp_path / "cache"))
    m = manifest({"metrics": ["cmmd", "clip_score", "dino_mmd"],
                  "clip": {"model": nets["clip_model"], "weights": "s3://eval-weights/w/tiny-clip.pth"},
                  "dino": {"net": DINO_NET, "weights": "s3://eval-weights/w/tiny-dino.pth", "resolution": DINO_RES}})
    logs = []
    ev = Evaluator(m.eval, m, "cpu", storage_options=s3_options(s3_endpoint, None, False), log=logs.append)
    assert sum("fetching s3://eval-weights" in s for s in logs) == 2, logs
    assert ev.features["cmmd"] == "clip-pixeldiff-tiny-clip"
    local = manifest({"metrics": ["cmmd"], "clip": {"model": nets["clip_model"], "weights": nets["clip"]}})
    images = list(synthetic(0, 4))
    a = ev.score(images, ev.reference(images, 32))["cmmd"]
    ev_local = Evaluator(local.eval, local, "cpu", log=lambda s: None)
    # the same file by either route: the same embeddings
    assert torch.equal(ev.reference(images, 32).clip, ev_local.reference(images, 32).clip)
    missing = manifest({"metrics": ["cmmd"], "clip": {"model": nets["clip_model"], "weights": "s3://eval-weights/nope.pth"}})
    with pytest.raises(ConfigError, match=r"^eval\.clip\.weights: s3://eval-weights/nope\.pth does not exist; upload it"):
        Evaluator(missing.eval, missing, "cpu", storage_options=s3_options(s3_endpoint, None, False))
    assert abs(a) < 1e-6
    # the reference statistics cached on S3
    create_bucket(s3_endpoint, "eval-cache")
    ref = ev.reference(images, 32, cache_dir="s3://eval-cache/run/eval", storage_options=s3_options(s3_endpoint, None, False))
    from s3server import list_keys

    assert [k for k in list_keys(s3_endpoint, "eval-cache") if k.startswith("run/eval/reference-32px-")]

    def never():
        raise AssertionError("a cached reference must not read the images")
        yield

    again = ev.reference(never(), 32, cache_dir="s3://eval-cache/run/eval",
                         storage_options=s3_options(s3_endpoint, None, False))
    assert torch.equal(again.clip, ref.clip)


def test_openai_weights_in_a_gelu_model_are_warned_about(nets, tmp_path):
    import shutil

    gelu = tmp_path / "pixeldiff-tiny-clip-gelu.json"
    gelu.write_text(json.dumps({**TINY_CLIP, "quick_gelu": False}))
    shutil.copy(nets["clip"], tmp_path / "tiny-openai.pth")
    for model, warned in ((str(gelu), True), (nets["clip_model"], False)):
        m = manifest({"metrics": ["cmmd"], "clip": {"model": model, "weights": str(tmp_path / "tiny-openai.pth")}})
        ev = Evaluator(m.eval, m, "cpu", log=lambda s: None)
        assert any("trained with QuickGELU" in w for w in ev.warnings) == warned, ev.warnings


def test_a_weights_file_of_another_network_is_a_config_error(nets, tmp_path):
    m = manifest({"metrics": ["cmmd"], "clip": {"model": nets["clip_model"], "weights": nets["dino"]}})
    with pytest.raises(ConfigError, match=r"^eval\.clip\.weights: .*tiny-dino\.pth does not load into open_clip "
                                          r"pixeldiff-tiny-clip .*tools/fetch_weights\.py --nets clip$"):
        Evaluator(m.eval, m, "cpu")
    m = manifest({"metrics": ["fid"], "inception": {"weights": nets["clip"]}})
    with pytest.raises(ConfigError, match=rf"^eval\.inception\.weights: .*is not torch-fidelity's Inception "
                                          rf"\({re.escape(INCEPTION_FILE)}\)"):
        Evaluator(m.eval, m, "cpu")


# ------------------------------------------------------------------ missing weights: exit 2 before training


MISSING_FID = (r"^eval\.inception\.weights: metric 'fid' needs torch-fidelity's Inception "
               rf"\({re.escape(INCEPTION_FILE)}\) and none is given; fetch them with tools/fetch_weights\.py --nets "
               r"inception and set eval\.inception\.weights, or set eval\.without_weights: random_features \(features "
               r"of a random network, comparable only to themselves\), or remove 'fid' from eval\.metrics$")


def test_missing_weights_are_a_config_error_with_the_fix():
    from pixeldiff.weights import preflight

    m = manifest({"metrics": ["fid", "cmmd"]})
    with pytest.raises(ConfigError, match=MISSING_FID):
        preflight(m)
    with pytest.raises(ConfigError, match=MISSING_FID):
        Evaluator(m.eval, m, "cpu")
    m = manifest({"metrics": ["cmmd", "clip_score"]})
    with pytest.raises(ConfigError, match=r"^eval\.clip\.weights: metrics 'cmmd' and 'clip_score' need the CLIP "
                                          r"weights and none is given; .*--nets clip"):
        preflight(m)
    m = manifest({"metrics": ["dino_mmd"]})
    with pytest.raises(ConfigError, match=r"^eval\.dino\.weights: metric 'dino_mmd' needs the DINO weights .*"
                                          r"set eval\.dino\.weights \(or losses\.dino\.weights\)"):
        preflight(m)
    warnings = preflight(manifest(random_eval()))
    assert [w.split(":")[0] for w in warnings] == ["eval.inception.weights", "eval.clip.weights", "eval.dino.weights"]
    assert "clip_score is null" in warnings[1]
    with pytest.raises(ConfigError, match=r"^eval\.inception\.weights: no such file '/nonexistent/i\.pth'; fetch it"):
        preflight(manifest(random_eval(inception={"weights": "/nonexistent/i.pth"})))
    assert preflight(manifest({"enabled": False})) == []


def test_plan_and_run_exit_2_on_missing_eval_weights(tmp_path, capsys):
    from launcher.cli import main

    from conftest import tiny_manifest_dict

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(tiny_manifest_dict(eval={"samples": 8})))
    for argv in (["plan", str(path)], ["run", str(path), "--runs-dir", str(tmp_path / "runs")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(MISSING_FID[1:], err) and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()
    path.write_text(yaml.safe_dump(tiny_manifest_dict(eval={"samples": 8, "without_weights": "random_features"})))
    assert main(["plan", str(path)]) == 0
    assert "warning: eval.inception.weights: none given" in capsys.readouterr().err


# ------------------------------------------------------------------ the reference set and its cache


def shards(root: Path, n_shards=4, per_shard=12) -> str:
    from shardutil import write_shards

    write_shards(root, n_shards, per_shard)
    return str(root / f"train-{{000..{n_shards - 1:03d}}}.tar")


def test_reference_from_the_held_out_training_keys(tmp_path):
    spec = shards(tmp_path / "data")
    m = manifest(random_eval(samples=1000, holdout=0.3, metrics=["fid"]), data={"source": "webdataset", "shards": spec})
    logs = []
    got = [(c, i) for x, caps, idx in reference_batches(m, 32, batch=5, log=logs.append) for c, i in zip(caps, idx)]
    keys = [f"s{s:03d}_{i:03d}" for s in range(4) for i in range(12)]
    expected = [f"sample {k}" for k in keys if held_out(k, 0.3, 0)]
    assert [c for c, _ in got] == expected and [i for _, i in got] == list(range(len(expected)))
    assert any("fewer than eval.samples = 1000" in s for s in logs)
    m = manifest(random_eval(samples=7, shards=spec, metrics=["fid"]))  # eval.shards: every sample, the first 7
    batches = list(reference_batches(m, 32, batch=4))
    assert [x.shape for x, _, _ in batches] == [(4, 3, 32, 32), (3, 3, 32, 32)]
    assert batches[0][0].dtype == torch.uint8
    assert [c for _, caps, _ in batches for c in caps] == [f"sample {k}" for k in keys[:7]]
    from pixeldiff.shardlist import DataError

    m = manifest(random_eval(holdout=1e-9, metrics=["fid"]), data={"source": "webdataset", "shards": spec})
    with pytest.raises(DataError, match=r"^eval: no held-out samples in 4 shards of the training shards' held-out "
                                        r"keys \(eval\.holdout 1e-09\); check eval\.shards, or raise eval\.holdout$"):
        list(reference_batches(m, 32))


def test_reference_statistics_are_cached_by_their_settings(tmp_path):
    m = manifest(random_eval(samples=16, metrics=["fid", "cmmd"]))
    ev = Evaluator(m.eval, m, "cpu", log=lambda s: None)
    cache = tmp_path / "eval"
    ref = ev.reference(reference_batches(m, 32), 32, cache_dir=cache)
    files = sorted(cache.glob("reference-32px-*.pt"))
    assert len(files) == 1

    def never():
        raise AssertionError("a cached reference must not read the images")
        yield

    logs = []
    ev.log = logs.append
    again = ev.reference(never(), 32, cache_dir=cache)
    assert any("from " + str(files[0]) in s for s in logs)
    assert torch.equal(again.clip, ref.clip) and again.captions == ref.captions
    assert torch.equal(again.fid["real_features_cov_sum"], ref.fid["real_features_cov_sum"])
    m2 = manifest(random_eval(samples=12, metrics=["fid", "cmmd"]))  # other settings: another file
    ev2 = Evaluator(m2.eval, m2, "cpu", log=lambda s: None)
    assert ev2.reference(reference_batches(m2, 32), 32, cache_dir=cache).samples == 12
    assert len(list(cache.glob("reference-32px-*.pt"))) == 2
    state = torch.load(files[0], weights_only=True)  # a file whose settings do not match is recomputed
    state["settings"] = state["settings"].replace('"samples": 16', '"samples": 15')
    torch.save(state, files[0])
    logs.clear()
    assert ev.reference(reference_batches(m, 32), 32, cache_dir=cache).samples == 16
    assert any("made with other settings" in s for s in logs)
    files[0].write_bytes(b"garbage")
    logs.clear()
    assert ev.reference(reference_batches(m, 32), 32, cache_dir=cache).samples == 16
    assert any("cannot read the cached reference" in s for s in logs)


# ------------------------------------------------------------------ tools/fetch_weights.py (no network here)


def fetch_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch_weights", REPO / "tools" / "fetch_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fetch_weights_names_the_eval_files_and_their_manifest_lines(nets, tmp_path, capsys):
    import shutil

    tool = fetch_tool()
    assert tool.main(["--dry-run", "--out", str(tmp_path / "w"), "--nets", "inception,clip,dino", "--upload", "s3://b/w"]) == 0
    out = capsys.readouterr().out
    assert tool.INCEPTION_URL in out and "open_clip.create_model('ViT-L-14-336-quickgelu', pretrained='openai')" in out
    lines = yaml.safe_load(out.split("manifest lines:\n", 1)[1])
    assert lines["eval"] == {"inception": {"weights": f"s3://b/w/{INCEPTION_FILE}"},
                             "clip": {"model": "ViT-L-14-336-quickgelu", "weights": "s3://b/w/ViT-L-14-336-quickgelu-openai.pth"}}
    m = manifest({**lines["eval"]}, dino_loss=lines["losses"]["dino"])  # the printed lines are a valid manifest
    from pixeldiff.weights import eval_networks

    assert eval_networks(m)["dino"]["weights"] == "s3://b/w/vit_base_patch14_reg4_dinov2-224.pth"
    # files already there are checked the way the trainer loads them, and kept: nothing is downloaded
    w = tmp_path / "w"
    w.mkdir()
    shutil.copy(nets["inception"], w / INCEPTION_FILE)
    shutil.copy(nets["clip"], w / "pixeldiff-tiny-clip-openai.pth")
    assert tool.main(["--out", str(w), "--nets", "inception,clip", "--clip-model", "pixeldiff-tiny-clip"]) == 0
    out, err = capsys.readouterr()
    assert "already present and good" in out and "loads strictly into open_clip pixeldiff-tiny-clip" in out, out + err
    assert "does not start with 6726825d" in err  # a random Inception is not the published file
    (w / INCEPTION_FILE).write_bytes(b"not a weights file")

    def offline(url, dest):  # the network is the boundary: never download from a test
        raise tool.FetchError(f"downloading {url} failed: offline")

    tool.download = offline
    assert tool.main(["--out", str(w), "--nets", "inception"]) == 1
    out, err = capsys.readouterr()
    assert "present but unusable" in out and f"error: downloading {tool.INCEPTION_URL} failed: offline" in err


# ------------------------------------------------------------------ 2 gloo ranks = 1 process


def two_rank_manifest(nets, spec: str) -> Manifest:
    return manifest({"samples": 16, "holdout": 0.5, "batch": 3, "metrics": ["fid", "cmmd", "clip_score", "dino_mmd"],
                     "without_weights": "random_features",  # FID on the substitute: the Inception is slow here
                     "clip": {"model": nets["clip_model"], "weights": nets["clip"]},
                     "dino": {"net": DINO_NET, "weights": nets["dino"], "resolution": DINO_RES}},
                    data={"source": "webdataset", "shards": spec})


def evaluate_here(m: Manifest, rank: int = 0, world: int = 1) -> dict:
    ev = Evaluator(m.eval, m, "cpu", log=lambda s: None)
    ref = ev.reference(reference_batches(m, 32, rank=rank, world=world, log=lambda s: None), 32)
    mine = [(x, c) for j, (x, c) in enumerate(synthetic(0, 30, batch=4)) if j % world == rank]
    result = ev.score(mine, ref)
    result["captions"] = ref.captions
    return result


def test_two_gloo_ranks_give_the_single_process_values(nets, tmp_path):
    from distutil import BASE_ENV, free_port

    spec = shards(tmp_path / "data", n_shards=5, per_shard=8)
    (tmp_path / "nets.json").write_text(json.dumps({**nets, "spec": spec}))
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, __file__, "rank", str(tmp_path)], cwd=REPO, text=True,
                              env={**os.environ, **BASE_ENV, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    single = evaluate_here(two_rank_manifest(nets, spec))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank returns the same numbers
    two = ranks[0]
    assert two["captions"] == single["captions"] and len(single["captions"]) == 16
    assert two["samples"] == single["samples"] == 30 and two["reference_samples"] == 16
    for k in ("fid", "cmmd", "clip_score", "dino_mmd"):
        assert two[k] == pytest.approx(single[k], rel=1e-5, abs=1e-9), (k, two[k], single[k])
    assert single["fid"] > 0 and single["cmmd"] > 0 and single["clip_score"] > 0


def _rank_main(out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    nets = json.loads((Path(out) / "nets.json").read_text())
    result = evaluate_here(two_rank_manifest(nets, nets["spec"]), dist.get_rank(), dist.get_world_size())
    (Path(out) / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["rank"]:
    from pixeldiff.process import leave

    _rank_main(sys.argv[2])
    leave(0)  # as the trainer's ranks leave: the interpreter's teardown can abort in gloo's threads (SIGABRT)
