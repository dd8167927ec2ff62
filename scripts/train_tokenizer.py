"""Train a VQRAE tokenizer with DeepSpeed.

    deepspeed scripts/train_tokenizer.py --config configs/tokenizer/demo_stage1.yaml [key.sub=value ...]
    deepspeed --num_gpus 8 scripts/train_tokenizer.py --config configs/tokenizer/siglip2_so400m_stage1.yaml
    deepspeed scripts/train_tokenizer.py --config ... --resume auto      # continue the newest checkpoint

Stage 1 trains projections, W and the decoder on a frozen encoder; stage 2 (``stage=2``, ``init_from`` a stage-1
export) also trains the encoder with self-distillation. The final EMA model is exported to ``<output_dir>/model``.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from vqrae.config import ConfigError, load_config, save_yaml  # noqa: E402
from vqrae.training import (  # noqa: E402
    TrainingError, check_run_config, first_line, publish, release_run_lock, run_cli, training_args,
)

DEFAULT_CONFIG = "configs/tokenizer/demo_stage1.yaml"


def parse_args(argv=None):
    return training_args(__doc__.split("\n")[0], DEFAULT_CONFIG, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from vqrae.losses import reconstruction_loss
    from vqrae.trainer import TokenizerTrainConfig

    cfg = load_config(TokenizerTrainConfig, args.config, args.overrides)
    try:  # the loss is the one place that knows the valid kinds; otherwise a bad one fails only at step 1
        reconstruction_loss(torch.zeros(1), torch.zeros(1), cfg.loss.recon)
    except ValueError as e:
        raise ConfigError(f"loss.recon: {e}") from None
    if cfg.stage == 2 and not cfg.init_from:
        raise ConfigError("stage 2 needs init_from: the stage-1 export (<stage-1 output_dir>/model); run stage 1 first")
    if cfg.stage == 2 and not os.path.isfile(os.path.join(cfg.init_from, "config.yaml")):
        raise ConfigError(f"init_from '{cfg.init_from}' is not a VQRAE export (no config.yaml); run stage 1 first")
    if cfg.stage not in (1, 2):
        raise ConfigError(f"stage must be 1 or 2, got {cfg.stage}")
    if not cfg.data.source:
        raise ConfigError("data.source is empty: give an imagefolder directory, a hub dataset id or .tar shards")
    for name in ("encoder_lr", "quantizer_lr"):
        value = getattr(cfg, name)
        if value is not None and not value > 0:  # also catches nan
            raise ConfigError(f"{name} must be > 0, got {value}")
    # the launcher exports WORLD_SIZE to every rank: bad batch sizes fail here, before any process group exists
    check_run_config(cfg.run, cfg.optim, int(os.environ.get("WORLD_SIZE", "1")))
    try:
        train(cfg, args.resume)
    finally:  # a killed run's lock stays; the next run takes it over as stale
        release_run_lock(cfg.run.output_dir)


def train(cfg, resume: str | None) -> None:
    import deepspeed
    import torch.distributed as dist
    from torchvision.utils import make_grid, save_image

    from vqrae.data import build_dataloader
    from vqrae.losses import PerceptualLoss, gan_active
    from vqrae.metrics import CodebookUsage
    from vqrae.model import VQRAE
    from vqrae.trainer import (
        build_discriminator, discriminator_loss, generator_loss, make_teacher, match_size, set_stage,
        tokenizer_param_groups,
    )
    from vqrae.training import (
        EMA, Checkpointer, NonFiniteGuard, RunLogger, all_reduce_sum, autocast, deepspeed_config,
        grad_norm_before_step, init_distributed,
        make_optimizer, make_scheduler, param_groups, rng_state, seed_everything, set_rng_state,
    )
    from vqrae.training import SAVE_ERRORS, load_engine_checkpoint, safe_load, save_failed, take_run_lock

    run, optim = cfg.run, cfg.optim
    rank, world, device = init_distributed()
    seed_everything(run.seed)  # identical init on every rank
    os.makedirs(run.output_dir, exist_ok=True)
    take_run_lock(run.output_dir, rank)  # released by main, also on errors
    ckpt = Checkpointer(run.output_dir, run.keep_last, rank)
    resume_dir = ckpt.resolve(resume)

    # -- model ---------------------------------------------------------------------------------------------
    try:
        model = (VQRAE.from_pretrained(cfg.init_from, trust_remote_code=cfg.model.encoder.trust_remote_code)
                 if cfg.stage == 2 else VQRAE(cfg.model))
    except Exception as e:  # built from the config or init_from alone: whatever fails there is the user's to fix
        source = f"init_from '{cfg.init_from}'" if cfg.stage == 2 else "the model config"
        raise ConfigError(f"cannot build the VQRAE from {source}: {type(e).__name__}: {first_line(e)}") from None
    cfg.model = model.cfg
    set_stage(model, cfg.stage)
    teacher = make_teacher(model.encoder) if cfg.stage == 2 else None
    groups = tokenizer_param_groups(model, cfg)
    if cfg.stage == 1 and not resume_dir:
        calibrate_quantizer(model, cfg.data, run.micro_batch_size, rank, world, device)
    optimizer = make_optimizer(groups, optim)
    scheduler = make_scheduler(optimizer, optim, run.steps)
    ds_cfg = deepspeed_config(run, optim, world)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    zero3 = run.zero_stage == 3
    if teacher is not None:
        teacher.to(device)  # fp32 like the model; run.precision applies through autocast (vqrae/training.py)

    loss_cfg = cfg.loss
    disc_engine = None
    if loss_cfg.gan_weight > 0:
        disc = build_discriminator(loss_cfg)
        d_opt = make_optimizer(param_groups(disc.named_parameters(), loss_cfg.disc_lr, 0.0, "disc"), optim)
        disc_engine, _, _, _ = deepspeed.initialize(model=disc, optimizer=d_opt, config=dict(ds_cfg))
    try:
        perceptual = None
        if loss_cfg.perceptual_weight > 0:
            perceptual = PerceptualLoss(loss_cfg.lpips_net, loss_cfg.lpips_backbone).to(device)
    except ValueError as e:  # unknown net, missing trunk file, no cached ImageNet weights offline
        raise ConfigError(f"loss: {first_line(e)}") from None
    # ZeRO-3 partitions parameters: EMA and the adaptive GAN weight need whole tensors, so both are off there.
    ema = EMA(engine.module, run.ema_decay) if run.ema_decay > 0 and not zero3 else None

    try:
        loader, sampler = build_dataloader(cfg.data, run.micro_batch_size, rank, world)
    except ValueError as e:  # no shards match, no image column, fewer rows than one batch per rank
        raise TrainingError(f"data.source '{cfg.data.source}': {first_line(e)}") from None
    usage = CodebookUsage(model.codebook_size, cfg.codebook_window)
    guard = NonFiniteGuard(run.max_nonfinite)
    data_stats: dict = {}
    data_state = sampler.state_dict()
    step = 0
    if resume_dir:  # every file through torch.load(weights_only=True): a checkpoint never runs code
        load_engine_checkpoint(engine, resume_dir, "generator")
        if disc_engine is not None:
            load_engine_checkpoint(disc_engine, resume_dir, "discriminator")
        state = safe_load(os.path.join(resume_dir, "trainer.pt"))
        step = state["step"]
        data_state = state["sampler"][rank]
        sampler.load_state_dict(data_state)
        usage.load_state_dict(state["usage"])
        data_stats = dict(state["data_stats"])
        guard.total = state["nonfinite"]
        if ema is not None:
            from safetensors.torch import load_file

            ema.load_state_dict(load_file(os.path.join(resume_dir, "ema.safetensors")))
        set_rng_state(safe_load(os.path.join(resume_dir, f"rng_rank{rank}.pt")))
    else:
        seed_everything(run.seed + rank)  # per-rank augmentation randomness
    last_ckpt = resume_dir

    logger = RunLogger(run.output_dir, run.steps, step, rank == 0, run.tensorboard, run.progress_bar)
    if rank == 0:
        save_yaml(cfg, os.path.join(run.output_dir, "train_config.yaml"))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(f"stage {cfg.stage}: {n_train / 1e6:.2f}M trainable parameters, world {world}, "
                    f"global batch {run.batch_size}, zero {run.zero_stage}, {run.precision}"
                    + (f", resumed from {resume_dir} at step {step}" if resume_dir else ""))

    def save(step: int) -> str:
        try:
            return write_checkpoint(step)
        except SAVE_ERRORS as e:  # full disk, lost mount: the earlier checkpoints are untouched, resume from them
            raise save_failed(e, ckpt, step, last_ckpt) from None

    def write_checkpoint(step: int) -> str:
        tmp = ckpt.tmp_dir(step)
        engine.save_checkpoint(tmp, tag="generator")
        if disc_engine is not None:
            disc_engine.save_checkpoint(tmp, tag="discriminator")
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        samplers = [None] * world
        dist.all_gather_object(samplers, data_state)
        export = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
        if rank == 0:
            torch.save({"step": step, "sampler": samplers, "usage": usage.state_dict(), "data_stats": data_stats,
                        "nonfinite": guard.total}, os.path.join(tmp, "trainer.pt"))
            sd = export if zero3 else (ema.state_dict_for(engine.module) if ema else engine.module.state_dict())
            if ema is not None:
                from safetensors.torch import save_file

                save_file(ema.state_dict(), os.path.join(tmp, "ema.safetensors"))
            engine.module.save_pretrained(os.path.join(tmp, "model"), state_dict=sd)
        return ckpt.commit(tmp, step)

    # -- loop ----------------------------------------------------------------------------------------------
    engine.train()
    data_iter = iter(loader)
    window_imgs, window_t0 = 0, time.time()
    sums: dict = {}
    # a source with no readable image would otherwise skip empty micro-batches forever; streams have no epoch
    empty_run, empty_limit = 0, len(sampler) if hasattr(sampler, "__len__") else 1000
    while step < run.steps:
        try:
            batch = next(data_iter)
        except StopIteration:  # the sampler moves on to the next epoch by itself
            data_iter = iter(loader)
            continue
        for k, v in batch.data_stats.items():
            data_stats[k] = data_stats.get(k, 0) + v
        data_state = batch.sampler_state  # the loader prefetches: resume from what was consumed
        images = batch.pixels
        # a micro-batch whose rows were all unreadable: every rank skips it together, or collectives desync
        if all_reduce_sum(torch.tensor([float(images.shape[0] == 0)])).item() > 0:
            empty_run += 1
            if empty_run >= empty_limit:
                raise TrainingError(f"data.source '{cfg.data.source}': {empty_run} micro-batches in a row without a "
                                    f"readable image; row statuses so far: {data_stats}")
            continue
        empty_run = 0
        images = images.to(device)
        out = engine(images)  # autocast to run.precision inside the engine (its torch_autocast section)
        target = match_size(images, engine.module.image_size)
        with autocast(run.precision, device):
            teacher_feats = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_feats = teacher(images)
            last_layer = None if zero3 else engine.module.decoder.last_layer.weight
            gl = generator_loss(out, target, loss_cfg, step, perceptual, disc_engine.module if disc_engine else None,
                                teacher_feats, last_layer)
        if not guard.check(gl.total, step, last_ckpt):
            if not bool(torch.isfinite(out.features).all()):  # checked only here: no extra sync on good steps
                raise TrainingError(f"step {step}: the encoder produced NaN or inf features (a corrupt image or "
                                    f"diverged encoder weights); last complete checkpoint: {last_ckpt or 'none'}")
            logger.info(f"step {step}: non-finite loss skipped ({guard.total} so far)")
            continue
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(gl.total)
        measured_norm = grad_norm_before_step(engine)
        engine.step()
        d_loss = None
        if disc_engine is not None and gan_active(step, loss_cfg.gan_start_step):
            d_loss = discriminator_loss(disc_engine, target, out.reconstruction)
            disc_engine.backward(d_loss)
            disc_engine.step()

        counts = all_reduce_sum(torch.bincount(out.indices.flatten(), minlength=model.codebook_size))
        usage.update(torch.repeat_interleave(torch.arange(model.codebook_size, device=counts.device), counts))
        window_imgs += images.shape[0] * world
        for k, v in gl.terms.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        sums["loss"] = sums.get("loss", 0.0) + gl.total.item()
        if d_loss is not None:
            sums["disc"] = sums.get("disc", 0.0) + d_loss.item()
        sums["_n"] = sums.get("_n", 0) + 1
        if not boundary:
            continue

        step += 1
        if ema is not None:
            ema.update(engine.module)
        logger.advance()
        if step % run.log_every == 0 or step == run.steps:
            n = sums.pop("_n")
            vals = {f"loss/{k}": v / n for k, v in sums.items()}
            lrs = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(engine.optimizer.param_groups) if "no_decay" not in str(g.get("name", ""))}
            gn = measured_norm if measured_norm is not None else engine.get_global_grad_norm()
            vals.update(lrs)
            vals.update({"grad_norm": float(gn) if gn is not None else float("nan"), "gan_weight": gl.gan_weight,
                         "img_per_s": window_imgs / max(time.time() - window_t0, 1e-9),
                         "codebook/usage_pct": 100 * usage.usage(), "codebook/perplexity": usage.perplexity(),
                         "data/skipped": sum(v for k, v in data_stats.items() if k != "ok" and not k.startswith("converted")),
                         "nonfinite_steps": guard.total})
            logger.scalars(step, vals)
            sums, window_imgs, window_t0 = {}, 0, time.time()
        if rank == 0 and run.image_every and (step % run.image_every == 0 or step == run.steps):
            n = min(8, images.shape[0])
            grid = make_grid(torch.cat([target[:n].float(), out.reconstruction[:n].float().clamp(-1, 1)]) * 0.5 + 0.5, nrow=n)
            os.makedirs(os.path.join(run.output_dir, "samples"), exist_ok=True)
            save_image(grid, os.path.join(run.output_dir, "samples", f"step_{step:08d}.png"))
            logger.image(step, "reconstructions", grid)
        if step % run.save_every == 0 or step == run.steps:
            last_ckpt = save(step)

    # -- export --------------------------------------------------------------------------------------------
    if rank == 0 and last_ckpt:
        export_dir = os.path.join(run.output_dir, "model")
        publish(last_ckpt, export_dir)
        bad = {k: v for k, v in data_stats.items() if k != "ok" and v}
        logger.info(f"data: {bad if bad else 'no unreadable or converted images'}; non-finite steps skipped: {guard.total}")
        logger.info(f"done: {step} steps; model exported to {export_dir}")
    logger.close()


def calibrate_quantizer(model, data_cfg, batch_size: int, rank: int, world: int, device, num_batches: int = 8) -> None:
    """Standardise the quantizer's input with feature statistics of a sample of the training data (all ranks
    pooled), before the first step of stage 1; later stages and resumed runs load them with the weights."""
    from vqrae.data import build_dataloader

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
    if model.cfg.quantizer.init == "kmeans":
        _kmeans_codebook(model, loader, batch_size, device)


def _kmeans_codebook(model, loader, batch_size: int, device, min_tokens: int = 65536) -> None:
    """quantizer.init = kmeans: centroids of this rank's sample of projected features (at least 4 per code and
    ``min_tokens`` in all), then rank 0's codebook to every rank, so all ranks start from the same model."""
    import itertools
    import math

    import torch.distributed as dist

    k = model.cfg.quantizer.codebook_size
    num_batches = min(1024, math.ceil(max(min_tokens, 4 * k) / (batch_size * model.num_tokens)))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        feats = [model.encoder(b.pixels.to(device)).float().flatten(0, 1)
                 for b in itertools.islice(loader, num_batches) if b.pixels.shape[0]]
        feats = torch.cat(feats)
        if feats.shape[0] < k:
            raise TrainingError(f"quantizer.init kmeans: {feats.shape[0]} feature tokens sampled, fewer than the {k} codes")
        model.quantizer.to(device).init_codebook_kmeans(feats, generator=torch.Generator().manual_seed(0))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in model.quantizer.state_dict().values():  # tensors sharing the live storage
            dist.broadcast(t, src=0)


def _sample_stats(model, loader, num_batches: int, device):
    """Feature statistics of this rank's first ``num_batches`` batches, merged over all ranks (every rank
    ends with the same values); None when no rank read an image."""
    import itertools

    import torch.distributed as dist

    from vqrae.quantizer import FeatureStats
    from vqrae.trainer import feature_stats, merge_stats

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


if __name__ == "__main__":
    run_cli(main)
