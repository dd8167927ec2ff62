"""The training scripts stay thin: parse the config and call the package's loop."""
import os

import pytest

from tests.helpers import ROOT


@pytest.mark.parametrize("script", ["train_tokenizer.py", "train_mllm.py"])
def test_training_scripts_are_thin(script):
    with open(os.path.join(ROOT, "scripts", script)) as f:
        assert len(f.read().splitlines()) < 100
