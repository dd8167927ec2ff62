"""Loading what a checkpoint holds without running code: ``safe_load`` (``torch.load(weights_only=True)`` with
one-line errors) and ``load_engine_checkpoint`` (a DeepSpeed engine's checkpoint through it, checked for shape
changes against the live model first)."""
from __future__ import annotations

import math
import pickle
import re
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from .config import TrainingError
from .log import first_line


def deepspeed_records() -> list:
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
        state = safe_load(path, map_location, deepspeed_records())
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

