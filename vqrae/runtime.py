"""What the tokenizer and MLLM trainers share (``vqrae.train``, ``mllm.train``).

Run and optimizer configs, the DeepSpeed config built from them, one precision design, parameter groups and
schedules, EMA, crash-safe self-verifying checkpoints (temp folder + manifest + rename; ``--resume auto`` takes
the newest intact one), safe loading of DeepSpeed checkpoints, RNG state, one run per output folder, the
non-finite step guard, rank-0 logging (console, TensorBoard, progress bar), and the few steps every run takes
around its loop: ``session``, ``restore``, ``save_checkpoint``, ``EmptyBatches``, ``finish``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError

log = logging.getLogger("vqrae")

MANIFEST = "manifest.json"


@dataclass
class OptimConfig:
    lr: float = 4e-4  # peak lr of the trained modules (decoder, projections, W)
    schedule: str = "cosine"  # "cosine" (warmup then cosine to lr * min_lr_ratio) or "constant" (after warmup)
    min_lr_ratio: float = 0.25  # cosine floor: 4e-4 -> 1e-4
    warmup_steps: int = 2000
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 1e-4  # on matrices only; norms, biases and embeddings of positions are not decayed
    grad_clip: float = 1.0


@dataclass
class RunConfig:
    output_dir: str = "outputs/run"
    steps: int = 100000  # optimizer steps
    batch_size: int = 1024  # global batch (all ranks, all accumulation micro-steps)
    micro_batch_size: int = 32  # per rank per micro-step; accumulation = batch / (micro * world)
    precision: str = "bf16"  # "bf16" or "fp32"
    zero_stage: int = 1  # 0-3
    deepspeed_config: Optional[str] = None  # JSON merged over the generated config (e.g. configs/deepspeed/zero3.json)
    seed: int = 0
    log_every: int = 10
    image_every: int = 1000  # reconstruction / sample grid cadence
    save_every: int = 1000
    keep_last: int = 3  # complete checkpoints kept
    ema_decay: float = 0.9999  # 0 disables EMA
    max_nonfinite: int = 10  # consecutive skipped (non-finite) optimizer steps before the run stops
    tensorboard: bool = True
    progress_bar: bool = True


class TrainingError(RuntimeError):
    """A run cannot continue; the message is one line for the user."""


# -- distributed --------------------------------------------------------------------------------------------
SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's op-builder name for its CPU shared-memory all-reduce


def init_distributed() -> tuple[int, int, torch.device]:
    """Start the process group the ``deepspeed`` launcher describes (gloo on CPU). Returns rank, world, device."""
    import deepspeed

    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:  # a lone process without the launcher: any free port will do
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        if _default_threads():  # a user's OMP_NUM_THREADS or torch.set_num_threads wins
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
            torch.set_num_threads(cpu_threads(local))
    if not dist.is_initialized():
        # DeepSpeed's CPU shared-memory all-reduce op serves only inference_all_reduce (tensor-parallel
        # inference), never training; compiling it took ~30 s of every first run on a fresh machine
        with _without_op(deepspeed.ops.__compatible_ops__, SHM_OP, backend == "gloo"):
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return dist.get_rank(), dist.get_world_size(), device


def _usable_cores() -> int:
    """The cores this process may run on (taskset, cgroups)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _default_threads() -> bool:
    """True when nobody chose the thread count: no OMP_NUM_THREADS and torch's count still its default (the
    cores this process could use when torch started, or all of the machine's)."""
    return "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() in (_usable_cores(), os.cpu_count())


def cpu_threads(local_ranks: int, cores: Optional[int] = None) -> int:
    """Threads per rank on a CPU: the cores this process may use, shared among the ranks of this host (at least
    one). Fixed by the machine, not by its momentary load, so a resumed run computes with the same thread count
    (and the same float sums) as the run it continues; on a machine shared with other jobs set
    ``OMP_NUM_THREADS``, which wins."""
    cores = _usable_cores() if cores is None else cores
    return max(1, cores // max(1, local_ranks))


@contextmanager
def _without_op(table: dict, name: str, active: bool):
    """``table[name] = False`` inside the block (when ``active``), the table as it was afterwards."""
    if not active:
        yield
        return
    had, old = name in table, table.get(name)
    table[name] = False
    try:
        yield
    finally:
        if had:
            table[name] = old
        else:
            table.pop(name, None)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- optimizer ----------------------------------------------------------------------------------------------
def check_run_config(run: RunConfig, optim: OptimConfig, world_size: int) -> None:
    """Raise ``TrainingError`` (one line) for run or optimizer settings that cannot train.

    Needs nothing but the configs, so entry points call it before any model, data or process group exists.
    """
    for name in ("steps", "batch_size", "micro_batch_size", "log_every", "save_every", "keep_last", "max_nonfinite"):
        if getattr(run, name) < 1:
            raise TrainingError(f"run.{name} must be >= 1, got {getattr(run, name)}")
    per_step = run.micro_batch_size * world_size
    if run.batch_size % per_step:
        from .elastic import world_sizes

        counts = world_sizes(run.batch_size, run.micro_batch_size, limit=4096)
        fits = (f"rank counts that keep it: {', '.join(map(str, counts[:24]))}{' ...' if len(counts) > 24 else ''}"
                if counts else f"it must be a multiple of micro_batch_size {run.micro_batch_size}")
        raise TrainingError(
            f"run.batch_size {run.batch_size} is not divisible by micro_batch_size {run.micro_batch_size} x "
            f"{world_size} ranks; {fits}"
        )
    if run.precision not in ("bf16", "fp32"):
        raise TrainingError(f"run.precision must be 'bf16' or 'fp32', got '{run.precision}'")
    if run.zero_stage not in (0, 1, 2, 3):
        raise TrainingError(f"run.zero_stage must be 0, 1, 2 or 3, got {run.zero_stage}")
    if run.image_every < 0:
        raise TrainingError(f"run.image_every must be >= 0 (0 = never), got {run.image_every}")
    if not 0.0 <= run.ema_decay < 1.0:
        raise TrainingError(f"run.ema_decay must lie in [0, 1) (0 = no EMA), got {run.ema_decay}")
    if run.deepspeed_config and not os.path.isfile(run.deepspeed_config):
        raise TrainingError(f"run.deepspeed_config not found: {run.deepspeed_config}")
    if optim.schedule not in ("cosine", "constant"):
        raise TrainingError(f"optim.schedule must be 'cosine' or 'constant', got '{optim.schedule}'")
    if not optim.lr > 0 or not math.isfinite(optim.lr):
        raise TrainingError(f"optim.lr must be a positive number, got {optim.lr}")
    if len(optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in optim.betas):
        raise TrainingError(f"optim.betas must be two numbers in [0, 1), got {list(optim.betas)}")
    if optim.warmup_steps < 0 or optim.grad_clip < 0 or not optim.eps > 0:
        raise TrainingError(
            f"optim.warmup_steps and optim.grad_clip must be >= 0 and optim.eps > 0, got {optim.warmup_steps}, "
            f"{optim.grad_clip}, {optim.eps}"
        )


# -- precision ------------------------------------------------------------------------------------------------
# One design for both trainers. Parameters, gradients and optimizer states are fp32: DeepSpeed runs in its fp32
# mode and its ZeRO partitions hold fp32 master weights. ``run.precision: bf16`` runs every forward pass and loss
# under ``torch.autocast(bfloat16)``: DeepSpeed's ``torch_autocast`` section covers what runs inside an engine's
# forward (and reduces the gradients of linear/conv weights in bf16), ``autocast`` below covers the loss terms
# computed around it. Matrix products and convolutions then run in bf16, while buffers that must stay exact
# (pixel mean/std, SimVQ's frozen base codebook C', the feature statistics) keep fp32 and never meet a bf16
# parameter, which DeepSpeed's bf16 mode would cast (it casts parameters, not buffers). The quantizer turns
# autocast off inside: its projection, codebook C = C'W^T, nearest-code search and loss terms are fp32 whatever
# the precision, so its indices equal the fp32 exact search on the same features. Memory per trained parameter
# equals DeepSpeed's bf16 mode: fp32 weight + fp32 grad + two fp32 Adam moments (16 B) against bf16 weight +
# bf16 grad + fp32 master + two moments (16 B).
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def autocast(precision: str, device: torch.device):
    """The autocast context of ``run.precision`` on ``device`` (a no-op context for fp32)."""
    dtype = COMPUTE_DTYPES[precision]
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def deepspeed_config(run: RunConfig, optim: OptimConfig, world_size: int) -> Dict[str, Any]:
    """DeepSpeed's config for ``run``, with ``run.deepspeed_config`` merged over it; its ZeRO stage (which that
    file may set) is ``cfg["zero_optimization"]["stage"]``. ``run`` itself is left as it is."""
    check_run_config(run, optim, world_size)
    per_step = run.micro_batch_size * world_size
    cfg: Dict[str, Any] = {
        "train_batch_size": run.batch_size,
        "train_micro_batch_size_per_gpu": run.micro_batch_size,
        "gradient_accumulation_steps": run.batch_size // per_step,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": False},  # fp32 master weights; bf16 compute comes from torch_autocast (see above)
        "torch_autocast": {"enabled": run.precision == "bf16", "dtype": "bfloat16"},
        "zero_optimization": {"stage": run.zero_stage},
        "steps_per_print": 10**9,  # our logger reports; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # GuardedAdamW is torch's AdamW, subclassed
    }
    if run.deepspeed_config:
        try:
            with open(run.deepspeed_config) as f:
                extra = json.load(f)
        except ValueError as e:
            raise TrainingError(f"run.deepspeed_config {run.deepspeed_config} is not valid JSON: {e}") from None
        if not isinstance(extra, dict):
            raise TrainingError(f"run.deepspeed_config {run.deepspeed_config} must hold a JSON object")
        for k, v in extra.items():
            cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
        for key in ("bf16", "fp16", "torch_autocast"):  # one precision design, set by run.precision
            if key in extra:
                raise TrainingError(f"run.deepspeed_config {run.deepspeed_config} sets '{key}'; set run.precision "
                                    "(bf16 or fp32) instead")
        stage = cfg["zero_optimization"].get("stage", run.zero_stage)
        if stage not in (0, 1, 2, 3):
            raise TrainingError(f"zero_optimization.stage in {run.deepspeed_config} must be 0-3, got {stage}")
    return cfg


def param_groups(named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float, name: str) -> List[dict]:
    """Two AdamW groups at one lr: decayed matrices, and undecayed vectors (norms, biases) and pos embeddings."""
    decay, no_decay = [], []
    for n, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "pos_embed" in n else decay).append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": f"{name}"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}_no_decay"},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(groups: List[dict], optim: OptimConfig) -> "GuardedAdamW":
    # A client optimizer: DeepSpeed wraps it (ZeRO) without JIT-building its fused Adam op.
    return GuardedAdamW(groups, betas=tuple(optim.betas), eps=optim.eps)


class GuardedAdamW(torch.optim.AdamW):
    """PyTorch's fused AdamW whose update is skipped on the device when the step is flagged: weights, moments
    and step counts stay as they were, and nothing is read back to the host.

    A step is flagged when the guard said so (``skip_if``: a non-finite loss on some rank) or when a gradient
    this optimizer holds is not finite. ``skipped`` is the last step's flag (a 0/1 device tensor). Under ZeRO
    each rank holds a shard of the gradients; a finite loss with non-finite gradients in one shard only would
    be skipped there alone, which ``NonFiniteGuard.settle`` reports as an error.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self._flag: Optional[torch.Tensor] = None
        self._found: Optional[torch.Tensor] = None

    def skip_if(self, flag: torch.Tensor) -> None:
        """Flag (> 0) the next optimizer step (every ``step`` call until the next ``skip_if``: ZeRO-3 calls it
        once per parameter sub-group)."""
        self._flag, self._found = flag, None

    @property
    def skipped(self) -> Optional[torch.Tensor]:
        """1 if the step since ``skip_if`` was skipped, on the device. 1 also when no ``step`` ran: a wrapper
        that drops the step itself (DeepSpeed's overflow check, where enabled) skipped it. None before any."""
        if self._found is None and self._flag is not None:
            return torch.ones((), device=self._flag.device)
        return self._found

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Also a plain AdamW's state (a checkpoint written before the optimizer was fused): the groups stay
        fused, with their step counts where the fused kernel reads them."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["fused"], group["foreach"] = True, None
            for p in group["params"]:
                st = self.state.get(p, {})
                if "step" in st:
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
            if self._flag is not None:
                bad = bad | (self._flag.to(bad.device) > 0)
            self.found_inf = bad.float()  # the fused kernel reads it on the device
            self._found = self.found_inf if self._found is None else torch.maximum(self._found, self.found_inf)
        try:
            return super().step(closure)
        finally:
            self.found_inf = None


def make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
    """DeepSpeed's own schedules; each parameter group keeps its own peak lr."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR, WarmupLR

    warmup = max(1, min(optim.warmup_steps, max(1, total_steps - 1)))
    if optim.schedule == "cosine":
        return WarmupCosineLR(optimizer, total_num_steps=max(total_steps, warmup + 1), warmup_min_ratio=0.0,
                              warmup_num_steps=warmup, cos_min_ratio=optim.min_lr_ratio, warmup_type="linear")
    if optim.schedule == "constant":
        lrs = [g["lr"] for g in optimizer.param_groups]
        return _GroupWarmupLR(WarmupLR(optimizer, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=warmup,
                                       warmup_type="linear"), lrs)
    raise TrainingError(f"optim.schedule must be 'cosine' or 'constant', got '{optim.schedule}'")


class _GroupWarmupLR:
    """DeepSpeed's WarmupLR sets one absolute lr for all groups; scale it per group so each keeps its own peak."""

    def __init__(self, inner, peak_lrs: List[float]):
        self.inner, self.peak = inner, peak_lrs
        self._apply()

    def _apply(self) -> None:
        ratio = self.inner.get_lr()[0]
        for g, lr in zip(self.inner.optimizer.param_groups, self.peak):
            g["lr"] = lr * ratio

    def step(self, last_batch_iteration=None):
        self.inner.step(last_batch_iteration)
        self._apply()

    def get_last_lr(self):
        return [g["lr"] for g in self.inner.optimizer.param_groups]

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, sd):
        self.inner.load_state_dict(sd)
        self._apply()


# -- EMA ----------------------------------------------------------------------------------------------------
class EMA:
    """fp32 exponential moving average of a module's trainable parameters (frozen ones are copied as is).

    Args:
        module: the live model (DeepSpeed engine's ``module``).
        decay: EMA decay per optimizer step.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module, skipped: Optional[torch.Tensor] = None) -> None:
        """One step of the average; none (on the device, without a host read) when ``skipped`` is 1."""
        weight = 1.0 - self.decay if skipped is None else (1.0 - skipped) * (1.0 - self.decay)
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), weight)

    def state_dict_for(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        """The module's full state dict with EMA values substituted for the averaged parameters."""
        sd = module.state_dict()
        for n, v in self.shadow.items():
            sd[n] = v.to(sd[n].dtype)
        return sd

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(sd)
        if missing:
            raise TrainingError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for n in self.shadow:
            self.shadow[n].copy_(sd[n])


# -- RNG ----------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    state = {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = json.loads(state["numpy"])
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- checkpoints --------------------------------------------------------------------------------------------
class Checkpointer:
    """Crash-safe, self-verifying checkpoints under ``<output_dir>/checkpoints/step_<N>``.

    Every rank writes into ``.tmp-step_<N>``; after a barrier rank 0 writes ``manifest.json`` (step, and each
    file's size and blake2b digest) and renames the folder, so a folder without a manifest is never picked on
    resume. A failed write (full disk, permissions) raises before the rename and leaves earlier checkpoints
    untouched; ``discard`` removes the partial folder. On resume rank 0 checks the files against the manifest
    (sizes first, then digests) and the other ranks take its answer.

    Args:
        output_dir: run directory.
        keep_last: complete checkpoints kept; older ones are deleted after a successful save.
        rank: this process's rank.
    """

    def __init__(self, output_dir: str, keep_last: int, rank: int):
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last, self.rank = keep_last, rank

    def tmp_dir(self, step: int) -> str:
        path = self._tmp_path(step)
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
        barrier()
        return path

    def _tmp_path(self, step: int) -> str:
        return os.path.join(self.root, f".tmp-step_{step:08d}")

    def discard(self, step: int) -> None:
        """Remove what a failed save of ``step`` left, so nothing partial stays on a full disk."""
        shutil.rmtree(self._tmp_path(step), ignore_errors=True)

    def commit(self, tmp: str, step: int, extra: Optional[dict] = None) -> str:
        barrier()
        final = os.path.join(self.root, f"step_{step:08d}")
        if self.rank == 0:
            names = sorted(os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp) for f in fs)
            files = dict(zip(names, _map_files(_file_record, [os.path.join(tmp, n) for n in names])))
            with open(os.path.join(tmp, MANIFEST + ".tmp"), "w") as f:
                json.dump({"step": step, "time": time.time(), "files": files, **(extra or {})}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(os.path.join(tmp, MANIFEST + ".tmp"), os.path.join(tmp, MANIFEST))
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        done = self.complete()
        for path in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    def _saved(self) -> List[str]:
        if not os.path.isdir(self.root):
            return []
        return [os.path.join(self.root, n) for n in sorted(os.listdir(self.root)) if n.startswith("step_")]

    def complete(self) -> List[str]:
        """Complete checkpoints (manifest, every file at its recorded size), oldest first."""
        return [p for p in self._saved() if is_complete(p)]

    def resolve(self, resume: Optional[str]) -> Optional[str]:
        """``None`` -> no resume; ``"auto"`` -> newest intact checkpoint or none (damaged newer ones are skipped
        with a warning); else that directory, which must be intact. Call on every rank."""
        if not resume:
            return None
        path, error = _from_rank0(self._pick(resume) if self.rank == 0 else None)
        if error:
            raise TrainingError(error)
        return path

    def _pick(self, resume: str) -> tuple[Optional[str], Optional[str]]:
        """(checkpoint, None) or (None, error message); rank 0 only: it reads every byte of the candidate."""
        if resume != "auto":
            problem = damage(resume)
            if problem:
                return None, f"--resume {resume}: not a complete checkpoint ({problem})"
            return resume, None
        for path in reversed(self._saved()):
            problem = damage(path)
            if not problem:
                return path, None
            log.warning(f"warning: skipping damaged checkpoint {path} ({problem}); trying an older one")
        return None, None


# What a save on a full disk or lost mount raises, by layer: the OS, torch.save's zip writer, safetensors
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)


def save_failed(err: BaseException, ckpt: Checkpointer, step: int, last: Optional[str]) -> TrainingError:
    """The one-line error for a failed save of ``step``, after removing its partial folder."""
    if isinstance(err, TrainingError):
        return err
    why = first_line(err)
    if not isinstance(err, OSError):  # the serializers' messages do not say the disk is full; the numbers do
        try:
            why += f"; {shutil.disk_usage(ckpt.root).free / 2**20:.1f} MiB free in {ckpt.root}"
        except OSError:
            pass
    ckpt.discard(step)
    return TrainingError(f"writing the step {step} checkpoint failed ({why}); last complete checkpoint: "
                         f"{last or 'none'}")


def _from_rank0(obj):
    """Rank 0's ``obj`` on every rank (itself where there is no process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


HASH_CHUNK = 8 << 20


def _file_record(path: str) -> dict:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return {"size": os.path.getsize(path), "blake2b": h.hexdigest()}


def _map_files(fn, paths: List[str]) -> list:
    # hashlib releases the GIL on large buffers: a multi-GB checkpoint hashes on several cores at once
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(fn, paths))


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST)) as f:
        return json.load(f)


def _manifest_files(path: str) -> Dict[str, Optional[dict]]:
    """relative name -> {size, blake2b}; a manifest that lists names only (older checkpoints) gives None."""
    files = read_manifest(path)["files"]
    if isinstance(files, list):
        return {str(n): None for n in files}
    return {str(n): dict(rec) for n, rec in files.items()}


def damage(path: str) -> Optional[str]:
    """What is wrong with a checkpoint folder (no manifest, a file missing, truncated or changed), or None.

    Sizes are compared first (cheap), digests only once every size matches.
    """
    try:
        files = _manifest_files(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"no readable {MANIFEST}"
    for name, rec in files.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if rec is not None and os.path.getsize(full) != rec.get("size"):
            return f"{name} has {os.path.getsize(full)} bytes, the manifest says {rec.get('size')}"
    checked = [n for n, rec in files.items() if rec is not None and "blake2b" in rec]
    try:
        digests = _map_files(_file_record, [os.path.join(path, n) for n in checked])
    except OSError as e:
        return f"cannot read it: {e}"
    for name, got in zip(checked, digests):
        if got["blake2b"] != files[name]["blake2b"]:
            return f"{name} does not match its checksum"
    return None


def is_complete(path: str) -> bool:
    """A checkpoint folder with a readable manifest whose files all exist at their recorded sizes (a copy can
    lose or truncate some). ``damage`` also checks the contents."""
    try:
        files = _manifest_files(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return all(os.path.isfile(os.path.join(path, n)) and (rec is None or os.path.getsize(os.path.join(path, n))
               == rec.get("size")) for n, rec in files.items())


# -- safe loading -------------------------------------------------------------------------------------------
def _deepspeed_records() -> list:
    """The only non-tensor types in DeepSpeed's checkpoint files (ZeRO 0-3, fp32/bf16/fp16): plain records."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str, map_location=None, allow: Iterable[type] = ()) -> Any:
    """``torch.load(weights_only=True)``: tensors, containers, numbers and the ``allow`` types, never code.

    A file holding anything else, or not a readable torch file, is a one-line ``TrainingError`` naming it.
    """
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's first line invites loading it unsafely: name what it holds
        found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|$)", str(e), re.MULTILINE)
        what = found.group(1) if found else first_line(e)
        raise TrainingError(f"refusing to load {path}: it holds more than tensors and plain data ({what})") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise TrainingError(f"cannot read {path}: {first_line(e).split('. ')[0]}") from None


class _SafeCheckpointEngine:
    """A DeepSpeed checkpoint engine whose ``load`` is ``safe_load`` and checks a model-states file against
    the live module before DeepSpeed copies anything; everything else is the wrapped engine's."""

    def __init__(self, inner, module: nn.Module, strict: bool, where: str):
        self._inner, self._module, self._strict, self._where = inner, module, strict, where

    def load(self, path: str, map_location=None):
        state = safe_load(path, map_location, _deepspeed_records())
        if isinstance(state, dict) and isinstance(state.get("module"), dict):
            problem = shape_mismatch(self._module, state, self._strict)
            if problem:
                raise TrainingError(f"{self._where} does not match this config: {problem}")
        return state

    def __getattr__(self, name):
        return getattr(self._inner, name)


def shape_mismatch(module: nn.Module, state: dict, strict: bool = True) -> Optional[str]:
    """The first difference between a DeepSpeed model-states dict and ``module`` (a parameter or buffer with
    another shape, one the module lacks, or with ``strict`` one the checkpoint lacks), or None."""
    params = list(module.named_parameters(remove_duplicate=False))  # tied weights under each of their names
    live = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in params}
    partitioned = {n for n, p in params if hasattr(p, "ds_shape")}
    live.update({n: tuple(b.shape) for n, b in module.named_buffers(remove_duplicate=False)})
    saved = {k: tuple(v.shape) for k, v in state["module"].items() if torch.is_tensor(v)}
    for k in partitioned & saved.keys():  # ZeRO-3 keeps only a placeholder in the module states
        if math.prod(saved[k]) == 0:
            del saved[k]
    for group in state.get("param_shapes") or []:  # ZeRO: the full shapes of the optimized parameters
        saved.update({k: tuple(v) for k, v in group.items()})
    for name, shape in saved.items():
        if name not in live:
            return f"the checkpoint has {name} {list(shape)}, which this model lacks"
        if live[name] != shape:
            return f"{name} is {list(shape)} in the checkpoint, {list(live[name])} in this model"
    if strict:
        missing = [k for k in module.state_dict() if k not in saved and k not in partitioned]
        if missing:
            return f"this model has {missing[0]} {list(live.get(missing[0], ()))}, which the checkpoint lacks"
    return None


def load_engine_checkpoint(engine, path: str, tag: str, load_module_strict: bool = True,
                           load_optimizer_states: bool = True) -> None:
    """``engine.load_checkpoint`` with every file read through ``safe_load`` (DeepSpeed itself unpickles
    them with ``weights_only=False``, so a crafted file would run its code) and the model checked for shape
    changes first. Bit-exact: only the unpickler differs."""
    real = engine.checkpoint_engine
    engine.checkpoint_engine = _SafeCheckpointEngine(real, engine.module, load_module_strict, path)
    try:
        loaded, _ = engine.load_checkpoint(path, tag=tag, load_module_strict=load_module_strict,
                                           load_optimizer_states=load_optimizer_states)
    finally:
        engine.checkpoint_engine = real
    if loaded is None:
        raise TrainingError(f"{path}: no DeepSpeed checkpoint '{tag}' in it")


# -- one run per output folder ------------------------------------------------------------------------------
LOCK = "run.lock"
LOCK_HEARTBEAT_S = 30.0  # the holder touches its lock this often
LOCK_STALE_S = 120.0  # a lock of another host untouched this long belongs to a run that died there
_heartbeats: Dict[str, threading.Event] = {}


def take_run_lock(output_dir: str, rank: int) -> None:
    """Rank 0 creates ``<output_dir>/run.lock`` (its pid and host) atomically and touches it every
    ``LOCK_HEARTBEAT_S`` while it holds it. A lock is stale, and taken over, when its process no longer exists on
    this host, or when it comes from another host and has not been touched for ``LOCK_STALE_S`` (a run killed
    there: a requeued job may start on any node). Every rank raises the same one-line ``TrainingError`` when
    another run holds it. ``release_run_lock`` removes it."""
    path = os.path.join(output_dir, LOCK)
    error = _from_rank0(_take_lock(path) if rank == 0 else None)
    if error:
        raise TrainingError(error)
    if rank == 0:
        stop = _heartbeats[os.path.abspath(path)] = threading.Event()
        threading.Thread(target=_heartbeat, args=(path, stop), daemon=True, name="run-lock-heartbeat").start()


def _heartbeat(path: str, stop: threading.Event) -> None:
    while not stop.wait(LOCK_HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:  # removed or unreachable for a moment: the next beat tries again
            pass


def _lock_owner(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _take_lock(path: str) -> Optional[str]:
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is not None and (not _alive(owner["pid"]) if owner.get("host") == me["host"]
                                      else _silent_for(path) > LOCK_STALE_S):
                try:  # stale: its run was killed; another starter may remove it first, then O_EXCL decides
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            who = f"pid {owner['pid']} on {owner.get('host')}" if owner else "a run whose lock is unreadable"
            return (f"{os.path.dirname(path) or '.'} is in use by another run ({who}); wait for it to end, or "
                    f"delete {path} if no run uses that folder")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return None
    return f"cannot take {path}: other runs keep starting in that folder"


def _silent_for(path: str) -> float:
    """Seconds since the lock at ``path`` was last touched (0 when it cannot be read)."""
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return 0.0


def release_run_lock(output_dir: str) -> None:
    """Remove ``<output_dir>/run.lock`` if this process holds it (a no-op on other ranks or another run's)."""
    path = os.path.join(output_dir, LOCK)
    stop = _heartbeats.pop(os.path.abspath(path), None)
    if stop is not None:
        stop.set()
    owner = _lock_owner(path)
    if owner and owner["pid"] == os.getpid() and owner.get("host") == socket.gethostname():
        os.remove(path)


# -- numerics -----------------------------------------------------------------------------------------------
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


# -- logging ------------------------------------------------------------------------------------------------
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


def publish(checkpoint: str, export_dir: str) -> None:
    """Copy a checkpoint's exported model to ``export_dir``, replacing it only once the copy is complete."""
    tmp = export_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(checkpoint, "model"), tmp)
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(tmp, export_dir)


def guarded_optimizer(engine) -> GuardedAdamW:
    """The ``GuardedAdamW`` inside a DeepSpeed engine's optimizer (ZeRO wraps it)."""
    opt = engine.optimizer
    while not isinstance(opt, GuardedAdamW):
        if not hasattr(opt, "optimizer"):
            raise TrainingError(f"the engine's optimizer is {type(opt).__name__}, not make_optimizer's GuardedAdamW")
        opt = opt.optimizer
    return opt


def grad_norm_before_step(engine) -> Optional[torch.Tensor]:
    """DeepSpeed records the global grad norm in ``get_global_grad_norm`` except for fp32 without ZeRO, where
    it clips without keeping the value; there, measure it at the accumulation boundary before ``step`` (a
    device tensor: nothing waits for it until it is logged)."""
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or not engine.is_gradient_accumulation_boundary():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).detach() if grads else torch.zeros(())


# -- the run: what both trainers do around their loops ------------------------------------------------------
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
        from .elastic import saved_world  # elastic builds on this module

        ckpt = Checkpointer(run.output_dir, run.keep_last, rank)
        resume_dir = ckpt.resolve(resume)
        yield Session(rank, world, device, ckpt, resume_dir, saved_world(resume_dir) if resume_dir else 0)
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
        from .elastic import rank_seed

        seed_everything(rank_seed(seed, int(state["step"]), s.rank))
    return state


def load_engine(s: Session, engine, tag: str, strict: bool = True) -> None:
    """Load engine checkpoint ``tag`` of the checkpoint ``s`` resumes from, written by this or another number of
    ranks (``elastic.load_resharded``)."""
    if s.saved_world == s.world:
        load_engine_checkpoint(engine, s.resume_dir, tag, strict)
    else:
        from .elastic import load_resharded

        load_resharded(engine, s.resume_dir, tag, strict, s.rank)


def resumed_line(s: Session, step: int) -> str:
    """How the log names a resumed run."""
    return (f"resumed from step {step} on {s.world} ranks (checkpoint written by {s.saved_world}): {s.resume_dir}"
            if s.resume_dir else "")


def save_checkpoint(s: Session, step: int, last: Optional[str], write: Callable[[str], None]) -> str:
    """One checkpoint of ``step``: ``write(folder)`` stores the engines and (rank 0) the trainer state, this
    function the RNG, then the manifest is committed. A failed write (full disk, lost mount) leaves the earlier
    checkpoints as they were and is a one-line ``TrainingError`` naming ``last``, the newest complete one."""
    try:
        tmp = s.ckpt.tmp_dir(step)
        write(tmp)
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{s.rank}.pt"))
        return s.ckpt.commit(tmp, step)
    except SAVE_ERRORS as e:
        raise save_failed(e, s.ckpt, step, last) from None


def gather(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (a collective)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


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


_HOST_GROUP: Any = None


def host_any(flag: bool) -> bool:
    """True on every rank when ``flag`` holds on some rank: a gloo all-reduce of a host value, so nothing waits
    for the accelerator."""
    global _HOST_GROUP
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    if dist.get_backend() == "gloo":
        group = None
    else:  # NCCL reduces device tensors only: a CPU group beside it, made once
        if _HOST_GROUP is None:
            _HOST_GROUP = dist.new_group(backend="gloo")
        group = _HOST_GROUP
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.numpy()[0])


def due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (log, save, image) falls on ``step``: every ``every`` steps and at the end."""
    return step == total or (every > 0 and step % every == 0)


def finish(s: Session, run: RunConfig, step: int, last: Optional[str], logger: "RunLogger", summary: str) -> Optional[str]:
    """Rank 0 publishes the newest checkpoint's model as ``<output_dir>/model`` and logs ``summary``; returns
    the export folder (None on other ranks or without a checkpoint)."""
    export_dir = None
    if s.main and last:
        export_dir = os.path.join(run.output_dir, "model")
        publish(last, export_dir)
        logger.info(summary)
        logger.info(f"done: {step} steps; model exported to {export_dir}")
    logger.close()
    return export_dir
