"""x-prediction objective, time shift, caption dropout, samplers, a training smoke test, schedules."""

import math

import pytest
import torch
from torch import nn

from pixeldiff.config import BudgetConfig, ClusterConfig, Manifest, ObjectiveConfig, OptimizerConfig, StageConfig
from pixeldiff.data import SyntheticShapes
from pixeldiff.model import ModelConfig, PixelDiT
from pixeldiff.objective import XPrediction, sample, shift_time
from pixeldiff.schedule import StageSchedule, lr_at, stage_steps
from pixeldiff.text import BuiltinTextEncoder

TEXT_DIM, TEXT_LEN = 16, 8


def make_objective(**kw) -> XPrediction:
    null_text, null_mask = BuiltinTextEncoder(dim=TEXT_DIM, max_tokens=TEXT_LEN).encode([""])
    return XPrediction(ObjectiveConfig(**kw), null_text[0], null_mask[0])


def captions(n):
    return BuiltinTextEncoder(dim=TEXT_DIM, max_tokens=TEXT_LEN).encode([f"a red circle number {i}" for i in range(n)])


class FixedModel(nn.Module):
    """x0_hat = 0.3 * x_t + 0.2 * t (a known function of the inputs); records the text it was given."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, text, mask):
        self.calls.append((x.clone(), t.clone(), text.clone(), mask.clone()))
        return 0.3 * x + 0.2 * t[:, None, None, None]


class Oracle(nn.Module):
    """Ignores its input: returns `cond` for rows with any real text token, `uncond` for empty captions."""

    def __init__(self, cond, uncond=None):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.cond, self.uncond = cond, cond if uncond is None else uncond
        self.calls = []

    def forward(self, x, t, text, mask):
        self.calls.append((x.shape[0], t.clone(), mask.clone(), x.clone()))
        has_text = mask.any(-1)[:, None, None, None]
        return torch.where(has_text, self.cond.expand_as(x), self.uncond.expand_as(x))


# ------------------------------------------------------------------ time shift


def test_shift_time_endpoints_monotone_and_direction():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.25, 1.0, 2.0, 4.0):
        y = shift_time(t, s)
        assert y[0].item() == 0.0 and y[-1].item() == pytest.approx(1.0, abs=1e-12)
        assert torch.all(y[1:] > y[:-1])
    inner = t[1:-1]
    assert torch.equal(shift_time(inner, 1.0), inner)
    assert torch.all(shift_time(inner, 2.0) > inner)  # s > 1 moves toward noise (t = 1)
    assert torch.all(shift_time(inner, 0.5) < inner)
    # the SNR statement of the docstring: (1 - t') / t' == (1 - t) / (s t)
    s = 3.0
    y = shift_time(inner, s)
    torch.testing.assert_close((1 - y) / y, (1 - inner) / (s * inner))
    assert shift_time(torch.tensor(0.5), 2.0).item() == pytest.approx(2 / 3)


def test_shift_grows_linearly_with_resolution():
    obj = make_objective(shift_base=1.0, shift_reference_px=256)
    assert obj.shift(256) == 1.0
    assert obj.shift(512) == 2.0
    assert obj.shift(1024) == 4.0
    assert obj.shift(128) == 0.5
    obj2 = make_objective(shift_base=1.5, shift_reference_px=512)
    assert obj2.shift(1024) == pytest.approx(2 * obj2.shift(512)) == pytest.approx(3.0)


def test_sample_t_range_and_median_increases_with_resolution():
    obj = make_objective(uniform_prob=0.1)
    medians = []
    for res in (64, 256, 512, 1024):
        t = obj.sample_t(20000, res, torch.Generator().manual_seed(0))
        assert t.shape == (20000,)
        assert t.min() > 0 and t.max() < 1
        medians.append(t.median().item())
    assert medians == sorted(medians) and len(set(medians)) == 4
    # no uniform draws, logit-normal(0, 1): median 0.5 at the reference, shift_time(0.5, 2) = 2/3 at 2x
    obj = make_objective(uniform_prob=0.0)
    m256 = obj.sample_t(20000, 256, torch.Generator().manual_seed(1)).median().item()
    m512 = obj.sample_t(20000, 512, torch.Generator().manual_seed(1)).median().item()
    assert m256 == pytest.approx(0.5, abs=0.02)
    assert m512 == pytest.approx(2 / 3, abs=0.02)


def test_sample_t_reproducible_from_generator():
    obj = make_objective()
    a = obj.sample_t(16, 256, torch.Generator().manual_seed(5))
    b = obj.sample_t(16, 256, torch.Generator().manual_seed(5))
    c = obj.sample_t(16, 256, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------ caption dropout


def test_caption_dropout_all_and_none():
    text, mask = captions(6)
    assert mask.any(-1).all()
    obj = make_objective(caption_dropout=1.0)
    t1, m1 = obj.drop_captions(text, mask, torch.Generator().manual_seed(0))
    assert torch.equal(t1, obj.null_text.expand_as(text))
    assert torch.equal(m1, obj.null_mask.expand_as(mask))
    assert not m1.any()

    obj = make_objective(caption_dropout=0.0)
    t0, m0 = obj.drop_captions(text, mask, torch.Generator().manual_seed(0))
    assert torch.equal(t0, text) and torch.equal(m0, mask)


def test_caption_dropout_fraction():
    text, mask = captions(2000)
    obj = make_objective(caption_dropout=0.3)
    _, m = obj.drop_captions(text, mask, torch.Generator().manual_seed(0))
    dropped = (~m.any(-1)).float().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.04)


# ------------------------------------------------------------------ loss


def test_loss_matches_hand_computation():
    cfg = dict(t_mean=-0.3, t_std=1.2, uniform_prob=0.25, shift_base=1.0, shift_reference_px=16, t_clamp=0.3,
               caption_dropout=0.5)
    obj = make_objective(**cfg)
    B, R = 16, 8
    x0 = torch.rand(B, 3, R, R) * 2 - 1
    text, mask = captions(B)
    model = FixedModel()
    loss, x0_hat, t = obj.loss(model, x0, text, mask, torch.Generator().manual_seed(42))

    # the same draws, in the documented order: t (normal, uniform, choice), eps, caption dropout
    g = torch.Generator().manual_seed(42)
    z = torch.randn(B, generator=g)
    u = torch.rand(B, generator=g)
    pick_uniform = torch.rand(B, generator=g) < cfg["uniform_prob"]
    t_ref = torch.where(pick_uniform, u, torch.sigmoid(cfg["t_mean"] + cfg["t_std"] * z))
    s = cfg["shift_base"] * R / cfg["shift_reference_px"]  # 0.5
    t_ref = (s * t_ref / (1 + (s - 1) * t_ref)).clamp(1e-3, 1 - 1e-3)
    eps = torch.randn(B, 3, R, R, generator=g)
    drop = torch.rand(B, generator=g) < cfg["caption_dropout"]

    torch.testing.assert_close(t, t_ref)
    tb = t_ref[:, None, None, None]
    xt = (1 - tb) * x0 + tb * eps
    x0_hat_ref = 0.3 * xt + 0.2 * tb
    torch.testing.assert_close(x0_hat, x0_hat_ref)
    denom = torch.clamp(tb, min=cfg["t_clamp"])
    loss_ref = (((x0_hat_ref - x0) / denom) ** 2).mean()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    # the clamp matters in this draw: some t are below it, some above
    assert (t_ref < cfg["t_clamp"]).any() and (t_ref > cfg["t_clamp"]).any()
    no_clamp = (((x0_hat_ref - x0) / tb) ** 2).mean()
    assert not torch.isclose(loss, no_clamp, rtol=1e-3)

    # the model saw x_t, t and the dropped-out captions
    (xs, ts, texts, masks), = model.calls
    torch.testing.assert_close(xs, xt)
    torch.testing.assert_close(ts, t_ref)
    assert 0 < drop.sum() < B
    assert not masks[drop].any()
    assert torch.equal(masks[~drop], mask[~drop]) and torch.equal(texts[~drop], text[~drop])


def test_loss_is_zero_for_perfect_prediction_and_grad_flows():
    obj = make_objective()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    text, mask = captions(4)

    class Perfect(nn.Module):
        def forward(self, x, t, text, mask):
            return x0

    loss, _, _ = obj.loss(Perfect(), x0, text, mask, torch.Generator().manual_seed(0))
    assert loss.item() == 0.0

    model = FixedModel()
    scale = nn.Parameter(torch.tensor(1.0))
    loss, _, _ = obj.loss(lambda *a: scale * model(*a), x0, text, mask, torch.Generator().manual_seed(0))
    loss.backward()
    assert scale.grad is not None and scale.grad.abs() > 0


# ------------------------------------------------------------------ samplers


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_oracle_sampler_returns_target(method, steps):
    target = torch.rand(1, 3, 8, 8) * 3 - 1.5  # some values outside [-1, 1] to check the clamp
    obj = make_objective()
    text, mask = captions(2)
    model = Oracle(target)
    out = sample(model, obj, text, mask, resolution=8, steps=steps, cfg_scale=1.0, method=method,
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out, target.clamp(-1, 1).expand(2, -1, -1, -1), rtol=0, atol=1e-5)
    # it walked the shifted grid from t = 1 down: euler calls the model once a step, heun twice but
    # not at t = 0
    grid = shift_time(torch.linspace(1, 0, steps + 1), obj.shift(8)).tolist()
    ts = [c[1][0].item() for c in model.calls]
    if method == "euler":
        expected = grid[:-1]
    else:
        expected = [v for a, b in zip(grid[:-1], grid[1:]) for v in ((a, b) if b > 0 else (a,))]
    assert ts == pytest.approx(expected, abs=1e-6)
    assert ts[0] == 1.0


def test_sampler_intermediate_state_follows_the_flow():
    # with an oracle x*, after one of two steps x must be (1 - t1) x* + t1 eps exactly
    target = torch.rand(1, 3, 8, 8) * 2 - 1
    obj = make_objective()
    text, mask = captions(1)
    model = Oracle(target)
    sample(model, obj, text, mask, resolution=8, steps=2, cfg_scale=1.0, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t1 = shift_time(torch.tensor(0.5), obj.shift(8)).item()
    first, second = model.calls
    assert first[1].item() == 1.0 and second[1].item() == pytest.approx(t1)
    torch.testing.assert_close(first[3], eps)  # starts from the generator's noise
    torch.testing.assert_close(second[3], (1 - t1) * target + t1 * eps, rtol=0, atol=1e-6)


def test_cfg_combination():
    cond = torch.full((1, 3, 4, 4), 0.3)
    uncond = torch.full((1, 3, 4, 4), 0.1)
    obj = make_objective()
    text, mask = captions(2)
    for scale, expected in ((1.0, 0.3), (3.0, 0.1 + 3 * (0.3 - 0.1)), (0.0, 0.1)):
        for method in ("euler", "heun"):
            model = Oracle(cond, uncond)
            out = sample(model, obj, text, mask, resolution=4, steps=3, cfg_scale=scale, method=method,
                         generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(out, torch.full_like(out, expected), rtol=0, atol=1e-5)
            batch, _, m, _ = model.calls[0]
            if scale == 1.0:
                assert batch == 2 and m.any(-1).all()  # one pass, text only
            else:
                assert batch == 4  # cond and uncond in one batch: text rows then the null caption
                assert m[:2].any(-1).all() and not m[2:].any()


def test_unknown_sampler_rejected():
    obj = make_objective()
    text, mask = captions(1)
    with pytest.raises(ValueError, match="unknown"):
        sample(Oracle(torch.zeros(1, 3, 4, 4)), obj, text, mask, resolution=4, steps=2, method="ddim")


# ------------------------------------------------------------------ training smoke test


def test_training_reduces_loss():
    torch.manual_seed(0)
    enc = BuiltinTextEncoder(dim=TEXT_DIM, max_tokens=TEXT_LEN)
    null_text, null_mask = enc.encode([""])
    obj = XPrediction(ObjectiveConfig(), null_text[0], null_mask[0])
    model = PixelDiT(ModelConfig("test"), TEXT_DIM)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    data = SyntheticShapes(seed=0)
    g = torch.Generator().manual_seed(0)
    losses = []
    B = 16
    for step in range(60):
        x0, caps = data.batch(step * B, B, 16)
        text, mask = enc.encode(caps)
        loss, _, _ = obj.loss(model, x0, text, mask, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


# ------------------------------------------------------------------ schedules


def test_stage_at_boundaries():
    s = StageSchedule((10, 30, 60))
    assert s.total_steps == 60
    assert s.stage_at(0) == 0
    assert s.stage_at(9) == 0
    assert s.stage_at(10) == 1
    assert s.stage_at(29) == 1
    assert s.stage_at(30) == 2
    assert s.stage_at(59) == 2
    assert s.stage_at(60) == 2
    assert s.stage_at(10_000) == 2
    assert StageSchedule((5,)).stage_at(7) == 0


def test_stage_steps_and_schedule_from_manifest():
    m = Manifest(
        name="x",
        stages=[
            StageConfig("a", 16, 8, steps=5),
            StageConfig("b", 32, 8, budget_share=0.5, est_img_per_s_per_gpu=10.0),
        ],
        cluster=ClusterConfig(backend="local"),
        budget=BudgetConfig(wall_hours=1.0),
    )
    # 0.5 * 1 GPU-hour * 3600 s * 10 img/s / 8 per step
    assert stage_steps(m) == [5, 2250]
    assert StageSchedule.from_manifest(m).ends == (5, 2255)


def test_lr_warmup_linear_then_constant():
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(25)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[4] == pytest.approx(5e-4)
    assert lrs[9] == pytest.approx(1e-3)
    diffs = [b - a for a, b in zip(lrs[:9], lrs[1:10])]
    assert all(d == pytest.approx(1e-4) for d in diffs)
    assert all(v == 1e-3 for v in lrs[10:])
    assert max(lrs) == 1e-3
    assert lr_at(0, OptimizerConfig(lr=3e-4, warmup_steps=0)) == 3e-4
