"""The divergence guard: a step whose loss or gradient norm is not finite is skipped on the device,
counted, and a run of such steps ends in a rollback to the last checkpoint or a stop.

The skip costs no host synchronisation: a 0-d `found_inf` tensor tells the fused AdamW kernel to leave
the weights, its moments and its step count alone (the mechanism GradScaler uses). The counters stay on
the device too; the host reads the streak in the step boundary's stop agreement (a read it makes
anyway) and the totals once per logging interval.
"""

from __future__ import annotations

import torch

from pixeldiff import distributed


class DivergenceGuard:
    def __init__(self, device: torch.device, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # this job's skipped steps
        self.streak = torch.zeros((), dtype=torch.int64, device=device)  # skipped steps in a row, now
        self.first = torch.full((), -1, dtype=torch.int64, device=device)  # the first skipped step (-1: none)
        self.reported = 0  # skipped steps already in the ledger / metrics (host side)

    def found_inf(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """1.0 when this step must be skipped, else 0.0: a float32 0-d tensor on the device (AdamW's `found_inf`)."""
        return (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).to(torch.float32)

    def observe(self, found_inf: torch.Tensor, step: int) -> None:
        bad = found_inf.to(torch.int64)
        self.skipped += bad
        self.streak = (self.streak + bad) * bad
        self.first = torch.where((self.first < 0) & (bad > 0), torch.full_like(self.first, step), self.first)

    def new_skips(self) -> tuple[int, int | None]:
        """(a host read) -> (steps skipped so far, the first skipped step if this is the first time any are seen)."""
        n = int(self.skipped.item())
        first = int(self.first.item()) if n and not self.reported else None
        self.reported = n
        return n, first

    def diverged(self, model: torch.nn.Module, check_weights: bool) -> bool:
        """All ranks agree: `max_in_a_row` steps in a row were skipped, or (`check_weights`, before a save) a weight
        is not finite. One host read."""
        bad = (self.streak >= self.max_in_a_row).to(torch.int64)
        if check_weights:
            bad = bad | ~torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
        return bool(distributed.agree_max(int(bad.item())))

    def reset_streak(self) -> None:
        self.streak.zero_()
