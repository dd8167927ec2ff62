"""Metrics for training and evaluating the tokenizer.

``CodebookUsage`` tracks code use over a sliding window of training steps; it is plain training-side state
(saved beside the optimizer on resume), not a module buffer. The image metrics wrap torchmetrics and take
images in [-1, 1], mapped to [0, 1] (data range 1.0) and clamped there, as a saved image would be.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file

from .losses import PerceptualLoss


def usage_stats(hist) -> tuple[float, float]:
    """Fraction of codes with a nonzero count, and exp(entropy) of the histogram (0.0 when empty); ``hist`` is a
    tensor (read back here) or a sequence of counts already on the host."""
    counts = np.asarray(hist.tolist() if torch.is_tensor(hist) else hist, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    p = counts[counts > 0] / total
    return float((counts > 0).sum()) / counts.size, math.exp(-float((p * np.log(p)).sum()))


class CodebookUsage:
    """Code use over the last ``window`` training steps.

    Each ``add`` records one step's code histogram (K counts, on the tracker's device) and drops the step that
    falls out of the window; nothing is read back to the host until ``usage``/``perplexity`` (or
    ``histogram`` and ``usage_stats``). In data-parallel training add counts already summed over the ranks, so
    each rank reports the same numbers.

    Args:
        codebook_size: K, the number of codes.
        window: number of most recent steps the statistics cover.
        device: where the histograms live (the training device).
    """

    def __init__(self, codebook_size: int, window: int, device: torch.device | str = "cpu"):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.codebook_size = codebook_size
        self.window = window
        self.device = torch.device(device)
        self._steps: deque[torch.Tensor] = deque()
        self._hist = torch.zeros(codebook_size, dtype=torch.long, device=self.device)  # sum over the window

    def counts(self, indices: torch.Tensor) -> torch.Tensor:
        """(K,) histogram of ``indices`` on the tracker's device, without reading anything back (unlike
        ``bincount``, whose output size depends on the values)."""
        flat = indices.detach().flatten().to(self.device, torch.long)
        return torch.zeros(self.codebook_size, dtype=torch.long, device=self.device).index_add_(
            0, flat, torch.ones_like(flat))

    def update(self, indices: torch.Tensor) -> None:
        """Record one step's code indices (checked to lie in [0, K))."""
        flat = indices.detach().flatten()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size):
            raise ValueError(f"code indices must lie in [0, {self.codebook_size}), got [{int(flat.min())}, {int(flat.max())}]")
        self.add(self.counts(flat))

    def add(self, counts: torch.Tensor) -> None:
        """Record one step's (K,) code counts."""
        counts = counts.to(self.device, torch.long)
        self._steps.append(counts)
        self._hist += counts
        while len(self._steps) > self.window:
            self._hist -= self._steps.popleft()

    def histogram(self) -> torch.Tensor:
        """(K,) code counts over the window, on the tracker's device."""
        return self._hist.clone()

    def usage(self) -> float:
        """Fraction of the K codes used at least once in the window."""
        return usage_stats(self._hist)[0]

    def perplexity(self) -> float:
        """exp(entropy) of the window's code histogram: K for uniform use, 1 for a single code."""
        return usage_stats(self._hist)[1]

    def state_dict(self) -> dict:
        """The window as sparse (code, count) pairs per step, on the CPU."""
        codes, counts, lengths = [], [], []
        for step in self._steps:
            step = step.cpu()
            nz = step.nonzero().flatten()
            codes.append(nz)
            counts.append(step[nz])
            lengths.append(nz.numel())
        return {
            "codebook_size": self.codebook_size,
            "codes": torch.cat(codes) if codes else torch.zeros(0, dtype=torch.long),
            "counts": torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long),
            "lengths": torch.tensor(lengths, dtype=torch.long),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the window; with a smaller ``window`` than when saved, only the newest steps are kept."""
        if int(state["codebook_size"]) != self.codebook_size:
            raise ValueError(f"saved codebook usage is for {int(state['codebook_size'])} codes, this tracker has {self.codebook_size}")
        self._steps.clear()
        self._hist.zero_()
        lengths = state["lengths"].tolist()
        for codes, counts in zip(state["codes"].split(lengths), state["counts"].split(lengths)):
            step = torch.zeros(self.codebook_size, dtype=torch.long)
            step[codes.long()] = counts.long()
            self.add(step)


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"unknown reduction '{reduction}'; expected 'mean' or 'none'")


def psnr(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """PSNR in dB of images in [-1, 1]; per image (B,) with reduction "none", else their mean. inf when equal."""
    from torchmetrics.functional.image import peak_signal_noise_ratio  # here: torchmetrics loads all its domains

    values = peak_signal_noise_ratio(_to_unit(pred), _to_unit(target), data_range=1.0, reduction="none", dim=(1, 2, 3))
    return _reduce(values, reduction)


def ssim(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """SSIM (11x11 Gaussian window) of images in [-1, 1]; per image (B,) with reduction "none", else the mean."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    values = structural_similarity_index_measure(_to_unit(pred), _to_unit(target), data_range=1.0, reduction="none")
    return _reduce(values, reduction)


class ReconstructionMetrics:
    """Accumulates PSNR, SSIM, LPIPS and code use over an evaluation set.

    Sums live on the device of the first batch, so ``all_reduce`` can hand them straight to a collective.

    Args:
        codebook_size: K; when set, ``update`` takes the batch's code indices and ``compute`` reports usage
            and perplexity over the whole set.
        perceptual: LPIPS module; when given, ``compute`` reports the mean LPIPS.
    """

    def __init__(self, codebook_size: int | None = None, perceptual: PerceptualLoss | None = None):
        self.codebook_size = codebook_size
        self.perceptual = perceptual
        self.reset()

    def reset(self) -> None:
        self._sums: torch.Tensor | None = None  # float64 (count, psnr, ssim, lpips)
        self._hist: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        if self._sums is None:
            self._sums = torch.zeros(4, dtype=torch.float64, device=pred.device)
            if self.codebook_size is not None:
                self._hist = torch.zeros(self.codebook_size, dtype=torch.long, device=pred.device)
        if (indices is None) != (self.codebook_size is None):
            raise ValueError("pass code indices to update exactly when the metrics were built with a codebook_size")
        n = pred.shape[0]
        lp = self.perceptual(pred, target).double() * n if self.perceptual is not None else torch.zeros((), dtype=torch.float64, device=pred.device)
        batch = torch.stack([
            torch.tensor(float(n), dtype=torch.float64, device=pred.device),
            psnr(pred, target, reduction="none").double().sum(),
            ssim(pred, target, reduction="none").double().sum(),
            lp,
        ])
        self._sums += batch
        if indices is not None:
            self._hist += torch.bincount(indices.flatten().to(self._hist.device), minlength=self.codebook_size)

    def all_reduce(self, reduce_fn: Callable[[torch.Tensor], object]) -> None:
        """Sum the state across processes with an in-place collective such as ``torch.distributed.all_reduce``.

        Call it once, on every rank, right before ``compute``.
        """
        for t in (self._sums, self._hist):
            if t is not None:
                reduce_fn(t)

    def compute(self) -> dict[str, float]:
        if self._sums is None or self._sums[0] == 0:
            raise ValueError("no images were added to the reconstruction metrics")
        count, psnr_sum, ssim_sum, lpips_sum = self._sums.tolist()
        out = {"psnr": psnr_sum / count, "ssim": ssim_sum / count, "count": int(count)}
        if self.perceptual is not None:
            out["lpips"] = lpips_sum / count
        if self._hist is not None:
            out["codebook_usage"], out["perplexity"] = usage_stats(self._hist)
        return out


_INCEPTION_PTH = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's pt_inception-2015-12-05
_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.safetensors"  # the same tensors, read without unpickling


def _inception_how() -> str:
    return (f"pass --inception-weights PATH to a safetensors copy of torch-fidelity's {_INCEPTION_PTH} "
            f"or place it in {torch.hub.get_dir()}/checkpoints as {_INCEPTION_FILE}")


def inception_weights_path(path: str | None) -> str:
    """torch-fidelity's InceptionV3 weights as safetensors: ``path`` or the torch hub cache's
    ``weights-inception-2015-12-05-6726825d.safetensors``; a missing file or a pickle (``.pth``) is a one-line
    ``ValueError`` saying how to provide them. Nothing is downloaded."""
    path = path or os.path.join(torch.hub.get_dir(), "checkpoints", _INCEPTION_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"Inception weights not found at {path}; {_inception_how()}")
    if not path.endswith(".safetensors"):  # torch-fidelity unpickles its .pth with weights_only=False
        raise ValueError(
            f"Inception weights '{path}' are not a .safetensors file (pickles can run code when loaded); "
            f"convert them once with safetensors.torch.save_file and pass that file with --inception-weights"
        )
    return path


@contextmanager
def inception_weights_copy(path: str) -> Iterator[str]:
    """A private ``torch.save`` file of the tensors read from the safetensors ``path``, for torch-fidelity, which
    reads its weights only through ``torch.load``; removed on exit."""
    state = load_file(path, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "inception.pt")
        torch.save(state, copy)
        yield copy


class FIDMetric:
    """Frechet Inception Distance (torchmetrics, 2048-d pool features of torch-fidelity's InceptionV3).

    Never downloads: the weights come from ``weights_path`` or from the torch hub cache; anything else is a
    ``ValueError`` with a one-line message saying how to provide them. They are read from safetensors only:
    torch-fidelity's own ``.pth`` is a pickle, refused like every pickle (convert it once with
    ``safetensors.torch.save_file(torch.load(pth, weights_only=True), out)``).

    Args:
        weights_path: safetensors copy of the torch-fidelity Inception weights (``pt_inception-2015-12-05``);
            None reads ``<torch hub dir>/checkpoints/weights-inception-2015-12-05-6726825d.safetensors``.
    """

    def __init__(self, weights_path: str | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        path = inception_weights_path(weights_path)
        try:
            with inception_weights_copy(path) as copy:
                self.fid = FrechetInceptionDistance(feature=2048, normalize=False, feature_extractor_weights_path=copy)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"cannot load FID Inception weights from {path} ({msg}); {_inception_how()}") from None

    def to(self, device: torch.device | str) -> "FIDMetric":
        self.fid = self.fid.to(device)
        return self

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add images in [-1, 1] to the real or the generated set."""
        self.fid.update((_to_unit(images) * 255).round().to(torch.uint8), real=real)

    def compute(self) -> float:
        return float(self.fid.compute())

    def reset(self) -> None:
        self.fid.reset()
