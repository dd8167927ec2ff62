"""The two training tasks of the unified model: which one each micro-batch trains.

Joint training interleaves two tasks, one per micro-batch: generation (caption -> the image's VQRAE codes)
and understanding (image features + conversation -> answers). ``TaskSchedule`` decides the task of every
micro-batch from its index alone, so all ranks run the same task at the same time (their collectives stay
in step) and a resumed run continues the schedule from a saved counter. Each task reads its own data
(``mllm.data.TaskLoader``); the loop's ``vqrae.runtime.log.MetricsWindow`` sums each task's loss by task
name.
"""
from __future__ import annotations

import math

import numpy as np

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
