"""End-to-end: the real `deepspeed` launcher on 2 CPU ranks, stage 1 -> stage 2; stage 2 without stage 1."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import launch_runs, logged, run_outcomes, write_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_images(str(folder / "train"))
    return str(folder)


def test_two_stages_train_on_two_ranks_and_stage_2_starts_from_the_stage_1_export(images, tmp_path):
    """Stage 1 as the tiny recipe ships it (LPIPS, GAN, TensorBoard, sample grids) on 2 ranks, then stage 2 from its
    export, in one launch (tests/launch_worker.py: each run through ``train``, as the script calls it). Resuming
    such a run bit-exactly on 2 ranks (k-means codebook and the quantizer's own lr included) is
    tests/test_elastic.py's signal test, which launches scripts/train_tokenizer.py itself; bf16 with ZeRO-2 on 2
    ranks is among its rank-change cases."""
    a, s2 = str(tmp_path / "a"), str(tmp_path / "s2")
    # the k-means codebook (computed per rank, rank 0's broadcast) and the quantizer's own lr run on 2 ranks too
    stage1 = {"kind": "tokenizer", "config": "configs/tokenizer/tiny_stage1.yaml", "record": str(tmp_path / "stage1"),
              "overrides": [f"data.source={images}", "run.steps=12", "model.quantizer.init=kmeans",
                            "quantizer_lr=5e-4", f"run.output_dir={a}"]}
    stage2 = {"kind": "tokenizer", "config": "configs/tokenizer/tiny_stage2.yaml", "record": str(tmp_path / "stage2"),
              "overrides": [f"data.source={images}", f"init_from={os.path.join(a, 'model')}", f"run.output_dir={s2}",
                            "run.steps=4", "run.log_every=1"]}
    log = launch_runs([stage1, stage2], 2, str(tmp_path / "plan.json"))
    assert run_outcomes(stage1, 2) == run_outcomes(stage2, 2) == ["done"] * 2
    log1, log2 = log.split(f"done: 12 steps; model exported to {a}/model", 1)
    assert "lr/quantizer=" in log1
    recon = logged(log1, "loss/recon")
    assert len(recon) == 6 and recon[-1] < recon[0], recon
    assert os.path.isfile(os.path.join(a, "model", "model.safetensors"))
    assert os.listdir(os.path.join(a, "samples")) and os.listdir(os.path.join(a, "tb"))

    # stage 2 from the stage-1 export: no missing keys, encoder trains, distillation starts at zero
    distill = logged(log2, "loss/distill")
    assert len(distill) == 4 and distill[0] == 0.0 and distill[-1] > 0.0
    assert "lr/encoder=" in log2
    w1 = load_file(os.path.join(a, "model", "model.safetensors"))
    w2 = load_file(os.path.join(s2, "model", "model.safetensors"))
    assert w1.keys() == w2.keys()
    assert not torch.equal(w1["encoder.model.patch_embed.proj.weight"], w2["encoder.model.patch_embed.proj.weight"])


def test_stage_2_without_stage_1_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/train_tokenizer.py", "--config", "configs/tokenizer/tiny_stage2.yaml",
                           f"init_from={tmp_path}/missing", "data.source=x"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "run stage 1 first" in proc.stderr
