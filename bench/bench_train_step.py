"""Tokenizer stage-1 training step: images/s, model TFLOP/s and MFU, ours against a plain PyTorch loop.

One step = VQRAE forward (encoder frozen, as in stage 1), generator loss, backward, AdamW step, and with
``+LPIPS+GAN`` also the adaptive-weight GAN term and a discriminator step. Every variant trains the same model
in the same process under the same bf16/fp32 autocast:

  plain   the step written out by hand: MSE + codebook/commit terms (+ LPIPS, hinge GAN with the adaptive
          weight from two autograd.grad calls, discriminator hinge step), torch.optim.AdamW defaults, eager.
  ours    ``vqrae.losses.generator_loss`` + ``discriminator_loss`` with the package's parameter groups; eager,
          then each option given on its own and all of them together: ``--fused-adam`` (AdamW fused=True),
          ``--channels-last`` (the images LPIPS and the discriminator see are channels_last, so their
          convolutions run in that layout) and ``--compile`` (torch.compile of the VQRAE).

FLOPs per step are counted once with ``torch.utils.flop_counter.FlopCounterMode`` on an eager step (matmuls and
convolutions, forward and backward; identical for every variant), so TFLOP/s = FLOPs / step time and
MFU = TFLOP/s / ``--peak-tflops`` (e.g. 989 for an H100's dense bf16).

    python bench/bench_train_step.py --threads 1 --fused-adam --channels-last     # tiny model on a CPU
    python bench/bench_train_step.py --preset vit-l --device cuda --peak-tflops 989 --fused-adam --channels-last --compile
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from vqrae import DecoderConfig, EncoderConfig, QuantizerConfig, VQRAE, VQRAEConfig  # noqa: E402
from vqrae.losses import LossConfig, PerceptualLoss  # noqa: E402
from vqrae.train import build_discriminator, set_stage  # noqa: E402
from vqrae.losses import discriminator_loss, generator_loss, match_size  # noqa: E402
from vqrae.runtime.optim import param_groups  # noqa: E402


@dataclass
class Preset:
    model: VQRAEConfig
    batch: int
    dtype: str
    steps: int  # timed steps per variant
    warmup: int


PRESETS = {
    # small enough for well under a second per step on 2 CPU cores
    "tiny": Preset(
        model=VQRAEConfig(
            encoder=EncoderConfig(backend="timm", name="vit_so400m_patch16_siglip_256", pretrained=False, image_size=32,
                                  model_kwargs=dict(patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0)),
            quantizer=QuantizerConfig(codebook_size=1024, codebook_dim=64),
            decoder=DecoderConfig(patch_size=4, image_size=32),
        ),
        batch=8, dtype="float32", steps=10, warmup=3,
    ),
    # ViT-L/16 encoder at 224 px and its symmetric decoder (24 x 1024, 16 heads), the paper's codebook
    "vit-l": Preset(
        model=VQRAEConfig(
            encoder=EncoderConfig(backend="timm", name="vit_large_patch16_224", pretrained=False, image_size=224),
            quantizer=QuantizerConfig(codebook_size=16384, codebook_dim=1536),
            decoder=DecoderConfig(patch_size=16, image_size=224),
        ),
        batch=32, dtype="bfloat16", steps=8, warmup=2,
    ),
}


class Trainer:
    """One variant's step over a shared model: its own optimizers, loss code and options."""

    def __init__(self, model: VQRAE, disc: torch.nn.Module, perceptual: PerceptualLoss, loss_cfg: LossConfig, full: bool,
                 plain: bool, dtype: torch.dtype, fused: bool = False, channels_last: bool = False, compiled=None):
        self.model, self.disc, self.perceptual, self.cfg, self.full, self.plain = model, disc, perceptual, loss_cfg, full, plain
        self.dtype, self.channels_last = dtype, channels_last
        self.forward = compiled if compiled is not None else model
        lr = 1e-4
        if plain:
            self.opt_g = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
            self.opt_d = torch.optim.AdamW(disc.parameters(), lr=lr)
        else:
            groups = param_groups(((n, p) for n, p in model.named_parameters() if not n.startswith("encoder.")), lr, 1e-4, "g")
            self.opt_g = torch.optim.AdamW(groups, lr=lr, fused=fused or None)
            self.opt_d = torch.optim.AdamW(param_groups(disc.named_parameters(), lr, 0.0, "d"), lr=lr, fused=fused or None)
        self.step_count = loss_cfg.gan_start_step  # the GAN terms are on from the first step

    def _cl(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def step(self, images: torch.Tensor, mark=lambda phase: None) -> None:
        """One training step; ``mark(phase)`` is called as each phase ends (``phase_times``)."""
        device_type = images.device.type
        with torch.autocast(device_type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.forward(images)
            mark("VQRAE forward (encoder, quantizer, decoder)")
            target = match_size(images, self.model.image_size)
            if self.plain:
                loss, recon = self._plain_generator_loss(out, target)
            else:
                out = dataclasses.replace(out, reconstruction=self._cl(out.reconstruction))
                gl = generator_loss(out, self._cl(target), self.cfg, self.step_count,
                                    self.perceptual if self.full else None, self.disc if self.full else None,
                                    last_layer=self.model.decoder.last_layer.weight)
                loss, recon = gl.total, out.reconstruction
            mark("generator loss (LPIPS, GAN term, adaptive weight's two grads)")
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        self.opt_g.step()
        mark("AdamW step")
        if self.full:
            with torch.autocast(device_type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                if self.plain:
                    d_loss = 0.5 * (F.relu(1.0 - self.disc(target)).mean() + F.relu(1.0 + self.disc(recon.detach())).mean())
                else:
                    d_loss = discriminator_loss(self.disc, self._cl(target), recon)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            mark("discriminator step (forward, backward, AdamW)")
        self.step_count += 1

    def _plain_generator_loss(self, out, target):
        recon = out.reconstruction.float()
        nll = F.mse_loss(recon, target) + out.codebook_loss + 0.25 * out.commit_loss
        if not self.full:
            return nll, recon
        nll = nll + 1.1 * self.perceptual(recon, target)
        for p in self.disc.parameters():
            p.requires_grad_(False)
        g = -self.disc(recon).float().mean()
        for p in self.disc.parameters():
            p.requires_grad_(True)
        last = self.model.decoder.last_layer.weight
        grad_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        grad_g = torch.autograd.grad(g, last, retain_graph=True)[0]
        weight = (grad_nll.float().norm() / (grad_g.float().norm() + 1e-4)).clamp(0.0, 1e4).detach()
        return nll + 0.1 * weight * g, recon


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(trainers: list[Trainer], images: torch.Tensor, warmup: int, steps: int) -> list[float]:
    """Median seconds per step of each trainer. Steps are taken in rounds, one per trainer, so a change in
    machine load (or allocator and cache warm-up) affects every variant alike."""
    for trainer in trainers:
        for _ in range(warmup):
            trainer.step(images)
    times: list[list[float]] = [[] for _ in trainers]
    for _ in range(steps):
        for trainer, t in zip(trainers, times):
            _sync(images.device)
            start = time.perf_counter()
            trainer.step(images)
            _sync(images.device)
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def phase_times(trainer: Trainer, images: torch.Tensor, steps: int) -> dict[str, float]:
    """Median seconds of each phase of a step (the device is synchronised at every phase end, so each phase is
    timed alone; their sum exceeds an unsynchronised step by the lost overlap)."""
    times: dict[str, list[float]] = {}
    for _ in range(steps):
        _sync(images.device)
        last = [time.perf_counter()]

        def mark(phase: str) -> None:
            _sync(images.device)
            now = time.perf_counter()
            times.setdefault(phase, []).append(now - last[0])
            last[0] = now

        trainer.step(images, mark)
    return {phase: statistics.median(t) for phase, t in times.items()}


def top_ops(trainer: Trainer, images: torch.Tensor, n: int = 12) -> list[tuple[str, float, int]]:
    """The ``n`` operators with the most self time (device time on a GPU) over one profiled step:
    (name, ms, calls)."""
    from torch.profiler import ProfilerActivity, profile

    gpu = images.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        trainer.step(images)
        _sync(images.device)
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [(e.key, getattr(e, key) / 1e3, e.count) for e in events]


def count_flops(trainer: Trainer, images: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        trainer.step(images)
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: the preset's")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="autocast dtype; default: the preset's")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant, taken in rounds; default: the preset's")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads; 1 keeps small ops from stalling at thread barriers when the cores are shared")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU, e.g. 989 (H100 bf16 dense)")
    p.add_argument("--fused-adam", action="store_true", help="ours: AdamW(fused=True)")
    p.add_argument("--channels-last", action="store_true", help="ours: images into LPIPS and the discriminator in channels_last")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile the VQRAE")
    p.add_argument("--configs", default="recon,full", help="comma list of recon (pixel + VQ terms), full (+LPIPS+GAN)")
    p.add_argument("--profile", action="store_true", help="also where the time of ours (eager) with the full loss goes: "
                   "each phase timed alone, and the operators with the most self time")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or preset.dtype)
    batch, steps = args.batch or preset.batch, args.steps or preset.steps
    warmup = args.warmup if args.warmup is not None else preset.warmup
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    with warnings.catch_warnings(), torch.device(device):  # built on the device: a ViT-L inits much faster there
        warnings.simplefilter("ignore")  # random init is intended: this measures speed
        model = VQRAE(preset.model)
    set_stage(model, 1)
    loss_cfg = LossConfig(lpips_backbone="random", gan_start_step=0)
    disc = build_discriminator(loss_cfg).to(device)
    perceptual = PerceptualLoss(loss_cfg.lpips_net, "random").to(device)
    images = torch.rand(batch, 3, model.image_size, model.image_size, device=device) * 2 - 1
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"preset={args.preset} device={device} dtype={dtype} batch={batch} threads={torch.get_num_threads()} "
          f"params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M trainable={trainable / 1e6:.1f}M", flush=True)

    if args.compile:
        # the adaptive GAN weight runs two retain_graph backward passes through the compiled graph, which
        # AOTAutograd's donated buffers do not allow
        torch._functorch.config.donated_buffer = False
    compiled = torch.compile(model) if args.compile else None
    chosen = [(name, kw) for name, kw, on in (
        ("fused AdamW", dict(fused=True), args.fused_adam),
        ("channels_last", dict(channels_last=True), args.channels_last),
        ("compile", dict(compiled=compiled), args.compile),
    ) if on]
    rows = []
    for config in args.configs.split(","):
        full = config == "full"
        variants = [("plain PyTorch loop", dict(plain=True)), ("ours (eager)", dict(plain=False))]
        variants += [(f"ours + {name}", dict(plain=False, **kw)) for name, kw in chosen]
        if len(chosen) > 1:
            variants.append(("ours + all of these", dict(plain=False, **{k: v for _, kw in chosen for k, v in kw.items()})))
        flops = count_flops(Trainer(model, disc, perceptual, loss_cfg, full, True, dtype), images)
        trainers = [Trainer(model, disc, perceptual, loss_cfg, full, dtype=dtype, **kw) for _, kw in variants]
        medians = time_interleaved(trainers, images, warmup, steps)
        del trainers
        for (name, _), t in zip(variants, medians):
            tflops = flops / t / 1e12
            rows.append(dict(config="+LPIPS+GAN" if full else "recon + VQ", variant=name, step_ms=1e3 * t,
                             img_s=batch / t, tflops=tflops, mfu=tflops / args.peak_tflops if args.peak_tflops else None,
                             gflop_per_step=flops / 1e9))
            print(f"  {rows[-1]['config']} / {name}: {1e3 * t:.1f} ms/step", flush=True)
        if args.json:  # rewritten after every loss setting, so a run cut short still leaves what it measured
            with open(args.json, "w") as f:
                json.dump({"bench": "train_step", "preset": args.preset, "device": str(device), "batch": batch,
                           "rows": rows}, f, indent=2)

    print()
    print("| loss | variant | step (ms) | img/s | model TFLOP/s | MFU | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["config"] == r["config"] and b["variant"].startswith("plain"))
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {r['config']} ({r['gflop_per_step']:.1f} GFLOP/step) | {r['variant']} | {r['step_ms']:.1f} | {r['img_s']:.1f} "
              f"| {r['tflops']:.3g} | {mfu} | {base['step_ms'] / r['step_ms']:.2f}x |")
    if args.profile:
        trainer = Trainer(model, disc, perceptual, loss_cfg, True, False, dtype)
        for _ in range(warmup):
            trainer.step(images)
        phases = phase_times(trainer, images, steps)
        total = sum(phases.values())
        print("\n| phase of ours (eager), full loss | ms | share |\n|---|---|---|")
        for phase, t in phases.items():
            print(f"| {phase} | {1e3 * t:.1f} | {100 * t / total:.0f}% |")
        print(f"| sum of the phases | {1e3 * total:.1f} | 100% |")
        print("\n| operator (self time, one step) | ms | calls |\n|---|---|---|")
        for name, ms, calls in top_ops(trainer, images):
            print(f"| `{name}` | {ms:.1f} | {calls} |")


if __name__ == "__main__":
    main()
