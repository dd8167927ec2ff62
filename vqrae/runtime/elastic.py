"""A run that outlives its cluster: pre-emption signals, and resuming on another number of ranks.

Clusters stop jobs (SLURM and Kubernetes send SIGTERM, ``sbatch --signal=USR1@120`` SIGUSR1 ahead of the time
limit) and hand back whatever GPUs are free. ``StopSignals`` turns either signal into a request that every rank
agrees on at the next optimizer step; the trainers then write a complete checkpoint and raise ``Preempted``,
which the command line turns into exit code ``PREEMPTED_EXIT``. A second signal changes nothing: the save goes
on, and a kill during it still leaves the previous complete checkpoint (``checkpoint.Checkpointer``).

A checkpoint written by K ranks resumes on M ranks: the data samplers keep rank-independent positions
(``vqrae.data``), DeepSpeed's ZeRO 1-3 optimizer partitions are re-split through its universal checkpoint
(DeepSpeed's ``ds_to_universal``, then its ``load_universal``), ranks without saved RNG state get one derived from the
run's seed, the step and the rank. What stays exact and what does not is listed in README.md ("Running on a
cluster").
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import shutil
import signal
import threading
from typing import Optional

import numpy as np
import torch

from .checkpoint import save_checkpoint
from .config import TrainingError
from .distributed import barrier, from_rank0, host_any
from .log import first_line
from .safe_load import deepspeed_records, load_engine_checkpoint, safe_load

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by the cluster, a checkpoint written; requeue with --resume auto
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(Exception):
    """The run stopped on a signal after writing ``checkpoint`` at ``step``."""

    def __init__(self, signame: str, step: int, checkpoint: Optional[str]):
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        super().__init__(f"stopped by {signame} at step {step}; checkpoint {checkpoint or 'none'} is complete; "
                         "continue with --resume auto (on any number of ranks that divides the global batch)")


class StopSignals:
    """SIGTERM and SIGUSR1 set a flag instead of ending the process, while the context is open.

    ``agreed()``, called by every rank at each optimizer step, is True on all ranks once any rank got a signal
    (a host collective, no device sync). The handlers of the process are restored on exit. Outside the main
    thread (where Python cannot install handlers) nothing is installed and ``agreed`` still agrees on the flag.
    """

    def __init__(self):
        self.received: Optional[str] = None
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:  # a second signal while the checkpoint is written changes nothing
            self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        return host_any(self.received is not None)

    def name(self) -> str:
        return self.received or "a signal on another rank"

    def exit_if_agreed(self, s, step: int, total: int, last: Optional[str], guard, write, logger) -> None:
        """At the end of optimizer step ``step`` of ``total``: once a rank got a signal (and the run is not at its
        end), settle the non-finite guard, write this step's checkpoint (``checkpoint.save_checkpoint`` with the
        trainer's ``write``; a scheduled one just written serves) and raise ``Preempted``. Every rank calls it."""
        if step >= total or not self.agreed():
            return
        guard.read(last, logger.info)
        if not last or not last.endswith(f"step_{step:08d}"):
            last = save_checkpoint(s, step, last, write)
        logger.info(f"stopping: {self.name()} at step {step}; checkpoint {last}")
        logger.close()
        raise Preempted(self.name(), step, last)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave SIGTERM/SIGUSR1 to their rank, which stops them itself once
    its checkpoint is written (a cluster signals every process of the job, a launcher the whole process tree)."""
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


# -- another number of ranks -----------------------------------------------------------------------------------
def saved_world(checkpoint: str) -> int:
    """How many ranks wrote ``checkpoint``: each writes its own ``rng_rank<r>.pt``."""
    return len(glob.glob(os.path.join(checkpoint, "rng_rank*.pt")))


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of ``rank`` resuming at ``step`` on another number of ranks than the checkpoint's."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] % 2**63)


@contextlib.contextmanager
def _weights_only_torch_load():
    """``torch.load`` as ``weights_only=True`` with DeepSpeed's plain records allowed, inside the block: DeepSpeed's
    universal-checkpoint code loads with ``weights_only=False``, which would run code a crafted file holds."""
    real = torch.load

    def load(f, map_location=None, *args, **kwargs):
        with torch.serialization.safe_globals(deepspeed_records()):
            return real(f, map_location=map_location, weights_only=True)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def universal_checkpoint(checkpoint: str, tag: str, rank: int) -> str:
    """DeepSpeed's universal form of engine checkpoint ``<checkpoint>/<tag>``, made once by rank 0 under
    ``<checkpoint>/universal/<tag>`` (a temporary folder renamed when complete: a crash mid-way leaves nothing to
    be taken for it); returns the folder to load from with ``tag``. Every rank calls this."""
    out = os.path.join(checkpoint, "universal")
    error = None
    if rank == 0 and not os.path.isdir(os.path.join(out, tag)):
        from deepspeed.checkpoint import ds_to_universal

        tmp = os.path.join(checkpoint, f".universal-{tag}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        # one process: the converter's worker pool would not see the weights-only loader
        args = argparse.Namespace(input_folder=os.path.join(checkpoint, tag), output_folder=os.path.join(tmp, tag),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        try:
            with _weights_only_torch_load(), contextlib.redirect_stdout(io.StringIO()):
                ds_to_universal.main(args)
            os.makedirs(out, exist_ok=True)
            os.replace(os.path.join(tmp, tag), os.path.join(out, tag))
        except Exception as e:  # DeepSpeed raises many kinds here; all mean this checkpoint cannot be re-split
            error = f"cannot re-split {checkpoint}/{tag} for another number of ranks ({type(e).__name__}: {first_line(e)})"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    error = from_rank0(error)
    if error:
        raise TrainingError(error + "; resume on the number of ranks that wrote it")
    barrier()
    return out


def load_resharded(engine, checkpoint: str, tag: str, strict: bool, rank: int) -> None:
    """Load engine checkpoint ``<checkpoint>/<tag>`` written by another number of ranks.

    ZeRO 1-2: the module (buffers and frozen parameters included), the schedule and the step counters from the
    model-states file, which any number of ranks reads; then the optimizer's master weights and moments from the
    universal form, partitioned for this number of ranks. ZeRO-3: the universal form restores the partitioned
    parameters and their moments, the buffers come from the model-states file of rank 0; frozen parameters are
    the ones the model was built with (a ZeRO-3 checkpoint leaves them out). ZeRO 0 needs none of this: its one
    optimizer state is whole."""
    stage = engine.zero_optimization_stage()
    if stage == 0:
        load_engine_checkpoint(engine, checkpoint, tag, strict)
        return
    if stage < 3:  # the module, lr schedule and counters; DeepSpeed copies the weights into the new partitions
        load_engine_checkpoint(engine, checkpoint, tag, strict, load_optimizer_states=False)
    universal = universal_checkpoint(checkpoint, tag, rank)
    engine._config.load_universal_checkpoint = True
    try:
        with _weights_only_torch_load():
            loaded, _ = engine.load_checkpoint(universal, tag=tag, load_module_strict=strict)
    except TrainingError:
        raise
    except Exception as e:
        raise TrainingError(f"cannot load {checkpoint}/{tag} on this number of ranks ({type(e).__name__}: "
                            f"{first_line(e)})") from None
    finally:
        engine._config.load_universal_checkpoint = False
    if loaded is None:
        raise TrainingError(f"{checkpoint}: no DeepSpeed checkpoint '{tag}' in it")
    if stage == 3:
        zero3 = engine.optimizer
        # DeepSpeed's ZeRO-3 universal loader hands every group one and the same step-count tensor, which the fused
        # AdamW then advances once per group and step: each group gets its own.
        for state in zero3.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        _load_buffers(engine.module, os.path.join(checkpoint, tag))
        _restore_group_settings(zero3.optimizer, os.path.join(universal, tag, "zero", "optimizer_state.pt"))


def _restore_group_settings(optimizer: torch.optim.Optimizer, path: str) -> None:
    """Each parameter group's settings (lr, weight decay, ...) as saved. DeepSpeed's ZeRO-3 universal loader gives
    every group the first group's, which would decay the norms and biases and train every group at one lr."""
    saved = safe_load(path, "cpu", deepspeed_records())["optimizer_state_dict"]["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise TrainingError(f"{path}: {len(saved)} parameter groups saved, {len(optimizer.param_groups)} in this run")
    for group, values in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in values.items() if k != "params"})


def _load_buffers(module: torch.nn.Module, folder: str) -> None:
    """The buffers of ``module`` from a ZeRO-3 model-states file (rank 0's: every rank saves the same buffers)."""
    files = sorted(glob.glob(os.path.join(folder, "*zero_pp_rank_0_*model_states.pt")))
    if not files:
        raise TrainingError(f"{folder}: no ZeRO-3 model-states file of rank 0")
    saved = safe_load(files[0], "cpu", deepspeed_records()).get("module") or {}
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in saved and torch.is_tensor(saved[name]) and saved[name].shape == buf.shape:
                buf.copy_(saved[name])

