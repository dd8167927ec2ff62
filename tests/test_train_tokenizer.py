"""End-to-end: the real `deepspeed` launcher on 2 CPU ranks, stage 1 -> resume -> stage 2."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import deepspeed_run, logged, write_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_images(str(folder / "train"))
    return str(folder)


def test_two_stages_resume_reproduces_uninterrupted_run(images, tmp_path):
    a, b, s2 = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "s2")
    # the k-means codebook (computed per rank, rank 0's broadcast) and the quantizer's own lr run on 2 ranks too
    common = [f"data.source={images}", "run.steps=12", "run.save_every=4", "run.keep_last=10",
              "model.quantizer.init=kmeans", "quantizer_lr=5e-4"]
    proc = deepspeed_run("scripts/train_tokenizer.py", "configs/tokenizer/tiny_stage1.yaml", *common, f"run.output_dir={a}")
    assert "lr/quantizer=" in proc.stdout + proc.stderr
    recon = logged(proc.stdout + proc.stderr, "loss/recon")
    assert len(recon) == 6 and recon[-1] < recon[0], recon
    assert os.path.isfile(os.path.join(a, "model", "model.safetensors"))
    assert os.listdir(os.path.join(a, "samples")) and os.listdir(os.path.join(a, "tb"))

    # resume from the step-4 checkpoint in a fresh directory: the next 8 steps must match exactly (fp32, CPU)
    os.makedirs(os.path.join(b, "checkpoints"))
    shutil.copytree(os.path.join(a, "checkpoints", "step_00000004"), os.path.join(b, "checkpoints", "step_00000004"))
    proc = deepspeed_run("scripts/train_tokenizer.py", "configs/tokenizer/tiny_stage1.yaml", *common, f"run.output_dir={b}", resume="auto")
    assert "resumed from" in proc.stdout + proc.stderr
    for step in ("step_00000008", "step_00000012"):
        wa = load_file(os.path.join(a, "checkpoints", step, "model", "model.safetensors"))
        wb = load_file(os.path.join(b, "checkpoints", step, "model", "model.safetensors"))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), step
        ea = load_file(os.path.join(a, "checkpoints", step, "ema.safetensors"))
        eb = load_file(os.path.join(b, "checkpoints", step, "ema.safetensors"))
        assert all(torch.equal(ea[k], eb[k]) for k in ea)

    # stage 2 from the stage-1 export: no missing keys, encoder trains, distillation starts at zero
    proc = deepspeed_run("scripts/train_tokenizer.py", "configs/tokenizer/tiny_stage2.yaml", f"data.source={images}",
                         f"init_from={os.path.join(a, 'model')}", f"run.output_dir={s2}", "run.steps=4",
                         "run.log_every=1")
    log = proc.stdout + proc.stderr
    distill = logged(log, "loss/distill")
    assert distill[0] == 0.0 and distill[-1] > 0.0
    assert "lr/encoder=" in log
    w1 = load_file(os.path.join(a, "model", "model.safetensors"))
    w2 = load_file(os.path.join(s2, "model", "model.safetensors"))
    assert w1.keys() == w2.keys()
    assert not torch.equal(w1["encoder.model.patch_embed.proj.weight"], w2["encoder.model.patch_embed.proj.weight"])


def test_stage_2_without_stage_1_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/train_tokenizer.py", "--config", "configs/tokenizer/tiny_stage2.yaml",
                           f"init_from={tmp_path}/missing", "data.source=x"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "run stage 1 first" in proc.stderr


def test_bf16_on_two_ranks_with_zero2_trains_and_exports_a_loadable_fp32_model(images, tmp_path):
    """bf16 autocast over fp32 master weights with gradients reduced across ranks (the GAN's engine too)."""
    from vqrae import VQRAE

    out = str(tmp_path / "bf16")
    proc = deepspeed_run("scripts/train_tokenizer.py", "configs/tokenizer/tiny_stage1.yaml", f"data.source={images}",
                         "run.precision=bf16", "run.zero_stage=2", "run.steps=3", "run.log_every=1",
                         "loss.perceptual_weight=0", "loss.gan_start_step=0", f"run.output_dir={out}")
    log = proc.stdout + proc.stderr
    assert "zero 2, bf16" in log
    total = logged(log, "loss/loss")
    assert len(total) == 3 and all(v == v for v in total) and logged(log, "loss/disc")
    model = VQRAE.from_pretrained(os.path.join(out, "model"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    images_in = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model.tokenize(images_in).shape == (2, 16)
