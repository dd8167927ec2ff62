"""What updates the weights: AdamW parameter groups, the ``GuardedAdamW`` optimizer that skips flagged steps on the
device, DeepSpeed's learning-rate schedules, the grad norm DeepSpeed does not keep, and the weights' EMA."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from .config import OptimConfig, TrainingError


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

