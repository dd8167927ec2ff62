"""Training the VQRAE tokenizer: ``train(cfg, resume)`` runs the whole DeepSpeed loop.

Stage 1 freezes the encoder and trains the projections, W and the decoder (reconstruction + perceptual + GAN
+ quantizer terms); before its first step the quantizer's input is standardised with feature statistics of
the training data (``calibrate_quantizer``), and with ``quantizer.init: kmeans`` its codebook starts at
k-means centroids, with ``matched`` W starts where the codes have the features' mean and covariance. Stage 2 (``init_from`` a stage-1 export) also trains the encoder at its own small lr with
self-distillation to a frozen copy of itself, so its semantics survive. The final (EMA) model is exported to
``<output_dir>/model``.

The loop keeps everything it logs on the device and reads it back once per log interval; the only other
host read per micro-step is the non-finite loss check, which must happen before the gradients reach the
weights.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ConfigError, save_yaml
from .data import DataConfig, build_dataloader
from .discriminator import PatchDiscriminator
from .losses import (
    GeneratorLoss, LossConfig, PerceptualLoss, discriminator_loss, gan_active, generator_loss, match_size,
    reconstruction_loss,
)
from .metrics import CodebookUsage, usage_stats
from .model import VQRAE, VQRAEConfig, VQRAEOutput
from .quantizer import FeatureStats, check_finite_features
from .runtime.checkpoint import save_checkpoint
from .runtime.config import OptimConfig, RunConfig, TrainingError, check_run_config, deepspeed_config
from .runtime.distributed import all_reduce_sum, gather
from .runtime.elastic import StopSignals
from .runtime.guard import NonFiniteGuard
from .runtime.log import MetricsWindow, RunLogger, first_line
from .runtime.optim import EMA, grad_norm_before_step, guarded_optimizer, make_optimizer, make_scheduler, param_groups
from .runtime.precision import autocast
from .runtime.session import EmptyBatches, SaveSchedule, due, finish, load_engine, restore, resumed_line, session


@dataclass
class TokenizerTrainConfig:
    stage: int = 1  # 1: encoder frozen; 2: encoder trained at encoder_lr with self-distillation
    init_from: Optional[str] = None  # stage 2 (required): a stage-1 model export, e.g. <stage1 output>/model
    encoder_lr: float = 1e-5  # stage-2 encoder lr (the paper's 1e-5); same schedule shape as optim.lr
    quantizer_lr: Optional[float] = None  # projections and W; None: optim.lr. Lower keeps a k-means codebook spread
    codebook_window: int = 100  # steps over which codebook use % and perplexity are measured
    model: VQRAEConfig = field(default_factory=VQRAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(source=""))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/tokenizer"))


def check_config(cfg: TokenizerTrainConfig, world_size: int = 1) -> None:
    """Raise a one-line ``ConfigError``/``TrainingError`` for settings that cannot train; needs only the config,
    so a bad one fails before any model, data or process group exists."""
    try:  # the loss is the one place that knows the valid kinds; otherwise a bad one fails only at step 1
        reconstruction_loss(torch.zeros(1), torch.zeros(1), cfg.loss.recon)
    except ValueError as e:
        raise ConfigError(f"loss.recon: {e}") from None
    if cfg.stage not in (1, 2):
        raise ConfigError(f"stage must be 1 or 2, got {cfg.stage}")
    if cfg.stage == 2 and not cfg.init_from:
        raise ConfigError("stage 2 needs init_from: the stage-1 export (<stage-1 output_dir>/model); run stage 1 first")
    if cfg.stage == 2 and not os.path.isfile(os.path.join(cfg.init_from, "config.yaml")):
        raise ConfigError(f"init_from '{cfg.init_from}' is not a VQRAE export (no config.yaml); run stage 1 first")
    if not cfg.data.source:
        raise ConfigError("data.source is empty: give an imagefolder directory, a hub dataset id or .tar shards")
    for name in ("encoder_lr", "quantizer_lr"):
        value = getattr(cfg, name)
        if value is not None and not value > 0:  # also catches nan
            raise ConfigError(f"{name} must be > 0, got {value}")
    check_run_config(cfg.run, cfg.optim, world_size)


# -- model pieces ---------------------------------------------------------------------------------------------
def set_stage(model: VQRAE, stage: int) -> None:
    """Freeze or unfreeze the encoder; the base codebook C' is a buffer and never trains."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    model.requires_grad_(True)
    model.encoder.requires_grad_(stage == 2)


def tokenizer_param_groups(model: VQRAE, cfg: TokenizerTrainConfig) -> list:
    """AdamW groups: decoder at optim.lr, quantizer at quantizer_lr (default optim.lr), and in stage 2 the
    encoder at encoder_lr. Frozen parameters (the stage-1 encoder) are left out."""
    optim = cfg.optim
    named = list(model.named_parameters())
    groups = param_groups(((n, p) for n, p in named if n.startswith("decoder.")), optim.lr, optim.weight_decay, "decoder")
    q_lr = optim.lr if cfg.quantizer_lr is None else cfg.quantizer_lr
    groups += param_groups(((n, p) for n, p in named if n.startswith("quantizer.")), q_lr, optim.weight_decay, "quantizer")
    if cfg.stage == 2:
        groups += param_groups(((n, p) for n, p in named if n.startswith("encoder.")), cfg.encoder_lr,
                               optim.weight_decay, "encoder")
    return groups


def make_teacher(encoder: nn.Module) -> nn.Module:
    """Frozen copy E0 of the encoder for stage-2 self-distillation."""
    teacher = copy.deepcopy(encoder).eval()
    teacher.requires_grad_(False)
    return teacher


def build_discriminator(cfg: LossConfig) -> PatchDiscriminator:
    return PatchDiscriminator(in_channels=3, channels=cfg.disc_channels, layers=cfg.disc_layers)


# -- quantizer initialisation ---------------------------------------------------------------------------------
@torch.no_grad()
def feature_stats(encoder: nn.Module, batches) -> Optional[FeatureStats]:
    """Per-channel statistics of the encoder's features over ``batches`` (image tensors), merged exactly in
    float64 (``FeatureStats``); None when there was no batch. A NaN or inf feature is a ``ValueError``."""
    stats = None
    for images in batches:
        f = encoder(images).float().flatten(0, 1)  # (B*N, D)
        check_finite_features(f, "encoder feature")
        batch = FeatureStats.of(f)
        stats = batch if stats is None else stats.merge(batch)
    return stats


def merge_stats(parts: "list[FeatureStats]") -> FeatureStats:
    """One ``FeatureStats`` from those of several ranks (in rank order, so every rank gets the same bits)."""
    return functools.reduce(FeatureStats.merge, parts)


def calibrate_quantizer(model: VQRAE, data_cfg: DataConfig, batch_size: int, rank: int, world: int, device,
                        num_batches: int = 8) -> None:
    """Standardise the quantizer's input with feature statistics of a sample of the training data (all ranks
    pooled), before the first step of stage 1; later stages and resumed runs load them with the weights."""
    try:
        loader, _ = build_dataloader(data_cfg, batch_size, rank, world)
    except ValueError as e:
        raise TrainingError(f"data.source '{data_cfg.source}': {first_line(e)}") from None
    model.encoder.to(device)
    with torch.random.fork_rng(devices=[]):  # a DataLoader draws its seed from the global RNG; leave it untouched
        stats = _sample_stats(model, loader, num_batches, device)
    if stats is None:
        raise TrainingError(f"data.source '{data_cfg.source}': no readable image in the first {num_batches} batches")
    model.quantizer.calibrate(*stats.mean_std())
    if model.cfg.quantizer.init in ("kmeans", "matched"):
        _data_codebook(model, loader, batch_size, device)


def _sample_stats(model: VQRAE, loader, num_batches: int, device) -> Optional[FeatureStats]:
    """Feature statistics of this rank's first ``num_batches`` batches, merged over all ranks (every rank
    ends with the same values); None when no rank read an image."""
    batches = (b.pixels.to(device) for b in itertools.islice(loader, num_batches) if b.pixels.shape[0])
    try:
        stats = feature_stats(model.encoder, batches)
    except ValueError as e:  # NaN/inf features: a corrupt image or broken encoder weights
        raise TrainingError(f"quantizer calibration: {first_line(e)}") from None
    d = model.encoder.dim
    mine = torch.zeros(2 * d + 1, dtype=torch.float64, device=device)  # count, mean, M2 (count 0: no image)
    if stats is not None:
        mine = torch.cat([stats.count.view(1), stats.mean, stats.m2]).to(device)
    parts = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
    parts = [FeatureStats(p[0], p[1 : d + 1], p[d + 1 :]) for p in parts if p[0] > 0]
    return merge_stats(parts) if parts else None


def _data_codebook(model: VQRAE, loader, batch_size: int, device, min_tokens: int = 65536) -> None:
    """quantizer.init = kmeans (centroids) or matched (W matching the mean and covariance) of this rank's sample of
    projected features (at least 4 per code and ``min_tokens`` in all), then rank 0's quantizer to every rank, so
    all ranks start from the same model."""
    k, init = model.cfg.quantizer.codebook_size, model.cfg.quantizer.init
    num_batches = min(1024, math.ceil(max(min_tokens, 4 * k) / (batch_size * model.num_tokens)))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        feats = [model.encoder(b.pixels.to(device)).float().flatten(0, 1)
                 for b in itertools.islice(loader, num_batches) if b.pixels.shape[0]]
        feats = torch.cat(feats)
        if feats.shape[0] < k:
            raise TrainingError(f"quantizer.init {init}: {feats.shape[0]} feature tokens sampled, fewer than the {k} codes")
        if init == "kmeans":
            model.quantizer.to(device).init_codebook_kmeans(feats, generator=torch.Generator().manual_seed(0))
        else:
            model.quantizer.to(device).init_codebook_matched(feats)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in model.quantizer.state_dict().values():  # tensors sharing the live storage
            dist.broadcast(t, src=0)


# -- one micro-step ----------------------------------------------------------------------------------------------
@dataclass
class MicroStep:
    out: VQRAEOutput
    loss: GeneratorLoss
    disc_loss: Optional[torch.Tensor]  # None while the GAN is off
    ok: torch.Tensor  # 0/1 on the device: this rank's loss was finite (its values may be logged)
    skipped: Optional[torch.Tensor]  # at a boundary: 1 when the optimizer step was skipped (all ranks), on the device
    grad_norm: Optional[torch.Tensor]  # at a boundary without ZeRO in fp32, where DeepSpeed keeps none; on the device

    @property
    def boundary(self) -> bool:  # this micro-step ended an optimizer step (gradient accumulation)
        return self.skipped is not None


def train_step(engine, disc_engine, images: torch.Tensor, loss_cfg: LossConfig, step: int, precision: str,
               guard: NonFiniteGuard, perceptual: Optional[PerceptualLoss] = None,
               teacher: Optional[nn.Module] = None, last_layer: Optional[torch.Tensor] = None) -> MicroStep:
    """One micro-step: forward, generator loss, backward and (at an accumulation boundary) the optimizer step,
    then the discriminator's step once the GAN is on. A non-finite loss on any rank is flagged on the device
    (``guard``): the optimizer step it belongs to changes no weight, of either network, and nothing waits for
    the flag.

    Args:
        engine: the VQRAE's DeepSpeed engine.
        disc_engine: the discriminator's engine, or None without a GAN term.
        images: the micro-batch on the device, in [-1, 1].
        loss_cfg: loss weights.
        step: the optimizer step being accumulated (decides whether the GAN is on).
        precision: ``run.precision``; the loss terms outside the engine run under its autocast.
        guard: the non-finite step guard.
        perceptual: LPIPS, or None.
        teacher: the frozen encoder E0 in stage 2, else None.
        last_layer: the decoder's last weight for the adaptive GAN weight, or None (weight 1).
    """
    out = engine(images)  # autocast to run.precision inside the engine (its torch_autocast section)
    target = match_size(images, engine.module.image_size)
    with autocast(precision, images.device):
        teacher_feats = None
        if teacher is not None:
            with torch.no_grad():
                teacher_feats = teacher(images)
        disc = disc_engine.module if disc_engine is not None else None
        gl = generator_loss(out, target, loss_cfg, step, perceptual, disc, teacher_feats, last_layer)
    ok = 1.0 - (guard.observe(gl.total, out.features) > 0).float()
    boundary = engine.is_gradient_accumulation_boundary()
    gan_on = disc_engine is not None and gan_active(step, loss_cfg.gan_start_step)
    engine.backward(gl.total)
    grad_norm = grad_norm_before_step(engine)
    skipped = None
    if boundary:
        optimizer = guarded_optimizer(engine)
        flag = guard.arm(optimizer, *([guarded_optimizer(disc_engine)] if gan_on else []))
        engine.step()
        skipped = (guard.record(step + 1, flag, optimizer) > 0).float()
    else:
        engine.step()
    d_loss = None
    if gan_on:
        d_loss = discriminator_loss(disc_engine, target, out.reconstruction)
        disc_engine.backward(d_loss)
        disc_engine.step()
    return MicroStep(out, gl, d_loss.detach() if d_loss is not None else None, ok, skipped, grad_norm)


def logged_terms(micro: MicroStep) -> dict[str, torch.Tensor]:
    """What the log averages of one micro-step: the loss terms, their weighted total, the adaptive GAN weight and
    (once the GAN is on) the discriminator's loss."""
    values = {**micro.loss.terms, "loss": micro.loss.total, "gan_weight": micro.loss.gan_weight}
    if micro.disc_loss is not None:
        values["disc"] = micro.disc_loss
    return values


# -- the loop ---------------------------------------------------------------------------------------------------
def build_vqrae(cfg: TokenizerTrainConfig) -> VQRAE:
    """Stage 1: a new VQRAE from ``cfg.model``; stage 2: the stage-1 export ``cfg.init_from``."""
    try:
        if cfg.stage == 2:
            return VQRAE.from_pretrained(cfg.init_from, trust_remote_code=cfg.model.encoder.trust_remote_code)
        return VQRAE(cfg.model)
    except Exception as e:  # built from the config or init_from alone: whatever fails there is the user's to fix
        source = f"init_from '{cfg.init_from}'" if cfg.stage == 2 else "the model config"
        raise ConfigError(f"cannot build the VQRAE from {source}: {type(e).__name__}: {first_line(e)}") from None


def train(cfg: TokenizerTrainConfig, resume: Optional[str] = None) -> Optional[str]:
    """Train the tokenizer ``cfg`` describes (``resume``: None, "auto" or a checkpoint folder) under the process
    group the ``deepspeed`` launcher describes, or alone. Returns the export folder on rank 0, else None."""
    import deepspeed
    from torchvision.utils import make_grid, save_image

    check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # the launcher exports WORLD_SIZE to every rank
    run, optim, loss_cfg = cfg.run, cfg.optim, cfg.loss
    with session(run, resume) as s, StopSignals() as stop:
        device = s.device
        # -- model, optimizers, losses ---------------------------------------------------------------------------
        model = build_vqrae(cfg)
        set_stage(model, cfg.stage)
        teacher = make_teacher(model.encoder).to(device) if cfg.stage == 2 else None  # fp32, like the model
        groups = tokenizer_param_groups(model, cfg)
        if cfg.stage == 1 and not s.resume_dir:
            calibrate_quantizer(model, cfg.data, run.micro_batch_size, s.rank, s.world, device)
        optimizer = make_optimizer(groups, optim)
        ds_cfg = deepspeed_config(run, optim, s.world)
        zero_stage = ds_cfg["zero_optimization"]["stage"]
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg,
                                               lr_scheduler=make_scheduler(optimizer, optim, run.steps))
        disc_engine = None
        if loss_cfg.gan_weight > 0:
            disc = build_discriminator(loss_cfg)
            d_opt = make_optimizer(param_groups(disc.named_parameters(), loss_cfg.disc_lr, 0.0, "disc"), optim)
            disc_engine, _, _, _ = deepspeed.initialize(model=disc, optimizer=d_opt, config=dict(ds_cfg))
        perceptual = None
        if loss_cfg.perceptual_weight > 0:
            try:
                perceptual = PerceptualLoss(loss_cfg.lpips_net, loss_cfg.lpips_backbone).to(device)
            except ValueError as e:  # unknown net, missing trunk file, no cached ImageNet weights offline
                raise ConfigError(f"loss: {first_line(e)}") from None
        # ZeRO-3 partitions parameters: EMA and the adaptive GAN weight need whole tensors, so both are off there.
        ema = EMA(engine.module, run.ema_decay) if run.ema_decay > 0 and zero_stage != 3 else None
        last_layer = None if zero_stage == 3 else engine.module.decoder.last_layer.weight

        # -- data and state --------------------------------------------------------------------------------------
        try:
            loader, sampler = build_dataloader(cfg.data, run.micro_batch_size, s.rank, s.world)
        except ValueError as e:  # no shards match, no image column, fewer rows than one batch per rank
            raise TrainingError(f"data.source '{cfg.data.source}': {first_line(e)}") from None
        usage = CodebookUsage(model.codebook_size, cfg.codebook_window, device)
        guard = NonFiniteGuard(run.max_nonfinite, device)
        data_stats: dict = {}
        data_state = sampler.state_dict()
        step = 0
        if s.resume_dir:  # every file through torch.load(weights_only=True): a checkpoint never runs code
            load_engine(s, engine, "generator")
            if disc_engine is not None:
                load_engine(s, disc_engine, "discriminator")
            if ema is not None:
                from safetensors.torch import load_file

                ema.load_state_dict(load_file(os.path.join(s.resume_dir, "ema.safetensors")))
        state = restore(s, run.seed)
        if state is not None:
            step, guard.total = state["step"], state["nonfinite"]
            guard.consecutive = state.get("nonfinite_in_a_row", 0)
            sampler.resume(state["sampler"])  # every rank's position: any number of ranks continues it
            data_state = sampler.state_dict()
            usage.load_state_dict(state["usage"])
            data_stats = dict(state["data_stats"])
        last_ckpt = s.resume_dir

        logger = RunLogger(run.output_dir, run.steps, step, s.main, run.tensorboard, run.progress_bar)
        if s.main:  # the config as trained: the model's resolved settings, the ZeRO stage in effect
            save_yaml(dataclasses.replace(cfg, model=model.cfg, run=dataclasses.replace(run, zero_stage=zero_stage)),
                      os.path.join(run.output_dir, "train_config.yaml"))
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.info(f"stage {cfg.stage}: {n_train / 1e6:.2f}M trainable parameters, world {s.world}, "
                        f"global batch {run.batch_size}, zero {zero_stage}, {run.precision}")
            if s.resume_dir:
                logger.info(resumed_line(s, step))

        def write(folder: str) -> None:
            engine.save_checkpoint(folder, tag="generator")
            if disc_engine is not None:
                disc_engine.save_checkpoint(folder, tag="discriminator")
            samplers = gather(data_state)
            export = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
            if s.main:
                torch.save({"step": step, "sampler": samplers, "usage": usage.state_dict(), "data_stats": data_stats,
                            "nonfinite": guard.total, "nonfinite_in_a_row": guard.consecutive},
                           os.path.join(folder, "trainer.pt"))
                if ema is not None:
                    from safetensors.torch import save_file

                    save_file(ema.state_dict(), os.path.join(folder, "ema.safetensors"))
                sd = export if zero_stage == 3 else (ema.state_dict_for(engine.module) if ema else None)
                engine.module.save_pretrained(os.path.join(folder, "model"), state_dict=sd)

        # -- loop: logged values stay on the device until the log step -------------------------------------------
        engine.train()
        data_iter = iter(loader)
        window = MetricsWindow(device)
        saves = SaveSchedule(run.save_every, run.steps)
        # a source with no readable image would otherwise skip empty micro-batches forever; streams have no epoch
        empty = EmptyBatches(len(sampler) if hasattr(sampler, "__len__") else 1000)
        while step < run.steps:
            try:
                batch = next(data_iter)
            except StopIteration:  # the sampler moves on to the next epoch by itself
                data_iter = iter(loader)
                continue
            for k, v in batch.data_stats.items():
                data_stats[k] = data_stats.get(k, 0) + v
            data_state = batch.sampler_state  # the loader prefetches: resume from what was consumed
            if empty.skip(batch.pixels.shape[0], lambda n: f"data.source '{cfg.data.source}': {n} micro-batches in a row "
                          f"without a readable image; row statuses so far: {data_stats}"):
                continue
            images = batch.pixels.to(device, non_blocking=True)
            micro = train_step(engine, disc_engine, images, loss_cfg, step, run.precision, guard, perceptual, teacher,
                               last_layer)
            # a collective on the device, no host read; a micro-step with a non-finite loss is left out
            usage.add(all_reduce_sum(usage.counts(micro.out.indices) * micro.ok.long()))
            window.add(logged_terms(micro), micro.ok, items=images.shape[0] * s.world)
            if not micro.boundary:
                continue
            grad_norm = micro.grad_norm if micro.grad_norm is not None else engine.get_global_grad_norm()

            step += 1
            if ema is not None:
                ema.update(engine.module, micro.skipped)
            logger.advance()
            if due(step, run.log_every, run.steps):
                # the interval's one read back to the host; the guard's flags travel with it and are settled here
                # (too many non-finite steps in a row stop the run)
                reading = window.read(grad_norm, guard.pending_flags(), usage.histogram())
                norm, flags, histogram = reading.extra
                guard.settle(flags, last_ckpt, logger.info)
                used, perplexity = usage_stats(histogram)
                values = {k if k == "gan_weight" else f"loss/{k}": v for k, v in reading.means.get("", {}).items()}
                values.update({"grad_norm": norm[0], "img_per_s": reading.items.get("", 0) / reading.seconds,
                               "codebook/usage_pct": 100 * used, "codebook/perplexity": perplexity})
                values.update({f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(engine.optimizer.param_groups)
                               if "no_decay" not in str(g.get("name", ""))})
                values.update({"data/skipped": sum(v for k, v in data_stats.items()
                                                   if k != "ok" and not k.startswith("converted")),
                               "nonfinite_steps": guard.total})
                logger.scalars(step, values)
            if s.main and run.image_every and due(step, run.image_every, run.steps):
                n = min(8, images.shape[0])
                target = match_size(images, engine.module.image_size)
                recon = micro.out.reconstruction[:n].float().clamp(-1, 1)
                grid = make_grid(torch.cat([target[:n].float(), recon]) * 0.5 + 0.5,
                                 nrow=n)
                os.makedirs(os.path.join(run.output_dir, "samples"), exist_ok=True)
                save_image(grid, os.path.join(run.output_dir, "samples", f"step_{step:08d}.png"))
                logger.image(step, "reconstructions", grid)
            if saves.ready(step, guard, last_ckpt, logger.info):  # due, and the latest steps were not skipped
                last_ckpt = save_checkpoint(s, step, last_ckpt, write)
            stop.exit_if_agreed(s, step, run.steps, last_ckpt, guard, write, logger)  # pre-empted: checkpoint, out

        bad = {k: v for k, v in data_stats.items() if k != "ok" and v}
        return finish(s, run, step, last_ckpt, logger, guard, f"data: {bad or 'no unreadable or converted images'}")
