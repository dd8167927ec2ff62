"""What a run reports: ``RunLogger`` (rank 0's console, TensorBoard and progress bar), ``MetricsWindow`` (the
logged values of one interval, summed on the device and read back once) and ``first_line`` (an error's message in
one line)."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Union

import torch

from .distributed import all_reduce_sum

log = logging.getLogger("vqrae")


class RunLogger:
    """Rank-0 console + TensorBoard + tqdm. Other ranks get a no-op logger.

    Args:
        output_dir: TensorBoard events go to ``<output_dir>/tb``.
        total_steps: progress bar length.
        start_step: where a resumed run starts.
        enabled: False on ranks other than 0.
        tensorboard: write TensorBoard events.
        progress_bar: show tqdm.
    """

    def __init__(self, output_dir: str, total_steps: int, start_step: int, enabled: bool, tensorboard: bool = True,
                 progress_bar: bool = True):
        self.enabled = enabled
        self.writer = self.bar = None
        if not enabled:
            return
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tb"))
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, leave=False)

    def info(self, msg: str) -> None:
        if self.enabled:
            self._emit(msg)

    def _emit(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            log.info(msg)

    def scalars(self, step: int, values: Dict[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if console:
            self._emit(f"step {step} " + " ".join(f"{k}={v:.4g}" for k, v in values.items()))

    def image(self, step: int, tag: str, grid: torch.Tensor) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


@dataclass
class WindowReading:
    """One log interval's values on the host (``MetricsWindow.read``)."""

    means: Dict[str, Dict[str, float]]  # group -> key -> mean over its micro-steps with a finite loss (0 without one)
    steps: Dict[str, float]  # group -> micro-steps with a finite loss
    items: Dict[str, float]  # group -> items trained on (images, tokens)
    seconds: float  # since the window started
    totals: Dict[str, float]  # the host numbers given to ``read``
    extra: List[List[float]]  # the device values given to ``read``, flattened, as they were


class MetricsWindow:
    """Sums of the logged values over one log interval, kept on the device so that a micro-step costs no host
    read; ``read`` brings them to the host in one transfer, then starts the next window.

    Each micro-step adds its values (losses) under a group (a task; ``""`` where the loop has one), left out when
    its loss was not finite (``ok`` 0), and a count of what it trained on (images, tokens). With ``across_ranks``,
    ``read`` first sums the window over ranks: a collective every rank calls, having added the same groups and keys.

    Args:
        device: where the sums live.
        across_ranks: ``read`` sums over ranks (else each rank reads its own values).
    """

    def __init__(self, device: Union[torch.device, str], across_ranks: bool = False):
        self.device, self.across_ranks = torch.device(device), across_ranks
        self.reset()

    def reset(self) -> None:
        self.sums: Dict[tuple[str, str], torch.Tensor] = {}  # (group, key) -> sum over micro-steps with a finite loss
        self.steps: Dict[str, torch.Tensor] = {}  # group -> micro-steps with a finite loss
        self.items: Dict[str, float] = {}  # group -> images or tokens, on the host
        self.start = time.perf_counter()

    def add(self, values: Mapping[str, torch.Tensor], ok: Optional[torch.Tensor] = None, items: float = 0,
            group: str = "") -> None:
        """One micro-step's ``values`` (device scalars), counted only where ``ok`` (a 0/1 device flag: the loss was
        finite; None: 1) is 1, and the ``items`` it trained on."""
        ok = torch.ones((), device=self.device) if ok is None else ok.float()
        for k, v in values.items():
            v = torch.where(ok > 0, v.detach().float(), 0.0)
            self.sums[group, k] = self.sums[group, k] + v if (group, k) in self.sums else v
        self.steps[group] = self.steps[group] + ok if group in self.steps else ok
        self.items[group] = self.items.get(group, 0) + items

    def read(self, *extra: Union[torch.Tensor, float, None], totals: Mapping[str, float] = {}) -> WindowReading:
        """The window on the host, then ``reset``. ``extra`` device values (a grad norm, flags, a histogram; None
        reads as nan) come in the same transfer as they are; ``totals`` (host numbers) are summed over ranks with
        the window when ``across_ranks``."""
        keys, groups = sorted(self.sums), sorted(self.steps)  # one layout on every rank, whatever the order of adds
        sums = [self.sums[k] for k in keys] + [self.steps[g] for g in groups]
        sums = torch.stack(sums).double() if sums else torch.zeros(0, dtype=torch.float64, device=self.device)
        host = torch.tensor([self.items[g] for g in groups] + list(totals.values()), dtype=torch.float64)
        packed = torch.cat([sums, host.to(self.device)])
        if self.across_ranks:
            packed = all_reduce_sum(packed)
        extra = [torch.as_tensor(float("nan") if e is None else e, dtype=torch.float64).to(self.device).flatten()
                 for e in extra]
        values = torch.cat([packed, *extra]).tolist()  # the one read back
        nk, ng, nt = len(keys), len(groups), len(totals)
        steps = dict(zip(groups, values[nk : nk + ng]))
        at = {k: i for i, k in enumerate(keys)}
        means: Dict[str, Dict[str, float]] = {}
        for group, k in self.sums:  # in the order the keys were first added: the log's order
            means.setdefault(group, {})[k] = values[at[group, k]] / max(1.0, steps[group])
        rest, parts = values[nk + 2 * ng + nt :], []
        for e in extra:
            parts.append(rest[: e.numel()])
            rest = rest[e.numel() :]
        reading = WindowReading(means, steps, dict(zip(groups, values[nk + ng : nk + 2 * ng])),
                                max(time.perf_counter() - self.start, 1e-9),
                                dict(zip(totals, values[nk + 2 * ng : nk + 2 * ng + nt])), parts)
        self.reset()
        return reading
