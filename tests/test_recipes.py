"""Every shipped recipe trains as shipped (tests/recipe_matrix.py), and the recipes say what the method says."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from mllm.train import MLLMTrainConfig
from tests.recipe_matrix import MLLM_RECIPES, ROOT, STEPS, TOKENIZER_RECIPES, VARIANTS, recipe_names
from vqrae.config import load_config, to_dict
from vqrae.losses import LossConfig
from vqrae.train import TokenizerTrainConfig

# what a matrix cell may change: sizes, sources, the GAN's start, logging cadence; everything else stays as shipped
SIZE_FIELDS = {
    "model.encoder.image_size", "model.encoder.model_kwargs", "model.encoder.name", "model.encoder.weights",
    "model.encoder.hf_config", "model.encoder.mean", "model.encoder.std", "model.quantizer.codebook_size",
    "model.quantizer.codebook_dim", "model.decoder.patch_size", "model.decoder.image_size", "model.llm",
    "model.vqrae", "init_from", "loss.lpips_backbone", "loss.gan_start_step", "loss.disc_channels", "data.source",
    "data.resolution", "data.num_workers", "data.generation.source", "data.understanding.source",
    "data.understanding.image_root", "run.output_dir", "run.steps", "run.batch_size", "run.micro_batch_size",
    "run.save_every", "run.log_every", "run.image_every", "run.progress_bar", "model.dtype",
    "model.encoder.pretrained",  # a stage-2 run rebuilds its encoder from the stage-1 export, which records false
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key != "model.encoder.model_kwargs" and key != "model.encoder.hf_config":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, request):
    """All cells in one subprocess (DeepSpeed's process group and engines stay out of the test process)."""
    out = str(tmp_path_factory.mktemp("recipes"))
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/vqrae_torch_ext"),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    proc = subprocess.run([sys.executable, "-m", "tests.recipe_matrix", out], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3000)
    results_file = os.path.join(out, "results.json")
    if not os.path.isfile(results_file):
        raise AssertionError(f"the recipe matrix did not finish:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    with open(results_file) as f:
        results = json.load(f)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # the CI log shows which recipes ran, how they ended, how long
        print()
        for name, r in results.items():
            print(f"recipe matrix: {r['status']:>6} {r.get('seconds', 0):6.1f}s  {name}")
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", recipe_names())
def test_recipe_trains_two_steps_as_shipped(matrix, name):
    result = matrix[name]
    assert result["status"] == "ok", f"{name}: {result.get('error')}\n{result.get('traceback', '')}"
    assert result["steps"][-1] == STEPS, result["log"]
    assert result["losses"] and all(math.isfinite(v) for vs in result["losses"].values() for v in vs), result["losses"]
    assert os.path.isfile(os.path.join(result["output_dir"], "model", "config.yaml")) or \
        os.path.isfile(os.path.join(result["output_dir"], "model", "mllm.yaml")), os.listdir(result["output_dir"])
    # the run trained what the recipe says: every setting but the shrunk sizes and stand-in sources is the recipe's
    path, extra = VARIANTS.get(name, (name, []))
    schema = TokenizerTrainConfig if path.startswith("configs/tokenizer") else MLLMTrainConfig
    shipped = _flat(to_dict(load_config(schema, os.path.join(ROOT, path), extra)))
    ran = _flat(to_dict(load_config(schema, os.path.join(result["output_dir"], "train_config.yaml"))))
    changed = {k for k in shipped if shipped[k] != ran.get(k)}
    assert changed <= SIZE_FIELDS, {k: (shipped[k], ran.get(k)) for k in changed - SIZE_FIELDS}


def test_the_matrix_covers_every_shipped_yaml_and_its_lora_variant():
    names = set(recipe_names())
    shipped = {os.path.relpath(p, ROOT) for p in TOKENIZER_RECIPES + MLLM_RECIPES}
    on_disk = {os.path.join("configs", d, f) for d in ("tokenizer", "mllm")
               for f in os.listdir(os.path.join(ROOT, "configs", d)) if f.endswith(".yaml")}
    assert shipped == on_disk and shipped <= names and "llava15_sft+lora" in names
    assert any("bf16" == load_config(TokenizerTrainConfig, os.path.join(ROOT, p)).run.precision for p in TOKENIZER_RECIPES)


@pytest.mark.parametrize("path", [None] + [os.path.relpath(p, ROOT) for p in TOKENIZER_RECIPES])
def test_the_quantizer_loss_moves_the_encoder_to_the_code_more_than_the_code_to_the_encoder(path):
    """||sg(c) - z||^2 (commitment, trains the encoder side) weighs 1; ||c - sg(z)||^2 (codebook, trains W) 0.25."""
    loss = LossConfig() if path is None else load_config(TokenizerTrainConfig, os.path.join(ROOT, path)).loss
    assert loss.codebook_weight < loss.commit_weight, (loss.codebook_weight, loss.commit_weight)
    if path is None or "siglip2" in path or "dinov2" in path:  # the paper recipes: exactly 1 and beta = 0.25
        assert (loss.commit_weight, loss.codebook_weight) == (1.0, 0.25)


@pytest.mark.parametrize("path", [os.path.relpath(p, ROOT) for p in TOKENIZER_RECIPES if "siglip2" in p or "dinov2" in p])
def test_paper_recipes_name_real_models_and_the_paper_settings(path):
    import timm

    cfg = load_config(TokenizerTrainConfig, os.path.join(ROOT, path))
    if cfg.model.encoder.backend == "timm":  # a registered model with a pretrained tag the hub serves
        assert cfg.model.encoder.name in timm.list_pretrained(cfg.model.encoder.name), cfg.model.encoder.name
    assert cfg.run.precision == "bf16" and cfg.run.batch_size == 1024 and cfg.optim.grad_clip == 1.0
    assert cfg.loss.perceptual_weight == 1.1 and cfg.loss.gan_weight == 0.1
    assert cfg.model.quantizer.kind == "simvq" and cfg.model.quantizer.codebook_size == 16384
    if cfg.stage == 1:
        assert cfg.optim.lr == 4e-4 and cfg.optim.lr * cfg.optim.min_lr_ratio == pytest.approx(1e-4)
        assert cfg.optim.warmup_steps == 2000 and cfg.loss.gan_start_step == 50000
    else:
        assert cfg.encoder_lr == 1e-5 and cfg.loss.distill_weight == 1.0


def _hub_encoders() -> list:
    out = []
    for p in TOKENIZER_RECIPES:
        enc = load_config(TokenizerTrainConfig, p).model.encoder
        if enc.backend == "timm" and enc.pretrained and not enc.weights:
            out.append((os.path.relpath(p, ROOT), enc.name))
    return out


@pytest.mark.parametrize("path,name", _hub_encoders())
def test_recipes_name_timm_encoders_the_hub_serves(path, name):
    import timm

    assert name in timm.list_pretrained(name), (path, name)


def test_the_generation_recipe_is_the_papers():
    cfg = load_config(MLLMTrainConfig, os.path.join(ROOT, "configs/mllm/qwen3_0p6b_generation.yaml"))
    assert (cfg.model.llm, cfg.optim.lr, cfg.run.zero_stage, cfg.run.precision) == ("Qwen/Qwen3-0.6B", 1e-4, 1, "bf16")
    assert cfg.data.task_ratio == 1.0 and not cfg.data.loss_on_text  # loss on visual tokens only
    assert dataclasses.asdict(cfg.model.lora)["enabled"] is False
