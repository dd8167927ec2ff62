"""Train the unified multimodal model (LLM + frozen VQRAE + projector) with DeepSpeed.

    deepspeed scripts/train_mllm.py --config configs/mllm/tiny.yaml [key.sub=value ...]
    deepspeed --num_gpus 8 scripts/train_mllm.py --config configs/mllm/qwen3_0p6b_generation.yaml
    deepspeed scripts/train_mllm.py --config ... --resume auto      # continue the newest checkpoint

Each micro-batch trains one task, generation (caption -> image codes) or understanding (image + question ->
answer), on a seeded schedule at ``data.task_ratio`` that all ranks share. Stages chain through ``init_from``:
projector alignment (``model.freeze_llm``), then full or LoRA fine-tuning from its export. The final model is
exported to ``<output_dir>/model`` (``UnifiedModel.from_pretrained``).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from vqrae.config import ConfigError, load_config, save_yaml  # noqa: E402
from vqrae.training import (  # noqa: E402
    TrainingError, check_run_config, first_line, publish, release_run_lock, run_cli, training_args,
)

DEFAULT_CONFIG = "configs/mllm/demo.yaml"


def parse_args(argv=None):
    return training_args(__doc__.split("\n")[0], DEFAULT_CONFIG, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from mllm.trainer import MLLMTrainConfig, check_config

    cfg = load_config(MLLMTrainConfig, args.config, args.overrides)
    check_config(cfg)
    # the launcher exports WORLD_SIZE to every rank: bad batch sizes fail here, before any process group exists
    check_run_config(cfg.run, cfg.optim, int(os.environ.get("WORLD_SIZE", "1")))
    try:
        train(cfg, args.resume)
    finally:  # a killed run's lock stays; the next run takes it over as stale
        release_run_lock(cfg.run.output_dir)


def train(cfg, resume: str | None) -> None:
    from collections import Counter

    import deepspeed
    import torch.distributed as dist

    from mllm.trainer import (
        TaskMetrics, TaskSchedule, build_model, export_model, make_loaders, place_vqrae, prepare_batch,
        unregister_vqrae,
    )
    from vqrae.training import (
        Checkpointer, NonFiniteGuard, RunLogger, all_reduce_sum, barrier, deepspeed_config, grad_norm_before_step,
        init_distributed,
        make_optimizer, make_scheduler, param_groups, rng_state, seed_everything, set_rng_state,
    )
    from vqrae.training import SAVE_ERRORS, load_engine_checkpoint, safe_load, save_failed, take_run_lock

    run, optim, data = cfg.run, cfg.optim, cfg.data
    rank, world, device = init_distributed()
    seed_everything(run.seed)  # identical initialisation on every rank
    os.makedirs(run.output_dir, exist_ok=True)
    take_run_lock(run.output_dir, rank)  # released by main, also on errors
    ckpt = Checkpointer(run.output_dir, run.keep_last, rank)
    resume_dir = ckpt.resolve(resume)
    ds_cfg = deepspeed_config(run, optim, world)
    zero3 = run.zero_stage == 3

    # -- model: the VQRAE stays outside the engine -----------------------------------------------------------
    try:
        model, vqrae_dir = build_model(cfg)
    except ConfigError:  # already one line naming the setting to change
        raise
    except (OSError, ValueError) as e:  # built from the config or init_from alone: the user's to fix
        source = f"init_from '{cfg.init_from}'" if cfg.init_from else f"model.llm '{cfg.model.llm}' / model.vqrae"
        raise ConfigError(f"cannot build the model from {source}: {type(e).__name__}: {first_line(e)}") from None
    vqrae = unregister_vqrae(model)
    if data.task_ratio == 1.0:
        model.projector.requires_grad_(False)  # never used by generation: keep it out of the optimizer
    if data.task_ratio == 0.0 and model.image_positions is not None:
        model.image_positions.requires_grad_(False)  # only code tokens use it: never trained by understanding
    groups = param_groups(model.llm.named_parameters(), optim.lr, optim.weight_decay, "llm")
    groups += param_groups(model.projector.named_parameters(), optim.lr, optim.weight_decay, "projector")
    if model.image_positions is not None:  # named like a pos_embed, so param_groups never decays it
        groups += param_groups([("pos_embed", model.image_positions.weight)], optim.lr, optim.weight_decay, "image_positions")
    if not groups:
        raise TrainingError("nothing to train: every parameter is frozen")
    n_train = sum(p.numel() for g in groups for p in g["params"])  # before ZeRO-3 partitions them
    optimizer = make_optimizer(groups, optim)
    scheduler = make_scheduler(optimizer, optim, run.steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)

    # -- data: rank 0 builds the datasets caches first; codes_from is checked against the stored VQRAE ---------
    if rank != 0:
        barrier()
    loaders = make_loaders(data, model, run.micro_batch_size, rank, world, pin_memory=device.type == "cuda")
    if rank == 0:
        barrier()
    place_vqrae(vqrae, device)
    schedule = TaskSchedule(data.task_ratio, data.seed)
    guard = NonFiniteGuard(run.max_nonfinite)
    metrics = TaskMetrics(device)
    data_stats: Counter = Counter()
    step = micro = 0
    if resume_dir:  # every file through torch.load(weights_only=True): a checkpoint never runs code
        load_engine_checkpoint(engine, resume_dir, "mllm", load_module_strict=False)  # frozen weights: the build's
        state = safe_load(os.path.join(resume_dir, "trainer.pt"))
        ranks = len(state["loaders"])
        if ranks != world:
            raise TrainingError(f"{resume_dir} was written by {ranks} ranks; resume with the same number ({world} now)")
        step, micro, guard.total = state["step"], state["micro_step"], state["nonfinite"]
        for task, loader in loaders.items():
            if task in state["loaders"][rank]:  # a task the earlier run did not train starts at its beginning
                loader.load_state_dict(state["loaders"][rank][task])
        data_stats.update(state["data_stats"][rank])
        set_rng_state(safe_load(os.path.join(resume_dir, f"rng_rank{rank}.pt")))
    else:
        seed_everything(run.seed + rank)  # per-rank randomness (dropout)
    last_ckpt = resume_dir

    logger = RunLogger(run.output_dir, run.steps, step, rank == 0, run.tensorboard, run.progress_bar)
    if rank == 0:
        save_yaml(cfg, os.path.join(run.output_dir, "train_config.yaml"))
        stage = "projector only" if cfg.model.freeze_llm else "LoRA" if cfg.model.lora.enabled else "full"
        logger.info(f"{stage}: {n_train / 1e6:.2f}M trainable parameters, tasks {sorted(loaders)} at generation "
                    f"ratio {data.task_ratio}, world {world}, global batch {run.batch_size}, zero {run.zero_stage}, "
                    f"{run.precision}" + (f", resumed from {resume_dir} at step {step}" if resume_dir else ""))

    def save(step: int) -> str:
        try:
            return write_checkpoint(step)
        except SAVE_ERRORS as e:  # full disk, lost mount: the earlier checkpoints are untouched, resume from them
            raise save_failed(e, ckpt, step, last_ckpt) from None

    def write_checkpoint(step: int) -> str:
        tmp = ckpt.tmp_dir(step)
        engine.save_checkpoint(tmp, tag="mllm", exclude_frozen_parameters=True)
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        mine = ({task: loader.state_dict() for task, loader in loaders.items()}, dict(data_stats))
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        export_model(model, os.path.join(tmp, "model"), vqrae_dir, zero3, rank)
        if rank == 0:
            torch.save({"step": step, "micro_step": micro, "nonfinite": guard.total,
                        "loaders": [g[0] for g in gathered], "data_stats": [g[1] for g in gathered]},
                       os.path.join(tmp, "trainer.pt"))
        return ckpt.commit(tmp, step)

    # -- loop: one micro-batch of one task per iteration -----------------------------------------------------
    engine.train()
    empty = torch.zeros(1, device=device)
    empty_run = 0
    while step < run.steps:
        task = schedule.task(micro)
        batch = loaders[task].next()
        data_stats.update(batch.data_stats)
        # a micro-batch whose rows were all dropped: every rank skips it together, or collectives desync
        empty.fill_(float(len(batch) == 0))
        if all_reduce_sum(empty).item() > 0:
            empty_run += 1
            if empty_run >= 1000:
                raise TrainingError(f"{empty_run} micro-batches in a row without a usable row (last task: {task}); "
                                    f"data so far: {dict(data_stats)}")
            continue
        empty_run = 0
        tokens = int(batch.attention_mask.sum())
        batch = prepare_batch(model, batch, device, run.precision)
        out = engine(**batch.model_inputs())
        if not guard.check(out.loss, step, last_ckpt):
            logger.info(f"step {step}: non-finite {task} loss skipped ({guard.total} so far)")
            continue
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(out.loss)
        measured_norm = grad_norm_before_step(engine)
        engine.step()
        micro += 1
        metrics.add(task, out, tokens)
        if not boundary:
            continue

        step += 1
        logger.advance()
        if step % run.log_every == 0 or step == run.steps:
            values = metrics.summary(data_stats)
            values.update({f"lr/{g['name']}": g["lr"] for g in engine.optimizer.param_groups
                           if not g.get("name", "").endswith("no_decay")})
            norm = measured_norm if measured_norm is not None else engine.get_global_grad_norm()
            values.update({"grad_norm": float(norm) if norm is not None else float("nan"),
                           "nonfinite_steps": guard.total})
            logger.scalars(step, values)
        if step % run.save_every == 0 or step == run.steps:
            last_ckpt = save(step)

    # -- export ----------------------------------------------------------------------------------------------
    if rank == 0 and last_ckpt:
        export_dir = os.path.join(run.output_dir, "model")
        publish(last_ckpt, export_dir)
        dropped = {k: v for k, v in data_stats.items() if k != "ok" and v}
        logger.info(f"data on rank 0: {dropped or 'no dropped or converted rows'}; non-finite steps skipped: "
                    f"{guard.total}")
        logger.info(f"done: {step} steps; model exported to {export_dir}")
    logger.close()



if __name__ == "__main__":
    run_cli(main)
