import os

import pytest
import torch
import torchvision.models._api as tv_api
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

from tests.helpers import rank_env, tiny_vqrae_config
from vqrae import VQRAEConfig

torch.set_num_threads(min(2, os.cpu_count() or 1))

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def tiny_config() -> VQRAEConfig:
    return tiny_vqrae_config()


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to fetch weights (torch hub, torchvision, torch-fidelity) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download weights")

    for module in (torch.hub, tv_api, tf_inception):
        monkeypatch.setattr(module, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def single_rank():
    """The environment the launcher gives one rank, for trainers run in this process; restored afterwards."""
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    os.environ.update(rank_env())
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
