"""Unified-model training pieces: task schedule, batches, frozen VQRAE, pre-computed codes, resumable loaders."""
import dataclasses
import json
import math
import os
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mllm import MLLMConfig, UnifiedModel, UnifiedOutput
from mllm.data import MLLMDataConfig, TaskLoader, collate, make_loaders, prepare_batch, task_rows
from mllm.model import read_config
from mllm.prompts import generation_prompt_ids
from mllm.tasks import GENERATION, UNDERSTANDING, TaskSchedule
from mllm.train import (
    MLLMTrainConfig, build_model, check_config, dropped_rows, export_dtype, export_model, freeze_unused,
    logged_values, task_losses, trainable_groups, unregister_vqrae,
)
from mllm.vocab import IGNORE_INDEX
from mllm.codes import open_codes, place_vqrae, write_codes
from tests.helpers import NUM_TOKENS, write_tiny_assets
from vqrae import VQRAE
from vqrae.config import ConfigError, load_config
from vqrae.data import SampleKey
from vqrae.runtime.config import RunConfig, TrainingError
from vqrae.runtime.guard import NonFiniteGuard
from vqrae.runtime.log import MetricsWindow
from vqrae.runtime.precision import autocast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(str(tmp_path_factory.mktemp("tiny_mllm")), num_train=16)


def train_config(assets, **data) -> MLLMTrainConfig:
    cfg = MLLMTrainConfig(model=MLLMConfig(llm=assets["llm"], vqrae=assets["vqrae"]), run=RunConfig(precision="fp32", ema_decay=0.0))
    cfg.data.generation.source = cfg.data.understanding.source = assets["data"]
    cfg.data.understanding.conversation_column = "questions"
    cfg.data.num_workers = 0
    cfg.data = dataclasses.replace(cfg.data, **data)
    return cfg


def model_for(cfg) -> UnifiedModel:
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    unregister_vqrae(model)
    return model


# ----------------------------------------------------------------------------- task schedule


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9, 1.0, 1 / 3])
def test_task_schedule_is_seeded_resumable_and_keeps_the_ratio(ratio):
    period, n = 16, 2000
    tasks = [TaskSchedule(ratio, seed=3, period=period).task(i) for i in range(n)]
    assert set(tasks) <= {GENERATION, UNDERSTANDING}
    # a fresh schedule (a resumed run) continues from any index with the same tasks, in any query order
    resumed = TaskSchedule(ratio, seed=3, period=period)
    assert [resumed.task(i) for i in range(1234, n)] == tasks[1234:]
    assert [resumed.task(i) for i in (7, 1500, 7)] == [tasks[7], tasks[1500], tasks[7]]
    generated = 0
    for i, task in enumerate(tasks, start=1):
        generated += task == GENERATION
        assert abs(generated - ratio * i) <= period  # every prefix, within one block
        if i % period == 0:
            assert abs(generated - ratio * i) < 1  # whole blocks: exact up to rounding
    if 0 < ratio < 1:
        other = [TaskSchedule(ratio, seed=4, period=period).task(i) for i in range(n)]
        assert other != tasks and sum(t == GENERATION for t in other) == sum(t == GENERATION for t in tasks)
        blocks = {tuple(tasks[b : b + period]) for b in range(0, n, period)}
        assert len(blocks) > 1  # the order inside blocks is drawn, not a fixed pattern


def test_task_schedule_rejects_ratios_outside_0_1():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        TaskSchedule(1.5, seed=0)


# ----------------------------------------------------------------------------- batches and gradients


@pytest.mark.parametrize("loss_on_text", [False, True])
def test_generation_batch_puts_loss_only_on_visual_tokens(assets, loss_on_text):
    cfg = train_config(assets, task_ratio=1.0, cfg_dropout=0.0, loss_on_text=loss_on_text)
    model = model_for(cfg).eval()
    loader = make_loaders(cfg.data, model, batch_size=3)[GENERATION]
    raw = loader.next()
    batch = prepare_batch(model, raw, CPU)
    assert batch.code_images is None and bool((batch.input_ids >= 0).all())
    # the inserted ids are the VQRAE's codes of exactly these images
    codes = model.vqrae.tokenize(raw.code_images)
    assert torch.equal(batch.input_ids[raw.code_mask].view(3, NUM_TOKENS), model.vocab.to_tokens(codes))
    labelled = batch.labels != IGNORE_INDEX
    visual = model.vocab.is_code(batch.labels) | (batch.labels == model.vocab.eoi_id)
    assert int(visual.sum()) == 3 * (NUM_TOKENS + 1)
    if loss_on_text:  # the prompt too, on top of every visual token
        assert bool((labelled & ~visual).any()) and bool(labelled[visual].all())
    else:
        assert torch.equal(labelled, visual)
    with torch.no_grad():
        out = model(**batch.model_inputs())
    # brute force: mean cross-entropy of the next-token predictions whose target is a visual token
    logits, targets = out.logits[:, :-1], batch.labels[:, 1:]
    picked = visual[:, 1:]
    expected = F.cross_entropy(logits[picked], targets[picked])
    assert torch.allclose(out.image_loss, expected, atol=1e-5)
    if loss_on_text:
        assert out.text_loss > 0 and not torch.allclose(out.loss, out.image_loss)
    else:
        assert torch.allclose(out.loss, expected, atol=1e-5) and out.text_loss == 0


def test_vqrae_stays_outside_the_module_and_gets_no_gradients(assets):
    cfg = train_config(assets)
    model = model_for(cfg).train()
    vqrae = model.vqrae
    assert isinstance(vqrae, VQRAE) and not vqrae.training
    assert not any(name.startswith("vqrae.") for name in model.state_dict())
    assert not {id(p) for p in vqrae.parameters()} & {id(p) for p in model.parameters()}
    before = {k: v.clone() for k, v in vqrae.state_dict().items()}
    loaders = make_loaders(cfg.data, model, batch_size=2)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    for task in (GENERATION, UNDERSTANDING, GENERATION):
        out = model(**prepare_batch(model, loaders[task].next(), CPU).model_inputs())
        out.loss.backward()
        projector_grads = [p.grad for p in model.projector.parameters()]
        if task == UNDERSTANDING:
            assert all(g is not None and g.abs().sum() > 0 for g in projector_grads)
        else:  # generation never reads image features
            assert all(g is None or g.abs().sum() == 0 for g in projector_grads)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(p.grad is None and not p.requires_grad for p in vqrae.parameters())
    assert all(torch.equal(v, before[k]) for k, v in vqrae.state_dict().items())
    # the module's own casts (DeepSpeed's bf16) never reach the VQRAE
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in vqrae.parameters())


@pytest.mark.parametrize("ratio, frozen", [(1.0, "projector"), (0.0, "image_positions"), (0.5, None)])
def test_parts_a_stage_never_uses_are_frozen_by_the_caller_not_by_the_groups(assets, ratio, frozen):
    cfg = train_config(assets, task_ratio=ratio)
    cfg.model.image_positions = True
    model = model_for(cfg)
    flags = lambda: {n: p.requires_grad for n, p in model.named_parameters()}  # noqa: E731
    before = flags()
    groups = trainable_groups(model, cfg)
    assert flags() == before  # building the groups changes nothing
    freeze_unused(model, ratio)
    parts = {"projector": model.projector.parameters(), "image_positions": model.image_positions.parameters()}
    for name, params in parts.items():
        assert all(p.requires_grad == (name != frozen) for p in params)
    grouped = {id(p) for g in trainable_groups(model, cfg) for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} >= grouped


def test_bf16_codes_come_from_the_exact_fp32_search_and_export_keeps_the_stored_vqrae(assets, tmp_path):
    cfg = train_config(assets)
    cfg.run.precision = "bf16"
    before = dataclasses.replace(cfg.model)
    model, vqrae_dir = build_model(cfg)
    assert model.llm.dtype == torch.float32 and model.cfg.dtype == "float32" and cfg.model == before  # fp32 master
    vqrae = unregister_vqrae(model)
    place_vqrae(vqrae, CPU)
    assert vqrae.encoder.model.patch_embed.proj.weight.dtype == torch.float32
    assert vqrae.quantizer.base_codebook.dtype == torch.float32
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    with autocast("bf16", CPU):
        ids = model.tokenize_images(images)
        feats = vqrae.encode(images)
    assert not torch.equal(feats, vqrae.encode(images))  # the encoder's matrix products did run in bf16
    z = vqrae.quantizer.project(feats.float())
    brute = torch.cdist(z, vqrae.quantizer.codebook).argmin(-1)
    assert torch.equal(model.ids_to_image_codes(ids), brute)
    export_model(model, str(tmp_path / "export"), vqrae_dir, dtype=export_dtype(cfg.run.precision))
    assert read_config(str(tmp_path / "export")).dtype == "bfloat16"  # bf16 recorded for inference
    stored = load_file(os.path.join(assets["vqrae"], "model.safetensors"))
    exported = load_file(str(tmp_path / "export" / "vqrae" / "model.safetensors"))
    assert all(torch.equal(stored[k], exported[k]) for k in stored) and stored.keys() == exported.keys()
    loaded = UnifiedModel.from_pretrained(str(tmp_path / "export"))
    assert loaded.vocab == model.vocab


# ----------------------------------------------------------------------------- pre-computed codes


def test_codes_from_gives_the_examples_of_on_the_fly_codes(assets, tmp_path):
    cfg = train_config(assets, task_ratio=1.0, cfg_dropout=0.5)
    model = model_for(cfg)
    manifest = write_codes(VQRAE.from_pretrained(assets["vqrae"]), assets["data"], str(tmp_path / "codes"),
                           dtype=torch.float32, batch_size=5, workers=2)
    assert manifest["num_rows"] == 16 and manifest["status"] == {"ok": 16} and manifest["num_tokens"] == NUM_TOKENS
    on_the_fly = task_rows(cfg.data, GENERATION, model)
    cfg.data.generation.codes_from = str(tmp_path / "codes")
    check_config(cfg)
    precomputed = task_rows(cfg.data, GENERATION, model)
    uncond = generation_prompt_ids(model.tokenizer, "") + [model.vocab.boi_id]
    conditioned = set()
    for index in range(16):
        key = SampleKey(index, epoch=2, position=0)
        batch = prepare_batch(model, collate([on_the_fly[key]], pad_id=0), CPU)
        fast = precomputed[key]
        assert fast.code_image is None and not any(fast.code_mask)
        assert fast.input_ids == batch.input_ids[0].tolist() and fast.labels == batch.labels[0].tolist()
        conditioned.add(fast.input_ids[: -NUM_TOKENS - 1] != uncond)
    assert conditioned == {True, False}  # both dropout outcomes occur, drawn identically by both paths
    # a cached rerun returns the same file; another VQRAE, resolution or row count is refused
    again = write_codes(VQRAE.from_pretrained(assets["vqrae"]), assets["data"], str(tmp_path / "codes"),
                        dtype=torch.float32)
    assert again == manifest
    other = VQRAE.from_pretrained(assets["vqrae"])
    with torch.no_grad():
        other.quantizer.codebook_transform.weight.mul_(2)
    with pytest.raises(TrainingError, match="another VQRAE"):
        open_codes(str(tmp_path / "codes"), other, 16, 32)
    with pytest.raises(TrainingError, match="64 px"):
        open_codes(str(tmp_path / "codes"), model.vqrae, 16, 64)
    with pytest.raises(TrainingError, match="holds 16 rows"):
        open_codes(str(tmp_path / "codes"), model.vqrae, 17, 32)


# ----------------------------------------------------------------------------- loaders and metrics


@pytest.mark.parametrize("num_workers", [0, 1])
def test_task_loader_resumes_after_the_last_consumed_batch(assets, num_workers):
    cfg = train_config(assets)
    model = model_for(cfg)
    rows = task_rows(cfg.data, UNDERSTANDING, model)
    pad = model.tokenizer.pad_token_id

    def loader():
        return TaskLoader(rows, pad, 256, batch_size=3, rank=1, world_size=2, seed=5, num_workers=num_workers)

    first = loader()
    seen = [first.next().input_ids for _ in range(3)]  # 8 rows per rank -> 2 batches an epoch: crosses one
    state = first.state_dict()
    assert state == {"epoch": 1, "rows": 6}  # workers ran ahead; the state is what was consumed (3 rows x 2 ranks)
    rest = [first.next().input_ids for _ in range(3)]
    resumed = loader()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(rest, [resumed.next().input_ids for _ in range(3)]))
    assert not torch.equal(seen[0], seen[2]) or seen[0].shape != seen[2].shape  # a new epoch reshuffles


def test_logged_values_average_per_task_and_count_dropped_rows():
    window = MetricsWindow(CPU, across_ranks=True)

    def out(loss, image_loss):
        return UnifiedOutput(logits=torch.zeros(1), loss=torch.tensor(loss), image_loss=torch.tensor(image_loss),
                             text_loss=torch.tensor(0.0))

    window.add(task_losses(GENERATION, out(2.0, 1.5)), items=10, group=GENERATION)
    window.add(task_losses(GENERATION, out(4.0, 2.5)), items=30, group=GENERATION)
    window.add(task_losses(UNDERSTANDING, out(1.0, 0.0)), items=60, group=UNDERSTANDING)
    values = logged_values(window.read(None, totals=dropped_rows(Counter(ok=5, corrupt=2, too_long=1, converted_L=3))))
    assert values["generation/loss"] == 3.0 and values["generation/image_loss"] == 2.0
    assert values["understanding/loss"] == 1.0 and "understanding/image_loss" not in values
    total = values["tokens_per_s"]
    assert math.isclose(values["generation/tokens_per_s"] / total, 0.4)
    assert values["data/skipped"] == 3 and values["data/too_long"] == 1
    assert "generation/loss" not in logged_values(window.read(None, totals=dropped_rows(Counter())))  # reset


def test_logged_values_leave_out_non_finite_losses_and_the_guard_flags_come_in_the_same_read():
    window, guard, lines = MetricsWindow(CPU, across_ranks=True), NonFiniteGuard(5), []
    for step, loss in enumerate([2.0, float("nan"), 4.0], start=1):
        out = UnifiedOutput(logits=torch.zeros(1), loss=torch.tensor(loss), image_loss=torch.tensor(loss / 2),
                            text_loss=torch.tensor(0.0))
        ok = 1.0 - guard.observe(out.loss)
        guard.record(step, guard.arm())
        window.add(task_losses(GENERATION, out), ok, items=10, group=GENERATION)
    reading = window.read(None, guard.pending_flags(), totals=dropped_rows(Counter()))
    assert lines == [] and guard.total == 0  # reading settles nothing: the loop does, visibly
    guard.settle(reading.extra[1], "ck", lines.append)
    values = logged_values(reading)
    assert values["generation/loss"] == 3.0 and values["generation/image_loss"] == 1.5
    assert lines == ["step 2: non-finite loss skipped (1 so far)"] and guard.total == 1 and not guard.pending


# ----------------------------------------------------------------------------- configs and stages


@pytest.mark.parametrize("name", ["tiny", "qwen3_0p6b_generation", "llava15_pretrain", "llava15_sft"])
def test_shipped_configs_load(name):
    cfg = load_config(MLLMTrainConfig, os.path.join(ROOT, "configs", "mllm", f"{name}.yaml"))
    assert isinstance(cfg.data, MLLMDataConfig) and 0 <= cfg.data.task_ratio <= 1
    if name == "qwen3_0p6b_generation":
        assert cfg.model.llm == "Qwen/Qwen3-0.6B" and cfg.data.task_ratio == 1.0 and not cfg.data.loss_on_text
        assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.eps, cfg.optim.warmup_steps) == (1e-4, "constant", 1e-15, 4000)
        assert (cfg.run.batch_size, cfg.data.max_length, cfg.run.zero_stage, cfg.run.precision) == (512, 1536, 1, "bf16")
    if name == "llava15_pretrain":
        assert cfg.model.freeze_llm and cfg.data.task_ratio == 0.0 and cfg.optim.lr == 1e-3
        assert (cfg.run.batch_size, cfg.run.zero_stage) == (256, 2)
    if name == "llava15_sft":
        assert not cfg.model.freeze_llm and cfg.init_from and cfg.optim.lr == 2e-5
        assert (cfg.run.batch_size, cfg.run.zero_stage) == (128, 3)


@pytest.mark.parametrize("overrides, message", [
    (["model.freeze_llm=true"], "generation never uses"),
    (["data.task_ratio=1.5"], r"\[0, 1\]"),
    (["data.generation.source=''"], "needs data.generation.source"),
    (["data.task_ratio=0", "data.understanding.source=''"], "needs data.understanding.source"),
    (["model.llm=''"], "model.llm is not set"),
    (["init_from=/nonexistent/pretrain/model"], "run the earlier stage first"),
    (["data.generation.codes_from=/nonexistent/codes"], "tokenize_dataset.py"),
    (["run.ema_decay=0.99"], "no EMA"),
])
def test_config_checks_are_one_line_errors(overrides, message):
    cfg = load_config(MLLMTrainConfig, os.path.join(ROOT, "configs", "mllm", "tiny.yaml"), overrides)
    with pytest.raises(ConfigError, match=message) as err:
        check_config(cfg)
    assert "\n" not in str(err.value)


def test_init_from_continues_an_export_with_the_new_stage_settings(assets, tmp_path):
    pretrain = train_config(assets, task_ratio=0.0)
    pretrain.model.freeze_llm = True
    model = model_for(pretrain)
    assert {id(p) for p in [p for p in model.parameters() if p.requires_grad]} == {id(p) for p in model.projector.parameters()}
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(1.0)  # stands in for the trained projector
    export_model(model, str(tmp_path / "pretrain"), assets["vqrae"])

    sft = train_config(assets, task_ratio=0.0)
    sft.init_from = str(tmp_path / "pretrain")
    sft.model = MLLMConfig(llm="", vqrae="", gradient_checkpointing=True)
    check_config(sft)
    tuned = model_for(sft)
    assert not tuned.cfg.freeze_llm and tuned.cfg.llm == assets["llm"]
    assert all(p.requires_grad for p in tuned.llm.parameters())
    assert all(torch.equal(a, b) for a, b in zip(tuned.projector.parameters(), model.projector.parameters()))
    assert any(getattr(m, "gradient_checkpointing", False) for m in tuned.llm.modules())
    assert json.dumps(sorted(tuned.tokenizer.get_vocab().items())) == json.dumps(sorted(model.tokenizer.get_vocab().items()))


@pytest.mark.slow
def test_a_non_finite_micro_step_skips_its_whole_accumulated_step(single_rank, tmp_path, monkeypatch, caplog):
    """4 micro-steps per optimizer step; the 15th micro-batch's loss is NaN: step 4 changes no weight, step 5
    trains again, and the skip is logged and checkpointed (the warmup gives steps 1 and 2 a learning rate of 0)."""
    import mllm.train as mt

    assets = write_tiny_assets(str(tmp_path / "assets"), num_train=16)
    out = str(tmp_path / "run")
    cfg = load_config(MLLMTrainConfig, os.path.join(ROOT, "configs/mllm/tiny.yaml"), [
        f"model.llm={assets['llm']}", f"model.vqrae={assets['vqrae']}", f"data.generation.source={assets['data']}",
        f"data.understanding.source={assets['data']}", f"run.output_dir={out}", "run.steps=6", "run.log_every=6",
        "run.save_every=6", "run.tensorboard=false"])
    seen: list[dict] = []
    real_forward = UnifiedModel.forward

    def forward(self, *args, **kwargs):
        seen.append({n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad})
        result = real_forward(self, *args, **kwargs)
        return dataclasses.replace(result, loss=result.loss * float("nan")) if len(seen) == 15 else result

    monkeypatch.setattr(UnifiedModel, "forward", forward)
    caplog.set_level("INFO", logger="vqrae")
    mt.train(cfg)
    assert len(seen) == 24

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert not same(seen[8], seen[12])  # step 3 trained
    assert same(seen[12], seen[16])  # step 4 (micro-steps 12-15, the 15th NaN) moved nothing
    assert not same(seen[16], seen[20])  # step 5 trained again
    assert [r.getMessage() for r in caplog.records if r.name == "vqrae" and "non-finite loss" in r.getMessage()] == [
        "step 4: non-finite loss skipped (1 so far)"]
    state = torch.load(os.path.join(out, "checkpoints", "step_00000006", "trainer.pt"), weights_only=True)
    assert state["nonfinite"] == 1 and state["step"] == 6
