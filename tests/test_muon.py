"""Muon (optimizer.name: muon): which parameters it gets, torch's update to the bit, the divergence guard's skipped
step without a host sync, the schedule on both groups, the same update on 1 process and 2 gloo ranks (DDP, FSDP2),
bit-exact resume, the refusal of the other optimizer's checkpoint, and a short dry run that learns."""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO
from distutil import BASE_ENV, collect, single
from launcher.cli import main as launch_main, prepare_run_dir
from launcher.manifest import load_manifest
from pixeldiff import checkpoint
from pixeldiff.config import ConfigError, OptimizerConfig
from pixeldiff.ledger import read_jsonl
from pixeldiff.model import PixelDiT
from pixeldiff.optim import MUON_STATE, GuardedMuon, build_optimizer, checkpoint_optimizer, owners, split_params
from pixeldiff.presets import ModelConfig
from pixeldiff.schedule import lr_at
from test_train import final_state, resume_and_compare, start_and_interrupt

MUON = {"name": "muon", "muon_lr": 1e-3}  # the tiny test model at the test manifest's AdamW lr


def tiny_model(text_dim=16):
    torch.manual_seed(0)
    return PixelDiT(ModelConfig(preset="test"), text_dim)


# ---------------------------------------------------------------- who gets what


def test_muon_gets_exactly_the_blocks_2d_matrices_and_adamw_all_others():
    model = tiny_model()
    model.repa = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64))  # a projector
    opt = build_optimizer(model, OptimizerConfig(name="muon"))
    muon, adamw = opt.parts
    assert type(muon) is GuardedMuon and isinstance(muon, torch.optim.Muon) and type(adamw) is torch.optim.AdamW
    names = {id(p): n for n, p in model.named_parameters()}
    got_muon = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    got_adamw = [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    matrices = ("attn.qkv.weight", "attn.text_kv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight",
                "modulation.weight")
    assert got_muon == [f"blocks.{b}.{m}" for b in range(2) for m in matrices]  # written out: the test preset has 2 blocks
    assert not set(got_muon) & set(got_adamw)  # none twice
    assert sorted(got_muon + got_adamw) == sorted(names.values())  # none missing
    for n in ("patch_embed.0.weight", "patch_embed.1.weight", "t_embed.0.weight", "text_proj.weight",  # 2-D, outside
              "final.linear.weight", "final.modulation.weight", "repa.0.weight", "repa.2.weight",
              "blocks.0.attn.q_norm.weight", "blocks.1.modulation.bias"):  # inside the blocks, but 1-D
        assert n in got_adamw
    assert all(model.get_parameter(n).ndim == 2 for n in got_muon)
    # each group with its own hyperparameters, torch's Muon arguments as the recipe says
    g = muon.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["ns_steps"], g["adjust_lr_fn"], g["weight_decay"]) == \
           (1e-4, 0.95, True, 5, "match_rms_adamw", 0.0)
    assert adamw.param_groups[0]["fused"] and adamw.param_groups[0]["betas"] == (0.9, 0.95)


def test_adamw_alone_gets_every_parameter_in_one_group_as_before():
    model = tiny_model()
    opt = build_optimizer(model, OptimizerConfig())
    (adamw,) = opt.parts
    assert type(adamw) is torch.optim.AdamW and len(adamw.param_groups) == 1
    assert [id(p) for p in adamw.param_groups[0]["params"]] == [id(p) for p in model.parameters()]


# ---------------------------------------------------------------- the update


def set_grads(params, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale


@pytest.mark.parametrize("nesterov", [True, False])
def test_the_step_is_torchs_muon_to_the_bit(nesterov):
    a, b = tiny_model(), tiny_model()
    pa, pb = ([p for _, p in split_params(m)[0]] for m in (a, b))
    kw = dict(lr=1e-2, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    ours, theirs = GuardedMuon(pa, **kw), torch.optim.Muon(pb, **kw)
    for step in range(3):
        set_grads(pa, step)
        set_grads(pb, step)
        ours.found_inf = torch.zeros(())  # 0: the step happens, exactly as without the guard
        ours.step()
        theirs.step()
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert all(torch.equal(ours.state[x][MUON_STATE], theirs.state[y][MUON_STATE]) for x, y in zip(pa, pb))
    assert not torch.equal(pa[0], tiny_model().get_parameter("blocks.0.attn.qkv.weight"))  # it did move


class HostReads(TorchDispatchMode):
    """Counts the ops that copy a device value to the host (`.item()`, `bool(tensor)`): a host sync on a GPU."""

    READS = {"_local_scalar_dense", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_a_skipped_step_leaves_weights_and_momentum_untouched_without_a_host_read():
    model = tiny_model()
    opt = build_optimizer(model, OptimizerConfig(name="muon", muon_weight_decay=0.1, weight_decay=0.1))
    params = list(model.parameters())
    set_grads(params, 0)
    opt.found_inf = torch.zeros(())
    opt.step()  # a real step first: the momentum buffers and AdamW's moments are not zero
    before = copy.deepcopy(([p.detach() for p in params], [dict(s) for o in opt for s in o.state.values()]))
    set_grads(params, 1, scale=float("nan"))  # what a diverged backward leaves
    opt.found_inf = torch.ones(())
    with HostReads() as mode:
        opt.step()
    assert mode.reads == []
    after = ([p.detach() for p in params], [dict(s) for o in opt for s in o.state.values()])
    assert all(torch.equal(x, y) for x, y in zip(before[0], after[0]))
    for sb, sa in zip(before[1], after[1]):
        assert sb.keys() == sa.keys() and all(torch.equal(sb[k], sa[k]) for k in sb)
    set_grads(params, 1)
    opt.found_inf = torch.zeros(())
    with HostReads() as mode:
        opt.step()  # the next good step moves again, still without a host read
    assert mode.reads == [] and not torch.equal(params[10], before[0][10])
    with HostReads() as mode:  # the mode does see a read when there is one
        torch.ones(()).item()
    assert mode.reads


def test_the_schedule_scales_each_group_from_its_own_base_lr_and_survives_a_state_load():
    cfg = OptimizerConfig(name="muon", lr=1e-3, muon_lr=2e-2, warmup_steps=10)
    model = tiny_model()
    opt = build_optimizer(model, cfg)
    for step, scale in ((0, 1.0), (4, 0.5), (50, 0.25)):
        opt.set_lr(lambda base: lr_at(step, cfg, base) * scale)
        muon, adamw = (o.param_groups[0]["lr"] for o in opt)
        assert muon == pytest.approx(2e-2 * min(1, (step + 1) / 10) * scale, rel=1e-12)
        assert adamw == pytest.approx(1e-3 * min(1, (step + 1) / 10) * scale, rel=1e-12)
    assert lr_at(4, cfg) == lr_at(4, cfg, cfg.lr)  # AdamW's lr as before
    for o in opt:  # loading a state dict replaces the group dicts: the base learning rates still apply
        o.load_state_dict(o.state_dict())
    opt.set_lr(lambda base: base)
    assert [g["lr"] for g in opt.param_groups] == [2e-2, 1e-3]


def test_the_trainer_sets_both_groups_learning_rates_each_step(write_manifest, tmp_path):
    from pixeldiff.train import Trainer, micro_layout

    manifest = write_manifest(optimizer={"name": "muon", "lr": 1e-3, "muon_lr": 3e-4, "warmup_steps": 5})
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path)
    t = Trainer(run_dir, log=lambda *_: None)
    t.restore()
    stage = t.m.stages[0]
    batches = t.data.batches(stage.resolution, *micro_layout(stage, 1))
    for step in range(3):
        t.state.lr_scale = 0.5 if step == 2 else 1.0
        out = t.train_step(batches)
        muon, adamw = (o.param_groups[0]["lr"] for o in t.opt)
        assert adamw == out["lr"] == pytest.approx(1e-3 * (step + 1) / 5 * t.state.lr_scale)
        assert muon == pytest.approx(3e-4 * (step + 1) / 5 * t.state.lr_scale)
    t.data.close()


# ---------------------------------------------------------------- one process and two ranks


def test_whole_matrices_are_dealt_out_to_ranks_balanced_by_newton_schulz_flops():
    with torch.device("meta"):
        shapes = [tuple(p.shape) for _, p in split_params(PixelDiT(ModelConfig("JiT-32"), 2304))[0]]
    cost = [min(s) ** 2 * max(s) for s in shapes]
    for world in (1, 2, 8, 32):
        got = owners(shapes, world)
        assert got == owners(shapes, world) and set(got) == set(range(world))
        load = [sum(c for c, o in zip(cost, got) if o == r) for r in range(world)]
        assert max(load) <= 1.1 * sum(cost) / world + max(cost) * (world > len(shapes) / 4), (world, load)
    assert owners([(4, 4)] * 5, 8) == [0, 1, 2, 3, 4]  # fewer matrices than ranks: some ranks have none


def rank_run(tmp_path, parallel: str, nproc: int) -> dict:
    out = tmp_path / f"{parallel}-{nproc}.pt"
    cmd = [sys.executable, str(REPO / "tests" / "muon_ranks.py"), parallel, str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **BASE_ENV}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return torch.load(out)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_ranks_make_the_one_process_update_to_the_bit(tmp_path, parallel):
    """The same whole gradients on every rank: under FSDP2 each rank holds half the rows of each matrix, gathers the
    whole matrix to orthogonalise it and keeps its rows; the weights and momentum equal one process's exactly."""
    one, two = rank_run(tmp_path, "none", 1), rank_run(tmp_path, parallel, 2)
    assert len(one["momentum"]) == 12
    assert one["orthogonalised"] == [12 * 4] and sum(two["orthogonalised"]) == 12 * 4  # each matrix once per step
    assert min(two["orthogonalised"]) >= 12 * 4 // 3  # shared by both ranks
    for part in ("weights", "momentum"):
        assert one[part].keys() == two[part].keys()
        for k in one[part]:
            assert torch.equal(one[part][k], two[part][k]), f"{part} {k} differs"


def ddp_manifest(write_manifest, parallel):
    stages = [{"name": "16px", "resolution": 16, "global_batch": 8, "micro_batch": 2, "steps": 4},
              {"name": "32px", "resolution": 32, "global_batch": 8, "micro_batch": 2, "steps": 2}]
    return write_manifest(name=f"muon-{parallel}", stages=stages, cluster={"parallel": parallel}, optimizer=MUON,
                          checkpoint={"interval_steps": 3})


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_training_on_two_gloo_ranks_matches_one_process(write_manifest, tmp_path, parallel):
    """The whole trainer with Muon: the same global batch as 1 process x 4 micro-batches and 2 ranks x 2."""
    manifest = ddp_manifest(write_manifest, parallel)
    name = f"muon-{parallel}"
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path / "one")]) == 0
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "two")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "pixeldiff.train", str(run_dir)], cwd=REPO,
                            env={**os.environ, **BASE_ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = collect(proc, timeout=300)
    assert proc.returncode == 0, out
    one, two = (read_jsonl(d / name / "metrics.jsonl") for d in (tmp_path / "one", tmp_path / "two"))
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"])), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    s1, s2 = (checkpoint.load(checkpoint.latest_valid(d / name / "checkpoints"), names=("model", "optimizer"))
              for d in (tmp_path / "one", tmp_path / "two"))
    m = load_manifest(manifest)
    torch.manual_seed(m.seed)
    w0 = PixelDiT(m.model, m.data.text.dim).state_dict()  # the trainer's initial weights
    # Summed in another order, the two runs' gradients differ in their last bits, and Muon's 5 Newton-Schulz steps (in
    # bf16) magnify small differences in a matrix's weak directions (slope ~3.4 per step near 0): after 6 steps the
    # Muon matrices' movements differ by 4-18% (measured), the rest by < 0.1%. Orthogonalising each FSDP shard alone
    # instead of the whole matrix (a bug this catches) gave 53-82%, 1-5% and momentum 1-17% apart. Same gradients give
    # the same bits: the test above.
    muon = {k for k, v in s1["optimizer"]["state"].items() if MUON_STATE in v}
    assert len(muon) == 12
    for k in s1["model"]:
        moved = s1["model"][k] - w0[k]
        if moved.norm() > 0:
            apart = ((s2["model"][k] - w0[k]) - moved).norm() / moved.norm()
            assert apart <= (0.3 if k in muon else 5e-3), (k, apart)
    for k in muon:
        v = s1["optimizer"]["state"][k][MUON_STATE]
        assert (s2["optimizer"]["state"][k][MUON_STATE] - v).norm() <= 5e-3 * v.norm(), k


# ---------------------------------------------------------------- checkpoints


def test_an_interrupted_muon_run_resumes_to_bit_identical_weights_and_momentum(write_manifest, tmp_path):
    manifest = write_manifest(name="muonrun", steps=(60, 20), optimizer=MUON)
    stopped = start_and_interrupt(manifest, tmp_path / "cut", 27, "SIGTERM")
    resume_and_compare(manifest, tmp_path, stopped)  # weights, EMA, every optimizer state tensor, losses: equal
    state = final_state(tmp_path / "whole" / "muonrun")["optimizer"]["state"]
    assert sum(MUON_STATE in s for s in state.values()) == 12 and sum("exp_avg" in s for s in state.values()) == 22


def test_a_nan_step_leaves_the_saved_weights_and_optimizer_state_of_the_step_before(write_manifest, tmp_path,
                                                                                     monkeypatch):
    """PIXELDIFF_TEST_NAN_AT_STEP=7 with Muon: step 7 is skipped, so its final checkpoint equals step 6's (but the
    EMA, which moves towards the same weights)."""
    manifest = write_manifest(name="muonnan", steps=(4, 3), optimizer=MUON, checkpoint={"interval_steps": 6})
    monkeypatch.setenv("PIXELDIFF_TEST_NAN_AT_STEP", "7")
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path)]) == 0
    rows = read_jsonl(tmp_path / "muonnan" / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0] * 6 + [1] and not math.isfinite(rows[6]["loss"])
    valid, _ = checkpoint.list_checkpoints(tmp_path / "muonnan" / "checkpoints")
    assert [p.name for p in valid] == ["step-00000006", "step-00000007"]
    six, seven = (checkpoint.load(p, names=("model", "optimizer")) for p in valid)
    for k in six["model"]:
        assert torch.equal(six["model"][k], seven["model"][k]), k
    assert sum(MUON_STATE in s for s in seven["optimizer"]["state"].values()) == 12
    for k, s in six["optimizer"]["state"].items():
        for name, v in s.items():
            assert torch.equal(v, seven["optimizer"]["state"][k][name]), (k, name)


@pytest.mark.parametrize("first, then", [("adamw", "muon"), ("muon", "adamw")])
def test_a_checkpoint_of_the_other_optimizer_is_refused_with_exit_2(write_manifest, tmp_path, first, then):
    manifest = write_manifest(name="switch", steps=(3, 1), optimizer={"name": first})
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path)]) == 0
    run_dir = tmp_path / "switch"
    kept = checkpoint.latest_valid(run_dir / "checkpoints")
    assert checkpoint_optimizer(kept) == first
    m = yaml.safe_load((run_dir / "manifest.yaml").read_text())
    m["optimizer"]["name"] = then
    m["stages"][1]["steps"] = 5  # more to train, so that the job would go on
    (run_dir / "manifest.yaml").write_text(yaml.safe_dump(m, sort_keys=False))
    proc = single(run_dir)
    out = collect(proc)
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    # the checkpoint's manifest says it first (pixeldiff/checkpoint_verify.py); its optimizer state would say it too
    assert f"was written for optimizer.name '{first}', this manifest has '{then}'" in out, out
    assert "resume it with the manifest it was written for" in out
    assert checkpoint.latest_valid(run_dir / "checkpoints") == kept  # nothing lost, nothing written
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == 4


# ---------------------------------------------------------------- the manifest


@pytest.mark.parametrize("bad, message", [
    ({"name": "sgd"}, r"optimizer\.name: expected one of 'adamw' \| 'muon', got 'sgd'"),
    ({"muon_lr": 0.0}, r"optimizer\.muon_lr: must be > 0, got 0\.0"),
    ({"muon_momentum": 1.0}, r"optimizer\.muon_momentum: must be in \[0, 1\), got 1\.0"),
    ({"muon_ns_steps": 0}, r"optimizer\.muon_ns_steps: must be in \[1, 99\]"),
    ({"muon_ns_steps": 100}, r"optimizer\.muon_ns_steps: must be in \[1, 99\]"),
    ({"muon_weight_decay": -0.1}, r"optimizer\.muon_weight_decay: must be >= 0"),
    ({"muon_adjust_lr": "rms"}, r"optimizer\.muon_adjust_lr: expected one of 'match_rms_adamw' \| 'original'"),
    ({"muon_nesterov": "yes"}, r"optimizer\.muon_nesterov: expected bool"),
])
def test_bad_muon_settings_are_refused_with_exit_2(write_manifest, capsys, bad, message):
    import re

    manifest = write_manifest(optimizer={"name": "muon", **bad} if "name" not in bad else bad)
    with pytest.raises(ConfigError, match=message):
        load_manifest(manifest)
    assert launch_main(["plan", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_existing_manifests_keep_adamw(tmp_path):
    for name in ("dryrun", "speedrun"):
        assert load_manifest(REPO / "manifests" / f"{name}.yaml").optimizer.name == "adamw"


# ---------------------------------------------------------------- it learns


def test_a_short_dry_run_with_muon_learns(tmp_path):
    """manifests/dryrun.yaml (1.6M parameters, coloured shapes) with Muon, its first 240 steps at 32 px."""
    sets = ["optimizer.name=muon", "optimizer.muon_lr=1e-3", "stages[0].steps=240", "stages[1].steps=1",
            "checkpoint.interval_steps=1000", "eval.enabled=false"]
    args = ["run", str(REPO / "manifests" / "dryrun.yaml"), "--runs-dir", str(tmp_path)]
    assert launch_main([*args, *[a for s in sets for a in ("--set", s)]]) == 0
    rows = [r for r in read_jsonl(tmp_path / "dryrun" / "metrics.jsonl") if r["stage"] == "32px"]
    first, last = (sum(r["loss"] for r in rs) / len(rs) for rs in (rows[:2], rows[-2:]))  # 25-step intervals
    assert last < 0.5 * first, (first, last)
    assert (tmp_path / "dryrun" / "samples" / "step-00000241.png").exists()
