"""What importing the packages costs: no scipy, DeepSpeed or command-line code for the models, neither
``datasets`` nor pyarrow for inference (scripts/generate.py, scripts/app.py and scripts/chat.py load them only
to train), and none of the libraries that cost seconds at every start without being used (wandb, which timm
imports eagerly; torchmetrics, which loads all its domains)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

# The imports, in this order, in one fresh interpreter where importing scipy fails; after each, the loaded modules
# whose top-level package is in WATCHED or whose name is in NAMES.
RUNTIME = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "vqrae", "runtime")) if f.endswith(".py"))
STEPS = {
    "tokenizer": "import vqrae",
    "models": "import mllm\nfrom mllm.model import UnifiedModel",
    "runtime": "".join(f"import vqrae.runtime.{name}\n" for name in RUNTIME if name != "__init__"),
    "inference": ("import mllm, vqrae.cli\nimport mllm.inference, mllm.chat, mllm.sampling\n"
                  "from mllm.inference import load_model, generate_images, answer_question, read_image"),
    "training data": "import mllm.data",
    "wandb afterwards": "import wandb" if importlib.util.find_spec("wandb") else "pass",
}
WATCHED = ("deepspeed", "demo", "datasets", "pyarrow", "wandb", "torchmetrics")
NAMES = ("vqrae.cli", "vqrae.runtime", "vqrae.train", "mllm.train")


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[str]]:
    """After each step, the watched modules loaded; under "OMP_WAIT_POLICY", its value after ``import vqrae`` (the
    interpreter starts without one)."""
    code = ("import json, os, sys\nsys.modules['scipy'] = None  # importing it would fail: the packages must not "
            "need it\nseen = {}\n")
    for name, imports in STEPS.items():
        code += (f"{imports}\nseen[{name!r}] = sorted(m for m in sys.modules "
                 f"if m.split('.')[0] in {WATCHED!r} or m in {NAMES!r})\n")
        if name == "tokenizer":
            code += "seen['OMP_WAIT_POLICY'] = [os.environ.get('OMP_WAIT_POLICY')]\n"
    code += "print(json.dumps(seen))\n"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # this process's packages set it
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return {name: set(mods) for name, mods in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def test_importing_the_packages_needs_no_scipy_deepspeed_or_command_line_code(loaded):
    assert loaded["models"] == set(), loaded["models"]


def test_the_tokenizer_loads_neither_wandb_nor_torchmetrics_and_wandb_still_imports_afterwards(loaded):
    """timm imports wandb where it is installed (lmms-eval requires it); ``import vqrae`` keeps it out, and a later
    ``import wandb`` of the user's own loads it as usual."""
    assert loaded["tokenizer"] == set(), loaded["tokenizer"]
    if STEPS["wandb afterwards"] != "pass":
        assert "wandb" in loaded["wandb afterwards"]


def test_inference_loads_neither_datasets_nor_pyarrow(loaded):
    """``import mllm`` and everything scripts/generate.py, scripts/chat.py and scripts/app.py import to answer and
    draw; training data (``mllm.data``) is what needs them."""
    assert not {m for m in loaded["inference"] if m.split(".")[0] in ("datasets", "pyarrow")}, loaded["inference"]
    assert {"datasets", "pyarrow"} <= loaded["training data"]  # the test can see them


def test_openmp_threads_sleep_when_idle_by_default(loaded):
    """``import vqrae`` sets OMP_WAIT_POLICY=PASSIVE before it first imports torch (OpenMP reads it when torch loads);
    a user's own value wins (tests/test_threads.py)."""
    assert loaded["OMP_WAIT_POLICY"] == {"PASSIVE"}


def test_the_training_runtime_imports_without_deepspeed(loaded):
    """Every module of ``vqrae.runtime`` loads without DeepSpeed: only the functions that call it import it."""
    assert not {m for m in loaded["runtime"] if m.split(".")[0] == "deepspeed"}, loaded["runtime"]
    assert "vqrae.runtime" in loaded["runtime"]  # the test can see the package
