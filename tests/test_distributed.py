"""Distributed setup from the environment (pure parts)."""

import pytest

from pixeldiff.distributed import DistEnv, env_from, first_host, port_for_job


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("node[1-4]", "node1"), ("gpu[03-05,9],cpu1", "gpu03"), ("a-b-[007,010]", "a-b-007"),
    ("host.example.com", "host.example.com"), ("node[01-04]-ib", "node01-ib"), ("rack[1-2]-n[3-4]", "rack1-n3"),
])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def test_env_from_torchrun_slurm_and_single():
    tr = env_from({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "h1", "MASTER_PORT": "1234"})
    assert tr == DistEnv(3, 8, 3, "h1", 1234, "torchrun")
    sl = env_from({"SLURM_PROCID": "9", "SLURM_NTASKS": "32", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-10]",
                   "SLURM_JOB_ID": "4242"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_addr, sl.launcher) == (9, 32, 1, "gpu07", "slurm")
    assert sl.master_port == port_for_job("4242", {}) and 20000 <= sl.master_port < 32768
    assert port_for_job("4242") != port_for_job("4243")  # two jobs sharing a node do not collide
    assert env_from({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == DistEnv()  # a one-task job: single process
    assert env_from({}).is_main and env_from({}).world_size == 1


# ---------------------------------------------------------------- real gloo processes

import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from conftest import REPO  # noqa: E402
from launcher.cli import main as launch_main, prepare_run_dir  # noqa: E402
from launcher.manifest import load_manifest  # noqa: E402
from pixeldiff import checkpoint  # noqa: E402
from pixeldiff.ledger import read_jsonl  # noqa: E402
from shardutil import write_shards  # noqa: E402


def torchrun(run_dir: Path, nproc: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PIXELDIFF_COLLECTIVE_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             "-m", "pixeldiff.train", str(run_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def ddp_manifest(write_manifest, steps, **sections):
    stages = [{"name": "16px", "resolution": 16, "global_batch": 8, "micro_batch": 4, "steps": steps[0]},
              {"name": "32px", "resolution": 32, "global_batch": 8, "micro_batch": 4, "steps": steps[1]}]
    return write_manifest(name="ddp", stages=stages, **sections)


def weights(run_dir: Path) -> dict:
    return checkpoint.load(checkpoint.latest_valid(run_dir / "checkpoints"), names=("model",))["model"]


def test_two_gloo_ranks_match_one_process(write_manifest, tmp_path):
    """Same global batch: 2 ranks x 1 micro-batch vs 1 process x 2 accumulated micro-batches."""
    manifest = ddp_manifest(write_manifest, (10, 4))
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path / "one")]) == 0
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "two")
    proc = torchrun(run_dir, 2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    one = read_jsonl(tmp_path / "one" / "ddp" / "metrics.jsonl")
    two = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in two] == list(range(1, 15))  # only rank 0 writes metrics
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"])), (a, b)
    wa, wb = weights(tmp_path / "one" / "ddp"), weights(run_dir)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    ckpt = checkpoint.latest_valid(run_dir / "checkpoints")
    assert sorted(p.name for p in ckpt.glob("train_state-rank*.pt")) == ["train_state-rank00000.pt", "train_state-rank00001.pt"]
    start = read_jsonl(run_dir / "ledger.jsonl")[0]
    assert start["gpus"] == 2 and start["launcher"] == "torchrun"


@pytest.mark.parametrize("source", ["synthetic", "shards"])
def test_signal_to_one_rank_stops_all_and_resumes_on_another_world_size(write_manifest, tmp_path, source):
    sections = {}
    if source == "shards":  # 2 ranks x 2 workers = 4 streams before, 1 x 2 after
        write_shards(tmp_path / "shards", n_shards=8, per_shard=10)
        sections["data"] = {"source": "webdataset", "shards": str(tmp_path / "shards" / "train-{000..007}.tar"),
                            "workers": 2, "text": {"max_tokens": 8, "dim": 16}}
    manifest = ddp_manifest(write_manifest, (400, 20), **sections)
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "runs")
    proc = torchrun(run_dir, 2)
    deadline = time.time() + 120
    while time.time() < deadline and not (read_jsonl(run_dir / "metrics.jsonl") or [{}])[-1].get("step", 0) >= 20:
        time.sleep(0.05)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    os.kill(int(ranks[-1]), signal.SIGUSR2)  # the preemption signal reaches one rank only
    out, _ = proc.communicate(timeout=120)
    end = read_jsonl(run_dir / "ledger.jsonl")[-1]
    assert end["event"] == "segment_end" and end["reason"] == "signal SIGUSR2", out
    assert 20 <= end["step"] < 420
    ckpt = checkpoint.latest_valid(run_dir / "checkpoints")
    assert ckpt.name == f"step-{end['step']:08d}"
    assert len(list(ckpt.glob("train_state-rank*.pt"))) == 2
    # resume in one process (a different world size): it continues from the saved step to the end
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path / "runs")]) == 0
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows[-1]["step"] == 420
    assert [r["step"] for r in rows if r["step"] > end["step"]] == list(range(end["step"] + 1, 421))
    if source == "shards":
        assert rows[-1]["bad_samples"] == {}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_killed_rank_makes_the_other_exit_in_bounded_time(write_manifest, tmp_path, parallel):
    """No launcher to clean up (plain processes with RANK/WORLD_SIZE): the survivor must not hang."""
    manifest = ddp_manifest(write_manifest, (100000, 1), cluster={"parallel": parallel}, checkpoint={"interval_steps": 3})
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "runs")
    port = str(29000 + os.getpid() % 1000)
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PIXELDIFF_COLLECTIVE_TIMEOUT_S": "20",
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "pixeldiff.train", str(run_dir)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + 120
    while time.time() < deadline and not (read_jsonl(run_dir / "metrics.jsonl") or [{}])[-1].get("step", 0) >= 5:
        time.sleep(0.05)
    procs[1].kill()
    t0 = time.time()
    out, _ = procs[0].communicate(timeout=90)
    assert procs[0].returncode != 0, out
    assert time.time() - t0 < 60, "the surviving rank waited too long"


# ---------------------------------------------------------------- FSDP2, sharded checkpoints

from distutil import collect, spawn_ranks, wait_until  # noqa: E402


def test_fsdp_on_two_and_four_ranks_matches_one_process(write_manifest, tmp_path):
    """cluster.parallel: fsdp; the same global batch on 1 process (4 accumulated micro-batches), 2 and 4 ranks."""
    stages = [{"name": "16px", "resolution": 16, "global_batch": 8, "micro_batch": 2, "steps": 4},
              {"name": "32px", "resolution": 32, "global_batch": 8, "micro_batch": 2, "steps": 2}]
    manifest = write_manifest(name="fsdp", stages=stages, cluster={"parallel": "fsdp"},
                              checkpoint={"interval_steps": 3}, logging={"sample_interval": 6})
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path / "one")]) == 0
    one = read_jsonl(tmp_path / "one" / "fsdp" / "metrics.jsonl")
    w1 = weights(tmp_path / "one" / "fsdp")
    e1 = checkpoint.load(checkpoint.latest_valid(tmp_path / "one" / "fsdp" / "checkpoints"), names=("ema",))["ema"]
    for n in (2, 4):
        run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / str(n))
        proc = torchrun(run_dir, n)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        rows = read_jsonl(run_dir / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, 7))
        for a, b in zip(one, rows):
            assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"])), (n, a, b)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
        ckpt = checkpoint.latest_valid(run_dir / "checkpoints")
        assert sorted(p.name for p in ckpt.glob("__*.distcp")) == [f"__{r}_0.distcp" for r in range(n)]  # each rank its shard
        parts = checkpoint.load(ckpt, names=("model", "ema"))
        for k in w1:
            torch.testing.assert_close(parts["model"][k], w1[k], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(parts["ema"][k], e1[k], rtol=1e-4, atol=1e-5)
        assert (run_dir / "samples" / "step-00000006.png").exists()  # the EMA gathered from the shards on rank 0
        saves = [e for e in read_jsonl(run_dir / "ledger.jsonl") if e["event"] == "checkpoint_saved"]
        assert [(e["step"], e["async"]) for e in saves] == [(3, True), (6, True)]


def test_sigterm_to_every_fsdp_rank_saves_to_s3_and_resumes_in_one_process(write_manifest, tmp_path, s3_endpoint):
    """Slurm signals every task; each rank gets SIGTERM at its own random moment. All save the same step together
    (sharded, to S3), exit 143 without a traceback; the checkpoint resumes in one process (resharded)."""
    import random
    import uuid

    from pixeldiff.storage import s3_options
    from s3server import create_bucket

    bucket = f"fsdp-{uuid.uuid4().hex[:8]}"
    create_bucket(s3_endpoint, bucket)
    root, so = f"s3://{bucket}/ckpt", s3_options(s3_endpoint, None, False)
    stages = [{"name": "16px", "resolution": 16, "global_batch": 8, "micro_batch": 4, "steps": 150},
              {"name": "32px", "resolution": 32, "global_batch": 8, "micro_batch": 4, "steps": 10}]
    manifest = write_manifest(name="fsdpsig", stages=stages, cluster={"parallel": "fsdp"},
                              checkpoint={"interval_steps": 25, "dir": root}, data={"s3": {"endpoint_url": s3_endpoint}})
    run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "runs")
    procs = spawn_ranks(run_dir, 2)
    at = random.randint(8, 40)
    wait_until(lambda: (read_jsonl(run_dir / "metrics.jsonl") or [{}])[-1].get("step", 0) >= at, procs,
               what=f"step {at}")
    for p in procs:
        p.send_signal(signal.SIGTERM)
        time.sleep(random.uniform(0, 0.3))
    outs = [collect(p) for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in out, (at, out)
    end = read_jsonl(run_dir / "ledger.jsonl")[-1]
    assert end["event"] == "segment_end" and end["reason"] == "signal SIGTERM" and at <= end["step"] < 160
    ckpt = checkpoint.latest_valid(root, storage_options=so)
    assert ckpt == f"{root}/step-{end['step']:08d}" and sorted(checkpoint.rank_states(ckpt, so)) == [0, 1]
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path / "runs")]) == 0
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["step"] > end["step"]] == list(range(end["step"] + 1, 161))


@pytest.mark.parametrize("local_rank, visible, index", [(3, 8, 3), (0, 8, 0), (5, 1, 0), (0, 1, 0), (7, 8, 7)])
def test_local_device_is_the_local_rank_or_the_only_gpu_a_task_sees(local_rank, visible, index):
    from pixeldiff.distributed import local_device_index

    assert local_device_index(local_rank, visible) == index


def test_a_task_that_sees_too_few_gpus_is_told_how_to_fix_it():
    from pixeldiff.distributed import local_device_index

    with pytest.raises(RuntimeError, match="local rank 3 but this task sees 2 GPU"):
        local_device_index(3, 2)


def test_rendezvous_port_is_below_the_ephemeral_range_stable_per_job_and_overridable():
    ports = {port_for_job(str(j), {}) for j in range(1, 3000)}
    assert max(ports) < 32768 and min(ports) >= 1024 and len(ports) == 2999  # concurrent jobs do not collide
    assert port_for_job("4242", {}) == port_for_job("4242", {})  # a requeued job keeps its id, so its port
    assert port_for_job("4242_7", {}) != port_for_job("4243", {})
    assert port_for_job("4242", {"PIXELDIFF_MASTER_PORT": "29999"}) == 29999
    sl = env_from({"SLURM_PROCID": "1", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "rack[1-2]-n[1-2]",
                   "SLURM_JOB_ID": "77", "PIXELDIFF_MASTER_PORT": "23456"})
    assert (sl.master_addr, sl.master_port) == ("rack1-n1", 23456)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_bf16_communication_trains_close_to_fp32_and_resumes(write_manifest, tmp_path, parallel):
    """cluster.bf16_comm. ddp: gradients all-reduced in bf16 (a communication hook); fsdp: FSDP2's mixed precision,
    parameters gathered in bf16 and gradients reduced in fp32. 2 gloo ranks: the losses stay close to the fp32
    run's but are not the same (the bytes were rounded); the checkpoint (fp32 weights) resumes in one process."""
    stages = [{"name": "16px", "resolution": 16, "global_batch": 8, "micro_batch": 2, "steps": 6},
              {"name": "32px", "resolution": 32, "global_batch": 8, "micro_batch": 2, "steps": 2}]
    rows = {}
    for bf16 in (False, True):
        manifest = write_manifest(name=f"comm-{parallel}-{bf16}", stages=stages,
                                  cluster={"parallel": parallel, "bf16_comm": bf16},
                                  checkpoint={"interval_steps": 4}, logging={"sample_interval": 0})
        run_dir, _ = prepare_run_dir(load_manifest(manifest), tmp_path / "runs")
        proc = torchrun(run_dir, 2)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        rows[bf16] = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows[True]] == list(range(1, 9))
    if parallel == "ddp":  # step 1's loss comes before any reduced gradient (fsdp runs step 1's forward in bf16)
        assert rows[True][0]["loss"] == rows[False][0]["loss"]
    diffs = [abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(rows[True], rows[False])]
    assert max(diffs) < 0.05 and max(diffs[1:]) > 0, diffs  # close, and not the fp32 run
    again = tmp_path / "again"
    m = load_manifest(manifest)  # the bf16 run's checkpoint of step 4, resumed by one process to the end
    shutil.copytree(run_dir, again / m.name)
    for ck in sorted((again / m.name / "checkpoints").glob("step-*"))[1:]:
        shutil.rmtree(ck)
    r = subprocess.run([sys.executable, "-m", "pixeldiff.train", str(again / m.name)], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and "resumed from" in r.stdout and "step-00000004" in r.stdout, r.stdout + r.stderr


def test_fsdp_bf16_runs_the_blocks_in_bf16_and_keeps_t_and_gradients_fp32():
    """FSDP2 with cluster.bf16_comm, 2 gloo ranks, one forward and backward of the model: t reaches the model in fp32
    (the root does not cast its inputs: a bf16 t would be rounded to 8 bits before the timestep embedding), the
    blocks run with bf16 parameters and activations, the output and the gradient shards are fp32."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "fsdp_dtype_ranks.py")], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    lines = dict(re.findall(r"rank (\d) dtypes (.*?grads=\[[^\]]*\])", out))  # the ranks' lines may interleave
    assert set(lines) == {"0", "1"}, out
    lines = list(lines.values())
    for line in lines:
        seen = dict(kv.split("=", 1) for kv in line.split())
        assert seen == {"t_in": "torch.float32", "root_t": "torch.float32", "t_embed_weight": "torch.bfloat16",
                        "block0_in": "torch.bfloat16", "block0_weight": "torch.bfloat16", "out": "torch.float32",
                        "grads": "['torch.float32']"}, line


def test_the_step_boundary_agreement_times_out_by_phase():
    """The control group (gloo, CPU tensors) waits the start-up timeout while a job starts and the short one once
    it trains: a rank 6 s late in steady state (timeout 2 s) makes the other time out; 4 s late at start-up does
    not. The agreement the trainer issues after a step and reads before the next returns at once and waits only
    when read: rank 0 issues it 1.5 s before rank 1 and reads it after 0.2 s of other work."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "control_ranks.py")], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert "rank 0: timed out in steady state" in out, out
    later = {int(r): (float(i), float(w)) for r, i, w in re.findall(
        r"rank (\d): later \(3, 1\) issued in ([\d.]+) s, read in ([\d.]+) s", out)}
    assert set(later) == {0, 1}, out
    assert later[0][0] < 0.3 and later[0][1] > 0.8, later  # issued without waiting; the wait is at the read
    assert later[1][1] < 0.3, later  # the late rank finds it done
