"""A run's settings: ``RunConfig`` and ``OptimConfig``, their checks, and the DeepSpeed config built from them.

``check_run_config`` needs nothing but the configs, so entry points call it before any model, data or process
group exists; ``TrainingError`` is the one-line error every part of the runtime raises.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


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


def check_run_config(run: RunConfig, optim: OptimConfig, world_size: int) -> None:
    """Raise ``TrainingError`` (one line) for run or optimizer settings that cannot train.

    Needs nothing but the configs, so entry points call it before any model, data or process group exists.
    """
    for name in ("steps", "batch_size", "micro_batch_size", "log_every", "save_every", "keep_last", "max_nonfinite"):
        if getattr(run, name) < 1:
            raise TrainingError(f"run.{name} must be >= 1, got {getattr(run, name)}")
    per_step = run.micro_batch_size * world_size
    if run.batch_size % per_step:
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

def world_sizes(batch_size: int, micro_batch_size: int, limit: int = 1024) -> list[int]:
    """The rank counts (up to ``limit``) that keep the global batch: those dividing batch / micro-batch."""
    if batch_size % micro_batch_size:
        return []
    per_micro = batch_size // micro_batch_size
    return [n for n in range(1, min(per_micro, limit) + 1) if per_micro % n == 0]


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
        "bf16": {"enabled": False},  # fp32 master weights; bf16 compute comes from torch_autocast (precision.py)
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

