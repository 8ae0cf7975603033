"""A thin client for Slurm's commands (squeue, sacct, sinfo, scontrol, scancel) and, in slurm.dev, a real
Slurm cluster on 127.0.0.1 for tests.

    from slurm import Slurm, SlurmError
    Slurm().queue(["123"])   # {"123": QueueEntry(...)}
"""

from slurm.commands import Slurm, SlurmError
from slurm.types import AcctRecord, NodeInfo, QueueEntry

__all__ = ["Slurm", "SlurmError", "QueueEntry", "AcctRecord", "NodeInfo"]
