"""The non-finite step guard: a step whose loss is not finite on any rank changes no weight, without a host read
per step, and too many such steps in a row stop the run."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from .config import TrainingError
from .distributed import all_reduce_sum
from .optim import GuardedAdamW


class NonFiniteGuard:
    """Skips the optimizer steps whose loss is not finite (on any rank, in any of the step's micro-steps)
    without a host read per step, and stops the run after ``max_consecutive`` skipped steps in a row.

    Per micro-step ``observe`` flags the loss on the device; at the accumulation boundary ``arm`` agrees on the
    flag across ranks (a device collective) and hands it to the ``GuardedAdamW`` optimizers, which skip the
    update on the device; ``record`` keeps each step's flag. The flags are read back with the log interval's
    one transfer (or before a checkpoint) and ``settle`` logs them, counts them and raises ``TrainingError``
    once too many come in a row: skipped steps change no weight, so stopping a few steps late loses nothing.
    A skipped step still counts as a step and the data move on; so does the learning-rate schedule, except under
    ZeRO 1-2, whose optimizer sees the non-finite gradients itself and holds the schedule for that step.

    Args:
        max_consecutive: skipped steps in a row after which the run stops.
        device: where the flags live.
    """

    FEATURES = 2.0  # flag value: the encoder's features themselves were not finite

    def __init__(self, max_consecutive: int, device: torch.device | str = "cpu"):
        self.max_consecutive = max_consecutive
        self.device = torch.device(device)
        self.total = 0  # skipped steps read back so far
        self.consecutive = 0
        self.pending: List[tuple[int, torch.Tensor]] = []  # (step, flag) not yet read back
        self._window = torch.zeros((), device=self.device)

    def observe(self, loss: torch.Tensor, features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Flag one micro-step on the device: 1 for a non-finite ``loss``, ``FEATURES`` when ``features`` (the
        encoder's output, checked here only) are not finite either. Returns this rank's flag."""
        bad = (~torch.isfinite(loss.detach())).any().float()
        if features is not None:
            bad = bad * torch.where(torch.isfinite(features.detach()).all(), 1.0, self.FEATURES)
        self._window = torch.maximum(self._window, bad)
        return bad

    def arm(self, *optimizers: GuardedAdamW) -> torch.Tensor:
        """At the accumulation boundary, before the optimizer steps: the step's flag over all ranks, handed to
        ``optimizers``; starts the next step's window."""
        flag = self._window
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        for opt in optimizers:
            opt.skip_if(flag)
        self._window = torch.zeros((), device=self.device)
        return flag

    def record(self, step: int, flag: torch.Tensor, optimizer: Optional[GuardedAdamW] = None) -> torch.Tensor:
        """Keep optimizer step ``step``'s flag, with what ``optimizer`` found in its gradients; returns it."""
        if optimizer is not None and optimizer.skipped is not None:
            flag = torch.maximum(flag, optimizer.skipped.to(flag.device))
        flag = flag.detach().float().view(())
        self.pending.append((step, flag))
        return flag

    def pending_flags(self) -> torch.Tensor:
        """The flags not yet read back, summed over ranks: a step all ranks skipped reads ``world`` (times its
        flag); anything else but 0 means the ranks disagreed."""
        if not self.pending:
            return torch.zeros(0, device=self.device)
        flags = torch.stack([(f > 0).float() + (f >= self.FEATURES).float() for _, f in self.pending])
        return all_reduce_sum(flags.to(self.device))

    def settle(self, values: List[float], last_checkpoint: Optional[str], info: Callable[[str], None]) -> None:
        """Count and log the pending steps' flags as read back (``pending_flags().tolist()``)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        pending, self.pending = self.pending, []
        for (step, _), v in zip(pending, values):
            skipped, features = v >= world, v >= 2 * world
            if v and not skipped:
                raise TrainingError(f"step {step}: some ranks found non-finite gradients and skipped the step, others "
                                    f"did not; last good checkpoint: {last_checkpoint or 'none'}")
            if not skipped:
                self.consecutive = 0
                continue
            if features:
                raise TrainingError(f"step {step}: the encoder produced NaN or inf features (a corrupt image or "
                                    f"diverged encoder weights); last good checkpoint: {last_checkpoint or 'none'}")
            self.total += 1
            self.consecutive += 1
            info(f"step {step}: non-finite loss skipped ({self.total} so far)")
            if self.consecutive >= self.max_consecutive:
                raise TrainingError(f"{self.consecutive} non-finite losses in a row at step {step}; last good "
                                    f"checkpoint: {last_checkpoint or 'none'}")

    def read(self, last_checkpoint: Optional[str], info: Callable[[str], None]) -> None:
        """Read back and settle what is pending (a checkpoint or the end of the run)."""
        if self.pending:
            self.settle(self.pending_flags().tolist(), last_checkpoint, info)

    def clear_to_save(self, step: int, last_checkpoint: Optional[str], info: Callable[[str], None]) -> bool:
        """Before a checkpoint: settle what is pending; False (the save waits) while the latest steps were skipped,
        so that a checkpoint never replaces the last good one with a run of skipped steps."""
        self.read(last_checkpoint, info)
        if self.consecutive:
            info(f"step {step}: checkpoint postponed: the last {self.consecutive} steps had non-finite losses")
        return self.consecutive == 0

