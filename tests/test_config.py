"""``vqrae.config.load_config``: defaults, then the YAML, then the dotted overrides left to right."""
import pytest

from vqrae.config import ConfigError, load_config
from vqrae.train import TokenizerTrainConfig


def test_overrides_apply_left_to_right_as_one_by_one():
    cfg = load_config(TokenizerTrainConfig, "configs/tokenizer/tiny_stage1.yaml", [
        "run.steps=3", "run.steps=5",  # the later wins
        "model.encoder.model_kwargs={depth: 1, embed_dim: 16}", "model.encoder.model_kwargs.depth=3",  # then a key in it
        "loss.perceptual_weight=0"])
    assert cfg.run.steps == 5 and cfg.loss.perceptual_weight == 0.0
    assert cfg.model.encoder.model_kwargs["depth"] == 3 and cfg.model.encoder.model_kwargs["embed_dim"] == 16
    assert cfg.model.encoder.model_kwargs["patch_size"] == 8  # the YAML's other keys stay
    assert cfg.run.batch_size == 8  # the YAML's, untouched


@pytest.mark.parametrize("overrides, named", [
    (["run.steps=3", "run.steps=many", "run.batch_size=4"], "override 'run.steps=many'"),
    (["run.steps=3", "run.stepz=4"], "override 'run.stepz=4'"),
])
def test_the_failing_override_is_named(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_config(TokenizerTrainConfig, "configs/tokenizer/tiny_stage1.yaml", overrides)
