"""The two training tasks of the unified model: which one each micro-batch trains, and their metrics.

Joint training interleaves two tasks, one per micro-batch: generation (caption -> the image's VQRAE codes)
and understanding (image features + conversation -> answers). ``TaskSchedule`` decides the task of every
micro-batch from its index alone, so all ranks run the same task at the same time (their collectives stay
in step) and a resumed run continues the schedule from a saved counter. Each task reads its own data
(``mllm.data.TaskLoader``); ``TaskMetrics`` sums each task's loss on the device over a log interval.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from typing import Optional

import numpy as np
import torch

from vqrae.runtime import NonFiniteGuard, all_reduce_sum

from .model import UnifiedOutput

GENERATION, UNDERSTANDING = "generation", "understanding"
TASKS = (GENERATION, UNDERSTANDING)


class TaskSchedule:
    """The task of every micro-batch: generation for a fraction ``ratio`` of them, understanding otherwise.

    Micro-batches are grouped in blocks of ``period``. Block b holds ``floor((b+1) P r) - floor(b P r)``
    generation micro-batches (so any prefix of the schedule holds ``r * n`` of them up to one block), in an
    order drawn from ``(seed, b)``. The task of micro-batch i is a function of ``(ratio, seed, i)`` alone:
    every rank computes the same schedule, and a resumed run continues it from the saved counter.

    Args:
        ratio: fraction of generation micro-batches, in [0, 1].
        seed: fixes the order inside each block.
        period: block length.
    """

    def __init__(self, ratio: float, seed: int, period: int = 16):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"task ratio must lie in [0, 1], got {ratio}")
        self.ratio, self.seed, self.period = ratio, seed, period
        self._block, self._tasks = -1, []

    def task(self, index: int) -> str:
        block, offset = divmod(index, self.period)
        if block != self._block:
            start = block * self.period
            flags = [math.floor((j + 1) * self.ratio) - math.floor(j * self.ratio) for j in range(start, start + self.period)]
            order = np.random.default_rng([self.seed, block]).permutation(self.period)
            self._block, self._tasks = block, [GENERATION if flags[k] else UNDERSTANDING for k in order]
        return self._tasks[offset]



class TaskMetrics:
    """Per-task loss and token sums over a logging window, kept on the device so a step costs no host sync.

    Args:
        device: where the loss sums live.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.losses = torch.zeros(len(TASKS), 2, device=self.device)  # (task, [loss, image_loss])
        self.steps = torch.zeros(len(TASKS), device=self.device)  # micro-batches with a finite loss
        self.tokens = [0] * len(TASKS)
        self.start = time.perf_counter()

    def add(self, task: str, out: UnifiedOutput, tokens: int, ok: Optional[torch.Tensor] = None) -> None:
        """One trained micro-batch of ``task`` with ``tokens`` non-padding input tokens on this rank; its losses
        count only where ``ok`` (a 0/1 device flag: the loss was finite) is 1."""
        t = TASKS.index(task)
        losses = torch.stack([out.loss.detach(), out.image_loss.detach()]).float()
        if ok is None:
            ok = torch.ones((), device=self.device)
        self.losses[t] += torch.where(ok > 0, losses, 0.0)
        self.steps[t] += ok
        self.tokens[t] += tokens

    def summary(self, data_stats: Counter, grad_norm=None, guard: Optional[NonFiniteGuard] = None,
                last_ckpt: Optional[str] = None, info=None) -> dict[str, float]:
        """Window means over all ranks (a collective: every rank calls it) and ``grad_norm`` (a float or device
        tensor; None: nan), in one read back to the host, with ``guard``'s pending flags, which are then settled
        (``NonFiniteGuard.settle``: it may stop the run); then ``reset``.

        ``data_stats`` is this rank's running count of row statuses; the totals of dropped rows are summed
        over ranks.
        """
        skipped = sum(v for k, v in data_stats.items() if k != "ok" and not k.startswith("converted"))
        host = torch.tensor(self.tokens + [skipped, data_stats.get("too_long", 0)], dtype=torch.float64)
        summed = all_reduce_sum(torch.cat([self.losses.flatten().double(), self.steps.double(), host.to(self.device)]))
        norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, dtype=torch.float64)
        flags = guard.pending_flags() if guard is not None else torch.zeros(0, device=self.device)
        values = torch.cat([summed, norm.to(self.device).view(1), flags.double()]).tolist()
        if guard is not None:
            guard.settle(values[len(values) - len(flags):], last_ckpt, info or (lambda msg: None))
            values = values[: len(values) - len(flags)]
        n = len(TASKS)
        losses, steps, tokens = values[: 2 * n], values[2 * n : 3 * n], values[3 * n : 4 * n]
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out: dict[str, float] = {}
        for t, task in enumerate(TASKS):
            if steps[t]:
                out[f"{task}/loss"] = losses[2 * t] / steps[t]
                if task == GENERATION:
                    out[f"{task}/image_loss"] = losses[2 * t + 1] / steps[t]
                out[f"{task}/tokens_per_s"] = tokens[t] / elapsed
        out["tokens_per_s"] = sum(tokens) / elapsed
        out["data/skipped"], out["data/too_long"] = values[-3], values[-2]
        out["grad_norm"] = values[-1]
        self.reset()
        return out
