"""End-to-end: the real `deepspeed` launcher on 2 CPU ranks trains both tasks, checkpoints, resumes exactly; a
fine-tuning stage without its pretraining stage."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mllm import UnifiedModel
from tests.helpers import launch_runs, logged, run_outcomes, run_script, write_tiny_assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/mllm/tiny.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(str(tmp_path_factory.mktemp("tiny_mllm")), num_train=48)


def same_weights(a: str, b: str) -> bool:
    for name in ("llm/model.safetensors", "projector.safetensors", "image_positions.safetensors"):
        wa, wb = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
            return False
    return True


def test_joint_training_resumes_exactly_with_precomputed_codes(assets, tmp_path):
    """Both tasks on 2 ranks, then a resume from the step-4 checkpoint that reads precomputed codes instead of running
    the VQRAE, in one launch (tests/launch_worker.py: each run through ``train``, as the script calls it)."""
    a, b, codes = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "codes")
    common = [f"model.llm={assets['llm']}", f"model.vqrae={assets['vqrae']}", f"data.generation.source={assets['data']}",
              f"data.understanding.source={assets['data']}", "run.steps=12", "run.save_every=4", "run.keep_last=10",
              "model.image_positions=true"]
    # The codes depend on the stored VQRAE and the data only: computed before the launch, read by the resume.
    assert run_script("tokenize_dataset.py", ["--vqrae", assets["vqrae"], "--data", assets["data"], "--out", codes,
                                              "--dtype", "float32"]) == 0
    first = {"kind": "mllm", "config": CONFIG, "overrides": [*common, f"run.output_dir={a}"], "record": str(tmp_path / "first")}
    resumed = {"kind": "mllm", "config": CONFIG, "record": str(tmp_path / "resumed"),
               "resume": os.path.join(a, "checkpoints", "step_00000004"),
               "overrides": [*common, f"run.output_dir={b}", f"data.generation.codes_from={codes}"]}
    log = launch_runs([first, resumed], 2, str(tmp_path / "plan.json"))
    assert run_outcomes(first, 2) == run_outcomes(resumed, 2) == ["done"] * 2
    log, log_resumed = log.split(f"done: 12 steps; model exported to {a}/model", 1)
    for task in ("generation", "understanding"):
        curve = logged(log, f"{task}/loss")
        assert len(curve) == 6 and curve[-1] < curve[0] - 0.5, (task, curve)
        assert len(logged(log, f"{task}/tokens_per_s")) == 6
    assert logged(log, "lr/llm")[-1] == pytest.approx(3e-3) and len(logged(log, "grad_norm")) == 6
    assert os.listdir(os.path.join(a, "tb"))
    export = os.path.join(a, "model")
    assert same_weights(export, os.path.join(a, "checkpoints", "step_00000012", "model"))
    model = UnifiedModel.from_pretrained(export)
    assert not {id(p) for p in model.vqrae.parameters()} & {id(p) for p in [p for p in model.parameters() if p.requires_grad]}
    stored = load_file(os.path.join(assets["vqrae"], "model.safetensors"))
    assert all(torch.equal(v, model.vqrae.state_dict()[k]) for k, v in stored.items())
    initial = load_file(os.path.join(assets["llm"], "model.safetensors"))
    trained = load_file(os.path.join(export, "llm", "model.safetensors"))
    assert not torch.equal(initial["model.layers.0.self_attn.q_proj.weight"], trained["model.layers.0.self_attn.q_proj.weight"])
    assert model.image_position_table().abs().sum(dim=-1).gt(0).all()  # every index trained away from zero

    # The resume read the codes instead of running the VQRAE: the same batches, so the same fp32 weights at steps 8
    # and 12.
    assert f"resumed from step 4 on 2 ranks (checkpoint written by 2): {a}/checkpoints/step_00000004" in log_resumed
    for step in ("step_00000008", "step_00000012"):
        assert same_weights(os.path.join(a, "checkpoints", step, "model"), os.path.join(b, "checkpoints", step, "model"))


def test_fine_tuning_without_its_pretraining_stage_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/train_mllm.py", "--config", "configs/mllm/llava15_sft.yaml",
                           f"init_from={tmp_path}/missing"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "run the earlier stage first" in proc.stderr
