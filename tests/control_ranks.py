"""Run by torchrun from tests/test_distributed.py: the step boundary's control group takes the start-up timeout,
then the steady-state one after `set_timeout` (gloo groups' timeouts are fixed at creation: one group each); and
the agreement issued at one step boundary and read at the next does not wait for a late rank until it is read."""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixeldiff import distributed  # noqa: E402
from pixeldiff.process import leave  # noqa: E402


def main() -> int:
    env = distributed.env_from()
    distributed.init(env, torch.device("cpu"), timeout_s=60, steady_s=2)
    if env.rank == 1:
        time.sleep(4)  # longer than the steady timeout, shorter than the start-up one
    assert distributed.agree_max((env.rank, 7)) == (1, 7)  # start-up: rank 0 waits 4 s for rank 1
    distributed.barrier()
    if env.rank == 1:
        time.sleep(1.5)  # the other rank's host is busy with its step
    t0 = time.perf_counter()
    result = distributed.agree_max_later((env.rank * 3, 1 - env.rank))
    issued = time.perf_counter() - t0
    time.sleep(0.2)  # the host's logging and saving, meanwhile
    t1 = time.perf_counter()
    print(f"rank {env.rank}: later {result()} issued in {issued:.3f} s, read in {time.perf_counter() - t1:.3f} s",
          flush=True)
    distributed.barrier()
    distributed.set_timeout(2)
    if env.rank == 1:
        time.sleep(6)
    try:
        distributed.agree_max(env.rank)
        print(f"rank {env.rank}: agreed", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"rank {env.rank}: timed out in steady state: {type(e).__name__}", flush=True)
    return 0


if __name__ == "__main__":
    leave(main())
