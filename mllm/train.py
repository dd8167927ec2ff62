"""Training the unified model: ``train(cfg, resume)`` runs the whole DeepSpeed loop.

Each micro-batch trains one task (``mllm.tasks``): generation (caption -> image codes, loss on the visual
tokens) or understanding (image features + question -> answer). Stages chain through ``init_from``: projector
alignment (``model.freeze_llm``), then full or LoRA fine-tuning from its export.

The VQRAE is frozen and only encodes images. It is kept out of the module tree (``unregister_vqrae``), so
DeepSpeed never casts, partitions, broadcasts or checkpoints it; ``place_vqrae`` puts the parts that encode
on the device. Generation codes are computed on the fly, or once per data set (``mllm.codes``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from vqrae import VQRAE
from vqrae.config import ConfigError, save_yaml
from vqrae.model import CONFIG_NAME as VQRAE_CONFIG, WEIGHTS_NAME as VQRAE_WEIGHTS
from vqrae.runtime.checkpoint import save_checkpoint
from vqrae.runtime.config import OptimConfig, RunConfig, TrainingError, check_run_config, deepspeed_config
from vqrae.runtime.distributed import barrier, gather
from vqrae.runtime.elastic import StopSignals
from vqrae.runtime.guard import NonFiniteGuard
from vqrae.runtime.log import MetricsWindow, RunLogger, WindowReading, first_line
from vqrae.runtime.optim import grad_norm_before_step, guarded_optimizer, make_optimizer, make_scheduler, param_groups
from vqrae.runtime.precision import COMPUTE_DTYPES
from vqrae.runtime.session import EmptyBatches, SaveSchedule, due, finish, load_engine, restore, resumed_line, session

from .codes import CODES_MANIFEST, place_vqrae
from .data import Batch, MLLMDataConfig, make_loaders, prepare_batch
from .model import CONFIG_NAME, MLLMConfig, UnifiedModel, UnifiedOutput, read_config
from .tasks import GENERATION, TASKS, TaskSchedule


@dataclass
class MLLMTrainConfig:
    init_from: Optional[str] = None  # UnifiedModel export of an earlier stage (e.g. <projector pretraining>/model)
    # llm and vqrae may stay empty with init_from; model.dtype always follows run.precision
    model: MLLMConfig = field(default_factory=lambda: MLLMConfig(llm="", vqrae=""))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-5, schedule="cosine", min_lr_ratio=0.0, warmup_steps=100,
                                            weight_decay=0.0)
    )
    data: MLLMDataConfig = field(default_factory=MLLMDataConfig)
    run: RunConfig = field(
        default_factory=lambda: RunConfig(output_dir="outputs/mllm", batch_size=128, micro_batch_size=4, ema_decay=0.0,
                                          image_every=0)
    )


def check_config(cfg: MLLMTrainConfig, world_size: int = 1) -> None:
    """Raise ``ConfigError`` (one line) for settings that cannot train, before anything is loaded."""
    data, model = cfg.data, cfg.model
    if not 0.0 <= data.task_ratio <= 1.0:
        raise ConfigError(f"data.task_ratio must lie in [0, 1], got {data.task_ratio}")
    if data.task_ratio > 0 and not data.generation.source:
        raise ConfigError(f"data.task_ratio={data.task_ratio} needs data.generation.source (image-caption rows)")
    if data.task_ratio < 1 and not data.understanding.source:
        raise ConfigError(f"data.task_ratio={data.task_ratio} needs data.understanding.source (conversations)")
    if model.freeze_llm and model.lora.enabled:
        raise ConfigError("model.freeze_llm and model.lora.enabled contradict each other: pick one")
    if model.freeze_llm and data.task_ratio > 0:
        raise ConfigError("model.freeze_llm trains only the projector, which generation never uses: set data.task_ratio=0")
    if cfg.run.ema_decay > 0:
        raise ConfigError("run.ema_decay: the unified-model trainer keeps no EMA; set it to 0")
    if cfg.init_from:
        if not os.path.isfile(os.path.join(cfg.init_from, CONFIG_NAME)):
            raise ConfigError(
                f"init_from '{cfg.init_from}' is not a unified model export (no {CONFIG_NAME}); run the earlier "
                "stage first (e.g. configs/mllm/llava15_pretrain.yaml)"
            )
    else:
        for name in ("llm", "vqrae"):
            if not getattr(model, name):
                raise ConfigError(f"model.{name} is not set (or give init_from, an earlier stage's export)")
    if data.generation.codes_from and not os.path.isfile(os.path.join(data.generation.codes_from, CODES_MANIFEST)):
        raise ConfigError(
            f"data.generation.codes_from '{data.generation.codes_from}' holds no {CODES_MANIFEST}; write it with "
            "scripts/tokenize_dataset.py"
        )
    check_run_config(cfg.run, cfg.optim, world_size)


def export_dtype(precision: str) -> str:
    """The LLM dtype an export of a run in ``precision`` records (``MLLMConfig.dtype``): the run's compute dtype,
    in which inference loads the LLM on an accelerator, whatever the fp32 master weights it was trained in."""
    if precision not in COMPUTE_DTYPES:
        raise ConfigError(f"run.precision must be one of {', '.join(COMPUTE_DTYPES)}, got '{precision}'")
    return str(COMPUTE_DTYPES[precision]).removeprefix("torch.")  # the name MLLMConfig.dtype takes


def build_model(cfg: MLLMTrainConfig, ds_cfg: Optional[dict] = None) -> tuple[UnifiedModel, str]:
    """The model to train and the directory of its VQRAE checkpoint.

    A new model comes from ``cfg.model``. With ``cfg.init_from``, the LLM, extended tokenizer, VQRAE and
    projector come from that export (a LoRA export is merged first) and ``cfg.model`` decides how they train
    (freezing, LoRA, gradient checkpointing). The LLM trains in fp32 master weights whatever ``run.precision``
    (bf16 is autocast, ``vqrae.runtime.precision``), and ``model.cfg.dtype`` is "float32": the export records the run's
    compute dtype instead (``export_model(dtype=export_dtype(run.precision))``).

    Under ZeRO-3 (``ds_cfg``, the DeepSpeed config the engine gets) the LLM is built partitioned: each rank
    holds its share of the weights from the start (``partitioned_llm``), never a whole fp32 copy. Two matrices
    are whole for a moment: a vocabulary grown for the image tokens (transformers builds the resized embedding and
    LM head whole; they are partitioned right after). LoRA runs, and a LoRA export given as ``init_from``, load the
    LLM whole and leave the partitioning to the engine: peft's trainable image-token rows are copied from the whole
    embedding, and merging an adapter needs the whole weights.
    """
    model_cfg = dataclasses.replace(cfg.model, dtype="float32")
    # LoRA keeps the LLM whole until the engine: peft's trainable image-token rows read the whole embedding
    zero3 = ds_cfg is not None and ds_cfg["zero_optimization"]["stage"] == 3 and not cfg.model.lora.enabled
    llm_context = (lambda: partitioned_llm(ds_cfg)) if zero3 else contextlib.nullcontext
    if not cfg.init_from:
        model = UnifiedModel.build(model_cfg, llm_context=llm_context)
        if zero3:  # transformers grows the vocabulary into whole matrices: partition them now
            import deepspeed

            deepspeed.zero.Init(module=model.llm, config_dict_or_path=ds_cfg)
        return model, model_cfg.vqrae
    if read_config(cfg.init_from).lora.enabled:
        llm_context = contextlib.nullcontext
    # Trust is this run's decision (model.trust_remote_code), not the export's.
    base = UnifiedModel.from_pretrained(cfg.init_from, trust_remote_code=cfg.model.trust_remote_code,
                                        llm_context=llm_context)
    if base.cfg.lora.enabled:
        base.merge_lora()
    # An earlier stage may have frozen the LLM; this stage's config decides again.
    llm = base.llm.requires_grad_(True).to(torch.float32)
    model_cfg = dataclasses.replace(
        model_cfg, llm=base.cfg.llm, vqrae=base.cfg.vqrae, gguf_file=None,  # the export holds safetensors
        projector=base.cfg.projector,
    )
    positions = base.image_position_table() if model_cfg.image_positions else None  # None: a fresh zero table
    model = UnifiedModel(model_cfg, llm, base.tokenizer, base.vqrae, base.projector, image_positions=positions)
    return model, os.path.join(cfg.init_from, "vqrae")


@contextlib.contextmanager
def partitioned_llm(ds_cfg: dict):
    """Inside the block, transformers builds and loads models under ``deepspeed.zero.Init`` with ``ds_cfg``: each
    parameter is partitioned as it is created and the weights read from disk go straight into the partitions.
    Only the LLM is built in it (``UnifiedModel.build``): the VQRAE stays whole, outside the engine."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    config = HfDeepSpeedConfig(ds_cfg)  # transformers holds it by a weak reference: keep it alive here
    try:
        yield config
    finally:
        unset_hf_deepspeed_config()


def unregister_vqrae(model: UnifiedModel) -> VQRAE:
    """Keep ``model.vqrae`` usable but outside the module tree: it leaves ``parameters()``, ``state_dict()``,
    ``.to()`` and therefore everything DeepSpeed does to the module (casts, ZeRO partitions, checkpoints)."""
    vqrae = model._modules.pop("vqrae", None)
    if vqrae is None:
        return model.vqrae
    object.__setattr__(model, "vqrae", vqrae)
    return vqrae


def export_model(model: UnifiedModel, path: str, vqrae_dir: str, zero3: bool = False, rank: int = 0,
                 dtype: Optional[str] = None) -> None:
    """``model.save_pretrained(path, dtype)`` with the VQRAE copied from ``vqrae_dir``, whose weights are the
    source of truth (the trained copy may have been cast to the compute dtype). ``dtype``: the LLM dtype the
    export records (``export_dtype``; None: ``model.cfg.dtype``). Under ZeRO-3 every rank must call this: the
    partitioned parameters are gathered, then rank 0 writes."""
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if rank == 0:
                _export(model, path, vqrae_dir, dtype)
    elif rank == 0:
        _export(model, path, vqrae_dir, dtype)


def _export(model: UnifiedModel, path: str, vqrae_dir: str, dtype: Optional[str]) -> None:
    model.save_pretrained(path, dtype=dtype)
    target = os.path.join(path, "vqrae")
    shutil.rmtree(target)
    os.makedirs(target)
    for name in (VQRAE_CONFIG, VQRAE_WEIGHTS):
        shutil.copy2(os.path.join(vqrae_dir, name), os.path.join(target, name))


@dataclass
class MicroStep:
    task: str
    out: "UnifiedOutput"
    tokens: int  # non-padding input tokens on this rank
    ok: torch.Tensor  # 0/1 on the device: this rank's loss was finite (its values may be logged)
    boundary: bool  # this micro-step ended an optimizer step (gradient accumulation)
    grad_norm: Optional[torch.Tensor]  # at a boundary without ZeRO in fp32, where DeepSpeed keeps none


def train_step(engine, model: UnifiedModel, task: str, batch: Batch, device: torch.device, precision: str,
               guard: NonFiniteGuard, step: int) -> MicroStep:
    """One micro-batch of ``task``: tokenize its images, forward, backward and (at an accumulation boundary)
    the optimizer step. A non-finite loss on any rank is flagged on the device (``guard``): the optimizer step
    it belongs to changes no weight, and nothing waits for the flag."""
    tokens = int(batch.attention_mask.sum())  # a host tensor: no device sync
    batch = prepare_batch(model, batch, device, precision)
    out = engine(**batch.model_inputs())
    ok = 1.0 - (guard.observe(out.loss) > 0).float()
    boundary = engine.is_gradient_accumulation_boundary()
    engine.backward(out.loss)
    grad_norm = grad_norm_before_step(engine)
    if boundary:
        optimizer = guarded_optimizer(engine)
        flag = guard.arm(optimizer)
        engine.step()
        guard.record(step + 1, flag, optimizer)
    else:
        engine.step()
    return MicroStep(task, out, tokens, ok, boundary, grad_norm)


def register_tied_token_rows(module: torch.nn.Module) -> None:
    """Under ZeRO-3, tell DeepSpeed that peft's image-token layer of a tied LM head uses the embedding layer's
    trainable rows: a parameter used outside the module that holds it is otherwise not gathered there (a tied
    LLM failed in backward on several ranks)."""
    import deepspeed
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    for layer in module.modules():
        if isinstance(layer, TrainableTokensLayer) and layer.tied_adapter is not None:
            for param in layer.trainable_tokens_delta.parameters():
                deepspeed.zero.register_external_parameter(layer, param)


def freeze_unused(model: UnifiedModel, task_ratio: float) -> None:
    """Freeze what the tasks at ``task_ratio`` never use, so the optimizer leaves it out (``trainable_groups``):
    the projector when only generation trains, the image position table when only understanding trains."""
    if task_ratio == 1.0:
        model.projector.requires_grad_(False)  # generation never reads image features
    if task_ratio == 0.0 and model.image_positions is not None:
        model.image_positions.requires_grad_(False)  # only code tokens use it


def trainable_groups(model: UnifiedModel, cfg: MLLMTrainConfig) -> list:
    """AdamW groups of the parameters that require gradients: the LLM (or its LoRA weights), the projector and
    the image position table (``freeze_unused`` first leaves out what this stage's tasks never use)."""
    optim = cfg.optim
    groups = param_groups(model.llm.named_parameters(), optim.lr, optim.weight_decay, "llm")
    groups += param_groups(model.projector.named_parameters(), optim.lr, optim.weight_decay, "projector")
    if model.image_positions is not None:  # named like a pos_embed, so param_groups never decays it
        groups += param_groups([("pos_embed", model.image_positions.weight)], optim.lr, optim.weight_decay,
                               "image_positions")
    if not groups:
        raise TrainingError("nothing to train: every parameter is frozen")
    return groups


def task_losses(task: str, out: UnifiedOutput) -> dict[str, torch.Tensor]:
    """What the log averages of one micro-batch of ``task``: its loss, and for generation the image-token loss."""
    return {"loss": out.loss, "image_loss": out.image_loss} if task == GENERATION else {"loss": out.loss}


def dropped_rows(data_stats: Counter) -> dict[str, float]:
    """This rank's running totals of dropped rows, as logged: every status but ``ok`` and the conversions
    (``data/skipped``), and the rows too long to train on (``data/too_long``)."""
    return {"data/skipped": sum(v for k, v in data_stats.items() if k != "ok" and not k.startswith("converted")),
            "data/too_long": data_stats.get("too_long", 0)}


def logged_values(reading: WindowReading) -> dict[str, float]:
    """What the log shows of one interval (``MetricsWindow.read`` over ranks, with ``dropped_rows`` as its totals
    and the grad norm as its one extra): each task's mean losses and tokens/s (a task without a finite loss in the
    interval is left out), all tokens/s, the dropped rows and the grad norm."""
    values: dict[str, float] = {}
    for task in TASKS:
        if reading.steps.get(task):
            values.update({f"{task}/{k}": v for k, v in reading.means[task].items()})
            values[f"{task}/tokens_per_s"] = reading.items[task] / reading.seconds
    values["tokens_per_s"] = sum(reading.items.values()) / reading.seconds
    values.update(reading.totals)
    values["grad_norm"] = reading.extra[0][0]
    return values


def train(cfg: MLLMTrainConfig, resume: Optional[str] = None) -> Optional[str]:
    """Train the unified model ``cfg`` describes (``resume``: None, "auto" or a checkpoint folder) under the
    process group the ``deepspeed`` launcher describes, or alone. Returns the export folder on rank 0."""
    import deepspeed

    check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # the launcher exports WORLD_SIZE to every rank
    run, optim, data = cfg.run, cfg.optim, cfg.data
    with session(run, resume) as s, StopSignals() as stop:
        device = s.device
        ds_cfg = deepspeed_config(run, optim, s.world)
        zero_stage = ds_cfg["zero_optimization"]["stage"]

        # -- model: the VQRAE stays outside the engine ------------------------------------------------------------
        try:
            model, vqrae_dir = build_model(cfg, ds_cfg)
        except ConfigError:  # already one line naming the setting to change
            raise
        except (OSError, ValueError) as e:  # built from the config or init_from alone: the user's to fix
            source = f"init_from '{cfg.init_from}'" if cfg.init_from else f"model.llm '{cfg.model.llm}' / model.vqrae"
            raise ConfigError(f"cannot build the model from {source}: {type(e).__name__}: {first_line(e)}") from None
        vqrae = unregister_vqrae(model)
        freeze_unused(model, data.task_ratio)
        groups = trainable_groups(model, cfg)
        n_train = sum(getattr(p, "ds_numel", p.numel()) for g in groups for p in g["params"])
        optimizer = make_optimizer(groups, optim)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg,
                                               lr_scheduler=make_scheduler(optimizer, optim, run.steps))
        if zero_stage == 3 and cfg.model.lora.enabled:
            register_tied_token_rows(engine.module)

        # -- data: rank 0 builds the data sets' caches first; codes_from is checked against the stored VQRAE ----
        if not s.main:
            barrier()
        loaders = make_loaders(data, model, run.micro_batch_size, s.rank, s.world, pin_memory=device.type == "cuda")
        if s.main:
            barrier()
        place_vqrae(vqrae, device)
        schedule = TaskSchedule(data.task_ratio, data.seed)
        guard = NonFiniteGuard(run.max_nonfinite, device)
        window = MetricsWindow(device, across_ranks=True)
        data_stats: Counter = Counter()
        step = micro = 0
        if s.resume_dir:  # every file through torch.load(weights_only=True): a checkpoint never runs code
            load_engine(s, engine, "mllm", strict=False)  # frozen weights: the build's
        state = restore(s, run.seed)
        if state is not None:
            step, micro, guard.total = state["step"], state["micro_step"], state["nonfinite"]
            guard.consecutive = state.get("nonfinite_in_a_row", 0)
            for task, loader in loaders.items():
                if task in state["loaders"][0]:  # a task the earlier run did not train starts at its beginning
                    loader.resume([ranks[task] for ranks in state["loaders"]])  # any number of ranks continues it
            if s.rank < len(state["data_stats"]):
                data_stats.update(state["data_stats"][s.rank])
        last_ckpt = s.resume_dir

        logger = RunLogger(run.output_dir, run.steps, step, s.main, run.tensorboard, run.progress_bar)
        if s.main:  # the config as trained: the ZeRO stage in effect
            save_yaml(dataclasses.replace(cfg, run=dataclasses.replace(run, zero_stage=zero_stage)),
                      os.path.join(run.output_dir, "train_config.yaml"))
            stage = "projector only" if cfg.model.freeze_llm else "LoRA" if cfg.model.lora.enabled else "full"
            logger.info(f"{stage}: {n_train / 1e6:.2f}M trainable parameters, tasks {sorted(loaders)} at generation "
                        f"ratio {data.task_ratio}, world {s.world}, global batch {run.batch_size}, zero {zero_stage}, "
                        f"{run.precision}")
            if s.resume_dir:
                logger.info(resumed_line(s, step))

        def write(folder: str) -> None:
            engine.save_checkpoint(folder, tag="mllm", exclude_frozen_parameters=True)
            gathered = gather(({task: loader.state_dict() for task, loader in loaders.items()}, dict(data_stats)))
            export_model(model, os.path.join(folder, "model"), vqrae_dir, zero_stage == 3, s.rank,
                         export_dtype(run.precision))
            if s.main:
                torch.save({"step": step, "micro_step": micro, "nonfinite": guard.total,
                            "nonfinite_in_a_row": guard.consecutive,
                            "loaders": [g[0] for g in gathered], "data_stats": [g[1] for g in gathered]},
                           os.path.join(folder, "trainer.pt"))

        # -- loop: one micro-batch of one task per iteration ---------------------------------------------------
        engine.train()
        empty = EmptyBatches(1000)
        saves = SaveSchedule(run.save_every, run.steps)
        while step < run.steps:
            task = schedule.task(micro)
            batch = loaders[task].next()
            data_stats.update(batch.data_stats)
            if empty.skip(len(batch), lambda n: f"{n} micro-batches in a row without a usable row (last task: {task}); "
                          f"data so far: {dict(data_stats)}"):
                continue
            result = train_step(engine, model, task, batch, device, run.precision, guard, step)
            micro += 1
            window.add(task_losses(task, result.out), result.ok, items=result.tokens, group=task)
            if not result.boundary:
                continue
            grad_norm = result.grad_norm if result.grad_norm is not None else engine.get_global_grad_norm()

            step += 1
            logger.advance()
            if due(step, run.log_every, run.steps):
                # the interval's one read back to the host (summed over ranks: every rank reads); the guard's flags
                # travel with it and are settled here (too many non-finite steps in a row stop the run)
                reading = window.read(grad_norm, guard.pending_flags(), totals=dropped_rows(data_stats))
                guard.settle(reading.extra[1], last_ckpt, logger.info)
                values = logged_values(reading)
                values.update({f"lr/{g['name']}": g["lr"] for g in engine.optimizer.param_groups
                               if not g.get("name", "").endswith("no_decay")})
                values["nonfinite_steps"] = guard.total
                logger.scalars(step, values)
            if saves.ready(step, guard, last_ckpt, logger.info):  # due, and the latest steps were not skipped
                last_ckpt = save_checkpoint(s, step, last_ckpt, write)
            stop.exit_if_agreed(s, step, run.steps, last_ckpt, guard, write, logger)  # pre-empted: checkpoint, out

        dropped = {k: v for k, v in data_stats.items() if k != "ok" and v}
        return finish(s, run, step, last_ckpt, logger, guard,
                      f"data on rank 0: {dropped or 'no dropped or converted rows'}")
