"""Configs stay as the caller gave them: building a model or a DeepSpeed config never changes its argument."""
import copy
import dataclasses

from tests.helpers import tiny_vqrae_config
from vqrae import VQRAE
from vqrae.runtime.config import OptimConfig, RunConfig, deepspeed_config


def test_building_a_model_leaves_its_config_alone():
    cfg = tiny_vqrae_config()
    before = copy.deepcopy(cfg)
    model = VQRAE(cfg)
    assert cfg == before
    assert model.cfg is not cfg and model.cfg.encoder.mean is not None  # the resolved settings are the model's


def test_deepspeed_config_leaves_the_run_config_alone():
    run = RunConfig(batch_size=8, micro_batch_size=8, zero_stage=0, deepspeed_config="configs/deepspeed/zero2.json")
    before = dataclasses.replace(run)
    assert deepspeed_config(run, OptimConfig(), 1)["zero_optimization"]["stage"] == 2
    assert run == before
