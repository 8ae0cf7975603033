"""The trainer's parts on their own: EMA, gradient clipping, the synthetic batch source, the metrics logger, and the
checkpoint manager's named parts."""

import json

import pytest
import torch

from pixeldiff import checkpoint
from pixeldiff.config import StageConfig
from pixeldiff.data import SyntheticSource
from pixeldiff.ema import EMA
from pixeldiff.metrics import MetricsLogger
from pixeldiff.parallel import clip_gradients


def test_ema_moves_towards_the_model_every_n_steps():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.75, every=2)
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=1)  # not an EMA step
    assert all(torch.equal(a, b) for a, b in zip(before, ema.module.parameters()))
    ema.update(model, step=2)
    for old, new, live in zip(before, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(new, old + 0.25 * (live - old), rtol=0, atol=1e-7)
        assert not new.requires_grad
    assert ema.whole(lambda: None, torch.device("cpu")) is ema.module  # not sharded: the module itself


def test_clip_gradients_returns_the_norm_before_clipping_on_the_device():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    norm = clip_gradients([p], 1.0)
    assert isinstance(norm, torch.Tensor) and norm.item() == pytest.approx(5.0)
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    q = torch.nn.Parameter(torch.zeros(2))
    q.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients([q], float("inf")).item() == pytest.approx(5.0) and q.grad.tolist() == [3.0, 4.0]


@pytest.mark.parametrize("world, accum", [(1, 4), (2, 2), (4, 1)])
def test_synthetic_source_gives_every_world_size_the_same_global_batch(world, accum):
    """Micro-batch k of a step's global batch is the same samples whichever rank (or accumulation step) runs it."""
    micro = 2
    sources = [SyntheticSource(seed=3, rank=r, world=world) for r in range(world)]
    its = [s.batches(8, micro, accum) for s in sources]
    got = []
    for _step in range(2):
        captions = []
        for it in its:
            for _ in range(accum):
                captions += next(it)["caption"]
        got.append(captions)
    one = SyntheticSource(seed=3)
    expect = [one.shapes.batch(s * 8, 8, 8)[1] for s in range(2)]
    assert got == expect
    assert all(s.state_dict() == {"samples": 16} for s in sources)
    resumed = SyntheticSource(seed=3, rank=0, world=world)
    resumed.load_state_dict({"samples": 8})
    assert next(resumed.batches(8, micro, accum))["caption"] == expect[1][:micro]


def test_metrics_logger_writes_one_reduced_record_per_interval(tmp_path):
    lines = []
    log = MetricsLogger(tmp_path, True, torch.device("cpu"), interval=2, log=lines.append)
    log.start()
    stage = StageConfig(name="16px", resolution=16, global_batch=8, steps=10)
    for step in (1, 2):
        out = {"loss": torch.tensor(0.5, dtype=torch.float64) * step, "lr": 1e-3, "grad_norm": torch.tensor(2.0),
               "parts": {"mse": torch.tensor(0.25) * step}}
        rec = log.step(step, stage, out, 0.0, extra=lambda: {"bad_samples": {}})
        assert (rec is None) == (step == 1)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["step"] == 2 and recs[0]["loss"] == 1.0 and recs[0]["loss_mse"] == 0.5
    assert recs[0]["grad_norm"] == 2.0 and recs[0]["bad_samples"] == {} and json.loads(lines[0]) == recs[0]
    silent = MetricsLogger(tmp_path / "other", False, torch.device("cpu"), interval=1)
    silent.step(1, stage, out, 0.0)
    silent.event("heartbeat", step=1)
    assert not (tmp_path / "other").exists()  # only rank 0 writes


def test_checkpoint_manager_saves_and_restores_its_named_parts(tmp_path):
    class Train:
        def __init__(self):
            self.step = 0

        def state_dict(self):
            return {"step": self.step}

        def load_state_dict(self, s):
            self.step = s["step"]

    def make():
        torch.manual_seed(len(made))
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        made.append(model)
        data, train, saved = SyntheticSource(0), Train(), []
        mgr = checkpoint.CheckpointManager(
            tmp_path / "ckpt", keep=2, async_save=True, rank=0, world=1,
            sharded={"model": checkpoint.ModelState(model), "optimizer": checkpoint.ModelState(model, opt)},
            train=train, data=data, files=lambda: {"note.txt": b"hi"}, on_saved=saved.append, log=lambda s: None)
        return model, opt, data, train, saved, mgr

    made = []
    model, opt, data, train, saved, mgr = make()
    assert mgr.restore() is None
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    train.step, data.samples = 7, 56
    mgr.save(7)  # in the background
    mgr.save(7, final=True)  # the same step: not written again, but waited for
    mgr.close()
    assert [r["step"] for r in saved] == [7] and (tmp_path / "ckpt" / "step-00000007" / "note.txt").read_bytes() == b"hi"

    model2, opt2, data2, train2, _, mgr2 = make()
    assert not torch.equal(model2.weight, model.weight)
    assert mgr2.restore().endswith("step-00000007")
    assert torch.equal(model2.weight, model.weight) and train2.step == 7 and data2.samples == 56
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_a_grid_split_over_ranks_is_the_grid_of_one_process():
    """Each image of a sample grid has its own noise, so ranks rendering every other image assemble the same grid."""
    from pixeldiff.config import ModelConfig, ObjectiveConfig, TextConfig
    from pixeldiff.model import PixelDiT
    from pixeldiff.objective import XPrediction
    from pixeldiff.sample import grid_part
    from pixeldiff.text import make_text_encoder

    enc = make_text_encoder(TextConfig(max_tokens=8, dim=16), torch.device("cpu"))
    null_text, null_mask = enc.encode([""])
    torch.manual_seed(0)
    model = PixelDiT(ModelConfig(preset="test"), 16)
    with torch.no_grad():  # the final layer starts at zero: make the network say something
        for p in model.parameters():
            p.normal_(0, 0.05)
    obj = XPrediction(ObjectiveConfig(), null_text[0], null_mask[0])
    prompts = ["a red circle on black", "a blue square on white"]
    args = dict(per_prompt=2, steps=2, cfg_scale=2.0, seed=5)
    whole = grid_part(model, obj, enc, prompts, 16, [0, 1, 2, 3], **args)
    even, odd = grid_part(model, obj, enc, prompts, 16, [0, 2], **args), grid_part(model, obj, enc, prompts, 16, [1, 3], **args)
    torch.testing.assert_close(torch.stack([even[0], odd[0], even[1], odd[1]]), whole, atol=2e-3, rtol=0)
    assert not torch.equal(whole[0], whole[1])  # different noise per image
    assert grid_part(model, obj, enc, prompts, 16, [], **args).shape == (0, 3, 16, 16)


def test_replicated_state_is_dealt_to_ranks_by_size_the_same_way_everywhere():
    from pixeldiff import replicated

    state = {"model": {"a": torch.zeros(100), "b": torch.zeros(60), "c": torch.zeros(50)},
             "optimizer": {"state": {"a": {"exp_avg": torch.zeros(100), "step": torch.tensor(3.0)}},
                           "param_groups": [{"lr": 0.1, "params": ["a"]}]}}
    leaves = replicated.flatten(state)
    owners = replicated.deal(leaves, 2)
    assert owners == replicated.deal(dict(reversed(leaves.items())), 2)  # order-independent
    assert owners[("optimizer", "param_groups")] == 0  # not a tensor: rank 0's
    shares = [replicated.share(state, r, 2) for r in range(2)]
    got = {}
    for s in shares:
        got.update(replicated.flatten(s))
    assert got.keys() == leaves.keys() and all(got[p] is leaves[p] for p in got)  # a partition, same tensors
    sizes = [sum(v.numel() for v in replicated.flatten(s).values() if torch.is_tensor(v)) for s in shares]
    assert max(sizes) - min(sizes) <= 51 and sum(sizes) == 311  # balanced by size
    assert replicated.flatten(replicated.unflatten(leaves)).keys() == leaves.keys()


def test_ddp_checkpoint_is_written_and_read_as_shares_on_two_ranks(tmp_path):
    """2 gloo ranks: each writes its share of the replicated state (two shard files of similar size); restoring
    into fresh, different objects on both ranks reads each share once and broadcasts it: exact state everywhere;
    one process reads the whole checkpoint."""
    import subprocess
    import sys

    from conftest import REPO
    from distutil import BASE_ENV, free_port

    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                          f"--master_port={free_port()}", str(REPO / "tests" / "replicated_ranks.py"), str(tmp_path)],
                         env={**__import__("os").environ, **BASE_ENV}, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rank 0 restored" in out.stdout and "rank 1 restored" in out.stdout
    ckpt = checkpoint.latest_valid(tmp_path)
    shards = sorted(p.stat().st_size for p in ckpt.glob("*.distcp"))
    assert len(shards) == 2 and shards[0] > 0.5 * shards[1], shards
    whole = checkpoint.load(ckpt)
    assert whole["model"]["0.weight"].shape == (64, 64) and whole["ema"]["2.bias"].shape == (8,)
    assert set(whole["optimizer"]["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"}
