"""The tokenizer loop reads values back to the host once per log interval (the non-finite guard's flags travel
with that read), and what it logs equals the per-step losses."""
import os
import sys

import pytest
import torch

from tests.helpers import ROOT, log_lines, write_images

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
    travel with it); what is logged equals the per-step losses. One run serves both: the test reads each step's
    losses from its own frame, which the counter leaves out (it counts reads our packages ask for)."""
    import vqrae.train as vt

    write_images(str(tmp_path / "images" / "train"), 16, size=32)
    counter = SyncCounter(monkeypatch)
    steps, totals = [], []

    def counted_step(*args, **kwargs):
        counter.on = True  # from the first micro-step on; the checkpoint at the end is left out below
        result = real_step(*args, **kwargs)
        steps.append(result)
        counter.on = False  # the test's own reads of this step's losses: not the loop's
        totals.append({k: float(v) for k, v in result.loss.terms.items()} | {"loss": float(result.loss.total)})
        counter.on = True
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

    # the logged means are those of the per-step losses read one by one
    logged = [line for line in log_lines(caplog) if line.startswith("step ")]
    assert len(logged) == 3
    for i, line in enumerate(logged):
        values = dict(part.split("=") for part in line.split()[2:])
        window = totals[3 * i : 3 * i + 3]
        for key in ("recon", "commit", "codebook", "gan", "loss"):
            assert float(values[f"loss/{key}"]) == pytest.approx(sum(t[key] for t in window) / 3, rel=1e-3)
