"""The rest of the published recipe: TREAD routing, self-guidance, REPA (model level, then the trainer on the CPU)."""
import pytest
import torch
import yaml

from launcher.cli import main as launch_main
from pixeldiff.config import ObjectiveConfig
from pixeldiff.ema import EMA
from pixeldiff.ledger import read_jsonl
from pixeldiff.model import ModelConfig, PixelDiT
from pixeldiff.objective import XPrediction, sample, tread_route

DEPTH4 = ModelConfig(preset="test", depth=4)  # width 32, patch 4, 4 blocks


def inputs(batch=2, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, side, side, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, 5, 8, generator=g), torch.tensor([[True] * 3 + [False] * 2] * batch))


def lively(model: PixelDiT) -> PixelDiT:
    """The zero-initialised modulation and final layers make every block the identity at init: randomise them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


# ------------------------------------------------------------------ TREAD in the model


def test_routed_tokens_skip_the_span_and_rejoin_unchanged():
    torch.manual_seed(0)
    model = lively(PixelDiT(DEPTH4, text_dim=8, tread_span=(1, 2)))
    x, t, text, mask = inputs()
    route = tread_route(2, 16, 0.5, torch.Generator().manual_seed(3))
    seen, entering, leaving = [], {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: seen.append((i, args[0].shape[1])))
    model.blocks[0].register_forward_hook(lambda mod, args, out: entering.update(x=out.detach()))
    model.blocks[3].register_forward_pre_hook(lambda mod, args: leaving.update(x=args[0].detach()))
    model(x, t, text, mask, route=route)
    assert seen == [(0, 16), (1, 8), (2, 8), (3, 16)]  # the span's blocks see only the kept half
    routed = torch.ones(2, 16, dtype=torch.bool)
    routed[torch.arange(2)[:, None], route] = False
    assert routed.sum() == 16
    assert torch.equal(leaving["x"][routed], entering["x"][routed])  # skipped tokens rejoin exactly as they left
    assert not torch.allclose(leaving["x"][~routed], entering["x"][~routed])  # the kept ones were processed
    seen.clear()
    model(x, t, text, mask)
    assert seen == [(i, 16) for i in range(4)]  # no route: dense


def test_routing_every_token_in_any_order_is_the_dense_model():
    """RoPE positions travel with the tokens: a route keeping all tokens, shuffled, computes the dense function."""
    torch.manual_seed(0)
    model = lively(PixelDiT(DEPTH4, text_dim=8, tread_span=(1, 2)))
    x, t, text, mask = inputs()
    perm = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    torch.testing.assert_close(model(x, t, text, mask, route=perm), model(x, t, text, mask), rtol=1e-5, atol=1e-5)
    wrong = PixelDiT(DEPTH4, text_dim=8, tread_span=(1, 2))
    wrong.load_state_dict(model.state_dict())
    wrong._rope = lambda h, w, *key: tuple(c[torch.randperm(h * w)] for c in model._rope(h, w, *key))
    assert not torch.allclose(wrong(x, t, text, mask, route=perm), model(x, t, text, mask), atol=1e-3)


def test_the_route_is_a_function_of_the_generator():
    a = tread_route(4, 64, 0.5, torch.Generator().manual_seed(5))
    b = tread_route(4, 64, 0.5, torch.Generator().manual_seed(5))
    c = tread_route(4, 64, 0.5, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, 32)
    for row in a:
        assert torch.equal(row, row.unique())  # ascending, no token twice
    assert not torch.equal(a[0], a[1])  # each sample its own tokens
    assert tread_route(1, 10, 0.75, torch.Generator().manual_seed(0)).shape == (1, 2)


# ------------------------------------------------------------------ REPA in the model


@pytest.mark.parametrize("repa_at,span,routed,count", [(2, (1, 2), True, 8), (0, (1, 2), True, 8), (3, (1, 2), False, 16)])
def test_the_projector_sees_the_chosen_block_and_only_the_routed_spans_tokens(repa_at, span, routed, count):
    torch.manual_seed(0)
    model = PixelDiT(DEPTH4, text_dim=8, repa_dims=(24, 12), tread_span=span)
    x, t, text, mask = inputs()
    route = tread_route(2, 16, 0.5, torch.Generator().manual_seed(3)) if routed else None
    captured = {}
    model.blocks[repa_at].register_forward_hook(lambda mod, args, out: captured.update(out=out))
    out, projected, tokens = model(x, t, text, mask, route=route, repa_at=repa_at)
    assert out.shape == x.shape and projected.shape == (2, count, 12)
    assert (tokens is None) == (not routed) and (tokens is None or torch.equal(tokens, route))
    hidden = captured["out"] if captured["out"].shape[1] == count else \
        captured["out"].gather(1, route[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(projected, model.repa(hidden))


def test_the_ema_and_the_sampler_model_leave_the_projector_out():
    torch.manual_seed(0)
    model = PixelDiT(DEPTH4, text_dim=8, repa_dims=(24, 12))
    assert any(n.startswith("repa.") for n, _ in model.named_parameters())
    ema = EMA(model, 0.5)
    assert ema.module.repa is None and not any(k.startswith("repa.") for k in ema.module.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, 1)
    before = dict(PixelDiT(DEPTH4, text_dim=8).named_parameters())
    for name, p in ema.module.named_parameters():
        torch.testing.assert_close(p, dict(model.named_parameters())[name] - 0.5)  # halfway to the moved weights
        assert name in before
    PixelDiT(DEPTH4, text_dim=8).load_state_dict(ema.module.state_dict())  # the sampler's model, strictly


# ------------------------------------------------------------------ self-guidance


class RouteAware(torch.nn.Module):
    """x0_hat = 0.2 dense, 0.6 routed: the guided prediction must be routed + s (dense - routed)."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, text, mask, route=None):
        self.calls.append(None if route is None else route.shape)
        return torch.full_like(x, 0.6 if route is not None else 0.2)


def test_self_guidance_guides_with_the_dense_against_the_routed_prediction():
    obj = XPrediction(ObjectiveConfig(shift_base=1.0, shift_reference_px=4), torch.zeros(2, 3), torch.zeros(2, dtype=torch.bool))
    text, mask = torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool)
    routes = lambda k: torch.arange(2)[None]  # noqa: E731
    model = RouteAware()
    out = sample(model, obj, text, mask, 4, steps=1, cfg_scale=3.0, noise=torch.zeros(1, 3, 4, 4), guidance="self",
                 routes=routes)
    # one Euler step from t=1 to 0 lands on the guided x0: 0.6 + 3 (0.2 - 0.6) = -0.6
    torch.testing.assert_close(out, torch.full((1, 3, 4, 4), -0.6))
    assert model.calls == [None, (1, 2)]  # a dense and a routed pass, both with the prompt
    with pytest.raises(ValueError, match="routes"):
        sample(model, obj, text, mask, 4, steps=1, guidance="self")


# ------------------------------------------------------------------ manifest errors


@pytest.mark.parametrize("sections,message", [
    ({"tread": {"ratio": 1.0}}, "tread.ratio: the fraction of image tokens routed past the span must be in [0, 1)"),
    ({"tread": {"ratio": 0.5, "start_block": 3, "end_block": 1}, "model": {"depth": 4}},
     "tread: the span starts at block 3 after it ends at block 1"),
    ({"tread": {"ratio": 0.5, "end_block": 9}, "model": {"depth": 4}}, "must be blocks of the 4-block model"),
    ({"logging": {"sample_guidance": "self"}}, "logging.sample_guidance: 'self' guides with the dense vs the routed"),
    ({"losses": {"repa": {"weight": 0.5, "block": 7}}}, "losses.repa.block: 7 is not a block of a 2-block model"),
    ({"losses": {"repa": {"weight": -1}}}, "losses.repa.weight: must be >= 0"),
    ({"losses": {"repa": {"weight": 0.5, "block": 0, "net": "no_such_vit"}}}, "losses.repa.net: 'no_such_vit' is not a timm model name"),
    ({"losses": {"repa": {"weight": 0.5, "block": 0, "weights": "/nonexistent/dinov3.pth"}}}, "losses.repa.weights: no such file"),
])
def test_recipe_manifest_errors_name_the_key_and_the_fix(write_manifest, capsys, sections, message):
    assert launch_main(["plan", str(write_manifest(**sections))]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ------------------------------------------------------------------ the trainer

TEACHER = "vit_tiny_patch16_dinov3_qkvb"  # a small DINOv3 for the CPU; random init (warned)


def recipe_sections(**extra):
    """TREAD on, REPA on in the first stage only (the speedrun's shape), Muon for the blocks, self-guided grids."""
    stages = [{"name": "16px", "resolution": 16, "global_batch": 8, "micro_batch": 4, "steps": extra.pop("s1", 30)},
              {"name": "32px", "resolution": 32, "global_batch": 8, "micro_batch": 4, "steps": extra.pop("s2", 10),
               "repa": False}]
    return {"stages": stages, "model": {"preset": "test", "depth": 4},
            "tread": {"ratio": 0.5, "start_block": 1, "end_block": -2},
            "losses": {"repa": {"weight": 0.5, "block": 1, "projector_dim": 32, "net": TEACHER}},
            "logging": {"sample_guidance": "self", "sample_steps": 2},
            "optimizer": {"name": "muon", "muon_lr": 1e-3, "lr": 1e-3, "warmup_steps": 5, "grad_clip": 1.0,
                          "ema_decay": 0.9}, **extra}


def test_a_run_with_tread_and_repa_trains_aligns_and_samples(write_manifest, tmp_path, capsys):
    manifest = write_manifest(name="recipe", **recipe_sections(s1=60, s2=6))
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "losses.repa: weight 0.5 but no weights file" in out and "RANDOMLY" in out
    rows = read_jsonl(tmp_path / "recipe" / "metrics.jsonl")
    first = [r for r in rows if r["stage"] == "16px"]
    assert all("loss_repa" in r for r in first) and not any("loss_repa" in r for r in rows if r["stage"] == "32px")
    early = sum(r["loss_repa"] for r in first[:10]) / 10
    late = sum(r["loss_repa"] for r in first[-10:]) / 10
    assert late < 0.8 * early, (early, late)  # the projector learns the teacher's features
    assert (tmp_path / "recipe" / "samples" / "step-00000066.png").exists()
    events = read_jsonl(tmp_path / "recipe" / "ledger.jsonl")
    assert any(e["event"] == "warning" and "losses.repa" in e["message"] for e in events)


def test_every_switch_on_resumes_bit_identical(write_manifest, tmp_path):
    from test_train import resume_and_compare, start_and_interrupt

    manifest = write_manifest(name="switches", **recipe_sections(s1=60, s2=20))
    stopped = start_and_interrupt(manifest, tmp_path / "cut", 35, "SIGTERM")
    resume_and_compare(manifest, tmp_path, stopped)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process_with_every_switch_on(write_manifest, tmp_path, parallel):
    from test_distributed import torchrun, weights

    from launcher.cli import prepare_run_dir
    from launcher.manifest import load_manifest

    manifest = write_manifest(name="switches", cluster={"parallel": parallel},
                              **recipe_sections(s1=6, s2=3, checkpoint={"interval_steps": 9}))
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path / "one")]) == 0
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "two")
    proc = torchrun(run_dir, 2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    one, two = read_jsonl(tmp_path / "one" / "switches" / "metrics.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in two] == list(range(1, 10))
    for a, b in zip(one, two):
        for k in ("loss", "loss_mse", "loss_repa"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a, b)
    wa, wb = weights(tmp_path / "one" / "switches"), weights(run_dir)
    assert any(k.startswith("repa.") for k in wa)  # the projector is trained and checkpointed with the model
    for k in wa:
        if k.startswith("blocks.") and wa[k].ndim == 2:
            # Muon's matrices: its bf16 Newton-Schulz magnifies the other summation order of the reduced gradients
            # (about 10% of 9 steps' movement here); tests/test_muon.py proves the same update to the bit
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=2e-3)
        else:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_the_teacher_loads_a_timm_state_dict_strictly_and_features_match_the_token_grid(tmp_path):
    import timm

    from pixeldiff.config import RepaLossConfig
    from pixeldiff.perceptual import load_weights_file
    from pixeldiff.repa import RepaTeacher

    torch.manual_seed(11)
    net = timm.create_model(TEACHER, pretrained=False, num_classes=0, dynamic_img_size=True)
    torch.save(net.state_dict(), tmp_path / "teacher.pth")  # what tools/fetch_weights.py --nets repa writes
    sd = load_weights_file(tmp_path / "teacher.pth", "losses.repa.weights")
    teacher = RepaTeacher(RepaLossConfig(weight=0.5, net=TEACHER), 4, "cpu", state_dict=sd)
    x0 = torch.rand(2, 3, 16, 24) * 2 - 1
    feats = teacher.features(x0)
    assert feats.shape == (2, 4 * 6, 192)  # the model's 4 x 6 token grid at patch 4, token for token
    random = RepaTeacher(RepaLossConfig(weight=0.5, net=TEACHER), 4, "cpu")
    assert not torch.allclose(random.features(x0), feats)  # the file's weights, not the random init
    sd.pop(next(iter(sd)))
    with pytest.raises(Exception, match="losses.repa.weights"):
        RepaTeacher(RepaLossConfig(weight=0.5, net=TEACHER), 4, "cpu", state_dict=sd)
    loss = teacher.loss(feats.clone().requires_grad_(), x0, None)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)  # aligned to itself: 1 - cos = 0


def test_fetch_weights_knows_the_repa_teacher(tmp_path, capsys):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("fetch_weights", REPO / "tools" / "fetch_weights.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--dry-run", "--out", str(tmp_path / "w"), "--nets", "repa", "--upload", "s3://bkt/w"]) == 0
    out = capsys.readouterr().out
    assert "timm.create_model('vit_large_patch16_dinov3', pretrained=True, num_classes=0, dynamic_img_size=True)" in out
    assert yaml.safe_load(out.split("manifest lines:\n", 1)[1])["losses"]["repa"] == {
        "net": "vit_large_patch16_dinov3", "weights": "s3://bkt/w/vit_large_patch16_dinov3.pth"}


# ------------------------------------------------------------------ precomputed caption embeddings


def test_a_run_on_precomputed_embeddings_samples_its_prompts_with_the_encoder_that_made_them(write_manifest, tmp_path,
                                                                                               capsys):
    import subprocess
    import sys

    from conftest import REPO
    from shardutil import write_shards

    from pixeldiff.sample import main as sample_main

    write_shards(tmp_path / "raw", n_shards=2, per_shard=12)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "embed_captions.py"), str(tmp_path / "raw" / "train-{000..001}.tar"),
                           "--out", str(tmp_path / "emb" / "train"), "--encoder", "builtin", "--dim", "16",
                           "--max-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = {"encoder": "precomputed", "max_tokens": 8, "dim": 16}
    data = {"source": "webdataset", "shards": str(tmp_path / "emb" / "train-{000..001}.tar"), "workers": 0,
            "text": text}
    assert launch_main(["plan", str(write_manifest(name="noenc", data=data))]) == 2
    assert "data.text: a run on precomputed caption embeddings must embed its sample prompts" in capsys.readouterr().err
    manifest = write_manifest(name="pre", steps=(6, 2), data={**data, "text": {**text, "embedded_by": "builtin"}})
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path / "runs")]) == 0
    assert (tmp_path / "runs" / "pre" / "samples" / "step-00000008.png").exists()
    capsys.readouterr()
    out = tmp_path / "grid.png"
    assert sample_main([str(tmp_path / "runs" / "pre"), "--prompt", "a blue square", "--out", str(out), "--steps", "2",
                        "--per-prompt", "2"]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out


def test_prompt_embeddings_from_a_file_and_a_prompt_it_lacks(tmp_path):
    from pixeldiff.config import ConfigError, TextConfig
    from pixeldiff.text import BuiltinTextEncoder, PromptTable, make_text_encoder, save_prompt_table

    made_by = BuiltinTextEncoder(16, 8)
    save_prompt_table(made_by, ["a red circle", "a blue square"], tmp_path / "prompts.pt")
    enc = make_text_encoder(TextConfig(encoder="precomputed", max_tokens=8, dim=16,
                                       prompt_embeddings=str(tmp_path / "prompts.pt")), "cpu")
    assert isinstance(enc, PromptTable)
    emb, mask = enc.encode(["a blue square", "a red circle"])
    ref, ref_mask = made_by.encode(["a blue square", "a red circle"])
    torch.testing.assert_close(emb, ref.half().float())
    assert torch.equal(mask, ref_mask)
    with pytest.raises(ConfigError, match="no embedding for the prompt 'a green star'"):
        enc.encode(["a green star"])
    with pytest.raises(ConfigError, match=r"this run takes \(2, 8, 32\)"):
        make_text_encoder(TextConfig(encoder="precomputed", max_tokens=8, dim=32,
                                     prompt_embeddings=str(tmp_path / "prompts.pt")), "cpu")


def test_plan_shows_the_published_schedule_and_says_it_ends_inside_the_budget(capsys):
    import json

    from conftest import REPO

    speedrun = str(REPO / "manifests" / "speedrun.yaml")
    assert launch_main(["plan", speedrun, "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["resolution"], r["global_batch"], r["steps"]) for r in p["stages"]] == [
        ("512px", 512, 1024, 100_000), ("1024px", 1024, 512, 20_000)]
    assert p["total_usd"] < 0.8 * p["budget"]["usd"]
    (note,) = p["notes"]
    assert note.startswith("the schedule ends inside the budget") and "extend_last_stage" in note
    assert launch_main(["plan", speedrun, "--json", "--set", "budget.policy=extend_last_stage"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["stages"][0]["steps"] == 100_000 and e["stages"][1]["steps"] == 20_000 + e["extended_steps"]
    assert 0.95 * e["budget"]["usd"] < e["total_usd"] <= e["budget"]["usd"]  # the rest of the budget is spent


def test_embed_prompts_writes_the_file_a_precomputed_run_reads(tmp_path, write_manifest, capsys):
    import subprocess
    import sys

    from conftest import REPO

    from pixeldiff.config import TextConfig
    from pixeldiff.text import BuiltinTextEncoder, make_text_encoder

    text = {"encoder": "precomputed", "max_tokens": 8, "dim": 16, "prompt_embeddings": str(tmp_path / "p.pt")}
    manifest = write_manifest(name="pre", data={"source": "webdataset", "shards": "x-{0..1}.tar", "text": text})
    tool = [sys.executable, str(REPO / "tools" / "embed_prompts.py"), str(manifest), "--out", str(tmp_path / "p.pt")]
    proc = subprocess.run([*tool, "--prompt", "a green star"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"data.text.prompt_embeddings: {tmp_path / 'p.pt'}" in proc.stdout
    enc = make_text_encoder(TextConfig(**text), "cpu")
    emb, mask = enc.encode(["a red circle on black", "a green star"])  # the manifest's prompt, and the extra one
    ref, ref_mask = BuiltinTextEncoder(16, 8).encode(["a red circle on black", "a green star"])
    torch.testing.assert_close(emb, ref.half().float())
    assert torch.equal(mask, ref_mask)
    bad = subprocess.run([*tool, "--dim", "32"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "the manifest's data.text has dim 16" in bad.stderr and "Traceback" not in bad.stderr
