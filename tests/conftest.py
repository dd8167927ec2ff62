import contextlib
import gc
import os
import shutil

import pytest

# Nothing heavy is imported here at module level: pytest-xdist's controller process loads this file too, and
# torch, torchvision, transformers and timm cost it ~7 s of CPU while the workers it starts import them.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def pytest_configure(config):
    if getattr(config.option, "dist", "no") != "no" and "PYTEST_XDIST_WORKER" not in os.environ:
        return  # pytest-xdist's controller: it runs no test
    import torch

    # Two threads, or one per pytest-xdist worker when pyproject's addopts run the suite in two (the machine's
    # cores shared, not oversubscribed).
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))
    if WORKERS > 1:
        # The scripts and ranks the tests start take the same share (a user's own setting wins): a lone rank
        # would otherwise take every core beside the other worker's tests. tests/test_threads.py and the
        # shared-memory check in tests/test_reliability.py start their interpreters without it, to test the
        # trainers' own count.
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


# The longest files, longest first (measured with --durations): started before the rest, the two workers end
# together instead of one running the demo alone at the end. Every other file keeps its place.
LONGEST_FIRST = ("test_elastic.py", "test_demo_pipeline.py", "test_recipes.py", "test_train_tokenizer.py",
                 "test_train_mllm.py", "test_io_failures.py", "test_reliability.py")


def pytest_collection_finish(session):
    # What collection imported stays for the whole session: out of the collector's sight, each full collection
    # (DeepSpeed calls gc.collect() at every ZeRO-3 engine's set-up) walks only what the tests create.
    gc.freeze()


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: a file's own order is kept


@pytest.fixture
def tiny_config():
    from tests.helpers import tiny_vqrae_config

    return tiny_vqrae_config()


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to fetch weights (torch hub, torchvision, torch-fidelity) fails the test."""
    import torch
    import torchvision.models._api as tv_api
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download weights")

    for module in (torch.hub, tv_api, tf_inception):
        monkeypatch.setattr(module, "load_state_dict_from_url", refuse)


@contextlib.contextmanager
def lone_rank():
    """The environment the launcher gives one rank, inside the block; restored afterwards."""
    from tests.helpers import DIST_ENV, rank_env

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    os.environ.update(rank_env())
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def single_rank():
    """The environment the launcher gives one rank, for trainers run in this process; restored afterwards."""
    with lone_rank():
        yield


# ----------------------------------------------------------------------------- the reference tokenizer run
# The tiny tokenizer run that the checkpoint, resume and pre-emption tests start from or compare against:
# 4 steps of 4 images (one epoch of 16), checkpoints at steps 2 and 4, GAN from the first step (its engine is
# saved, re-split and resumed too), no LPIPS (its random VGG trunk dominates a CPU step), no TensorBoard.
REFERENCE_CONFIG = os.path.join(ROOT, "configs", "tokenizer", "tiny_stage1.yaml")
REFERENCE_FAST = ["loss.perceptual_weight=0", "loss.gan_start_step=0", "run.tensorboard=false", "run.image_every=0",
                  "run.batch_size=4", "run.micro_batch_size=4", "run.log_every=1", "run.keep_last=5"]
REFERENCE_STEPS = ["run.steps=4", "run.save_every=2"]


@pytest.fixture(scope="session")
def reference_images(tmp_path_factory) -> str:
    """The reference run's image folder (``train/``: 16 images)."""
    from tests.helpers import write_images

    folder = tmp_path_factory.mktemp("reference_images")
    write_images(str(folder / "train"), 16)
    return str(folder)


def reference_argv(images: str, out: str, *extra: str) -> list[str]:
    """``scripts/train_tokenizer.py`` arguments of the reference run (``extra`` after them, so they win)."""
    return ["--config", REFERENCE_CONFIG, f"data.source={images}", f"run.output_dir={out}", *REFERENCE_FAST,
            *REFERENCE_STEPS, *extra]


@pytest.fixture(scope="session")
def reference_run(reference_images, tmp_path_factory):
    """``reference_run(zero)``: the output folder of the reference run under that ZeRO stage (the config's own
    stage 1 by default), trained once per session in this process; tests copy it, never change it."""
    from tests.helpers import run_script

    runs: dict = {}

    def get(zero: int = 1) -> str:
        if zero not in runs:
            out = str(tmp_path_factory.mktemp(f"reference_zero{zero}") / "run")
            with lone_rank():
                code = run_script("train_tokenizer.py", reference_argv(reference_images, out, f"run.zero_stage={zero}"))
            assert code == 0, f"the reference run (ZeRO-{zero}) failed"
            assert not os.path.exists(os.path.join(out, "run.lock"))  # released at the end
            runs[zero] = out
        return runs[zero]

    return get


def copy_checkpoint(run: str, step: int, out: str) -> str:
    """Copy ``run``'s step-``step`` checkpoint into a fresh output folder ``out``; returns its path there."""
    name = os.path.join("checkpoints", f"step_{step:08d}")
    shutil.copytree(os.path.join(run, name), os.path.join(out, name))
    return os.path.join(out, name)
