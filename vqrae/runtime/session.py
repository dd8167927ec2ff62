"""What both trainers do around their loops: ``session`` (process group, seeds, the run lock, the checkpoint to
resume), ``restore`` and ``load_engine`` (on this or another number of ranks), ``EmptyBatches``, ``due``,
``SaveSchedule`` and ``finish``. Each loop stays in its trainer (``vqrae.train``, ``mllm.train``) and calls these in order."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import elastic
from .checkpoint import Checkpointer, publish, seed_everything, set_rng_state
from .config import RunConfig, TrainingError
from .distributed import host_any, init_distributed
from .guard import NonFiniteGuard
from .lock import release_run_lock, take_run_lock
from .log import RunLogger
from .safe_load import load_engine_checkpoint, safe_load


@dataclass
class Session:
    """A started run: this process's place in the process group and the checkpoint it resumes from."""

    rank: int
    world: int
    device: torch.device
    ckpt: Checkpointer
    resume_dir: Optional[str]  # None: a fresh run
    saved_world: int = 0  # ranks that wrote resume_dir (0: a fresh run)

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextmanager
def session(run: RunConfig, resume: Optional[str]):
    """Join the process group, seed every rank alike (identical initialisation), take ``run.output_dir``'s lock
    (released on leaving, also on errors; a killed run's lock is taken over as stale) and resolve ``resume``
    (``None``, ``"auto"`` or a checkpoint folder)."""
    rank, world, device = init_distributed()
    seed_everything(run.seed)
    os.makedirs(run.output_dir, exist_ok=True)
    take_run_lock(run.output_dir, rank)
    try:
        ckpt = Checkpointer(run.output_dir, run.keep_last, rank)
        resume_dir = ckpt.resolve(resume)
        yield Session(rank, world, device, ckpt, resume_dir, elastic.saved_world(resume_dir) if resume_dir else 0)
    finally:
        release_run_lock(run.output_dir)


def restore(s: Session, seed: int) -> Optional[dict]:
    """The trainer state (``trainer.pt``) of the checkpoint ``s`` resumes from, with this rank's RNG restored (on
    another number of ranks: seeded from the run's seed, the step and the rank); for a fresh run None, with the
    RNG seeded per rank (data augmentation, dropout)."""
    if not s.resume_dir:
        seed_everything(seed + s.rank)
        return None
    state = safe_load(os.path.join(s.resume_dir, "trainer.pt"))  # tensors and plain data only: never code
    if s.saved_world == s.world:
        set_rng_state(safe_load(os.path.join(s.resume_dir, f"rng_rank{s.rank}.pt")))
    else:
        seed_everything(elastic.rank_seed(seed, int(state["step"]), s.rank))
    return state


def load_engine(s: Session, engine, tag: str, strict: bool = True) -> None:
    """Load engine checkpoint ``tag`` of the checkpoint ``s`` resumes from, written by this or another number of
    ranks (``elastic.load_resharded``)."""
    if s.saved_world == s.world:
        load_engine_checkpoint(engine, s.resume_dir, tag, strict)
    else:
        elastic.load_resharded(engine, s.resume_dir, tag, strict, s.rank)


def resumed_line(s: Session, step: int) -> str:
    """How the log names a resumed run."""
    return (f"resumed from step {step} on {s.world} ranks (checkpoint written by {s.saved_world}): {s.resume_dir}"
            if s.resume_dir else "")


class EmptyBatches:
    """Micro-batches whose rows were all unreadable are skipped by every rank together (or collectives desync);
    ``limit`` of them in a row stop the run, since a source without a usable row would loop forever.

    The agreement is a collective on the host (over the CPU process group), never a device sync; a lone rank
    needs none.
    """

    def __init__(self, limit: int):
        self.limit, self.run = limit, 0

    def skip(self, rows: int, error: Callable[[int], str]) -> bool:
        """True when this micro-batch (``rows`` usable rows here) is empty on some rank; at the limit a
        ``TrainingError`` with the message ``error(empty micro-batches in a row)``."""
        if not host_any(rows == 0):
            self.run = 0
            return False
        self.run += 1
        if self.run >= self.limit:
            raise TrainingError(error(self.run))
        return True


def due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (log, save, image) falls on ``step``: every ``every`` steps and at the end."""
    return step == total or (every > 0 and step % every == 0)


class SaveSchedule:
    """When a run writes its checkpoints: every ``every`` steps and at step ``total``. One that falls due waits while
    the latest steps were skipped (``NonFiniteGuard.clear_to_save``, which settles the guard's pending flags), so
    that it never replaces the last good checkpoint with a run of skipped steps; the last step's is never held."""

    def __init__(self, every: int, total: int):
        self.every, self.total, self.wanted = every, total, False

    def ready(self, step: int, guard: NonFiniteGuard, last: Optional[str], info: Callable[[str], None]) -> bool:
        """Whether to write the checkpoint of ``step`` now (every rank calls it: settling the guard is a collective)."""
        self.wanted = self.wanted or due(step, self.every, self.total)
        if self.wanted and (guard.clear_to_save(step, last, info) or step == self.total):
            self.wanted = False
            return True
        return False


def finish(s: Session, run: RunConfig, step: int, last: Optional[str], logger: RunLogger, guard: NonFiniteGuard,
           summary: str) -> Optional[str]:
    """End the run: settle ``guard``'s last flags (a collective; too many non-finite steps in a row still stop the
    run), then rank 0 publishes the newest checkpoint's model as ``<output_dir>/model`` and logs ``summary`` with
    the count of skipped steps; returns the export folder (None on other ranks or without a checkpoint)."""
    guard.read(last, logger.info)
    export_dir = None
    if s.main and last:
        export_dir = os.path.join(run.output_dir, "model")
        publish(last, export_dir)
        logger.info(f"{summary}; non-finite steps skipped: {guard.total}")
        logger.info(f"done: {step} steps; model exported to {export_dir}")
    logger.close()
    return export_dir
