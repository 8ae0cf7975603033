"""Distributed setup from the environment (pure parts)."""

import pytest

from pixeldiff.distributed import DistEnv, env_from, first_host, port_for_job


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("node[1-4]", "node1"), ("gpu[03-05,9],cpu1", "gpu03"), ("a-b-[007,010]", "a-b-007"),
    ("host.example.com", "host.example.com"),
])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def test_env_from_torchrun_slurm_and_single():
    tr = env_from({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "h1", "MASTER_PORT": "1234"})
    assert tr == DistEnv(3, 8, 3, "h1", 1234, "torchrun")
    sl = env_from({"SLURM_PROCID": "9", "SLURM_NTASKS": "32", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-10]",
                   "SLURM_JOB_ID": "4242"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_addr, sl.launcher) == (9, 32, 1, "gpu07", "slurm")
    assert sl.master_port == port_for_job("4242") and 20000 <= sl.master_port < 40000
    assert port_for_job("4242") != port_for_job("4243")  # two jobs sharing a node do not collide
    assert env_from({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == DistEnv()  # a one-task job: single process
    assert env_from({}).is_main and env_from({}).world_size == 1
