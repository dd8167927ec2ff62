"""The package layout's promises: thin scripts, configs left as the caller gave them, the thread count a user chose,
and a tokenizer loop that reads values back to the host once per log interval, the non-finite guard's flags
included. Light imports: tests/test_imports.py."""
import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, tiny_vqrae_config, write_images
from vqrae import VQRAE
from vqrae.runtime.config import OptimConfig, RunConfig, deepspeed_config
from vqrae.runtime.distributed import cpu_threads


@pytest.mark.parametrize("script", ["train_tokenizer.py", "train_mllm.py"])
def test_training_scripts_are_thin(script):
    with open(os.path.join(ROOT, "scripts", script)) as f:
        assert len(f.read().splitlines()) < 100


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


@pytest.mark.parametrize("cores, ranks, want", [(2, 1, 2), (2, 2, 1), (16, 3, 5), (1, 4, 1)])
def test_cpu_threads_share_the_usable_cores(cores, ranks, want):
    assert cpu_threads(ranks, cores=cores) == want


def test_a_users_thread_count_wins(single_rank):
    code = (
        "import torch\n"
        "from vqrae.runtime.distributed import init_distributed\n"
        "init_distributed()\n"
        "print(torch.get_num_threads())\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"


@pytest.mark.parametrize("given, want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_when_idle_unless_the_user_says_otherwise(given, want):
    """The packages set OMP_WAIT_POLICY before torch is first imported (the scripts' import order); a user's value
    wins."""
    code = "import sys, os\nimport mllm\nprint(os.environ.get('OMP_WAIT_POLICY'))\n"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": given} if given else {})
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == want


# -- host synchronisations of the tokenizer loop ---------------------------------------------------------------
SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
PACKAGES = (os.path.join(ROOT, "vqrae") + os.sep, os.path.join(ROOT, "mllm") + os.sep)
HOST_SIDE = (os.path.join("vqrae", "data.py"),)  # the data pipeline's tensors are on the host until the loop moves them


class SyncCounter:
    """Counts reads of tensor values by the host, by the innermost function of our packages that asked."""

    def __init__(self, monkeypatch):
        self.on, self.calls, self.lines = False, {}, []
        for name in SYNCS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        counter = self

        def counted(tensor, *args, **kwargs):
            frame = sys._getframe(1)  # who asked: our code itself, not a library it called (DeepSpeed, torch)
            if counter.on and frame.f_code.co_filename.startswith(PACKAGES) and not frame.f_code.co_filename.endswith(HOST_SIDE):
                where = f"{os.path.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_code.co_qualname}"
                counter.calls[where] = counter.calls.get(where, 0) + 1
                counter.lines.append(f"{where}:{frame.f_lineno}")
            return original(tensor, *args, **kwargs)

        return counted


def _tiny_run(tmp_path, name, *extra):
    from vqrae.config import load_config
    from vqrae.train import TokenizerTrainConfig

    return load_config(TokenizerTrainConfig, os.path.join(ROOT, "configs/tokenizer/tiny_stage1.yaml"), [
        f"data.source={tmp_path / 'images'}", f"run.output_dir={tmp_path / name}", "run.steps=9", "run.log_every=3",
        "run.save_every=9", "run.batch_size=4", "run.micro_batch_size=4", "run.image_every=0", "run.progress_bar=false",
        "run.tensorboard=false", "loss.perceptual_weight=0", "loss.gan_start_step=0", *extra])


@pytest.mark.slow
def test_tokenizer_loop_reads_back_once_per_log_interval_and_logs_the_same_values(single_rank, tmp_path,
                                                                                  monkeypatch, caplog):
    """Inside the loop only the log step reads values back, once per interval (the non-finite guard's flags
    travel with it); what is logged equals the per-step losses."""
    import vqrae.train as vt
    from tests.helpers import log_lines

    write_images(str(tmp_path / "images" / "train"), 16, size=32)
    counter = SyncCounter(monkeypatch)
    steps = []

    def counted_step(*args, **kwargs):
        counter.on = True  # from the first micro-step on; the checkpoint at the end is left out below
        result = real_step(*args, **kwargs)
        steps.append(result)
        return result

    def uncounted_save(*args, **kwargs):
        counter.on = False
        return real_save(*args, **kwargs)

    real_step, real_save = vt.train_step, vt.save_checkpoint
    monkeypatch.setattr(vt, "train_step", counted_step)
    monkeypatch.setattr(vt, "save_checkpoint", uncounted_save)
    caplog.set_level("INFO", logger="vqrae")
    vt.train(_tiny_run(tmp_path, "a"))
    monkeypatch.undo()
    assert len(steps) == 9
    summary = counter.calls.pop("vqrae/runtime/log.py:MetricsWindow.read", 0)
    assert summary == 3  # one packed transfer per log interval, nothing per micro-step
    assert counter.calls == {}, f"host reads in the loop: {sorted(set(counter.lines))}"

    # the same run, its per-step losses read one by one: the logged means are theirs
    totals = []

    def reading_step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        totals.append({k: float(v) for k, v in result.loss.terms.items()} | {"loss": float(result.loss.total)})
        return result

    caplog.clear()
    monkeypatch.setattr(vt, "train_step", reading_step)
    vt.train(_tiny_run(tmp_path, "b"))
    logged = [line for line in log_lines(caplog) if line.startswith("step ")]
    assert len(logged) == 3
    for i, line in enumerate(logged):
        values = dict(part.split("=") for part in line.split()[2:])
        window = totals[3 * i : 3 * i + 3]
        for key in ("recon", "commit", "codebook", "gan", "loss"):
            assert float(values[f"loss/{key}"]) == pytest.approx(sum(t[key] for t in window) / 3, rel=1e-3)


def test_every_benchmark_and_study_imports_against_the_current_packages():
    """The benchmarks and studies run only by hand (or on a GPU): at least their imports must match the packages."""
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "bench")) if f.endswith(".py"))
    studies = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "scripts", "experiments")) if f.endswith(".py"))
    code = "import importlib, sys\nsys.path[:0] = ['bench', 'scripts/experiments', '.']\n" + "".join(
        f"importlib.import_module({n!r})\n" for n in names + studies)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(names) >= 8 and len(studies) >= 2
