"""PixelDiT: shapes, patching, RoPE, text masking, sizes/FLOPs, config errors, torch.compile."""

import shutil

import pytest
import torch

import pixeldiff.model as model_module
from pixeldiff.model import (
    PRESETS,
    ModelConfig,
    PixelDiT,
    apply_rope,
    forward_flops,
    patchify,
    resolve_model_config,
    rope_2d,
    unpatchify,
)
from pixeldiff.text import BuiltinTextEncoder

TEXT_DIM = 16
TEXT_LEN = 8


def make_model(seed=0, perturb=False) -> PixelDiT:
    torch.manual_seed(seed)
    model = PixelDiT(ModelConfig("test"), TEXT_DIM).eval()
    if perturb:
        # adaLN-zero: every modulation and the final linear start at zero, so the blocks are the
        # identity and the output is 0. Give them small random values so every path is live.
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modulation" in name or name.startswith("final.linear"):
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def make_inputs(batch=2, res=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, res, res, generator=g)
    t = torch.rand(batch, generator=g)
    enc = BuiltinTextEncoder(dim=TEXT_DIM, max_tokens=TEXT_LEN)
    text, mask = enc.encode(["a red circle on black", "a blue square"][:batch] + ["x"] * max(0, batch - 2))
    return x, t, text, mask


# ------------------------------------------------------------------ patchify


@pytest.mark.parametrize("res,p", [(16, 4), (32, 8), (64, 32), (24, 4)])
def test_patchify_roundtrip_exact(res, p):
    x = torch.randn(2, 3, res, res)
    tokens = patchify(x, p)
    assert tokens.shape == (2, (res // p) ** 2, p * p * 3)
    back = unpatchify(tokens, p, res // p, res // p)
    assert torch.equal(back, x)


def test_patchify_token_is_one_patch():
    # token (i, j) holds exactly the pixels of patch (i, j), channels last
    p, res = 4, 12
    x = torch.arange(2 * 3 * res * res, dtype=torch.float32).reshape(2, 3, res, res)
    tokens = patchify(x, p)
    h = res // p
    for i, j in [(0, 0), (1, 2), (2, 1)]:
        patch = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # (B, 3, p, p)
        expected = patch.permute(0, 2, 3, 1).reshape(2, -1)
        assert torch.equal(tokens[:, i * h + j], expected)


def test_unpatchify_non_square():
    x = torch.randn(1, 3, 8, 16)
    t = patchify(x, 4)
    assert t.shape == (1, 8, 48)
    assert torch.equal(unpatchify(t, 4, 2, 4), x)


# ------------------------------------------------------------------ forward


def test_output_shape_several_resolutions_same_weights():
    model = make_model(perturb=True)
    for res in (16, 32, 64):
        x, t, text, mask = make_inputs(res=res)
        with torch.no_grad():
            out = model(x, t, text, mask)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()
        assert out.abs().max() > 0
    # the grid grows with resolution; the RoPE cache holds one table per grid
    assert {k[:2] for k in model._rope_cache} == {(4, 4), (8, 8), (16, 16)}


def test_zero_init_output_is_exactly_zero():
    model = make_model(perturb=False)
    x, t, text, mask = make_inputs()
    with torch.no_grad():
        out = model(x, t, text, mask)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0


def test_output_depends_on_real_text_tokens_only():
    model = make_model(perturb=True)
    x, t, text, mask = make_inputs(batch=2)
    # caption 1 ("a blue square") has 3 real tokens, so positions 3.. are padding
    assert mask[1].tolist() == [True] * 3 + [False] * (TEXT_LEN - 3)
    with torch.no_grad():
        base = model(x, t, text, mask)

        padded = text.clone()
        padded[1, 5] = 100 * torch.randn(TEXT_DIM)
        out_pad = model(x, t, padded, mask)

        real = text.clone()
        real[1, 1] = torch.randn(TEXT_DIM)
        out_real = model(x, t, real, mask)

    torch.testing.assert_close(out_pad, base, rtol=0, atol=1e-6)
    # only sample 1 changed, and only through its real token
    torch.testing.assert_close(out_real[0], base[0], rtol=0, atol=1e-6)
    assert (out_real[1] - base[1]).abs().max() > 1e-3


def test_output_depends_on_time():
    model = make_model(perturb=True)
    x, t, text, mask = make_inputs()
    with torch.no_grad():
        a = model(x, t, text, mask)
        b = model(x, t * 0.5, text, mask)
    assert (a - b).abs().max() > 1e-3


def test_batch_elements_independent():
    model = make_model(perturb=True)
    x, t, text, mask = make_inputs(batch=2)
    with torch.no_grad():
        both = model(x, t, text, mask)
        first = model(x[:1], t[:1], text[:1], mask[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-6)


def test_empty_caption_gives_finite_output():
    model = make_model(perturb=True)
    x, t, _, _ = make_inputs()
    text, mask = BuiltinTextEncoder(dim=TEXT_DIM, max_tokens=TEXT_LEN).encode(["", ""])
    assert not mask.any()
    with torch.no_grad():
        out = model(x, t, text, mask)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ RoPE


def test_rope_tables_shape_and_rows_cols():
    cos, sin = rope_2d(3, 5, 16, 1e4, torch.device("cpu"))
    assert cos.shape == sin.shape == (15, 8)
    # position 0 is the identity rotation
    assert torch.equal(cos[0], torch.ones(8)) and torch.equal(sin[0], torch.zeros(8))
    # first half of the angles follows the row, second half the column
    ang = torch.atan2(sin, cos)
    row1_col0 = ang[1 * 5 + 0]
    row0_col1 = ang[0 * 5 + 1]
    assert torch.all(row1_col0[4:] == 0) and row1_col0[0] == pytest.approx(1.0)
    assert torch.all(row0_col1[:4] == 0) and row0_col1[4] == pytest.approx(1.0)


def test_rope_preserves_norm():
    g = torch.Generator().manual_seed(0)
    h, w, hd = 4, 6, 16
    cos, sin = rope_2d(h, w, hd, 1e4, torch.device("cpu"))
    x = torch.randn(2, 3, h * w, hd, generator=g)
    y = apply_rope(x, cos, sin)
    assert y.shape == x.shape
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert (y - x).abs().max() > 1e-2  # it does rotate


def _rope_at(vec, pos, hd, theta=1e4):
    """Rotate one head vector as if it sat at patch-grid position pos=(row, col)."""
    r, c = pos
    cos, sin = rope_2d(r + 1, c + 1, hd, theta, torch.device("cpu"))
    idx = r * (c + 1) + c
    return apply_rope(vec[None, None, None], cos[idx:idx + 1], sin[idx:idx + 1])[0, 0, 0]


@pytest.mark.parametrize("d", [(0, 1), (2, 0), (3, -2), (1, 5)])
def test_rope_scores_depend_on_relative_position_only(d):
    g = torch.Generator().manual_seed(1)
    hd = 16
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    scores = []
    for p in [(0, 2), (4, 3), (7, 9)]:
        p2 = (p[0] + d[0], p[1] + d[1])
        scores.append(torch.dot(_rope_at(q, p, hd), _rope_at(k, p2, hd)).item())
    assert scores[1] == pytest.approx(scores[0], abs=1e-4)
    assert scores[2] == pytest.approx(scores[0], abs=1e-4)
    # and a different offset gives a different score
    other = torch.dot(_rope_at(q, (0, 2), hd), _rope_at(k, (0 + d[0] + 1, 2 + d[1]), hd)).item()
    assert abs(other - scores[0]) > 1e-3


def test_rope_keeps_dtype():
    cos, sin = rope_2d(2, 2, 8, 1e4, torch.device("cpu"))
    x = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    assert apply_rope(x, cos, sin).dtype == torch.bfloat16


def test_bf16_rope_adds_little_to_the_score_error_that_bf16_attention_already_has():
    """q and k are rotated in bf16 (no fp32 round trip). Attention reads bf16 q and k in any case, so the floor is
    the score error of rotating exactly and rounding to bf16; rotating in bf16 must stay within 1.7x of it (measured
    1.47x), and far from an error that would move the scores (their spread is sqrt(head_dim) = 8)."""
    g = torch.Generator().manual_seed(0)
    cos, sin = rope_2d(32, 32, 64, 1e4, torch.device("cpu"))
    q, k = (torch.randn(2, 4, 1024, 64, generator=g).bfloat16() for _ in range(2))
    exact = lambda x: apply_rope(x.double(), cos.double(), sin.double())  # noqa: E731
    scores = exact(q) @ exact(k).transpose(-1, -2)

    def score_error(qr, kr):
        return (qr.double() @ kr.double().transpose(-1, -2) - scores).abs().mean().item()

    floor = score_error(exact(q).bfloat16(), exact(k).bfloat16())
    ours = score_error(apply_rope(q, cos, sin), apply_rope(k, cos, sin))
    assert apply_rope(q, cos, sin).dtype == torch.bfloat16
    assert floor < ours < 1.7 * floor, (floor, ours)
    assert ours < 0.05


def test_the_model_rotates_in_the_autocast_dtype_and_gives_the_fp32_output_within_bf16_error(monkeypatch):
    model = make_model(perturb=True)
    x, t, text, mask = make_inputs()
    with torch.no_grad():
        ref = model(x, t, text, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, text, mask)
    assert {k[-1] for k in model._rope_cache} == {torch.float32, torch.bfloat16}
    # autocast may run RMSNorm in fp32 (CUDA's lists differ from the CPU's): q and k are still rotated in bf16
    seen = []
    rope = model_module.apply_rope
    monkeypatch.setattr(model_module, "apply_rope", lambda x, c, s: seen.append((x.dtype, c.dtype)) or rope(x, c, s))
    for block in model.blocks:
        for norm in (block.attn.q_norm, block.attn.k_norm):
            monkeypatch.setattr(norm, "forward", lambda x, f=norm.forward: f(x).float())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, text, mask)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}, set(seen)
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05, err


# ------------------------------------------------------------------ sizes and FLOPs


def test_jit32_param_count_and_flops():
    with torch.device("meta"):
        model = PixelDiT(ModelConfig("JiT-32"), 2304)
    n = model.num_params()
    assert 1.1e9 <= n <= 1.25e9, n
    text_len = 128
    f512 = model.flops_per_sample(512, text_len)
    f1024 = model.flops_per_sample(1024, text_len)
    assert f512 == forward_flops(model.cfg, 2304, 512, text_len)
    # 4x the tokens, a little more for attention
    assert 4.0 < f1024 / f512 < 5.0, f1024 / f512
    # Order of magnitude: matmul FLOPs ~ 2 * params * tokens. Not all parameters touch every image
    # token (adaLN modulation and the time MLP run once per sample, text K/V once per text token),
    # so the ratio sits a bit below 1.
    # Tighter: 2 * (parameters applied to every image token) * tokens, plus attention and text (+5..20%).
    per_token = sum(p.numel() for name, p in model.named_parameters()
                    if name.endswith("weight") and (name.startswith(("patch_embed", "final.linear"))
                                                    or any(k in name for k in (".qkv.", ".proj.", ".mlp."))))
    for res, f in ((512, f512), (1024, f1024)):
        tokens = (res // 32) ** 2
        assert 0.5 < f / (2 * n * tokens) < 1.5, (res, f / (2 * n * tokens))
        ratio = f / (2 * per_token * tokens)
        assert 1.0 < ratio < 1.25, (res, ratio)


@pytest.mark.parametrize("preset,res,text_len", [("test", 32, 8), ("tiny", 64, 16), ("tiny", 128, 5)])
def test_forward_flops_matches_flop_counter(preset, res, text_len):
    """forward_flops against torch's FlopCounterMode on a real forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = PixelDiT(ModelConfig(preset), TEXT_DIM)
    x = torch.randn(1, 3, res, res)
    text, mask = torch.randn(1, text_len, TEXT_DIM), torch.ones(1, text_len, dtype=torch.bool)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, torch.rand(1), text, mask)
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    counted = fc.get_total_flops()
    c = model.cfg
    n = (res // c.patch_size) ** 2
    if not any("attention" in k for k in counts):  # the CPU SDPA kernel is not counted: add QK^T and AV
        counted += c.depth * 2 * (2 * n * (n + text_len) * c.width)
    # forward_flops leaves out the time MLP (256 -> w -> w, once per sample); everything else must agree
    t_mlp = 2 * (256 * c.width + c.width * c.width)
    assert model.flops_per_sample(res, text_len) == pytest.approx(counted - t_mlp, rel=1e-9)


def test_forward_flops_grows_with_every_size_knob():
    base = forward_flops(ModelConfig("tiny"), 64, 256, 16)
    assert forward_flops(ModelConfig("tiny", depth=8), 64, 256, 16) > 1.9 * base
    assert forward_flops(ModelConfig("tiny"), 64, 256, 32) > base
    assert forward_flops(ModelConfig("tiny", width=256), 64, 256, 16) > 2.5 * base


def test_presets_resolve_and_param_counts_increase():
    counts = []
    for name in ("test", "tiny", "S/32", "B/32", "L/32"):
        cfg = resolve_model_config(ModelConfig(name))
        assert all(getattr(cfg, k) is not None for k in PRESETS[name])
        with torch.device("meta"):
            counts.append(PixelDiT(ModelConfig(name), 64).num_params())
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_override_applies():
    cfg = resolve_model_config(ModelConfig("tiny", depth=7, patch_size=16))
    assert (cfg.depth, cfg.patch_size, cfg.width) == (7, 16, PRESETS["tiny"]["width"])


# ------------------------------------------------------------------ config errors


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        resolve_model_config(ModelConfig("huge"))
    msg = str(e.value)
    assert "'huge'" in msg
    for name in PRESETS:
        assert name in msg


def test_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="not divisible by heads"):
        resolve_model_config(ModelConfig("tiny", width=130, heads=4))


def test_head_dim_not_multiple_of_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        resolve_model_config(ModelConfig("tiny", width=120, heads=4))  # head dim 30


def test_nonpositive_sizes_rejected():
    with pytest.raises(ValueError, match="> 0"):
        resolve_model_config(ModelConfig("tiny", mlp_ratio=0.0))
    with pytest.raises(ValueError, match="> 0"):
        resolve_model_config(ModelConfig("tiny", depth=-1))


# ------------------------------------------------------------------ torch.compile


def test_compile_matches_eager():
    """torch.compile of the 'test' preset must agree with eager. Needs a C compiler for the CPU backend;
    without one this FAILS (loudly) rather than skipping, so a machine that cannot compile is noticed."""
    assert shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"), \
        "torch.compile on CPU needs a C compiler (cc/gcc/clang) and none was found"
    model = make_model(perturb=True)
    x, t, text, mask = make_inputs(res=16)
    with torch.no_grad():
        eager = model(x, t, text, mask)
        compiled = torch.compile(model, fullgraph=True)(x, t, text, mask)  # no graph breaks either
    assert compiled.shape == eager.shape
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
    assert eager.abs().max() > 1e-3


def test_the_compiled_model_compiles_each_shape_once():
    """The RoPE tables' cache is not part of the compiled graph: a second call at the same shape runs the first's
    graph (the cache's first fill used to fail a guard and compile every resolution twice: minutes per stage on a
    GPU), and a new resolution compiles once more. A counting backend: no inductor, only the graphs dynamo makes."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = make_model(perturb=True)
    compiled = torch.compile(model, backend=counting, dynamic=False)
    with torch.no_grad():
        for res in (16, 16, 16, 32, 32):
            x, t, text, mask = make_inputs(res=res)
            torch.testing.assert_close(compiled(x, t, text, mask), model(x, t, text, mask), rtol=0, atol=1e-5)
    assert len(graphs) == 2, f"{len(graphs)} graphs for 2 shapes"
    torch._dynamo.reset()


def test_forward_flops_with_tread_count_the_routed_span_as_it_runs():
    """TREAD: the routed blocks see only the kept tokens; FlopCounterMode on a routed forward agrees."""
    from torch.utils.flop_counter import FlopCounterMode

    from pixeldiff.config import TreadConfig
    from pixeldiff.objective import tread_route

    torch.manual_seed(0)
    res, text_len, tread = 64, 8, TreadConfig(ratio=0.5, start_block=1, end_block=-2)
    model = PixelDiT(ModelConfig("tiny"), TEXT_DIM, tread_span=tread.span(4))
    c = model.cfg
    n = (res // c.patch_size) ** 2
    route = tread_route(1, n, tread.ratio, torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, res, res)
    text, mask = torch.randn(1, text_len, TEXT_DIM), torch.ones(1, text_len, dtype=torch.bool)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, torch.rand(1), text, mask, route=route)
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    counted = fc.get_total_flops()
    first, last = tread.span(c.depth)
    kept = route.shape[1]
    if not any("attention" in k for k in counts):
        counted += sum(2 * (2 * m * (m + text_len) * c.width)
                       for m in (kept if first <= b <= last else n for b in range(c.depth)))
    t_mlp = 2 * (256 * c.width + c.width * c.width)
    routed = forward_flops(c, TEXT_DIM, res, text_len, tread=tread)
    assert routed == pytest.approx(counted - t_mlp, rel=1e-9)
    assert 0.5 < routed / forward_flops(c, TEXT_DIM, res, text_len) < 0.8  # half the tokens in 2 of 4 blocks


@pytest.mark.parametrize("name, override, peak", [
    ("NVIDIA H200", 0.0, 989.4), ("NVIDIA H100 80GB HBM3", 0.0, 989.4), ("NVIDIA H100 PCIe", 0.0, 756.0),
    ("NVIDIA A100-SXM4-80GB", 0.0, 312.0), ("NVIDIA GeForce RTX 4090", 0.0, None), ("NVIDIA GeForce RTX 4090", 165.2, 165.2),
])
def test_the_peak_for_mfu_comes_from_the_device_name_or_the_override(name, override, peak):
    from pixeldiff.model import peak_tflops

    assert peak_tflops(name, override) == peak
