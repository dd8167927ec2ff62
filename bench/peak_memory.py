"""Peak memory of a block of benchmark code: the CUDA allocator's peak on a GPU, sampled RSS on a CPU."""
from __future__ import annotations

import os
import threading
import time

import torch


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak on a GPU, sampled RSS on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = self.base = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = self.peak = _rss()
            self._running = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._running = False
            self._thread.join()
            self.peak = max(self.peak, _rss())
        self.extra_mib = max(0, self.peak - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
