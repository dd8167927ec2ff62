"""End-to-end: the real `deepspeed` launcher on 2 CPU ranks, stage 1 -> stage 2."""
import os
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


def test_two_stages_train_on_two_ranks_and_stage_2_starts_from_the_stage_1_export(images, tmp_path):
    """Stage 1 as the tiny recipe ships it (LPIPS, GAN, TensorBoard, sample grids) on 2 ranks, then stage 2 from its
    export. Resuming such a run bit-exactly on 2 ranks (k-means codebook and the quantizer's own lr included) is
    tests/test_elastic.py's signal test; bf16 with ZeRO-2 on 2 ranks is among its rank-change cases."""
    a, s2 = str(tmp_path / "a"), str(tmp_path / "s2")
    # the k-means codebook (computed per rank, rank 0's broadcast) and the quantizer's own lr run on 2 ranks too
    common = [f"data.source={images}", "run.steps=12", "model.quantizer.init=kmeans", "quantizer_lr=5e-4"]
    proc = deepspeed_run("scripts/train_tokenizer.py", "configs/tokenizer/tiny_stage1.yaml", *common, f"run.output_dir={a}")
    assert "lr/quantizer=" in proc.stdout + proc.stderr
    recon = logged(proc.stdout + proc.stderr, "loss/recon")
    assert len(recon) == 6 and recon[-1] < recon[0], recon
    assert os.path.isfile(os.path.join(a, "model", "model.safetensors"))
    assert os.listdir(os.path.join(a, "samples")) and os.listdir(os.path.join(a, "tb"))

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
